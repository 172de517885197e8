"""Checkpoints: a trained network saved and loaded, its training's random state, and the data it
was trained on.

``load_model`` reads ``best.pt`` (or an epoch's checkpoint) of a run folder into a network ready
for inference (its input normalisation on it as ``model.normalisation``), with the cities and
the config that made it; ``check_data`` refuses a data cache
other than the one the network was trained on. The training's own files: ``save`` and
``save_checkpoint`` (atomic; every tensor on the CPU, so a checkpoint loads anywhere with
``weights_only=True``), ``snapshot`` (a copy of a state that later steps cannot change),
``Writer`` (an epoch's files written in the background), ``rng_state`` / ``set_rng_state`` (every
random generator, so that a resumed training draws what an uninterrupted one would),
``deterministic`` (fixed threads and kernels) and ``resumable`` (the checkpoint to go on from).
Reads and writes the run folder it is given.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from citylib.core import devices
from citylib.core.artifacts import ResultFolder, StaleError, atomic_path, write_csv, write_json
from citylib.core.config import to_dict
from citylib.nets import infer, models

TRAINING = "training"   # the training's result marker in a run folder (``train.NAME``)

SPLITS = ("train", "val", "test")
OUTPUT_FILES = ("best.pt", "history.csv", "training.json", "predictions.csv")   # a training's results

def load_model(run_dir: str | Path, which: str | int = "best",
               device: str | torch.device = "cpu") -> tuple[nn.Module, list[str], dict]:
    """(model in eval mode, cities, config) from ``best.pt``, the ``"last"`` or a given epoch,
    on ``device`` (a ``device`` setting such as ``auto``, or a torch device)."""
    run_dir = Path(run_dir)
    if which == "best":
        path = run_dir / "best.pt"
    elif which == "last":
        found = checkpoints(run_dir / "checkpoints")
        path = found[-1] if found else run_dir / "checkpoints" / "epoch_*.pt"
    else:
        path = run_dir / "checkpoints" / f"epoch_{int(which):03d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        config = ck["config"]
        with torch.device("meta"):     # no initial weights drawn (VGG11's: 3 s): the checkpoint's replace them
            model = models.build(config["arch"], len(config["cities"]), config["image_size"])
        model.load_state_dict(ck["model"], assign=True)
        model.normalisation = infer.Normalisation.of(config.get("normalisation"))
    except Exception as e:   # truncated, another file, another network's weights
        raise ValueError(f"{path}: not a readable citylib checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); train the run again") from None
    device = devices.resolve(device) if isinstance(device, str) else torch.device(device)
    return devices.place(model, device).eval(), list(config["cities"]), config


def data_key(cache, idx: dict) -> str:
    """The key of the data a training reads: its cache's (the data snapshot's) for a cache on
    disk, else a hash of the arrays and the split."""
    if getattr(cache, "key", None):
        return str(cache.key)
    h = hashlib.sha256()
    for part in (cache.images, np.asarray(cache.y, dtype=np.int64), *(idx[s] for s in SPLITS)):
        h.update(np.ascontiguousarray(part).data)
    return h.hexdigest()[:16]


def check_data(run_dir: Path, config: dict, cache, before: str = "using it") -> None:
    """StaleError unless ``cache`` is the data the run's model (its ``config``) was trained on."""
    have = data_key(cache, {s: cache.split_indices(s) for s in SPLITS})
    if have != config["data_key"] or list(map(str, cache.cities)) != list(config["cities"]):
        raise StaleError(f"{run_dir}: the model was trained on data snapshot {config['data_key']}, "
                         f"but the data stage now holds {have} (its source or settings changed): "
                         f"train again (notebook 02, or `citylib run`) before {before}")


def resumable(out: Path, chash: str, force: bool, name: str) -> Path | None:
    """The last checkpoint of this key to resume from, or None. ``force``, or results of
    another key (settings, data or code changed), clear the folder's training results first."""
    found = checkpoints(out / "checkpoints")
    stale = bool(found) and torch.load(found[-1], weights_only=True, mmap=True).get("key") != chash
    if force or stale or any((out / f).exists() for f in OUTPUT_FILES) and not found:
        if stale and not force:
            tqdm.write(f"{name}: {out} holds a training of other settings, data or code: "
                       "training again")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for f in OUTPUT_FILES:
            (out / f).unlink(missing_ok=True)
        return None
    return found[-1] if found else None


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Epoch checkpoints in epoch order."""
    return sorted(ckpt_dir.glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(obj: dict, ckpt_dir: Path, epoch: int, keep: int | None) -> None:
    """Write epoch ``epoch``'s checkpoint, then drop all but the last ``keep`` (None: keep all)."""
    save(obj, ckpt_dir / f"epoch_{epoch:03d}.pt")
    if keep is not None:
        for old in checkpoints(ckpt_dir)[:-max(1, keep)]:
            old.unlink()


