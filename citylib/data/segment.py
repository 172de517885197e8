"""Segmentation stage: an ADE20K label map (150 classes, 0 = unlabelled) for every cached image.

Reads a data ``Cache`` (its ``labels`` and ``index``) and, for the ``ade20k`` segmenter, the
original image files it names plus the DeepLabV3-MobileNetV2 ADE20K TFLite model
(``paths.ade20k_model_dir()/deeplabv3_mobilenetv2_ade20k.tflite`` unless ``model_path`` says
otherwise). Segmenters:

- ``ground_truth``: the dataset's own label maps (the cache's ``labels``); nothing is written.
- ``ade20k``: each original file is decoded at 513 px with the cache's centred-square geometry
  (``imagecache.prepare(path, "", 513)``), segmented by the model (argmax over its 151 scores), and
  the label map sampled to the cache's size S by nearest neighbour (as PIL's NEAREST resize).
- ``auto``: ground truth when every requested image has a label map, else the model.

Segmentation does not depend on the classifier, so model label maps are kept once per dataset
under ``<out>/ade20k_<key>/`` (default ``out``: ``<outputs>/data/segment``): ``labels.npy``
(N, S, S) uint8 in cache row order, ``done.npy`` (N,) bool (rows segmented so far) and
``meta.json``. The key (``key``) covers the cache folder name (itself a hash of the files and the
image size), the image size, the segmenter, this module's code and the model file's sha256, size
and mtime; ``threads`` changes only the speed and is not part of it.

``rows`` (e.g. ``cache.split_indices("test")``) segments only those rows; rows segmented by an
earlier call are reused, so asking for the test split and later for everything segments each
image once. Progress is saved every ``CHUNK`` images, so an interrupted run resumes. Rows never
segmented stay 0 in ``labels`` and False in ``done``.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from tqdm.auto import tqdm

from citylib.core import paths
from citylib.core.artifacts import atomic_dir, atomic_path, code_key, exclusive, read_json, reserve, write_json
from citylib.core.config import check, config_hash, cores
from citylib.data.imagecache import Cache, prepare

MODEL_FILE = "deeplabv3_mobilenetv2_ade20k.tflite"
MODEL_SIZE = 513  # the model's fixed input side
CHUNK = 64  # images segmented between two saves of progress


class SegmentError(ValueError):
    """Segmentation cannot run as asked; the message names the images or file at fault."""


@dataclass(frozen=True)
class SegmentConfig:
    """Settings of the segmentation stage (the ``segment:`` section of a parameter file)."""

    segmenter: Literal["auto", "ground_truth", "ade20k"] = "auto"
    model_path: str | None = None  # default: paths.ade20k_model_dir() / MODEL_FILE
    threads: int = 2  # CPU threads of each interpreter (speed only; not in the cache key)
    workers: int = 1  # processes, each with its own interpreter; 0: one per core (speed only)

    def __post_init__(self):
        check(self, segmenter=("auto", "ground_truth", "ade20k"), threads=">= 1", workers=">= 0")


@dataclass(frozen=True)
class SegmentResult:
    """Label maps aligned with the cache's rows, and where they came from."""

    labels: np.ndarray  # (N, S, S) uint8 ADE20K indices, read-only; 0 where not segmented
    segmenter: str  # "ground_truth" or "ade20k" (what "auto" chose)
    folder: Path  # the segmentation folder (the cache folder for ground truth)
    done: np.ndarray  # (N,) bool: rows that hold a label map
    reused: bool  # True when nothing had to be segmented

    def of(self, rows) -> "Rows":
        """The label maps of ``rows``, read from the store only as they are asked for."""
        return Rows(self.labels, rows)


class Rows:
    """Rows ``rows`` of an array, e.g. a memory-mapped store, read lazily: ``view[a:b]`` and
    ``view[i]`` read only those rows, so a large test set's label maps are never held whole;
    ``np.asarray(view)`` reads them all. It has ``len``, ``shape``, ``ndim`` and ``dtype`` and
    indexing by the first axis, nothing else of an array: take ``np.asarray`` of a slice for the rest."""

    def __init__(self, base: np.ndarray, rows):
        self.base, self.rows = base, np.asarray(rows, np.int64)
        self.shape = (len(self.rows), *base.shape[1:])
        self.ndim, self.dtype = len(self.shape), base.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self.base[self.rows[index]])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.base[self.rows], dtype)


# ---------------------------------------------------------------- the model


def model_file(model_path: str | os.PathLike | None = None) -> Path:
    """The ADE20K TFLite model to use; FileNotFoundError saying how to point at it if absent."""
    path = paths.resolve(model_path) if model_path else paths.ade20k_model_dir() / MODEL_FILE
    if not path.is_file():
        how = ("the 'model_path' setting" if model_path else
               "$CITYLIB_ADE20K (the folder holding it) or the segment 'model_path' setting")
        raise FileNotFoundError(
            f"ADE20K segmentation model not found: looked for {path}. Download {MODEL_FILE} "
            f"(docs/your-own-photos.md says where from) and put it there, or point {how} at it.")
    return path


