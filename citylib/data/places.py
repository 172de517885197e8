"""Where and when each image was taken: coordinates and dates read, checked and used to split.

``read`` gives every record its ``lat``, ``lon`` (degrees, WGS84) and ``date`` (``YYYY-MM`` or
``YYYY-MM-DD``) from a manifest's own columns or, where those are empty, from the file name by
``data.place_pattern`` (a regex with named groups ``lat``, ``lon`` and optionally ``date``;
``streetview`` names the pattern of ``<pano>_<lat>_<lon>_<yyyymm>_...`` names with ``p`` as the
decimal point). A value out of range or unparseable is left empty and listed, one row per value
(``problems``: path, column, value, reason): never dropped unsaid. ``season`` names the
meteorological season of a date in the image's hemisphere. ``metres`` projects a city's points
onto a local plane for maps (equirectangular about the mean latitude: distances within 0.5%
across 25 km up to 65 degrees of latitude). ``clusters`` joins images closer than ``block_m``
metres of great-circle distance (single linkage, per city), the unit that ``data.split_by:
block`` keeps in one split, so that no two images closer than the block size fall on two
sides. Reads and writes nothing.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from citylib.world.worldfile import EARTH_RADIUS_M

# <pano>_<lat>_<lon>_<yyyymm>[_...]: 'p' for the decimal point, as in the shared samples
STREETVIEW_PLACE = r"_(?P<lat>-?\d+p\d+)_(?P<lon>-?\d+p\d+)_(?P<date>\d{6})(?:_|$)"
PLACE_PATTERNS = {"streetview": STREETVIEW_PLACE}
COLUMNS = ("lat", "lon", "date")
SEASONS = ("winter", "spring", "summer", "autumn")   # Dec-Feb, Mar-May, Jun-Aug, Sep-Nov in the north


def check_pattern(pattern: str | None) -> str | None:
    """The regex a ``place_pattern`` setting names (a ``PLACE_PATTERNS`` name or a regex with
    named groups ``lat`` and ``lon``); ValueError naming what is wrong."""
    if pattern is None:
        return None
    pattern = PLACE_PATTERNS.get(pattern, pattern)
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"'place_pattern' = {pattern!r} is not a regex: {e}") from None
    missing = [g for g in ("lat", "lon") if g not in rx.groupindex]
    if missing:
        raise ValueError(f"'place_pattern' = {pattern!r} has no named group(s) {missing}: "
                         "write (?P<lat>...) and (?P<lon>...), and optionally (?P<date>...)")
    return pattern


def read(records: pd.DataFrame, pattern: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(records with ``lat``, ``lon`` (float, NaN when unknown) and ``date`` (str, '' when
    unknown), problems: path, column, value, reason). A manifest's own columns (``lat``, ``lon``,
    ``date`` given as text) win over the file name."""
    rx = re.compile(pattern) if pattern else None
    found = {c: [] for c in COLUMNS}
    problems = []
    for i, path in enumerate(records["path"]):
        named = rx.search(Path(path).stem) if rx else None
        for column in COLUMNS:
            given = str(records[column].iloc[i]).strip() if column in records else ""
            if not given and named is not None and column in named.re.groupindex:
                given = (named.group(column) or "").replace("p", ".") if column != "date" else named.group(column) or ""
            value, why = _parse(column, given)
            if why:
                problems.append((str(path), column, given, why))
            found[column].append(value)
    out = records.assign(lat=np.asarray(found["lat"], float), lon=np.asarray(found["lon"], float),
                         date=found["date"])
    return out, pd.DataFrame(problems, columns=["path", "column", "value", "reason"], dtype=str)


def _parse(column: str, text: str) -> tuple[float | str, str | None]:
    """(value, None) or (empty value, why not) of one lat / lon / date text ('' is unknown)."""
    empty = "" if column == "date" else math.nan
    if not text or text.lower() in ("nan", "none"):
        return empty, None
    if column == "date":
        return _date(text)
    try:
        value = float(text)
    except ValueError:
        return empty, "not a number"
    limit = 90 if column == "lat" else 180
    if not -limit <= value <= limit:
        return empty, f"out of range [-{limit}, {limit}]"
    return value, None


def _date(text: str) -> tuple[str, str | None]:
    """``YYYYMM``, ``YYYY-MM`` or ``YYYY-MM-DD`` as ``YYYY-MM[-DD]``."""
    m = re.fullmatch(r"(\d{4})-?(\d{2})(?:-(\d{2}))?", text)
    if m is None:
        return "", "not a date (YYYYMM, YYYY-MM or YYYY-MM-DD)"
    year, month, day = int(m[1]), int(m[2]), m[3]
    if not 1 <= month <= 12 or not 1900 <= year <= 2100:
        return "", "not a date (month 1-12, year 1900-2100)"
    if day is not None:
        try:
            pd.Timestamp(year=year, month=month, day=int(day))
        except ValueError:
            return "", "not a date (no such day)"
    return f"{year:04d}-{month:02d}" + (f"-{day}" if day else ""), None


