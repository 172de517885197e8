"""Decoded-image cache: every accepted image decoded and resized once, so epochs never re-decode.

Reads the image files (and label maps) named by a split records frame. Writes one folder
``<root>/<key>/`` holding ``images.npy`` (N, S, S, 3) uint8, ``labels.npy`` (N, S, S) uint8
(ADE20K index, 0 where an image has no label map), ``index.csv`` (the records in row order
with ``split``, ``has_labels``, ``width``, ``height``) and ``meta.json``. The key hashes the
image size, this module's code and every file's (path, size, mtime), so a changed setting, a
changed decoder or a touched file makes a new folder instead of reusing stale pixels.

The arrays are memory maps on disk, written by a pool of worker processes and read a batch at a
time, so a store far larger than memory (152k images at 224 px are 23 GB) is built and trained
from with little RAM. An interrupted build resumes from its last finished chunk.

Image normalisation (shared with validation in ``citylib.data``): EXIF orientation is applied;
grayscale, palette, CMYK (plain conversion, ICC profiles ignored) become RGB; alpha is
composited onto black, so transparent pixels are black rather than whatever colour the file
kept under them; 16-bit images are scaled by 255/65535. Label maps follow the image geometry
with nearest-neighbour sampling so class indices are never blended.
"""
from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from tqdm import tqdm

from citylib.core.artifacts import code_key, exclusive, read_json, reserve, write_csv, write_json, writing
from citylib.core.config import config_hash, cores

LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B")
INDEX_COLUMNS = ["path", "city", "group", "view", "label_path", "split"]


@dataclasses.dataclass(frozen=True)
class Cache:
    """A loaded cache; ``images`` and ``labels`` are read-only memory maps."""

    folder: Path
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N, S, S) uint8, 0 = unlabelled
    index: pd.DataFrame  # N rows: path, city, group, view, label_path, split, has_labels, ...
    cities: tuple[str, ...]  # sorted; y indexes into it
    y: np.ndarray  # (N,) int64 city index per row
    base: Path | None = None  # the outputs folder, where the index's relative paths lie

    def __len__(self) -> int:
        return len(self.index)

    def file(self, path: str) -> str:
        """Where a path of the index is now: relative ones inside the outputs folder."""
        return path if not path or os.path.isabs(path) or self.base is None else str(self.base / path)

    @property
    def key(self) -> str:
        """What the arrays and the split were made from (the folder's name)."""
        return self.folder.name

    def split_indices(self, split: str) -> np.ndarray:
        """Row numbers (int64) of one split: 'train', 'val' or 'test'."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; expected 'train', 'val' or 'test'")
        return np.flatnonzero(self.index["split"].to_numpy() == split).astype(np.int64)


def to_rgb(im: Image.Image) -> Image.Image:
    """A loaded PIL image as 8-bit RGB (see the module docstring for the rules)."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, im).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        if im.mode == "F" and a.size and np.nanmax(a) <= 1.0:
            a = a * 65535.0  # floats in [0, 1]
        a = np.clip(np.nan_to_num(a), 0, 65535) * (255.0 / 65535.0)
        return Image.fromarray(np.round(a).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV; raises on anything stranger


def open_rgb(path: str | os.PathLike, draft: int | None = None) -> Image.Image:
    """Decode a whole image file to upright RGB; ``draft`` lets JPEG decode at >= that size."""
    return _decode(path, draft)[0]


def _decode(path, draft: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """(upright RGB image, upright (width, height) of the file at full resolution)."""
    with Image.open(path) as im:
        w, h = im.size
        if (im.getexif().get(0x0112) or 1) in (5, 6, 7, 8):  # EXIF turns it by 90 degrees
            w, h = h, w
        if draft is not None and im.format == "JPEG":
            # DCT-domain downscaling: far faster, and the result is still >= draft on both sides.
            im.draft(im.mode, (draft, draft))
        im.load()
        return to_rgb(ImageOps.exif_transpose(im)), (w, h)


def read_label(path: str | os.PathLike) -> np.ndarray:
    """A label map as (H, W) uint8 class indices; ValueError if it cannot be one."""
    with Image.open(path) as im:
        im.load()
        if im.mode not in LABEL_MODES:
            raise ValueError(f"label map has mode {im.mode}; expected one class index per pixel")
        im = ImageOps.exif_transpose(im)
        a = np.asarray(im)
    if a.size and (a.min() < 0 or a.max() > 255):
        raise ValueError(f"label map values {a.min()}..{a.max()} do not fit ADE20K indices (0..255)")
    return a.astype(np.uint8)


def _square_box(w: int, h: int) -> tuple[float, float, float, float]:
    """The centred square of a w x h image: shorter side to S then centre-crop, as one resize."""
    m = min(w, h)
    return ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)


def prepare(path: str, label_path: str, size: int):
    """Decode one record: ((S, S, 3) uint8, (S, S) uint8 or None, (width, height) upright)."""
    im, (w, h) = _decode(path, draft=size)
    img = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=_square_box(*im.size)))
    lab = None
    if label_path:
        lim = Image.fromarray(read_label(label_path))
        lab = np.asarray(lim.resize((size, size), Image.Resampling.NEAREST, box=_square_box(*lim.size)))
    return img, lab, (w, h)


