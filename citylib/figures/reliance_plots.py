"""Figures of the reliance and calibration stages: what a run's network relies on when an object
is removed, what "removed" looks like, and how far removal lands from true deletion.

Reads the stages' results (``reliance.csv``, ``reliance_images.csv``, ``calibration.csv``,
``calibration_images.csv``), the snapshot's cache and the label maps; ``draw`` and
``draw_calibration`` write the report's PNGs into the run folder.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from citylib.core import ade20k
from citylib.explain import removal
from citylib.figures import plots
from citylib.stages import reliance as reliance_stage


def plot_objects(table: pd.DataFrame, top: int = 6, min_images: int = 5) -> plt.Figure:
    """Per city, the ``top`` objects whose removal lowers p(true city) most (of those in
    ``min_images`` images or more): the change with its 95% interval (dots), and the matched
    null's (hollow): an object matters beyond the act of filling where the two lie apart."""
    table = table[table["n"] >= min_images]
    cities = sorted(table["city"].unique())
    fig, axes = plt.subplots(1, max(len(cities), 1), figsize=(3.6 * max(len(cities), 1), 0.38 * top + 1.4),
                             sharex=True, squeeze=False)
    for ax, city in zip(axes[0], cities):
        t = table[table["city"] == city].nsmallest(top, "effect")
        y = np.arange(len(t))
        ax.errorbar(t["null_effect"], y + 0.18, xerr=[t["null_effect"] - t["null_ci_low"], t["null_ci_high"] - t["null_effect"]],
                    fmt="o", mfc="white", color="0.55", ms=4, lw=1, label="same-shaped region elsewhere")
        ax.errorbar(t["effect"], y - 0.18, xerr=[t["effect"] - t["ci_low"], t["ci_high"] - t["effect"]],
                    fmt="o", color="C3", ms=4, lw=1.2, label="object removed")
        ax.axvline(0, color="0.3", lw=0.8, ls="--")
        ax.set_yticks(y, [f"{o} ({n})" for o, n in zip(t["object"], t["n"])], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(city, fontsize=10)
    axes[0][0].legend(fontsize=7, loc="lower left", frameon=False)
    fig.supxlabel("Δ log p(true city) (95% interval over groups; images in brackets)", fontsize=9)
    fig.tight_layout()
    return fig


def examples(images: pd.DataFrame, n: int = 4) -> pd.DataFrame:
    """The removals to show: in turn from each city, its largest drops of objects in 5 images or
    more (any, where none is in that many), at most one per object."""
    common = images.groupby(["city", "object"])["row"].transform("size") >= 5
    shown = images[common] if common.any() else images
    ranked = shown.assign(drop=shown["logp_removed"] - shown["logp"]).sort_values("drop", kind="stable")
    firsts = ranked.drop_duplicates(["city", "object"])
    firsts = firsts.assign(turn=firsts.groupby("city").cumcount()).sort_values(["turn", "drop"])
    return firsts.head(n)


def plot_examples(cache, labels, images: pd.DataFrame, cfg: reliance_stage.RelianceConfig, rows: np.ndarray,
                  n: int = 4) -> plt.Figure:
    """``plot_removals`` of the ``examples``."""
    return plot_removals(cache, labels, examples(images, n), cfg, rows)


def plot_removals(cache, labels, picked: pd.DataFrame, cfg: reliance_stage.RelianceConfig,
                  rows: np.ndarray) -> plt.Figure:
    """Original | object removed | the same shape filled elsewhere (the null), one row per
    removal of ``picked`` (``reliance_images.csv`` rows); ``labels``: the label maps of the
    cache ``rows``. The operator fills anew, as measured (its noise drawn afresh)."""
    index_of = {v: k for k, v in ade20k.names().items()}
    fig, axes = plt.subplots(max(len(picked), 1), 3, figsize=(7.5, 2.6 * max(len(picked), 1)), squeeze=False)
    for ax_row, (_, r) in zip(axes, picked.iterrows()):
        image = np.asarray(cache.images[int(r["row"])])
        label = np.asarray(labels[int(np.searchsorted(rows, r["row"]))])
        mask = label == index_of.get(r["object"], -1)
        null, _ = reliance_stage.null_mask(label, mask, cfg.ring, cfg.dilation)
        fill = dict(dilation=cfg.dilation, **cfg.settings())
        shown = (image, removal.remove(cfg.operator, image[None], mask[None], **fill)[0],
                 removal.remove(cfg.operator, image[None], null[None], **fill)[0])
        titles = (f"{r['city']}: {r['object']}", f"removed: Δ log p {r['logp_removed'] - r['logp']:+.2f}",
                  f"null: Δ log p {r['logp_null'] - r['logp']:+.2f}" if null.any() else
                  "null: its shape fits nowhere else")
        for ax, im, title in zip(ax_row, shown, titles):
            ax.imshow(im)
            ax.set_title(title, fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"What removal means ({cfg.operator}, mask grown by {cfg.dilation} px)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_calibration(images: pd.DataFrame, table: pd.DataFrame, operator: str, min_images: int = 5) -> plt.Figure:
    """Per (city, object): the true deletion's mean change of log p (x) against ``operator``'s on
    the same pixels (y); on the diagonal they agree."""
    keep = images.groupby(["city", "object"])["row"].transform("size") >= min_images
    means = images[keep].groupby(["city", "object"])[["true", operator]].mean().reset_index()
    fig, ax = plt.subplots(figsize=(5, 4.6))
    for k, (city, g) in enumerate(means.groupby("city")):
        ax.scatter(g["true"], g[operator], s=22, color=f"C{k}", label=city)
        for _, r in g.nsmallest(2, "true").iterrows():
            ax.annotate(r["object"], (r["true"], r[operator]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lo = float(np.nanmin(means[["true", operator]].to_numpy(), initial=0)) - 0.1
    hi = float(np.nanmax(means[["true", operator]].to_numpy(), initial=0)) + 0.1
    ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls="--")
    row = table[(table["operator"] == operator) & (table["measure"] == "effect")].iloc[0]
    ax.set_title(f"{operator}: ρ {row['spearman_rho']:.2f} [{row['rho_ci_low']:.2f}, {row['rho_ci_high']:.2f}], "
                 f"error {row['mae']:.3f}", fontsize=9)
    ax.set_xlabel("true deletion: Δ log p(true city)")
    ax.set_ylabel(f"{operator} removal: Δ log p(true city)")
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def draw(run, result) -> dict[str, Path]:
    """The reliance stage's figures: ``reliance.png`` and ``removal_examples.png``."""
    out = {}
    fig = plot_objects(result.table, min_images=run.cfg.reliance.min_images)
    out["reliance"] = plots.save(fig, run.dir / "reliance.png")
    plt.close(fig)
    fig = plot_examples(result.cache, result.labels, result.images, run.cfg.reliance, result.rows)
    out["removal_examples"] = plots.save(fig, run.dir / "removal_examples.png")
    plt.close(fig)
    return out


def draw_calibration(run, result) -> dict[str, Path]:
    """The calibration stage's figure: ``calibration.png`` for the run's operator."""
    fig = plot_calibration(result.images, result.table, run.cfg.reliance.operator, run.cfg.reliance.min_images)
    path = plots.save(fig, run.dir / "calibration.png")
    plt.close(fig)
    return {"calibration": path}
