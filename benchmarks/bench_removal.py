"""Removal operators and the reliance measurement, timed against their baselines in one run.

Plain script: ``python benchmarks/bench_removal.py [--size 224] [--images 16] [--repeat 3]``.

1. Each operator's time per image at ``--size`` px, for objects covering 2%, 10% and 30% of the
   image, beside pytorch-grad-cam's ``NoisyLinearImputer`` (the ROAD authors' code) on the same
   images and masks; the linear operator's largest difference from it (no noise) is printed.
2. ``reliance.measure`` for ResNet18 on ``--images`` images with about 8 objects each, against
   its floor: the same number of forward passes alone (originals, removals, nulls), and the time
   it implies for 1,200 photos.
3. The linear fill's solve for one hole of 2%, 10%, 30% and 60% of the image: SuperLU with its
   minimum-degree order (as ``removal`` solves it) against a banded Cholesky (LAPACK, the hole's
   pixels numbered row by row) and SuperLU given a geometric nested-dissection order; each
   one's largest difference from the first.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scipy import linalg, ndimage, sparse  # noqa: E402
from scipy.sparse.linalg import splu  # noqa: E402

from citylib.explain import removal  # noqa: E402
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
    print(f"\noperators at {size} px, {n} images, best of {repeat}: ms per image (ratio: pytorch-grad-cam / ours)")
    print(f"{'object share':>12s} {'NoisyLinearImputer':>18s} " + " ".join(f"{o:>14s}" for o in sorted(removal.OPERATORS)))
    for share in (0.02, 0.10, 0.30):
        masks = np.stack([blob(size, share, rng) for _ in range(n)])
        imputer = NoisyLinearImputer(noise=0.0)
        pairs = [(torch.from_numpy(im.transpose(2, 0, 1) / 255.0).float(), torch.from_numpy((~m).astype(np.float32)))
                 for im, m in zip(images, masks)]
        theirs = best(lambda: [imputer(x, k) for x, k in pairs], repeat) / n
        ours = {o: best(lambda: removal.remove(o, images, masks), repeat) / n for o in sorted(removal.OPERATORS)}
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


def hole_system(mask: np.ndarray):
    """The linear fill's matrix for one hole (unknowns numbered row by row): COO rows, columns,
    values and size."""
    h, w = mask.shape
    idx = np.flatnonzero(mask)
    var = np.full(h * w, -1)
    var[idx] = np.arange(idx.size)
    y, x = np.divmod(idx, w)
    rows, cols, vals, diag = [], [], [], np.zeros(idx.size)
    for dy, dx, weight in removal.NEIGHBOURS:
        ny, nx = y + dy, x + dx
        at = np.flatnonzero((ny >= 0) & (ny < h) & (nx >= 0) & (nx < w))
        nb = ny[at] * w + nx[at]
        diag[at] -= weight
        free = var[nb] >= 0
        rows.append(at[free]); cols.append(var[nb[free]]); vals.append(np.full(free.sum(), weight))
    n = np.arange(idx.size)
    return np.concatenate(rows + [n]), np.concatenate(cols + [n]), np.concatenate(vals + [diag]), idx.size


def dissection(y: np.ndarray, x: np.ndarray, leaf: int = 64) -> np.ndarray:
    """A nested-dissection order of grid points: halves split by the line at the median of the
    longer side, the line last, down to ``leaf`` points."""
    def split(ids):
        if ids.size <= leaf:
            return [ids]
        c = y[ids] if np.ptp(y[ids]) >= np.ptp(x[ids]) else x[ids]
        mid = int(np.median(c))
        return split(ids[c < mid]) + split(ids[c > mid]) + [ids[c == mid]]
    return np.concatenate(split(np.arange(y.size)))


def solvers(size: int, repeat: int) -> None:
    rng = np.random.default_rng(2)
    print(f"\nthe linear fill's solve, one hole at {size} px, 3 channels, best of {repeat}: ms (ratio: SuperLU / other)")
    print(f"{'hole':>5s} {'unknowns':>8s} {'band':>5s} {'SuperLU (ours)':>14s} {'banded Cholesky':>22s} {'nested dissection':>22s}")
    for share in (0.02, 0.10, 0.30, 0.60):
        labelled, _ = ndimage.label(blob(size, share, rng), np.ones((3, 3)))
        mask = labelled == np.bincount(labelled.ravel())[1:].argmax() + 1              # its largest piece
        r, c, v, n = hole_system(mask)
        a, b = sparse.csc_matrix((v, (r, c)), shape=(n, n)), rng.random((n, 3))
        lower, band = r >= c, int((r - c).max())

        def ours():
            return splu(a, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True}).solve(b)

        def banded():
            ab = np.zeros((band + 1, n))
            ab[(r - c)[lower], c[lower]] = -v[lower]                                   # -A: positive definite
            return -linalg.solveh_banded(ab, b, lower=True, check_finite=False)

        def nested():
            y, x = np.divmod(np.flatnonzero(mask), size)
            p = dissection(y, x)
            out = np.empty_like(b)
            out[p] = splu(a[p][:, p].tocsc(), permc_spec="NATURAL", diag_pivot_thresh=0.0,
                          options={"SymmetricMode": True}).solve(b[p])
            return out

        truth = ours()
        t = {name: best(fn, repeat) for name, fn in (("ours", ours), ("banded", banded), ("nested", nested))}
        cells = [f"{1000 * t[k]:7.1f} ({t['ours'] / t[k]:3.1f}x, {np.abs(fn() - truth).max():.0e})"
                 for k, fn in (("banded", banded), ("nested", nested))]
        print(f"{share:5.0%} {n:8d} {band:5d} {1000 * t['ours']:14.1f} " + " ".join(f"{x:>22s}" for x in cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    operators(args.size, max(2, args.images // 2), args.repeat)
    stage(args.size, args.images, args.repeat)
    solvers(args.size, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
