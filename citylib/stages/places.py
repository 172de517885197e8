"""Places stage: where (and when) in each city the network finds a street typical of it.

For every test image with coordinates: its *typicality*, p(true city) under the run's network
(``predictions.csv`` of the training), the predicted city and, where the reliance stage measured
the image, its *top object*: the object whose removal lowers log p(true city) the most beyond
its matched null (``reliance_images.csv``: ``logp_removed - logp_null``, most negative), with
that change. Where the images have dates: typicality and accuracy by season and by year, each a
mean with a 95% bootstrap interval over the groups (panoramas, spots), per city.

Where the reliance stage ran: per city its strongest objects (``top``, by the mean change of
log p(true city) when removed), each image's change under each of them, for the per-object maps,
and that change by season and year. Per city: the accuracy of the test images that have a
training image of their city within ``within_m`` metres (the data's ``block_m``) beside that of
the rest, so that a split by panorama shows how much its near neighbours may flatter it.

Reads the run's ``predictions.csv``, ``reliance_images.csv`` (if there) and the data snapshot's
``manifest.csv`` (``lat``, ``lon``, ``date``, ``split``). Writes into the run folder
``places.csv`` (one row per test image: ``COLUMNS``, with the distance to the nearest training
image of its city), ``places_objects.csv`` (``OBJECT_COLUMNS``), ``places_objects_time.csv``
(``OBJECT_TIME_COLUMNS``), ``places_near.csv`` (``NEAR_COLUMNS``), ``places.geojson`` (one Point feature per test image with
coordinates, ``[lon, lat]`` as GeoJSON orders them, RFC 7946; properties city, predicted,
p_true, top_object, top_effect, date, season, path) and ``places_time.csv`` (city, by
(season|year), value, n, typicality with its interval, accuracy with its interval);
``.results/places.json`` marks the finished result, keyed by the training's key, the
reliance's key, the data snapshot's places and the code. The stage applies to datasets with
coordinates only.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from citylib.core.artifacts import ResultFolder, atomic_path, code_key, write_csv
from citylib.core.config import config_hash
from citylib.data import places
from citylib.stats import resampling

NAME = "places"
COLUMNS = ["index", "path", "city", "group", "predicted", "p_true", "correct", "lat", "lon", "date", "season",
           "top_object", "top_effect", "nearest_train_m"]
TIME_COLUMNS = ["city", "by", "value", "n", "typicality", "typicality_low", "typicality_high",
                "accuracy", "accuracy_low", "accuracy_high"]
OBJECT_COLUMNS = ["index", "city", "group", "object", "rank", "lat", "lon", "date", "season", "effect", "flipped"]
OBJECT_TIME_COLUMNS = ["city", "object", "by", "value", "n", "effect", "effect_low", "effect_high"]
NEAR_COLUMNS = ["city", "within_m", "n_all", "accuracy_all", "all_low", "all_high", "n_near", "accuracy_near",
                "near_low", "near_high", "n_far", "accuracy_far", "far_low", "far_high"]


@dataclass(frozen=True)
class PlacesResult:
    table: pd.DataFrame     # COLUMNS, one row per test image with coordinates
    time: pd.DataFrame      # TIME_COLUMNS
    key: str
    folder: Path
    objects: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=OBJECT_COLUMNS))
    object_time: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=OBJECT_TIME_COLUMNS))
    near: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=NEAR_COLUMNS))


def applies(manifest_columns) -> bool:
    """Whether a snapshot's manifest has coordinates (the stage's precondition)."""
    return {"lat", "lon"} <= set(manifest_columns)


def key(training_key: str, reliance_key: str | None, data_key: str, settings: str = "") -> str:
    return config_hash(NAME, code_key(__name__), training_key, reliance_key, data_key, settings)


def run(run_dir: str | Path, manifest: pd.DataFrame, key_: str, *, within_m: float = 100.0, top: int = 3,
        min_images: int = 5, n_boot: int = 1000, seed: int = 0) -> PlacesResult:
    """Typicality per test image, by place and time, written into ``run_dir`` (reused when the
    key matches); ``within_m``: the distance to a training image that counts as near; ``top``
    objects per city (of ``min_images`` images or more) mapped and followed through time."""
    run_dir = Path(run_dir)
    folder = ResultFolder(run_dir, NAME, key_)
    if folder.done() is not None:
        return load(run_dir, key_)
    folder.begin()
    removals = _reliance_images(run_dir)
    table = typicality(pd.read_csv(run_dir / "predictions.csv"), manifest, removals)
    objects = object_changes(table, removals, top=top, min_images=min_images)
    out = PlacesResult(table, by_time(table, n_boot=n_boot, seed=seed), key_, run_dir, objects,
                       object_time(objects, n_boot=n_boot, seed=seed), near_far(table, within_m, n_boot=n_boot, seed=seed))
    for name, frame in FILES.items():
        write_csv(run_dir / name, getattr(out, frame))
    with atomic_path(run_dir / "places.geojson") as tmp:
        Path(tmp).write_text(json.dumps(geojson(table), allow_nan=False))
    folder.commit([*FILES, "places.geojson"], images=len(table))
    return out


FILES = {"places.csv": "table", "places_time.csv": "time", "places_objects.csv": "objects",
         "places_objects_time.csv": "object_time", "places_near.csv": "near"}


def load(run_dir: Path, key_: str) -> PlacesResult:
    text = ["path", "city", "group", "predicted", "date", "season", "top_object", "object", "value"]
    frames = {}
    for name, attr in FILES.items():
        frame = pd.read_csv(run_dir / name, keep_default_na=False, na_values=[""], dtype=dict.fromkeys(text, str))
        cols = [c for c in text if c in frame]
        frame[cols] = frame[cols].fillna("")                     # '' where unknown, as when written
        frames[attr] = frame
    return PlacesResult(key=key_, folder=run_dir, **frames)


def _reliance_images(run_dir: Path) -> pd.DataFrame | None:
    f = run_dir / "reliance_images.csv"
    return pd.read_csv(f) if f.is_file() else None


def typicality(predictions: pd.DataFrame, manifest: pd.DataFrame, removals: pd.DataFrame | None) -> pd.DataFrame:
    """``COLUMNS`` per test image with coordinates: ``predictions`` (training's: index, path,
    city, predicted, prob_<city>) joined to the manifest's place columns by path, and to each
    image's top object among ``removals`` (reliance's per-removal rows, by cache row)."""
    pred = predictions.copy()
    pred["p_true"] = [pred.at[i, f"prob_{c}"] for i, c in zip(pred.index, pred["city"])]
    cols = [c for c in ("group", "lat", "lon", "date") if c in manifest]
    placed = manifest[["path", *cols]].drop_duplicates("path").set_index("path")
    pred = pred.join(placed, on="path")
    pred["lat"], pred["lon"] = pd.to_numeric(pred["lat"]), pd.to_numeric(pred["lon"])
    pred["date"] = pred["date"].fillna("").astype(str) if "date" in pred else ""
    pred["season"] = [places.season(d, la) for d, la in zip(pred["date"], pred["lat"])]
    pred["top_object"], pred["top_effect"] = "", np.nan
    if removals is not None and len(removals):
        change = removals.assign(change=removals["logp_removed"] - removals["logp_null"])
        top = change.loc[change.groupby("row")["change"].idxmin(), ["row", "object", "change"]].set_index("row")
        pred["top_object"] = pred["index"].map(top["object"]).fillna("")
        pred["top_effect"] = pred["index"].map(top["change"])
    pred = pred[pred["lat"].notna() & pred["lon"].notna()]
    pred["nearest_train_m"] = np.nan
    if "split" in manifest:                         # the nearest training image of the same city
        train = manifest[manifest["split"] == "train"]
        train = train[pd.to_numeric(train["lat"]).notna() & pd.to_numeric(train["lon"]).notna()]
        for city, rows in pred.groupby("city"):
            ref = train[train["city"] == city]
            pred.loc[rows.index, "nearest_train_m"] = places.nearest_m(
                rows["lat"], rows["lon"], pd.to_numeric(ref["lat"]), pd.to_numeric(ref["lon"]))
    return pred[COLUMNS].reset_index(drop=True)


def geojson(table: pd.DataFrame) -> dict:
    """A FeatureCollection, one Point per row, ``[lon, lat]`` (RFC 7946); missing values null."""
    def value(v):
        if isinstance(v, (float, np.floating)):
            return None if math.isnan(v) else float(v)
        if isinstance(v, (np.integer, np.bool_)):
            return v.item()
        return v if v != "" else None

    props = ["city", "predicted", "p_true", "correct", "top_object", "top_effect", "date", "season", "path"]
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [float(r.lon), float(r.lat)]},
         "properties": {p: value(getattr(r, p)) for p in props}}
        for r in table.itertuples(index=False)]}


def by_time(table: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Per city and season, and per city and year (where dates exist): typicality and accuracy,
    each a mean with its ``level`` bootstrap interval over whole groups."""
    dated = table[table["date"].astype(str) != ""].assign(year=lambda t: t["date"].astype(str).str[:4])
    rows = []
    for by in ("season", "year"):
        for (city, value), part in dated.groupby(["city", by], sort=True):
            typ = resampling.bootstrap_interval(part["p_true"], part["group"], n_boot, level, seed)
            acc = resampling.bootstrap_interval(part["correct"].astype(float), part["group"], n_boot, level, seed)
            rows.append([city, by, value, len(part), *typ, *acc])
    return pd.DataFrame(rows, columns=TIME_COLUMNS)


