"""Benchmark: the ADE20K segmenter (DeepLabV3-MobileNetV2, TFLite) on real Street View photos.

Reads the model (``segment.model_file``: ``$CITYLIB_ADE20K`` or ``../shared/models/ade20k``) and
the photos under ``--photos`` (default ``../shared/samples/streetview``); writes nothing. Labels
``--images`` photos at ``--size`` px once per thread count in ``--threads`` (after one warm-up
image) and prints seconds per image, images/s and the speed-up against the first count.

    python benchmarks/bench_segment.py [--images 20] [--size 224] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from citylib import paths, segment


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=Path, default=paths.shared() / "samples" / "streetview")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    return p


def main(args: argparse.Namespace) -> None:
    files = sorted(str(f) for f in args.photos.rglob("*.jpg"))[:args.images]
    if not files:
        raise SystemExit(f"{args.photos}: no .jpg photos")
    print(f"{len(files)} photos from {args.photos}, {args.size} px, {os.cpu_count()} CPUs, "
          f"model {segment.model_file()}")
    print(f"{'threads':>7} {'s/image':>8} {'images/s':>9} {'speed-up':>9}")
    first = None
    for threads in args.threads:
        model = segment.Ade20k(threads=threads)
        model(files[:1], args.size)                                  # warm-up
        start = time.perf_counter()
        model(files, args.size)
        per = (time.perf_counter() - start) / len(files)
        first = first or per
        print(f"{threads:>7} {per:>8.3f} {1 / per:>9.2f} {first / per:>8.2f}x")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
