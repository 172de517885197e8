"""Histograms of mask values per image and object: which objects each city's network attends
to (the paper's Eq. 1), and lift.

Reads upsampled Grad-CAM masks (N, S, S) float32 in [0, 1] (an array, or an iterable of
(b, S, S) batches in row order, or a callable returning one, so memory stays bounded), label
maps (N, S, S) uint8 (ADE20K indices, 0 = unlabelled) and each image's TRUE city. Writes only
``Histograms.save``'s ``.npz`` (``Histograms.load`` reopens it for a threshold slider without
recomputing Grad-CAM); the objects stage tabulates them (``r_scores.csv``, columns
``TABLE_COLUMNS``).

Definitions (t = threshold; a pixel is "explained" when mask >= t, compared in float32 as
``mask >= t`` compares on a float32 array in numpy or torch):

- R^c_p = sum_{i in c} M_{p,i} / sum_{i in c} N_{p,i} (Eq. 1), N_{p,i} = pixels of object p in
  image i, M_{p,i} = those with mask >= t; c is the image's true city, not the predicted one,
  so R^c_p says what the network looks at in city c's images whatever it then decides.
- coverage^c = mean over c's images of the fraction of pixels with mask >= t (all pixels,
  unlabelled included): the R every object would get if the explanation ignored content.
- lift^c_p = R^c_p / coverage^c (1 = no preference); NaN when coverage is 0 (all-zero masks).
  Its 95% CI is a percentile bootstrap over c's images (resampled with replacement, seeded per
  city name; resamples in which p is absent are left out).
- Object filter (paper 3.4: "the average number of pixels exceeds ... 100"): p is kept for city
  c when sum_{i in c} N_{p,i} / |c| > min_pixels_224 * S^2 / 224^2, i.e. the average is over
  the city's own images, as the paper's per-city histograms show the objects "appearing in" each
  city; the threshold scales with image area from the paper's 224 x 224. Objects absent from a
  city, or below the filter, have no row; unlabelled (0) never has one.

Mask values are counted once into per-(image, object) histograms of ``bins`` equal bins over
[0, 1] whose edges are float32(k / bins) (bin ``bins`` holds v = 1). A threshold must be such
an edge; there M is an exact suffix sum, equal to counting ``mask >= t`` directly, so a
threshold change is a lookup; per-image counts come from the same histograms for the bootstrap.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from citylib.core import ade20k
from citylib.core.artifacts import atomic_path
from citylib.core.config import check, to_dict
from citylib.stats import resampling

TABLE_COLUMNS = ["city", "object", "pixels", "R", "coverage", "lift", "lift_ci_low", "lift_ci_high"]
CLASSES = ade20k.NUM_CLASSES + 1  # label values 0..150
BATCH = 256  # images per step when masks come as one array
TOLERANCE = 1e-3  # mask values this far outside [0, 1] are clipped (interpolation rounding)


@dataclass(frozen=True)
class StatsConfig:
    """Settings of the statistics stage (the ``stats:`` section of a parameter file)."""

    threshold: float = 0.5  # mask >= threshold is "explained"; a multiple of 1 / bins
    bins: int = 100  # histogram bins over [0, 1]: the thresholds available without a rebuild
    min_pixels_224: float = 100.0  # object filter: mean pixels per image at 224 x 224
    bootstrap: int = 1000  # resamples for the lift CI (0: no CI)
    seed: int = 0

    def __post_init__(self):
        check(self, bins="in [1, 1000]", threshold="in [0, 1]", min_pixels_224=">= 0", bootstrap=">= 0",
              seed=">= 0")
        edge(self.threshold, self.bins)


def edge(threshold: float, bins: int) -> int:
    """The bin edge k with threshold == k / bins; ValueError if there is none."""
    k = int(round(threshold * bins))
    if not 0 <= k <= bins or abs(k - threshold * bins) > 1e-6:
        raise ValueError(f"threshold {threshold} is not a multiple of 1/{bins} in [0, 1]; "
                         f"choose one, or change 'bins'")
    return k


def at_threshold(cfg: StatsConfig) -> StatsConfig:
    """``cfg`` with the fewest bins that keep ``cfg.threshold`` an edge (0.5: 2 bins): histograms
    counted with it give the same R, coverage, lift and intervals at that threshold as ``cfg``'s
    (the edge float32(k / bins) is the same number) in a fraction of the memory, and none at
    other thresholds."""
    bins = Fraction(cfg.threshold).limit_denominator(cfg.bins).denominator
    return dataclasses.replace(cfg, bins=bins)


def min_pixels(cfg: StatsConfig, size: int) -> float:
    """The object filter at image side ``size``: min_pixels_224 scaled by area."""
    return cfg.min_pixels_224 * size * size / (224 * 224)


# ---------------------------------------------------------------- counting, once


def upsampled(masks: np.ndarray, size: int, upsample: Callable, batch: int = BATCH) -> Callable:
    """Masks at the network's resolution (N, h, w) as ``build``/``run`` take them: a callable
    yielding ``upsample(masks[a:b], size)`` batches, (b, S, S) float32, one batch in memory at a
    time (e.g. ``upsampled(cam.masks, S, saliency.upsample)``)."""
    return lambda: (upsample(masks[s:s + batch], size) for s in range(0, len(masks), batch))


def _batches(masks, n: int) -> Iterable[np.ndarray]:
    if callable(masks):
        masks = masks()
    if hasattr(masks, "shape") and getattr(masks, "ndim", 0) == 3:  # one (N, S, S) array
        return (masks[s:s + BATCH] for s in range(0, n, BATCH))
    return masks


def _count(m: np.ndarray, lab: np.ndarray, bins: int, upper: np.ndarray, start: int) -> np.ndarray:
    """Histogram of each image: (b, S, S) masks and labels -> (b, CLASSES, bins + 1) int64.

    Bin q holds v with e[q] <= v < e[q + 1], e[k] = float32(k / bins) (``upper[q]`` = e[q + 1]):
    the comparison ``mask >= k / bins`` makes on a float32 array (numpy and torch round the
    Python float to float32).
    """
    out = np.empty((len(m), CLASSES * (bins + 1)), np.int64)
    q, g = np.empty(m.shape[1:], np.intp), np.empty(m.shape[1:], np.intp)
    e, above = np.empty(m.shape[1:], np.float32), np.empty(m.shape[1:], bool)
    # One image at a time: its (S, S) temporaries stay in cache, which beats whole-batch passes.
    for i in range(len(m)):
        v = _in_range(m[i], start + i)
        # floor(v * bins) in float64 (exact) counts the real edges k / bins <= v; a float32 edge
        # rounded below its real value adds one more exactly when v >= e[q + 1].
        np.multiply(v, float(bins), out=q, dtype=np.float64, casting="unsafe")
        np.take(upper, q, out=e)
        np.greater_equal(v, e, out=above)
        np.multiply(lab[i], bins + 1, out=g, dtype=np.intp)  # (S, S) label * (bins + 1)
        q += g
        q += above
        out[i] = np.bincount(q.ravel(), minlength=out.shape[1])
    return out.reshape(len(m), CLASSES, bins + 1)


def _in_range(v: np.ndarray, row: int) -> np.ndarray:
    """One (S, S) mask, checked to lie in [0, 1]; interpolation's rounding overshoot is clipped."""
    lo, hi = float(v.min()), float(v.max())
    if lo >= 0 and hi <= 1:
        return v
    if lo >= -TOLERANCE and hi <= 1 + TOLERANCE:  # False for NaN too
        return np.clip(v, 0, 1)
    raise ValueError(f"mask of image {row} spans {lo}..{hi}; expected values in [0, 1]")


