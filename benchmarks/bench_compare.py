"""Benchmark: AR (Eq. 2) over every pair of runs, streamed, against the all-at-once baseline.

Reads nothing; writes ``--runs`` mask files into a temporary folder (deleted at the end).
Each run's masks are (N, h, w) float16, smooth random maps (a 3 x 3 random grid, bilinearly
upsampled to the native side and min-max normalised), native sides cycling through ``--sides``
(7 resnet18, 14 vgg11, 28 simple, 13 alexnet, 18 vgg_s at 224 px), memory-mapped as
``gradcam.load`` opens them. Every measurement runs in a fresh process, so its peak RSS
(``ru_maxrss``) is its own. "anon +MB": the peak of anonymous memory (``RssAnon`` in
/proc/self/status, sampled every 5 ms) above its level before the step, i.e. what the step
allocates; "file MB": the peak of file-backed resident pages, which include the memory-mapped
masks read so far (reclaimable page cache, growing with N whatever the method).

- streamed: ``residuals.pairwise_ar`` (each run's batch upsampled once, shared by its pairs).
- all at once: every run's N masks upsampled to S x S first (runs x N x S^2 x 4 bytes), then
  ``residuals.residual`` per pair: the same arithmetic, only without batches. Run at
  ``--naive-images`` and extrapolated linearly to N (its memory is linear in N).
- the rest of ``compare.run``: bootstrap CIs of every pair and both tests.

    python benchmarks/bench_compare.py [--images 10000] [--runs 10] [--size 96] [--batch 256]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import threading
import time
from itertools import combinations
from pathlib import Path

import numpy as np


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--size", type=int, default=96, help="image size S the masks are compared at")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sides", type=int, nargs="+", default=[7, 14, 28, 13, 18])
    p.add_argument("--naive-images", type=int, default=1000)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--permutations", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement")
    return p


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb() -> dict[str, float]:
    """RssAnon and RssFile of this process in MB (zeros where /proc is missing)."""
    out = {"RssAnon": 0.0, "RssFile": 0.0}
    try:
        for line in open("/proc/self/status"):
            key, value = line.split(":", 1)
            if key in out:
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


class PeakSampler:
    """Samples status_mb() in a thread while in the ``with`` block; keeps the peaks."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, status_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            now = status_mb()
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def make_masks(folder: Path, runs: int, n: int, sides: list[int]) -> list[Path]:
    """runs x (n, side, side) float16 .npy files, written in chunks."""
    import torch

    from citylib.explain import saliency

    files = []
    for k in range(runs):
        side, gen = sides[(k // 2) % len(sides)], torch.Generator().manual_seed(k)  # 2 seeds/arch
        path = folder / f"run{k}.npy"
        out = np.lib.format.open_memmap(path, "w+", np.float16, (n, side, side))
        for s in range(0, n, 2048):
            g = torch.rand(min(2048, n - s), 1, 3, 3, generator=gen)
            up = torch.nn.functional.interpolate(g, size=(side, side), mode="bilinear")[:, 0]
            out[s:s + len(g)] = saliency.normalise(up).numpy()
        out.flush()
        files.append(path)
    return files


def measure(what: str, files: list[str], n: int, size: int, batch: int, args, queue) -> None:
    """One measurement in this (fresh) process; puts (wall s, CPU s, peak RSS MB, anon +MB,
    file MB) on ``queue``."""
    import torch

    from citylib.explain import saliency
    from citylib.stages import residuals

    torch.set_num_threads(os.cpu_count() or 1)
    masks = [np.load(f, mmap_mode="r")[:n] for f in files]
    rows = np.arange(n)
    # torch's lazy start-up (thread pool, kernels) happens here, not inside the measurement
    residuals.residual(saliency.upsample(masks[0][:2], size), saliency.upsample(masks[1][:2], size))
    base = status_mb()["RssAnon"]
    t0, c0 = time.perf_counter(), time.process_time()
    with PeakSampler() as peak:
        step(what, masks, rows, size, batch, args)
    queue.put((time.perf_counter() - t0, time.process_time() - c0, rss_mb(),
               peak.peak["RssAnon"] - base, peak.peak["RssFile"]))


def step(what: str, masks: list, rows: np.ndarray, size: int, batch: int, args) -> None:
    """The timed work."""
    from citylib.explain import saliency
    from citylib.stages import ar_tables, compare, residuals

    n = len(rows)
    if what == "streamed":
        residuals.pairwise_ar([(rows, m) for m in masks], size, batch)
    elif what == "all at once":
        ups = [saliency.upsample(m, size) for m in masks]                 # runs x (n, S, S)
        [residuals.residual(ups[a], ups[b]) for a, b in combinations(range(len(ups)), 2)]
    else:                                    # bootstrap CIs and both tests on per-image values
        rng = np.random.default_rng(0)
        names = [f"a{k // 2}_s{k % 2}" for k in range(len(masks))]
        infos = {nm: {"name": nm, "arch": nm.split("_")[0], "seed": k % 2}
                 for k, nm in enumerate(names)}
        per_image = {(names[a], names[b]): (rows, rng.random(n, dtype=np.float32))
                     for a, b in combinations(range(len(names)), 2)}
        cfg = compare.CompareConfig(bootstrap=args.bootstrap, permutations=args.permutations)
        ar_tables.tests(ar_tables.ar_frame(per_image, infos, cfg), per_image, cfg)


def run_child(*a, repeats: int = 1) -> tuple[float, ...]:
    """``measure``'s numbers from the fastest of ``repeats`` fresh processes (the
    machine is shared; the least disturbed run is the closest to the real cost)."""
    ctx, outs = mp.get_context("spawn"), []
    for _ in range(repeats):
        q = ctx.Queue()
        p = ctx.Process(target=measure, args=(*a, q))
        p.start()
        outs.append(q.get())
        p.join()
    return min(outs)


def main(args) -> None:
    load0 = os.getloadavg()
    n, S, R = args.images, args.size, args.runs
    with tempfile.TemporaryDirectory(prefix="bench_compare.") as tmp:
        t0 = time.perf_counter()
        files = [str(f) for f in make_masks(Path(tmp), R, n, args.sides)]
        setup = time.perf_counter() - t0
        disk = sum(os.path.getsize(f) for f in files) / 2**20
        m = args.naive_images
        a = (files, n, S, args.batch, args)
        small = (files, m, S, args.batch, args)
        res = [("streamed", n, *run_child("streamed", *a, repeats=args.repeats)),
               ("streamed", m, *run_child("streamed", *small, repeats=args.repeats)),
               ("all at once", m, *run_child("all at once", *small, repeats=args.repeats)),
               (f"CIs ({args.bootstrap}) + tests", n, *run_child("stats", *a, repeats=args.repeats))]
    pairs = R * (R - 1) // 2
    print(f"AR over {pairs} pairs of {R} runs, N = {n} test images, masks compared at S = {S} "
          f"(native sides {sorted(set(args.sides))}, float16, memory-mapped: {disk:.0f} MB on "
          f"disk), batch {args.batch}; setup {setup:.1f} s (not timed)")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load0)} on {os.cpu_count()} CPUs")
    print(f"fastest of {args.repeats} fresh processes each")
    print(f"{'method':24s} {'N':>6s} {'wall s':>7s} {'CPU s':>7s} {'us/img/pair':>11s} "
          f"{'peak RSS MB':>11s} {'anon +MB':>9s} {'file MB':>8s}")
    for name, k, sec, cpu, peak, anon, file in res:
        print(f"{name:24s} {k:6d} {sec:7.2f} {cpu:7.2f} {1e6 * sec / k / pairs:11.2f} "
              f"{peak:11.0f} {anon:9.0f} {file:8.0f}")
    naive, small = res[2], res[1]
    upsampled = R * n * S * S * 4 / 2**20
    print(f"all at once, extrapolated to N = {n}: {naive[2] * n / m:.1f} s, anon "
          f"+{naive[5] * n / m:.0f} MB (the {R} upsampled stacks alone: {upsampled:.0f} MB)")
    print(f"streamed, held per batch: (runs + 2) x batch x S^2 x 4 B = "
          f"{(R + 2) * args.batch * S * S * 4 / 2**20:.0f} MB, whatever N; time ratio at N = {m}: "
          f"all at once / streamed = {naive[2] / small[2]:.2f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
