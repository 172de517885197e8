"""Figures of the objects stage (notebook 05, the report): Fig. 5 and the lift view.

Reads an ``r_scores.csv`` table (``histograms.TABLE_COLUMNS``) and the planted cues; writes
nothing but what ``draw`` saves.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from citylib.figures import plots


def _cities(table: pd.DataFrame, width: float, height: float, sharex=False, sharey=True):
    cities = sorted(table["city"].unique())
    fig, axes = plt.subplots(len(cities), 1, figsize=(width, height * len(cities)),
                             squeeze=False, sharex=sharex, sharey=sharey)
    return fig, zip(cities, axes[:, 0])


def _colours(objects, cues) -> list[str]:
    return ["tab:red" if o in cues else "tab:blue" for o in objects]


def plot_r_histograms(table: pd.DataFrame, planted: Mapping[str, Iterable] | None = None,
                      height: float = 2.6):
    """The paper's Fig. 5: R^c_p per object, one panel per city, highest first; the dashed
    line is the city's coverage (the R of an object the explanation ignores); planted cues red."""
    most = max(table.groupby("city").size().max(), 1) if len(table) else 1
    fig, panels = _cities(table, max(6.0, 0.32 * most + 1.5), height)
    for city, ax in panels:
        own = table[table["city"] == city].sort_values("R", ascending=False)
        cues = {o if isinstance(o, str) else o[0] for o in (planted or {}).get(city, ())}
        ax.bar(own["object"], own["R"], color=_colours(own["object"], cues))
        if len(own):
            ax.axhline(own["coverage"].iloc[0], color="k", ls="--", lw=0.8, label="coverage")
        ax.set_title(city, loc="left", fontsize=10)
        ax.set_ylabel("R")
        ax.tick_params(axis="x", labelrotation=90, labelsize=8)
    fig.tight_layout()
    return fig


def plot_lift(table: pd.DataFrame, planted: Mapping[str, Iterable] | None = None, height: float = 0.25):
    """Lift (R / coverage) with its bootstrap 95% CI per object, one panel per city; the line at
    1 is no preference; planted cues red."""
    most = max(table.groupby("city").size().max(), 1) if len(table) else 1
    fig, panels = _cities(table, 6.0, height * most + 0.8, sharex=True, sharey=False)
    for city, ax in panels:
        own = table[table["city"] == city].sort_values("lift", ascending=True, na_position="first")
        cues = {o if isinstance(o, str) else o[0] for o in (planted or {}).get(city, ())}
        err = np.vstack([own["lift"] - own["lift_ci_low"], own["lift_ci_high"] - own["lift"]])
        ax.barh(own["object"], own["lift"], xerr=np.nan_to_num(err.clip(0)), capsize=2,
                color=_colours(own["object"], cues), error_kw={"lw": 0.8})
        ax.axvline(1.0, color="k", ls="--", lw=0.8)
        ax.set_title(city, loc="left", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("lift = R / coverage")
    fig.tight_layout()
    return fig


def draw(run, result) -> dict[str, Path]:
    """The objects stage's figures, for the report: ``r_histograms.png`` (Fig. 5) and
    ``lift.png`` in the run folder (``run``: ``pipeline.Run``; ``result``: the stage's)."""
    out = {}
    for name, plot in (("r_histograms", plot_r_histograms), ("lift", plot_lift)):
        fig = plot(result.table, result.planted)
        out[name] = plots.save(fig, run.dir / f"{name}.png")
        plt.close(fig)
    return out
