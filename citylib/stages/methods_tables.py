"""The methods stage's results for a reader: each (city, object)'s reliance beside each
method's lift rank (``run_table``), the methods across runs (``comparison``) and a verdict in
words (``verdict``), from ``methods.csv`` / ``methods.json`` and the reference they were scored
against (``causal.csv``, or ``reliance.csv`` through ``reliance.reference``). Reads and writes
nothing.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from citylib.data.counterfactual import CUE_FREE

FUSION = "fusion"


def position(layer: str, layers: list[str]) -> str:
    """A layer's place in the sweep, comparable across architectures: 'paper' (the paper's
    Grad-CAM layer, the last), 'fusion', or 'paper-k' for the k-th stage before it."""
    if layer == FUSION:
        return FUSION
    stages = [n for n in layers if n != FUSION]
    k = len(stages) - 1 - stages.index(layer)
    return "paper" if k == 0 else f"paper-{k}"


def run_table(causal_table: pd.DataFrame, table: pd.DataFrame, layers: list[str],
              recovery: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (city, cue): its causal effect with interval and rank, the ideal detector's
    lift rank (``recovery``'s ceiling_rank), and each method's lift rank at the paper's layer
    and at its best layer of the sweep."""
    paper = [n for n in layers if n != FUSION][-1]
    out = causal_table[causal_table["object"] != CUE_FREE][["city", "object", "effect", "ci_low", "ci_high",
                                                            "rank"]].rename(columns={"object": "cue",
                                                                                     "rank": "causal_rank"})
    if recovery is not None and "ceiling_rank" in recovery:
        out = out.merge(recovery[["city", "object", "ceiling_rank"]].rename(columns={"object": "cue"}),
                        on=["city", "cue"], how="left")
    for method, g in table.groupby("method", sort=False):
        at = g[g["layer"] == paper].set_index(["city", "object"])["lift_rank"]
        out[f"{method} (paper layer)"] = [at.get((c, o), np.nan) for c, o in zip(out["city"], out["cue"])]
    for method, g in table.groupby("method", sort=False):
        best = g.sort_values("lift_rank", kind="stable").groupby(["city", "object"]).first()
        out[f"{method} (best layer)"] = [
            f"{int(best.loc[(c, o), 'lift_rank'])} ({best.loc[(c, o), 'layer']})"
            if (c, o) in best.index and best.loc[(c, o), "lift_rank"] == best.loc[(c, o), "lift_rank"] else "—"
            for c, o in zip(out["city"], out["cue"])]
    return out.reset_index(drop=True)


def comparison(summaries: Mapping[str, dict]) -> pd.DataFrame:
    """The methods across runs: per method and layer position, per run, how many cities have
    their causally strongest cue in the lift top k ("2/3"), the planted MRR, and Spearman's rho
    between reliance and lift rank with its interval."""
    rows = {}
    for run_name, summary in summaries.items():
        for method, by_layer in summary["scores"].items():
            for layer, s in by_layer.items():
                where = (method, position(layer, summary["layers"]))
                hits, (lo, hi) = s["strongest_in_top"], s.get("spearman_ci", [np.nan, np.nan])
                rho = f"ρ {s['spearman']:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo == lo else "")
                mrr = f"MRR {s['planted_mrr']:.2f}, " if summary.get("reference") != "removal" else ""   # planted cues only
                rows.setdefault(where, {})[run_name] = f"{sum(hits.values())}/{len(hits)} ({mrr}{rho})"
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["method", "layer"])
    return frame.reset_index()


def verdict(name: str, causal_table: pd.DataFrame, summary: dict, what: str = "cue") -> str:
    """A few plain sentences from the numbers: which cues the network relies on (interval below
    zero), which it does not, and which method and layer show its strongest cues; ``what``: what
    was removed ("cue": a planted cue reset, "object": an object removed from the image)."""
    cue = causal_table[causal_table["object"] != CUE_FREE]
    used = cue[cue["ci_high"] < 0].sort_values("effect")
    unused = cue[cue["ci_high"] >= 0]
    fmt = lambda r: f"{r.object} in {r.city} (Δ log p {r.effect:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}])"  # noqa: E731
    nothing = "none of the planted cues" if what == "cue" else "no single object"
    if what == "cue":
        parts = [f"{name} relies on " + (", ".join(fmt(r) for r in used.itertuples()) or nothing) + "."]
        if len(unused):
            parts.append("It shows no reliance on " + ", ".join(f"{r.object} in {r.city}" for r in unused.itertuples())
                         + " (interval includes 0).")
    else:                                   # many objects: each city's strongest, and a count
        first = used.groupby("city", sort=True).head(1)
        parts = [f"{name} relies most on " + (", ".join(fmt(r) for r in first.itertuples()) or nothing)
                 + f"; on {len(used)} of {len(cue)} (city, {what}) pairs its interval lies below 0."]
    paper = [n for n in summary["layers"] if n != FUSION][-1]
    scored = [(m, layer, s) for m, by in summary["scores"].items() for layer, s in by.items()]
    grad = summary["scores"].get("gradcam", {}).get(paper)
    if grad is not None:
        hits = grad["strongest_in_top"]
        parts.append(f"Grad-CAM at the paper's layer ({paper}, {'x'.join(map(str, grad['map_size']))}) puts the "
                     f"strongest {what} in the lift top {summary['top']} for {sum(hits.values())} of {len(hits)} cities.")
    good = [(m, layer) for m, layer, s in scored if s["all_strongest_in_top"]]
    if good:
        parts.append(f"Methods that do so for every city: {', '.join(f'{m} at {layer}' for m, layer in good)}.")
    else:
        best = max(scored, key=lambda t: (sum(t[2]["strongest_in_top"].values()), t[2]["planted_mrr"]))
        parts.append(f"No method does so for every city; the closest is {best[0]} at {best[1]} "
                     f"({sum(best[2]['strongest_in_top'].values())} of {len(best[2]['strongest_in_top'])}).")
    return " ".join(parts)
