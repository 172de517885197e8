"""Data stage on small hand-made image folders: loading, validation, normalisation, cache, reuse."""
from __future__ import annotations

import dataclasses
import io
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from citylib.core import paths
from citylib.core.config import ConfigError, config_hash, from_dict
from citylib.data import dataset, imagecache, inventory
from citylib.run import cli
from citylib.data.splits import leakage_report

COLOURS = {"amsterdam": (200, 40, 40), "berlin": (40, 200, 40), "cairo": (40, 40, 200)}


def solid(path: Path, colour=(128, 128, 128), size=(40, 30), fmt=None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt, **kw)
    return path


def noise_bytes(fmt: str, size=(64, 48)) -> bytes:
    a = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt)
    return buf.getvalue()


def png_header(path: Path, w: int, h: int) -> Path:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb in miniature)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def city_tree(root: Path, cities=("amsterdam", "berlin"), n=4, size=(40, 30)) -> Path:
    for city in cities:
        for i in range(n):
            solid(root / city / f"img{i}.jpg", COLOURS[city], size, quality=95)
    return root


def reasons(rejected: pd.DataFrame) -> dict[str, str]:
    return {Path(p).name: r for p, r in zip(rejected["path"], rejected["reason"])}


# ---------------------------------------------------------------- validation


def test_bad_files_are_rejected_with_reasons_and_nothing_else_lost(tmp_path):
    root = city_tree(tmp_path / "ds")
    a, b = root / "amsterdam", root / "berlin"
    (a / "zero.jpg").write_bytes(b"")
    (a / "text.jpg").write_text("this is not a picture\n")
    (a / "cut.jpg").write_bytes(noise_bytes("JPEG")[:600])
    (a / "cut.png").write_bytes(noise_bytes("PNG")[:3000])
    png = noise_bytes("PNG")
    (a / "flipped.png").write_bytes(png[:4000] + bytes(x ^ 0xFF for x in png[4000:4100]) + png[4100:])
    (a / "notes.txt").write_text("a note")
    (a / ".DS_Store").write_bytes(b"\0\1")
    solid(a / ".thumbs" / "hidden.jpg")
    solid(a / "deeper" / "nested.JPEG", COLOURS["amsterdam"], fmt="JPEG")  # recursive, any case
    png_header(b / "bomb.png", 20_000, 20_000)  # PIL's own guard refuses it at open
    png_header(b / "huge.png", 12_000, 9_000)  # 108 MP: over the default max_pixels
    (root / "README.md").write_text("about this dataset")

    records, rejected = inventory.load_records(root)
    ok, bad = inventory.validate(records, progress=False)
    why = reasons(pd.concat([rejected, bad]))
    expected = {"zero.jpg": "empty file", "text.jpg": "not an image", "cut.jpg": "truncated",
                "cut.png": "truncated", "flipped.png": "corrupt", "notes.txt": "not an image file",
                "bomb.png": "too large", "huge.png": "too large", "README.md": "not inside a city folder"}
    assert set(why) == set(expected)
    for name, words in expected.items():
        assert words in why[name], (name, why[name])
    assert sorted(Path(p).name for p in ok["path"]) == sorted([f"img{i}.jpg" for i in range(4)] * 2
                                                              + ["nested.JPEG"])
    assert not any(".DS_Store" in p or "hidden" in p for p in pd.concat([ok, bad])["path"])


MODES = [  # (how to make it, the RGB it must become, formats that can hold it)
    (lambda: Image.new("L", (20, 10), 77), (77, 77, 77), ("PNG", "TIFF", "JPEG")),
    (lambda: Image.new("1", (20, 10), 1), (255, 255, 255), ("PNG", "TIFF", "BMP")),
    (lambda: Image.new("RGBA", (20, 10), (200, 100, 50, 128)), (100, 50, 25), ("PNG", "TIFF", "WEBP")),
    (lambda: Image.new("RGBA", (20, 10), (200, 100, 50, 0)), (0, 0, 0), ("PNG", "TIFF")),  # onto black
    (lambda: Image.new("LA", (20, 10), (90, 255)), (90, 90, 90), ("PNG",)),
    (lambda: Image.new("CMYK", (20, 10), (0, 255, 255, 0)), (255, 0, 0), ("TIFF",)),
    (lambda: Image.fromarray(np.full((10, 20), 200 * 257, np.uint16)), (200, 200, 200), ("PNG", "TIFF")),
    (lambda: Image.fromarray(np.full((10, 20), 65535, np.int32)), (255, 255, 255), ("TIFF",)),  # mode I
]


