"""Benchmark: ``citylib.train``'s epoch loop against a bare PyTorch loop, per architecture.

Reads nothing; writes nothing; prints a table. For each architecture, the same model and Adam
optimizer are stepped N times (a) through ``train.train_one_epoch`` (one step per call) on a uint8 cache (index
gather, uint8 -> float, flip and pad-and-crop on the batch, progress bar off) and (b) by a bare
loop over float tensors built beforehand. Overhead = extra time of (a) over (b). Also estimates
the seconds of one epoch of ``--epoch-images`` training images (train steps + validation at a
6:2:2 split + one checkpoint write), which sizes the default world. Given several thread counts
(``--threads 1 2``), the table is printed for each, then how many times faster each architecture
trains on more threads than on the fewest: below 2x for 2 threads, two one-thread runs side by
side (what ``citylib run`` does with ``train.threads: 1``) get more done than one after another.
With ``--torchvision-pool``, vgg11 and alexnet are also timed as torchvision builds them (the
adaptive pool copying a small map into 7 x 7 / 6 x 6 and the first fc layer sized to that),
and the table ends with how many times faster citylib's fitted classifier trains.

    python benchmarks/bench_train.py [--size 96] [--batch 32] [--steps 8] [--archs simple vgg11]
                                     [--threads 1 2] [--torchvision-pool]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from citylib.nets import infer, models, train


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=list(models.ARCHS), choices=models.ARCHS)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--images", type=int, default=320, help="synthetic training images")
    p.add_argument("--steps", type=int, default=8, help="timed steps per loop (median kept)")
    p.add_argument("--threads", type=int, nargs="+", default=[2], help="one table per count")
    p.add_argument("--epoch-images", type=int, default=1100)
    p.add_argument("--torchvision-pool", action="store_true",
                   help="also time vgg11/alexnet with torchvision's own pool and fc1")
    return p


TORCHVISION = " (torchvision)"   # suffix of an arch timed as torchvision builds it


def _fresh(arch: str, classes: int, size: int, lr: float):
    torch.manual_seed(0)
    if arch.endswith(TORCHVISION):
        from torchvision import models as tvm
        model = getattr(tvm, arch.removesuffix(TORCHVISION))(weights=None, num_classes=classes)
    else:
        model = models.build(arch, classes, size)
    return model, torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def bench_arch(arch: str, args, threads: int) -> dict:
    n = args.steps * args.batch
    N = max(args.images, n)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, args.size, args.size, 3), dtype=np.uint8)  # (N, S, S, 3)
    y = torch.as_tensor(rng.integers(0, args.classes, N), dtype=torch.int64)     # (N,)
    idx = np.arange(N)
    cfg = train.TrainConfig(batch_size=args.batch, threads=threads)
    X = infer.to_tensor(images[:n])                       # (n, 3, S, S) float, built beforehand
    Y = y[:n]                                             # (n,)

    model_a, opt_a = _fresh(arch, args.classes, args.size, cfg.lr)
    model_b, opt_b = _fresh(arch, args.classes, args.size, cfg.lr)
    gen = torch.Generator().manual_seed(0)

    def citylib_step(i):   # one step through train.train_one_epoch's own loop
        train.train_one_epoch(model_a, opt_a, images, y, idx, cfg, gen, progress=False,
                              max_steps=1)

    def bare_step(i):
        model_b.train()
        x, t = X[i * args.batch:(i + 1) * args.batch], Y[i * args.batch:(i + 1) * args.batch]
        loss = F.cross_entropy(model_b(x), t)
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        opt_b.step()

    citylib_step(0), bare_step(0)                        # warm-up: allocator, Adam state
    # steps alternate between the two loops (order swapped each time) and the median step time
    # is kept, so that load from other processes hits both alike
    times = {"citylib": [], "bare": []}
    for i in range(args.steps):
        pair = (("bare", bare_step), ("citylib", citylib_step))
        for key, fn in (pair if i % 2 else pair[::-1]):
            t0 = time.perf_counter()
            fn(i)
            times[key].append(time.perf_counter() - t0)
    ips = {k: args.batch / float(np.median(v)) for k, v in times.items()}

    evals = []                                            # validation throughput
    for i in range(3):
        t0 = time.perf_counter()
        infer.predict(model_a, images[i * args.batch:(i + 1) * args.batch], args.batch)
        evals.append(time.perf_counter() - t0)
    eval_ips = args.batch / float(np.median(evals))
    with tempfile.TemporaryDirectory() as d:              # one epoch checkpoint
        t0 = time.perf_counter()
        torch.save({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()},
                   Path(d) / "ck.pt")
        save_s = time.perf_counter() - t0
        ck_mb = (Path(d) / "ck.pt").stat().st_size / 2**20
    n_val = args.epoch_images / 3                         # 6:2:2 split
    epoch_s = args.epoch_images / ips["citylib"] + n_val / eval_ips + save_s
    params = sum(p.numel() for p in model_a.parameters())
    return dict(arch=arch, params_m=params / 1e6, citylib=ips["citylib"], bare=ips["bare"],
                overhead=100 * (ips["bare"] / ips["citylib"] - 1), eval=eval_ips,
                ck_mb=ck_mb, epoch_s=epoch_s)


def main(args) -> list[dict]:
    torch.use_deterministic_algorithms(True)             # as in training
    rows = []
    archs = list(args.archs)
    if args.torchvision_pool:
        archs += [a + TORCHVISION for a in args.archs if a in ("vgg11", "alexnet")]
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"{args.size} px, batch {args.batch}, {args.classes} classes, {threads} threads, "
              f"median of {args.steps} alternating steps per loop")
        print(f"{'arch':<22} {'params':>7} {'citylib img/s':>13} {'bare img/s':>10} {'overhead':>8} "
              f"{'eval img/s':>10} {'ckpt MB':>8} {f's/epoch@{args.epoch_images}':>13}")
        for arch in archs:
            r = dict(bench_arch(arch, args, threads), threads=threads)
            rows.append(r)
            print(f"{r['arch']:<22} {r['params_m']:>6.1f}M {r['citylib']:>13.1f} {r['bare']:>10.1f} "
                  f"{r['overhead']:>7.1f}% {r['eval']:>10.1f} {r['ck_mb']:>8.0f} "
                  f"{r['epoch_s']:>13.0f}", flush=True)
        print()
    tv = [(r, next(q for q in rows if q["arch"] == r["arch"] + TORCHVISION and q["threads"] == r["threads"]))
          for r in rows if r["arch"] + TORCHVISION in archs]
    for r, q in tv:
        print(f"{r['arch']}, {r['threads']} threads: citylib's fitted classifier trains "
              f"{r['citylib'] / q['citylib']:.2f}x as fast as torchvision's pool "
              f"({q['params_m']:.1f}M -> {r['params_m']:.1f}M parameters, checkpoint "
              f"{q['ck_mb']:.0f} -> {r['ck_mb']:.0f} MB)")
    if len(args.threads) > 1:
        base = min(args.threads)
        speed = {(r["arch"], r["threads"]): r["citylib"] for r in rows}
        print(f"training speed-up over {base} thread(s): " + ", ".join(
            f"{t} threads" for t in args.threads if t != base))
        for arch in args.archs:
            print(f"{arch:<9} " + " ".join(f"{speed[arch, t] / speed[arch, base]:>9.2f}x"
                                           for t in args.threads if t != base))
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
