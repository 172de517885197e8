"""Coordinates and dates: read from manifests and file names, checked, and the blocked split."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from citylib.data import dataset, places
from citylib.data.streetview import geosample
from citylib.data.splits import split_groups


haversine_m = geosample.distance_m     # great-circle metres: the reference the projection is checked against


def test_coordinates_and_dates_from_names_and_columns_with_every_bad_value_listed():
    records = pd.DataFrame({
        "path": ["/d/a/0m6IWUqwa6_43p16007_-81p24235_201308_summer_sharp.jpg",    # from the name
                 "/d/a/pano_x_-33p86000_151p21000_202401_summer.jpg",              # south of the equator
                 "/d/a/given_10p0_10p0_201001_x.jpg",                              # the columns win
                 "/d/a/bad_95p00000_10p00000_201313_x.jpg",                        # lat and month out of range
                 "/d/a/plain.jpg"],                                                # nothing to read
        "lat": ["", "", "51.5", "", ""], "lon": ["", "", "-0.12", "", "east"], "date": ["", "", "2020-02-29", "", ""],
    })
    out, problems = places.read(records, places.check_pattern("streetview"))
    assert out["lat"].tolist()[:3] == [43.16007, -33.86, 51.5] and out["lon"].tolist()[:3] == [-81.24235, 151.21, -0.12]
    assert out["date"].tolist() == ["2013-08", "2024-01", "2020-02-29", "", ""]
    assert np.isnan(out["lat"].iloc[3]) and np.isnan(out["lon"].iloc[4])
    assert out["lon"].iloc[3] == 10.0                                     # one bad value loses only itself
    said = {(p.split("/")[-1][:4], c): (v, r) for p, c, v, r in problems.itertuples(index=False)}
    assert said == {("bad_", "lat"): ("95.00000", "out of range [-90, 90]"),
                    ("bad_", "date"): ("201313", "not a date (month 1-12, year 1900-2100)"),
                    ("plai", "lon"): ("east", "not a number")}
    assert places.read(records.assign(date=["", "", "2021-02-29", "", ""]), None)[1]["reason"].tolist() == [
        "not a date (no such day)", "not a number"]
    with pytest.raises(ValueError, match=r"no named group\(s\) \['lon'\]"):
        places.check_pattern(r"(?P<lat>\d+)")


def test_seasons_by_month_and_hemisphere():
    north = [places.season(f"2020-{m:02d}", 52.0) for m in range(1, 13)]
    assert north == ["winter"] * 2 + ["spring"] * 3 + ["summer"] * 3 + ["autumn"] * 3 + ["winter"]
    assert [places.season(d, -33.9) for d in ("2020-01", "2020-04", "2020-07", "2020-10-15")] == [
        "summer", "autumn", "winter", "spring"]
    assert places.season("", 10.0) == ""


def test_the_local_projection_keeps_distances_across_a_city():
    rng = np.random.default_rng(0)
    for lat0, lon0 in ((51.5, -0.1), (-33.9, 151.2), (64.1, -21.9), (0.0, 179.99)):   # antimeridian too
        lat = lat0 + rng.uniform(-0.12, 0.12, 60)
        lon = lon0 + rng.uniform(-0.12, 0.12, 60)
        xy = places.metres(lat, lon)
        i, j = np.triu_indices(60, 1)
        planar = np.hypot(*(xy[i] - xy[j]).T)
        assert np.allclose(planar, haversine_m(lat[i], lon[i], lat[j], lon[j]), rtol=5e-3)   # 0.12 degrees either way (27 km): within 0.5%


def _street(rng, city, n, lat0, lon0):
    """Points along a few streets: runs of panoramas 15-40 m apart, as Street View takes them."""
    rows, k = [], 0
    while len(rows) < n:
        lat, lon = lat0 + rng.uniform(-0.03, 0.03), lon0 + rng.uniform(-0.03, 0.03)
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(rng.integers(1, 6)):
            rows.append({"city": city, "group": f"{city}{k}", "lat": lat, "lon": lon})
            k += 1
            step = rng.uniform(15, 40) / places.EARTH_RADIUS_M
            lat += np.degrees(step * np.sin(heading))
            lon += np.degrees(step * np.cos(heading) / np.cos(np.radians(lat)))
    return rows[:n]


@pytest.mark.parametrize("block_m", [50.0, 200.0])
def test_the_blocked_split_leaves_no_close_pair_across_splits(block_m):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(_street(rng, "a", 300, 51.5, -0.1) + _street(rng, "b", 300, 48.85, 2.35))
    cross_close = {}
    for name, units in (("group", frame["group"]), ("block", places.clusters(frame, block_m))):
        split = split_groups(frame.assign(group=units), seed=0).to_numpy()
        close = 0
        for city, rows in frame.groupby("city"):
            r = rows.index.to_numpy()
            i, j = np.triu_indices(len(r), 1)
            d = haversine_m(frame["lat"].to_numpy()[r[i]], frame["lon"].to_numpy()[r[i]],
                            frame["lat"].to_numpy()[r[j]], frame["lon"].to_numpy()[r[j]])
            close += int(((d < block_m) & (split[r[i]] != split[r[j]])).sum())
        cross_close[name] = close
        assert set(split) == {"train", "val", "test"}
    assert cross_close["group"] > 0 and cross_close["block"] == 0        # the panorama split leaks


def test_the_data_stage_reads_places_and_splits_by_block(tmp_path):
    rng = np.random.default_rng(2)
    rows = []
    for spot in _street(rng, "oslo", 24, 59.91, 10.75) + _street(rng, "rome", 24, 41.9, 12.5):
        path = tmp_path / "img" / spot["city"] / f"{spot['group']}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        rows.append({"path": str(path), "city": spot["city"], "lat": f"{spot['lat']:.6f}",
                     "lon": f"{spot['lon']:.6f}", "date": "2019-07"})
    rows[0]["lat"], rows[1]["lat"] = "", "north"                    # two images cannot be placed
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    cfg = dataset.DataConfig(source=str(tmp_path / "manifest.csv"), image_size=16, split_by="block", block_m=150)
    res = dataset.run(cfg, tmp_path / "out" / "data", progress=False)
    m = res.manifest
    assert {"lat", "lon", "date", "block"} <= set(m.columns) and len(m) == 46
    rejected = res.rejected.set_index("path")["reason"]
    assert rejected[rows[0]["path"]].startswith("no coordinates") and rejected[rows[1]["path"]].startswith("no coordinates")
    problems = pd.read_csv(tmp_path / "out" / "data" / "place_problems.csv", dtype=str)
    assert problems[["column", "value", "reason"]].values.tolist() == [["lat", "north", "not a number"]]
    lat, lon = m["lat"].astype(float).to_numpy(), m["lon"].astype(float).to_numpy()
    i, j = np.triu_indices(len(m), 1)
    same_city = m["city"].to_numpy()[i] == m["city"].to_numpy()[j]
    apart = m["split"].to_numpy()[i] != m["split"].to_numpy()[j]
    assert not (same_city & apart & (haversine_m(lat[i], lon[i], lat[j], lon[j]) < 150)).any()
    with pytest.raises(ValueError, match=r"'split_by' = 'blocks' must be one of \['group', 'block'\]"):
        dataset.DataConfig(split_by="blocks")
    # a corrected coordinate in the manifest, no image touched: a new snapshot that holds it
    rows[5]["lat"] = f"{float(rows[5]['lat']) + 0.001:.6f}"
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    again = dataset.run(cfg, tmp_path / "out" / "data", progress=False)
    assert not again.reused
    assert again.manifest.set_index("path").loc[rows[5]["path"], "lat"] == rows[5]["lat"]


def _predictions():
    """Four test images of two cities, the first two dated in the north, the last in the south."""
    return pd.DataFrame({
        "index": [10, 11, 12, 13], "path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
        "city": ["oslo", "oslo", "rome", "rome"], "predicted": ["oslo", "rome", "rome", "rome"],
        "correct": [True, False, True, True],
        "prob_oslo": [0.9, 0.3, 0.2, 0.4], "prob_rome": [0.1, 0.7, 0.8, 0.6]})


def test_typicality_joins_places_and_each_images_top_object_to_valid_geojson():
    from citylib.stages import places as stage
    manifest = pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "group": ["g1", "g1", "g2", "g3"],
                             "lat": ["59.91", "59.92", "", "-33.9"], "lon": ["10.75", "10.76", "", "151.2"],
                             "date": ["2019-01", "2019-07", "", "2020-01"]})
    removals = pd.DataFrame({"row": [10, 10, 11, 13], "object": ["tree", "car", "sky", "fence"],
                             "logp_removed": [-1.0, -0.5, -2.0, -0.1], "logp_null": [-0.2, -0.4, -0.1, -0.3]})
    table = stage.typicality(_predictions(), manifest, removals)
    assert table["path"].tolist() == ["a.jpg", "b.jpg", "d.jpg"]             # c has no coordinates
    assert table["p_true"].tolist() == [0.9, 0.3, 0.6]
    assert table["top_object"].tolist() == ["tree", "sky", "fence"]        # most negative removed - null
    assert np.allclose(table["top_effect"], [-0.8, -1.9, 0.2])
    assert table["season"].tolist() == ["winter", "summer", "summer"]        # January in Sydney: summer
    doc = stage.geojson(table)
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 3
    first = doc["features"][0]
    assert first["geometry"] == {"type": "Point", "coordinates": [10.75, 59.91]}      # [lon, lat]
    assert first["properties"]["city"] == "oslo" and first["properties"]["p_true"] == 0.9
    import json
    json.dumps(doc, allow_nan=False)                                          # strict JSON: no NaN


def test_the_places_stage_writes_and_reads_back_the_same_table(tmp_path):
    from citylib.stages import places as stage
    _predictions().to_csv(tmp_path / "predictions.csv", index=False)
    manifest = pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "group": ["g1", "g1", "g2", "g3"],
                             "lat": ["59.91", "59.92", "41.9", "41.91"], "lon": ["10.75", "10.76", "12.5", "12.51"]})
    made = stage.run(tmp_path, manifest, "k1", n_boot=100)            # no reliance, no dates
    read = stage.run(tmp_path, manifest, "k1", n_boot=100)            # reused: read back
    assert (tmp_path / "places.geojson").is_file() and len(made.table) == 4
    pd.testing.assert_frame_equal(read.table, made.table, check_dtype=False)
    assert read.table["top_object"].tolist() == [""] * 4 and read.table["date"].tolist() == [""] * 4


def test_typicality_and_accuracy_by_season_and_year_with_intervals():
    from citylib.stages import places as stage
    rng = np.random.default_rng(0)
    n = 40
    table = pd.DataFrame({"city": "oslo", "group": [f"g{i // 2}" for i in range(n)],
                          "date": [f"{2018 + i % 2}-{(1, 7)[i % 4 // 2]:02d}" for i in range(n)],
                          "p_true": np.where(np.arange(n) % 4 // 2 == 1, 0.8, 0.4) + rng.normal(0, 0.02, n),
                          "correct": np.arange(n) % 4 // 2 == 1})
    table["season"] = [places.season(d, 59.9) for d in table["date"]]
    time = stage.by_time(table, n_boot=500)
    seasons = time[time["by"] == "season"].set_index("value")
    assert seasons["n"].to_dict() == {"summer": 20, "winter": 20}
    assert seasons.loc["summer", "typicality_low"] > seasons.loc["winter", "typicality_high"]
    assert seasons.loc["summer", "accuracy"] == 1.0 and seasons.loc["winter", "accuracy"] == 0.0
    assert time[time["by"] == "year"]["value"].tolist() == ["2018", "2019"]


def test_nearest_training_image_and_accuracy_near_and_far():
    from citylib.stages import places as stage
    # oslo: a, b tested; t1 trains 30 m north of a, t2 3 km away; rome's only training image far
    # off, though an image labelled oslo (t4) trains 55 m from c: another city's does not count
    manifest = pd.DataFrame({
        "path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "t1.jpg", "t2.jpg", "t3.jpg", "t4.jpg", "v.jpg"],
        "city": ["oslo", "oslo", "rome", "rome", "oslo", "oslo", "rome", "oslo", "rome"],
        "group": ["g1", "g2", "g3", "g4", "g5", "g6", "g7", "g8", "g9"],
        "split": ["test"] * 4 + ["train"] * 4 + ["val"],
        "lat": ["59.91", "59.93", "41.9", "41.91", f"{59.91 + 30 / 111195:.7f}", "59.96", "41.0", "41.9005", "41.9"],
        "lon": ["10.75", "10.75", "12.5", "12.51", "10.75", "10.75", "12.5", "12.5", "12.5"]})
    table = stage.typicality(_predictions(), manifest, None)
    near = table.set_index("path")["nearest_train_m"]
    assert near["a.jpg"] == pytest.approx(30, abs=0.1)
    # b: 0.02 degrees of latitude from a's neighbour t1, 0.03 from t2: t1 is nearer
    assert near["b.jpg"] == pytest.approx(geosample.distance_m(59.93, 10.75, 59.91 + 30 / 111195, 10.75), rel=1e-6)
    # not oslo's t4, not the validation image v at the same place
    assert near["c.jpg"] == pytest.approx(geosample.distance_m(41.9, 12.5, 41.0, 12.5), rel=1e-6)
    split = stage.near_far(table, 100.0, n_boot=200).set_index("city")
    assert split.loc["oslo", ["n_near", "n_far"]].tolist() == [1, 1]
    assert split.loc["oslo", "accuracy_near"] == 1.0 and split.loc["oslo", "accuracy_far"] == 0.0
    assert split.loc["rome", "n_near"] == 0 and np.isnan(split.loc["rome", "accuracy_near"])
    assert split.loc["all", ["n_near", "n_far"]].tolist() == [1, 3]
    assert split.loc["all", "accuracy_far"] == pytest.approx(2 / 3)
    # every test image: the run's own split
    assert split.loc["oslo", "n_all"] == 2 and split.loc["oslo", "accuracy_all"] == 0.5
    assert split.loc["all", "n_all"] == 4 and split.loc["all", "accuracy_all"] == 0.75
    assert split.loc["all", "all_low"] <= 0.75 <= split.loc["all", "all_high"]


def test_each_citys_strongest_objects_mapped_and_followed_through_the_seasons():
    from citylib.stages import places as stage
    rng = np.random.default_rng(2)
    n = 24                                    # oslo's test images, half in winter, half in summer
    table = pd.DataFrame({"index": np.arange(n), "city": "oslo", "group": [f"g{i // 2}" for i in range(n)],
                          "lat": 59.9 + rng.uniform(0, 0.01, n), "lon": 10.7 + rng.uniform(0, 0.01, n),
                          "date": [("2019-01", "2019-07")[i % 2] for i in range(n)]})
    table["season"] = [places.season(d, 59.9) for d in table["date"]]
    summer = np.arange(n) % 2 == 1
    # trees matter in summer only (-2 against -0.1), cars a little always, signs a little, a rare
    # kiosk (3 images) much: below min_images, so never among the strongest
    rows = [(i, "tree", np.where(summer[i], -2.0, -0.1)) for i in range(n)]
    rows += [(i, "car", -0.5) for i in range(n)] + [(i, "sign", -0.2) for i in range(0, n, 2)]
    rows += [(i, "kiosk", -5.0) for i in range(3)]
    removals = pd.DataFrame(rows, columns=["row", "object", "change"]).assign(city="oslo", group="x")
    removals["logp"] = -0.1
    removals["logp_removed"] = removals["logp"] + removals["change"] + rng.normal(0, 0.01, len(removals))
    removals["correct"] = True
    removals["correct_removed"] = removals["change"] < -1.0
    objects = stage.object_changes(table, removals, top=2, min_images=5)
    ranked = objects.drop_duplicates("object").set_index("object")["rank"].to_dict()
    assert ranked == {"tree": 1, "car": 2}                        # -1.05 and -0.5; not the kiosk, not signs
    assert len(objects) == 2 * n and objects["group"].iloc[0] == "g0"       # the places' groups
    assert objects.loc[objects["object"] == "tree", "flipped"].sum() == n // 2
    time = stage.object_time(objects, n_boot=300)
    tree = time[(time["object"] == "tree") & (time["by"] == "season")].set_index("value")
    assert tree["n"].to_dict() == {"summer": 12, "winter": 12}
    assert tree.loc["summer", "effect_high"] < tree.loc["winter", "effect_low"]     # stronger in summer
    assert tree.loc["summer", "effect"] == pytest.approx(-2.0, abs=0.02)


def test_a_split_that_one_large_block_skews_is_said():
    rng = np.random.default_rng(4)
    spread = _street(rng, "a", 200, 51.5, -0.1)                 # streets across a city: many blocks
    dense = [{"city": "b", "group": f"b{k}", "lat": 48.85 + k * 1e-4, "lon": 2.35} for k in range(150)]   # 11 m apart
    dense += [{"city": "b", "group": f"c{k}", "lat": 48.0 + k * 0.01, "lon": 2.0} for k in range(30)]      # 1 km apart
    frame = pd.DataFrame(spread + dense)
    frame["block"] = places.clusters(frame, 50.0)
    frame["split"] = split_groups(frame.assign(group=frame["block"]), seed=0)
    lines = places.skewed(frame, (6, 2, 2))
    assert len(lines) == 1 and lines[0].startswith("city 'b': 31 block(s), the largest 83%")
    assert places.skewed(frame[frame["city"] == "a"], (6, 2, 2)) == []
