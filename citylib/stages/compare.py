"""Comparison stage: do different architectures (and random initialisations) look at the same
pixels? The average residual AR of Shi et al., section 3.4.1, Eq. 2 and Table 2, with CIs and tests.

Reads, per run folder: ``config.json`` (name, arch, seed; ``metrics.json``'s config otherwise),
``gradcam/`` (``gradcam.load``), ``r_scores.csv`` if there is one, and ``best.pt`` plus the
data cache for the randomised reference. Writes ``<out_dir>/`` (default
``outputs/comparison``): ``ar.csv`` (COLUMNS: run_a, run_b, kind, ar, ci_low, ci_high, n_images,
arch_a, arch_b; then EXTRA: both native map sizes, the pair's and the shared grid, AR and CI on
each grid, the null in each view and AR / null), ``tests.json`` (the paper's tests, the same
tests under each control, the conclusion), ``table2.csv``, ``lift_correlation.csv``,
``per_image.npz`` (row k of ar.csv: ``rows_k`` cache rows, ``ar_k``, ``ar_pair_grid_k``,
``ar_shared_grid_k`` float32 AR per image), ``meta.json`` and the
marker ``.results/comparison.json``, keyed (``key``) by the settings, each run's name, arch, seed,
Grad-CAM and objects keys, and the code. The runs must have been trained on one data snapshot:
a grid that mixes snapshots is refused (StaleError), never compared.

- AR_i(m1, m2) = mean over the S x S pixels of |mask_m1 - mask_m2|, both masks brought to the
  image size S by ``saliency.upsample`` (bilinear, renormalised): the paper's AR. A pair's AR is
  the mean over the test images both runs have (matched by cache row). Images are streamed in
  batches of ``batch_size``: every run's batch is brought to a grid once and shared by all its
  pairs, so memory is about (sources + 2) x batch_size x S^2 x 4 bytes whatever N is (sources:
  the runs and, with the randomised reference, their re-initialised copies, whose native masks
  are held in memory).
- Resolution controls (VIEWS). Native sizes differ between architectures (at 64 px resnet18
  2 x 2, vgg11 4 x 4, simple 8 x 8, simpler 16 x 16), seeds of one architecture share theirs: at
  image resolution a coarse map is a smooth upsampling and a fine one is not, so an architecture
  pair can differ by map size alone. Hence the same AR on the pair's coarser native map
  ("pair_grid": the finer mask average-pooled to it, ``pool``, renormalised as a native mask
  is) and on one grid for all runs (the coarsest native map, "shared_grid"), and each pair's
  null: its AR when b's masks are filed under other images (``relabelled``), in the same view,
  i.e. what two unrelated masks of these two sizes get; ``rel_<view>`` = AR / null.
- CI: percentile bootstrap over the pair's images (seeded per pair name).
- kind: "architecture" (archs differ), "seed" (same arch, other seed: the paper's "retrained"),
  "randomised" (a run against a copy of its model with every layer re-initialised - the end
  state of ``sanity.cascade``: each layer's own ``reset_parameters``, torch seeded with
  ``seed`` - explaining the same target classes; a scale for "unrelated masks"), "other".
- Tests of "between-architecture AR > between-seed AR" (one-sided):
  pair level: the units are Table 2's rows (an architecture pair, or an architecture's
  "retrained" row, each the mean over its run pairs); statistic = mean of the architecture
  rows - mean of the seed rows; null by relabelling the rows (which k of the n are
  "architecture"): every labelling when C(n, k) <= ``permutations``, else a seeded Monte Carlo.
  Few units (4 archs: 6 vs 4 rows, C(10, 6) = 210 labellings, so p >= 1/210), and rows sharing
  an architecture are not independent; but it speaks about architectures and retraining.
  Image level: d_i = (mean AR_i over the architecture run pairs) - (mean AR_i over the seed run
  pairs) on the images all those pairs share; statistic = mean d_i; null: d_i symmetric about 0,
  by random sign flips (exact when 2^n <= ``permutations``). Far more power, but it speaks about
  these trained models only, with images as the units.
  Both tests also run on each control of TESTED (AR on the shared grid, and AR / null at image
  resolution and on the pair's grid; not the raw AR on the pair's grid, whose size differs from
  pair to pair); ``conclusion``: the claim holds in a view when both tests give p <= ALPHA (the
  group-relabelling test only where it can reach ALPHA), and survives when it holds at image
  resolution and in every control. The null is one derangement per pair: its own sampling
  error is small next to the AR's interval at a few hundred images, and not in rel's.
"""
from __future__ import annotations

import copy
import dataclasses
import zlib
from dataclasses import dataclass
from functools import reduce
from itertools import combinations
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from citylib.core import paths
from citylib.explain import cams, saliency, sanity
from citylib.nets import checkpoint, models
from citylib.stats import resampling
from citylib.stages import gradcam
from citylib.core.artifacts import (ResultFolder, StaleError, atomic_path, code_key, read_json, write_csv,
                               write_json)
from citylib.core.config import check, config_hash, to_dict

