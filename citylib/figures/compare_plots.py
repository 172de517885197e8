"""Figures of the comparison stage (notebook 06): the AR heat-map, lift side by side, Fig. 6.

Reads a comparison's ``ar.csv`` frame, runs' ``r_scores.csv`` and Grad-CAM masks, and for Fig. 6
the image files behind the cache; writes nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from citylib.data import dataset, imagecache
from citylib.explain import saliency
from citylib.figures import plots
from citylib.stages import ar_tables, compare, gradcam


def _run_order(frame: pd.DataFrame) -> list[str]:
    """The compared runs (not their randomised copies), grouped by architecture."""
    pairs = frame[frame["kind"] != "randomised"]
    arch = {**dict(zip(frame["run_a"], frame["arch_a"])), **dict(zip(pairs["run_b"], pairs["arch_b"]))}
    return sorted(arch, key=lambda r: (ar_tables.arch_rank(arch[r]), r))


def plot_ar_heatmap(frame: pd.DataFrame, columns: Sequence[str] = ("ar", "ar_shared_grid")) -> plt.Figure:
    """AR of every pair of runs as a symmetric matrix (runs grouped by architecture), one panel
    per column of ``frame`` that it has: by default at image resolution (the paper's) and on
    one grid for all runs (the resolution control), on one colour scale."""
    titles = {"ar": "at image resolution (Eq. 2)", "ar_pair_grid": "on the pair's coarser map",
              "ar_shared_grid": "on one grid for all runs", "rel_image": "AR / null, image",
              "rel_pair_grid": "AR / null, coarser map"}
    columns = [c for c in columns if c in frame]
    runs = _run_order(frame)
    pos = {r: i for i, r in enumerate(runs)}
    side = 0.6 + 0.6 * len(runs)
    fig, axes = plt.subplots(1, len(columns), figsize=(len(columns) * (1.6 + 0.7 * len(runs)), side), squeeze=False)
    top = max([float(frame[c].max()) for c in columns] + [1e-9])
    for column, ax in zip(columns, axes[0]):
        m = np.full((len(runs), len(runs)), np.nan)
        np.fill_diagonal(m, 0.0)
        for r in frame[frame["kind"] != "randomised"].itertuples():
            m[pos[r.run_a], pos[r.run_b]] = m[pos[r.run_b], pos[r.run_a]] = getattr(r, column)
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=top)
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7,
                        color="w" if v < 0.6 * top else "k")
        ax.set_xticks(range(len(runs)), runs, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(runs)), runs, fontsize=8)
        fig.colorbar(im, ax=ax, label="average residual AR", shrink=0.8)
        ax.set_title(f"AR between runs, {titles.get(column, column)}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_lift_comparison(scores: Mapping[str, pd.DataFrame], top: int = 10) -> plt.Figure:
    """Lift per object, one bar per run side by side, one panel per city; the ``top`` objects
    by mean lift over the runs; the dashed line at 1 is no preference."""
    long = pd.concat([s.assign(run=n) for n, s in scores.items()], ignore_index=True)
    cities = sorted(long["city"].unique())
    fig, axes = plt.subplots(len(cities), 1, figsize=(max(6.0, 0.5 * top * max(1, len(scores)) ** 0.5 + 2),
                                                      2.8 * len(cities)), squeeze=False)
    width = 0.8 / max(1, len(scores))
    for city, ax in zip(cities, axes[:, 0]):
        wide = long[long["city"] == city].pivot_table(index="object", columns="run", values="lift")
        wide = wide.reindex(columns=list(scores)).loc[
            wide.mean(axis=1).sort_values(ascending=False).index[:top]]
        x = np.arange(len(wide))
        for j, run_name in enumerate(wide.columns):
            ax.bar(x + (j - (len(wide.columns) - 1) / 2) * width, wide[run_name], width, label=run_name)
        ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.set_xticks(x, wide.index, rotation=60, ha="right", fontsize=8)
        ax.set_title(city, loc="left", fontsize=10)
        ax.set_ylabel("lift")
    axes[0, 0].legend(fontsize=7, ncol=min(4, len(scores)))
    fig.tight_layout()
    return fig


def plot_fig6(cache, runs: Sequence[str | Path], rows: Sequence[int]) -> plt.Figure:
    """The paper's Fig. 6: each test image (cache rows ``rows``) as every run sees it. Per image
    two rows: each run's weighted mask over the image, then its visual explanation at the run's
    threshold; the image is drawn at its file's resolution (``imagecache.full_view``)."""
    cols = []
    for d in runs:
        cam = gradcam.load(d)
        where = pd.Series(np.arange(len(cam.index)), index=cam.index["index"].to_numpy())
        missing = sorted(set(rows) - set(where.index))
        if missing:
            raise ValueError(f"{d}: no mask for cache rows {missing[:5]}")
        info = compare.describe(d)
        cols.append((f"{ar_tables.NAMES.get(info['arch'], info['arch'])} s{info['seed']}",
                     np.asarray(cam.masks[where.loc[list(rows)].to_numpy()], np.float32), cam.threshold))
    n = len(rows)
    fig, axes = plt.subplots(2 * n, 1 + len(cols), figsize=(1.8 * (1 + len(cols)), 3.6 * n), squeeze=False)
    for i, r in enumerate(rows):
        image = imagecache.full_view(cache, int(r))                               # (S', S', 3)
        axes[2 * i, 0].imshow(image)
        axes[2 * i, 0].set_ylabel(f"{cache.index['city'].iloc[r]}\nmask", fontsize=8)
        axes[2 * i + 1, 0].axis("off")
        axes[2 * i + 1, 0].text(0.95, 0.5, "explanation\n(mask ≥ threshold)", ha="right", va="center",
                                fontsize=8, transform=axes[2 * i + 1, 0].transAxes)
        for j, (_, masks, threshold) in enumerate(cols, 1):
            up = saliency.upsample(masks[i][None], image.shape[0])[0]
            axes[2 * i, j].imshow(saliency.heatmap_overlay(image, up))
            axes[2 * i + 1, j].imshow(saliency.explanation(image, up, threshold))
            axes[2 * i + 1, j].set_xlabel(f"≥ {threshold:g}", fontsize=7)
    for j, title in enumerate(["image"] + [c[0] for c in cols]):
        axes[0, j].set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def draw(grid, result: compare.CompareResult) -> dict[str, Path]:
    """The comparison's figures, for the notebook and the report: the AR heat-map, Fig. 6 and
    lift side by side, in the comparison folder (``grid``: ``pipeline.Grid``). Name -> path."""
    first, dirs = grid.runs[0], [r.dir for r in grid.runs]
    cache = dataset.load(first.cfg.data, first.data_dir)
    scores = compare.lift_scores(dirs)
    drawn = {"ar_heatmap": lambda: plot_ar_heatmap(result.ar),
             "fig6": lambda: plot_fig6(cache, dirs, result.fig6_rows),
             "lift_comparison": (lambda: plot_lift_comparison(scores)) if scores else None}
    out = {}
    for name, plot in drawn.items():
        if plot is not None:
            fig = plot()
            out[name] = plots.save(fig, grid.dir / f"{name}.png")
            plt.close(fig)
    return out
