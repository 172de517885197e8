"""Benchmark: training throughput on a device, fp32 against bf16 and channels-last, and the data
pipeline alone, side by side in one run.

Reads nothing; writes nothing; prints a table. On synthetic uint8 images of ``--size`` px, per
architecture: the training step alone (forward, backward and Adam on batches already on the
device) in fp32, fp32 channels-last, bf16 autocast, and bf16 autocast channels-last (what
``citylib.train`` does on CUDA); then ``train.train_one_epoch`` as a run uses it (batch gather,
augmentation, uint8 -> float, transfer, step). The data pipeline alone (gather, augmentation,
uint8 -> float, transfer to the device, no network) shows whether it can keep the device fed:
its images/s against the fastest step's. Ratios are against fp32 in the same run; the device
and its name are printed first. Last, the ADE20K segmenter (``bench_segment.py``) with one
worker process against one per core, on the sample Street View photos.

    python benchmarks/bench_device.py [--device auto] [--archs resnet18 vgg11] [--size 224]
                                      [--batch 64] [--steps 10] [--threads 2] [--segment-images 40]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from citylib.core import devices
from citylib.nets import loader, models, train


VARIANTS = (("fp32", False, False), ("fp32 channels-last", False, True),
            ("bf16 autocast", True, False), ("bf16 autocast channels-last", True, True))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:K or mps")
    p.add_argument("--archs", nargs="+", default=["resnet18", "vgg11"], choices=models.ARCHS)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS], choices=[v[0] for v in VARIANTS],
                   help="which of the step's variants (bf16 on a CPU without bf16 units is very slow)")
    p.add_argument("--loader-threads", nargs="+", type=int, default=[0, 4],
                   help="the data pipeline made in turn (0) and by this many helper threads")
    p.add_argument("--segment-images", type=int, default=40,
                   help="sample photos for the segmenter's lines (0: leave them out)")
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, on: bool):
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _timed(step, n: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``step``, the median of ``n`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def step_alone(arch, args, device, bf16: bool, channels_last: bool) -> float:
    """Images/s of forward + backward + Adam on a batch already on the device."""
    torch.manual_seed(0)
    model = models.build(arch, args.classes, args.size).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, args.classes, (args.batch,), device=device)

    def step():
        with _autocast(device, bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return args.batch / _timed(step, args.steps, args.warmup, device)


def citylib_loop(arch, args, device, images, labels) -> float:
    """Images/s of ``train.train_one_epoch`` (the run's own loop, as it runs on ``device``)."""
    torch.manual_seed(0)
    model = models.build(arch, args.classes, args.size)
    if device.type != "cpu":
        model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    cfg = train.TrainConfig(batch_size=args.batch)
    idx, gen = np.arange(len(images)), torch.Generator().manual_seed(0)
    train.train_one_epoch(model, opt, images, labels, idx, cfg, gen, progress=False, max_steps=args.warmup)
    _sync(device)
    t0 = time.perf_counter()
    train.train_one_epoch(model, opt, images, labels, idx, cfg, gen, progress=False, max_steps=args.steps)
    _sync(device)
    return args.steps * args.batch / (time.perf_counter() - t0)   # len(images) holds --steps batches


def pipeline_alone(args, device, images, labels, threads: int) -> float:
    """Images/s of ``loader.batches`` (batch gather, augmentation, uint8 -> float, transfer)
    without a network, made in turn (``threads`` 0) or by that many helper threads."""
    cfg = train.TrainConfig(batch_size=args.batch)
    gen = torch.Generator().manual_seed(0)
    order = np.random.default_rng(0).permutation(np.resize(np.arange(len(images)), 8 * len(images)))
    starts = range(0, len(order) - args.batch + 1, args.batch)
    made = loader.batches(images, labels, order, starts, cfg, gen, device, threads)
    for _ in range(args.warmup):
        next(made)
    _sync(device)
    t0, n = time.perf_counter(), 0
    for _, x, _ in made:
        n += len(x)
    x.sum().item()                                        # the last batch has arrived
    return n / (time.perf_counter() - t0)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def measure(args) -> list[dict]:
    """Every measurement of the table as rows (what, variant, images/s, ratio), printed as they
    come; the segmenter's, when asked for, printed after them."""
    torch.set_num_threads(args.threads)
    device = devices.resolve(args.device)
    print(f"device: {devices.describe(args.device, device)}; torch {torch.__version__}; "
          f"CPU: {_cpu()}, {os.cpu_count()} cores; "
          f"{args.size} px, batch {args.batch}, median of {args.steps} steps")
    n = max(args.batch * (args.steps + args.warmup), args.batch)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)  # (N, S, S, 3)
    labels = torch.from_numpy(rng.integers(0, args.classes, n)).long()
    print(f"{'arch':10s} {'variant':30s} {'images/s':>10s} {'x fp32':>8s}")
    rows = []

    def row(arch: str, what: str, rate: float, ratio: float) -> None:
        rows.append({"arch": arch, "variant": what, "images_per_s": rate, "ratio": ratio})
        print(f"{arch:10s} {what:30s} {rate:10.1f} {ratio:8.2f}")

    best = 0.0
    for arch in args.archs:
        base = None
        for name, bf16, cl in (v for v in VARIANTS if v[0] in args.variants):
            rate = step_alone(arch, args, device, bf16, cl)
            base = base or rate
            best = max(best, rate)
            row(arch, name, rate, rate / base)
        rate = citylib_loop(arch, args, device, images, labels)
        row(arch, "train_one_epoch (the run loop)", rate, rate / base)
    for threads in args.loader_threads:
        feed = pipeline_alone(args, device, images, labels, threads)
        row("-", f"data pipeline, {threads} threads" if threads else "data pipeline, in turn", feed, feed / best)
    if args.segment_images:                  # the ADE20K segmenter (CPU), one worker against all cores
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_segment

        cores = os.cpu_count() or 1
        print("\nthe ADE20K segmenter (segment.run), one worker against one per core:")
        bench_segment.main(bench_segment.get_args_parser().parse_args(
            ["--images", str(args.segment_images), "--size", str(args.size), "--settings", "1x1", f"{cores}x1"]))
    return rows


def main(args) -> None:
    measure(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
