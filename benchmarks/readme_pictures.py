"""The README's three pictures, made from a finished default job's outputs folder.

Plain script: ``python benchmarks/readme_pictures.py OUTPUTS [--out docs/img] [--run vgg11_seed0]``.
Writes small files for the README: ``explanation.jpg`` (the paper's Fig. 2 for one test image
per city of ``--run``), ``gallery.jpg`` (that run's gallery of explanations, Fig. 4, scaled
down) and ``reliance.png`` (every run's reliance on every planted cue, with intervals). It
recomputes nothing: it reads the masks, images and tables the job wrote.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from citylib.data import imagecache  # noqa: E402
from citylib.figures import causal_plots, gradcam_plots  # noqa: E402
from citylib.stages import ar_tables, gradcam  # noqa: E402


def explanation(out: Path, run: str, target: Path) -> Path:
    """Fig. 2 for the first correctly predicted test image of each city."""
    cams = gradcam.load(out / "runs" / run)
    cache = imagecache.load_cache(next((out / "data" / "cache").glob("*/")))
    index = cams.index.reset_index(drop=True)
    picks = [int(index[(index["city"] == c) & index["correct"].astype(bool)].index[0]) for c in cams.meta["cities"]]
    rows = index["index"].to_numpy()[picks]
    fig = gradcam_plots.plot_fig2([imagecache.full_view(cache, int(r)) for r in rows], cams.masks[picks],
                                  cams.threshold, [f"{index.loc[p, 'city']}" for p in picks])
    fig.savefig(target, dpi=72, bbox_inches="tight", pil_kwargs={"quality": 85})
    plt.close(fig)
    return target


def gallery(out: Path, run: str, target: Path, width: int = 760) -> Path:
    """The run's gallery (Fig. 4), scaled to ``width`` pixels, as a JPEG."""
    with Image.open(out / "runs" / run / "gallery.png") as im:
        im = im.convert("RGB")
        im.resize((width, round(im.height * width / im.width)), Image.LANCZOS).save(target, quality=82)
    return target


def reliance(out: Path, target: Path) -> Path:
    """Every finished run's causal effects, one dot per run and cue."""
    summary = pd.read_csv(out / "runs" / "summary.csv")
    done = summary[[(out / "runs" / r / "causal.csv").is_file() for r in summary["run"]]]
    tables = {r: pd.read_csv(out / "runs" / r / "causal.csv") for r in done["run"]}
    names = {r: ar_tables.NAMES.get(a, a) for r, a in zip(done["run"], done["arch"])}
    fig = causal_plots.plot_reliance(tables, names)
    fig.savefig(target, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", type=Path, help="a finished default job's outputs folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "img")
    parser.add_argument("--run", default="vgg11_seed0", help="the run whose explanations are shown")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for made in (explanation(args.outputs, args.run, args.out / "explanation.jpg"),
                 gallery(args.outputs, args.run, args.out / "gallery.jpg"),
                 reliance(args.outputs, args.out / "reliance.png")):
        print(f"{made} ({made.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
