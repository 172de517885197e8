"""Generated world: determinism, label/pixel agreement, shared spot layouts, planted cues,
no colour shortcut, strict world YAML, manifest semantics, caching."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from citylib.core.artifacts import read_json
from citylib.core.config import ConfigError, from_dict
from citylib.world import street, synth, worldfile
from citylib.world.scene import LUT, VOCAB

SMALL = synth.SynthConfig(spots_per_city=3, views=4, size=48, seed=0)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small")
    synth.run(SMALL, out)
    return out


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The default world at reduced size: manifest, per-image class shares (N, 256) and
    colour histograms of the written JPEGs (N, 48)."""
    out = tmp_path_factory.mktemp("medium")
    m = pd.read_csv(synth.run(synth.SynthConfig(spots_per_city=150, size=64, seed=1), out))
    shares, hists = [], []
    for img, lab in zip(m["path"], m["label_path"]):
        label = np.asarray(Image.open(out / lab))
        shares.append(np.bincount(label.ravel(), minlength=256) / label.size)
        rgb = np.asarray(Image.open(out / img))
        hists.append(np.concatenate([np.histogram(rgb[..., c], 16, (0, 256))[0] for c in range(3)]) / label.size)
    return m, np.stack(shares), np.stack(hists)


def test_same_seed_same_bytes_any_workers(small, tmp_path):
    synth.run(SMALL, tmp_path / "again", workers=1)
    assert files(small) == files(tmp_path / "again")
    other = synth.run(dataclasses.replace(SMALL, seed=1), tmp_path / "other")
    a, b = files(small), files(other.parent)
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert sum(a[k] != b[k] for k in jpgs) == len(jpgs)


def test_manifest_columns_groups_and_views(small):
    m = pd.read_csv(small / "manifest.csv", keep_default_na=False)
    assert list(m.columns) == ["path", "city", "group", "view", "label_path", "lat", "lon"]
    assert len(m) == 3 * SMALL.spots_per_city * SMALL.views
    assert sorted(m["city"].unique()) == ["signtown", "towerville", "treeville"]
    world = synth.load_world(SMALL.world)
    for group, g in m.groupby("group"):
        assert g["city"].nunique() == 1 and group == f"{g['city'].iloc[0]}_{group[-4:]}"
        assert sorted(g["view"]) == list(range(SMALL.views))
        at = synth.place(world, g["city"].iloc[0], int(group[-4:]), SMALL.seed)   # one place per spot
        assert (g["lat"].astype(float).round(7) == round(at["lat"], 7)).all()
        assert (g["lon"].astype(float).round(7) == round(at["lon"], 7)).all()
    for row in m.itertuples():
        assert row.path == f"images/{row.city}/{row.group}_v{row.view}.jpg"
        assert row.label_path == f"labels/{row.city}/{row.group}_v{row.view}.png"
        img, lab = Image.open(small / row.path), Image.open(small / row.label_path)
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (48, 48))
        assert (lab.format, lab.mode, lab.size) == ("PNG", "L", (48, 48))
    saved = read_json(small / "world.json")
    assert saved["config"] == {"world": "default", "spots_per_city": 3, "views": 4, "size": 48, "seed": 0,
                               "reset": []}
    assert {c: [p["object"] for p in v] for c, v in saved["planted"].items()} == {
        "signtown": ["signboard", "fence"], "towerville": ["skyscraper", "earth"],
        "treeville": ["tree", "streetlight"]}


def test_reuse_mismatch_and_interrupted_runs(small, tmp_path, monkeypatch):
    stamp = (small / "manifest.csv").stat().st_mtime_ns
    assert synth.run(SMALL, small) == small / "manifest.csv"
    assert (small / "manifest.csv").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(synth.WorldExistsError, match=str(small)):
        synth.run(dataclasses.replace(SMALL, seed=5), small)
    out = tmp_path / "w"
    synth.run(dataclasses.replace(SMALL, spots_per_city=1), out)
    real = synth._write_spot

    def dies(world, cfg, out, task):
        if task[1] == 1:
            raise KeyboardInterrupt
        return real(world, cfg, out, task)
    monkeypatch.setattr(synth, "_write_spot", dies)
    with pytest.raises(KeyboardInterrupt):  # an interrupted overwrite leaves no manifest behind
        synth.run(SMALL, out, overwrite=True, workers=1)
    assert not (out / "manifest.csv").exists() and not (out / "world.json").exists()
    monkeypatch.setattr(synth, "_write_spot", real)
    synth.run(SMALL, out)
    assert files(out) == files(small)