# Bump when the numbers computed here change: it is part of the folder's hash.
NAME = "comparison"
COLUMNS = ["run_a", "run_b", "kind", "ar", "ci_low", "ci_high", "n_images", "arch_a", "arch_b"]
KINDS = ("architecture", "seed", "randomised", "other")
ORDER = models.ARCHS                                        # the paper's order (the registry's)
NAMES = {a.name: a.display for a in models.REGISTRY.values()}
RANDOMISED = " (randomised)"     # run_b of a run's randomised reference: "<run> (randomised)"
CHUNK = 256                      # bootstrap resamples / sign flips drawn at once
ALPHA = 0.05                     # the level at which the conclusion calls a test significant
# Where two masks meet: the image (the paper's AR), the pair's coarser native map, or the
# coarsest native map of all the compared runs (one grid for every pair).
VIEWS = {"image": "image resolution (the paper's)", "pair_grid": "the pair's coarser map",
         "shared_grid": "one grid for all runs (the coarsest map)"}
# The tests of "architecture AR > seed AR": the paper's, then the resolution controls, each on
# a column of ar.csv (``rel_*``: AR over the pair's own null of unrelated masks).
# Not the raw AR on each pair's coarser map: AR depends on the grid's size (unrelated masks get
# more on 2 x 2 than on 16 x 16), so pairs on different grids are not comparable; over the
# pair's own null they are.
TESTED = {"image": "ar", "shared_grid": "ar_shared_grid", "image_vs_null": "rel_image",
          "pair_grid_vs_null": "rel_pair_grid"}


def col(stat: str, view: str) -> str:
    """The ar.csv column of a statistic in a view: ``ar``/``ci_low``/``ci_high`` for the image
    (the paper's columns), ``<stat>_<view>`` for the others."""
    return stat if view == "image" else f"{stat}_{view}"


EXTRA = ["map_a", "map_b", "grid", "shared_grid",
         *(c for v in VIEWS if v != "image" for c in (col("ar", v), col("ci_low", v), col("ci_high", v))),
         *(f"null_{v}" for v in VIEWS), *(f"rel_{v}" for v in VIEWS)]


@dataclass(frozen=True)
class CompareConfig:
    """Comparison stage settings; every one is part of the result folder's hash."""

    batch_size: int = 256        # test images per streaming step
    bootstrap: int = 1000        # resamples for each pair's 95% CI
    permutations: int = 10000    # Monte Carlo relabellings / sign flips (exact below this count)
    seed: int = 0                # bootstrap, tests, re-initialisation, Fig. 6 images
    randomised: bool = True      # add each run against its re-initialised model (needs the cache)
    fig6_per_city: int = 2       # Fig. 6 test images per city

    def __post_init__(self):
        check(self, batch_size=">= 1", bootstrap=">= 1", permutations=">= 1", seed=">= 0",
              fig6_per_city=">= 0")


@dataclass(frozen=True)
class CompareResult:
    """A finished comparison folder, as ``run`` and ``load`` return it."""

    folder: Path
    ar: pd.DataFrame                 # COLUMNS, one row per pair
    tests: dict                      # {"pairs": {kind: [[a, b], ...]}, "pair_permutation": {...},
                                     #  "image_sign_flip": {...}, "controls": {...}, "conclusion": {...}}
    table2: pd.DataFrame             # the paper's Table 2 layout (``table2``)
    lift_correlation: pd.DataFrame   # run_a, run_b, spearman, n_objects
    per_image: dict                  # (run_a, run_b) -> (cache rows (n,) int64, AR (n,) float32)
    fig6_rows: list                  # cache rows of the Fig. 6 images
    reused: bool = False
    per_view: dict = dataclasses.field(default_factory=dict)   # view -> per_image of that view
    figures: dict = dataclasses.field(default_factory=dict)    # name -> PNG path (``pipeline``)


# ---------------------------------------------------------------- AR (Eq. 2), streamed


