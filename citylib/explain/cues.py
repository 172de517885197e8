"""Planted cues of a generated world: were they found, and could they have been?

Reads an ``r_scores.csv`` table (``histograms.TABLE_COLUMNS``), ground-truth label maps (N, S, S)
uint8 with each image's true city, or per-city pixel shares (``ade20k.pixel_share``), and the
world's planted cues (city -> ADE20K object names); writes nothing (``objects.run`` stores
the scores in the run's ``objects.json`` and ``planted_recovery.csv``).

- ``recovery``: the rank of each planted object by lift among its city's objects, and the mean
  reciprocal rank over cities.
- ``ceiling``: the same for an ideal detector of the planted objects whose map has the
  network's size (``ideal_masks``), upsampled and counted exactly like the network's masks. A
  cue the network ranks low but the ideal detector ranks high was missed by the network; one
  the ideal detector cannot rank high is finer than a map of that size can show.
- ``differences``: how much each object's pixel share differs between the cities, with the
  cities that declare it a cue: the differences a network could use, declared or not.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from citylib.core import ade20k
from citylib.explain import saliency
from citylib.stats import histograms
from citylib.world import worldfile


def _names(objects: Iterable) -> list[str]:
    """Cue names from names or (name, why) pairs, as worlds and callers give them."""
    return [o if isinstance(o, str) else o[0] for o in objects]


def planted(world: str = "default") -> dict[str, tuple[str, ...]]:
    """City -> the object names planted as its cues in a generated world (``worldfile.load_world``)."""
    return {c: tuple(o for o, _ in cues) for c, cues in worldfile.load_world(world).planted.items()}


def recovery(table: pd.DataFrame, cues: Mapping[str, Iterable], top: int = 3
             ) -> tuple[pd.DataFrame, dict]:
    """Rank of each planted object by lift among its city's kept objects (1 = highest).

    Returns one row per (city, planted object): city, object, rank (NaN when the object has no
    row or no lift), lift, R, objects (kept objects of the city); and a dict for metrics.json:
    ``planted_rr`` (per city: 1 / rank of its best-ranked cue, 0 if none is ranked),
    ``planted_mrr`` (their mean), ``planted_all_in_top`` (per city: every cue ranked <= top),
    ``planted_top``. Cities without cues, or without rows in ``table``, are left out.
    """
    rows, rr, all_top = [], {}, {}
    for city, objects in cues.items():
        objects = _names(objects)
        own = table[table["city"] == city]
        if not objects or own.empty:
            continue
        rank = own["lift"].rank(ascending=False, method="min")  # ties share the better rank
        by_name = dict(zip(own["object"], zip(rank, own["lift"], own["R"])))
        ranks = []
        for o in objects:
            r, lift, big_r = by_name.get(o, (np.nan, np.nan, np.nan))
            rows.append({"city": city, "object": o, "rank": r, "lift": lift, "R": big_r, "objects": len(own)})
            ranks.append(r)
        ranked = [r for r in ranks if r == r]  # drop NaN
        rr[city] = 1.0 / min(ranked) if ranked else 0.0
        all_top[city] = len(ranked) == len(ranks) and max(ranked) <= top
    frame = pd.DataFrame(rows, columns=["city", "object", "rank", "lift", "R", "objects"])
    metrics = {"planted_mrr": float(np.mean(list(rr.values()))) if rr else float("nan"),
               "planted_rr": rr, "planted_all_in_top": all_top, "planted_top": top}
    return frame, metrics


def mrr_resamples(hist: histograms.Histograms, cues: Mapping[str, Iterable], weights: np.ndarray) -> np.ndarray:
    """(B,) planted-cue MRR of each resample of the images (``weights`` (B, N), e.g. whole
    spots within each city: ``resampling.spot_weights``), lift recomputed on it; ranked as
    ``recovery`` ranks them (among the city's kept objects, ties sharing the better rank, a
    cue without lift unranked; cities without cues or images left out)."""
    index = {name: i for i, name in hist.names.items()}
    lifts = hist.resampled_lift(weights)
    rr = []
    for c, city in enumerate(hist.cities):
        names = _names(cues.get(city, ()))
        objects, lift = lifts[c]
        if not names or not len(objects):   # as ``recovery``: a city without rows is left out
            continue
        best = np.full(len(weights), np.inf)
        for o in names:
            if o not in index or index[o] not in objects:
                continue
            mine = lift[:, np.searchsorted(objects, index[o])]
            rank = np.where(np.isnan(mine), np.inf, 1 + (lift > mine[:, None]).sum(1))
            best = np.minimum(best, rank)
        rr.append(np.where(np.isfinite(best), 1.0 / best, 0.0))
    return np.mean(rr, axis=0) if rr else np.full(len(weights), np.nan)


def ideal_masks(label_maps: np.ndarray, cities, cues: Mapping[str, Iterable], grid: tuple[int, int],
                names: Mapping[int, str] | None = None, batch: int = histograms.BATCH) -> np.ndarray:
    """The masks of an ideal cue detector on a ``grid`` of map cells: (N, h, w) float32 in [0, 1].

    Cell value = the share of the cell's pixels that belong to one of the image's own city's
    planted objects (``label_maps`` (N, S, S) average-pooled to (h, w), as an S x S image
    falls into an h x w Grad-CAM map), min-max normalised per image by ``saliency.normalise``
    as a Grad-CAM mask is (an image with no cue pixel, or nothing else, gets an all-zero mask).
    Upsampled like a network's mask and counted by ``histograms.Histograms``, it gives the best
    planted-cue ranks a map of that size allows: ``ceiling``. The label maps are read ``batch``
    at a time, so only the (N, h, w) result is held whole.
    """
    index = {name: i for i, name in (names if names is not None else ade20k.names()).items()}
    cities = np.asarray(cities).astype(str)
    ids = {city: [index[o] for o in _names(objects)] for city, objects in cues.items()}
    out = np.zeros((len(label_maps), *grid), np.float32)
    for s in range(0, len(label_maps), batch):
        lab = np.asarray(label_maps[s:s + batch])                            # (b, S, S)
        own = np.zeros(lab.shape, np.float32)                                # 1 = a cue pixel
        for city, wanted in ids.items():
            here = cities[s:s + batch] == city
            own[here] = np.isin(lab[here], wanted)
        pooled = F.adaptive_avg_pool2d(torch.from_numpy(own)[:, None], grid)[:, 0]   # (b, h, w)
        out[s:s + batch] = saliency.normalise(pooled).numpy()
    return out


def ceiling(label_maps: np.ndarray, cities, cues: Mapping[str, Iterable], grid: tuple[int, int],
            upsample: Callable, cfg: histograms.StatsConfig = histograms.StatsConfig(), top: int = 3,
            names: Mapping[int, str] | None = None) -> tuple[pd.DataFrame, dict]:
    """``recovery`` of the ideal cue detector's masks (``ideal_masks``) on a ``grid``
    map, upsampled with ``upsample`` (the one used for the network's masks) and counted with
    ``cfg`` like them: how well a network whose map has that size could possibly do. A cue
    the network misses that the ideal detector ranks in the top ``top`` was missed by the
    network; one the ideal detector cannot rank there is beyond the map's resolution."""
    masks = ideal_masks(label_maps, cities, cues, grid, names)
    size = int(label_maps.shape[-1])
    hist = histograms.Histograms.build(histograms.upsampled(masks, size, upsample), label_maps, cities, cfg,
                                  names, progress=False)
    return recovery(hist.table(ci=False), cues, top)


def differences(share: pd.DataFrame, cues: Mapping[str, Iterable] | None = None,
                floor: float = 0.001) -> pd.DataFrame:
    """Which objects the cities' images differ in, and whether those are declared cues.

    ``share`` is ``ade20k.pixel_share``'s long table (city, object, share, ...). Returns one row
    per object: its mean pixel share in each city (one column per city), ``ratio`` = largest /
    smallest share with shares below ``floor`` counted as ``floor`` (an object a city lacks
    gives a large, finite ratio), and ``planted`` = the cities that declare it a cue (empty if
    none); sorted by ratio, largest first. On a generated world an undeclared object with a
    ratio like the planted ones is a difference a network can use that the ground truth does
    not name.
    """
    wide = share.pivot_table(index="object", columns="city", values="share", fill_value=0.0)
    wide.columns = [str(c) for c in wide.columns]
    ratio = wide.max(axis=1) / wide.clip(lower=floor).min(axis=1)
    owner = {}
    for city, objects in (cues or {}).items():
        for name in _names(objects):
            owner[name] = ", ".join(filter(None, [owner.get(name), city]))
    out = wide.assign(ratio=ratio, planted=[owner.get(o, "") for o in wide.index])
    return out.sort_values("ratio", ascending=False, kind="stable").rename_axis("object").reset_index()