def _sum_by(keys: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Row sums of ``values`` (K, B) grouped by ``keys`` in 0..n-1: (n, B) int64."""
    if np.any(keys[1:] < keys[:-1]):  # pairs come sorted by image: skip the sort then
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.intp)
    out = np.zeros((n, values.shape[1]), np.int64)
    if len(keys):
        out[keys[starts]] = np.add.reduceat(values, starts, axis=0, dtype=np.int64)
    return out


def _checked(m, lab, start: int) -> tuple[np.ndarray, np.ndarray]:
    m, lab = np.asarray(m, dtype=np.float32), np.asarray(lab)
    if m.shape != lab.shape:
        raise ValueError(f"masks of images {start}..{start + len(m) - 1} have shape {m.shape}, "
                         f"their label maps {lab.shape}; upsample the masks to the image size")
    if lab.size and int(lab.max()) >= CLASSES:
        raise ValueError(f"label maps of images {start}..: index {int(lab.max())} > {CLASSES - 1}")
    return m, lab


@dataclass(eq=False)
class Histograms:
    """Per-image, per-object suffix histograms of mask values, counted once.

    ``above[j, k]`` = pixels of object ``obj[j]`` in image ``img[j]`` with mask >= k / bins
    (so ``above[j, 0]`` = N_{p,i}); only the (image, object) pairs present are stored.
    """

    cities: tuple[str, ...]
    city: np.ndarray  # (N,) int: index into cities, per image
    img: np.ndarray  # (K,) int: image of each stored pair
    obj: np.ndarray  # (K,) int: ADE20K index of each stored pair (0 included, for coverage)
    above: np.ndarray  # (K, bins + 1) int32
    size: int  # S
    cfg: StatsConfig = field(default_factory=StatsConfig)
    names: dict = field(default_factory=dict)  # ADE20K index -> name
    _memo: dict = field(default_factory=dict, repr=False)  # bootstrap weights and layouts

    def __post_init__(self):
        c = len(self.cities)
        group = self.city[self.img] * CLASSES + self.obj
        self.city_above = _sum_by(group, self.above, c * CLASSES).reshape(c, CLASSES, -1)  # (C, 151, bins + 1)
        self.image_above = _sum_by(self.img, self.above, len(self.city))  # (N, bins + 1), all objects
        self.images = np.bincount(self.city, minlength=c)  # (C,) images per city

    @classmethod
    def build(cls, masks, label_maps: np.ndarray, cities, cfg: StatsConfig = StatsConfig(),
              names: Mapping[int, str] | None = None, progress: bool = True) -> "Histograms":
        """Count every image once; ``masks`` as in the module docstring, aligned with the rows
        of ``label_maps`` (N, S, S) uint8 and ``cities`` (N,) (true city names)."""
        counting = Counting(label_maps, cities, cfg, names)
        bar = tqdm(total=counting.n, desc="stats: histograms", disable=not progress)
        for m in _batches(masks, counting.n):
            counting.add(m)
            bar.update(len(m))
        bar.close()
        return counting.done()

    # ------------------------------------------------------------ queries

    def coverage(self, threshold: float) -> np.ndarray:
        """(C,) coverage^c: mean fraction of each city's pixels with mask >= threshold."""
        k = edge(threshold, self.cfg.bins)
        share = self.image_above[:, k] / float(self.size * self.size)
        return np.bincount(self.city, share, minlength=len(self.cities)) / np.maximum(self.images, 1)

    def table(self, threshold: float | None = None, ci: bool = True) -> pd.DataFrame:
        """R, coverage and lift of every kept (city, object) at ``threshold`` (default: the config's)."""
        t = self.cfg.threshold if threshold is None else threshold
        k = edge(t, self.cfg.bins)
        n_px, m_px = self.city_above[..., 0], self.city_above[..., k]  # (C, 151)
        c, p = np.nonzero(self.kept())
        cov = self.coverage(t)[c]
        with np.errstate(invalid="ignore", divide="ignore"):
            r = m_px[c, p] / n_px[c, p]
            lift = np.where(cov > 0, r / np.where(cov > 0, cov, 1), np.nan)
        low, high = np.full(len(c), np.nan), np.full(len(c), np.nan)
        if ci and self.cfg.bootstrap > 0:
            for ci_ in np.unique(c):
                rows = np.flatnonzero(c == ci_)
                low[rows], high[rows] = self._bootstrap(ci_, p[rows], k)
        table = pd.DataFrame({
            "city": np.asarray(self.cities, dtype=object)[c],
            "object": [self.names.get(int(i), str(int(i))) for i in p],
            "pixels": n_px[c, p], "R": r, "coverage": cov, "lift": lift,
            "lift_ci_low": low, "lift_ci_high": high})
        return table.sort_values(["city", "lift"], ascending=[True, False], kind="stable",
                                 na_position="last", ignore_index=True)[TABLE_COLUMNS]

    def kept(self) -> np.ndarray:
        """(C, 151) bool: the (city, object) pairs the object filter keeps (unlabelled never)."""
        keep = self.city_above[..., 0] / np.maximum(self.images, 1)[:, None] > min_pixels(self.cfg, self.size)
        keep[:, 0] = False  # unlabelled is not an object
        return keep

    def per_image(self, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dense per-image counts at ``threshold`` (default: the config's): M (N, 151) pixels of
        each object with mask >= t, N (N, 151) pixels of each object, explained (N,) pixels with
        mask >= t; float64, so weighted sums over images (a bootstrap) are exact."""
        k = edge(self.cfg.threshold if threshold is None else threshold, self.cfg.bins)
        m, n = np.zeros((len(self.city), CLASSES)), np.zeros((len(self.city), CLASSES))
        m[self.img, self.obj] = self.above[:, k]
        n[self.img, self.obj] = self.above[:, 0]
        return m, n, self.image_above[:, k].astype(np.float64)

    def resampled_lift(self, weights: np.ndarray, threshold: float | None = None) -> dict:
        """Lift of every kept object of every city in each resample of the images, given as
        ``weights`` (B, N) (how often each image is drawn, e.g. ``resampling.spot_weights``):
        {city index: (objects (q,) class indices, lift (B, q), NaN where undefined)}."""
        m, n, explained = self.per_image(threshold)
        kept, out = self.kept(), {}
        for c in range(len(self.cities)):
            members, objects = np.flatnonzero(self.city == c), np.flatnonzero(kept[c])
            wc = weights[:, members]                                                  # (B, n_c)
            with np.errstate(invalid="ignore", divide="ignore"):
                r = (wc @ m[members][:, objects]) / (wc @ n[members][:, objects])     # (B, q)
                cov = (wc @ explained[members]) / (wc.sum(1) * float(self.size) ** 2)
                out[c] = objects, np.where(cov[:, None] > 0, r / cov[:, None], np.nan)
        return out

    def _bootstrap(self, c: int, objects: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Percentile 95% CI of lift for ``objects`` of city ``c``, resampling its images."""
        members, pairs, row, col = self._layout(c, objects)
        q = len(objects)
        # float64: totals reach n_c * S^2 pixels, past float32's exact integers, and a CI must
        # not miss its point estimate by a rounding error.
        data = np.zeros((len(members), 2 * q + 1))  # (n_c, 2q + 1): [M | N | explained]
        data[row, col] = self.above[pairs, k]
        data[row, q + col] = self.above[pairs, 0]
        data[:, -1] = self.image_above[members, k]
        sums = self._resample_weights(c) @ data  # (B, 2q + 1): each resample's totals
        with np.errstate(invalid="ignore", divide="ignore"):
            r = sums[:, :q] / sums[:, q:2 * q]  # NaN where p is absent from the resample
            cov = sums[:, -1:] / (len(members) * float(self.size) ** 2)
            lift = np.where(cov > 0, r / cov, np.nan)  # (bootstrap, q)
        if not np.isnan(lift).any():
            return tuple(np.percentile(lift, [2.5, 97.5], axis=0))
        with warnings.catch_warnings():  # an all-NaN column (coverage 0) gives a NaN CI
            warnings.simplefilter("ignore", RuntimeWarning)
            return tuple(np.nanpercentile(lift, [2.5, 97.5], axis=0))

    def _layout(self, c: int, objects: np.ndarray):
        """Rows of city c's images, and the stored pairs of ``objects`` in them, with their
        (row, column) in the bootstrap's per-image matrix; the same at every threshold."""
        key = ("layout", c, objects.tobytes())
        if key not in self._memo:
            members = np.flatnonzero(self.city == c)  # (n_c,)
            local = np.full(len(self.city), -1)
            local[members] = np.arange(len(members))
            column = np.full(CLASSES, -1)
            column[objects] = np.arange(len(objects))
            pairs = np.flatnonzero((local[self.img] >= 0) & (column[self.obj] >= 0))
            self._memo[key] = members, pairs, local[self.img[pairs]], column[self.obj[pairs]]
        return self._memo[key]

    def _resample_weights(self, c: int) -> np.ndarray:
        """(bootstrap, n_c) float64: how often each image of city c is drawn in each resample;
        seeded by the city's name, so adding a city changes no other city's CI."""
        key = ("weights", c, self.cfg.bootstrap, self.cfg.seed)
        if key not in self._memo:
            rng = np.random.default_rng([self.cfg.seed, zlib.crc32(self.cities[c].encode())])
            self._memo[key] = resampling.counts(rng, int(self.images[c]), self.cfg.bootstrap)
        return self._memo[key]

    # ------------------------------------------------------------ saving

    def save(self, path: str | Path) -> Path:
        """Write the histograms (and the settings that made them) to one .npz, atomically."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, cities=np.asarray(self.cities), city=self.city, img=self.img, obj=self.obj,
                         above=self.above, size=self.size, cfg=json.dumps(to_dict(self.cfg)),
                         names=json.dumps({str(k): v for k, v in self.names.items()}))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, cfg: StatsConfig | None = None) -> "Histograms":
        """Reopen ``save``'s file; ``cfg`` may change the table settings but not ``bins``."""
        with np.load(path) as z:
            saved = StatsConfig(**json.loads(str(z["cfg"])))
            cfg = cfg or saved
            if cfg.bins != saved.bins:
                raise ValueError(f"{path}: counted with bins={saved.bins}, not {cfg.bins}; rebuild")
            names = {int(k): v for k, v in json.loads(str(z["names"])).items()}
            return cls(tuple(z["cities"].tolist()), z["city"], z["img"], z["obj"], z["above"],
                       int(z["size"]), cfg, names)


class Counting:
    """``Histograms.build`` a batch at a time, for masks made batch by batch: ``add`` the masks
    (b, S, S) of the next b images, in order (with their label maps, where the caller has read
    them already), then ``done``. Several countings can share one pass over the images."""

    def __init__(self, label_maps: np.ndarray, cities, cfg: StatsConfig = StatsConfig(),
                 names: Mapping[int, str] | None = None):
        cities = np.asarray(cities).astype(str)
        self.n, self.size = len(label_maps), int(label_maps.shape[-1])
        if len(cities) != self.n or label_maps.ndim != 3:
            raise ValueError(f"need label maps (N, S, S) and N cities; got {label_maps.shape}, {len(cities)}")
        self.label_maps, self.cfg = label_maps, cfg
        self.names = dict(names if names is not None else ade20k.names())
        self.cities = tuple(sorted(set(cities)))
        self.city = np.searchsorted(self.cities, cities)
        self.upper = np.append(np.arange(1, cfg.bins + 1) / cfg.bins, np.inf).astype(np.float32)  # e[q + 1]
        self.img, self.obj, self.above, self.start = [], [], [], 0

    def add(self, m, lab: np.ndarray | None = None) -> None:
        start = self.start
        m, lab = _checked(m, self.label_maps[start:start + len(m)] if lab is None else lab, start)
        hist = _count(m, lab, self.cfg.bins, self.upper, start)  # (b, 151, bins + 1)
        i, p = np.nonzero(hist.any(axis=-1))  # the (image, object) pairs present
        suffix = np.cumsum(hist[i, p, ::-1], axis=-1)[:, ::-1]  # pixels with mask >= k / bins
        self.img.append(i + start), self.obj.append(p), self.above.append(suffix.astype(np.int32))
        self.start += len(m)

    def done(self) -> Histograms:
        if self.start != self.n:
            raise ValueError(f"got masks for {self.start} images but {self.n} label maps")
        above = np.concatenate(self.above) if self.above else np.zeros((0, self.cfg.bins + 1), np.int32)
        return Histograms(self.cities, self.city, np.concatenate(self.img) if self.img else np.zeros(0, np.intp),
                          np.concatenate(self.obj) if self.obj else np.zeros(0, np.intp), above,
                          self.size, self.cfg, self.names)