def test_flat_render_pixels_equal_lut_of_labels():
    world = worldfile.load_world("default")
    allowed = set(VOCAB.values())
    for city in world.styles:
        for spot in range(4):
            flat = synth.render_spot(world, city, spot, size=64, flat=True)
            shaded = synth.render_spot(world, city, spot, size=64)
            for f, s in zip(flat, shaded):
                assert np.array_equal(f["image"], LUT[f["label"]])
                assert np.array_equal(f["label"], s["label"])  # nuisance never moves geometry
                present = set(np.unique(f["label"]).tolist())
                assert present <= allowed
                assert {VOCAB["sky"], VOCAB["building"]} <= present
                assert present & {VOCAB["road"], VOCAB["sidewalk"]}


def test_written_label_maps_use_the_vocabulary_and_show_a_street(medium):
    _, shares, _ = medium
    assert set(np.nonzero(shares.sum(0))[0].tolist()) <= set(VOCAB.values())
    assert (shares[:, VOCAB["sky"]] > 0).all() and (shares[:, VOCAB["building"]] > 0).all()
    # The street shows in every view but those looking straight at a hoarding close by.
    ground = shares[:, [VOCAB["road"], VOCAB["sidewalk"]]].sum(1) > 0
    assert ground.mean() > 0.99
    assert (shares[~ground, VOCAB["fence"]] > 0.15).all()


def test_views_of_a_spot_share_one_layout():
    world = worldfile.load_world("default")
    solid = [VOCAB["building"], VOCAB["skyscraper"]]
    for city in world.styles:
        for spot in range(8):
            views = synth.render_spot(world, city, spot, views=4, size=64)
            # A view depends on its spot and index only: view 0 is the same whatever the count.
            two = synth.render_spot(world, city, spot, views=2, size=64)
            assert np.array_equal(views[0]["image"], two[0]["image"])
            heads = [v["heading"] for v in views]
            assert all(60 < (b - a) % 360 < 120 for a, b in zip(heads, heads[1:] + heads[:1]))
            # Adjacent headings overlap (fov 96 > 90 + jitter): the same building is in both.
            seen = [set(v["inst"][np.isin(v["label"], solid)].tolist()) for v in views]
            for k in range(4):
                assert seen[k] & seen[(k + 1) % 4], (city, spot, k)


def test_planted_cues_are_frequent_at_home_and_not_certain(medium):
    m, shares, _ = medium
    world = worldfile.load_world("default")
    for city, cues in world.planted.items():
        home = (m["city"] == city).to_numpy()
        for name, _ in cues:
            k = VOCAB[name]
            mean_home = shares[home, k].mean()
            for other in set(world.planted) - {city}:
                assert mean_home >= 2 * shares[(m["city"] == other).to_numpy(), k].mean(), (city, name, other)
            presence = (shares[home, k] > 0).mean()
            assert 0.3 < presence < 1, (city, name, presence)


def _element_ids(world, city: str, spot: int, cue: str) -> np.ndarray:
    """Instance ids of the reset element in either scene: its own instances (open ground,
    objects) and those of the cue's class in either (a tower, skyscraper in one, plain in the
    other)."""
    element = "open_ground" if cue in ("earth", "grass") else cue.replace(" ", "_")
    ids = set()
    for reset in ((), (cue,)):
        for r in synth.layout(world, city, spot, reset=reset)["rects"]:
            if r.cls == VOCAB[cue] or street.element_of(r.inst) == street.ELEMENTS.index(element):
                ids.add(r.inst)
    return np.array(sorted(ids))