@pytest.mark.parametrize("make, expected, fmt", [(m, e, f) for m, e, fmts in MODES for f in fmts])
def test_modes_are_converted_to_rgb(tmp_path, make, expected, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    make().save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert inventory.check_file(str(path)) is None
    rgb = np.asarray(imagecache.open_rgb(path))
    assert rgb.shape == (10, 20, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - expected).max() <= 1, (Image.open(path).mode, rgb[0, 0])


def test_sixteen_bit_gradient_scales_to_eight_bit(tmp_path):
    values = np.arange(256, dtype=np.uint16) * 257  # 0 .. 65535
    Image.fromarray(np.tile(values, (4, 1))).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    assert np.array_equal(np.asarray(imagecache.open_rgb(tmp_path / "g.png"))[0, :, 0], np.arange(256))


def test_palette_and_cmyk_jpeg(tmp_path):
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 10, 220, 30] + [0] * 762)
    p.save(tmp_path / "p.png")
    p.save(tmp_path / "pt.png", transparency=1)  # the palette entry is fully transparent
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    assert tuple(np.asarray(imagecache.open_rgb(tmp_path / "p.png"))[0, 0]) == (10, 220, 30)
    assert tuple(np.asarray(imagecache.open_rgb(tmp_path / "pt.png"))[0, 0]) == (0, 0, 0)
    assert np.abs(np.asarray(imagecache.open_rgb(tmp_path / "c.jpg"))[8, 8].astype(int) - (255, 0, 0)).max() <= 8