def model_fingerprint(path: Path) -> dict:
    """sha256, size and mtime of the model file: a replaced model makes a new cache key."""
    st = path.stat()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()  # 2.4 MB: milliseconds
    return {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _interpreter(path: Path, threads: int):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:  # an optional runtime on some machines
        raise ImportError(f"the ade20k segmenter needs the 'ai-edge-litert' package ({e})") from None
    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    return it


def nearest_index(src: int, dst: int) -> np.ndarray:
    """Source pixel of each of ``dst`` output pixels, exactly as PIL's NEAREST resize picks it."""
    return np.floor((np.arange(dst) + 0.5) * src / dst).astype(np.intp)


def _model_input(path: str) -> np.ndarray:
    """(1, 513, 513, 3) float32 in [-1, 1]: the file's centred square, as the cache crops it."""
    img, _, _ = prepare(path, "", MODEL_SIZE)
    return (img.astype(np.float32) / 127.5 - 1.0)[None]


class Ade20k:
    """The ADE20K model, loaded once: ``model(files, size)`` -> (len(files), size, size) uint8."""

    def __init__(self, model_path: str | os.PathLike | None = None, threads: int = 2):
        self.path = model_file(model_path)
        self.interpreter = _interpreter(self.path, threads)

    def __call__(self, files: Sequence[str], size: int, progress: bool = False,
                 desc: str = "segment") -> np.ndarray:
        it = self.interpreter
        inp, outp = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
        # Nearest-neighbour resizing only picks pixels, so picking the score vectors first and
        # taking the argmax after gives the same map at a fraction of the cost at 513 x 513.
        pick = nearest_index(MODEL_SIZE, size)
        out = np.zeros((len(files), size, size), np.uint8)
        for i, x in enumerate(tqdm(_prefetch(files), total=len(files), desc=desc, disable=not progress)):
            it.set_tensor(inp, x)
            it.invoke()  # releases the GIL: the next file decodes meanwhile
            scores = it.tensor(outp)()[0]  # (513, 513, 151) view into the interpreter
            out[i] = scores[pick[:, None], pick[None, :]].argmax(-1)  # channel 0 = other -> 0
            del scores  # the interpreter refuses to run while a view of its memory is alive
        return out


def _prefetch(files: Sequence[str], ahead: int = 2):
    """Model inputs of ``files`` in order, decoded in a helper thread at most ``ahead`` early
    (each input is 3 MB: a whole chunk decoded ahead would waste memory)."""
    with ThreadPoolExecutor(1) as pool:
        pending = [pool.submit(_model_input, f) for f in files[:ahead]]
        for i in range(len(files)):
            x = pending.pop(0).result()
            if i + ahead < len(files):
                pending.append(pool.submit(_model_input, files[i + ahead]))
            yield x


# ---------------------------------------------------------------- the stage


def choose(cfg: SegmentConfig, cache: Cache, rows: np.ndarray) -> str:
    """The segmenter ``cfg`` means for these rows ('auto' resolved)."""
    if cfg.segmenter != "auto":
        return cfg.segmenter
    return "ground_truth" if bool(_has_labels(cache)[rows].all()) else "ade20k"


def run(cfg: SegmentConfig, out: str | os.PathLike | None, cache: Cache, *,
        rows: Sequence[int] | np.ndarray | None = None, progress: bool = True) -> SegmentResult:
    """Label maps for ``rows`` of ``cache`` (default: every row), reusing earlier work, in a
    folder under ``out`` (default ``outputs/data/segment``; ground truth needs none)."""
    n, size = len(cache), int(cache.labels.shape[1])
    rows = np.arange(n) if rows is None else np.unique(np.asarray(rows, dtype=np.intp))
    if rows.size and (rows[0] < 0 or rows[-1] >= n):
        raise SegmentError(f"rows must lie in 0..{n - 1}; got {rows[0]}..{rows[-1]}")
    name = choose(cfg, cache, rows)
    if name == "ground_truth":
        return _ground_truth(cache, rows)
    model = model_file(cfg.model_path)
    fingerprint = model_fingerprint(model)
    folder_key = key(cfg, cache, rows)
    folder = (paths.resolve(out) if out is not None else paths.outputs() / "data" / "segment") / f"{name}_{folder_key}"
    _create(folder, n, size, {"key": folder_key, "segmenter": name, "cache": str(cache.folder),
                              "image_size": size, "code": code_key(__name__),
                              "model": {"path": str(model), **fingerprint}})
    todo = rows[~_read_done(folder, n)[rows]]
    if todo.size:
        files = cache.index["path"].to_numpy(str)
        if isinstance(cache, Cache):                     # a store keeps the world's paths relative
            files = np.array([cache.file(p) for p in files])
        workers = cfg.workers or cores()
        # several workers: parts small enough that every worker is busy to the end
        chunk = CHUNK if workers <= 1 else max(1, min(CHUNK, -(-todo.size // (4 * workers))))
        parts = [todo[s:s + chunk] for s in range(0, todo.size, chunk)]
        with tqdm(total=todo.size, desc="segment (ade20k)", disable=not progress) as bar:
            for part, maps in _segmented(parts, files, size, model, cfg.threads, workers):
                _save(folder, part, maps)
                bar.update(part.size)
    done = _read_done(folder, n)  # read before the labels: a saved row is never un-done
    labels = np.load(folder / "labels.npy", mmap_mode="r")
    return SegmentResult(labels, name, folder, done, reused=not todo.size)


def _segmented(parts: list[np.ndarray], files: np.ndarray, size: int, model: Path, threads: int,
               workers: int):
    """(rows, (len(rows), size, size) label maps) of every part, here or in ``workers``
    processes (spawned: the caller may be a kernel with torch's threads running), as each ends."""
    if workers <= 1 or len(parts) <= 1:
        segmenter = Ade20k(model, threads)
        for part in parts:
            yield part, segmenter(list(files[part]), size)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(parts)), mp_context=context, initializer=_start_worker,
                             initargs=(str(model), threads)) as pool:
        try:
            futures = {pool.submit(_segment_in_worker, list(files[part]), size): part for part in parts}
            for future in as_completed(futures):
                yield futures.pop(future), future.result()   # the map is saved, then freed
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


_WORKER: dict = {}   # a pool worker's own interpreter, made once by its initializer


def _start_worker(model: str, threads: int) -> None:
    _WORKER["model"] = Ade20k(model, threads)


def _segment_in_worker(files: list[str], size: int) -> np.ndarray:
    return _WORKER["model"](files, size)


def key(cfg: SegmentConfig, cache: Cache, rows: np.ndarray | None = None) -> str:
    """What the label maps of ``rows`` depend on: the cache, the segmenter (and its model file's
    fingerprint), this module's code. Ground truth is the cache's own."""
    rows = np.arange(len(cache)) if rows is None else np.asarray(rows, dtype=np.intp)
    name = choose(cfg, cache, rows)
    if name == "ground_truth":
        return config_hash(name, cache.key)
    fingerprint = model_fingerprint(model_file(cfg.model_path))
    return config_hash(code_key(__name__), cache.key, int(cache.labels.shape[1]), name, fingerprint)


def _has_labels(cache: Cache) -> np.ndarray:
    if "has_labels" not in cache.index.columns:
        return np.zeros(len(cache), bool)
    return cache.index["has_labels"].astype(str).str.lower().isin(("true", "1")).to_numpy()


def _ground_truth(cache: Cache, rows: np.ndarray) -> SegmentResult:
    """The cache's own label maps; SegmentError naming the images that have none."""
    has = _has_labels(cache)
    missing = rows[~has[rows]]
    if missing.size:
        names = cache.index["path"].to_numpy(str)[missing]
        shown = ", ".join(names[:5]) + (f", ... ({missing.size} in all)" if missing.size > 5 else "")
        raise SegmentError(f"segmenter 'ground_truth': {missing.size} image(s) have no label map: "
                           f"{shown}. Use segmenter 'ade20k' (or 'auto') for unlabelled data.")
    return SegmentResult(cache.labels, "ground_truth", cache.folder, has, reused=True)


def _create(folder: Path, n: int, size: int, meta: dict) -> None:
    """Make the folder with all-zero labels and nothing done, atomically, unless it exists."""
    with atomic_dir(folder) as tmp:   # readers see a whole folder or none
        if tmp is not None:
            np.lib.format.open_memmap(tmp / "labels.npy", "w+", np.uint8, (n, size, size)).flush()
            reserve(tmp / "labels.npy")       # a full disk said now, not a crash later
            np.save(tmp / "done.npy", np.zeros(n, bool))
            write_json(tmp / "meta.json", {**meta, "n": n})


def _read_done(folder: Path, n: int) -> np.ndarray:
    done = np.load(folder / "done.npy")
    if done.shape != (n,) or read_json(folder / "meta.json").get("n") != n:
        raise SegmentError(f"{folder}: holds {done.shape[0]} rows, the cache {n}; delete the folder")
    return done


def _save(folder: Path, rows: np.ndarray, maps: np.ndarray) -> None:
    """Write label maps of ``rows`` in place, then mark them done (labels first, so that a
    reader never sees a row done whose labels are missing)."""
    with exclusive(folder / ".lock", str(folder), quiet=True):   # no two processes lose each other's rows
        labels = np.load(folder / "labels.npy", mmap_mode="r+")
        labels[rows] = maps  # rows not yet done: no reader relies on them
        labels.flush()
        del labels
        done = np.load(folder / "done.npy")
        done[rows] = True
        with atomic_path(folder / "done.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, done)