def _changed_outside(world, spots: int = 6) -> dict:
    """Per (city, cue): pixels changed by resetting the cue, and those outside its element's
    pixels in either render."""
    out = {}
    for city, cues in world.planted.items():
        for cue, _ in cues:
            changed = outside = 0
            for spot in range(spots):
                ids = _element_ids(world, city, spot, cue)
                for o, c in zip(synth.render_spot(world, city, spot, views=2, size=48),
                                synth.render_spot(world, city, spot, views=2, size=48, reset=(cue,))):
                    diff = (o["image"] != c["image"]).any(-1)
                    changed += int(diff.sum())
                    outside += int((diff & ~(np.isin(o["inst"], ids) | np.isin(c["inst"], ids))).sum())
            out[city, cue] = (changed, outside)
    return out


def test_counterfactual_changes_only_the_reset_cue():
    """Before JPEG, a spot with one cue reset differs from the original only where that cue's
    element is in either render; every cue's reset changes something."""
    world = worldfile.load_world("default")
    result = _changed_outside(world)
    for (city, cue), (changed, outside) in result.items():
        assert changed > 0, (city, cue)
        assert outside == 0, (city, cue, changed, outside)
    # The cue-free rendering is the base style itself, whatever the city
    for city in world.styles:
        assert world.style(city, worldfile.CUE_FREE) == from_dict(worldfile.Style, world.definition["base"])


def test_counterfactual_check_detects_a_shared_random_stream(monkeypatch):
    """The same check on a generator whose elements draw from one stream fails."""
    spot = street.spot

    def shared(style, stream, colour, delete=()):
        one = stream("layout")
        return spot(style, lambda element: one, colour, delete)

    monkeypatch.setattr(street, "spot", shared)
    result = _changed_outside(worldfile.load_world("default"), spots=3)
    assert any(outside > 0 for _, outside in result.values()), result


def _colour_features(world, reset, spots: int, size: int = 48):
    """Colour histograms (N, 48) and class shares (N, 256) of view 0 of each spot (independent
    samples), with the cities."""
    feats, shares, cities = [], [], []
    for city in world.styles:
        for spot in range(spots):
            v = synth.render_spot(world, city, spot, views=1, size=size, seed=7, reset=reset)[0]
            feats.append(np.concatenate([np.histogram(v["image"][..., c], 16, (0, 256))[0]
                                         for c in range(3)]) / size ** 2)
            shares.append(np.bincount(v["label"].ravel(), minlength=256) / size ** 2)
            cities.append(city)
    return np.stack(feats), np.stack(shares), np.array(cities)


def _histogram_accuracy(feats, cities) -> tuple[int, int]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    pred = cross_val_predict(clf, feats, cities, cv=StratifiedKFold(5, shuffle=True, random_state=0))
    return int((pred == cities).sum()), len(cities)


def _shares_differ(shares, cities) -> list[str]:
    """The classes whose pixel share differs between the cities (Kruskal-Wallis, Bonferroni)."""
    from scipy.stats import kruskal

    names = {i: n for n, i in VOCAB.items()}
    present = [k for k in np.nonzero(shares.sum(0))[0] if k in names]
    differ = []
    for k in present:
        groups = [shares[cities == c, k] for c in np.unique(cities)]
        if np.ptp(np.concatenate(groups)) > 0 and kruskal(*groups).pvalue < 0.01 / len(present):
            differ.append(names[k])
    return differ


def test_cue_free_renderings_cannot_tell_cities_apart():
    """With every cue reset the cities are one distribution: a colour-histogram classifier
    scores at chance (chance inside its Wilson 95% interval) and no object's pixel share
    differs between cities. The same checks on the real renderings do detect the cities."""
    from citylib.stats.intervals import wilson

    world = worldfile.load_world("default")
    chance = 1 / len(world.styles)
    feats, shares, cities = _colour_features(world, worldfile.CUE_FREE, spots=150)
    lo, hi = wilson(*_histogram_accuracy(feats, cities))
    assert lo <= chance <= hi, (lo, hi)
    assert _shares_differ(shares, cities) == []
    feats, shares, cities = _colour_features(world, (), spots=150)
    lo, _ = wilson(*_histogram_accuracy(feats, cities))
    assert lo > chance, lo
    planted = {o for cues in world.planted.values() for o, _ in cues}
    assert planted <= set(_shares_differ(shares, cities))