def object_changes(table: pd.DataFrame, removals: pd.DataFrame | None, *, top: int = 3,
                   min_images: int = 5) -> pd.DataFrame:
    """``OBJECT_COLUMNS``: per city its ``top`` objects (the most negative mean change of log
    p(true city) on removal, ``effect``, over ``min_images`` images or more; ``rank`` 1 the
    strongest), one row per placed test image the object was removed from, with that change and
    whether the removal turned a right decision wrong (``flipped``)."""
    if removals is None or removals.empty or table.empty:
        return pd.DataFrame(columns=OBJECT_COLUMNS)
    r = removals[removals["row"].isin(table["index"])].assign(
        effect=lambda f: f["logp_removed"] - f["logp"],
        flipped=lambda f: f["correct"].astype(bool) & ~f["correct_removed"].astype(bool))
    means = r.groupby(["city", "object"])["effect"].agg(["size", "mean"]).reset_index()
    means = means[means["size"] >= min_images].sort_values(["city", "mean", "object"])
    means["rank"] = means.groupby("city").cumcount() + 1
    chosen = means[means["rank"] <= top][["city", "object", "rank"]]
    placed = table.set_index("index")[["group", "lat", "lon", "date", "season"]]
    out = r.merge(chosen, on=["city", "object"]).drop(columns="group").join(placed, on="row")
    out = out.rename(columns={"row": "index"}).sort_values(["city", "rank", "index"])
    return out[OBJECT_COLUMNS].reset_index(drop=True)


