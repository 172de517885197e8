"""The average residual AR of Shi et al., Eq. 2, per image and pair of runs, streamed; in each
resolution view, with each pair's null of unrelated masks.

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
- The "randomised" reference: a run's model with every layer re-initialised (``randomise``:
  the end state of ``sanity.cascade``) explaining the same target classes.

Reads the masks and the cache it is given; writes nothing.
"""
from __future__ import annotations

import copy
import zlib
from functools import reduce
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from citylib.explain import cams, saliency, sanity
from citylib.nets import checkpoint
from citylib.stages import gradcam

if TYPE_CHECKING:   # annotations only
    from citylib.stages.compare import CompareConfig


# Where two masks meet: the image (the paper's AR), the pair's coarser native map, or the
# coarsest native map of all the compared runs (one grid for every pair).
VIEWS = {"image": "image resolution (the paper's)", "pair_grid": "the pair's coarser map",
         "shared_grid": "one grid for all runs (the coarsest map)"}


def col(stat: str, view: str) -> str:
    """The ar.csv column of a statistic in a view: ``ar``/``ci_low``/``ci_high`` for the image
    (the paper's columns), ``<stat>_<view>`` for the others."""
    return stat if view == "image" else f"{stat}_{view}"


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