def test_exif_orientation_is_applied_in_the_cache(tmp_path):
    a = np.zeros((32, 64, 3), np.uint8)  # stored 64 wide, 32 high: left red, right blue
    a[:, :32, 0] = 255
    a[:, 32:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: left becomes top
    Image.fromarray(a).save(tmp_path / "r.jpg", exif=exif, quality=95)
    records = pd.DataFrame({"path": [str(tmp_path / "r.jpg")], "city": "a", "group": "g", "view": 0,
                            "label_path": "", "split": "train"})
    c = imagecache.load_cache(imagecache.build_cache(records, 16, tmp_path / "cache", progress=False))
    img = c.images[0]
    assert img.shape == (16, 16, 3) and tuple(c.index.loc[0, ["width", "height"]]) == (32, 64)
    assert img[2, 8, 0] > 200 and img[2, 8, 2] < 50  # top red
    assert img[13, 8, 2] > 200 and img[13, 8, 0] < 50  # bottom blue


def test_full_view_is_the_cached_crop_at_the_files_resolution(tmp_path):
    rng = np.random.default_rng(0)
    wide = np.kron(rng.integers(0, 256, (12, 20, 3)), np.ones((10, 10, 1))).astype(np.uint8)  # 120 x 200
    Image.fromarray(wide).save(tmp_path / "w.png")
    records = pd.DataFrame({"path": [str(tmp_path / "w.png")], "city": "a", "group": "g", "view": 0,
                            "label_path": "", "split": "train"})
    c = imagecache.load_cache(imagecache.build_cache(records, 24, tmp_path / "cache", progress=False))
    full = imagecache.full_view(c, 0)
    assert full.shape == (120, 120, 3) and full.dtype == np.uint8
    assert np.array_equal(full, wide[:, 40:160])                     # the cache's centred square
    assert imagecache.full_view(c, 0, largest=60).shape == (60, 60, 3)
    (tmp_path / "w.png").unlink()                                    # the file gone: the cache
    assert np.array_equal(imagecache.full_view(c, 0), c.images[0])


def test_max_pixels(tmp_path):
    solid(tmp_path / "a" / "big.png", size=(40, 40))
    solid(tmp_path / "a" / "small.png", size=(20, 20))
    records = pd.DataFrame({"path": [str(tmp_path / "a" / n) for n in ("big.png", "small.png")],
                            "label_path": ""})
    ok, bad = inventory.validate(records, max_pixels=1000, progress=False)
    assert list(ok["path"].map(lambda p: Path(p).name)) == ["small.png"]
    assert "too large" in bad["reason"][0] and "1600" in bad["reason"][0]


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("case", ["missing", "no_images", "empty_city", "only_other_files", "one_city"])
def test_unusable_sources_name_the_path(tmp_path, case):
    root = tmp_path / "ds"
    bad = root
    if case == "missing":
        bad = root / "nowhere"
    elif case == "no_images":
        root.mkdir()
    elif case == "empty_city":
        city_tree(root)
        bad = root / "cairo"
        bad.mkdir()
    elif case == "only_other_files":
        city_tree(root)
        bad = root / "cairo"
        bad.mkdir()
        (bad / "list.txt").write_text("x")
    elif case == "one_city":
        city_tree(root, cities=("amsterdam",))
    source = bad if case == "missing" else root
    with pytest.raises(inventory.DatasetError, match=re.escape(str(bad))):
        inventory.load_records(source)


def test_cities_subset(tmp_path):
    root = city_tree(tmp_path, cities=("amsterdam", "berlin", "cairo"))
    records, _ = inventory.load_records(root, cities=("cairo", "amsterdam"))
    assert sorted(records["city"].unique()) == ["amsterdam", "cairo"]
    with pytest.raises(inventory.DatasetError, match="dublin"):
        inventory.load_records(root, cities=("cairo", "dublin"))


def test_manifest_csv_with_relative_paths_groups_and_labels(tmp_path):
    for i in range(3):
        solid(tmp_path / "imgs" / f"a{i}.jpg", size=(30, 20))
        solid(tmp_path / "imgs" / f"b{i}.png", size=(30, 20))
    label = np.zeros((20, 30), np.uint8)
    label[:, 15:] = 7
    Image.fromarray(label).save(tmp_path / "imgs" / "a0_lab.png")
    Image.fromarray(label[:10]).save(tmp_path / "imgs" / "a1_lab.png")  # wrong size
    (tmp_path / "imgs" / "a2_lab.png").write_text("no")  # unreadable
    (tmp_path / "meta").mkdir()
    csv = tmp_path / "meta" / "list.csv"
    pd.DataFrame({
        "path": ["../imgs/a0.jpg", "../imgs/a1.jpg", "../imgs/a2.jpg", str(tmp_path / "imgs" / "b0.png"),
                 "../imgs/b1.png", "../imgs/b2.png", "../imgs/b2.png", "../imgs/gone.jpg"],
        "city": ["a", "a", "a", "b", "b", "b", "b", "b"],
        "group": ["s1", "s1", "s2", "", "t1", "t1", "t1", "t2"],
        "view": ["0", "1", "0", "", "0", "1", "1", "0"],
        "label_path": ["../imgs/a0_lab.png", "../imgs/a1_lab.png", "../imgs/a2_lab.png", "", "", "", "", ""],
    }).to_csv(csv, index=False)
    records, rejected = inventory.load_records(csv)
    assert reasons(rejected) == {"b2.png": "line 8 of list.csv: duplicate of line 7; that line is used"}
    assert records["path"].map(lambda p: Path(p).is_absolute()).all()
    row = records.set_index(records["path"].map(lambda p: Path(p).name))
    assert row.loc["a1.jpg", "group"] == "s1" and row.loc["a1.jpg", "view"] == 1
    assert row.loc["b0.png", "group"] == str(tmp_path / "imgs" / "b0.png")  # no group: its own
    assert row.loc["a0.jpg", "label_path"] == str(tmp_path / "imgs" / "a0_lab.png")
    ok, bad = inventory.validate(records, progress=False)
    why = reasons(bad)
    assert "differs" in why["a1.jpg"] or "30x10" in why["a1.jpg"]
    assert "label map unreadable" in why["a2.jpg"] and why["gone.jpg"] == "file not found"
    assert len(ok) == 4

    ok["split"] = "train"
    c = imagecache.load_cache(imagecache.build_cache(ok, 10, tmp_path / "cache", progress=False))
    assert list(c.index["has_labels"]) == [True, False, False, False]  # a0 first: sorted by city, path
    lab = c.labels[0]  # the image is 30x20: the centre 20x20 holds label columns 5..24
    assert set(np.unique(lab[:, :4])) == {0} and set(np.unique(lab[:, 6:])) == {7}  # nearest: no blend
    assert not c.labels[1:].any()


def test_manifest_missing_column_names_file_and_column(tmp_path):
    csv = tmp_path / "m.csv"
    pd.DataFrame({"path": ["x.jpg"], "town": ["a"]}).to_csv(csv, index=False)
    with pytest.raises(inventory.DatasetError, match=re.escape(str(csv)) + ".*'city'"):
        inventory.load_records(csv)


def test_group_pattern(tmp_path):
    for city, names in {"a": ["spotA_1", "spotA_2", "spotB_1", "odd"], "b": ["spotC_1", "spotD_1"]}.items():
        for n in names:
            solid(tmp_path / city / f"{n}.jpg")
    named, rej = inventory.load_records(tmp_path, group_pattern=r"^(?P<group>[^_]+)_\d+$")
    first, _ = inventory.load_records(tmp_path, group_pattern=r"^([^_]+)_")
    assert list(named["group"]) == ["spotA", "spotA", "spotB", "spotC", "spotD"]
    assert list(first["group"]) == list(named["group"])
    assert list(reasons(rej)) == ["odd.jpg"] and "group_pattern" in rej["reason"][0]
    with pytest.raises(inventory.DatasetError, match="city 'b'.*spotC_1"):
        inventory.load_records(tmp_path, group_pattern=r"^(spot[AB])_")


def test_streetview_samples():
    root = paths.shared() / "samples" / "streetview"
    if not root.is_dir():
        pytest.fail(f"Street View samples missing: expected two city folders of JPEGs in {root}")
    records, rejected = inventory.load_records(root, group_pattern=inventory.STREETVIEW_PANO)
    assert len(records) == 40 and rejected.empty
    assert sorted(records["city"].unique()) == ["london_on", "london_uk"]
    stems = records["path"].map(lambda p: Path(p).stem)
    # The last five '_' fields are lat, lon, date, season, sharpness; the rest is the pano id.
    assert list(records["group"]) == [("_".join(s.split("_")[:-5])) for s in stems]
    assert records["group"].str.len().eq(22).all() and records["group"].is_unique
    assert dataset.DataConfig(group_pattern="streetview").group_pattern == inventory.STREETVIEW_PANO


def test_config_from_dict():
    cfg = from_dict(dataset.DataConfig, {"source": "x", "split": [4, 1, 1], "world": {"seed": 3},
                                      "cities": ["a", "b"]})
    assert cfg.split == (4.0, 1.0, 1.0) and cfg.world.seed == 3 and cfg.cities == ("a", "b")
    assert config_hash(cfg) == config_hash(dataset.DataConfig(source="x", split=(4, 1, 1),
                                                           world=type(cfg.world)(seed=3), cities=("a", "b")))
    for bad, key in [({"image_sise": 64}, "image_sise"), ({"split": [1, 0, 1]}, "split"),
                     ({"group_pattern": "(["}, "group_pattern"), ({"image_size": 4}, "image_size"),
                     ({"world": {"sede": 1}}, "world.sede"), ({"cities": ["a"]}, "cities")]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            from_dict(dataset.DataConfig, bad, where="p.yaml")


# ---------------------------------------------------------------- the stage and its cache


def test_run_writes_manifest_and_cache_and_reuses(tmp_path):
    root = city_tree(tmp_path / "ds", cities=("amsterdam", "berlin", "cairo"), n=5, size=(48, 32))
    (root / "berlin" / "broken.jpg").write_bytes(b"")
    cfg = dataset.DataConfig(source=str(root), image_size=16)
    out = tmp_path / "out"
    res = dataset.run(cfg, out, progress=False)
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest.columns) == dataset.MANIFEST_COLUMNS and len(manifest) == 15
    assert list(pd.read_csv(out / "rejected.csv").columns) == ["path", "reason"]
    assert leakage_report(res.manifest).empty and not res.reused
    assert (out / "snapshot.json").exists() and res.cache_dir.parent == out / "cache"

    c = dataset.load(cfg, out)
    assert c.images.shape == (15, 16, 16, 3) and c.images.dtype == np.uint8
    assert c.labels.shape == (15, 16, 16) and c.labels.dtype == np.uint8 and not c.labels.any()
    assert c.cities == ("amsterdam", "berlin", "cairo") and c.y.dtype == np.int64
    assert {"split", "has_labels", "width", "height"} <= set(c.index.columns)
    assert list(c.index["path"]) == list(res.manifest["path"])
    parts = [c.split_indices(s) for s in ("train", "val", "test")]
    assert sorted(np.concatenate(parts)) == list(range(15)) and all(len(p) >= 3 for p in parts)
    for i in range(15):  # solid colours survive decoding, resizing and the city order
        colour = COLOURS[c.cities[c.y[i]]]
        assert np.abs(c.images[i].astype(int) - colour).max() <= 3

    again = dataset.run(cfg, out, progress=False)
    assert again.reused and again.cache_dir == res.cache_dir
    pd.testing.assert_frame_equal(again.manifest, res.manifest)

    bigger = dataset.run(dataclasses.replace(cfg, image_size=24), out, progress=False)
    assert bigger.cache_dir != res.cache_dir
    reseeded = dataset.run(dataclasses.replace(cfg, split_seed=5), out, progress=False)
    assert reseeded.cache_dir != res.cache_dir  # its index differs; the pixels are shared
    assert np.array_equal(imagecache.load_cache(reseeded.cache_dir).images, c.images)

    f = root / "amsterdam" / "img0.jpg"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    touched = dataset.run(cfg, out, progress=False)
    assert not touched.reused and touched.cache_dir != res.cache_dir
    assert touched.changes == "source changed: 0 files added, 0 removed, 1 modified"


