"""World size and epochs of the default job, chosen on validation accuracy.

Plain script: ``python benchmarks/world_size.py OUT [--spots 100 130] [--epochs 4 6]
[--runs resnet18_seed0 simpler_seed0] [--workers 2]``. For every world size (spots per city)
the data stage is run under ``OUT/spots<n>/``; every listed default parameter file is trained
there at every epoch count (its other settings unchanged, ``train.threads`` as in the file),
``--workers`` trainings side by side. Prints per (run, spots, epochs) the validation accuracy
of the best epoch with its 95% interval (whole spots resampled: views of a spot are not
independent) and, per run and epoch count, the difference between consecutive world sizes
with its interval (the two worlds' spots resampled independently). The test split is never
read. The trained runs stay in ``OUT`` (a rerun reuses them).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from citylib.data import dataset  # noqa: E402
from citylib.nets import checkpoint, infer
from citylib.run import params, pipeline
from citylib.stats import resampling

PARAMETERS = Path(__file__).resolve().parent.parent / "parameters"
N_BOOT = 4000


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--spots", type=int, nargs="+", default=[100, 130])
    p.add_argument("--epochs", type=int, nargs="+", default=[4, 6])
    p.add_argument("--runs", nargs="+", default=["resnet18_seed0", "simpler_seed0"])
    p.add_argument("--workers", type=int, default=2)
    return p


def _config(run: str, spots: int, epochs: int) -> params.RunConfig:
    cfg = params.load(PARAMETERS / f"{run}.yaml")
    world = dataclasses.replace(cfg.data.world, spots_per_city=spots)
    return dataclasses.replace(cfg, name=f"{run}_e{epochs}", data=dataclasses.replace(cfg.data, world=world),
                          train=dataclasses.replace(cfg.train, epochs=epochs))


def _train(task) -> tuple:
    run, spots, epochs, out = task
    r = pipeline.Run(_config(run, spots, epochs), out / f"spots{spots}")
    pipeline.result(r, "training", progress=False)
    cache = pipeline.load_cache(r)
    rows = cache.split_indices("val")
    model, cities, _ = checkpoint.load_model(r.dir)
    pred = infer.predict(model, np.asarray(cache.images[rows])).argmax(1)
    correct = pred == np.asarray(cache.y)[rows]
    return run, spots, epochs, correct, cache.index["group"].to_numpy()[rows]


def main(args) -> None:
    for spots in args.spots:                 # one data stage per world size, before the trainings
        cfg = _config(args.runs[0], spots, args.epochs[0])
        dataset.run(cfg.data, args.out / f"spots{spots}" / "data", progress=False)
    tasks = [(run, spots, epochs, args.out) for spots in args.spots for run in args.runs for epochs in args.epochs]
    with get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(_train, tasks, chunksize=1)
    rows, draws = [], {}
    for i, (run, spots, epochs, correct, groups) in enumerate(results):
        d = resampling.bootstrap_means(correct, groups, N_BOOT, seed=i)
        draws[run, spots, epochs] = d
        lo, hi = np.quantile(d, [0.025, 0.975])
        rows.append({"run": run, "spots": spots, "epochs": epochs, "val_images": len(correct),
                     "val_spots": len(set(groups)), "val_accuracy": correct.mean(), "ci_low": lo, "ci_high": hi})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    diffs = []
    for run in args.runs:
        for epochs in args.epochs:
            for a, b in zip(args.spots, args.spots[1:]):
                d = draws[run, b, epochs] - draws[run, a, epochs]
                acc = {s: next(r["val_accuracy"] for r in rows if (r["run"], r["spots"], r["epochs"]) == (run, s, epochs))
                       for s in (a, b)}
                lo, hi = np.quantile(d, [0.025, 0.975])
                diffs.append({"run": run, "epochs": epochs, "spots": f"{a} -> {b}",
                              "difference": acc[b] - acc[a], "ci_low": lo, "ci_high": hi})
    print()
    print(pd.DataFrame(diffs).to_string(index=False, float_format=lambda x: f"{x:+.3f}"))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