def residual(a, b, block: int = 8) -> np.ndarray:
    """Eq. 2 per image: (B, S, S) and (B, S, S) masks -> (B,) float32 mean |a - b|."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    out = torch.empty(len(a))
    # |a - b| of a few images at a time into one small buffer that stays in cache: 4x faster
    # at S = 224 than one (B, S, S) temporary, and the same numbers (reduction is per image)
    buf = torch.empty(min(block, len(a)), *a.shape[1:])                 # (block, S, S)
    for s in range(0, len(a), block):
        d = torch.sub(a[s:s + block], b[s:s + block], out=buf[:min(block, len(a) - s)])
        out[s:s + len(d)] = d.abs_().mean((1, 2))
    return out.numpy()


def pool(masks, grid: tuple[int, int]) -> np.ndarray:
    """(B, h, w) masks -> (B, gh, gw) float32: each cell of the coarser ``grid`` the mean of the
    native cells that fall into it (adaptive average pooling: exact block means when ``grid``
    divides the map), then min-max renormalised per image as a native mask is. A mask already on
    ``grid`` comes back unchanged (as float32)."""
    m = torch.as_tensor(np.asarray(masks, dtype=np.float32))
    if tuple(m.shape[1:]) != tuple(grid):
        m = torch.nn.functional.adaptive_avg_pool2d(m[:, None], tuple(grid))[:, 0]
    return saliency.normalise(m).numpy()


def coarser(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """The coarser of two map sizes, cell by cell: (min h, min w)."""
    return int(min(a[0], b[0])), int(min(a[1], b[1]))


def pairwise_ar(sources: Sequence[tuple[np.ndarray, np.ndarray]], size: int,
                batch_size: int = 256, pairs: Sequence[tuple[int, int]] | None = None,
                progress: bool = False, grids: Mapping[tuple[int, int], tuple[int, int] | None] | None = None
                ) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Per-image AR of every pair of ``sources``, streamed over the images.

    ``sources[k]`` = (cache rows (N_k,), masks (N_k, h_k, w_k) in [0, 1], any h_k, e.g. a
    memory map); ``pairs``: index pairs (default all). ``grids[pair]``: where the pair's masks
    meet, None (default) = the image, S x S, by ``saliency.upsample``; (gh, gw) = that grid, by
    ``pool``. Returns {(a, b): (common rows sorted (n,) int64, AR (n,) float32)}; a pair with
    no common image raises ValueError.
    """
    rows, order = [], []
    for k, (r, m) in enumerate(sources):
        r = np.asarray(r, dtype=np.int64)
        if len(r) != len(m) or len(np.unique(r)) != len(r):
            raise ValueError(f"source {k}: {len(r)} rows for {len(m)} masks, or repeated rows")
        order.append(np.argsort(r, kind="stable"))
        rows.append(r[order[-1]])
    pairs = list(combinations(range(len(sources)), 2)) if pairs is None else list(pairs)
    grids = {p: None if grids is None else grids.get(p) for p in pairs}
    common = {p: np.intersect1d(rows[p[0]], rows[p[1]]) for p in pairs}
    for p, c in common.items():
        if len(c) == 0:
            raise ValueError(f"sources {p[0]} and {p[1]} share no test image (cache row)")
    out = {p: np.empty(len(c), np.float32) for p, c in common.items()}
    filled = dict.fromkeys(pairs, 0)
    union = reduce(np.union1d, common.values(), np.zeros(0, np.int64))
    used = sorted({k for p in pairs for k in p})
    for start in tqdm(range(0, len(union), batch_size), desc="AR", unit="batch",
                      disable=not progress, leave=False):
        chunk = union[start:start + batch_size]                       # (B,) cache rows
        have, native, up = {}, {}, {}
        for k in used:
            pos = np.searchsorted(rows[k], chunk).clip(max=len(rows[k]) - 1)
            have[k] = rows[k][pos] == chunk                            # (B,) bool
            native[k] = _take(sources[k][1], order[k][pos[have[k]]])    # (b_k, h_k, w_k)

        def common_grid(k, g):        # each run brought to a grid once per batch, shared by its pairs
            if (k, g) not in up:
                up[k, g] = torch.from_numpy(saliency.upsample(native[k], size) if g is None
                                            else pool(native[k], g))    # (b_k, S, S) or (b_k, gh, gw)
            return up[k, g]
        for a, b in pairs:
            both = have[a] & have[b]
            if not both.any():
                continue
            ia = torch.from_numpy(np.flatnonzero(both[have[a]]))       # positions within up[a]
            ib = torch.from_numpy(np.flatnonzero(both[have[b]]))
            ua, ub = common_grid(a, grids[a, b]), common_grid(b, grids[a, b])
            ua = ua if len(ia) == len(ua) else ua[ia]                   # no copy in the usual case
            ub = ub if len(ib) == len(ub) else ub[ib]
            n = len(ia)
            out[a, b][filled[a, b]:filled[a, b] + n] = residual(ua, ub)
            filled[a, b] += n
    return {p: (common[p], out[p]) for p in pairs}


def relabelled(rows, seed) -> np.ndarray:
    """``rows`` (n,) with the labels moved along one random cycle: the mask stored for each
    image is now filed under another image (a derangement, seeded), so a pair's AR against it
    is the AR of unrelated masks of the same two map sizes - the pair's own null."""
    rows = np.asarray(rows, np.int64)
    if len(rows) < 2:
        raise ValueError("a null of unrelated masks needs at least 2 images")
    p = np.random.default_rng(seed).permutation(len(rows))
    out = rows.copy()
    out[p] = rows[np.roll(p, -1)]
    return out