def test_source_changes_are_reported_and_make_a_new_snapshot(tmp_path):
    """Files added and removed: a new snapshot whose manifest matches the folder; until the
    stage runs again, ``current`` keeps the frozen one (never rebuilt behind the user's back)."""
    root = city_tree(tmp_path / "ds", cities=("amsterdam", "berlin"), n=5, size=(32, 32))
    cfg = dataset.DataConfig(source=str(root), image_size=16)
    out = tmp_path / "out"
    first = dataset.run(cfg, out, progress=False)
    assert dataset.changes(cfg, out) is None and dataset.key(cfg, out) == dataset.key(cfg, out)
    before = dataset.key(cfg, out)
    for i in range(5, 8):
        solid(root / "berlin" / f"new{i}.jpg", COLOURS["berlin"])
    (root / "amsterdam" / "img0.jpg").unlink()
    assert dataset.changes(cfg, out) == "source changed: 3 files added, 1 removed, 0 modified"
    assert dataset.key(cfg, out) != before
    frozen = dataset.current(cfg, out)
    assert frozen.key == first.key and len(frozen.manifest) == 10     # not rebuilt by reading
    new = dataset.run(cfg, out, progress=False)
    assert not new.reused and new.key != first.key
    assert new.changes == "source changed: 3 files added, 1 removed, 0 modified"
    listed = sorted(str(p) for p in root.rglob("*.jpg"))
    assert sorted(pd.read_csv(out / "manifest.csv")["path"]) == listed
    assert dataset.current(cfg, out).key == new.key and dataset.changes(cfg, out) is None
    with pytest.raises(dataset.StaleError, match="other data settings"):
        dataset.current(dataclasses.replace(cfg, image_size=24), out)
    with pytest.raises(dataset.StaleError, match="no data snapshot"):
        dataset.current(cfg, tmp_path / "elsewhere")


