"""Time `citylib.synth.run` on the default world (default SynthConfig) with 2 and 1 workers.

Plain script: ``python benchmarks/bench_synth.py``. Writes into a temporary folder that it
removes afterwards; prints a small table. Target: the default world in <= 60 s with 2 workers.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from citylib.world import synth  # noqa: E402

TARGET_S = 60.0


def main() -> None:
    cfg = synth.SynthConfig()
    rows = []
    for workers in (2, 1):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            manifest = synth.run(cfg, Path(tmp) / "world", workers=workers)
            seconds = time.perf_counter() - start
            images = len(pd.read_csv(manifest))
        rows.append({"workers": workers, "images": images, "seconds": round(seconds, 1),
                     "images/s": round(images / seconds, 1)})
    table = pd.DataFrame(rows)
    table["vs 1 worker"] = (table["seconds"].iloc[-1] / table["seconds"]).round(2)
    table["target"] = [f"<= {TARGET_S:.0f} s: {'ok' if s <= TARGET_S else 'MISSED'}" if w == 2 else "baseline"
                       for w, s in zip(table["workers"], table["seconds"])]
    print(f"synth.run, default world: {cfg}")
    print(table.to_string(index=False))


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    main()
