"""Benchmark: disk size of the stored Grad-CAM masks, per architecture, against their float16 size.

Reads nothing; writes nothing. For each architecture (random weights, ``--classes`` cities),
computes ``cams.GradCAM`` masks for ``--images`` random-noise images at ``--size`` px, stored
as ``gradcam.run`` stores them (float16 at the layer's own resolution), and prints the bytes per
image and the size for ``--scale`` images: as stored, and after lossless codecs on the float16
values and on the masks quantised to 8 bits (what a smaller format would cost). The baseline of
the ratios is the stored float16 size, measured in the same run.

    python benchmarks/bench_masks.py [--size 224] [--images 64] [--scale 30000]
"""
from __future__ import annotations

import argparse
import lzma
import zlib

import numpy as np
import torch

from citylib.explain import cams
from citylib.nets import models


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=list(models.ARCHS), choices=models.ARCHS)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--scale", type=int, default=30000, help="images to size the store for")
    p.add_argument("--threads", type=int, default=2)
    return p


def codecs(masks: np.ndarray) -> dict[str, int]:
    """Bytes of (n, h, w) float32 masks in [0, 1] under each storage, for all n images."""
    f16 = masks.astype(np.float16)                                   # (n, h, w), as stored
    n = len(f16)
    shuffled = f16.view(np.uint8).reshape(n, -1, 2).transpose(0, 2, 1).tobytes()  # bytes split
    q = np.round(masks * 255).astype(np.uint8)                       # (n, h, w) 8-bit
    delta = np.diff(q.astype(np.int16), axis=2, prepend=0).astype(np.uint8).tobytes()  # row delta
    return {"float16": f16.nbytes,
            "float16 zlib": len(zlib.compress(f16.tobytes(), 9)),
            "float16 shuffled lzma": len(lzma.compress(shuffled)),
            "uint8": q.nbytes,
            "uint8 zlib": len(zlib.compress(q.tobytes(), 9)),
            "uint8 delta lzma": len(lzma.compress(delta))}


def main(args) -> None:
    torch.set_num_threads(args.threads)
    print(f"{args.images} noise images at {args.size} px, random weights; MB for {args.scale} images")
    for arch in args.archs:
        torch.manual_seed(0)
        model = models.build(arch, args.classes, args.size).eval()
        x = torch.randn(args.images, 3, args.size, args.size)        # (n, 3, S, S)
        with cams.GradCAM(model) as cam:
            masks = np.concatenate([cam(x[i:i + 16]).masks for i in range(0, len(x), 16)])
        sizes = codecs(masks)
        base = sizes["float16"]
        print(f"{arch} {masks.shape[1]}x{masks.shape[2]}: " + ", ".join(
            f"{k} {v / len(masks) * args.scale / 1e6:.1f} MB ({v / base:.2f})"
            for k, v in sizes.items()), flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