def season(date: str, lat: float) -> str:
    """The meteorological season of a ``YYYY-MM[-DD]`` date at latitude ``lat`` (south of the
    equator shifted by half a year); '' when the date is unknown."""
    if not date:
        return ""
    k = (int(date[5:7]) % 12) // 3                   # 0 Dec-Feb, 1 Mar-May, 2 Jun-Aug, 3 Sep-Nov
    return SEASONS[(k + 2) % 4 if lat < 0 else k]


def metres(lat: np.ndarray, lon: np.ndarray, ref: tuple[float, float] | None = None) -> np.ndarray:
    """(n, 2) east and north metres of points from ``ref`` (lat, lon; default the points' mean,
    ``centre``) on the equirectangular plane of that latitude."""
    lat0, lon0 = np.radians(ref if ref is not None else centre(lat, lon))
    lat, lon = np.radians(np.asarray(lat, float)), np.radians(np.asarray(lon, float))
    east = np.angle(np.exp(1j * (lon - lon0))) * np.cos(lat0) * EARTH_RADIUS_M
    return np.stack([east, (lat - lat0) * EARTH_RADIUS_M], axis=1)


def centre(lat: np.ndarray, lon: np.ndarray) -> tuple[float, float]:
    """The mean (lat, lon) of points, the longitude averaged on the circle (across the antimeridian too)."""
    lon = np.radians(np.asarray(lon, float))
    return float(np.mean(lat)), float(np.degrees(np.angle(np.exp(1j * lon).mean())))


def clusters(frame: pd.DataFrame, block_m: float) -> pd.Series:
    """A cluster id per row (``<city>:<n>``): within a city, images joined by any chain of steps
    shorter than ``block_m`` metres, and the images of one group, share a cluster. Splitting by
    cluster leaves no two images closer than ``block_m`` in different splits."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    out = pd.Series("", index=frame.index, dtype=object)
    chord = 2 * EARTH_RADIUS_M * math.sin(min(block_m / (2 * EARTH_RADIUS_M), math.pi / 2))
    for city, rows in frame.groupby("city", sort=True):
        lat, lon = np.radians(rows["lat"].to_numpy(float)), np.radians(rows["lon"].to_numpy(float))
        xyz = EARTH_RADIUS_M * np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], 1)
        # straight-line distance through the sphere grows with the great-circle one: the pairs
        # within the chord of block_m are exactly those within block_m on the sphere
        pairs = cKDTree(xyz).query_pairs(chord, output_type="ndarray")    # (m, 2)
        codes = pd.factorize(rows["group"])[0]        # the images of a group joined as well
        n = len(rows)
        a = np.concatenate([pairs[:, 0], np.arange(n)])
        b = np.concatenate([pairs[:, 1], codes + n])
        graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n + codes.max() + 1,) * 2)
        _, label = connected_components(graph, directed=False)
        out[rows.index] = [f"{city}:{k}" for k in pd.factorize(label[:n])[0]]
    return out


def nearest_m(lat, lon, ref_lat, ref_lon) -> np.ndarray:
    """(n,) great-circle metres from each point to the nearest of the ``ref`` points (inf if
    there is none)."""
    from scipy.spatial import cKDTree

    def xyz(la, lo):
        la, lo = np.radians(np.asarray(la, float)), np.radians(np.asarray(lo, float))
        return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], 1)

    if len(ref_lat) == 0 or len(lat) == 0:
        return np.full(len(lat), np.inf)
    chord, _ = cKDTree(xyz(ref_lat, ref_lon)).query(xyz(lat, lon))       # on the unit sphere
    return 2 * EARTH_RADIUS_M * np.arcsin(np.minimum(chord / 2, 1.0))



def skewed(frame: pd.DataFrame, ratios, tolerance: float = 0.1) -> list[str]:
    """One line per city whose split by blocks (``frame``: city, block, split) lands more than
    ``tolerance`` away from the asked ``ratios`` (train, val, test) in some split: a few large
    blocks (dense photos, a large ``block_m``) leave the split little choice."""
    asked = np.asarray(ratios, float) / np.sum(ratios)
    lines = []
    for city, rows in frame.groupby("city", sort=True):
        got = rows["split"].value_counts(normalize=True).reindex(["train", "val", "test"], fill_value=0.0).to_numpy()
        if np.abs(got - asked).max() > tolerance:
            biggest = rows["block"].value_counts()
            lines.append(f"city {city!r}: {len(biggest)} block(s), the largest {biggest.iloc[0] / len(rows):.0%} of "
                         f"its images; split {' / '.join(f'{v:.0%}' for v in got)} against the asked "
                         f"{' / '.join(f'{v:.0%}' for v in asked)} (train / val / test): a smaller block_m makes "
                         "more, smaller blocks")
    return lines