def full_view(cache: Cache, row: int, largest: int = 512) -> np.ndarray:
    """Cache row ``row``'s image at the resolution of its file: the cache's square crop, with
    the shorter side kept (at most ``largest`` px), (S', S', 3) uint8. The cached pixels when
    the file cannot be read any more (moved, deleted) or is no larger than the cache."""
    cached = np.asarray(cache.images[row])
    try:
        path = cache.index["path"].iloc[row]
        path = cache.file(path) if isinstance(cache, Cache) else path   # only a store keeps them relative
        with Image.open(path) as im:
            side = min(im.size)
        if side <= cached.shape[0]:
            return cached
        return prepare(path, "", min(side, largest))[0]
    except (OSError, ValueError, Image.DecompressionBombError):
        return cached


def file_stats(records: pd.DataFrame, base: str | os.PathLike | None = None) -> list:
    """(path, size, mtime_ns) of every image and label file, in row order; None if missing. A
    relative path is a file inside the outputs folder ``base`` (a generated world, whose content
    its folder's key fixes): (path, size), so that a moved or copied outputs folder keys alike."""
    def stat(p: str):
        if not p:
            return None
        inside = not os.path.isabs(p)
        try:
            s = os.stat(os.path.join(base, p) if inside else p)
            return [p, s.st_size] if inside else [p, s.st_size, s.st_mtime_ns]
        except OSError:
            return [p, None] if inside else [p, None, None]
    return [[stat(p), stat(lp)] for p, lp in zip(records["path"], records["label_path"])]


def cache_keys(records: pd.DataFrame, image_size: int, base: str | os.PathLike | None = None) -> tuple[str, str]:
    """(folder key, pixel key): pixels depend on files and size; the folder also on the index."""
    pixels = config_hash(code_key(__name__), int(image_size), file_stats(records, base))
    index = records[["city", "group", "view", "split"]].astype(str).to_numpy().tolist()
    return config_hash(pixels, index), pixels


def build_cache(records: pd.DataFrame, image_size: int, root: str | os.PathLike,
                workers: int | None = None, progress: bool = True, base: str | os.PathLike | None = None) -> Path:
    """Build (or reuse) the cache of ``records`` under ``root``; returns its folder. Relative
    paths in ``records`` are files inside the outputs folder ``base``, kept relative in the
    cache's index (``Cache.file`` opens them), so that the outputs folder can move.

    ``workers`` processes (default: one per core this process may use) decode and resize a chunk of rows each and
    write it straight into the memory-mapped arrays, so no process ever holds more than a chunk
    of pixels. The build goes on in ``<root>/.<key>.building/``, which records every finished
    chunk: an interrupted build resumes where it stopped. Another process building the same
    cache meanwhile is waited for, and its cache reused.
    """
    missing = [c for c in INDEX_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(f"records lack column(s) {missing}")
    records = records[INDEX_COLUMNS].reset_index(drop=True)
    root = Path(root)
    key, pixels = cache_keys(records, image_size, base)
    folder = root / key
    if folder.exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / f".{key}.lock", f"the image cache {folder}"):
        if folder.exists():                  # built by the process we waited for
            return folder
        work = root / f".{key}.building"     # hidden: never taken for a finished cache
        files = records.assign(**{c: [os.path.join(base, p) if p and base is not None else p for p in records[c]]
                                  for c in ("path", "label_path")})          # to open, where they are now
        has, sizes = _write_arrays(files, image_size, work, pixels, root, workers or cores(), progress)
        index = records.assign(has_labels=has, width=sizes[:, 0], height=sizes[:, 1])
        write_csv(work / "index.csv", index)
        write_json(work / "meta.json", {
            "key": key, "pixels_key": pixels, "code": code_key(__name__),
            "base": None if base is None else os.path.relpath(base, folder),   # relative paths' folder
            "image_size": int(image_size), "n": len(records),
            "cities": sorted(records["city"].unique()),
            "splits": records["split"].value_counts().sort_index().to_dict(),
        })
        for name in ("done.npy", "has.npy", "sizes.npy"):
            (work / name).unlink(missing_ok=True)   # the build's own bookkeeping
        os.rename(work, folder)              # readers see a whole cache or none
    return folder


