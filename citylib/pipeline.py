"""One run's stages, chained as the notebooks call them.

``open_run`` reads a parameter file into a ``Run`` (its resolved settings and folders); each
``run_*`` function runs one stage for that run and returns the stage's result, reusing
finished work whose settings are identical. The notebooks, the batch runner's notebooks and
the tests all call these, so the chain is written once. Reads and writes what each stage does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from citylib import artifacts, data, gradcam, paths, segment, stats, train
from citylib.params import RunConfig, load


@dataclass(frozen=True)
class Run:
    """A parameter file's resolved settings and the folders its results go to."""

    cfg: RunConfig
    outputs: Path

    @property
    def dir(self) -> Path:
        """``outputs/runs/<name>/``: everything this run makes."""
        return self.outputs / "runs" / self.cfg.name

    @property
    def data_dir(self) -> Path:
        """``outputs/data/``: the data stage, shared by the runs of a grid."""
        return self.outputs / "data"


def open_run(params_file: str | Path, outputs: str | Path | None = None) -> Run:
    """Validate a parameter file and locate its outputs (``outputs`` overrides the default)."""
    return Run(load(params_file), paths.outputs(outputs))


def run_data(run: Run, progress: bool = True) -> data.DataResult:
    """The data stage: check, split and cache the dataset (``outputs/data/``)."""
    return data.run(run.cfg.data, run.data_dir, progress=progress)


def load_cache(run: Run):
    """The decoded-image cache of the run's dataset (runs the data stage if needed)."""
    return data.load(run.cfg.data, run.data_dir, progress=False)


def run_training(run: Run, force: bool = False, progress: bool = True) -> train.TrainResult:
    """Train (or reuse, or resume) the run's network.

    Only the latest epoch checkpoint is kept (it is all a resume needs; a VGG11 checkpoint with
    its optimiser state is over 1 GB), besides ``best.pt``.
    """
    cfg = run.cfg
    return train.run(cfg.arch, cfg.seed, cfg.train, load_cache(run), run.dir, name=cfg.name,
                     extra_config=cfg.to_dict(), force=force, progress=progress, keep_checkpoints=1)


def run_gradcam(run: Run, progress: bool = True) -> gradcam.GradCAMResult:
    """Grad-CAM masks of every test image, with the sanity and deletion checks."""
    return gradcam.run(run.cfg.gradcam, run.dir, load_cache(run), progress=progress)


@dataclass(frozen=True)
class ObjectsResult:
    """The statistics stage's result for one run."""

    table: pd.DataFrame            # r_scores.csv at the configured threshold
    histograms: stats.Histograms   # for other thresholds, instantly
    segmenter: str                 # 'ground_truth' or 'ade20k'
    rows: np.ndarray               # (n_test,) cache rows of the test images, as the masks
    labels: np.ndarray             # (n_test, S, S) uint8 label maps of those rows
    planted: dict                  # city -> planted cue names (generated world), else {}
    recovery: pd.DataFrame         # rank of each planted cue by lift (empty without cues)


def run_objects(run: Run, progress: bool = True) -> ObjectsResult:
    """Label every test image (once per dataset), then R, coverage and lift per city and object.

    Writes ``r_scores.csv`` into the run folder and adds an ``objects`` entry (segmenter,
    threshold, planted-cue recovery on a generated world) to its ``metrics.json``.
    """
    cfg, cache = run.cfg, load_cache(run)
    cams = gradcam.load(run.dir)
    rows = cams.index["index"].to_numpy(np.int64)                      # cache rows of the masks
    seg = segment.run(cfg.segment, cache, run.data_dir / "segment", rows=rows, progress=progress)
    label_maps = np.asarray(seg.labels[rows])                         # (n, S, S) uint8
    size = cache.images.shape[1]
    result = stats.run(cfg.stats, stats.upsampled(cams.masks, size, gradcam.upsample), label_maps,
                       cams.index["city"].to_numpy(str), run.dir, progress=progress)
    cues = stats.planted(cfg.data.world.world) if cfg.data.source == "world" else {}
    recovery, scores = stats.planted_recovery(result.table, cues) if cues else (pd.DataFrame(), {})
    train.merge_json(run.dir / "metrics.json", {"objects": {
        "segmenter": seg.segmenter, "threshold": cfg.stats.threshold,
        "r_scores": str(result.path.relative_to(run.dir)), **scores}})
    return ObjectsResult(result.table, result.histograms, seg.segmenter, rows, label_maps, cues, recovery)


def metrics(run: Run) -> dict:
    """The run's ``metrics.json`` (every stage adds its entries)."""
    return artifacts.read_json(run.dir / "metrics.json")
