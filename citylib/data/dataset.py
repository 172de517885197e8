"""Data stage: find the images, check every file, split without leakage, build the image cache.

Reads a generated world (``source: world``; made by ``citylib.synth`` under
``<outputs>/world/<hash>/``), a folder with one sub-folder per city, or a manifest CSV
(columns path, city; optional group, view, label_path). Writes into ``out``
(default ``<outputs>/data``): ``manifest.csv`` (path, city, group, view, label_path, split),
``rejected.csv`` (path, reason), ``snapshot.json``, ``cache/<key>/`` (see ``citylib.imagecache``) and,
for a generated world, ``counterfactual/<key>/`` (see ``citylib.counterfactual``).

Together they are the dataset's *snapshot*: the accepted files with each one's size and mtime,
the rejected ones and the split, frozen. Every later stage reads the current snapshot and never
rebuilds it; the snapshot's key is its cache folder's key (the decoded pixels, the cities and the
split), which keys a training. The stage itself is keyed by its settings, the source's file
listing (paths, sizes, mtimes) and its code: a rerun with all of them unchanged reuses the
snapshot; otherwise it says what changed in the source ("source changed: 12 files added,
1 removed") and builds a new one.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from citylib.core import paths
from citylib.core.artifacts import ResultFolder, StaleError, code_key, read_json, write_csv, write_json
from citylib.core.config import check, config_hash, to_dict
from citylib.data import counterfactual, places
from citylib.data.imagecache import Cache, build_cache, file_stats, load_cache
from citylib.data.inventory import GROUP_PATTERNS, MAX_PIXELS, DatasetError, load_records, validate
from citylib.data.splits import SplitError, split_groups
from citylib.world import synth
from citylib.world.synth import SynthConfig

MANIFEST_COLUMNS = ["path", "city", "group", "view", "label_path", "split"]


@dataclass(frozen=True)
class DataConfig:
    """Settings of the data stage (the ``data:`` section of a parameter file)."""

    source: str = "world"  # "world", a folder of city folders, or a manifest CSV
    world: SynthConfig = field(default_factory=SynthConfig)  # used when source == "world"
    image_size: int = 64  # side of the square cached images (the network input; paper: 224)
    split: tuple[float, float, float] = (6.0, 2.0, 2.0)  # train:val:test (the earlier classifier: 4:1:1)
    split_seed: int = 0
    group_pattern: str | None = None  # regex on the file stem (or a GROUP_PATTERNS name); group
    #                                   'group' (or the first, or the whole match) is the id
    cities: tuple[str, ...] | None = None  # a subset of the cities, or all
    max_pixels: int = MAX_PIXELS  # larger images are rejected as too large
    place_pattern: str | None = None  # regex on the file stem with named groups lat, lon (and
    #                                   date), or 'streetview'; a manifest's lat/lon/date columns win
    split_by: str = "group"  # group: whole groups per split; block: no two images closer than
    #                          block_m metres in different splits (needs coordinates)
    block_m: float = 100.0
    cue_free_spots: int = 120  # generated world: fresh spots per city rendered cue-free, for the
    #                            cue-free check (``counterfactual``); the test spots alone are few
    deletion_spots: int = 40  # generated world: test spots per city re-rendered without each object
    #                           kind they show, the truth removal operators are calibrated against

    def __post_init__(self):
        if not self.source.strip():
            raise ValueError("'source' must be 'world', a folder or a CSV file")
        check(self, image_size="in [8, 4096]", split_seed=">= 0")
        split = tuple(float(r) for r in self.split)
        if len(split) != 3 or not all(math.isfinite(r) and r > 0 for r in split):
            raise ValueError(f"'split' must be three positive ratios (train, val, test), got {self.split}")
        object.__setattr__(self, "split", split)  # 4 and 4.0 must hash alike
        if self.group_pattern in GROUP_PATTERNS:
            object.__setattr__(self, "group_pattern", GROUP_PATTERNS[self.group_pattern])
        if self.group_pattern is not None:
            try:
                re.compile(self.group_pattern)
            except re.error as e:
                raise ValueError(f"'group_pattern' = {self.group_pattern!r} is not a regex: {e}") from None
        object.__setattr__(self, "place_pattern", places.check_pattern(self.place_pattern))
        check(self, split_by=("group", "block"), block_m="> 0")
        if self.cities is not None:
            cities = tuple(self.cities)
            if len(cities) < 2 or len(set(cities)) != len(cities):
                raise ValueError(f"'cities' must name at least two distinct cities, got {list(cities)}")
            object.__setattr__(self, "cities", cities)
        if self.max_pixels < 1:
            raise ValueError(f"'max_pixels' must be >= 1, got {self.max_pixels}")
        if not 0 <= self.cue_free_spots <= 100_000:
            raise ValueError(f"'cue_free_spots' must be in 0..100000, got {self.cue_free_spots}")
        if not 0 <= self.deletion_spots <= 100_000:
            raise ValueError(f"'deletion_spots' must be in 0..100000, got {self.deletion_spots}")


@dataclass(frozen=True)
class DataResult:
    """What ``run`` made: the split manifest, the rejected files and the cache folder."""

    manifest: pd.DataFrame  # MANIFEST_COLUMNS, one row per accepted image
    rejected: pd.DataFrame  # path, reason
    cache_dir: Path
    cities: tuple[str, ...]
    folder: Path  # the stage's output folder
    reused: bool  # True when a previous identical run was reused
    changes: str | None = None  # how the source differs from the previous snapshot, if any

    @property
    def key(self) -> str:
        """The snapshot's key: that of its cache (pixels, cities, split)."""
        return self.cache_dir.name


