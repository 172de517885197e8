"""Figures of the causal stage: what each network relies on, across runs.

Reads each run's ``causal.csv`` (city, object, effect, ci_low, ci_high); writes nothing.
"""
from __future__ import annotations

from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from citylib.data.counterfactual import CUE_FREE


def plot_reliance(tables: Mapping[str, pd.DataFrame], arch_of: Mapping[str, str] | None = None,
                  xlabel: str = "Δ log p(true city) when the cue alone is removed (95% interval)") -> plt.Figure:
    """One row per (city, planted cue), one dot per run: the change in log p(true city) when
    the cue alone is removed, with its 95% interval; 0 (no reliance) marked. Runs of one
    architecture share a colour (``arch_of``: run -> architecture). The cue-free rows are left
    out: they remove every cue at once."""
    runs = list(tables)
    archs = list(dict.fromkeys((arch_of or {}).get(r, r) for r in runs))
    colours = dict(zip(archs, plt.get_cmap("tab10").colors))
    cues = sorted({(c, o) for t in tables.values() for c, o in zip(t["city"], t["object"]) if o != CUE_FREE})
    fig, ax = plt.subplots(figsize=(7, 0.42 * len(cues) + 1.2))
    step, labelled = 0.7 / max(len(runs), 1), set()
    for k, run in enumerate(runs):
        t = tables[run].set_index(["city", "object"])
        y = np.arange(len(cues)) - 0.35 + (k + 0.5) * step
        at = [t.loc[c] if c in t.index else None for c in cues]
        effect = np.array([np.nan if r is None else r["effect"] for r in at])
        low = np.array([np.nan if r is None else r["ci_low"] for r in at])
        high = np.array([np.nan if r is None else r["ci_high"] for r in at])
        arch = (arch_of or {}).get(run, run)
        ax.errorbar(effect, y, xerr=[effect - low, high - effect], fmt="o", ms=3, lw=1,
                    color=colours[arch], label=None if arch in labelled else arch)
        labelled.add(arch)
    ax.axvline(0, color="0.3", lw=0.8, ls="--")
    ax.set_yticks(np.arange(len(cues)), [f"{o} ({c})" for c, o in cues], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7, loc="lower left", frameon=False)
    fig.tight_layout()
    return fig