def _take(masks: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """masks[idx] as float32, read in increasing order (sequential reads of a memory map)."""
    if len(idx) < 2 or np.all(np.diff(idx) > 0):
        return np.asarray(masks[idx], dtype=np.float32)
    s = np.argsort(idx)
    return np.asarray(masks[idx[s]], dtype=np.float32)[np.argsort(s)]


def average_residual(rows_a, masks_a, rows_b, masks_b, size: int,
                     batch_size: int = 256) -> tuple[float, np.ndarray, np.ndarray]:
    """AR of two runs: (mean over common images, common rows (n,), per-image AR (n,) float32)."""
    common, ar = pairwise_ar([(rows_a, masks_a), (rows_b, masks_b)], size, batch_size)[0, 1]
    return float(ar.mean(dtype=np.float64)), common, ar


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with every layer re-initialised (``sanity.cascade_steps``, all steps)."""
    rand = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):      # the caller's torch RNG stays as it was
        torch.manual_seed(seed)
        for _, modules in sanity.cascade_steps(rand):
            for m in modules:
                m.reset_parameters()
    return rand.eval()


def randomised_masks(run_dir: str | Path, cache, cfg: CompareConfig,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(cache rows (n,), masks (n, h, w) float16) of a run's re-initialised model for the images
    and target classes of its stored masks, stored as the run's own are (so only the weights
    differ): the "randomised" source a run is compared with."""
    cam = gradcam.load(run_dir)
    model, _, _ = checkpoint.load_model(run_dir)
    S = int(cam.meta["image_size"])
    if cache.images.shape[1] != S:
        raise ValueError(f"{run_dir}: masks were made at {S} px, the cache has "
                         f"{cache.images.shape[1]} px")
    rand = randomise(model, cfg.seed)
    rows = cam.index["index"].to_numpy(np.int64)
    # explain the class the trained model's mask explains, as sanity.cascade does
    target = cam.index["target"].map({c: i for i, c in enumerate(cam.meta["cities"])})
    target = target.to_numpy(np.int64, copy=True)    # writable: torch.as_tensor warns otherwise
    out = np.empty(cam.masks.shape, np.float16)
    for s in tqdm(range(0, len(rows), cfg.batch_size), desc="randomised", disable=not progress,
                  leave=False, unit="batch"):
        sl = slice(s, s + cfg.batch_size)
        out[sl] = cams.masks_for(rand, np.asarray(cache.images[rows[sl]]), cam.meta["method"],
                                    target[sl], cam.meta["config"].get("batch_size", 32)).masks
    return rows, out


def randomised_ar(run_dir: str | Path, cache, cfg: CompareConfig,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(cache rows sorted, per-image AR at image resolution) of a run's stored masks against
    its re-initialised model's."""
    cam = gradcam.load(run_dir)
    rows, masks = randomised_masks(run_dir, cache, cfg, progress)
    return pairwise_ar([(rows, cam.masks), (rows, masks)], int(cam.meta["image_size"]),
                       cfg.batch_size)[0, 1]


def pair_seed(cfg: CompareConfig, a: str, b: str) -> list[int]:
    """A pair's random stream (bootstrap, null): by its two names, whatever order they come in."""
    return [cfg.seed, zlib.crc32("|".join(sorted((a, b))).encode())]


def views_ar(sources: Mapping[str, tuple[np.ndarray, np.ndarray]], pairs: Sequence[tuple[str, str]],
             size: int, cfg: CompareConfig, progress: bool = False) -> tuple[dict, dict, dict]:
    """Every pair's AR in each of VIEWS, and its null: (per_view {view: {pair: (rows, AR)}},
    nulls {view: {pair: mean AR of unrelated masks}}, grids {view: {pair: grid or None}}).

    The null of a pair (a, b) is a's masks against b's masks filed under other images
    (``relabelled``, seeded by ``cfg.seed`` and the pair), in the same view: the AR two
    unrelated masks of these two map sizes get."""
    names = list(sources)
    native = {n: tuple(int(v) for v in sources[n][1].shape[1:]) for n in names}
    shared = (min(h for h, _ in native.values()), min(w for _, w in native.values()))
    idx = [(names.index(a), names.index(b)) for a, b in pairs]
    per_view, nulls, grids = {}, {}, {}
    for view in VIEWS:
        g = {p: None if view == "image" else shared if view == "shared_grid"
             else coarser(native[p[0]], native[p[1]]) for p in pairs}
        got = pairwise_ar([sources[n] for n in names], size, cfg.batch_size, idx, progress,
                          {i: g[p] for i, p in zip(idx, pairs)})
        per_view[view], grids[view], nulls[view] = {p: got[i] for i, p in zip(idx, pairs)}, g, {}
        for a, b in pairs:            # one pair at a time: memory stays that of two runs
            other = (relabelled(sources[b][0], pair_seed(cfg, a, b)), sources[b][1])
            _, ar = pairwise_ar([sources[a], other], size, cfg.batch_size, grids={(0, 1): g[a, b]})[0, 1]
            nulls[view][a, b] = float(ar.mean(dtype=np.float64))
    return per_view, nulls, grids


# ---------------------------------------------------------------- uncertainty and tests


def tests(frame: pd.DataFrame, per_image: Mapping, cfg: CompareConfig, column: str = "ar") -> dict:
    """Both tests of "architecture AR > seed AR" on an ar frame's ``column`` and the matching
    per-image values {pair: (rows, values)}."""
    arch = frame[frame["kind"] == "architecture"]
    seed = frame[frame["kind"] == "seed"]
    used = {"architecture": arch[["run_a", "run_b"]].values.tolist(),
            "seed": seed[["run_a", "run_b"]].values.tolist()}
    groups = [(k, label, g) for k, label, g in _groups(frame) if k in ("architecture", "seed")]
    units = {k: {label: g[["run_a", "run_b"]].values.tolist() for kk, label, g in groups if kk == k}
             for k in ("architecture", "seed")}
    pair = resampling.relabelling_test([g[column].mean() for k, _, g in groups if k == "architecture"],
                                  [g[column].mean() for k, _, g in groups if k == "seed"],
                                  cfg.permutations, cfg.seed)
    pair["units"] = units
    keys = [tuple(p) for p in used["architecture"] + used["seed"]]
    if arch.empty or seed.empty:
        image = {"statistic": None, "p_value": None, "method": "needs both kinds of pairs"}
    else:
        common = reduce(np.intersect1d, [per_image[k][0] for k in keys])
        vals = np.stack([per_image[k][1][np.searchsorted(per_image[k][0], common)]
                         for k in keys]).astype(np.float64)             # (pairs, n)
        d = vals[:len(arch)].mean(0) - vals[len(arch):].mean(0)         # (n,)
        image = resampling.sign_flip_test(d, cfg.permutations, cfg.seed)
    return {"pairs": used, "pair_permutation": pair, "image_sign_flip": image}


def all_tests(frame: pd.DataFrame, per_view: Mapping, nulls: Mapping, cfg: CompareConfig) -> dict:
    """The paper's tests at image resolution (top level, as ``tests``), the same tests under
    each resolution control of TESTED (``controls``), and the ``conclusion``."""
    rel = relative(per_view, nulls)
    values = {**per_view, **{f"{v}_vs_null": rel[v] for v in ("image", "pair_grid")}}
    out = tests(frame, per_view["image"], cfg)
    out["controls"] = {}
    for name, column in TESTED.items():
        if name != "image":
            t = tests(frame, values[name], cfg, column)
            out["controls"][name] = {"column": column, "pair_permutation": t["pair_permutation"],
                                     "image_sign_flip": t["image_sign_flip"]}
    out["conclusion"] = conclusion(out)
    return out


def conclusion(result_tests: dict, alpha: float = ALPHA) -> dict:
    """Does "architecture AR > seed AR" hold at image resolution, and does it survive every
    resolution control? It holds in a test set when both tests give p <= ``alpha``; the
    group-relabelling test counts only where it can (few runs: its smallest possible p, 1 / the
    number of labellings, can exceed ``alpha``), and the text says so. Returns {"alpha",
    "holds": {test set: bool or None}, "survives": bool or None, "text"}."""
    sets = {"image": result_tests, **result_tests.get("controls", {})}
    holds, ps = {}, {}
    pair = result_tests["pair_permutation"]
    coarse = pair.get("min_p") is not None and pair["min_p"] > alpha
    for name, t in sets.items():
        ps[name] = [t[k]["p_value"] for k in ("pair_permutation", "image_sign_flip")]
        used = ps[name][1:] if coarse else ps[name]
        holds[name] = None if None in used else bool(max(used) <= alpha)
    if holds["image"] is None:
        return {"alpha": alpha, "holds": holds, "survives": None,
                "text": "Not tested: it needs runs of two architectures, one of them with two seeds."}
    controls = [n for n in holds if n != "image"]
    failed = [n for n in controls if not holds[n]]
    each = "; ".join(f"{TESTED_LABELS.get(n, n)}: {'yes' if holds[n] else 'no'} (p = {ps[n][0]:.3g}, "
                     f"{ps[n][1]:.3g})" for n in holds)
    which = ("the images' sign flips (the group-relabelling test cannot reach it with these runs: its "
             f"smallest possible p is {pair['min_p']:.3g})" if coarse else
             "both tests, groups relabelled and images' sign flips")
    text = f"Architecture pairs differ more than seed pairs at the {alpha:g} level ({which})? {each}. "
    survives = bool(holds["image"] and controls and not failed)
    if not controls:
        text += "No resolution control was computed."
    elif survives:
        text += "The difference survives every resolution control: map size does not explain it."
    elif holds["image"]:
        text += ("It does not survive every resolution control: part of the image-resolution difference "
                 "can be built in by the maps' different sizes.")
    else:
        held = [TESTED_LABELS.get(n, n) for n in controls if holds[n]]
        text += ("The paper's test at image resolution does not establish it here"
                 + (f"; judged on {', '.join(held)} it holds." if held else ", nor does any control."))
    return {"alpha": alpha, "holds": holds, "survives": survives if controls else None, "text": text}


def tests_table(result_tests: dict) -> pd.DataFrame:
    """``tests.json`` as a table: one row per comparison and test (statistic, p-value, n,
    method); the paper's image-resolution tests first, then the controls."""
    names = {"pair_permutation": "architecture groups relabelled",
             "image_sign_flip": "per-image sign flips"}
    sets = {"image": result_tests, **result_tests.get("controls", {})}
    return pd.DataFrame([{"compared on": TESTED_LABELS.get(s, s), "test": label,
                          "statistic": t[k].get("statistic"), "p_value": t[k].get("p_value"),
                          "n": t[k].get("n"), "method": t[k].get("method")}
                         for s, t in sets.items() for k, label in names.items()])


TESTED_LABELS = {"image": "AR at image resolution (paper)", "shared_grid": "AR on one grid for all runs",
                 "image_vs_null": "AR / null at image resolution",
                 "pair_grid_vs_null": "AR / null on the pair's coarser map"}


# ---------------------------------------------------------------- tables


def describe(run_dir: str | Path) -> dict:
    """{"name", "arch", "seed"} of a run folder, from config.json (else metrics.json)."""
    run_dir = Path(run_dir)
    for f in ("config.json", "metrics.json"):
        c = read_json(run_dir / f).get("config", {}) if (run_dir / f).is_file() else {}
        if "arch" in c and "seed" in c:
            return {"name": str(c.get("name", run_dir.name)), "arch": c["arch"], "seed": int(c["seed"])}
    raise FileNotFoundError(f"{run_dir}: no config.json or metrics.json naming arch and seed")


def kind_of(a: dict, b: dict) -> str:
    return "architecture" if a["arch"] != b["arch"] else "seed" if a["seed"] != b["seed"] else "other"


def ar_frame(per_image: Mapping, infos: Mapping[str, dict], cfg: CompareConfig,
             nulls: Mapping | None = None, grids: Mapping | None = None,
             native: Mapping[str, tuple] | None = None) -> pd.DataFrame:
    """One row per pair: mean AR and bootstrap CI (seeded by cfg.seed and the pair) in COLUMNS;
    given ``views_ar``'s per-view values as ``per_image`` (with ``nulls``, ``grids`` and each
    source's ``native`` map size), also EXTRA: each view's AR and CI, the pair's null in each
    view and AR / null (``rel_*``; its CI is the AR's over the same null)."""
    per_view = per_image if "image" in per_image else {"image": per_image}
    out = []
    for (a, b), (rows, ar) in per_view["image"].items():
        ia = infos[a]
        ib = infos.get(b) or {**ia, "randomised": True}
        kind = "randomised" if ib.get("randomised") else kind_of(ia, ib)
        seed = pair_seed(cfg, a, b)
        lo, hi = _interval(ar, cfg, seed)
        row = dict(zip(COLUMNS, [a, b, kind, float(ar.mean(dtype=np.float64)), lo, hi, len(ar),
                                 ia["arch"], ib["arch"]]))
        if len(per_view) > 1:
            fmt = lambda g: "x".join(map(str, g))  # noqa: E731
            row.update(map_a=fmt(native[a]), map_b=fmt(native[b]), grid=fmt(grids["pair_grid"][a, b]),
                       shared_grid=fmt(grids["shared_grid"][a, b]))
            for view, values in per_view.items():
                v = values[a, b][1]
                if view != "image":
                    row[col("ar", view)] = float(v.mean(dtype=np.float64))
                    row[col("ci_low", view)], row[col("ci_high", view)] = _interval(v, cfg, seed)
                null = nulls[view][a, b]
                row[f"null_{view}"] = null
                row[f"rel_{view}"] = row[col("ar", view)] / null if null > 0 else float("nan")
        out.append(row)
    return pd.DataFrame(out, columns=COLUMNS + (EXTRA if len(per_view) > 1 else []))


def _interval(values: np.ndarray, cfg: CompareConfig, seed) -> tuple[float, float]:
    """A pair's 95% percentile bootstrap interval of the mean AR over its images."""
    return resampling.bootstrap_interval(values, None, cfg.bootstrap, 0.95, seed, chunk=resampling.CHUNK)[1:]


def relative(per_view: Mapping, nulls: Mapping) -> dict:
    """Per-image AR over the pair's null, per view: {"<view>": {pair: (rows, AR_i / null)}}."""
    return {view: {p: (rows, (ar / np.float32(nulls[view][p]) if nulls[view][p] > 0
                              else np.full_like(ar, np.nan)).astype(np.float32))
                   for p, (rows, ar) in values.items()} for view, values in per_view.items()}


def _rank(arch: str) -> tuple:
    return (ORDER.index(arch) if arch in ORDER else len(ORDER), arch)


def _groups(frame: pd.DataFrame):
    """(kind, Table 2 label, the run pairs' rows) per Table 2 row, in the paper's order."""
    groups: dict[tuple, list[int]] = {}
    for i, (kind, a, b) in enumerate(zip(frame["kind"], frame["arch_a"], frame["arch_b"])):
        groups.setdefault((KINDS.index(kind), *sorted((a, b), key=_rank)), []).append(i)
    suffix = {"architecture": "", "seed": " retrained", "randomised": " randomised",
              "other": " (same seed)"}
    for key in sorted(groups, key=lambda k: (k[0], _rank(k[1]), _rank(k[2]))):
        kind = KINDS[key[0]]
        yield (kind, f"{NAMES.get(key[1], key[1])}-{NAMES.get(key[2], key[2])}{suffix[kind]}",
               frame.iloc[groups[key]])


def table2(frame: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 2: one row per architecture pair and kind ("VGG11-ResNet18",
    "VGG11-VGG11 retrained", "VGG11-VGG11 randomised"). With several seeds a row pools its run
    pairs: ar = their mean, ar_min / ar_max their spread, ci_low / ci_high the envelope of
    their CIs (the lowest low, the highest high), n_pairs how many. With the views' columns
    (EXTRA) also the maps and, per view, the pooled AR, CI envelope, null and AR / null."""
    views = "grid" in frame
    rows = []
    for kind, label, g in _groups(frame):
        row = {"models": label, "kind": kind, "ar": g["ar"].mean(), "ci_low": g["ci_low"].min(),
               "ci_high": g["ci_high"].max(), "ar_min": g["ar"].min(), "ar_max": g["ar"].max(),
               "n_pairs": len(g)}
        if views:
            row.update(maps=" / ".join(sorted({*g["map_a"], *g["map_b"]}, key=lambda m: -int(m.split("x")[0]))),
                       grid=g["grid"].iloc[0], shared_grid=g["shared_grid"].iloc[0])
            for view in VIEWS:
                if view != "image":
                    row[col("ar", view)] = g[col("ar", view)].mean()
                    row[col("ci_low", view)] = g[col("ci_low", view)].min()
                    row[col("ci_high", view)] = g[col("ci_high", view)].max()
                row[f"null_{view}"] = g[f"null_{view}"].mean()
                row[f"rel_{view}"] = g[f"rel_{view}"].mean()
        rows.append(row)
    base = ["models", "kind", "ar", "ci_low", "ci_high", "ar_min", "ar_max", "n_pairs"]
    return pd.DataFrame(rows, columns=base + ([c for c in rows[0] if c not in base] if views and rows else []))


def table2_display(table: pd.DataFrame) -> pd.DataFrame:
    """Table 2 for a reader: per view "AR [CI]" and AR / null, three decimals."""
    out = table[["models", "kind"]].copy()
    if "maps" in table:
        out["maps"] = table["maps"]
    for view, label in (("image", "image"), ("pair_grid", "pair's coarser map"),
                        ("shared_grid", "one grid")):
        if col("ar", view) not in table:
            continue
        out[f"AR, {label}"] = [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in
                               zip(table[col("ar", view)], table[col("ci_low", view)], table[col("ci_high", view)])]
        if f"null_{view}" in table:
            out[f"AR / null, {label}"] = [f"{r:.2f}" for r in table[f"rel_{view}"]]
        if view == "pair_grid":
            out["pair grid"] = table["grid"]
        if view == "shared_grid":
            out["shared grid"] = table["shared_grid"]
    return out


def lift_scores(run_dirs: Sequence[str | Path]) -> dict[str, pd.DataFrame]:
    """{run name: its r_scores.csv} for the runs that have one."""
    return {describe(d)["name"]: pd.read_csv(Path(d) / "r_scores.csv", keep_default_na=False,
                                             na_values=["", "nan", "NaN"])
            for d in run_dirs if (Path(d) / "r_scores.csv").is_file()}


def lift_correlation(scores: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Spearman rank correlation of lift between every pair of runs, over the (city, object)
    rows both have with a finite lift (lift is relative to each city's coverage, so rows of
    different cities are comparable); NaN with fewer than 3 such rows."""
    from scipy.stats import spearmanr   # here: scipy.stats takes a second to import

    out = []
    for a, b in combinations(scores, 2):
        m = scores[a].merge(scores[b], on=["city", "object"], suffixes=("_a", "_b"))
        m = m[np.isfinite(m["lift_a"]) & np.isfinite(m["lift_b"])]
        rho = spearmanr(m["lift_a"], m["lift_b"])[0] if len(m) >= 3 else np.nan
        out.append([a, b, float(rho), len(m)])
    return pd.DataFrame(out, columns=["run_a", "run_b", "spearman", "n_objects"])


def fig6_rows(indexes: Sequence[pd.DataFrame], per_city: int, seed: int = 0) -> list[int]:
    """``per_city`` test images per city (seeded) that every run has: cache rows, by city."""
    common = reduce(np.intersect1d, [ix["index"].to_numpy(np.int64) for ix in indexes])
    city = indexes[0].set_index("index").loc[common, "city"].to_numpy()
    rng, out = np.random.default_rng(seed), []
    for c in sorted(set(city)):
        cand = common[city == c]
        out += sorted(rng.choice(cand, min(per_city, len(cand)), replace=False).tolist())
    return [int(r) for r in out]


# ---------------------------------------------------------------- the stage


def run(cfg: CompareConfig, out: str | Path | None, run_dirs: Sequence[str | Path], cache=None, *,
        progress: bool = True) -> CompareResult:
    """AR of every pair of runs, tests, Table 2 and lift correlations, written into ``out``
    (default ``outputs/comparison``); reused if unchanged."""
    run_dirs = [Path(d) for d in run_dirs]
    infos = {i["name"]: i for i in map(describe, run_dirs)}
    if len(infos) != len(run_dirs):
        raise ValueError("two run folders have the same run name")
    if len(run_dirs) < (1 if cfg.randomised else 2):
        raise ValueError(f"{len(run_dirs)} run(s): nothing to compare")
    results = [gradcam.load(d) for d in run_dirs]
    sizes = {int(c.meta["image_size"]) for c in results}
    if len(sizes) != 1:
        raise ValueError(f"the runs' masks were made at different image sizes {sorted(sizes)}")
    if cfg.randomised and cache is None:
        raise ValueError("randomised=True needs the data cache (the test images)")
    S, names = sizes.pop(), list(infos)
    check_one_snapshot(infos, results, cache)
    out = Path(out) if out is not None else paths.outputs() / "comparison"
    entries = [entry(i, c.meta["key"], objects_key(d)) for i, c, d in zip(infos.values(), results, run_dirs)]
    folder = ResultFolder(out, NAME, key(cfg, entries, cache.key if cfg.randomised else ""))
    if folder.done() is not None:
        return dataclasses.replace(load(out), reused=True)

    folder.begin()
    sources = {n: (c.index["index"].to_numpy(np.int64), c.masks) for n, c in zip(names, results)}
    pairs = list(combinations(names, 2))
    if cfg.randomised:
        for n, d in zip(names, run_dirs):
            sources[n + RANDOMISED] = randomised_masks(d, cache, cfg, progress)
            pairs.append((n, n + RANDOMISED))
    per_view, nulls, grids = views_ar(sources, pairs, S, cfg, progress)
    native = {n: tuple(int(v) for v in m.shape[1:]) for n, (_, m) in sources.items()}
    frame = ar_frame(per_view, infos, cfg, nulls, grids, native)
    result = CompareResult(out, frame, all_tests(frame, per_view, nulls, cfg), table2(frame),
                           lift_correlation(lift_scores(run_dirs)), per_view["image"],
                           fig6_rows([c.index for c in results], cfg.fig6_per_city, cfg.seed),
                           per_view=per_view)
    write_csv(out / "ar.csv", result.ar)
    write_json(out / "tests.json", result.tests)
    write_csv(out / "table2.csv", result.table2)
    write_csv(out / "lift_correlation.csv", result.lift_correlation)
    with atomic_path(out / "per_image.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{f"{w}_{k}": v for k, p in enumerate(pairs) for w, v in
                        [("rows", per_view["image"][p][0])] + [(col("ar", view), per_view[view][p][1])
                                                               for view in VIEWS]})
    write_json(out / "meta.json", {"runs": list(infos.values()), "image_size": S,
                                   "fig6_rows": result.fig6_rows, "config": to_dict(cfg),
                                   "key": folder.key})
    folder.commit(["ar.csv", "tests.json", "table2.csv", "lift_correlation.csv", "per_image.npz",
                   "meta.json"])
    return result


def key(cfg: CompareConfig, entries: list, cache_key: str = "") -> str:
    """What a comparison depends on: the settings, each run's ``entry``, the cache (only for the
    randomised reference) and the code."""
    return config_hash(NAME, code_key(__name__), cfg, entries, cache_key)


def entry(info: dict, gradcam_key: str, objects_key: str | None) -> list:
    """A run as a comparison's key sees it: name, arch, seed, its masks' and its scores' keys."""
    return [info["name"], info["arch"], int(info["seed"]), gradcam_key, objects_key]


def objects_key(run_dir: str | Path) -> str | None:
    """The key of a run's finished objects stage (its lift scores), or None."""
    marker = ResultFolder(run_dir, "objects").finished()
    return None if marker is None else marker["key"]


def check_one_snapshot(infos: Mapping[str, dict], results: Sequence, cache=None) -> None:
    """StaleError unless every run's model was trained on the same data snapshot (and, when
    given, the cache is that snapshot's)."""
    keys = {n: c.meta.get("data_key") for n, c in zip(infos, results)}
    if cache is not None:
        keys["the data stage's current snapshot"] = str(cache.key)
    if len(set(keys.values())) > 1:
        listed = ", ".join(f"{n}: {k}" for n, k in keys.items())
        raise StaleError(f"the runs were trained on different data snapshots ({listed}); retrain "
                         "them on one (`citylib run`) before comparing them")


def load(out_dir: str | Path) -> CompareResult:
    """A finished comparison folder."""
    out = Path(out_dir)
    if not (out / "meta.json").is_file():
        raise FileNotFoundError(f"{out}: no finished comparison (run compare.run first)")
    frame = pd.read_csv(out / "ar.csv", dtype={"run_a": str, "run_b": str})
    pairs = list(zip(frame["run_a"], frame["run_b"]))
    with np.load(out / "per_image.npz") as z:
        per_view = {view: {p: (z[f"rows_{k}"], z[f"{col('ar', view)}_{k}"]) for k, p in enumerate(pairs)}
                    for view in VIEWS if f"{col('ar', view)}_0" in z}
    return CompareResult(out, frame, read_json(out / "tests.json"),
                         pd.read_csv(out / "table2.csv"),
                         pd.read_csv(out / "lift_correlation.csv", dtype={"run_a": str, "run_b": str}),
                         per_view["image"], read_json(out / "meta.json")["fig6_rows"], per_view=per_view)