# ---------------------------------------------------------------- the stage

NAME = "data"   # the stage's result marker in its folder


def run(cfg: DataConfig, out: str | os.PathLike | None = None, *, progress: bool = True) -> DataResult:
    """Find, check, split and cache the dataset of ``cfg`` into ``out`` (reusing a finished run)."""
    out = paths.resolve(out) if out is not None else paths.outputs() / "data"
    source, records, rejected, listing = _scan(cfg, out)
    folder = ResultFolder(out, NAME, _key(cfg, source, listing, rejected, records))
    if folder.done() is not None:
        return _result(folder, reused=True)
    changes = describe_changes(_listing(read_snapshot(out)), listing)
    if changes:
        tqdm.write(f"{out}: {changes}: building a new snapshot")
    folder.begin()

    ok, bad = validate(_opened(records, out.parent), cfg.max_pixels, progress=progress)
    ok, bad = _inside(ok, out.parent), _inside(bad, out.parent)
    rejected = pd.concat([rejected, bad], ignore_index=True)
    write_csv(out / "rejected.csv", rejected)
    for city, n in records["city"].value_counts().sort_index().items():
        if not (ok["city"] == city).any():
            raise DatasetError(f"{source}: city {city!r} has no usable image ({n} rejected; "
                               f"see {out / 'rejected.csv'})")
    ok, rejected = _placed(cfg, ok, rejected, out)
    write_csv(out / "rejected.csv", rejected)
    try:
        units = ok.assign(group=ok["block"]) if cfg.split_by == "block" else ok
        ok["split"] = split_groups(units, cfg.split, cfg.split_seed)
    except SplitError as e:
        raise DatasetError(f"{source}: {e}" + (f" (split_by: block, block_m {cfg.block_m:g})"
                                                 if cfg.split_by == "block" else "")) from None
    for line in places.skewed(ok, cfg.split) if cfg.split_by == "block" else ():
        tqdm.write(f"{out}: split_by: block, block_m {cfg.block_m:g}: {line}")
    manifest = ok[MANIFEST_COLUMNS + [c for c in ("lat", "lon", "date", "block") if c in ok]]
    cache_dir = build_cache(manifest, cfg.image_size, out / "cache", progress=progress, base=out.parent)
    cf_dir = None
    if cfg.source == "world":   # each test spot without each planted cue, once per snapshot
        cf_dir = counterfactual.build(cfg.world, manifest, cache_dir.name, cfg.image_size,
                                      out / "counterfactual", cfg.cue_free_spots, progress=progress,
                                      deletion_spots=cfg.deletion_spots)
    write_csv(out / "manifest.csv", manifest)
    cities = tuple(sorted(manifest["city"].unique()))
    write_json(out / "snapshot.json", {"key": cache_dir.name, "source": str(source),
                                       "files": listing, "config": to_dict(cfg)})
    placed = ["place_problems.csv"] if (out / "place_problems.csv").is_file() else []
    folder.commit(["manifest.csv", "rejected.csv", "snapshot.json", f"cache/{cache_dir.name}/meta.json", *placed,
                   *([f"counterfactual/{cf_dir.name}/meta.json"] if cf_dir else [])],
                  settings=config_hash(cfg), snapshot=cache_dir.name, cities=list(cities),
                  counterfactual=cf_dir.name if cf_dir else None,
                  changes=changes, images={"accepted": len(manifest), "rejected": len(rejected)},
                  splits=manifest["split"].value_counts().sort_index().to_dict())
    return _result(folder, reused=False)


