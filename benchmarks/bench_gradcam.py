"""Benchmark: citylib's Grad-CAM against its floor, pytorch-grad-cam and captum, on CPU.

Reads nothing; writes nothing; prints a table of seconds per batch (median of ``--repeats``,
the methods interleaved in each round so that a change in machine load hits all alike):

- floor: one forward with a hook on the Grad-CAM layer, one ``autograd.grad`` of the target
  scores to the layer's output; no CAM arithmetic. What any Grad-CAM has to pay.
- floor-cl: the same with the batch in channels-last layout, as citylib passes it on CPU
  (oneDNN's faster convolutions); the ratio to it shows what citylib's own mechanics cost.
- citylib: ``cams.GradCAM`` (masks at the layer's resolution), and the same followed by
  ``saliency.upsample`` to S x S (what the other two return; the ratios use this one).
- pytorch-grad-cam: ``GradCAM(model, [layer])(x, None)`` (S x S, normalised).
- captum: ``LayerGradCam(model, layer).attribute(x, target, relu_attributions=True)`` and
  ``LayerAttribution.interpolate(..., (S, S), "bilinear")``; given the predicted classes,
  which it cannot pick itself. captum-cl: the same given a channels-last batch (for reference:
  how much of the difference is the memory layout).

Random weights, eval mode, the predicted class as target.

    python benchmarks/bench_gradcam.py [--archs vgg11 resnet18] [--size 224] [--batch 32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from citylib.explain import cams, saliency
from citylib.nets import models


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["vgg11", "resnet18"], choices=models.ARCHS)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median kept)")
    p.add_argument("--threads", type=int, default=2)
    return p


def methods(model, layer, x, target):
    """name -> callable running one batch."""
    from captum.attr import LayerAttribution, LayerGradCam
    from pytorch_grad_cam import GradCAM

    size = x.shape[-2:]
    seen = {}
    hook = layer.register_forward_hook(lambda m, i, o: seen.update(a=o))

    x_cl = x.contiguous(memory_format=torch.channels_last)           # (B, 3, S, S), NHWC

    def floor(x):
        logits = model(x)                                            # (B, C)
        pred = logits.detach().argmax(1)
        torch.autograd.grad(logits.gather(1, pred[:, None]).sum(), seen.pop("a"))

    ours = cams.GradCAM(model)
    pgc = GradCAM(model, [layer])
    cap = LayerGradCam(model, layer)

    def captum(x):
        attr = cap.attribute(x, target=target, relu_attributions=True)   # (B, 1, h, w)
        return LayerAttribution.interpolate(attr, size, "bilinear")      # (B, 1, S, S)

    fns = {"floor": lambda: floor(x), "floor-cl": lambda: floor(x_cl), "citylib": lambda: ours(x),
           "citylib+upsample": lambda: saliency.upsample(ours(x).masks, size),
           "pytorch-grad-cam": lambda: pgc(x, None), "captum": lambda: captum(x),
           "captum-cl": lambda: captum(x_cl)}
    return fns, (hook, ours, pgc)


def bench_arch(arch: str, args) -> dict:
    torch.manual_seed(0)
    model = models.build(arch, args.classes, args.size).eval()
    layer = models.gradcam_layer(model)
    x = torch.randn(args.batch, 3, args.size, args.size)            # (B, 3, S, S)
    with torch.no_grad():
        target = model(x).argmax(1)                                  # (B,) for captum
    fns, keep = methods(model, layer, x, target)
    # agreement check: citylib (upsampled) against pytorch-grad-cam on this batch
    diff = float(np.abs(fns["citylib+upsample"]() - fns["pytorch-grad-cam"]()).max())
    for fn in fns.values():                                          # warm-up round
        fn()
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    keep[0].remove()
    keep[1].release()
    keep[2].activations_and_grads.release()
    return {"median": {k: statistics.median(v) for k, v in times.items()}, "all": times,
            "max_abs_diff_vs_pgc": diff}


def main(args) -> None:
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
          f"{args.size} px, median of {args.repeats}; load average before: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rows = []
    for arch in args.archs:
        r = bench_arch(arch, args)
        m = r["median"]
        rows.append((arch, m, r["max_abs_diff_vs_pgc"]))
        print(f"{arch}: " + ", ".join(f"{k} {[round(t, 2) for t in v]}"
                                      for k, v in r["all"].items()), flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    names = list(rows[0][1])
    print("seconds per batch" + "".join(f" | {n}" for n in names))
    for arch, m, _ in rows:
        print(f"{arch:>17}" + "".join(f" | {m[n]:{len(n)}.2f}" for n in names))
    print("\narch | citylib/floor | citylib/floor-cl | citylib+up/floor | "
          "pgc/citylib+up (throughput x) | captum/citylib+up (throughput x) | "
          "captum-cl/citylib+up | max |citylib-pgc|")
    for arch, m, diff in rows:
        up = m["citylib+upsample"]
        print(f"{arch} | {m['citylib'] / m['floor']:.3f} | {m['citylib'] / m['floor-cl']:.3f} | "
              f"{up / m['floor']:.3f} | {m['pytorch-grad-cam'] / up:.2f} | "
              f"{m['captum'] / up:.2f} | {m['captum-cl'] / up:.2f} | {diff:.1e}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