def test_city_without_usable_images_fails_after_listing_rejects(tmp_path):
    root = city_tree(tmp_path / "ds")
    solid(root / "cairo" / "x.jpg")
    (root / "cairo" / "x.jpg").write_bytes(b"")
    with pytest.raises(inventory.DatasetError, match="cairo"):
        dataset.run(dataset.DataConfig(source=str(root), image_size=16), tmp_path / "out", progress=False)
    assert "x.jpg" in pd.read_csv(tmp_path / "out" / "rejected.csv")["path"][0]


def test_parallel_cache_matches_serial(tmp_path):
    root = city_tree(tmp_path / "ds", n=6, size=(50, 37))
    records, _ = inventory.load_records(root)
    records["split"] = "train"
    one = imagecache.load_cache(imagecache.build_cache(records, 12, tmp_path / "c1", workers=1, progress=False))
    many = imagecache.load_cache(imagecache.build_cache(records, 12, tmp_path / "c2", workers=4, progress=False))
    assert np.array_equal(one.images, many.images) and one.folder.name == many.folder.name


def test_world_source_goes_through_synth(tmp_path, monkeypatch):
    from citylib.world import synth
    seen = {}

    def fake_run(cfg, out, overwrite=False):
        seen["cfg"], seen["out"] = cfg, Path(out)
        rows = []
        for city in ("amsterdam", "berlin"):
            for i in range(3):
                solid(Path(out) / "images" / city / f"{i}.jpg", COLOURS[city])
                rows.append((f"images/{city}/{i}.jpg", city, f"{city}{i}", 0, ""))
        pd.DataFrame(rows, columns=["path", "city", "group", "view", "label_path"]).to_csv(
            Path(out) / "manifest.csv", index=False)
        return Path(out) / "manifest.csv"

    monkeypatch.setattr(synth, "run", fake_run, raising=False)
    cfg = dataset.DataConfig(image_size=16)
    res = dataset.run(cfg, tmp_path / "outputs" / "data", progress=False)
    assert seen["cfg"] == cfg.world
    assert seen["out"] == tmp_path / "outputs" / "world" / synth.world_hash(cfg.world)
    assert sorted(res.manifest["group"]) == ["amsterdam0", "amsterdam1", "amsterdam2",
                                             "berlin0", "berlin1", "berlin2"]