def _placed(cfg: DataConfig, ok: pd.DataFrame, rejected: pd.DataFrame, out: Path):
    """(records, rejected) with each image's place: ``lat``, ``lon``, ``date`` where the dataset
    has them (``place_problems.csv`` lists every value that could not be read) and, for
    ``split_by: block``, its ``block`` (images without coordinates are rejected)."""
    if cfg.place_pattern is None and not any(c in ok for c in places.COLUMNS):
        (out / "place_problems.csv").unlink(missing_ok=True)      # an earlier snapshot's
        if cfg.split_by == "block":
            raise DatasetError(f"{cfg.source}: split_by: block needs coordinates: a manifest with lat "
                               "and lon columns, or data.place_pattern to read them from file names")
        return ok, rejected
    ok, problems = places.read(ok, cfg.place_pattern)
    write_csv(out / "place_problems.csv", problems)
    if len(problems):
        tqdm.write(f"{out}: {len(problems)} coordinate or date value(s) could not be read; "
                   f"see {out / 'place_problems.csv'}")
    if cfg.split_by == "block":
        lost = ok["lat"].isna() | ok["lon"].isna()
        rejected = pd.concat([rejected, pd.DataFrame({
            "path": ok.loc[lost, "path"].astype(str),
            "reason": "no coordinates: split_by: block places every image by its lat and lon"})],
            ignore_index=True)
        gone = sorted(set(ok["city"]) - set(ok.loc[~lost, "city"]))
        if gone:
            raise DatasetError(f"{cfg.source}: split_by: block, but no image of city {gone[0]!r} has coordinates "
                               f"(see {out / 'place_problems.csv'})")
        ok = ok[~lost].reset_index(drop=True)
        ok["block"] = places.clusters(ok, cfg.block_m)
    unknown = ["lat", "lon"] if ok["lat"].isna().all() or ok["lon"].isna().all() else []
    return ok.drop(columns=unknown + (["date"] if ok["date"].eq("").all() else [])), rejected


def key(cfg: DataConfig, out: str | os.PathLike | None = None) -> str:
    """The key the data stage has for ``cfg`` now (its settings, the source's files, its code)."""
    out = paths.resolve(out) if out is not None else paths.outputs() / "data"
    source, records, rejected, listing = _scan(cfg, out)
    return _key(cfg, source, listing, rejected, records)


def problems(cfg: DataConfig) -> list[str]:
    """What a user must fix before the data stage can run, one line each naming the path: the
    source missing or unreadable, city folders without images, a single city, a group pattern
    that matches nothing, or a city with fewer than the 3 groups a split needs. Found from the
    file listing alone, before any image is decoded (a generated world's file is checked with
    the parameter files)."""
    if cfg.source == "world":
        return []
    source = paths.resolve(cfg.source)
    try:
        records, _ = load_records(source, cfg.group_pattern, cfg.cities)
    except DatasetError as e:
        return str(e).splitlines()
    found = []
    groups = records.groupby("city")["group"].nunique()
    for city, n in groups.items():
        if n < 3:
            found.append(f"{source}: city {city!r} has {n} group(s) "
                         f"({int((records['city'] == city).sum())} images); at least 3 are needed "
                         "so that train, val and test each get one")
    spans = records.groupby("group")["city"].nunique()
    found += [f"{source}: group {g!r} spans cities {sorted(records.loc[records['group'] == g, 'city'].unique())}; "
              "a group must belong to one city" for g in spans[spans > 1].index[:5]]
    return found


def changes(cfg: DataConfig, out: str | os.PathLike) -> str | None:
    """How the source differs from the current snapshot ("source changed: ..."), or None."""
    return describe_changes(_listing(read_snapshot(out)), _scan(cfg, paths.resolve(out))[3])


def _key(cfg: DataConfig, source: Path, listing: list, rejected: pd.DataFrame, records: pd.DataFrame) -> str:
    """The stage's settings, source, file listing, rejections, code, and what a manifest says of
    each image beyond its file (its place: an edited lat, lon or date makes a new snapshot)."""
    placed = records[[c for c in ("path", "group", "lat", "lon", "date") if c in records]]
    return config_hash(NAME, code_key(__name__), cfg, str(source), listing,
                       rejected.to_numpy().tolist(), placed.astype(str).to_numpy().tolist())


def _scan(cfg: DataConfig, out: Path) -> tuple[str, pd.DataFrame, pd.DataFrame, list]:
    """(source, records, files rejected unread, listing: [path, size, mtime_ns] of every file).
    Paths inside the outputs folder (``out``'s parent: a generated world) are relative to it,
    so that the outputs folder keys alike wherever it is moved or copied."""
    source = _source(cfg, out)
    records, rejected = load_records(source, cfg.group_pattern, cfg.cities)
    records, rejected = _inside(records, out.parent), _inside(rejected, out.parent)
    listing = [f for pair in file_stats(records, out.parent) for f in pair if f is not None]
    return _relative(str(source), out.parent), records, rejected, listing


