"""Benchmark: the embedding stage's 2-D maps and its gallery, on CPU.

Reads nothing; writes one gallery PNG to a temporary folder (deleted). Prints a table of
seconds per map (median of ``--repeats``, the methods interleaved in each round so that a
change in machine load hits all alike), the ratio to the method ``citylib.embed`` uses, the
map's 10-NN city agreement (a map made fast but worse would show here) and whether the
repeats gave bit-identical coordinates; then the time of a ``--tiles``-tile gallery.

Data: ``--n`` smooth random ``--size`` x ``--size`` masks drawn around 12 prototypes, 3 cities
owning 4 prototypes each, 20 % of points given a random city; PCA to 50 dimensions first
(timed apart). Methods, all with random_state = 0 and the same 750 iterations for t-SNE:

- opentsne: openTSNE.TSNE(n_jobs=2): Annoy neighbours from 1,000 points, FFT gradients
  from 10,000 (Barnes-Hut below); opentsne-1: the same single-threaded.
- sklearn: sklearn.manifold.TSNE(max_iter=750): exact neighbours, Barnes-Hut (OpenMP, 2
  threads); sklearn-1: the same limited to one thread (threadpoolctl).
- umap: umap.UMAP(n_jobs=1) (umap-learn runs single-threaded when seeded); the first call
  in a process also compiles numba code, which a warm-up on 4,500 points excludes (its time
  is printed).
- citylib: ``embed.project`` with the stage's defaults (the chosen method, for the record).

    python benchmarks/bench_embed.py [--n 10000] [--repeats 2] [--tiles 500]

Measured (2 cores, another job busy: load average ~3.4; openTSNE 1.0.4, scikit-learn 1.9.1,
umap-learn 0.5.12): the map table is in ``citylib/embed.py``'s docstring (citylib 24 s, target
30 s). Gallery, 500 tiles of 64 px from 224 px images on a 31 x 33 grid (2112 x 1984 px,
1.5 MB): tiles 1.0 s, placement 0.01 s, canvas 0.01 s, PNG 0.2 s; 1.2 s in all (target 10 s).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from citylib.figures import gallery
from citylib.stages import embed


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000, help="masks (points)")
    p.add_argument("--size", type=int, default=14, help="mask side (vgg11 at 224 px: 14)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (median kept)")
    p.add_argument("--methods", nargs="+", default=["citylib", "opentsne", "opentsne-1",
                                                      "sklearn", "sklearn-1", "umap"])
    p.add_argument("--tiles", type=int, default=500, help="gallery tiles (0: skip)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--tile-px", type=int, default=64)
    return p


def synthetic(n: int, size: int = 14, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) float32 masks in [0, 1] with cluster structure, (n,) city labels."""
    rng = np.random.default_rng(seed)
    protos = gaussian_filter(rng.random((12, size, size)), (0, size / 7, size / 7))
    proto = rng.integers(0, 12, n)
    city = np.where(rng.random(n) < 0.2, rng.integers(0, 3, n), proto // 4)
    noise = gaussian_filter(rng.random((n, size, size)), (0, size / 14, size / 14))
    m = protos[proto] + 0.15 * noise
    m -= m.min((1, 2), keepdims=True)
    return (m / m.max((1, 2), keepdims=True)).astype(np.float32), city


def methods() -> dict:
    """name -> callable (n, 50) -> (n, 2)."""
    import openTSNE
    import umap
    from sklearn.manifold import TSNE

    from threadpoolctl import threadpool_limits

    def ot(jobs):
        return lambda z: np.asarray(openTSNE.TSNE(n_jobs=jobs, random_state=0).fit(z))

    def sk(threads):
        def fit(z):
            with threadpool_limits(threads):
                return TSNE(max_iter=750, random_state=0).fit_transform(z)
        return fit

    return {"citylib": lambda z: embed.project(z, embed.EmbedConfig()),
            "opentsne": ot(2), "opentsne-1": ot(1), "sklearn": sk(2), "sklearn-1": sk(1),
            "umap": lambda z: umap.UMAP(random_state=0, n_jobs=1).fit_transform(z)}


def bench_maps(args, z: np.ndarray, city: np.ndarray) -> None:
    run = {m: methods()[m] for m in args.methods}
    if "umap" in run:
        # numba compiles on a process's first call (~25 s, more than the map itself at 10,000
        # points); 4,500 points reach the approximate-neighbour code too. Timed apart.
        t = time.perf_counter()
        run["umap"](np.ascontiguousarray(z[:4500], np.float64))
        print(f"  umap warm-up on {min(len(z), 4500)} points: {time.perf_counter() - t:.1f} s")
    times, maps, same = {m: [] for m in run}, {}, {m: True for m in run}
    for _ in range(args.repeats):
        for name, fn in run.items():
            t = time.perf_counter()
            xy = fn(np.ascontiguousarray(z, np.float64))
            times[name].append(time.perf_counter() - t)
            same[name] &= name not in maps or np.array_equal(maps[name], xy)
            maps[name] = xy
            print(f"  {name:<11} {times[name][-1]:6.1f} s   load {os.getloadavg()[0]:.2f}",
                  flush=True)
    chosen = statistics.median(times["citylib"]) if "citylib" in times else None
    print(f"\n{'method':<12}{'seconds':>9}{'x citylib':>11}{'10-NN agree':>13}{'repeatable':>12}")
    for name in run:
        sec = statistics.median(times[name])
        agree = embed.knn_agreement(maps[name], city, 10, 0)["observed"]
        ratio = f"{sec / chosen:.2f}" if chosen else "-"
        rep = "-" if args.repeats < 2 else ("yes" if same[name] else "NO")
        print(f"{name:<12}{sec:9.1f}{ratio:>11}{agree:13.3f}{rep:>12}")
    print(f"{'(50-D PCA)':<12}{'':>9}{'':>11}"
          f"{embed.knn_agreement(z, city, 10, 0)['observed']:13.3f}")


def bench_gallery(args, masks: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    n, S = args.tiles, args.image_size
    # smooth random images: PNG compresses them as it would photos, unlike white noise
    images = (gaussian_filter(rng.random((n, S // 8, S // 8, 3)), (0, 1, 1, 0)) * 255
              ).astype(np.uint8).repeat(8, 1).repeat(8, 2)                  # (n, S, S, 3)
    xy = rng.normal(size=(n, 2))
    frames = np.full((n, 3), 80, np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tiles = gallery.explanation_tiles(images, masks[:n], 0.5, args.tile_px - 2)
        t1 = time.perf_counter()
        grid = gallery.grid_shape(xy, n, 2.0)
        cells = gallery.place_tiles(xy, grid)
        t2 = time.perf_counter()
        art = gallery.canvas(tiles, cells, grid, frames)
        t3 = time.perf_counter()
        path = gallery.save_png(art, Path(tmp) / "gallery.png")
        t4 = time.perf_counter()
        mb = path.stat().st_size / 1e6
    print(f"\ngallery: {n} tiles of {args.tile_px} px from {S} px images, grid {grid}, "
          f"canvas {art.shape[1]} x {art.shape[0]} px ({mb:.1f} MB PNG)")
    for name, sec in (("tiles", t1 - t0), ("placement", t2 - t1), ("canvas", t3 - t2),
                      ("png", t4 - t3), ("total", t4 - t0)):
        print(f"  {name:<10}{sec:7.2f} s")


def main(args) -> None:
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
          f"({os.cpu_count()} cores)")
    masks, city = synthetic(args.n, args.size)
    t = time.perf_counter()
    z, var = embed.pca(embed.descriptors(masks), 50, 0)
    print(f"PCA {masks.shape[1] ** 2} -> {z.shape[1]} dims of {args.n} masks: "
          f"{time.perf_counter() - t:.2f} s ({var.sum():.1%} of the variance)")
    bench_maps(args, z, city)
    if args.tiles:
        bench_gallery(args, masks)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
