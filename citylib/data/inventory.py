"""Finding and checking a dataset's images: a city-folder tree or a manifest CSV listed
(``load_records``: path, city, group, view, label_path and a manifest's lat, lon, date as text;
what cannot be used, with its reason),
every file decoded once to see that it can be used (``check_file``, ``validate``), and the group
(a panorama, a spot) of each image from its file name (``group_pattern``). Reads the files;
writes nothing.
"""
from __future__ import annotations

import errno
import math
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from citylib.core import paths
from citylib.data.imagecache import open_rgb, read_label

# Street View file names: <pano_id>_<lat>_<lon>_<yyyymm>_<season>_<sharpness>, with 'p' as the
# decimal point. Pano ids may themselves hold '_' and '-', hence the lazy match up to lat/lon.
STREETVIEW_PANO = r"^(?P<group>.+?)_-?\d+p\d+_-?\d+p\d+_\d{6}(?:_|$)"


# Names a parameter file may give as ``group_pattern`` instead of spelling out the regex.
GROUP_PATTERNS = {"streetview": STREETVIEW_PANO}


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


RECORD_COLUMNS = ["path", "city", "group", "view", "label_path"]
PLACE_COLUMNS = ["lat", "lon", "date"]   # optional manifest columns (citylib.data.places reads them)
MAX_PIXELS = 100_000_000   # larger images are rejected as too large (``data.max_pixels``)


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message names the path at fault."""


def load_records(source: str | os.PathLike, group_pattern: str | None = None,
                 cities=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List the images of a city-folder tree or a manifest CSV.

    Returns (records, rejected): records have columns path (absolute), city, group, view,
    label_path ('' when none), sorted by city and path; rejected has path, reason for files
    that are not images or cannot be grouped. Raises DatasetError naming the path when the
    source is missing, holds no images, has an empty city folder or only one city.
    """
    source = paths.resolve(source)
    if not source.exists():
        raise DatasetError(f"{source}: dataset source not found")
    if source.is_dir():
        rows, rejected = _scan_folder(source, cities)
    elif source.suffix.lower() == ".csv":
        rows, rejected = _read_manifest(source, cities)
    else:
        raise DatasetError(f"{source}: expected a folder of city folders or a .csv manifest")
    if not rows:
        raise DatasetError(f"{source}: no images found")
    records = pd.DataFrame(rows)
    # A manifest's group column wins; else the file name; else each image is its own group.
    records["group"] = [
        given or (_group_from_name(group_pattern, path) if group_pattern is not None else default)
        for given, default, path in zip(records["group_given"], records["group"], records["path"])]
    lost = records["group"].isna()
    rejected += [(p, f"file name does not match group_pattern {group_pattern!r}")
                 for p in records.loc[lost, "path"]]
    ungrouped = sorted(set(records["city"]) - set(records.loc[~lost, "city"]))
    if ungrouped:  # a whole city lost to a wrong pattern must not pass unnoticed
        example = Path(records.loc[records["city"] == ungrouped[0], "path"].iloc[0]).stem
        raise DatasetError(f"{source}: group_pattern {group_pattern!r} matches no file name of city "
                           f"{ungrouped[0]!r} (e.g. {example!r})")
    records = records[~lost]
    found = sorted(records["city"].unique())
    if len(found) < 2:
        raise DatasetError(f"{source}: only one city ({found[0]!r}) has images; at least two are needed")
    # a manifest's place columns (lat, lon, date, as text) travel on when it gives any
    given = [c for c in PLACE_COLUMNS if c in records and records[c].astype(str).str.strip().astype(bool).any()]
    records = records[RECORD_COLUMNS + given].sort_values(["city", "path"], ignore_index=True)
    rejected = pd.DataFrame(rejected, columns=["path", "reason"], dtype=str)
    return records.astype({"group": str, "view": int}), rejected


def _group_from_name(pattern: str, path: str) -> str | None:
    """The group id in a file's stem, or None when the pattern does not match it."""
    rx = re.compile(pattern)  # re caches compiled patterns
    m = rx.search(Path(path).stem)
    if m is None:
        return None
    g = m.group("group") if "group" in rx.groupindex else m.group(1) if rx.groups else m.group(0)
    return g or None


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _scan_folder(root: Path, cities) -> tuple[list, list]:
    """Rows and rejections for a tree of city folders (recursive inside each city)."""
    rejected = [(str(p), "not inside a city folder") for p in sorted(root.iterdir())
                if p.is_file() and not _hidden(p.name)]
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    if cities is not None:
        absent = [c for c in cities if not (root / c).is_dir()]
        if absent:
            raise DatasetError(f"{root}: no city folder(s) {absent}; found {[p.name for p in folders]}")
        folders = [root / c for c in cities]
    if not folders:
        raise DatasetError(f"{root}: no images found (expected one sub-folder per city)")
    rows = []

    def unreadable(e: OSError) -> None:   # os.walk would skip the folder without a word
        rejected.append((str(e.filename), f"folder not readable: {_why(e)}"))

    problems = []    # every city folder without images, one line each, said at once
    for folder in folders:
        files = []
        for d, subdirs, names in os.walk(folder, onerror=unreadable):
            subdirs[:] = sorted(s for s in subdirs if not _hidden(s))
            files += [Path(d) / n for n in sorted(names) if not _hidden(n)]
        images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            problems.append(f"{folder}: city folder is empty")
        elif not images:
            problems.append(f"{folder}: city folder has no image files ({len(files)} other file(s))")
        rejected += [(str(f), f"not an image file (extension '{f.suffix}')")
                     for f in files if f.suffix.lower() not in IMAGE_EXTENSIONS]
        # Without a group id each image is its own group, named by its place in the tree.
        rows += [{"path": os.path.abspath(f), "city": folder.name, "group": f.relative_to(root).as_posix(),
                  "group_given": "", "view": 0, "label_path": ""} for f in images]
    if problems:
        raise DatasetError("\n".join(problems))
    return rows, rejected