def object_time(objects: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Per city, mapped object and season (and year): the mean change of log p(true city) when
    the object is removed, with its ``level`` bootstrap interval over whole groups."""
    dated = objects[objects["date"].astype(str) != ""].assign(year=lambda t: t["date"].astype(str).str[:4])
    rows = []
    for by in ("season", "year"):
        for (city, obj, value), part in dated.groupby(["city", "object", by], sort=True):
            rows.append([city, obj, by, value, len(part),
                         *resampling.bootstrap_interval(part["effect"], part["group"], n_boot, level, seed)])
    return pd.DataFrame(rows, columns=OBJECT_TIME_COLUMNS)


def near_far(table: pd.DataFrame, within_m: float, *, n_boot: int = 1000, seed: int = 0,
             level: float = 0.95) -> pd.DataFrame:
    """Per city and over all (``city`` 'all'): the accuracy of every test image (the run's own
    split), of those with a training image of their city within ``within_m`` metres (near: what
    a split by panorama lets through, a split by blocks of that size never does) and of the rest
    (far: the images a blocked split would test on, no training image that near), each with its
    ``level`` bootstrap interval over whole groups; NaN where a side has no image."""
    rows = []
    for city, part in [*table.groupby("city", sort=True), ("all", table)]:
        near = part["nearest_train_m"].to_numpy(float) <= within_m
        sides = []
        for side in (np.ones(len(part), bool), near, ~near):
            acc = resampling.bootstrap_interval(part["correct"].astype(float)[side], part["group"][side],
                                                n_boot, level, seed)
            sides += [int(side.sum()), *acc]
        rows.append([city, within_m, *sides])
    return pd.DataFrame(rows, columns=NEAR_COLUMNS)

