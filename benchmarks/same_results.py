"""Are two outputs folders the same results? For checking that a change leaves the numbers alone.

Compares, run by run, the columns of ``runs/summary.csv`` (timings and hashes aside), the
weights of ``best.pt`` (``torch.equal`` on every tensor), the Grad-CAM masks and
``r_scores.csv``, and the comparison's ``ar.csv``, ``table2.csv``, ``tests.json`` and
``lift_correlation.csv``, byte for byte. Prints one line per item and exits 1 if any differs.

    python benchmarks/same_results.py BEFORE_OUTPUTS AFTER_OUTPUTS
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

IGNORED = {"notebook_seconds", "config_hash"}   # wall time, and the hash of the whole config
COMPARISON = ("ar.csv", "table2.csv", "tests.json", "lift_correlation.csv")


def compare(before: Path, after: Path) -> list[tuple[str, bool]]:
    rows = []
    a, b = (pd.read_csv(d / "runs" / "summary.csv") for d in (before, after))
    rows.append(("summary.csv runs", list(a["run"]) == list(b["run"])))
    for column in (c for c in a.columns if c not in IGNORED):
        rows.append((f"summary.csv {column}", a[column].equals(b[column])))
    for run in a["run"]:
        wa, wb = (torch.load(d / "runs" / run / "best.pt", weights_only=True)["model"]
                  for d in (before, after))
        rows.append((f"{run} weights", wa.keys() == wb.keys()
                     and all(torch.equal(wa[k], wb[k]) for k in wa)))
        ma, mb = (np.load(d / "runs" / run / "gradcam" / "masks.npy") for d in (before, after))
        rows.append((f"{run} masks", np.array_equal(ma, mb)))
        ra, rb = ((d / "runs" / run / "r_scores.csv").read_bytes() for d in (before, after))
        rows.append((f"{run} r_scores.csv", ra == rb))
    for name in COMPARISON:
        ca, cb = ((d / "comparison" / name).read_bytes() for d in (before, after))
        rows.append((f"comparison/{name}", ca == cb))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    rows = compare(args.before, args.after)
    for name, same in rows:
        print(f"{'same     ' if same else 'DIFFERENT'}  {name}")
    differ = sum(not same for _, same in rows)
    print(f"{len(rows) - differ} same, {differ} different")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
