"""Removal operators and the reliance measurement, timed against their baselines in one run.

Plain script: ``python benchmarks/bench_removal.py [--size 224] [--images 16] [--repeat 5]``.

1. Each operator's time per image at ``--size`` px, for objects covering 2%, 10% and 30% of the
   image, beside pytorch-grad-cam's ``NoisyLinearImputer`` (the ROAD authors' code, one image at
   a time) on the same images and masks, each timed in turn within every repeat; ours fill a
   batch, the linear one on torch's threads (2 here). Neither adds noise; the linear operator's
   largest difference from it is printed.
2. ``reliance.measure`` for ResNet18 on ``--images`` images with about 8 objects each, against
   its floor: the same number of forward passes alone (originals, removals, nulls), and the time
   it implies for 1,200 photos.
3. The linear fill's solve for one hole of 2%, 10%, 30% and 60% of the image, on one thread:
   the multigrid (``multigrid.fill``, as ``removal`` solves it) against SuperLU's direct solve
   (``removal._direct_values``, its fallback), the cycles taken and the largest difference.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scipy import ndimage  # noqa: E402

from citylib.explain import multigrid, removal  # noqa: E402
from citylib.nets import infer, models  # noqa: E402
from citylib.stages import reliance  # noqa: E402


def blob(size: int, share: float, rng) -> np.ndarray:
    """An irregular object mask of about ``share`` of the image: a union of discs."""
    yy, xx = np.mgrid[:size, :size]
    m = np.zeros((size, size), bool)
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    while m.mean() < share:
        r = rng.uniform(0.03, 0.12) * size
        m |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        cy, cx = np.clip([cy + rng.normal(0, r), cx + rng.normal(0, r)], 0, size - 1)
    return m


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def operators(size: int, n: int, repeat: int) -> None:
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for o in removal.OPERATORS:                   # first calls apart (the linear fill's compiled code loads)
        removal.remove(o, images[:2], np.stack([blob(size, 0.05, rng)] * 2))
    print(f"\noperators at {size} px, {n} images, best of {repeat}: ms per image (ratio: pytorch-grad-cam / ours)")
    print(f"{'object share':>12s} {'NoisyLinearImputer':>18s} " + " ".join(f"{o:>14s}" for o in sorted(removal.OPERATORS)))
    for share in (0.02, 0.10, 0.30):
        masks = np.stack([blob(size, share, rng) for _ in range(n)])
        imputer = NoisyLinearImputer(noise=0.0)
        pairs = [(torch.from_numpy(im.transpose(2, 0, 1) / 255.0).float(), torch.from_numpy((~m).astype(np.float32)))
                 for im, m in zip(images, masks)]
        fns = {"theirs": lambda: [imputer(x, k) for x, k in pairs],
               **{o: (lambda o=o: removal.remove(o, images, masks, noise=0.0))   # equal output: no noise
                  for o in sorted(removal.OPERATORS)}}
        times = {k: [] for k in fns}
        for _ in range(repeat):                   # taken in turn, so that a slow spell hits them all
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        theirs = min(times.pop("theirs")) / n
        ours = {o: min(t) / n for o, t in times.items()}
        diff = max(float(np.abs(imputer(x, k).numpy().transpose(1, 2, 0) - removal.imputed(im[None] / 255.0, m[None])[0]).max())
                   for (x, k), im, m in zip(pairs[:2], images, masks))
        print(f"{share:12.0%} {1000 * theirs:18.2f} " + " ".join(f"{1000 * t:7.2f} ({theirs / t:4.1f}x)" for t in ours.values())
              + f"   linear vs NoisyLinearImputer: max |diff| {diff:.1e}")


def stage(size: int, n: int, repeat: int) -> None:
    rng = np.random.default_rng(1)
    model = models.build("resnet18", 3, size).eval()
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.ones((n, size, size), np.uint8)                 # a wall with 8 objects on it
    for i in range(n):
        for c in range(2, 10):
            labels[i][blob(size, rng.uniform(0.02, 0.08), rng)] = c
    cfg = reliance.RelianceConfig(device="cpu", batch_size=32)
    target, groups, rows = np.zeros(n, np.int64), np.arange(n).astype(str), np.arange(n)
    found = sum(len(reliance.objects(labels[i:i + 1], cfg.min_share)) for i in range(n))
    passes = n + 2 * found
    ours = best(lambda: reliance.measure(model, images, labels, rows, target, ["a", "b", "c"], groups, cfg), repeat)
    pool = images[rng.integers(0, n, passes)]
    floor = best(lambda: infer.logits(model, pool, cfg.batch_size), repeat)
    print(f"\nreliance.measure, ResNet18 at {size} px, {n} images, {found} removals ({passes} forward passes), "
          f"operator {cfg.operator}, best of {repeat}")
    print(f"{'':28s} {'s':>8s} {'ratio':>6s}")
    print(f"{'forward passes alone (floor)':28s} {floor:8.2f} {1.0:6.2f}")
    print(f"{'reliance.measure':28s} {ours:8.2f} {ours / floor:6.2f}")
    per_removal = ours / found
    print(f"1,200 photos x 10 objects at this rate: {1200 * 10 * per_removal / 60:.0f} min on this machine")


def solvers(size: int, repeat: int) -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    print(f"\nthe linear fill's solve, one hole at {size} px, 3 channels, one thread, best of {repeat}: ms "
          "(ratio: SuperLU / multigrid)")
    print(f"{'hole':>5s} {'unknowns':>8s} {'SuperLU (direct)':>16s} {'multigrid (ours)':>16s} {'ratio':>6s} "
          f"{'cycles':>6s} {'max |diff|':>10s}")
    for share in (0.02, 0.10, 0.30, 0.60):
        labelled, _ = ndimage.label(blob(size, share, rng), np.ones((3, 3)))
        mask = labelled == np.bincount(labelled.ravel())[1:].argmax() + 1              # its largest piece
        out = np.empty((int(mask.sum()), 3))
        direct = best(lambda: removal._direct_values(image[None], mask[None], 255.0), repeat)
        ours = best(lambda: multigrid.fill(image, mask, 255.0, removal.TOL, removal.MAX_CYCLES, out), repeat)
        cycles = multigrid.fill(image, mask, 255.0, removal.TOL, removal.MAX_CYCLES, out)
        diff = np.abs(out - removal._direct_values(image[None], mask[None], 255.0)).max()
        print(f"{share:5.0%} {out.shape[0]:8d} {1000 * direct:16.1f} {1000 * ours:16.1f} {direct / ours:5.1f}x "
              f"{cycles:6d} {diff:10.1e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    operators(args.size, args.images, args.repeat)
    stage(args.size, args.images, args.repeat)
    solvers(args.size, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
