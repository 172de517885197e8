"""Stage `streetview`: collect Street View images of one city with the Street View Static API.

Reads a city's area (a bounding box or a GeoJSON polygon file), the API key (environment
variable ``key_env`` or ``key_file``; see ``citylib.streetview.static_api``) and what an
earlier run left in ``out``. Writes into ``out``:
  <city>/<pano>_<heading>.jpg   one view per panorama and heading (e.g. ``Xy3..._90.jpg``)
  manifest.csv                  path (relative to ``out``), city, group (= pano id), view
                                (heading index), heading, lat, lon (the panorama's), date
  metadata.csv                  every metadata answer (location, radius, source, status, pano,
                                lat, lon, date), so that a rerun does not ask again
  streetview.json               per city: the settings and counts of its last run
``manifest.csv`` is a data-stage manifest: ``data: {source: <out>/manifest.csv}``.

Seeded points (``citylib.streetview.geosample``) are looked up one by one; a point without
imagery is skipped, a panorama seen before (this run, or in another city's rows) is not fetched again.
Views are compass headings; ``random_offset`` turns each panorama's set by a seeded offset
(integer degrees in [0, 360 / len(headings))) drawn from (seed, pano id), so file names are the
same on every rerun. Every file is written atomically. A rerun skips images already on disk
that decode in full and fetches the rest; the manifest is merged by path.

A request that still fails after its retries is recorded in ``failed`` and the run goes on (a
rerun retries it). The request budget stops the run cleanly (``stopped``); an API refusal of
the key raises ``AccessDenied``. FAILURES_IN_A_ROW failed requests with no image fetched between
them (a wrong base URL, no network) stop the run like the budget. Either way what was written so
far is in the manifest.
"""
from __future__ import annotations

import logging
import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from tqdm import tqdm

from citylib.core.artifacts import atomic_path, merge_json, write_csv
from citylib.core.config import to_dict
from citylib.data.inventory import check_file
from citylib.data.streetview.geosample import Area, bbox_area, load_polygon, sample_points
from citylib.data.streetview.static_api import (DEFAULT_BASE_URL, DEFAULT_KEY_ENV, AccessDenied,
                                           BudgetExhausted, Client, RequestFailed, StreetViewError,
                                           read_key)

__all__ = ["StreetViewConfig", "StreetViewResult", "run", "area_of", "headings_for",
           "AccessDenied", "StreetViewError", "MANIFEST_COLUMNS"]