def snapshot(state: Any) -> Any:
    """A copy of a state dict that later training steps cannot change, every tensor cloned to
    the CPU (so that a checkpoint written on a GPU loads anywhere)."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        out = type(state)((k, snapshot(v)) for k, v in state.items())
        if hasattr(state, "_metadata"):         # a module state dict's versions, as deepcopy keeps them
            out._metadata = copy.deepcopy(state._metadata)
        return out
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return copy.deepcopy(state)


class Writer:
    """Writes an epoch's files on a background thread while the next epoch trains.

    ``wait`` blocks until everything submitted is on disk and re-raises a failed write; each file
    is still written atomically, so an interruption leaves the previous checkpoint intact.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="citylib-checkpoint")
        self._pending: list = []

    def submit(self, fn, *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


@contextlib.contextmanager
def deterministic(threads: int, device: torch.device = torch.device("cpu")):
    """Fixed thread count, deterministic kernels; the caller's torch/numpy/python RNGs restored
    (on CUDA also the GPU's generator; cuBLAS then needs a fixed workspace to be deterministic)."""
    prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            np.random.get_state(), random.getstate(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark)
    torch.set_num_threads(threads)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    # CUDA has no deterministic backward for adaptive average pooling (VGG11, AlexNet) or the
    # average pool inside local response norm (VGG-S): there it warns instead of raising
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        torch.set_num_threads(prev[0])
        torch.use_deterministic_algorithms(prev[1], warn_only=prev[4])
        torch.backends.cudnn.benchmark = prev[5]
        np.random.set_state(prev[2])
        random.setstate(prev[3])


def rng_state(gen: torch.Generator, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """Every RNG state as tensors and plain lists (loadable with weights_only=True); on CUDA
    also the generator of this process's GPU (dropout there draws from it)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    cuda = {"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
    return {
        **cuda, "torch": torch.get_rng_state(), "generator": gen.get_state(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any], gen: torch.Generator,
                   device: torch.device = torch.device("cpu")) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    gen.set_state(state["generator"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def run_config(arch: str, seed: int, cfg, cache, idx: dict, extra: dict | None,
               norm: infer.Normalisation = infer.SCRATCH) -> dict:
    """What a training records about itself: settings, cities, image size, the data's key and
    the input normalisation of its weights (which every later use of the network applies)."""
    images = cache.images
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3:
        raise ValueError(f"cache.images must be (N, S, S, 3), got {images.shape}")
    return {
        "arch": arch, "seed": int(seed), "train": to_dict(cfg),
        "cities": [str(c) for c in cache.cities], "image_size": int(images.shape[1]),
        "data_key": data_key(cache, idx), "normalisation": norm.to_dict(),
        # a JSON round trip keeps the stored config to plain types (weights_only loading)
        "extra": json.loads(json.dumps(extra or {}, default=str)),
    }


def trained(run_dir: str | Path, cache, device: str = "auto") -> tuple[nn.Module, list, str]:
    """The run's best network on ``device``, its cities and its training's key, once the training
    is known finished and made on ``cache``'s data snapshot (StaleError otherwise): what every
    analysis of a trained network starts from."""
    run_dir = Path(run_dir)
    model, cities, config = load_model(run_dir, device=device)
    check_data(run_dir, config, cache)
    done = ResultFolder(run_dir, TRAINING).finished()
    if done is None:
        raise StaleError(f"{run_dir}: no finished training; train first (notebook 02, or `citylib run`)")
    return model, cities, done["key"]


def write_test_results(out: Path, cache, idx: dict, probs: np.ndarray, config: dict,
                        chash: str, best: dict, init: dict | None, name: str, device: str) -> dict:
    """``predictions.csv`` and ``training.json`` (the test metrics and what the training started
    from: ``init``, the tensors loaded and those newly initialised); returns the metrics."""
    cities = list(config["cities"])
    test = idx["test"]
    true = np.asarray(cache.y, dtype=np.int64)[test]         # (n_test,)
    pred = probs.argmax(1)                                   # (n_test,)
    C = len(cities)
    confusion = np.zeros((C, C), dtype=np.int64)             # rows true, cols predicted
    np.add.at(confusion, (true, pred), 1)
    per_city = {c: (float(confusion[k, k] / confusion[k].sum()) if confusion[k].sum() else None)
                for k, c in enumerate(cities)}
    frame = pd.DataFrame({
        "index": test, "path": cache.index["path"].iloc[test].to_numpy(),
        "city": [cities[k] for k in true], "predicted": [cities[k] for k in pred],
        "correct": true == pred,
        **{f"prob_{c}": probs[:, k] for k, c in enumerate(cities)},
    })
    write_csv(out / "predictions.csv", frame)
    metrics = {
        "run": name, "test_accuracy": float((true == pred).mean()), "per_city_accuracy": per_city,
        "confusion_matrix": confusion.tolist(), "cities": cities, "best_epoch": best["epoch"],
        "best_val_accuracy": best["val_acc"],
        **{f"n_{s}": int(len(idx[s])) for s in SPLITS},
        "config": config, "key": chash, "device": device, "init": init,
    }
    write_json(out / "training.json", metrics)
    return metrics
