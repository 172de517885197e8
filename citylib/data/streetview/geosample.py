"""Where to look: seeded random points inside a city's area, at least a set distance apart.

Reads a GeoJSON file (a Polygon or MultiPolygon geometry, a Feature or a FeatureCollection of
them; coordinates are ``[lon, lat]``) or takes a bounding box (south, west, north, east).
Writes nothing. Used by ``citylib.streetview.collect`` to choose the places it asks Street View about.

Points are drawn uniformly by area (uniform in longitude and in sin(latitude)) inside the
bounding box and kept when they fall inside the polygon and are at least ``min_spacing`` metres
(great-circle) from every point kept before. Candidates come from the generator in fixed-size
batches, so the first k points for a seed do not depend on how many are asked for: asking for
more points later extends the earlier set.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from citylib.world.worldfile import EARTH_RADIUS_M  # the mean Earth radius (IUGG)

BATCH = 1024  # candidates drawn per generator call; fixed so that point prefixes are stable

Ring = np.ndarray  # (K, 2) float64 of (lon, lat), closed or not
Polygon = list  # [exterior ring, hole ring, ...]


class AreaError(ValueError):
    """An area (bounding box or polygon file) cannot be used; the message says why."""


@dataclass(frozen=True)
class Area:
    """A city's area: its bounding box and, optionally, the polygons inside it."""

    bbox: tuple[float, float, float, float]  # south, west, north, east (degrees)
    polygons: tuple[Polygon, ...] = ()  # empty: the whole box

    def contains(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """(N,) bool: which points lie inside the area (the box, and a polygon when given)."""
        lat, lon = np.asarray(lat, float), np.asarray(lon, float)
        s, w, n, e = self.bbox
        inside = (lat >= s) & (lat <= n) & (lon >= w) & (lon <= e)
        if self.polygons:
            inside &= np.any([in_polygon(lat, lon, p) for p in self.polygons], axis=0)
        return inside


def check_bbox(bbox) -> tuple[float, float, float, float]:
    """The bounding box as four floats, or AreaError when it is not (south, west, north, east)."""
    if len(bbox) != 4:
        raise AreaError(f"a bounding box is south,west,north,east (4 numbers), got {list(bbox)}")
    s, w, n, e = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (s, w, n, e)):
        raise AreaError(f"bounding box {list(bbox)} has a non-finite number")
    if not (-90 <= s < n <= 90):
        raise AreaError(f"bounding box needs -90 <= south < north <= 90, got south={s}, north={n}")
    if not (-180 <= w < e <= 180):  # a box across the antimeridian must be given as a polygon pair
        raise AreaError(f"bounding box needs -180 <= west < east <= 180, got west={w}, east={e}")
    return s, w, n, e


def bbox_area(bbox) -> Area:
    """The area of a bounding box (south, west, north, east)."""
    return Area(check_bbox(bbox))