def _read_manifest(csv: Path, cities) -> tuple[list, list]:
    """Rows and rejections for a manifest CSV; relative paths are taken against its folder."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DatasetError(f"{csv}: not a readable CSV manifest: {e}") from None
    table.columns = [c.strip() for c in table.columns]
    for column in ("path", "city"):
        if column not in table.columns:
            raise DatasetError(f"{csv}: manifest has no '{column}' column (columns: {list(table.columns)})")
    if cities is not None:
        absent = sorted(set(cities) - set(table["city"].str.strip()))
        if absent:
            raise DatasetError(f"{csv}: no rows for city/cities {absent}")
    rows, rejected, first = [], [], {}
    resolved = [str(paths.resolve(r["path"].strip(), base=csv.parent)) if r["path"].strip() else ""
                for r in table.to_dict("records")]
    city_sets: dict[str, set] = {}
    for path, city in zip(resolved, table["city"].str.strip()):
        city_sets.setdefault(path, set()).add(city)
    for line, (r, path) in enumerate(zip(table.to_dict("records"), resolved), start=2):   # line 1: header
        given, city = r["path"].strip(), r["city"].strip()
        label = r.get("label_path", "").strip()
        if cities is not None and city not in cities:
            continue
        if not given or not city:
            rejected.append((path or f"{csv} (row without a path)", "manifest row lacks a path or a city"))
        elif Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
            rejected.append((path, f"not an image file (extension '{Path(path).suffix}')"))
        elif len(city_sets[path] - {""}) > 1:   # which city is it? neither row can say
            rejected.append((path, f"line {line} of {csv.name}: listed for two cities: "
                                   f"{', '.join(sorted(city_sets[path] - {''}))}"))
        elif path in first:
            rejected.append((path, f"line {line} of {csv.name}: duplicate of line {first[path]}; "
                                   "that line is used"))
        else:
            first[path] = line
            view = r.get("view", "").strip()
            rows.append({"path": path, "city": city, "group": path,
                         "group_given": r.get("group", "").strip(),
                         "view": int(float(view)) if _number(view) else 0,
                         "label_path": str(paths.resolve(label, base=csv.parent)) if label else "",
                         **{c: r.get(c, "").strip() for c in PLACE_COLUMNS}})
    return rows, rejected


def _number(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


def check_file(path: str, label_path: str = "", max_pixels: int = MAX_PIXELS) -> str | None:
    """Why an image (and its label map) cannot be used, or None if it decodes cleanly."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
        if w * h > max_pixels:
            return f"too large: {w}x{h} = {w * h} pixels > max_pixels = {max_pixels}"
        # A full decode: verify() alone passes truncated files.
        w, h = open_rgb(path).size
    except FileNotFoundError:
        return "file not found"
    except PermissionError:
        return "permission denied"
    except IsADirectoryError:
        return "is a directory, not an image file"
    except Image.DecompressionBombError as e:
        return f"too large: {e}"
    except UnidentifiedImageError:
        return "not an image (unrecognised or unsupported format)"
    except OSError as e:
        if e.errno is not None:           # the file system's error, not the image's
            return f"cannot read: {_why(e)}"
        return f"truncated or corrupt image: {e}"
    except (SyntaxError, ValueError, EOFError) as e:
        return f"truncated or corrupt image: {e}"
    except Exception as e:  # a strange file must not stop the whole dataset
        return f"cannot decode image: {type(e).__name__}: {e}"
    if label_path:
        try:
            label = read_label(label_path)
        except FileNotFoundError:
            return f"label map not found: {label_path}"
        except Exception as e:
            return f"label map unreadable: {type(e).__name__}: {e}"
        if label.shape != (h, w):
            return f"label map is {label.shape[1]}x{label.shape[0]} but the image is {w}x{h}"
    return None


def _why(e: OSError) -> str:
    """An OSError in words: 'permission denied', 'symlink loop', ..."""
    if e.errno == errno.ELOOP:
        return "symlink loop"
    return (e.strerror or str(e)).lower()


def validate(records: pd.DataFrame, max_pixels: int = MAX_PIXELS, workers: int = 4,
             progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode every file in parallel; returns (accepted records, rejected: path, reason)."""
    jobs = list(zip(records["path"], records["label_path"]))
    with warnings.catch_warnings(), ThreadPoolExecutor(max(1, workers)) as pool:
        # Our own max_pixels limit decides what is too large; PIL's bomb warning adds nothing.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        reasons = list(tqdm(pool.map(lambda j: check_file(*j, max_pixels=max_pixels), jobs),
                            total=len(jobs), desc="validate", disable=not progress))
    bad = pd.Series([r is not None for r in reasons], index=records.index)
    rejected = pd.DataFrame({"path": records.loc[bad, "path"].to_numpy(dtype=str),
                             "reason": [r for r in reasons if r is not None]}, dtype=str)
    return records[~bad].reset_index(drop=True), rejected
