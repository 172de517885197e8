"""Places, shown and checked end to end: the README's map and its split table.

Plain script: ``python benchmarks/places_demo.py [--out DIR] [--figure docs/img/places.jpg]``.

1. A generated world whose city ``treeville`` has a district with no street trees (its planted
   cue; ``plan.district``, keep 0) runs through ``citylib run`` (Simple, 64 px, 130 spots x 4
   views per city, split 3:1:2 so that enough test spots fall in the district). Prints
   treeville's typicality inside and outside the district (mean p(true city) with a 95%
   interval over spots), the share of its test views whose top object is the tree, and what
   removing the trees does to the views they were removed from (the per-object map's numbers:
   the mean change in log p(true city) with its interval, the decisions turned wrong); copies
   the run's ``places.png`` to ``--figure`` and ``places_objects.png`` beside it as
   ``<figure>_objects.jpg`` (``.jpg``: 1,200 px wide).
2. The Street View sample photos beside the checkout (``../shared/samples/streetview``), split by
   panorama and by block (``data.split_by: block``, 50 m), each trained as
   ``parameters/streetview/simple_seed0.yaml`` trains: per split, the share of test photos with a
   training photo within 50 m, the median distance to the nearest one, and test accuracy with a
   95% interval over panoramas.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from citylib.core import paths  # noqa: E402
from citylib.core.paths import WORLDS  # noqa: E402
from citylib.data import dataset, places  # noqa: E402
from citylib.nets import train  # noqa: E402
from citylib.run import runner  # noqa: E402
from citylib.stats import resampling  # noqa: E402
from citylib.world import synth, worldfile  # noqa: E402


def district_job(out: Path, figure: Path | None) -> None:
    raw = yaml.safe_load((WORLDS / "default.yaml").read_text())
    raw["cities"]["treeville"]["plan"] = {"district": {"cues": ["tree"], "centre_km": [0.4, -0.3],
                                                        "radius_km": 0.85, "keep": 0.0}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "district.yaml").write_text(yaml.safe_dump({"extends": "default", "cities": raw["cities"]}))
    params = out / "params"
    params.mkdir(exist_ok=True)
    (params / "simple_seed0.yaml").write_text(yaml.safe_dump({
        "arch": "simple", "seed": 0,
        "data": {"world": {"world": str(out / "district.yaml"), "spots_per_city": 130, "views": 4, "size": 64},
                 "image_size": 64, "split": [3, 1, 2], "cue_free_spots": 0, "deletion_spots": 0},
        "train": {"epochs": 4, "lr": 3.0e-4}}))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = runner.run(params=params, outputs=out / "outputs")
    if not result.ok:
        raise SystemExit(f"the district job failed: {result.failed}")
    run = out / "outputs" / "runs" / "simple_seed0"
    table = pd.read_csv(run / "places.csv", keep_default_na=False, na_values=[""])
    world = worldfile.load_world(str(out / "district.yaml"))
    city = table[table["city"] == "treeville"].reset_index(drop=True)
    inside = np.array([synth.place(world, "treeville", int(g.rsplit("_", 1)[1]))["district"] for g in city["group"]])
    print(f"district job: {time.perf_counter() - t0:.0f} s; treeville test views: {len(city)} "
          f"({inside.sum()} in the district)")
    # the per-object map's numbers: where removing the trees changes treeville's decisions
    objects = pd.read_csv(run / "places_objects.csv", keep_default_na=False, na_values=[""])
    trees = objects[(objects["city"] == "treeville") & (objects["object"] == "tree")]
    in_trees = trees["index"].isin(city.loc[inside, "index"]).to_numpy()
    print("| treeville | views | spots | typicality [95% CI] | top object tree | views with trees removed "
          "| change in log p [95% CI] | turned wrong |\n|---|---|---|---|---|---|---|---|")
    for name, sel, tsel in (("in the district", inside, in_trees), ("elsewhere", ~inside, ~in_trees)):
        mean, lo, hi = resampling.bootstrap_interval(city["p_true"][sel], city["group"][sel], 2000)
        top = (city["top_object"][sel] == "tree").mean()
        t = trees[tsel]
        effect = "—"
        if len(t):
            m, low, high = resampling.bootstrap_interval(t["effect"], t["group"], 2000)
            effect = f"{m:+.2f} [{low:+.2f}, {high:+.2f}]"
        print(f"| {name} | {sel.sum()} | {city['group'][sel].nunique()} | {mean:.2f} [{lo:.2f}, {hi:.2f}] | {top:.0%} "
              f"| {len(t)} | {effect} | {int(t['flipped'].astype(bool).sum())} |")
    if figure is not None:            # a .jpg: 1,200 px wide, for the README
        if figure.suffix.lower() in (".jpg", ".jpeg"):
            from PIL import Image
            for name, target in (("places", figure), ("places_objects", figure.with_name(figure.stem + "_objects.jpg"))):
                with Image.open(run / f"{name}.png") as im:
                    im = im.convert("RGB")
                    im.resize((1200, round(im.height * 1200 / im.width)), Image.LANCZOS).save(target, quality=85)
                print(f"map: {target}")
        else:
            shutil.copyfile(run / "places.png", figure)
            print(f"map: {figure}")


def split_table(out: Path) -> None:
    photos = paths.shared() / "samples" / "streetview"
    print("\n| split | test photos | with a training photo within 50 m | median nearest (m) | test accuracy [95% CI] |")
    print("|---|---|---|---|---|")
    for split_by in ("group", "block"):
        cfg = dataset.DataConfig(source=str(photos), group_pattern="streetview", place_pattern="streetview",
                                 image_size=64, split_by=split_by, block_m=50.0)
        data = dataset.run(cfg, out / f"photos_{split_by}" / "data", progress=False)
        m = data.manifest.assign(lat=lambda t: t["lat"].astype(float), lon=lambda t: t["lon"].astype(float))
        nearest = []
        for city, part in m.groupby("city"):
            tr, te = part[part["split"] == "train"], part[part["split"] == "test"]
            for r in te.itertuples():
                d = places.metres(np.r_[r.lat, tr["lat"]], np.r_[r.lon, tr["lon"]], (r.lat, r.lon))[1:]
                nearest.append(np.hypot(*d.T).min())
        nearest = np.array(nearest)
        cache = dataset.load(cfg, out / f"photos_{split_by}" / "data")
        res = train.run(train.TrainConfig(epochs=2, batch_size=8), out / f"photos_{split_by}" / "run", cache,
                        arch="simple", seed=0, name=split_by, progress=False)
        pred = pd.read_csv(out / f"photos_{split_by}" / "run" / "predictions.csv")
        groups = m.set_index("path").loc[pred["path"], "group"].to_numpy()
        mean, lo, hi = resampling.bootstrap_interval(pred["correct"].astype(float), groups, 2000)
        name = "by panorama" if split_by == "group" else "by block, 50 m"
        print(f"| {name} | {len(nearest)} | {(nearest < 50).mean():.0%} | {np.median(nearest):.0f} | "
              f"{res.metrics['test_accuracy']:.2f} [{lo:.2f}, {hi:.2f}] |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/citylib-places-demo"))
    ap.add_argument("--figure", type=Path, default=None, help="copy the district run's map here")
    args = ap.parse_args()
    district_job(args.out, args.figure)
    split_table(args.out)


if __name__ == "__main__":
    main()
