"""Counterfactual test images of a generated world: each test spot re-rendered with one of its
city's planted cues reset to the base style, and cue-free (every element reset at once).

Everything else about a counterfactual view is drawn identically (``synth.render_spot`` with
``reset``: layout, the other objects, camera, lighting, haze, noise, JPEG quality), and it goes
through the same JPEG encoding, decoding and resizing as the cached original
(``imagecache.prepare``). The data stage builds this once per data snapshot, never per run.

For the cue-free check (``causal.cue_free``) the test spots are a small sample, shared by every
run; ``fresh`` more spots per city, numbered after the world's own (``spots_per_city`` on, so no
split holds them), are rendered cue-free only, every view.

For the calibration of removal operators, the first ``deletion_spots`` test spots of each city
are also re-rendered without each object kind they show (``street.DELETABLE``: what stood behind
it drawn instead), the true deletion; its mask is the pixels whose label it changed. The same
spots are also rendered with each planted cue of each other city added (its element drawn as
that city draws it): whether a cue is enough to move the decision (sufficiency), beside whether
the network needs it (necessity).

Reads the snapshot's manifest (test rows: their city, spot ``group`` and view) and the world.
Writes ``<data>/counterfactual/<key>/``: ``images.npy`` (M, S, S, 3) uint8, ``index.csv``
(row = the original's cache row, city, group, view, variant), ``fresh.npy`` / ``fresh.csv``
(city, group, view: the fresh spots' cue-free views), ``deleted.npy`` (D, S, S, 3) uint8,
``deleted_masks.npy`` (D, S, S) bool and ``deleted.csv`` (row, city, group, view, object),
``added.npy`` (A, S, S, 3) uint8 and ``added.csv`` (row, city, group, view, donor, object), and
``meta.json``. The key hashes the world's files' hash, the snapshot's key, the image size, the
numbers of fresh and deletion spots and this code.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from citylib.core.artifacts import atomic_dir, code_key, write_csv, write_json
from citylib.core.config import config_hash
from citylib.data.imagecache import prepare
from citylib.world import scene, street, synth, worldfile

CUE_FREE = worldfile.CUE_FREE
INDEX_COLUMNS = ["row", "city", "group", "view", "variant"]
FRESH_COLUMNS = ["city", "group", "view"]
DELETED_COLUMNS = ["row", "city", "group", "view", "object"]
ADDED_COLUMNS = ["row", "city", "group", "view", "donor", "object"]


@dataclass(frozen=True)
class CounterfactualSet:
    """The counterfactual test images of one snapshot; ``images`` is a read-only memory map."""

    folder: Path
    images: np.ndarray     # (M, S, S, 3) uint8
    index: pd.DataFrame    # M rows: row (cache row of the original), city, group, view, variant
    fresh_images: np.ndarray   # (F, S, S, 3) uint8: cue-free views of the fresh spots
    fresh_index: pd.DataFrame  # F rows: city, group, view
    deleted_images: np.ndarray = None   # (D, S, S, 3) uint8: test views without one object kind
    deleted_masks: np.ndarray = None    # (D, S, S) bool: the pixels that deletion changed
    deleted_index: pd.DataFrame = None  # D rows: row (the original's cache row), city, group, view, object
    added_images: np.ndarray = None     # (A, S, S, 3) uint8: test views with another city's cue added
    added_index: pd.DataFrame = None    # A rows: row, city, group, view, donor (the cue's city), object

    @property
    def key(self) -> str:
        return self.folder.name

    def variants(self, city: str) -> list[str]:
        """The city's variants: its planted cues in world order, then CUE_FREE."""
        return list(dict.fromkeys(self.index.loc[self.index["city"] == city, "variant"]))


def variants(world: worldfile.World, city: str) -> list[str]:
    """What a test image of ``city`` is re-rendered without: each planted cue, then all at once."""
    return [o for o, _ in world.planted[city]] + [CUE_FREE]


def spot_of(group: str) -> int:
    """The spot number of a generated world's group id ``<city>_<spot:04d>``."""
    return int(str(group).rsplit("_", 1)[1])


def group_of(city: str, spot: int) -> str:
    """The group id of a generated world's spot (``synth`` names its files so)."""
    return f"{city}_{spot:04d}"


