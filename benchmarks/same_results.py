"""Are two outputs folders the same results? For checking that a change leaves the numbers alone.

Compares every CSV and every array (``.npy``, ``.npz``) the job wrote, and the weights of each
run's ``best.pt`` (``torch.equal`` on every tensor). Files are matched by their path inside the
outputs folder, with the content keys in folder names (``data/cache/<key>/``) matched as one: a
key holds the code's hash, so a change of code gives new folder names for the same contents.
CSVs are compared as text, cell by cell and column by column (whatever their order), with the timing columns (``seconds``,
``notebook_seconds``) and the config's hash left out, and each folder's own absolute path read
as ``<outputs>`` and key folders inside paths as ``<key>`` (the paths of the images it made). Prints one line per file and exits 1 if any
differs or is missing on one side.

    python benchmarks/same_results.py BEFORE_OUTPUTS AFTER_OUTPUTS
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

IGNORED = {"seconds", "notebook_seconds", "config_hash"}   # wall time, and the hash of the whole config
KEY = re.compile(r"^[0-9a-f]{12,16}$")                       # a content key as a folder name
KEY_IN_PATH = re.compile(r"/[0-9a-f]{12,16}/")
KINDS = ("*.csv", "*.npy", "*.npz", "best.pt")


def files(root: Path) -> dict[str, Path]:
    """Path inside ``root`` with key folders as ``<key>`` -> the file, for every compared kind."""
    out = {}
    for pattern in KINDS:
        for f in sorted(root.rglob(pattern)):
            rel = f.relative_to(root)
            if "checkpoints" in rel.parts or any(p.startswith(".") for p in rel.parts):
                continue
            out["/".join("<key>" if KEY.match(p) else p for p in rel.parts)] = f
    return out


def same_csv(a: Path, b: Path, roots: tuple[Path, Path]) -> bool:
    frames = []
    for f, root in zip((a, b), roots):
        try:
            frame = pd.read_csv(f, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            frame = pd.DataFrame()
        frame = frame.drop(columns=[c for c in frame.columns if c in IGNORED])
        here = str(root.resolve())
        frame = frame.map(lambda v: KEY_IN_PATH.sub("/<key>/", v.replace(here, "<outputs>")))
        frames.append(frame[sorted(frame.columns)])     # the same columns in another order are the same table
    return frames[0].equals(frames[1])


def same_arrays(a: Path, b: Path) -> bool:
    if a.suffix == ".npy":
        return np.array_equal(np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r"))
    with np.load(a) as x, np.load(b) as y:
        return sorted(x.files) == sorted(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = (torch.load(f, weights_only=True)["model"] for f in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def compare(before: Path, after: Path) -> list[tuple[str, bool]]:
    fa, fb = files(before), files(after)
    rows = [(f"{name} (only in {'before' if name in fa else 'after'})", False) for name in sorted(fa.keys() ^ fb.keys())]
    for name in sorted(fa.keys() & fb.keys()):
        a, b = fa[name], fb[name]
        if a.suffix == ".csv":
            same = same_csv(a, b, (before, after))
        elif a.suffix == ".pt":
            same = same_weights(a, b)
        else:
            same = same_arrays(a, b)
        rows.append((name, same))
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