MANIFEST_COLUMNS = ["path", "city", "group", "view", "heading", "lat", "lon", "date"]
METADATA_COLUMNS = ["location", "radius", "source", "status", "pano", "lat", "lon", "date"]
PANO_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")  # what a pano id may be before it names a file
SAVE_EVERY = 100  # points between saves of the manifest and the metadata answers
FAILURES_IN_A_ROW = 10  # failed requests with no image fetched between them stop the run
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreetViewConfig:
    """Settings of the Street View collector (one city per run). Holds no key, only where it is."""

    city: str  # folder name and the manifest's city
    bbox: tuple[float, float, float, float] | None = None  # south, west, north, east (degrees)
    polygon: str | None = None  # GeoJSON Polygon/MultiPolygon file (instead of bbox)
    points: int = 100  # points to sample (each gives at most one panorama)
    min_spacing: float = 50.0  # metres between sampled points
    seed: int = 0
    radius: int = 50  # metres around a point to search for a panorama
    source: Literal["outdoor", "default"] = "outdoor"  # outdoor: no indoor (shop) panoramas
    headings: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)  # compass degrees, one view each
    random_offset: bool = False  # turn each panorama's headings by a seeded offset
    size: tuple[int, int] = (640, 640)  # width, height in pixels (the API's maximum is 640)
    fov: float = 90.0  # horizontal field of view, degrees (10..120)
    pitch: float = 0.0  # degrees up (-90..90)
    base_url: str = DEFAULT_BASE_URL
    key_env: str = DEFAULT_KEY_ENV  # environment variable holding the key
    key_file: str | None = None  # or a file holding it (wins over key_env)
    rps: float = 10.0  # requests per second at most
    max_requests: int | None = None  # HTTP requests (retries included) at most; None: no limit
    max_retries: int = 4  # retries per request after HTTP 429/5xx, OVER_QUERY_LIMIT, bad bodies
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    timeout: float = 30.0  # seconds per HTTP request

    def __post_init__(self):
        c = self.city
        if not c or c != c.strip() or c.startswith(".") or not c.isprintable() or any(s in c for s in "/\\:"):
            raise ValueError(f"'city' = {c!r} must be a plain folder name (no '/', '\\', ':', leading '.')")
        if (self.bbox is None) == (self.polygon is None):
            raise ValueError("give exactly one of 'bbox' (south, west, north, east) and 'polygon' (a GeoJSON file)")
        if self.bbox is not None:
            bbox_area(self.bbox)  # raises AreaError (a ValueError) naming what is wrong
        if self.points < 1:
            raise ValueError(f"'points' must be >= 1, got {self.points}")
        if not (math.isfinite(self.min_spacing) and self.min_spacing >= 0):
            raise ValueError(f"'min_spacing' must be >= 0 metres, got {self.min_spacing}")
        if self.seed < 0 or not 1 <= self.radius <= 10_000:
            raise ValueError(f"need 'seed' >= 0 and 'radius' in 1..10000, got {self.seed}, {self.radius}")
        headings = tuple(round(float(h), 2) for h in self.headings)  # 0.01 degree: short file names
        if not headings or not all(math.isfinite(h) and 0 <= h < 360 for h in headings) \
                or len(set(headings)) != len(headings):
            raise ValueError(f"'headings' must be distinct degrees in [0, 360), got {list(self.headings)}")
        object.__setattr__(self, "headings", headings)
        if not all(1 <= s <= 640 for s in self.size):
            raise ValueError(f"'size' must be width, height in 1..640 pixels, got {self.size}")
        if not (10 <= self.fov <= 120 and -90 <= self.pitch <= 90):
            raise ValueError(f"need 'fov' in 10..120 and 'pitch' in -90..90, got {self.fov}, {self.pitch}")
        if not re.match(r"https?://[^\s?#]+$", self.base_url):
            raise ValueError(f"'base_url' must be an http(s) URL without a query, got {self.base_url!r}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.key_env):
            raise ValueError(f"'key_env' must be an environment variable name, got {self.key_env!r}")
        if not (self.rps > 0 and self.backoff >= 0 and self.timeout > 0 and self.max_retries >= 0):
            raise ValueError("need 'rps' > 0, 'backoff' >= 0, 'timeout' > 0 and 'max_retries' >= 0")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"'max_requests' must be >= 1 (or None), got {self.max_requests}")


@dataclass(frozen=True)
class StreetViewResult:
    """What one ``run`` did. ``manifest`` is the whole merged manifest (every city in ``out``)."""

    city: str
    manifest_path: Path
    manifest: pd.DataFrame  # MANIFEST_COLUMNS
    points: int  # points sampled (fewer than asked when the area is too small for the spacing)
    panoramas: int  # distinct panoramas of this city met in this run
    downloaded: int  # images fetched in this run
    present: int  # images already on disk and whole
    no_imagery: int  # points without a panorama within the radius
    duplicates: int  # points whose panorama was already met (here or in another city)
    failed: tuple[str, ...]  # one message per request that failed after its retries
    requests: int  # HTTP requests made, retries included
    stopped: str | None  # why the run stopped early (the request budget), or None

    @property
    def complete(self) -> bool:
        return self.stopped is None and not self.failed


def area_of(cfg: StreetViewConfig) -> Area:
    """The area to sample: the bounding box or the polygon file (a relative path: to the cwd)."""
    return bbox_area(cfg.bbox) if cfg.bbox is not None else load_polygon(Path(cfg.polygon).expanduser())


