"""Ground truth for the places maps: a generated world whose spots lie on a city plan, with a
district where one planted cue is rare. A network trained on it must find that district's
streets less typical of their city than the rest, and the per-object map must put that cue's
reliance outside the district."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from citylib.core.config import ConfigError
from citylib.core.paths import WORLDS
from citylib.data import dataset, places, segment
from citylib.nets import train
from citylib.stages import places as stage
from citylib.stages import reliance
from citylib.stats import resampling
from citylib.world import synth, worldfile


def _district_world(tmp_path, **district) -> str:
    raw = yaml.safe_load((WORLDS / "default.yaml").read_text())
    raw["cities"]["treeville"]["plan"] = {"district": {"cues": ["tree"], "centre_km": [0.0, 0.0],
                                                        "radius_km": 0.85, "keep": 0.0, **district}}
    path = tmp_path / "district.yaml"
    path.write_text(yaml.safe_dump({"extends": "default", "cities": raw["cities"]}))
    return str(path)


def test_spots_lie_on_their_citys_plan_and_the_district_takes_its_cue(tmp_path):
    world = worldfile.load_world(_district_world(tmp_path, keep=0.25))
    plan = world.plans["treeville"]
    spots = [synth.place(world, "treeville", s) for s in range(400)]
    xy = np.array([[p["east_m"], p["north_m"]] for p in spots])
    assert np.abs(xy).max() <= 1500 and np.abs(xy).max() > 1400                   # a 3 km square
    lat = np.array([p["lat"] for p in spots])
    lon = np.array([p["lon"] for p in spots])
    assert np.allclose(places.metres(lat, lon) - places.metres(lat, lon).mean(0), xy - xy.mean(0), atol=2)
    inside = np.array([p["district"] for p in spots])
    assert np.array_equal(inside, np.hypot(*xy.T) < 850)
    dropped = np.array([bool(p["dropped"]) for p in spots])
    assert not dropped[~inside].any() and 0.6 < dropped[inside].mean() < 0.9        # keep 0.25
    assert plan.centre == worldfile.made_up_centre("treeville")
    # a spot the district takes the trees from is drawn as the tree's counterfactual
    spot = int(np.flatnonzero(dropped)[0])
    drawn = synth.render_spot(world, "treeville", spot, views=1, size=32)[0]["image"]
    assert np.array_equal(drawn, synth.render_spot(world, "treeville", spot, views=1, size=32, reset=("tree",))[0]["image"])
    with pytest.raises(ConfigError, match=r"'plan.district.cues' = \['signboard'\]: not planted in treeville"):
        worldfile.load_world(_district_world(tmp_path, cues=["signboard"]))


def test_the_typicality_map_finds_the_district_where_a_cue_is_rare(tmp_path):
    cfg = dataset.DataConfig(world=synth.SynthConfig(world=_district_world(tmp_path), spots_per_city=80, views=4, size=64),
                             image_size=64, cue_free_spots=0, deletion_spots=0, split=(3, 1, 2))
    data = dataset.run(cfg, tmp_path / "data", progress=False)
    assert {"lat", "lon"} <= set(data.manifest.columns)
    cache = dataset.load(cfg, tmp_path / "data")
    train.run(train.TrainConfig(epochs=4, batch_size=16, lr=3e-4), tmp_path / "run", cache, arch="simple",
              seed=0, name="run", progress=False)
    reliance.run(reliance.RelianceConfig(device="cpu", n_boot=200), tmp_path / "run", cache,
                 segment_cfg=segment.SegmentConfig(), segment_dir=tmp_path / "segment", progress=False)
    removals = pd.read_csv(tmp_path / "run" / "reliance_images.csv")
    table = stage.typicality(pd.read_csv(tmp_path / "run" / "predictions.csv"), data.manifest, removals)
    world = worldfile.load_world(cfg.world.world)
    city = table[table["city"] == "treeville"]
    inside = np.array([synth.place(world, "treeville", int(g.rsplit("_", 1)[1]))["district"] for g in city["group"]])
    district = resampling.bootstrap_interval(city["p_true"][inside], city["group"][inside], 2000)
    rest = resampling.bootstrap_interval(city["p_true"][~inside], city["group"][~inside], 2000)
    assert inside.sum() >= 20 and district[2] < rest[1], (district, rest)      # its interval below the rest's
    # the per-object map: treeville's trees, its strongest object, matter outside the district
    objects = stage.object_changes(table, removals)
    trees = objects[(objects["city"] == "treeville") & (objects["object"] == "tree")]
    assert trees["rank"].iloc[0] == 1
    in_district = trees["index"].isin(city["index"][inside]).to_numpy()
    outside = resampling.bootstrap_interval(trees["effect"][~in_district], trees["group"][~in_district], 2000)
    assert outside[2] < 0, outside
    # the district's views lose their trees: few of them have trees to remove, and those matter less
    assert in_district.sum() < 0.5 * inside.sum(), (in_district.sum(), inside.sum())
    if in_district.sum():
        assert trees["effect"][in_district].mean() > outside[0]