def load_polygon(path: str | os.PathLike) -> Area:
    """The area of a GeoJSON Polygon/MultiPolygon (bare geometry, Feature or FeatureCollection)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise AreaError(f"{path}: polygon file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AreaError(f"{path}: not a readable GeoJSON file: {e}") from None
    polygons = []
    try:
        for geom in _geometries(doc):
            kind, coords = geom.get("type"), geom.get("coordinates")
            if kind == "Polygon":
                polygons.append(_polygon(coords))
            elif kind == "MultiPolygon":
                polygons += [_polygon(p) for p in coords]
            else:
                raise AreaError(f"geometry type {kind!r} is not a Polygon or MultiPolygon")
    except AreaError as e:
        raise AreaError(f"{path}: {e}") from None
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        raise AreaError(f"{path}: malformed GeoJSON coordinates: {e}") from None
    if not polygons:
        raise AreaError(f"{path}: no polygon found")
    every = np.concatenate([p[0] for p in polygons])
    (w, s), (e, n) = every.min(axis=0), every.max(axis=0)
    try:
        bbox = check_bbox((s, w, n, e))
    except AreaError as err:
        raise AreaError(f"{path}: the polygon's extent is unusable: {err}") from None
    return Area(bbox, tuple(polygons))


def _geometries(doc) -> list[dict]:
    if not isinstance(doc, dict):
        raise AreaError("GeoJSON must be an object")
    if doc.get("type") == "FeatureCollection":
        return [g for f in doc.get("features") or [] for g in _geometries(f)]
    if doc.get("type") == "Feature":
        return _geometries(doc.get("geometry") or {})
    if doc.get("type") == "GeometryCollection":
        return [g for sub in doc.get("geometries") or [] for g in _geometries(sub)]
    return [doc]


def _polygon(coords) -> Polygon:
    rings = [np.asarray(r, dtype=float)[:, :2] for r in coords]
    if not rings or any(len(r) < 3 for r in rings):
        raise AreaError("a polygon ring needs at least 3 positions")
    if any(not np.all(np.isfinite(r)) for r in rings):
        raise AreaError("a polygon has a non-finite coordinate")
    return rings


def in_polygon(lat: np.ndarray, lon: np.ndarray, polygon: Polygon) -> np.ndarray:
    """(N,) bool by the even-odd rule over all rings, so that holes are outside."""
    lat, lon = np.atleast_1d(np.asarray(lat, float)), np.atleast_1d(np.asarray(lon, float))
    inside = np.zeros(lat.shape, bool)
    for ring in polygon:
        x0, y0 = ring[:, 0], ring[:, 1]  # (K,) lon, lat of each edge's start
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)  # its end (a closed ring adds a zero-length edge)
        # (N, K): the edge straddles the point's latitude and crosses east of the point
        straddles = (y0[None] > lat[:, None]) != (y1[None] > lat[:, None])
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0[None] + (lat[:, None] - y0[None]) * (x1 - x0)[None] / (y1 - y0)[None]
        inside ^= (np.sum(straddles & (lon[:, None] < x_cross), axis=1) % 2).astype(bool)
    return inside


def distance_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle (haversine) distance in metres; broadcasts."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    h = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def sample_points(area: Area, n: int, min_spacing: float, seed: int,
                  max_candidates: int | None = None) -> np.ndarray:
    """Up to ``n`` points (N, 2) of (lat, lon) inside ``area``, at least ``min_spacing`` m apart.

    Stops early (returning fewer points) after ``max_candidates`` draws (default
    ``200 * n + 10_000``), which happens when the area cannot hold ``n`` points that far apart.
    """
    if n < 0 or min_spacing < 0:
        raise ValueError(f"need n >= 0 and min_spacing >= 0, got n={n}, min_spacing={min_spacing}")
    rng = np.random.default_rng(seed)
    s, w, north, e = area.bbox
    sin_s, sin_n = math.sin(math.radians(s)), math.sin(math.radians(north))
    # Neighbours are found in a grid of min_spacing-sized cubes over points on the sphere in
    # 3-D metres: a chord is never longer than its arc, so any point closer than min_spacing
    # lies in one of the 27 cubes around a candidate, anywhere on Earth.
    cell = max(min_spacing, 1.0)
    grid: dict[tuple[int, int, int], list[int]] = {}
    kept: list[tuple[float, float]] = []
    budget = max_candidates if max_candidates is not None else 200 * n + 10_000
    drawn = 0
    while len(kept) < n and drawn < budget:
        u = rng.random((BATCH, 2))  # (B, 2)
        lat = np.degrees(np.arcsin(sin_s + u[:, 0] * (sin_n - sin_s)))
        lon = w + u[:, 1] * (e - w)
        ok = area.contains(lat, lon)
        phi, lam = np.radians(lat), np.radians(lon)
        xyz = EARTH_RADIUS_M * np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam),
                                         np.sin(phi)], axis=1)  # (B, 3) metres
        cells = np.floor(xyz / cell).astype(np.int64)  # (B, 3)
        for la, lo, good, c in zip(lat, lon, ok, cells.tolist()):
            drawn += 1
            if drawn > budget or len(kept) >= n:
                break
            if not good:
                continue
            near = [i for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)
                    for i in grid.get((c[0] + dx, c[1] + dy, c[2] + dz), ())]
            if near and min_spacing > 0:
                pts = np.asarray([kept[i] for i in near])
                if distance_m(la, lo, pts[:, 0], pts[:, 1]).min() < min_spacing:
                    continue
            grid.setdefault(tuple(c), []).append(len(kept))
            kept.append((float(la), float(lo)))
    return np.asarray(kept, dtype=float).reshape(-1, 2)
