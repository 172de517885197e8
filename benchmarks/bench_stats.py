"""Benchmark: R^c_p from histograms counted once against direct recomputation per threshold.

Reads and writes nothing. Makes ``--images`` label maps (``--size`` px, ~15 smooth regions of
random ADE20K classes each) and smooth Grad-CAM-like masks (a 7 x 7 random map, bilinearly
upsampled and scaled to [0, 1]) over three cities; the masks come in batches of ``--batch``
views of a pool of ``--pool`` masks, so the (N, S, S) float32 stack is never held at once. Prints
a table of: building ``histograms.Histograms`` (every mask value counted once); a threshold change
(R, coverage, lift; with and without the bootstrap CIs); the naive baseline (one pass over all
masks and label maps per threshold), and the ratios.

    python benchmarks/bench_stats.py [--images 10000] [--size 224] [--batch 512] [--bins 100]
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F

from citylib.stats import histograms

CITIES = np.array(["signtown", "towerville", "treeville"])
CLASSES = np.array([2, 3, 5, 7, 10, 12, 13, 14, 18, 21, 33, 44, 49, 87, 88, 94, 137])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=512, help="masks per batch handed to the build")
    p.add_argument("--pool", type=int, default=512, help="distinct masks and label layouts")
    p.add_argument("--bins", type=int, default=100)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--thresholds", type=int, default=10, help="threshold changes timed")
    return p


def smooth(n: int, size: int, grid: int, seed: int) -> np.ndarray:
    """(n, size, size) float32 in [0, 1]: random grid x grid maps, bilinearly upsampled."""
    g = torch.from_numpy(np.random.default_rng(seed).random((n, 1, grid, grid), dtype=np.float32))
    up = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    return ((up - lo) / (hi - lo)).numpy()


def make_labels(n: int, size: int, pool: int) -> np.ndarray:
    """(n, size, size) uint8: ~15 smooth regions per image (the argmax of 15 smooth random
    fields, at a quarter of the resolution), classes drawn per image."""
    rng = np.random.default_rng(1)
    f = 4 if size % 4 == 0 else 1
    low = np.argmax(np.stack([smooth(pool, size // f, 5, 10 + k) for k in range(15)]), axis=0)
    layout = low.repeat(f, axis=1).repeat(f, axis=2).astype(np.uint8)  # (pool, S, S) region ids
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        out[i] = rng.choice(CLASSES, 15, replace=False).astype(np.uint8)[layout[i % pool]]
    return out


def mask_batches(pool: np.ndarray, n: int, batch: int):
    """Batches of masks for rows 0..n-1: views of the pool (shifted per batch), never a copy
    of all N masks."""
    for start in range(0, n, batch):
        k = min(batch, n - start)
        first = (start // batch * 37) % (len(pool) - k + 1)
        yield pool[first:first + k]


def naive(pool, labels, cities, n, batch, threshold):
    """R and coverage at one threshold straight from the arrays (what a slider would redo)."""
    codes_n = np.zeros(len(CITIES) * 151, np.int64)
    codes_m = np.zeros(len(CITIES) * 151, np.int64)
    cover = np.zeros(len(CITIES))
    for start, m in zip(range(0, n, batch), mask_batches(pool, n, batch)):
        lab = labels[start:start + len(m)]
        code = lab.astype(np.int64) + (cities[start:start + len(m)] * 151)[:, None, None]
        explained = m >= threshold
        codes_n += np.bincount(code.ravel(), minlength=codes_n.size)
        codes_m += np.bincount(code[explained], minlength=codes_m.size)
        cover += np.bincount(cities[start:start + len(m)], explained.mean(axis=(1, 2)), minlength=len(CITIES))
    with np.errstate(invalid="ignore"):
        return codes_m / codes_n, cover / np.bincount(cities, minlength=len(CITIES))


def main(args) -> None:
    n, s = args.images, args.size
    load = os.getloadavg()
    t0 = time.perf_counter()
    pool = smooth(args.pool, s, 7, 0)
    labels = make_labels(n, s, args.pool)
    city_idx = np.arange(n) % len(CITIES)
    cities = CITIES[city_idx]
    setup = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = histograms.StatsConfig(bins=args.bins, bootstrap=args.bootstrap)

    t0 = time.perf_counter()
    hist = histograms.Histograms.build(mask_batches(pool, n, args.batch), labels, cities, cfg, progress=False)
    build = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rng = np.random.default_rng(0)
    ts = rng.integers(1, args.bins, args.thresholds) / args.bins
    hist.table(0.5, ci=False)  # warm
    t0 = time.perf_counter()
    for t in ts:
        hist.table(t, ci=False)
    change = (time.perf_counter() - t0) / len(ts)
    t0 = time.perf_counter()
    hist.table(0.5)  # the first table with CIs draws the resample weights
    first_ci = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in ts:
        hist.table(t)
    change_ci = (time.perf_counter() - t0) / len(ts)

    t0 = time.perf_counter()
    r_naive, cov_naive = naive(pool, labels, city_idx, n, args.batch, 0.5)
    direct = time.perf_counter() - t0
    table = hist.table(0.5, ci=False)
    for row in table.itertuples():  # the two must agree
        c = list(CITIES).index(row.city)
        p = {v: k for k, v in hist.names.items()}[row.object]
        assert abs(r_naive[c * 151 + p] - row.R) < 1e-12 and abs(cov_naive[c] - row.coverage) < 1e-12

    print(f"R^c_p for {n} images of {s} px, {len(CITIES)} cities, {hist.above.shape[0]} (image, object) "
          f"pairs, bins={args.bins}, batches of {args.batch}")
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs; "
          f"setup (not timed) {setup:.1f} s")
    rows = [
        ("build histograms (once)", build, "target <= 10 s"),
        ("threshold change: R, coverage, lift", change, "target <= 50 ms"),
        (f"threshold change with {args.bootstrap}-resample CIs", change_ci, ""),
        ("first table with CIs (draws weights)", first_ci, ""),
        ("naive: one threshold from the arrays", direct, ""),
    ]
    print(f"{'step':44s} {'seconds':>10s}  note")
    for name, sec, note in rows:
        print(f"{name:44s} {sec:10.4f}  {note}")
    print(f"naive / threshold change:            {direct / change:10.0f}x")
    print(f"naive / threshold change with CIs:   {direct / change_ci:10.0f}x")
    print(f"build / naive (thresholds to break even): {build / direct:.1f}")
    print(f"peak RSS: {rss0:.0f} MB after setup (label maps {labels.nbytes / 2**20:.0f} MB, mask pool "
          f"{pool.nbytes / 2**20:.0f} MB), {rss1:.0f} MB after the build; histograms "
          f"{hist.above.nbytes / 2**20:.0f} MB")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
