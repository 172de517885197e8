"""Cue-free accuracy of trained runs on many fresh spots: far more than the job's own check.

Plain script: ``python benchmarks/cue_free_fresh.py OUTPUTS [RUN ...] [--start 5000]
[--spots 2000]``. Renders spots ``start`` .. ``start + spots - 1`` of every city of the default
world in the base style (``reset="cue-free"``; spots no data stage of the default size uses),
every view, through the cache's JPEG and resizing, and prints each run's accuracy on them, the
95% range of its accuracy with the spots' cities permuted (``causal.cue_free``: views of a spot
keep one city), the permutation p-value, and how often it predicts each city. The job's own
check (``causal.json``) pools the test spots and ``data.cue_free_spots`` fresh spots per city,
one sample shared by every run; this one says whether a small excess there is the sample's or
the world's. Writes nothing.
"""
from __future__ import annotations

import sys
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from citylib.data import counterfactual  # noqa: E402
from citylib.nets import checkpoint, infer
from citylib.stages import causal
from citylib.world import synth, worldfile

WORLD, CFG = worldfile.load_world("default"), synth.SynthConfig()


def _views(task):
    city, spot = task
    return counterfactual.cached_views(WORLD, CFG, 64, city, spot, list(range(CFG.views)), worldfile.CUE_FREE)


def main(outputs: str, runs: list[str], start: int, spots: int) -> None:
    cities = sorted(WORLD.styles)
    tasks = [(c, s) for c in cities for s in range(start, start + spots)]
    with Pool(2) as pool:
        images = np.stack([v for views in pool.map(_views, tasks, chunksize=16) for v in views])   # (N, 64, 64, 3)
    y = np.repeat([cities.index(c) for c, _ in tasks], CFG.views)
    runs = runs or sorted(p.name for p in (Path(outputs) / "runs").glob("*/") if (p / "best.pt").is_file())
    print(f"{len(images)} cue-free images of {len(tasks)} spots; chance {1 / len(cities):.3f}")
    print(f"{'run':<16} {'accuracy':>8}  {'permuted 95%':<16} {'p':>6}  predicted per city")
    groups = np.repeat([f"{c}_{s}" for c, s in tasks], CFG.views)
    for run in runs:
        model, _, _ = checkpoint.load_model(Path(outputs) / "runs" / run)
        pred = infer.predict(model, images).argmax(1)
        frame = pd.DataFrame({"group": groups, "city": np.asarray(cities)[y],
                              "predicted": np.asarray(cities)[pred], "correct": pred == y})
        c = causal.cue_free(frame, len(cities))
        lo, hi = c["interval"]
        print(f"{run:<16} {c['accuracy']:>8.3f}  [{lo:.3f}, {hi:.3f}]   {c['p']:>6.3f}  "
              f"{np.bincount(pred, minlength=len(cities)).tolist()}")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outputs")
    p.add_argument("runs", nargs="*")
    p.add_argument("--start", type=int, default=5000)
    p.add_argument("--spots", type=int, default=2000, help="fresh spots per city")
    a = p.parse_args()
    main(a.outputs, a.runs, a.start, a.spots)