def _relative(path: str, base: Path) -> str:
    """``path`` relative to the outputs folder ``base`` when it is a file of the generated world
    there (``<outputs>/world/``), else as it is: a user's own files never move with the outputs."""
    if not path or not os.path.isabs(path):
        return path
    inside = os.path.relpath(path, base)
    return Path(inside).as_posix() if inside.startswith("world" + os.sep) else path


def _inside(frame: pd.DataFrame, base: Path) -> pd.DataFrame:
    """``frame`` with its path columns relative to the outputs folder where they lie inside it."""
    return frame.assign(**{c: [_relative(str(p), base) for p in frame[c]]
                           for c in ("path", "label_path") if c in frame})


def _opened(frame: pd.DataFrame, base: Path) -> pd.DataFrame:
    """``frame`` with its relative paths made absolute again, to open the files."""
    return frame.assign(**{c: [p if not p or os.path.isabs(p) else str(base / p) for p in frame[c]]
                           for c in ("path", "label_path") if c in frame})


def _listing(snapshot: dict | None) -> list | None:
    return None if snapshot is None else snapshot.get("files")


def describe_changes(old: list | None, new: list) -> str | None:
    """"source changed: a files added, r removed, m modified" between two listings, or None."""
    if old is None:
        return None
    before, after = ({f[0]: tuple(f[1:]) for f in files} for files in (old, new))
    added, removed = len(after.keys() - before.keys()), len(before.keys() - after.keys())
    modified = sum(before[p] != after[p] for p in after.keys() & before.keys())
    if not (added or removed or modified):
        return None
    return f"source changed: {added} files added, {removed} removed, {modified} modified"


def read_snapshot(out: str | os.PathLike) -> dict | None:
    """The current snapshot's ``snapshot.json`` in the data folder ``out``, if it is finished."""
    marker = ResultFolder(out, NAME).finished()
    return None if marker is None else read_json(Path(out) / "snapshot.json")


def current(cfg: DataConfig, out: str | os.PathLike | None = None) -> DataResult:
    """The current snapshot of ``cfg``'s dataset, as it is: never rebuilt here, even when the
    source changed since. StaleError when the data folder holds no snapshot of these settings."""
    out = paths.resolve(out) if out is not None else paths.outputs() / "data"
    return _result(ResultFolder(out, NAME, _current(cfg, out)["key"]), reused=True)


def load(cfg: DataConfig, out: str | os.PathLike | None = None) -> Cache:
    """The image cache of the current snapshot of ``cfg``'s dataset (see ``current``)."""
    out = paths.resolve(out) if out is not None else paths.outputs() / "data"
    return load_cache(out / "cache" / _current(cfg, out)["snapshot"])


def load_counterfactuals(cfg: DataConfig, out: str | os.PathLike | None = None):
    """The current snapshot's counterfactual test images (``counterfactual.CounterfactualSet``),
    or None when its source is not a generated world."""
    out = paths.resolve(out) if out is not None else paths.outputs() / "data"
    name = _current(cfg, out).get("counterfactual")
    return None if name is None else counterfactual.load(out / "counterfactual" / name)


def _current(cfg: DataConfig, out: Path) -> dict:
    """The marker of the finished snapshot in ``out`` if it has ``cfg``'s settings."""
    marker = ResultFolder(out, NAME).finished()
    if marker is None:
        raise StaleError(f"{out}: no data snapshot yet; run the data stage first "
                         "(notebook 01, or `citylib run`)")
    if marker.get("settings") != config_hash(cfg):
        raise StaleError(f"{out}: the data snapshot there was made with other data settings; "
                         "run the data stage for these (notebook 01, or `citylib run`)")
    return marker


def _result(folder: ResultFolder, reused: bool) -> DataResult:
    out, marker = folder.folder, folder.read()
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    rejected = pd.read_csv(out / "rejected.csv", dtype=str, keep_default_na=False)
    return DataResult(manifest.astype({"view": int}), rejected, out / "cache" / marker["snapshot"],
                      tuple(marker["cities"]), out, reused, marker.get("changes"))


def _source(cfg: DataConfig, out: Path) -> Path:
    """The folder or manifest to read; a generated world is made (or reused) beside ``out``."""
    if cfg.source != "world":
        return paths.resolve(cfg.source)
    # keyed by everything the files depend on: an edited world YAML or a new generator gets
    # its own folder instead of meeting the old files
    return Path(synth.run(cfg.world, out.parent / "world" / synth.world_hash(cfg.world)))
