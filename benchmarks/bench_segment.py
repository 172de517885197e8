"""Benchmark: the ADE20K segmenter (DeepLabV3-MobileNetV2, TFLite) on real Street View photos.

Reads the model (``segment.model_file``: ``$CITYLIB_ADE20K`` or ``../shared/models/ade20k``) and
the photos under ``--photos`` (default ``../shared/samples/streetview``); writes only into a
temporary folder. Labels ``--images`` photos at ``--size`` px through the stage itself
(``segment.run``: decoding, the model, saving) with each ``workers x threads`` setting in
``--settings`` (default: one process of one thread, one process with every core as threads, one
process per core), each into a fresh folder, and prints images/s and the speed-up against the
first setting. Every setting must give the same label maps; the script says if one does not.

    python benchmarks/bench_segment.py [--images 40] [--size 224] [--settings 1x1 1x2 2x1]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from citylib.core import paths
from citylib.data import segment
from citylib.data.imagecache import Cache


def get_args_parser() -> argparse.ArgumentParser:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=Path, default=paths.shared() / "samples" / "streetview")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--settings", nargs="+", default=["1x1", f"1x{cores}", f"{cores}x1"],
                   help="WORKERSxTHREADS, e.g. 1x1 2x1")
    return p


def photo_cache(files: list[str], size: int, folder: Path) -> Cache:
    """A cache over the photos (only their paths are read by the segmenter)."""
    n = len(files)
    index = pd.DataFrame({"path": files, "city": "x", "group": files, "view": 0, "label_path": "",
                          "split": "test", "has_labels": False})
    return Cache(folder=folder, images=np.zeros((n, size, size, 3), np.uint8),
                 labels=np.zeros((n, size, size), np.uint8), index=index, cities=("x",),
                 y=np.zeros(n, np.int64))


def main(args: argparse.Namespace) -> None:
    files = sorted(str(f) for f in args.photos.rglob("*.jpg"))[:args.images]
    if not files:
        raise SystemExit(f"{args.photos}: no .jpg photos")
    print(f"{len(files)} photos from {args.photos}, {args.size} px, {os.cpu_count()} CPUs, "
          f"model {segment.model_file()}")
    print(f"{'workers':>7} {'threads':>7} {'seconds':>8} {'images/s':>9} {'speed-up':>9}  same maps")
    cache = photo_cache(files, args.size, Path("bench-photos"))
    first = reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            workers, threads = (int(v) for v in setting.split("x"))
            cfg = segment.SegmentConfig(segmenter="ade20k", workers=workers, threads=threads)
            start = time.perf_counter()
            labels = np.asarray(segment.run(cfg, Path(tmp) / setting, cache, progress=False).labels)
            seconds = time.perf_counter() - start
            first = first or seconds
            reference = labels if reference is None else reference
            same = "yes" if np.array_equal(labels, reference) else "NO"
            print(f"{workers:>7} {threads:>7} {seconds:>8.1f} {len(files) / seconds:>9.2f} "
                  f"{first / seconds:>8.2f}x  {same}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
