"""Every CUDA path of the suite, run once on a GPU machine and measured: one script, one JSON.

Plain script: ``python benchmarks/gpu_check.py [--out gpu_check.json] [--device cuda]
[--minutes 8] [--quick]``. On a machine without CUDA it says so in one line and exits 0;
``--device cpu --quick`` runs every step on the CPU at smoke size, which is how the script
itself is tested where there is no GPU. Steps, each timed, each recorded as ok or failed (with
its error) without stopping the others, and skipped once ``--minutes`` have passed:

a. ``throughput``: ``bench_device.py`` for ResNet18 and VGG11 at 224 px: the training step in
   fp32, channels-last, bf16 autocast and both; the run's own loop; the data pipeline alone, in
   turn and with 4 helper threads. Targets: ResNet18's run loop at 3,000 images/s or more, and
   the pipeline alone at 1.5 times the run loop or more.
b. ``smoke_grid``: the smoke runs end to end with every ``device`` setting on the device
   (training, Grad-CAM and every method, the causal passes, the sweep), one of them with
   ``cuda:all`` for the analyses, then ``citylib predict --device``.
c. ``ddp``: a training of two torchrun processes, one GPU each; on one GPU NCCL refuses two
   processes, which is said and not tried (the single-process path is step b's).
d. ``repeatable``: the same seeded training twice on the device: whether the weights are equal,
   or how far apart.

Writes ``--out`` (JSON: the device, every step's result and time) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import yaml  # noqa: E402

from citylib.core import devices  # noqa: E402
from citylib.core.paths import PARAMETERS  # noqa: E402
from citylib.nets import checkpoint  # noqa: E402
from citylib.run import pipeline, predict, runner  # noqa: E402

TARGET_RATE, TARGET_FEED = 3000.0, 1.5     # ResNet18 run loop at 224 px (images/s); pipeline / loop


def smoke(device: str, analyses: str | None = None, **train) -> dict:
    """The smoke parameter file with every ``device`` setting on ``device`` (the analyses' on
    ``analyses`` when given, e.g. ``cuda:all``) and ``train`` settings added."""
    cfg = yaml.safe_load((PARAMETERS / "smoke" / "simple_seed0.yaml").read_text())
    cfg["train"] = {**cfg["train"], "device": device, **train}
    for section in ("gradcam", "causal", "methods"):
        cfg[section] = {"device": analyses or device}
    return cfg


def throughput(args, work: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_device

    size, batch, steps = (64, 8, 1) if args.quick else (224, 128, 20)
    bench = bench_device.get_args_parser().parse_args(
        ["--device", args.device, "--archs", "resnet18", "vgg11", "--size", str(size), "--batch", str(batch),
         "--steps", str(steps), "--warmup", "1", "--loader-threads", "0", "4", "--segment-images", "0"]
        + (["--variants", "fp32", "fp32 channels-last"] if args.device == "cpu" else []))
    rows = bench_device.measure(bench)
    loop = next(r["images_per_s"] for r in rows if r["arch"] == "resnet18" and r["variant"].startswith("train_one_epoch"))
    feed = max(r["images_per_s"] for r in rows if r["variant"].startswith("data pipeline"))
    return {"ok": True, "rows": rows, "size": size, "batch": batch, "resnet18_run_loop": loop, "pipeline_alone": feed,
            "meets_rate": loop >= TARGET_RATE, "meets_feed": feed >= TARGET_FEED * loop}


def smoke_grid(args, work: Path) -> dict:
    params = work / "grid"
    params.mkdir()
    (params / "one.yaml").write_text(yaml.safe_dump(smoke(args.device)))
    analyses = "cuda:all" if args.device.startswith("cuda") else None
    (params / "all.yaml").write_text(yaml.safe_dump({**smoke(args.device, analyses), "seed": 1}))
    result = runner.run(params=params, outputs=work / "grid_out")
    image = next((work / "grid_out" / "world").glob("*/images/*/*.jpg"))
    guessed = predict.run(work / "grid_out" / "runs" / "one", [image], device=args.device)
    return {"ok": result.ok and not guessed["error"].astype(bool).any(), "executed": result.executed,
            "failed": result.failed, "seconds": result.seconds,
            "predicted": guessed.drop(columns=["image"]).to_dict("records")}


def ddp(args, work: Path) -> dict:
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    if args.device.startswith("cuda") and gpus < 2:
        return {"ok": None, "skipped": f"{gpus} GPU: NCCL refuses two processes on one GPU; the "
                                       "single-process path is the smoke grid's"}
    (work / "ddp.yaml").write_text(yaml.safe_dump(smoke(args.device, processes=2)))
    t0 = time.perf_counter()
    trained = pipeline.result(pipeline.open_run(work / "ddp.yaml", work / "ddp_out"), "training", progress=False)
    return {"ok": bool(trained.finished), "test_accuracy": trained.metrics.get("test_accuracy"),
            "seconds": time.perf_counter() - t0}


def repeatable(args, work: Path) -> dict:
    weights = []
    for k in range(2):
        (work / f"seeded{k}.yaml").write_text(yaml.safe_dump(smoke(args.device)))
        run = pipeline.open_run(work / f"seeded{k}.yaml", work / "seeded_out")    # one data stage
        pipeline.result(run, "training", progress=False)
        weights.append(checkpoint.load_model(run.dir)[0].state_dict())
    a, b = weights
    differ = max(float((a[n].float() - b[n].float()).abs().max()) for n in a)
    return {"ok": True, "identical": all(torch.equal(a[n], b[n]) for n in a), "max_abs_difference": differ}


STEPS = {"throughput": throughput, "smoke_grid": smoke_grid, "ddp": ddp, "repeatable": repeatable}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:K, or cpu to test the script")
    parser.add_argument("--minutes", type=float, default=8.0, help="no step starts after this")
    parser.add_argument("--quick", action="store_true", help="smoke-sized throughput (testing the script)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__} sees none); nothing to check")
        return 0
    device = devices.resolve(args.device)
    report = {"device": devices.describe(args.device, device), "torch": torch.__version__,
              "cuda": torch.version.cuda, "steps": {}}
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="citylib-gpu-check-"))
    try:
        for name, step in STEPS.items():
            if time.perf_counter() - t0 > 60 * args.minutes:
                report["steps"][name] = {"ok": None, "skipped": f"past {args.minutes:g} minutes"}
                continue
            started = time.perf_counter()
            try:
                report["steps"][name] = step(args, work)
            except Exception as e:                       # recorded; the other steps go on
                report["steps"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                         "traceback": traceback.format_exc()[-3000:]}
            report["steps"][name]["seconds_total"] = round(time.perf_counter() - started, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n{'step':12s} {'result':8s} {'s':>7s}  what")
    for name, r in report["steps"].items():
        state = "skipped" if r.get("ok") is None else "ok" if r.get("ok", True) else "FAILED"
        what = r.get("error") or r.get("skipped") or ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
            if k in ("resnet18_run_loop", "pipeline_alone", "meets_rate", "meets_feed", "identical",
                     "max_abs_difference", "test_accuracy"))
        print(f"{name:12s} {state:8s} {r['seconds_total']:7.1f}  {what}")
    print(f"{report['device']}; {report['seconds']:.0f} s in all; {args.out}")
    return 0 if all(r.get("ok") is not False for r in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