def test_world_yaml_is_strict(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: default\ncities:\n  a:\n    objects: {tree: {spot_prob: 0.5, colour: red}}\n")
    with pytest.raises(ConfigError, match=r"objects\.tree\.colour") as e:
        worldfile.load_world(str(bad))
    assert str(bad) in str(e.value)
    bad.write_text("extends: default\ncitys: {}\n")
    with pytest.raises(ConfigError, match="citys"):
        worldfile.load_world(str(bad))
    bad.write_text("extends: default\ncities:\n  a: {planted: [{object: unicorn, why: x}]}\n")
    with pytest.raises(ConfigError, match="unicorn"):
        worldfile.load_world(str(bad))
    with pytest.raises(ValueError, match="views"):
        synth.SynthConfig(views=0)
    with pytest.raises(ConfigError, match="spots"):
        from_dict(synth.SynthConfig, {"spots": 3})


def test_a_world_file_with_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("extends: default\ncities:\n  a: {}\n  b: {}\n  a: {objects: {tree: {spot_prob: 1.0}}}\n")
    with pytest.raises(ConfigError, match=r"line 5: key 'a' given twice \(first on line 3\)"):
        worldfile.load_world(str(path))


def test_user_world_with_two_cities(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "extends: default\n"
        "cities:\n"
        "  leafy:\n"
        "    planted: [{object: tree, why: trees everywhere}]\n"
        "    objects: {tree: {spot_prob: 1.0, count: [6, 8]}}\n"
        "  plain: {}\n")
    m = pd.read_csv(synth.run(synth.SynthConfig(world=str(path), spots_per_city=2, views=2, size=32),
                              tmp_path / "out"))
    assert sorted(m["city"].unique()) == ["leafy", "plain"] and len(m) == 8
    saved = read_json(tmp_path / "out" / "world.json")
    assert saved["planted"]["leafy"][0]["index"] == VOCAB["tree"] and saved["planted"]["plain"] == []
    assert saved["undeclared"] == {"leafy": [], "plain": []}


def test_resets_and_undeclared_differences(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "extends: default\n"
        "cities:\n"
        "  leafy:\n"
        "    planted: [{object: tree, why: trees}, {object: earth, why: soil}]\n"
        "    objects: {tree: {spot_prob: 1.0}, plant: {spot_prob: 0.0}}\n"
        "    street: {open_ground: {earth: 1.0}, camera_height: [3.0, 3.2]}\n"
        "  plain: {}\n")
    world = worldfile.load_world(str(path))
    assert world.undeclared == {"leafy": ["objects.plant", "street.camera_height"], "plain": []}
    base = from_dict(worldfile.Style, world.definition["base"])
    tree_reset = world.style("leafy", ("tree",))
    assert tree_reset.objects.tree == base.objects.tree and tree_reset.objects.plant.spot_prob == 0.0
    assert tree_reset.street.open_ground == {"sidewalk": 0.4, "grass": 0.6, "earth": 1.0}  # a deep merge
    earth_reset = world.style("leafy", ("earth",))
    assert earth_reset.street.open_ground == base.street.open_ground
    assert earth_reset.street.camera_height == (3.0, 3.2)      # not the cue's element: kept
    assert world.style("leafy", worldfile.CUE_FREE) == base          # undeclared entries go too
    with pytest.raises(ValueError, match="not one of its planted cues"):
        world.style("leafy", ("car",))
    path.write_text("extends: default\ncities:\n  a: {planted: [{object: building, why: x}]}\n")
    with pytest.raises(ConfigError, match="planted"):
        worldfile.load_world(str(path))


def test_world_hash_follows_the_world_definition(tmp_path):
    """The data stage keeps a generated world in a folder named by this hash: an edited world
    YAML gets a new folder instead of meeting the old files (WorldExistsError)."""
    path = tmp_path / "mine.yaml"
    text = ("extends: default\ncities:\n  leafy:\n    objects: {tree: {spot_prob: 0.5}}\n"
            "  plain: {}\n")
    path.write_text(text)
    cfg = synth.SynthConfig(world=str(path), spots_per_city=2, views=2, size=32)
    before = synth.world_hash(cfg)
    assert synth.world_hash(cfg) == before
    path.write_text(text.replace("0.5", "0.6"))
    assert synth.world_hash(cfg) != before
    path.write_text("# a comment changes no image\n" + text)
    assert synth.world_hash(cfg) == before
    assert synth.world_hash(dataclasses.replace(cfg, seed=1)) != before


def test_counterfactual_world_resets_only_the_cities_that_plant_the_cue(small, tmp_path):
    cfg = dataclasses.replace(SMALL, reset=("tree",))
    synth.run(cfg, tmp_path / "no_trees")
    a, b = files(small), files(tmp_path / "no_trees")
    changed = {k.split("/")[1] for k in a if k.endswith(".jpg") and a[k] != b[k]}
    assert changed == {"treeville"}
    assert read_json(tmp_path / "no_trees" / "world.json")["config"]["reset"] == ["tree"]
    with pytest.raises(ConfigError, match="no planted cue"):
        synth.run(dataclasses.replace(SMALL, reset=("car",)), tmp_path / "bad")
    with pytest.raises(ValueError, match="resets everything"):
        synth.SynthConfig(reset=("cue-free", "tree"))



def test_render_workers_end_quietly_when_their_pool_ends_them():
    # the runner turns SIGTERM into KeyboardInterrupt; forked render workers inherit that, and
    # the pool's own terminate() (SIGTERM) made them print tracebacks, late, on the terminal
    import subprocess
    import sys

    script = ("import signal, time\n"
              "from citylib.world import synth\n"
              "def stop(*_):\n    raise KeyboardInterrupt\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "for _ in range(3):\n"
              "    with synth.worker_pool(2) as pool:\n"
              "        assert pool.map(abs, [-1, -2, -3]) == [1, 2, 3]\n"
              "time.sleep(0.5)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "KeyboardInterrupt" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_deleted_object_kind_is_gone_and_nothing_else_of_the_spot_changes():
    """``delete``: the true deletion a removal operator is scored against. Every deletable kind
    present in a spot leaves no pixel of its class, and outside that kind's own things (a
    traffic light's post is labelled pole) no pixel, label or colour, changes."""
    from citylib.world import scene, street, worldfile

    world = worldfile.load_world("default")
    seen = set()
    for city in world.styles:
        for spot in range(3):
            base = synth.render_spot(world, city, spot, views=2, size=64)
            for name in street.DELETABLE:
                cls = scene.VOCAB[name]
                if not any((v["label"] == cls).any() for v in base):
                    continue
                seen.add(name)
                gone = synth.render_spot(world, city, spot, views=2, size=64, delete=(name,))
                kind = name.replace(" ", "_")
                for v, g in zip(base, gone):
                    of = [np.where(street.element_of(x["inst"]) >= 0,
                                   np.asarray(street.ELEMENTS)[street.element_of(x["inst"])], "sky") for x in (v, g)]
                    # none of the kind is left (another kind's part of its class may be: a
                    # traffic light's post is a pole)
                    left = (g["label"] == cls) & ((of[1] == kind) | (name == "skyscraper"))
                    assert not left.any(), (city, spot, name)
                    own = (of[0] == kind) | ((v["label"] == cls) & (name == "skyscraper"))
                    assert np.array_equal(v["label"][~own], g["label"][~own]), (city, spot, name)
                    assert np.array_equal(v["image"][~own], g["image"][~own]), (city, spot, name)
    assert {"car", "tree", "signboard", "skyscraper"} <= seen
    with pytest.raises(ValueError, match="delete: building cannot be deleted"):
        synth.render_spot(world, "signtown", 0, views=1, size=32, delete=("building",))


def test_a_cue_adopted_from_another_city_is_drawn_as_that_city_draws_it():
    from citylib.world import scene, worldfile

    world = worldfile.load_world("default")
    plain = synth.render_spot(world, "treeville", 0, views=2, size=64)
    signs = synth.render_spot(world, "treeville", 0, views=2, size=64, adopt=(("signtown", "signboard"),))
    count = lambda views: sum(int((v["label"] == scene.VOCAB["signboard"]).sum()) for v in views)  # noqa: E731
    assert count(plain) == 0 < count(signs)
    assert world.style("treeville", adopt=(("signtown", "signboard"),)).objects.signboard == \
        world.styles["signtown"].objects.signboard
    with pytest.raises(ValueError, match="'unicorn' is not a planted cue of 'signtown'"):
        world.style("treeville", adopt=(("signtown", "unicorn"),))
