"""Fixtures shared by the test files: a small learnable image cache, a Grad-CAM folder
written as ``gradcam.run`` leaves it (for the stages that read one without training), and a
smoke job of three runs."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from citylib.core.artifacts import write_csv, write_json
from citylib.core.paths import PARAMETERS
from citylib.run import cli
from citylib.stages import gradcam

CITIES = ("amsterdam", "berlin", "cairo")


def square_cache(per_city: int = 20, split: tuple[int, int, int] = (12, 4, 4), size: int = 64,
                 seed: int = 0) -> SimpleNamespace:
    """``per_city`` noise images per city, each with a bright 16 px square whose colour and
    quadrant give the city; ``split`` images per city for train, val and test. What a stage
    reads of an ``imagecache.Cache``: images, labels (all 0), index, cities, y, split_indices."""
    assert sum(split) == per_city
    rng = np.random.default_rng(seed)
    C = len(CITIES)
    y = np.repeat(np.arange(C), per_city).astype(np.int64)                 # (N,)
    images = rng.integers(0, 96, (len(y), size, size, 3), dtype=np.uint8)  # (N, S, S, 3)
    q = size // 2
    for i, k in enumerate(y):
        oy, ox = (k // 2) * q + rng.integers(4, q - 20), (k % 2) * q + rng.integers(4, q - 20)
        images[i, oy:oy + 16, ox:ox + 16] = 60
        images[i, oy:oy + 16, ox:ox + 16, k] = 255
    names = np.tile(np.repeat(["train", "val", "test"], split), C)
    index = pd.DataFrame({
        "path": [f"img/{i:04d}.png" for i in range(len(y))], "city": [CITIES[k] for k in y],
        "group": np.arange(len(y)) // 2, "view": 0, "label_path": "", "split": names,
    })
    return SimpleNamespace(images=images, labels=np.zeros((len(y), size, size), np.uint8),
                           index=index, cities=list(CITIES), y=y,
                           split_indices=lambda s: np.flatnonzero(index["split"].to_numpy() == s))


def gradcam_folder(run_dir: Path, masks: np.ndarray, rows, paths, cities, predicted, meta: dict,
                   probs: np.ndarray | None = None) -> Path:
    """``run_dir/gradcam`` as ``gradcam.run`` writes it, without the sanity checks: masks
    (n, h, w) for cache ``rows`` of true ``cities``, explained for the ``predicted`` city;
    ``probs`` (n, len(CITIES)) adds the prob_<city> columns. Returns the folder."""
    out = Path(run_dir) / gradcam.FOLDER
    out.mkdir(parents=True)
    np.save(out / "masks.npy", np.asarray(masks, np.float16))
    index = pd.DataFrame({"index": np.asarray(rows), "path": list(paths), "city": list(cities),
                          "target": list(predicted), "predicted": list(predicted),
                          "correct": np.asarray(predicted) == np.asarray(cities)})
    if probs is not None:
        index = index.assign(**{f"prob_{c}": probs[:, k] for k, c in enumerate(CITIES)})
    write_csv(out / "index.csv", index)
    write_json(out / "sanity.json", {})
    write_json(out / "meta.json", {"method": "gradcam", "map_size": list(np.shape(masks)[1:]),
                                   "cities": list(CITIES), **meta})
    return out


@pytest.fixture(scope="session")
def make_cache():
    """The factory ``square_cache``."""
    return square_cache


@pytest.fixture(scope="session")
def write_gradcam():
    """The factory ``gradcam_folder``."""
    return gradcam_folder


@pytest.fixture(scope="session")
def smoke_grid(tmp_path_factory):
    """(parameter folder, outputs, exit code) of ``citylib run`` on three smoke runs: ``good``
    and ``other`` finish, ``broken`` fails (its checkpoint folder holds a file that is no
    checkpoint of it), so the grid also shows that one failing run does not stop the others.
    Shared by the browser's tests (first, reading only) and the runner's (one job for both)."""
    root = tmp_path_factory.mktemp("grid")
    params_dir, out = root / "params", root / "outputs"
    params_dir.mkdir()
    shutil.copy(PARAMETERS / "smoke" / "simple_seed0.yaml", params_dir / "good.yaml")
    shutil.copy(PARAMETERS / "smoke" / "simple_seed1.yaml", params_dir / "broken.yaml")
    shutil.copy(PARAMETERS / "smoke" / "simpler_seed0.yaml", params_dir / "other.yaml")
    (out / "runs" / "broken" / "checkpoints").mkdir(parents=True)
    (out / "runs" / "broken" / "checkpoints" / "epoch_001.pt").write_bytes(b"not a checkpoint")
    code = cli.main(["run", "--params", str(params_dir), "--outputs", str(out)])
    return params_dir, out, code
