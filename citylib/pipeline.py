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

import matplotlib.pyplot as plt

from citylib import (artifacts, compare, compare_plots, cues, data, embed, gradcam, paths, plots,
                     segment, stats, stats_plots, train)
from citylib.params import RunConfig, discover, load, load_all


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
    its optimiser state is 0.4 GB at 64 px and 1.5 GB at 224 px), besides ``best.pt``.
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
    recovery: pd.DataFrame         # rank of each planted cue by lift, and the ideal detector's
                                   # rank on a map of the same size (empty without cues)


def run_objects(run: Run, progress: bool = True) -> ObjectsResult:
    """Label every test image (once per dataset), then R, coverage and lift per city and object.

    Writes ``r_scores.csv`` into the run folder and adds an ``objects`` entry (segmenter,
    threshold, planted-cue recovery on a generated world, and under ``ceiling`` the recovery of
    an ideal cue detector whose map has the network's size: ``cues.ceiling``) to its
    ``metrics.json``.
    """
    cfg, cache = run.cfg, load_cache(run)
    cams = gradcam.load(run.dir)
    rows = cams.index["index"].to_numpy(np.int64)                      # cache rows of the masks
    seg = segment.run(cfg.segment, cache, run.data_dir / "segment", rows=rows, progress=progress)
    label_maps = np.asarray(seg.labels[rows])                         # (n, S, S) uint8
    size, cities = cache.images.shape[1], cams.index["city"].to_numpy(str)
    result = stats.run(cfg.stats, stats.upsampled(cams.masks, size, gradcam.upsample), label_maps,
                       cities, run.dir, progress=progress)
    planted = planted_cues(run)
    recovery, scores = pd.DataFrame(), {}
    if planted:   # the ranks, and the best a map of this size allows: missed vs. could not show
        recovery, scores = cues.recovery(result.table, planted)
        grid = tuple(cams.masks.shape[1:])
        ideal, best = cues.ceiling(label_maps, cities, planted, grid, gradcam.upsample, cfg.stats)
        recovery = recovery.merge(ideal[["city", "object", "rank"]].rename(
            columns={"rank": "ceiling_rank"}), on=["city", "object"], how="left")
        scores["ceiling"] = {"map_size": list(grid), "planted_mrr": best["planted_mrr"],
                             "planted_rr": best["planted_rr"],
                             "planted_all_in_top": best["planted_all_in_top"]}
    for name, draw in (("r_histograms", stats_plots.plot_r_histograms), ("lift", stats_plots.plot_lift)):
        fig = draw(result.table, planted)         # the Fig. 5 panels, also for the report
        plots.save(fig, run.dir / f"{name}.png")
        plt.close(fig)
    artifacts.merge_json(run.dir / "metrics.json", {"objects": {
        "segmenter": seg.segmenter, "threshold": cfg.stats.threshold,
        "r_scores": str(result.path.relative_to(run.dir)), **scores}})
    return ObjectsResult(result.table, result.histograms, seg.segmenter, rows, label_maps, planted,
                         recovery)


def planted_cues(run: Run) -> dict[str, tuple[str, ...]]:
    """City -> planted cue names of the run's generated world; empty for other data."""
    cfg = run.cfg.data
    return cues.planted(cfg.world.world) if cfg.source == "world" else {}


def run_embedding(run: Run, progress: bool = True) -> embed.EmbedResult:
    """PCA -> t-SNE/UMAP map of the run's masks, its figures and galleries, kNN agreement."""
    return embed.run(run.cfg.embed, run.dir, load_cache(run), progress=progress)


@dataclass(frozen=True)
class Grid:
    """The runs a comparison reads: those of the parameter files whose masks exist."""

    runs: list[Run]          # finished runs (Grad-CAM masks on disk), in file order
    missing: list[str]       # named runs without masks yet (left out, listed)

    @property
    def dir(self) -> Path:
        """``outputs/comparison/``."""
        return self.runs[0].outputs / "comparison"


def open_grid(params: str | Path | list, outputs: str | Path | None = None) -> Grid:
    """Parameter files (a file, a folder, or a list of files) -> the grid of finished runs.

    All files are validated together (they must share the data and compare sections); runs
    whose Grad-CAM stage has not finished are listed in ``missing``, not compared.
    """
    files = [paths.resolve(f) for f in params] if isinstance(params, (list, tuple)) else discover(params)
    out = paths.outputs(outputs)
    runs = [Run(cfg, out) for cfg in load_all(files)]
    done = [r for r in runs if (r.dir / gradcam.FOLDER / "meta.json").is_file()]
    if not done:
        raise FileNotFoundError(f"none of the {len(runs)} run(s) has Grad-CAM masks under "
                                f"{out / 'runs'}: run notebooks 02-03 (or `citylib run`) first")
    return Grid(done, [r.cfg.name for r in runs if r not in done])


def run_comparison(grid: Grid, progress: bool = True) -> compare.CompareResult:
    """AR of every pair of runs (and against re-initialised models), tests and Table 2."""
    first, dirs = grid.runs[0], [r.dir for r in grid.runs]
    cache = load_cache(first)
    result = compare.run(first.cfg.compare, dirs, cache, grid.dir, progress=progress)
    scores = compare.lift_scores(dirs)
    figures = {"ar_heatmap": lambda: compare_plots.plot_ar_heatmap(result.ar),
               "fig6": lambda: compare_plots.plot_fig6(cache, dirs, result.fig6_rows),
               "lift_comparison": (lambda: compare_plots.plot_lift_comparison(scores)) if scores else None}
    for name, draw in figures.items():       # the figures again as files, for the report
        if draw is not None:
            fig = draw()
            plots.save(fig, grid.dir / f"{name}.png")
            plt.close(fig)
    return result


def metrics(run: Run) -> dict:
    """The run's ``metrics.json`` (every stage adds its entries)."""
    return artifacts.read_json(run.dir / "metrics.json")
