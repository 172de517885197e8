"""Reliance stage: which objects a run's network relies on, on any dataset (photos too).

For every test image and every object class covering at least ``min_share`` of it (the label
maps: a generated world's ground truth, else the ADE20K model's, ``segment.run``), the object is
removed (``removal``: its pixels, grown by ``dilation``, filled by ``operator``) and the change in
the network's log p(true city) and in its correctness is measured.

The act of filling can change a decision by itself (a filled region is unlike any street), so
each removal has a **matched null**: the same operator fills a region of the same shape and area
elsewhere in the same image, placed where it lies most on the object's surrounding class (the
class most common in a ring around it) and never on the object itself. A null shifted at random
lands on other objects the network uses; one on the surrounding class removes a piece of what
the object stood against. ``adjusted`` = effect - null is the reliance on the object beyond the
act of filling; ``null_cover`` says how much of the null region the surrounding class held.

Per (city, object): the images, the mean effect with a 95% bootstrap interval over the groups
(spots of a generated world, panoramas of photos), the null's, the adjusted one's, the
accuracies with and without, and the rank within the city (1: the most negative effect).

Reads the run's ``best.pt``, the snapshot's cache and the label maps. Writes into the run folder
``reliance.csv`` (the table), ``reliance_images.csv`` (one row per removal) and
``reliance.json`` (settings, segmenter); ``.results/reliance.json`` marks the finished result,
keyed by the settings, the training's key, the label maps' key and the code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from citylib.core import ade20k, devices
from citylib.core.artifacts import ResultFolder, code_key, read_json, write_csv, write_json
from citylib.core.config import check, config_hash, to_dict
from citylib.data import segment
from citylib.explain import removal
from citylib.nets import checkpoint, infer
from citylib.stats import resampling

NAME = "reliance"
COLUMNS = ["city", "object", "n", "groups", "share", "effect", "ci_low", "ci_high", "null_effect",
           "null_ci_low", "null_ci_high", "adjusted", "adjusted_ci_low", "adjusted_ci_high",
           "null_cover", "accuracy_with", "accuracy_without", "rank"]
IMAGE_COLUMNS = ["row", "city", "group", "object", "share", "logp", "logp_removed", "logp_null",
                 "correct", "correct_removed", "correct_null", "predicted_removed", "null_cover"]


@dataclass(frozen=True)
class RelianceConfig:
    """Settings of the reliance stage (the ``reliance:`` section of a parameter file)."""

    operator: str = "linear"  # removal.OPERATORS; chosen on validation images against true
    #                           deletion (benchmarks/calibrate_removal.py, docs/reliance.md)
    dilation: int = 2         # pixels the object's mask grows by before it is filled
    min_share: float = 0.01   # an object is removed from an image where it covers this share
    ring: int = 6             # pixels around the object in which its surrounding class is found
    noise: float = 0.01       # the linear operator's noise ([0, 1] pixel scale)
    radius: int = 3           # the inpainting operators' radius (pixels)
    sigma: float = 10.0       # the blur operator's Gaussian (pixels)
    n_boot: int = 2000        # bootstrap resamples of the groups
    level: float = 0.95       # interval level
    calibrate: tuple[str, ...] = ()   # operators scored against true deletion on a generated
    #                           world (``calibration``) beside the run's own, always scored; the
    #                           choice among them: benchmarks/calibrate_removal.py, on validation
    calibrate_null: bool = False   # also score the run's operator with its matched null
    #                           subtracted (a forward pass more per deletion; it helped no operator
    #                           on validation: benchmarks/calibrate_removal.py scores it for each)
    min_images: int = 5       # a (city, object) pair enters the calibration with this many images
    batch_size: int = 64      # images per forward pass
    seed: int = 0             # of the operator's noise and the bootstrap
    device: str = "auto"      # of the forward passes (citylib.devices)

    def __post_init__(self):
        if self.operator not in removal.OPERATORS:
            raise ValueError(f"reliance.operator: {self.operator!r} is not one of {', '.join(sorted(removal.OPERATORS))}")
        object.__setattr__(self, "calibrate", tuple(self.calibrate))
        if unknown := [o for o in self.calibrate if o not in removal.OPERATORS]:
            raise ValueError(f"reliance.calibrate: {', '.join(map(repr, unknown))} not among {', '.join(sorted(removal.OPERATORS))}")
        check(self, dilation="in [0, 64]", min_share="in (0, 1)", ring="in [1, 64]", noise="in [0, 1]",
              radius="in [1, 64]", sigma="in (0, 100]", min_images=">= 2", n_boot="in [100, 1000000]", level="in [0.5, 1)",
              batch_size=">= 1")
        devices.validate(self)

    def settings(self) -> dict:
        """The operator's own settings (``removal.remove``'s keywords)."""
        return {"noise": self.noise, "radius": self.radius, "sigma": self.sigma}


@dataclass(frozen=True)
class RelianceResult:
    table: pd.DataFrame     # reliance.csv
    images: pd.DataFrame    # reliance_images.csv
    summary: dict           # reliance.json
    key: str
    folder: Path            # the run folder, where these files are
    cache: object           # the snapshot's cache, and the test rows' label maps (read lazily):
    rows: np.ndarray        # (n,) cache rows of the test images
    labels: segment.Rows    # (n, S, S) uint8
    reused: bool = False
    figures: dict = field(default_factory=dict)   # name -> PNG (``pipeline.result``)


def key(cfg: RelianceConfig, training_key: str, labels_key: str) -> str:
    return config_hash(NAME, code_key(__name__), devices.keyed(cfg), training_key, labels_key)


def run(cfg: RelianceConfig, run_dir: str | Path, cache, *, segment_cfg: segment.SegmentConfig,
        segment_dir: str | Path | None = None, progress: bool = True) -> RelianceResult:
    """Measure the reliance on every object of the run's test images, written into ``run_dir``
    (reused when the key matches)."""
    run_dir = Path(run_dir)
    model, cities, training_key = checkpoint.trained(run_dir, cache, cfg.device)
    rows = np.asarray(cache.split_indices("test"), dtype=np.int64)
    folder = ResultFolder(run_dir, NAME, key(cfg, training_key, segment.key(segment_cfg, cache, rows)))
    seg = segment.run(segment_cfg, segment_dir, cache, rows=rows, progress=progress)
    if folder.done() is not None:
        return _load(run_dir, folder.key, cache, rows, seg.of(rows))
    folder.begin()
    index = cache.index.iloc[rows]
    target = np.array([list(cities).index(c) for c in index["city"]], np.int64)
    nets = devices.replicas(model, devices.every(cfg.device))
    images = measure(nets, cache.images, seg.of(rows), rows, target, list(cities), index["group"].to_numpy(str),
                     cfg, progress=progress)
    table = summarise(images, cfg)
    summary = {"segmenter": seg.segmenter, "settings": to_dict(cfg), "images": int(len(rows)),
               "removals": int(len(images))}
    write_csv(run_dir / "reliance.csv", table)
    write_csv(run_dir / "reliance_images.csv", images)
    write_json(run_dir / "reliance.json", summary)
    folder.commit(["reliance.csv", "reliance_images.csv", "reliance.json"], training_key=training_key)
    return RelianceResult(table, images, summary, folder.key, run_dir, cache, rows, seg.of(rows))


def objects(labels: np.ndarray, min_share: float) -> list[tuple[int, int]]:
    """(image, class) of every labelled class covering ``min_share`` of its image or more;
    ``labels`` (B, S, S) uint8, 0 = unlabelled."""
    counts = np.stack([np.bincount(m.ravel(), minlength=256) for m in labels])      # (B, 256)
    counts[:, 0] = 0
    b, c = np.nonzero(counts >= min_share * labels[0].size)
    return list(zip(b.tolist(), c.tolist()))


def null_mask(labels: np.ndarray, mask: np.ndarray, ring: int, dilation: int) -> tuple[np.ndarray, float]:
    """The matched null of one object: a region of ``mask``'s shape and area (S, S) placed in
    the image where it lies most on the object's surrounding class (the commonest class within
    ``ring`` pixels of it), off the object grown by ``dilation``; ties go to the nearest place.
    Returns the region and the share of it on the surrounding class."""
    grown = removal.dilate(mask[None], dilation)[0]
    around = removal.dilate(mask[None], dilation + ring)[0] & ~grown
    apart = removal.dilate(mask[None], 2 * dilation)[0]      # the null, grown too, stays off the grown object
    ring_labels = labels[around & (labels > 0)]
    if ring_labels.size == 0:
        return np.zeros_like(mask), 0.0
    surround = np.bincount(ring_labels).argmax()
    target = ((labels == surround) & ~grown).astype(np.float32)                       # (S, S)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    shape = mask[y0:y1, x0:x1].astype(np.float32)                                      # (h, w)
    # overlap with the target at every place the shape fits in the image, and with the object:
    # a place where the null, grown by the operator, would touch the grown object is never taken
    overlap = cv2.matchTemplate(target, shape, cv2.TM_CCORR)                          # (S-h+1, S-w+1)
    clash = cv2.matchTemplate(apart.astype(np.float32), shape, cv2.TM_CCORR) > 0.5
    gy, gx = np.mgrid[:overlap.shape[0], :overlap.shape[1]]
    score = np.where(clash, -np.inf, np.rint(overlap) - 1e-6 * np.hypot(gy - y0, gx - x0))
    if not np.isfinite(score).any():
        return np.zeros_like(mask), 0.0
    py, px = np.unravel_index(np.argmax(score), score.shape)
    out = np.zeros_like(mask)
    out[py:py + y1 - y0, px:px + x1 - x0] = mask[y0:y1, x0:x1]
    return out, float(np.rint(overlap[py, px]) / mask.sum())


def measure(model: torch.nn.Module | list[torch.nn.Module], images: np.ndarray, labels, rows: np.ndarray,
            target: np.ndarray, cities: list[str], groups: np.ndarray, cfg: RelianceConfig = RelianceConfig(), *,
            names: dict[int, str] | None = None, progress: bool = False) -> pd.DataFrame:
    """One row per removal (``IMAGE_COLUMNS``): ``images[rows]`` (n, S, S, 3) uint8 with their
    label maps ``labels`` (n, S, S), true city indices ``target`` (n,) and ``groups`` (n,);
    forward passes ``cfg.batch_size`` images at a time, removals a batch of masks at once."""
    names = names or ade20k.names()
    out, step = [], max(1, cfg.batch_size // 4)          # about 4 removals per image in a pass
    for start in tqdm(range(0, len(rows), step), desc="reliance", disable=not progress):
        part = np.arange(start, min(start + step, len(rows)))
        batch, maps = np.asarray(images[rows[part]]), np.asarray(labels[part])       # (B, S, S, 3), (B, S, S)
        found = objects(maps, cfg.min_share)
        if not found:
            continue
        b = np.array([i for i, _ in found])
        masks = np.stack([maps[i] == c for i, c in found])                            # (P, S, S)
        nulls = [null_mask(maps[i], m, cfg.ring, cfg.dilation) for (i, _), m in zip(found, masks)]
        op = dict(dilation=cfg.dilation, **cfg.settings())
        removed = removal.remove(cfg.operator, batch[b], masks, seed=cfg.seed + start, **op)
        null_masks = np.stack([n for n, _ in nulls])
        fits = null_masks.any((1, 2))            # a null that fits nowhere leaves the image as it is
        filled = removal.remove(cfg.operator, batch[b][fits], null_masks[fits], seed=cfg.seed + start + 1, **op)
        logp = infer.log_p(model, np.concatenate([batch, removed, filled]), cfg.batch_size)
        p = len(found)
        t = target[part][b]
        orig, rem = logp[:len(part)][b], logp[len(part):len(part) + p]
        nul = orig.copy()
        nul[fits] = logp[len(part) + p:]
        out.append(pd.DataFrame({
            "row": rows[part][b], "city": np.asarray(cities)[t], "group": groups[part][b],
            "object": [names.get(c, str(c)) for _, c in found], "share": masks.mean((1, 2)),
            "logp": orig[np.arange(p), t], "logp_removed": rem[np.arange(p), t], "logp_null": nul[np.arange(p), t],
            "correct": orig.argmax(1) == t, "correct_removed": rem.argmax(1) == t, "correct_null": nul.argmax(1) == t,
            "predicted_removed": np.asarray(cities)[rem.argmax(1)], "null_cover": [c for _, c in nulls]}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=IMAGE_COLUMNS)


def summarise(images: pd.DataFrame, cfg: RelianceConfig = RelianceConfig()) -> pd.DataFrame:
    """reliance.csv from the removals: per (city, object) the mean change of log p(true city)
    with the object removed, with the null region filled, and their difference, each with its
    bootstrap interval over the groups; the accuracies; the rank by effect within the city."""
    out = []
    for (city, obj), g in images.groupby(["city", "object"], sort=True):
        groups = g["group"].to_numpy()
        effect = (g["logp_removed"] - g["logp"]).to_numpy()
        null = (g["logp_null"] - g["logp"]).to_numpy()
        row = {"city": city, "object": obj, "n": len(g), "groups": len(np.unique(groups)),
               "share": float(g["share"].mean())}
        for (m, lo, hi), values in ((("effect", "ci_low", "ci_high"), effect),
                                    (("null_effect", "null_ci_low", "null_ci_high"), null),
                                    (("adjusted", "adjusted_ci_low", "adjusted_ci_high"), effect - null)):
            row[m], row[lo], row[hi] = resampling.bootstrap_interval(values, groups, cfg.n_boot, cfg.level, cfg.seed)
        row.update({"null_cover": float(g["null_cover"].mean()), "accuracy_with": float(g["correct"].mean()),
                    "accuracy_without": float(g["correct_removed"].mean())})
        out.append(row)
    table = pd.DataFrame(out, columns=COLUMNS[:-1])
    table["rank"] = table.groupby("city")["effect"].rank(method="min").astype("Int64")
    return table[COLUMNS].sort_values(["city", "rank"], kind="stable").reset_index(drop=True)


def verdict(table: pd.DataFrame, min_images: int = 5, top: int = 3) -> str:
    """In words, per city: the objects (in ``min_images`` images or more) whose removal lowers
    p(true city) with an interval below 0, strongest first, ``top`` of them; or that none does."""
    lines = []
    for city, t in table[table["n"] >= min_images].groupby("city", sort=True):
        sure = t[t["ci_high"] < 0].nsmallest(top, "effect")
        if sure.empty:
            lines.append(f"{city}: removing no single object lowers p({city}) beyond chance")
            continue
        named = "; ".join(f"{r.object} (Δ log p {r.effect:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}], {r.n} images)"
                          for r in sure.itertuples())
        lines.append(f"{city}: the network relies most on {named}")
    return "\n".join(lines) or "no object in enough images to say"


def _load(run_dir: Path, key: str, cache, rows, labels) -> RelianceResult:
    return RelianceResult(pd.read_csv(run_dir / "reliance.csv", dtype={"city": str, "object": str}),
                          pd.read_csv(run_dir / "reliance_images.csv", dtype={"city": str, "object": str, "group": str}),
                          read_json(run_dir / "reliance.json"), key, run_dir, cache, rows, labels, reused=True)
