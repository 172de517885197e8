"""Benchmark: the paper-scale profile's time per stage, from two cut-down runs, extended to full size.

Writes the seed-0 files of ``parameters/paper/`` cut to each of ``--spots`` spots per city and
one epoch into ``OUT/params_<spots>/``, runs each with ``citylib run --jobs 1`` into
``OUT/outputs_<spots>/`` (reused where done), and prints per architecture: the epoch's time
(``history.csv``) at both sizes, training at the profile's size and epochs (the larger size's
epoch x profile spots / spots x profile epochs: an epoch is linear in the images), and each
other notebook's time (the runner's ``.results/<notebook>.json``) at both sizes and extended
to the profile's spots along the line through the two. Single runs; a line through two
points, not a measurement at full size.

    python benchmarks/profile_stages.py OUT [--spots 50 100] [--report-only]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_device import _cpu  # noqa: E402  (the CPU's model name, as the device benchmark prints it)
ARCHS = ("resnet18", "simple", "simpler", "vgg11")
NOTEBOOKS = ("03_gradcam", "04_embedding", "05_objects")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for the cut parameter files and their outputs")
    p.add_argument("--spots", type=int, nargs=2, default=[50, 100], help="two cut sizes, spots per city")
    p.add_argument("--report-only", action="store_true", help="read finished outputs; run nothing")
    return p


def cut(out: Path, spots: int) -> tuple[Path, dict]:
    """The profile's seed-0 files at ``spots`` spots per city and one epoch; the full profile's file."""
    folder = out / f"params_{spots}"
    folder.mkdir(parents=True, exist_ok=True)
    for arch in ARCHS:
        full = yaml.safe_load((ROOT / "parameters" / "paper" / f"{arch}_seed0.yaml").read_text())
        small = json.loads(json.dumps(full))
        small["data"]["world"]["spots_per_city"] = spots
        small["train"]["epochs"] = 1
        (folder / f"{arch}_seed0.yaml").write_text(yaml.safe_dump(small, sort_keys=False))
    return folder, full


def seconds(outputs: Path) -> dict:
    read = lambda p: float(json.loads(p.read_text())["seconds"])  # noqa: E731
    got = {"01_data": read(outputs / "data" / ".results" / "01_data.json"),
           "06_comparison": read(outputs / "comparison" / ".results" / "06_comparison.json")}
    for arch in ARCHS:
        run = outputs / "runs" / f"{arch}_seed0"
        for nb in NOTEBOOKS:
            got[arch, nb] = read(run / ".results" / f"{nb}.json")
        got[arch, "epoch"] = float(list(csv.DictReader(open(run / "history.csv")))[-1]["seconds"])
    return got


def main(args) -> None:
    (a, b), measured = args.spots, []
    for spots in (a, b):
        folder, full = cut(args.out, spots)
        outputs = args.out / f"outputs_{spots}"
        if not args.report_only:
            subprocess.run([sys.executable, "-m", "citylib", "run", "--params", str(folder), "--outputs",
                            str(outputs), "--jobs", "1"], check=True, cwd=ROOT)
        measured.append(seconds(outputs))
    spots, epochs = full["data"]["world"]["spots_per_city"], full["train"]["epochs"]
    line = lambda k: measured[1][k] + (measured[1][k] - measured[0][k]) / (b - a) * (spots - b)  # noqa: E731
    print(f"paper profile per stage: {spots} spots per city, {epochs} epochs; measured at {a} and {b} spots, "
          f"1 epoch; CPU: {_cpu()}, {os.cpu_count()} cores")
    print(f"{'stage':<34}" + "".join(f"{arch:>22}" for arch in ARCHS))
    print(f"{'epoch s, ' + str(a) + ' / ' + str(b) + ' spots':<34}"
          + "".join(f"{measured[0][x, 'epoch']:>12.1f} / {measured[1][x, 'epoch']:>7.1f}" for x in ARCHS))
    print(f"{'training h, full size':<34}"
          + "".join(f"{measured[1][x, 'epoch'] * spots / b * epochs / 3600:>22.1f}" for x in ARCHS))
    for nb in NOTEBOOKS:
        print(f"{nb + ' s: ' + str(b) + ' spots -> full':<34}"
              + "".join(f"{measured[1][x, nb]:>12.1f} -> {line((x, nb)):>6.0f}" for x in ARCHS))
    for nb in ("01_data", "06_comparison"):
        print(f"{nb} s, once: {measured[0][nb]:.1f} ({a} spots), {measured[1][nb]:.1f} ({b}) -> {line(nb):.0f} (full)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