def key(world_cfg: synth.SynthConfig, snapshot: str, image_size: int, fresh: int = 0,
        deletion_spots: int = 0) -> str:
    return config_hash("counterfactual", code_key(__name__), synth.world_hash(world_cfg), snapshot,
                       int(image_size), int(fresh), int(deletion_spots))


def build(world_cfg: synth.SynthConfig, manifest: pd.DataFrame, snapshot: str, image_size: int,
          root: str | Path, fresh: int = 0, workers: int = 2, progress: bool = True,
          deletion_spots: int = 0) -> Path | None:
    """Render (or reuse) the counterfactuals of the test rows of ``manifest`` (the snapshot's,
    in cache row order), the cue-free views of ``fresh`` new spots per city and the deletions of
    ``deletion_spots`` test spots per city under ``root``; returns the folder (None: no test row
    of the world's cities)."""
    folder = Path(root) / key(world_cfg, snapshot, image_size, fresh, deletion_spots)
    world = worldfile.load_world(world_cfg.world)
    test = manifest.reset_index(drop=True)
    test = test[(test["split"] == "test") & test["city"].isin(list(world.planted))]
    if test.empty:   # no test image of a city the world defines: nothing to re-render
        return None
    calibrated = {g for _, groups in test.groupby("city")["group"] for g in sorted(set(groups))[:deletion_spots]}
    tasks = [(city, spot_of(group), sorted(zip(rows["view"].astype(int), rows.index)), None, group in calibrated)
             for (city, group), rows in test.groupby(["city", "group"], sort=True)]
    first = world_cfg.spots_per_city
    cities = sorted(set(test["city"]))
    tasks += [(city, spot, [(v, -1) for v in range(world_cfg.views)], CUE_FREE, False)
              for city in cities for spot in range(first, first + int(fresh))]
    with atomic_dir(folder) as tmp:
        if tmp is None:
            return folder
        job = partial(_render, world, world_cfg, int(image_size))
        bar = dict(total=len(tasks), desc="counterfactuals", disable=not progress)
        if workers > 1 and len(tasks) > 1:
            with synth.worker_pool(workers) as pool:
                done = list(tqdm(pool.imap(job, tasks), **bar))
        else:
            done = [job(t) for t in tqdm(tasks, **bar)]
        parts = {True: ([], []), False: ([], [])}          # test spots, fresh spots: (records, images)
        deleted, added = ([], [], []), ([], [])            # records, images (, masks)
        for (rows, imgs, gone, more), task in zip(done, tasks):
            records, images = parts[task[3] is None]
            records += rows if task[3] is None else [r[1:4] for r in rows]
            images += imgs
            for part, new in zip(deleted, gone):
                part += new
            for part, new in zip(added, more):
                part += new
        for name, csv, columns, test_part in (("images", "index.csv", INDEX_COLUMNS, True),
                                              ("fresh", "fresh.csv", FRESH_COLUMNS, False)):
            records, images = parts[test_part]
            stack = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
            np.save(tmp / f"{name}.npy", stack)
            write_csv(tmp / csv, pd.DataFrame(records, columns=columns))
        records, images, masks = deleted
        np.save(tmp / "deleted.npy", np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8))
        np.save(tmp / "deleted_masks.npy", np.stack(masks) if masks else np.zeros((0, image_size, image_size), bool))
        write_csv(tmp / "deleted.csv", pd.DataFrame(records, columns=DELETED_COLUMNS))
        np.save(tmp / "added.npy", np.stack(added[1]) if added[1] else np.zeros((0, image_size, image_size, 3), np.uint8))
        write_csv(tmp / "added.csv", pd.DataFrame(added[0], columns=ADDED_COLUMNS))
        write_json(tmp / "meta.json", {"key": folder.name, "snapshot": snapshot, "world": synth.world_hash(world_cfg),
                                       "image_size": int(image_size), "n": len(parts[True][0]),
                                       "fresh_spots": int(fresh), "fresh_spot_numbers": [first, first + int(fresh)],
                                       "deletion_spots": int(deletion_spots), "deleted": len(deleted[0]),
                                       "variants": {c: variants(world, c) for c in world.planted}})
    return folder


