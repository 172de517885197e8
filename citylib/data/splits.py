"""Train/val/test splits that never leak: grouped by capture location, stratified by city.

Images of one group (one Street View panorama, one generated spot seen from several views)
look alike, so a group must land in exactly one split or test accuracy measures memory.
Reads a records frame (columns ``city``, ``group``); writes nothing.
"""
from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """The records cannot be split as asked; the message names the group or city at fault."""


def split_groups(frame: pd.DataFrame, ratios=(6.0, 2.0, 2.0), seed: int = 0) -> pd.Series:
    """Assign every row to 'train', 'val' or 'test' (a Series aligned with ``frame``).

    Whole groups are assigned; within each city the image counts approach ``ratios``
    (train:val:test). The result depends only on the (city, group) contents and ``seed``,
    not on the row order, and each city is split independently of the others.
    """
    ratios = np.asarray(ratios, dtype=float)
    if ratios.shape != (3,) or not np.all(np.isfinite(ratios)) or np.any(ratios <= 0):
        raise SplitError(f"ratios must be three positive numbers (train, val, test), got {tuple(ratios)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SplitError(f"seed must be a non-negative integer, got {seed!r}")
    if frame.empty:
        raise SplitError("nothing to split: no records")
    cg = pd.DataFrame({"city": frame["city"].astype(str), "group": frame["group"].astype(str)},
                      index=frame.index)

    spans = cg.groupby("group")["city"].nunique()
    if (spans > 1).any():
        group = spans[spans > 1].index[0]
        cities = sorted(cg.loc[cg["group"] == group, "city"].unique())
        raise SplitError(f"group {group!r} spans cities {cities}; a group must belong to one city "
                         f"({int((spans > 1).sum())} such group(s))")

    assignment: dict[str, str] = {}
    sizes = cg.groupby(["city", "group"]).size()  # sorted by (city, group): row order is irrelevant
    for city, per_city in sizes.groupby(level="city"):
        groups = per_city.droplevel("city")
        if len(groups) < 3:
            raise SplitError(f"city {city!r} has {len(groups)} group(s) ({int(groups.sum())} images); "
                             "at least 3 are needed so that train, val and test each get one")
        rng = np.random.default_rng([int(seed), zlib.crc32(str(city).encode())])
        assignment.update(_assign_city(groups, ratios, rng))
    return cg["group"].map(assignment).rename("split")


def _assign_city(groups: pd.Series, ratios: np.ndarray, rng: np.random.Generator) -> dict[str, str]:
    """Largest groups first (random order among equal sizes), each to the split furthest below
    its target; the small groups that come last even out the counts."""
    order = rng.permutation(len(groups))
    order = order[np.argsort(-groups.to_numpy()[order], kind="stable")]
    names = groups.index.to_numpy()[order]
    sizes = groups.to_numpy()[order].astype(float)
    target = sizes.sum() * ratios / ratios.sum()  # (3,) images wanted per split
    count = np.zeros(3)
    chosen = np.zeros(len(names), int)  # split number per group
    for i, size in enumerate(sizes):
        chosen[i] = int(np.argmax(target - count))
        count[chosen[i]] += size
    # A split can end up empty when one group outweighs its target: hand it the smallest
    # group of the split that has the most groups (there are >= 3 groups, so one has >= 2).
    for k in range(3):
        if not (chosen == k).any():
            donor = np.bincount(chosen, minlength=3).argmax()
            chosen[np.flatnonzero(chosen == donor)[-1]] = k  # groups are sorted by size: last = smallest
    return {name: SPLITS[k] for name, k in zip(names, chosen)}


def leakage_report(frame: pd.DataFrame) -> pd.DataFrame:
    """Groups found in more than one split (columns group, splits, images); empty when clean."""
    per_group = frame.groupby(frame["group"].astype(str))["split"].agg(lambda s: sorted(set(s)))
    images = frame.groupby(frame["group"].astype(str)).size()
    leaky = per_group[per_group.map(len) > 1]
    return pd.DataFrame({
        "group": leaky.index.astype(str),
        "splits": [",".join(s) for s in leaky],
        "images": images.loc[leaky.index].to_numpy(dtype=int),
    })


def split_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Images per city and split, with each split's share of the city (for display)."""
    counts = pd.crosstab(frame["city"], frame["split"]).reindex(columns=list(SPLITS), fill_value=0)
    shares = counts.div(counts.sum(axis=1), axis=0).round(3).add_suffix("_share")
    groups = frame.groupby("city")["group"].nunique().rename("groups")
    return pd.concat([counts, shares, groups], axis=1)