def test_manifest_rows_that_name_one_file_for_two_cities_are_both_refused(tmp_path):
    for i in range(3):
        solid(tmp_path / f"a{i}.jpg")
        solid(tmp_path / f"b{i}.jpg")
    csv = tmp_path / "m.csv"
    pd.DataFrame({"path": ["a0.jpg", "a1.jpg", "a2.jpg", "b0.jpg", "b1.jpg", "b2.jpg", "a0.jpg"],
                  "city": ["a", "a", "a", "b", "b", "b", "b"]}).to_csv(csv, index=False)
    records, rejected = inventory.load_records(csv)
    assert list(rejected["reason"]) == ["line 2 of m.csv: listed for two cities: a, b",
                                        "line 8 of m.csv: listed for two cities: a, b"]
    assert str(tmp_path / "a0.jpg") not in set(records["path"])


def test_reasons_say_what_happened(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "dir.jpg").mkdir()
    os.symlink(folder / "loop.jpg", folder / "loop.jpg")            # points at itself
    denied = solid(folder / "denied.jpg")
    real_open = Image.open

    def open_(path, *a, **k):                                        # root reads every file
        if Path(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(Image, "open", open_)
    assert inventory.check_file(str(folder / "dir.jpg")) == "is a directory, not an image file"
    assert inventory.check_file(str(folder / "loop.jpg")) == "cannot read: symlink loop"
    assert inventory.check_file(str(denied)) == "permission denied"


UNPRIVILEGED = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]   # nobody


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_permissions_for_real_a_file_and_a_folder_nobody_may_read():
    """The two permission cases above without a simulated error: chmod 000 and the data stage
    run as a user the mode applies to (root reads everything, so as root it runs as nobody)."""
    import json
    import shutil
    import subprocess
    import sys
    import tempfile

    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.fail("running as root without setpriv (util-linux): cannot drop to an unprivileged user")
    root = Path(tempfile.mkdtemp(prefix="citylib-perm-"))     # not under pytest's root-only tmp
    try:
        root.chmod(0o755)
        for city in ("a", "b"):
            for i in range(2):
                solid(root / city / f"{i}.jpg")
        denied = solid(root / "a" / "denied.jpg")
        solid(root / "b" / "locked" / "x.jpg")
        for p in root.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        denied.chmod(0)
        (root / "b" / "locked").chmod(0)
        script = ("import json, sys; from citylib.data import inventory\n"
                  "records, rejected = inventory.load_records(sys.argv[1])\n"
                  "records, bad = inventory.validate(records, progress=False)\n"
                  "print(json.dumps({'records': sorted(records['path']), 'rejected': {"
                  "**dict(zip(rejected['path'], rejected['reason'])), **dict(zip(bad['path'], bad['reason']))}}))")
        cmd = ([*UNPRIVILEGED] if os.geteuid() == 0 else []) + [sys.executable, "-c", script, str(root)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        got = json.loads(done.stdout.strip().splitlines()[-1])
        names = {Path(p).relative_to(root).as_posix(): why for p, why in got["rejected"].items()}
        assert names == {"a/denied.jpg": "permission denied",
                         "b/locked": "folder not readable: permission denied"}
        assert len(got["records"]) == 4
    finally:
        for p in (root / "a" / "denied.jpg", root / "b" / "locked"):
            p.chmod(0o755)
        shutil.rmtree(root)


def test_an_unreadable_city_sub_folder_is_listed_not_lost(tmp_path, monkeypatch):
    for city in ("a", "b"):
        for i in range(2):
            solid(tmp_path / city / f"{i}.jpg")
    solid(tmp_path / "a" / "locked" / "x.jpg")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == tmp_path / "a" / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    records, rejected = inventory.load_records(tmp_path)
    assert reasons(rejected) == {"locked": "folder not readable: permission denied"}
    assert len(records) == 4


def _city(folder, n_groups, views=1, size=8):
    """A city folder of ``n_groups`` groups of ``views`` small images each, named <group>_<view>."""
    folder.mkdir(parents=True)
    for g in range(n_groups):
        for v in range(views):
            Image.new("RGB", (size, size), (g * 40 % 256, v * 60, 90)).save(folder / f"p{g}_{v}.png")


@pytest.mark.parametrize("layout, lines", [
    ({"a": 0, "b": 0}, ["a: city folder is empty", "b: city folder is empty"]),
    ({"a": 4}, ["only one city ('a') has images"]),
    ({"a": 4, "b": 2}, ["city 'b' has 2 group(s) (4 images); at least 3 are needed"]),
])
def test_dataset_problems_stop_citylib_run_before_any_notebook(tmp_path, capsys, layout, lines):
    """What a user must fix in the dataset is found before anything runs: exit 2, one line per
    problem naming the folder, and no notebook executed."""
    src = tmp_path / "photos"
    for city, groups in layout.items():
        if groups:
            _city(src / city, groups, views=2)
        else:
            (src / city).mkdir(parents=True)
    params = tmp_path / "p.yaml"
    params.write_text(f"arch: simple\nseed: 0\ndata:\n  source: {src}\n  group_pattern: '^(p\\d+)_'\n")
    assert cli.main(["run", "--params", str(params), "--outputs", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    for line in lines:
        assert sum(line in ln and str(src) in ln for ln in err.splitlines()) == 1, (line, err)
    assert not (tmp_path / "out" / "data" / "01_data.ipynb").exists()
    assert not list((tmp_path / "out").rglob("*.ipynb"))