def _write_arrays(records, size, work, pixels, root, workers, progress):
    """Fill images.npy / labels.npy in ``work`` chunk by chunk, skipping the chunks a previous,
    interrupted build finished; returns (has_labels, (N, 2) upright sizes)."""
    n = len(records)
    twin = _find_pixels(root, pixels)
    if twin is not None:  # same pixels, other split: link the arrays instead of decoding again
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        for name in ("images.npy", "labels.npy"):
            try:
                os.link(twin / name, work / name)
            except OSError:
                shutil.copyfile(twin / name, work / name)
        old = pd.read_csv(twin / "index.csv", usecols=["has_labels", "width", "height"])
        return old["has_labels"].to_numpy(bool), old[["width", "height"]].to_numpy(np.int64)
    chunk = _chunk_rows(n)
    starts = list(range(0, n, chunk))
    done = _open_work(work, n, size, len(starts))                   # (chunks,) bool, on disk
    todo = [s for c, s in enumerate(starts) if not done[c]]
    jobs = [(str(work), s, list(records["path"][s:s + chunk]), list(records["label_path"][s:s + chunk]),
             size) for s in todo]
    bar = tqdm(total=n, initial=n - sum(min(chunk, n - s) for s in todo), desc="cache",
               disable=not progress, unit="img")
    with bar, _pool(workers, len(jobs)) as pool:
        for start in (pool.map(_fill_chunk, jobs) if pool else map(_fill_chunk, jobs)):
            done[start // chunk] = True
            done.flush()                     # this chunk's pixels are in the arrays' files
            bar.update(min(chunk, n - start))
    has = np.load(work / "has.npy")
    sizes = np.load(work / "sizes.npy")
    del done
    return has, sizes


def _chunk_rows(n: int) -> int:
    """Rows per chunk: at least 64 chunks (shared out evenly among up to 16 workers, resumed
    finely), each of 8 to 256 rows (a worker's start and the bookkeeping cost nothing). It
    depends on ``n`` alone, so a build resumed with other workers (another machine, another
    ``workers``) finds its chunks where it left them."""
    return int(min(256, max(8, -(-n // 64))))


def _open_work(work: Path, n: int, size: int, chunks: int) -> np.ndarray:
    """The chunks-finished flags of the build in ``work``, made fresh (with empty arrays) unless
    a previous build of the same key left them whole."""
    shapes = {"images.npy": ((n, size, size, 3), np.uint8), "labels.npy": ((n, size, size), np.uint8),
              "has.npy": ((n,), np.bool_), "sizes.npy": ((n, 2), np.int64), "done.npy": ((chunks,), np.bool_)}
    try:
        arrays = {name: np.load(work / name, mmap_mode="r") for name in shapes}
        if all(a.shape == shapes[k][0] and a.dtype == shapes[k][1] for k, a in arrays.items()):
            del arrays
            return np.load(work / "done.npy", mmap_mode="r+")
    except (OSError, ValueError, EOFError):
        pass                                 # absent, or cut short while being made
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    for name, (shape, dtype) in shapes.items():
        if name != "done.npy":               # made last: its presence says the others are whole
            with writing(work / name):
                np.lib.format.open_memmap(work / name, "w+", dtype, shape).flush()
            reserve(work / name)             # a full disk said now, not a crash mid-build
    with writing(work / "done.npy"):
        np.lib.format.open_memmap(work / "done.npy", "w+", np.bool_, (chunks,)).flush()
    return np.load(work / "done.npy", mmap_mode="r+")


@contextlib.contextmanager
def _pool(workers: int, jobs: int):
    """A pool of ``workers`` processes (None: work in this process). Spawned, not forked: the
    caller may be a kernel with torch's threads running."""
    if workers <= 1 or jobs <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(min(workers, jobs), mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _fill_chunk(job) -> int:
    """Decode rows ``start..`` into the build's arrays in ``work``; returns ``start``."""
    work, start, image_paths, label_paths, size = job
    work = Path(work)
    images = np.load(work / "images.npy", mmap_mode="r+")     # (N, S, S, 3) uint8
    labels = np.load(work / "labels.npy", mmap_mode="r+")     # (N, S, S) uint8
    has = np.load(work / "has.npy", mmap_mode="r+")           # (N,) bool
    sizes = np.load(work / "sizes.npy", mmap_mode="r+")       # (N, 2) int64
    for i, (path, label_path) in enumerate(zip(image_paths, label_paths), start):
        img, lab, wh = prepare(path, label_path, size)
        images[i] = img
        if lab is not None:
            labels[i], has[i] = lab, True
        sizes[i] = wh
    for a in (images, labels, has, sizes):
        a.flush()
    return start


def _find_pixels(root: Path, pixels: str) -> Path | None:
    """A finished cache under ``root`` with the same pixel key, if any."""
    for meta in sorted(root.glob("[!.]*/meta.json")):  # not the hidden folders being built
        try:
            if read_json(meta).get("pixels_key") == pixels:
                return meta.parent
        except (OSError, ValueError):
            continue
    return None


def load_cache(folder: str | os.PathLike) -> Cache:
    """Open a cache folder written by ``build_cache`` (arrays memory-mapped, read-only)."""
    folder = Path(folder)
    if not (folder / "meta.json").exists():
        raise FileNotFoundError(f"{folder}: not a finished cache (no meta.json)")
    index = pd.read_csv(folder / "index.csv", dtype={"group": str, "city": str, "label_path": str},
                        keep_default_na=False)
    cities = tuple(sorted(index["city"].unique()))
    y = index["city"].map({c: i for i, c in enumerate(cities)}).to_numpy(np.int64)
    base = read_json(folder / "meta.json").get("base")
    return Cache(folder=folder, images=np.load(folder / "images.npy", mmap_mode="r"),
                 labels=np.load(folder / "labels.npy", mmap_mode="r"), index=index,
                 cities=cities, y=y, base=None if base is None else (folder / base).resolve())