def headings_for(cfg: StreetViewConfig, pano: str) -> tuple[float, ...]:
    """The headings of one panorama's views, turned by its seeded offset if ``random_offset``."""
    if not cfg.random_offset:
        return cfg.headings
    rng = np.random.default_rng([cfg.seed, zlib.crc32(pano.encode())])
    offset = int(rng.integers(0, max(1, int(360 / len(cfg.headings)))))
    return tuple((h + offset) % 360 for h in cfg.headings)


def run(cfg: StreetViewConfig, out, progress: bool = True) -> StreetViewResult:
    """Collect the images of ``cfg.city`` into ``out`` (resuming what an earlier run left)."""
    root = Path(out).expanduser().resolve()  # like `citylib synth --out`: relative to the cwd
    key = read_key(cfg.key_env, cfg.key_file)  # fails before any work when there is none
    points = sample_points(area_of(cfg), cfg.points, cfg.min_spacing, cfg.seed)
    if len(points) < cfg.points:
        log.warning("sampled only %d of %d points: the area is too small for min_spacing=%g m",
                    len(points), cfg.points, cfg.min_spacing)
    client = Client(key, cfg.base_url, cfg.rps, cfg.max_retries, cfg.backoff, cfg.max_requests, cfg.timeout)
    c = _Collection(cfg, root, client)
    stopped = None
    bar = tqdm(points, desc=f"streetview {cfg.city}", unit="point", disable=not progress)
    try:
        for i, (lat, lon) in enumerate(bar):
            if i and i % SAVE_EVERY == 0:
                _save(root, c.rows, c.answers)
            c.point(lat, lon)
            bar.set_postfix(images=c.count["downloaded"] + c.count["present"], failed=len(c.failed),
                            requests=client.requests)
    except BudgetExhausted as e:
        stopped = f"{e}; what was fetched is kept, run again (with a larger --max-requests) to go on"
        log.warning("%s", stopped)
    except _GiveUp as e:
        stopped = str(e)
        log.warning("%s", stopped)
    finally:
        bar.close()
        manifest = _save(root, c.rows, c.answers)
        merge_json(root / "streetview.json", {cfg.city: {
            "config": to_dict(cfg), "points": len(points), "panoramas": len(c.seen), **c.count,
            "failed": len(c.failed), "requests": client.requests, "stopped": stopped}})
    count = c.count
    return StreetViewResult(cfg.city, root / "manifest.csv", manifest, len(points), len(c.seen),
                            count["downloaded"], count["present"], count["no_imagery"],
                            count["duplicates"], tuple(c.failed), client.requests, stopped)


