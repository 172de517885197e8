"""The real-photo chain end to end: the Street View sample photos beside the checkout, the
ADE20K TFLite model, and every notebook (data -> training -> Grad-CAM -> map and gallery ->
statistics -> comparison) through the batch runner, in smoke size. Fails, not skips, when
the shared folder is missing."""
import contextlib
import io
import json
import re
import shutil

import pandas as pd
import pytest

from citylib.core import paths
from citylib.core.paths import PARAMETERS
from citylib.data import segment
from citylib.run import runner

GRID = PARAMETERS / "streetview"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    for needed in (paths.shared() / "samples" / "streetview",
                   paths.ade20k_model_dir() / segment.MODEL_FILE):
        if not needed.exists():
            pytest.fail(f"{needed} is missing: the real-photo chain needs the shared sample photos "
                        "and ADE20K model (set CITYLIB_SHARED or CITYLIB_ADE20K)")
    # the sample photos with two files no one can use beside them, as a real collection has
    root = tmp_path_factory.mktemp("streetview")
    photos, params = root / "photos", root / "params"
    shutil.copytree(paths.shared() / "samples" / "streetview", photos)
    (photos / "london_uk" / "notes.txt").write_text("not a photo")
    some = sorted((photos / "london_on").glob("*.jpg"))[0]     # its pano id, cut off at a third
    (photos / "london_on" / f"{some.stem}_cut_off.jpg").write_bytes(some.read_bytes()[: some.stat().st_size // 3])
    params.mkdir()
    for file in GRID.glob("*.yaml"):
        (params / file.name).write_text(re.sub(r"source: \S+", f"source: {photos}", file.read_text()))
    out = root / "outputs"
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        result = runner.run(params=params, outputs=out)
    print(console.getvalue())
    return out, result, console.getvalue()


def test_every_notebook_runs_on_real_photos(chain):
    out, result, _ = chain
    assert result.ok, result.failed
    manifest = pd.read_csv(out / "data" / "manifest.csv")
    assert len(manifest) == 40                               # every sample photo, nothing else
    assert set(manifest["city"]) == {"london_on", "london_uk"}
    # pano ids parsed from the names: every group is one panorama, in one split only
    assert manifest.groupby("group")["split"].nunique().max() == 1
    assert manifest["group"].str.fullmatch(r"[A-Za-z0-9_-]{22}").all()
    for run in ("simple_seed0", "simpler_seed0"):
        for nb in runner.RUN_NOTEBOOKS:
            assert (out / "runs" / run / nb).exists()
        assert (out / "runs" / run / "gallery.png").exists()
    assert (out / "comparison" / "06_comparison.ipynb").exists()
    ar = pd.read_csv(out / "comparison" / "ar.csv")
    assert "architecture" in set(ar["kind"]) and ar["ar"].between(0, 1).all()


def test_unusable_files_are_listed_and_counted_on_the_console(chain):
    out, _, console = chain
    rejected = pd.read_csv(out / "data" / "rejected.csv")
    why = {row.path.rsplit("/", 1)[1]: row.reason for row in rejected.itertuples()}
    cut = next(name for name in why if name.endswith("_cut_off.jpg"))
    assert set(why) == {"notes.txt", cut}
    assert why[cut].startswith("truncated"), why
    assert f"2 file(s) of the dataset rejected, each with its reason: {out / 'data' / 'rejected.csv'}" in console


def test_r_table_names_real_ade20k_classes(chain):
    out, _, _ = chain
    run = out / "runs" / "simple_seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["objects"]["segmenter"] == "ade20k"
    assert "planted_mrr" not in metrics["objects"]           # photos have no planted cues
    table = pd.read_csv(run / "r_scores.csv")
    assert list(table.columns[:8]) == ["city", "object", "pixels", "R", "coverage", "lift",
                                       "lift_ci_low", "lift_ci_high"]
    # what the model finds in street photos, by ADE20K's own names
    assert {"sky", "road", "building"} <= set(table["object"])
    assert table["R"].between(0, 1).all() and (table["pixels"] > 0).all()


def test_reliance_on_real_photos_is_a_well_formed_table_with_its_examples(chain):
    """Object removal where nothing can be re-rendered: reliance.csv names real ADE20K classes,
    every number in its place (intervals around their means), the example gallery drawn; no
    calibration without a generator."""
    out, _, _ = chain
    run = out / "runs" / "simple_seed0"
    table = pd.read_csv(run / "reliance.csv")
    assert list(table.columns[:8]) == ["city", "object", "n", "groups", "share", "effect", "ci_low", "ci_high"]
    assert {"null_effect", "adjusted", "adjusted_ci_low", "adjusted_ci_high", "null_cover", "rank"} <= set(table.columns)
    assert set(table["city"]) == {"london_on", "london_uk"} and {"sky", "road", "building"} <= set(table["object"])
    for m, lo, hi in (("effect", "ci_low", "ci_high"), ("null_effect", "null_ci_low", "null_ci_high"),
                      ("adjusted", "adjusted_ci_low", "adjusted_ci_high")):
        assert ((table[lo] <= table[m] + 1e-12) & (table[m] <= table[hi] + 1e-12)).all(), m
    assert table["share"].between(0.01, 1).all() and (table["n"] >= 1).all()
    assert (table.groupby("city")["rank"].min() == 1).all()
    images = pd.read_csv(run / "reliance_images.csv")
    assert len(images) == table["n"].sum()
    for figure in ("reliance.png", "removal_examples.png"):
        assert (run / figure).stat().st_size > 10_000
    assert not (run / "calibration.csv").exists()
    # which explanation to trust on these photos: every method and layer scored against removal
    assert not (run / "methods.csv").exists()
    visible = json.loads((run / "methods_removal.json").read_text())
    assert visible["reference"] == "removal" and set(visible["scores"]) >= {"gradcam", "hirescam"}
    scored = pd.read_csv(run / "methods_removal.csv")
    assert {"method", "layer", "city", "object", "lift_rank", "effect"} <= set(scored.columns)
    assert json.loads((run / "metrics.json").read_text())["reliance"]["segmenter"] == "ade20k"


def test_real_photos_are_placed_by_their_names_on_a_map_and_in_geojson(chain):
    out, result, _ = chain
    manifest = pd.read_csv(out / "data" / "manifest.csv", dtype={"date": str})
    for row in manifest.itertuples():        # <pano>_<lat>_<lon>_<yyyymm>_..., 'p' the decimal point
        m = re.search(r"_(-?\d+)p(\d+)_(-?\d+)p(\d+)_(\d{4})(\d{2})_", row.path.rsplit("/", 1)[-1])
        assert (row.lat, row.lon, row.date) == (float(f"{m[1]}.{m[2]}"), float(f"{m[3]}.{m[4]}"), f"{m[5]}-{m[6]}")
    test = manifest[manifest["split"] == "test"].set_index("path")
    for run in ("simple_seed0", "simpler_seed0"):
        doc = json.loads((out / "runs" / run / "places.geojson").read_text())
        assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(test)
        for feature in doc["features"]:
            where = test.loc[feature["properties"]["path"]]
            assert feature["geometry"] == {"type": "Point", "coordinates": [where["lon"], where["lat"]]}
            assert feature["properties"]["city"] == where["city"] and 0 <= feature["properties"]["p_true"] <= 1
        assert (out / "runs" / run / "places.png").stat().st_size > 10_000
