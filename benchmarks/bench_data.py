"""Benchmark: decoding every image every epoch against the data stage's decoded-image cache.

Reads nothing else; writes (or reuses) ``--images`` JPEGs of ``--src-size`` px and a cache under
``--work`` (default: a folder in the system temp dir), and prints a table of images/s for:
(a) decode every epoch: PIL open + RGB + shorter-side resize and centre crop per image, then
batches to float tensors; (b) the cache: gather a shuffled batch from the memory-mapped
``images.npy`` into float tensors, as training does. Also times building the cache with one
and two worker processes and the reuse of a finished run.

    python benchmarks/bench_data.py [--images 600] [--src-size 128] [--size 96] [--epochs 3]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from citylib.data import dataset, imagecache

CITIES = ("amsterdam", "berlin", "cairo")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--src-size", type=int, default=128, help="side of the generated JPEGs")
    p.add_argument("--size", type=int, default=96, help="cached image size")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader (best kept)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "citylib_bench_data")
    return p


def make_images(root: Path, n: int, side: int) -> Path:
    """n smooth random JPEGs over the cities, 4 views per spot (reused when already there)."""
    names = []
    for i in range(n):
        city, j = CITIES[i % len(CITIES)], i // len(CITIES)
        names.append(root / city / f"{city}{j // 4:04d}_{j % 4}.jpg")
    if sorted(root.glob("*/*.jpg")) == sorted(names) and Image.open(names[0]).size == (side, side):
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    for path in names:
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # blurred up: photo-like JPEG sizes
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC).save(path, quality=90)
    return root


def to_float(batch: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)


def decode_epoch(paths: list[str], size: int, batch: int, rng) -> int:
    order = rng.permutation(len(paths))
    for b in range(0, len(order), batch):
        arrays = []
        for i in order[b:b + batch]:
            im = imagecache.open_rgb(paths[i])
            arrays.append(np.asarray(im.resize((size, size), Image.Resampling.BICUBIC,
                                               box=imagecache._square_box(*im.size))))
        to_float(np.stack(arrays))  # (B, 3, S, S)
    return len(order)


def cached_epoch(images: np.ndarray, batch: int, rng) -> int:
    order = rng.permutation(len(images))
    for b in range(0, len(order), batch):
        to_float(images[order[b:b + batch]])  # (B, 3, S, S)
    return len(order)


def best_rate(fn, epochs: int) -> float:
    rates = []
    for _ in range(epochs):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return max(rates)


def main(args) -> None:
    torch.set_num_threads(1)
    root = make_images(args.work / "images", args.images, args.src_size)
    cfg = dataset.DataConfig(source=str(root), image_size=args.size, group_pattern=r"^([a-z]+\d+)_")
    shutil.rmtree(args.work / "out", ignore_errors=True)

    t = time.perf_counter()
    result = dataset.run(cfg, args.work / "out", progress=False)
    first = time.perf_counter() - t
    t = time.perf_counter()
    dataset.run(cfg, args.work / "out", progress=False)
    rerun = time.perf_counter() - t
    builds = {}
    for workers in (1, 2):
        folder = args.work / f"build{workers}"
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        imagecache.build_cache(result.manifest, args.size, folder, workers=workers, progress=False)
        builds[workers] = args.images / (time.perf_counter() - t)

    c = imagecache.load_cache(result.cache_dir)
    paths = list(c.index["path"])
    rng = np.random.default_rng(0)
    decode = best_rate(lambda: decode_epoch(paths, args.size, args.batch, rng), args.epochs)
    cached = best_rate(lambda: cached_epoch(c.images, args.batch, rng), args.epochs)

    print(f"{args.images} JPEGs of {args.src_size} px -> {args.size} px, batch {args.batch}, "
          f"best of {args.epochs} epochs, torch threads 1")
    print(f"{'loader':<34}{'images/s':>12}{'ratio':>9}")
    print(f"{'decode every epoch (PIL)':<34}{decode:>12,.0f}{1.0:>9.1f}")
    print(f"{'cache (mmap gather -> float)':<34}{cached:>12,.0f}{cached / decode:>9.1f}")
    print(f"{'store build, 1 worker process':<34}{builds[1]:>12,.0f}")
    print(f"{'store build, 2 worker processes':<34}{builds[2]:>12,.0f}{builds[2] / builds[1]:>9.1f}")
    print(f"dataset.run first: {first:.2f} s (validate + split + cache); rerun (reused): {rerun:.3f} s")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