def _render(world: worldfile.World, cfg: synth.SynthConfig, size: int, task) -> tuple[list, list, tuple, tuple]:
    """One spot's counterfactual views: a test spot's under every variant of its city (and, with
    ``deletions``, without each object kind it shows and with each other city's cue added), a
    fresh spot's (``only`` = CUE_FREE) cue-free only."""
    city, spot, views, only, deletions = task
    rows, images = [], []
    for variant in ([only] if only else variants(world, city)):
        reset = CUE_FREE if variant == CUE_FREE else (variant,)
        images += cached_views(world, cfg, size, city, spot, [v for v, _ in views], reset)
        rows += [(int(row), city, group_of(city, spot), int(view), variant) for view, row in views]
    return (rows, images, deleted(world, cfg, size, city, spot, views) if deletions else ([], [], []),
            added(world, cfg, size, city, spot, views) if deletions else ([], []))


def added(world: worldfile.World, cfg: synth.SynthConfig, size: int, city: str, spot: int,
          views: list[tuple[int, int]]) -> tuple[list, list]:
    """The spot's ``views`` ((view, cache row) pairs) with each planted cue of each other city
    added, one at a time: the records (ADDED_COLUMNS) and the images."""
    records, images = [], []
    for donor in sorted(world.planted):
        for cue, _ in (world.planted[donor] if donor != city else ()):
            got = cached_views(world, cfg, size, city, spot, [v for v, _ in views], adopt=((donor, cue),))
            records += [(int(row), city, group_of(city, spot), int(view), donor, cue) for view, row in views]
            images += got
    return records, images


def deleted(world: worldfile.World, cfg: synth.SynthConfig, size: int, city: str, spot: int,
            views: list[tuple[int, int]]) -> tuple[list, list, list]:
    """The spot's ``views`` ((view, cache row) pairs) without each object kind they show: the
    records (DELETED_COLUMNS), the images and the masks of the pixels whose label changed."""
    base = cached_views(world, cfg, size, city, spot, [v for v, _ in views], labels=True)
    records, images, masks = [], [], []
    for name in street.DELETABLE:
        if not any((label == scene.VOCAB[name]).any() for _, label in base):
            continue
        gone = cached_views(world, cfg, size, city, spot, [v for v, _ in views], delete=(name,), labels=True)
        for (view, row), (_, label), (image, label_gone) in zip(views, base, gone):
            if (changed := label != label_gone).any():
                records.append((int(row), city, group_of(city, spot), int(view), name))
                images.append(image)
                masks.append(changed)
    return records, images, masks


def cached_views(world: worldfile.World, cfg: synth.SynthConfig, size: int, city: str, spot: int,
                 views: list[int], reset=(), delete=(), labels: bool = False, adopt=()) -> list:
    """Views of a spot as the cache holds them, (S, S, 3) uint8 each: rendered (with ``reset``,
    without the kinds in ``delete``), JPEG-encoded at the view's quality as ``synth`` saves it,
    decoded and resized by ``imagecache.prepare``; with ``labels``, (image, (S, S) label map)
    pairs. With no reset and nothing deleted, exactly the cached original's pixels."""
    rendered = synth.render_spot(world, city, spot, cfg.views, cfg.size, cfg.seed, reset=reset, delete=delete,
                                 adopt=adopt)
    out = []
    for view in views:
        v, buf, lab = rendered[view], io.BytesIO(), None
        Image.fromarray(v["image"], "RGB").save(buf, format="JPEG", quality=v["quality"])
        buf.seek(0)
        if labels:                                       # as synth saves it: a PNG of class indices
            lab = io.BytesIO()
            Image.fromarray(v["label"], "L").save(lab, format="PNG")
            lab.seek(0)
        image, label, _ = prepare(buf, lab, size)
        out.append((image, label) if labels else image)
    return out


def load(folder: str | Path) -> CounterfactualSet:
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"{folder}: no counterfactual images; run the data stage")
    index = pd.read_csv(folder / "index.csv", dtype={"city": str, "group": str, "variant": str})
    fresh = pd.read_csv(folder / "fresh.csv", dtype={"city": str, "group": str})
    gone = pd.read_csv(folder / "deleted.csv", dtype={"city": str, "group": str, "object": str})
    more = pd.read_csv(folder / "added.csv", dtype={"city": str, "group": str, "donor": str, "object": str})
    return CounterfactualSet(folder, np.load(folder / "images.npy", mmap_mode="r"), index,
                             np.load(folder / "fresh.npy", mmap_mode="r"), fresh,
                             np.load(folder / "deleted.npy", mmap_mode="r"),
                             np.load(folder / "deleted_masks.npy", mmap_mode="r"), gone,
                             np.load(folder / "added.npy", mmap_mode="r"), more)