class _Collection:
    """One run's state: the manifest and metadata rows so far, which city owns each panorama,
    the counts, the failed requests and how many failed in a row."""

    def __init__(self, cfg: StreetViewConfig, root: Path, client: Client):
        self.cfg, self.root, self.client = cfg, root, client
        self.rows = _read_table(root / "manifest.csv", MANIFEST_COLUMNS, "path")
        self.answers = _read_table(root / "metadata.csv", METADATA_COLUMNS, "location", "radius", "source")
        self.owner = {r["group"]: r["city"] for r in self.rows.values()}  # pano id -> city that has it
        self.count, self.failed, self.seen = Counter(), [], set()
        self.streak = 0  # failed requests since the last image fetched

    def fail(self, error: StreetViewError) -> None:
        self.failed.append(str(error))
        log.warning("%s", error)
        self.streak += 1
        if self.streak >= FAILURES_IN_A_ROW:
            raise _GiveUp(f"{self.streak} requests in a row failed with no image fetched between them; "
                          "check --base-url and the network, then run again to go on")

    def point(self, lat: float, lon: float) -> None:
        """The panorama near one sampled point: its metadata, then each of its views."""
        cfg = self.cfg
        try:
            answer = _metadata(self.client, cfg, lat, lon, self.answers)
        except RequestFailed as e:
            self.fail(e)
            return
        pano = answer["pano"]
        if answer["status"] != "OK":
            self.count["no_imagery"] += 1
            return
        if not PANO_ID.fullmatch(pano):
            self.fail(StreetViewError(f"metadata for {lat:.6f},{lon:.6f} gave an unusable pano id {pano[:60]!r}"))
            return
        if pano in self.seen or self.owner.get(pano, cfg.city) != cfg.city:
            self.count["duplicates"] += 1
            return
        self.seen.add(pano)
        for view, heading in enumerate(headings_for(cfg, pano)):
            self.view(pano, view, heading, answer)

    def view(self, pano: str, view: int, heading: float, answer: dict) -> None:
        """One view of a panorama: kept when it is on disk and decodes, else fetched."""
        cfg, rel = self.cfg, f"{self.cfg.city}/{pano}_{heading:g}.jpg"
        if (self.root / rel).is_file() and check_file(str(self.root / rel)) is None:
            self.count["present"] += 1
        else:
            try:
                body = self.client.image(pano, heading, cfg.size, cfg.fov, cfg.pitch)
            except RequestFailed as e:
                self.fail(e)
                return
            self.streak = 0
            with atomic_path(self.root / rel) as tmp:
                tmp.write_bytes(body)
            self.count["downloaded"] += 1
        self.rows[(rel,)] = {"path": rel, "city": cfg.city, "group": pano, "view": str(view),
                             "heading": f"{heading:g}", "lat": answer["lat"], "lon": answer["lon"],
                             "date": answer["date"]}
        self.owner[pano] = cfg.city


class _GiveUp(StreetViewError):
    """Too many requests failed in a row: stop the run like the budget does."""


def _metadata(client: Client, cfg: StreetViewConfig, lat: float, lon: float, answers: dict) -> dict:
    """The (cached) metadata answer for a point as strings: status, pano, lat, lon, date."""
    location = f"{lat:.6f},{lon:.6f}"
    k = (location, str(cfg.radius), cfg.source)
    if k not in answers:
        a = client.metadata(lat, lon, cfg.radius, cfg.source)
        where = a.get("location") or {}
        ok = a["status"] == "OK"
        answers[k] = {"location": location, "radius": str(cfg.radius), "source": cfg.source,
                      "status": a["status"], "pano": str(a.get("pano_id", "")) if ok else "",
                      "lat": _coordinate(where.get("lat", lat)) if ok else "",
                      "lon": _coordinate(where.get("lng", lon)) if ok else "",
                      "date": str(a.get("date", "")) if ok else ""}
    return answers[k]


def _coordinate(value) -> str:
    try:
        return f"{float(value):.7f}"
    except (TypeError, ValueError):
        return ""


def _read_table(path: Path, columns: list[str], *key: str) -> dict[tuple, dict]:
    """An earlier run's CSV as {key: row of strings}; rows of files that are gone are dropped."""
    if not path.is_file():
        return {}
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise StreetViewError(f"{path} is not a Street View {path.stem} (no column(s) {missing}); "
                              "collect into another folder")
    rows = table[columns].to_dict("records")
    if "path" in columns:
        rows = [r for r in rows if (path.parent / r["path"]).is_file()]
    return {tuple(r[k] for k in key): r for r in rows}


def _save(root: Path, rows: dict, answers: dict) -> pd.DataFrame:
    """Write the manifest and the metadata answers atomically; returns the manifest."""
    manifest = pd.DataFrame(list(rows.values()), columns=MANIFEST_COLUMNS)
    manifest = manifest.sort_values(["city", "path"], ignore_index=True)
    write_csv(root / "manifest.csv", manifest)
    write_csv(root / "metadata.csv", pd.DataFrame(list(answers.values()), columns=METADATA_COLUMNS))
    return manifest
