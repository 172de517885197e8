"""Segmentation stage: ground truth, the real ADE20K model on a few photos, errors, reuse."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from citylib.core import paths
from citylib.core.config import ConfigError, from_dict
from citylib.data import segment
from citylib.data.imagecache import Cache
from citylib.data.segment import SegmentConfig, SegmentError

SKY, BUILDING, ROAD, TREE, CAR = 3, 2, 7, 5, 21


def need(path: Path) -> Path:
    """A file from the shared folder; FAIL (not skip) when it is missing."""
    if not path.exists():
        pytest.fail(f"{path} is missing: these tests need the shared models and sample photos "
                    f"(set $CITYLIB_SHARED to the folder holding models/ and samples/, or "
                    f"$CITYLIB_ADE20K to the ADE20K model folder)")
    return path


def fake_cache(folder: Path, files: list[str], cities: list[str], size: int = 32,
               labels: np.ndarray | None = None) -> Cache:
    """A Cache over ``files``; rows have label maps where ``labels`` is given."""
    n = len(files)
    has = labels is not None
    index = pd.DataFrame({"path": files, "city": cities, "group": files, "view": 0,
                          "label_path": "", "split": "test", "has_labels": has})
    city_names = tuple(sorted(set(cities)))
    return Cache(folder=folder, images=np.zeros((n, size, size, 3), np.uint8),
                 labels=labels if has else np.zeros((n, size, size), np.uint8), index=index,
                 cities=city_names, y=np.array([city_names.index(c) for c in cities]))


def photos(per_city: int = 3) -> tuple[list[str], list[str]]:
    root = need(paths.shared() / "samples" / "streetview")
    files, cities = [], []
    for city in sorted(p.name for p in root.iterdir() if p.is_dir())[:2]:
        found = sorted((root / city).glob("*.jpg"))[:per_city]
        assert len(found) == per_city, f"{root / city}: expected at least {per_city} JPEGs"
        files += [str(f) for f in found]
        cities += [city] * per_city
    return files, cities


# ---------------------------------------------------------------- no model needed


def test_config_is_strict():
    assert from_dict(SegmentConfig, {"segmenter": "ade20k", "threads": 1}).threads == 1
    with pytest.raises(ConfigError, match="segmenter"):
        from_dict(SegmentConfig, {"segmenter": "deeplab"})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(SegmentConfig, {"model": "x"})
    with pytest.raises(ConfigError, match="threads"):
        from_dict(SegmentConfig, {"threads": 0})


def test_ground_truth_is_the_cache_labels(tmp_path):
    labels = np.random.default_rng(0).integers(0, 151, (4, 32, 32), dtype=np.uint8)
    cache = fake_cache(tmp_path / "c1", [f"/x/{i}.jpg" for i in range(4)], ["a", "a", "b", "b"],
                       labels=labels)
    for name in ("auto", "ground_truth"):
        result = segment.run(SegmentConfig(segmenter=name), tmp_path / "seg", cache)
        assert result.segmenter == "ground_truth" and result.labels is labels
        assert result.done.all() and result.folder == cache.folder
    assert not (tmp_path / "seg").exists()  # nothing to write for ground truth


def test_ground_truth_names_images_without_labels(tmp_path):
    cache = fake_cache(tmp_path / "c2", ["/data/a/one.jpg", "/data/b/two.jpg"], ["a", "b"])
    with pytest.raises(SegmentError, match=r"2 image\(s\) have no label map: /data/a/one.jpg, "
                                           r"/data/b/two.jpg.*'ade20k'"):
        segment.run(SegmentConfig(segmenter="ground_truth"), tmp_path / "seg", cache)
    # auto falls back to the model when any requested row lacks a label map
    assert segment.choose(SegmentConfig(), cache, np.arange(2)) == "ade20k"


def test_missing_model_says_where_and_how(tmp_path, monkeypatch):
    cache = fake_cache(tmp_path / "c3", ["/data/a/one.jpg", "/data/b/two.jpg"], ["a", "b"])
    monkeypatch.setenv("CITYLIB_ADE20K", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as err:
        segment.run(SegmentConfig(), tmp_path / "seg", cache)
    message = str(err.value)
    assert str(tmp_path / "nowhere" / segment.MODEL_FILE) in message
    assert "$CITYLIB_ADE20K" in message and "model_path" in message
    with pytest.raises(FileNotFoundError, match="missing.tflite.*'model_path' setting"):
        segment.run(SegmentConfig(model_path=str(tmp_path / "missing.tflite")), tmp_path / "seg", cache)


def test_nearest_index_is_pil_nearest():
    ramp = np.arange(513, dtype=np.int32)[None].repeat(2, axis=0)
    for size in (32, 96, 224, 513, 600):
        pil = np.asarray(Image.fromarray(ramp).resize((size, 2), Image.Resampling.NEAREST))[0]
        assert (segment.nearest_index(513, size) == pil).all(), size


def test_cache_key_covers_the_model_file(tmp_path):
    model = need(paths.ade20k_model_dir() / segment.MODEL_FILE)
    copy = tmp_path / "model.tflite"
    shutil.copyfile(model, copy)
    cache = fake_cache(tmp_path / "c4", ["/x/1.jpg", "/x/2.jpg"], ["a", "b"])
    cfg = SegmentConfig(segmenter="ade20k", model_path=str(copy))
    first = segment.run(cfg, tmp_path / "seg", cache, rows=[])  # no rows: makes the folder only
    assert first.folder.parent == tmp_path / "seg" and first.folder.name.startswith("ade20k_")
    assert not first.done.any() and first.labels.shape == (2, 32, 32)
    assert segment.run(cfg, tmp_path / "seg", cache, rows=[]).folder == first.folder
    os.utime(copy, ns=(0, 0))  # a touched (or replaced) model file: a new folder
    assert segment.run(cfg, tmp_path / "seg", cache, rows=[]).folder != first.folder
    other = fake_cache(tmp_path / "c5", ["/x/1.jpg", "/x/2.jpg"], ["a", "b"])  # another dataset
    assert segment.run(cfg, tmp_path / "seg", other, rows=[]).folder != first.folder


# ---------------------------------------------------------------- the real model (~7 images)


def test_ade20k_on_real_photos_with_reuse(tmp_path, monkeypatch):
    need(paths.ade20k_model_dir() / segment.MODEL_FILE)
    files, cities = photos(3)
    cache = fake_cache(tmp_path / "photos", files, cities, size=96)
    calls = []
    real = segment.Ade20k.__call__

    def spy(self, chunk, size, *args, **kwargs):
        calls.append(list(chunk))
        return real(self, chunk, size, *args, **kwargs)

    monkeypatch.setattr(segment.Ade20k, "__call__", spy)
    out = tmp_path / "seg"
    part = segment.run(SegmentConfig(), out, cache, rows=[0, 3, 4], progress=False)
    assert part.segmenter == "ade20k" and calls == [[files[0], files[3], files[4]]]
    assert part.done.tolist() == [True, False, False, True, True, False]
    full = segment.run(SegmentConfig(), out, cache, progress=False)  # only the other three run
    assert calls[1] == [files[1], files[2], files[5]] and full.folder == part.folder
    assert full.done.all() and not full.reused
    assert (full.labels[[0, 3, 4]] == part.labels[[0, 3, 4]]).all()
    again = segment.run(SegmentConfig(), out, cache, progress=False)
    assert again.reused and len(calls) == 2 and (again.labels == full.labels).all()

    labels = np.asarray(full.labels)
    assert labels.shape == (6, 96, 96) and labels.dtype == np.uint8 and labels.max() <= 150
    counts = np.bincount(labels.ravel(), minlength=151)
    top = set(np.argsort(counts)[::-1][:4].tolist())
    # Street photos: sky and road or building lead; street classes cover most pixels.
    assert SKY in top and (ROAD in top or BUILDING in top), top
    street = [BUILDING, SKY, TREE, ROAD, 10, 12, 13, 14, 18, CAR, 33, 44, 49, 88, 94]
    for i in range(6):  # every photo is mostly street classes (road, sky, tree, grass, ...)
        assert np.isin(labels[i], street).mean() > 0.7, files[i]
        assert (labels[i] == ROAD).mean() > 0.05, files[i]  # all six are taken from the road

    # Geometry: the same as segmenting at 513 and resizing the map with PIL's NEAREST.
    at513 = real(segment.Ade20k(), [files[0]], 513)[0]
    resized = np.asarray(Image.fromarray(at513).resize((96, 96), Image.Resampling.NEAREST))
    assert (resized == labels[0]).all()


def test_worker_processes_label_as_one_process(tmp_path):
    need(paths.ade20k_model_dir() / segment.MODEL_FILE)
    files, cities = photos(3)
    cache = fake_cache(tmp_path / "photos", files, cities, size=64)
    one = segment.run(SegmentConfig(segmenter="ade20k"), tmp_path / "one", cache, progress=False)
    two = segment.run(SegmentConfig(segmenter="ade20k", workers=2, threads=1), tmp_path / "two", cache,
                      progress=False)
    assert two.done.all() and one.folder.name == two.folder.name    # the same key: speed only
    assert np.array_equal(np.asarray(one.labels), np.asarray(two.labels))
    assert len(np.unique(np.asarray(two.labels))) > 3                # real maps, not zeros


def test_rows_view_reads_only_the_rows_asked_for():
    base = np.arange(6 * 2 * 2, dtype=np.uint8).reshape(6, 2, 2)
    read = []

    class Store(np.ndarray):                      # records what each read asks for
        def __getitem__(self, index):
            read.append(np.size(index))
            return np.asarray(self.view(np.ndarray)[index])

    rows = np.array([4, 0, 5, 2])
    view = segment.SegmentResult(base.view(Store), "ground_truth", Path("."), np.ones(6, bool), True).of(rows)
    assert len(view) == 4 and view.shape == (4, 2, 2) and view.ndim == 3 and view.dtype == np.uint8
    np.testing.assert_array_equal(view[1:3], base[[0, 5]])
    np.testing.assert_array_equal(view[3], base[2])
    assert read == [2, 1]
    np.testing.assert_array_equal(np.asarray(view), base[rows])
