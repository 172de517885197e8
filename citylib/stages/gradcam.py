"""Grad-CAM: the weighted masks ("mask_norm") of a trained run, as in Shi et al., section 2.1.

Reads a run folder's ``best.pt`` (through ``checkpoint.load_model``) and the test images of the data
stage's ``Cache``. Writes ``<run>/gradcam/``:

- ``masks.npy``: (N, h, w) float16, one min-max normalised mask per test image at the
  Grad-CAM layer's own resolution (vgg11: 14 x 14 at 224 px); ``saliency.upsample`` brings
  them to S x S.
- ``index.csv``: row = cache row index, path, city, target, predicted, correct, prob_<city>.
- ``sanity.json``: the cascading-randomisation and deletion checks (``citylib.sanity``) and
  their ``verdict`` (pass or fail of each, with the numbers behind it).
- ``meta.json``: method, layer, map size, image size, config, the key of the training and of
  the data it read, and this result's key (``key``: the settings, the training's key, the code).
- ``.results/gradcam.json``: the marker of the finished result (``artifacts.ResultFolder``).

The cache must be the one the training read (its data snapshot); StaleError otherwise, so that
the masks are always those of the model's own test split.

The masks are computed by ``citylib.saliency`` (the CAM methods and the mask maths).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from citylib.core import devices
from citylib.core.artifacts import ResultFolder, atomic_path, code_key, read_json, reserve, write_csv, write_json
from citylib.core.config import check, config_hash, to_dict
from citylib.explain import cams, sanity
from citylib.nets import checkpoint, infer

FOLDER = NAME = "gradcam"   # the run's sub-folder, and its result marker's name


@dataclass(frozen=True)
class GradCAMConfig:
    """Grad-CAM stage settings; every one is part of the result folder's hash."""

    method: str = "gradcam"     # a CAM method of citylib.explain.cams (one file each)
    target: Literal["predicted", "true"] = "predicted"   # which city's score is explained
    batch_size: int = 32
    threshold: float = 0.5       # visual explanation: the image where mask >= threshold
    sanity_images: int = 32      # test images for randomisation and deletion checks (0: skip)
    deletion_steps: int = 8      # deletion curve: fractions 0, 1/k, ..., 1 of the pixels
    seed: int = 0                # sanity images, re-initialisation, random deletion order
    device: str = "auto"         # of the masks and the sanity checks (citylib.devices); key: its kind

    def __post_init__(self):
        check(self, method=cams.METHODS, target=("predicted", "true"), batch_size=">= 1",
              threshold="in [0, 1]", sanity_images=">= 0", deletion_steps=">= 1", seed=">= 0")
        devices.validate(self)


@dataclass(frozen=True)
class GradCAMResult:
    """A finished ``<run>/gradcam`` folder, as ``run`` and ``load`` return it."""

    folder: Path               # <run>/gradcam
    masks: np.ndarray          # (N, h, w) float16 in [0, 1], memory-mapped; row i = index row i
    index: pd.DataFrame        # index, path, city, target, predicted, correct, prob_<city>
    meta: dict                 # method, layer, map_size, image_size, cities, config, key, ...
    sanity: dict               # rows, cascade, deletion, verdict; empty if sanity_images = 0
    reused: bool               # True: a finished folder with this key was found, nothing ran

    @property
    def threshold(self) -> float:
        return float(self.meta["config"]["threshold"])


