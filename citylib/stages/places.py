"""Places stage: where (and when) in each city the network finds a street typical of it.

For every test image with coordinates: its *typicality*, p(true city) under the run's network
(``predictions.csv`` of the training), the predicted city and, where the reliance stage measured
the image, its *top object*: the object whose removal lowers log p(true city) the most beyond
its matched null (``reliance_images.csv``: ``logp_removed - logp_null``, most negative), with
that change. Where the images have dates: typicality and accuracy by season and by year, each a
mean with a 95% bootstrap interval over the groups (panoramas, spots), per city.

Reads the run's ``predictions.csv``, ``reliance_images.csv`` (if there) and the data snapshot's
``manifest.csv`` (``lat``, ``lon``, ``date``). Writes into the run folder ``places.csv`` (one
row per test image: ``COLUMNS``), ``places.geojson`` (one Point feature per test image with
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from citylib.core.artifacts import ResultFolder, atomic_path, code_key, write_csv
from citylib.core.config import config_hash
from citylib.data import places
from citylib.stats import resampling

NAME = "places"
COLUMNS = ["index", "path", "city", "group", "predicted", "p_true", "correct", "lat", "lon", "date", "season",
           "top_object", "top_effect"]
TIME_COLUMNS = ["city", "by", "value", "n", "typicality", "typicality_low", "typicality_high",
                "accuracy", "accuracy_low", "accuracy_high"]


@dataclass(frozen=True)
class PlacesResult:
    table: pd.DataFrame     # COLUMNS, one row per test image with coordinates
    time: pd.DataFrame      # TIME_COLUMNS
    key: str
    folder: Path


def applies(manifest_columns) -> bool:
    """Whether a snapshot's manifest has coordinates (the stage's precondition)."""
    return {"lat", "lon"} <= set(manifest_columns)


def key(training_key: str, reliance_key: str | None, data_key: str) -> str:
    return config_hash(NAME, code_key(__name__), training_key, reliance_key, data_key)


def run(run_dir: str | Path, manifest: pd.DataFrame, key_: str, *, n_boot: int = 1000, seed: int = 0) -> PlacesResult:
    """Typicality per test image, by place and time, written into ``run_dir`` (reused when the
    key matches)."""
    run_dir = Path(run_dir)
    folder = ResultFolder(run_dir, NAME, key_)
    if folder.done() is not None:
        return load(run_dir, key_)
    folder.begin()
    table = typicality(pd.read_csv(run_dir / "predictions.csv"), manifest, _reliance_images(run_dir))
    time = by_time(table, n_boot=n_boot, seed=seed)
    write_csv(run_dir / "places.csv", table)
    write_csv(run_dir / "places_time.csv", time)
    with atomic_path(run_dir / "places.geojson") as tmp:
        Path(tmp).write_text(json.dumps(geojson(table), allow_nan=False))
    folder.commit(["places.csv", "places_time.csv", "places.geojson"], images=len(table))
    return PlacesResult(table, time, key_, run_dir)


def load(run_dir: Path, key_: str) -> PlacesResult:
    text = ["path", "city", "group", "predicted", "date", "season", "top_object"]
    table = pd.read_csv(run_dir / "places.csv", keep_default_na=False, na_values=[""], dtype=dict.fromkeys(text, str))
    table[text] = table[text].fillna("")                        # '' where unknown, as when written
    return PlacesResult(table, pd.read_csv(run_dir / "places_time.csv"), key_, run_dir)


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