def run(cfg: GradCAMConfig, run_dir: str | Path, cache, *, progress: bool = True) -> GradCAMResult:
    """Masks for every test image of ``cache`` with the run's best model; reuse if unchanged."""
    run_dir = Path(run_dir)
    out = run_dir / FOLDER
    model, cities, tconfig = checkpoint.load_model(run_dir, device=cfg.device)
    ckpt = torch.load(run_dir / "best.pt", weights_only=True, mmap=True)
    check_cache(run_dir, tconfig, cache)
    test = np.asarray(cache.split_indices("test"), dtype=np.int64)
    if len(test) == 0:
        raise ValueError("the cache's test split is empty")
    y = np.asarray(cache.y, dtype=np.int64)
    paths = cache.index["path"].to_numpy()[test]
    folder = ResultFolder(out, NAME, key(cfg, ckpt["key"]))
    if folder.done() is not None:
        return dataclasses.replace(load(run_dir), reused=True)

    folder.begin()
    target = None if cfg.target == "predicted" else y[test]
    probs, targets = np.zeros((len(test), len(cities)), np.float32), np.zeros(len(test), np.int64)
    with contextlib.ExitStack() as hooks, atomic_path(out / "masks.npy") as tmp:
        explainers = [hooks.enter_context(cams.make(cfg.method, m))   # one per device
                      for m in devices.replicas(model, devices.every(cfg.device))]
        cam, masks = explainers[0], None
        for sl, res in cams.batches(explainers, cache.images, target, cfg.batch_size, progress, rows=test):
            if masks is None:                                        # (N, h, w) float16
                masks = np.lib.format.open_memmap(tmp, "w+", np.float16,
                                                  (len(test), *res.masks.shape[1:]))
                reserve(tmp)                                         # a full disk said now
            masks[sl], probs[sl], targets[sl] = res.masks, res.probs, res.target
        layer, map_hw = cam.layer_name, masks.shape[1:]
        masks.flush()
        del masks
    pred = probs.argmax(1)
    write_csv(out / "index.csv", pd.DataFrame({
        "index": test, "path": paths, "city": [cities[k] for k in y[test]],
        "target": [cities[k] for k in targets], "predicted": [cities[k] for k in pred],
        "correct": pred == y[test], **{f"prob_{c}": probs[:, k] for k, c in enumerate(cities)}}))

    checks = {}
    if cfg.sanity_images:
        pick = np.sort(np.random.default_rng(cfg.seed).choice(
            len(test), min(cfg.sanity_images, len(test)), replace=False))
        images = np.asarray(cache.images[test[pick]])                # (n, S, S, 3) uint8
        kw = dict(method=cfg.method, batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
        checks = {"rows": test[pick].tolist(),
                  "cascade": sanity.cascade(model, images, targets[pick], **kw),
                  "deletion": sanity.deletion(model, images, targets[pick],
                                              steps=cfg.deletion_steps, **kw)}
        checks["verdict"] = sanity.verdict(checks)
    write_json(out / "sanity.json", checks)
    write_json(out / "meta.json", {
        "method": cfg.method, "layer": layer, "map_size": list(map_hw),
        "image_size": int(tconfig["image_size"]), "n": int(len(test)), "cities": cities,
        "mask_dtype": "float16", "training_key": ckpt["key"], "data_key": tconfig["data_key"],
        "config": to_dict(cfg), "key": folder.key,
        "device": devices.describe(cfg.device, infer.device_of(model))})
    folder.commit(["masks.npy", "index.csv", "sanity.json", "meta.json"])
    return load(run_dir)


def key(cfg: GradCAMConfig, training_key: str) -> str:
    """What the masks depend on: these settings, the trained model (its key) and the code."""
    return config_hash(NAME, code_key(__name__), devices.keyed(cfg), training_key)


def check_cache(run_dir: Path, tconfig: dict, cache) -> None:
    """StaleError unless ``cache`` is the data the run's model was trained on."""
    checkpoint.check_data(run_dir, tconfig, cache, "explaining it")


def load(run_dir: str | Path) -> GradCAMResult:
    """The finished Grad-CAM results of a run (masks memory-mapped, read-only)."""
    out = Path(run_dir) / FOLDER
    if not (out / "meta.json").is_file():
        raise FileNotFoundError(f"{out}: no finished Grad-CAM results (run gradcam.run first)")
    index = pd.read_csv(out / "index.csv", keep_default_na=False,
                        dtype={"path": str, "city": str, "target": str, "predicted": str})
    return GradCAMResult(out, np.load(out / "masks.npy", mmap_mode="r"), index,
                         read_json(out / "meta.json"), read_json(out / "sanity.json"), False)
