"""Figures of the Grad-CAM stage; every function returns a matplotlib Figure.

Reads the results it is given (``gradcam.GradCAMResult``, the "cascade"/"deletion" dicts of
``citylib.sanity`` or of ``metrics.json``) and, for example images, the data stage's cache and
the image files behind it (drawn at their own resolution). Writes nothing.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from citylib.data import imagecache
from citylib.explain import saliency
from citylib.stages import gradcam


def plot_cascade(cascade: dict) -> plt.Figure:
    """Spearman correlation (trained vs. randomised masks) per cascading-randomisation step.

    ``cascade``: one result (``{"steps": [...]}``) or ``{label: result}`` to compare runs. The
    band is the bootstrap interval over images (mean ± std for results that have none).
    """
    runs = {"": cascade} if "steps" in cascade else cascade
    width = max(len(r["steps"]) for r in runs.values())
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * width + 2), 3.6))

    def values(steps, key):
        return np.array([np.nan if s.get(key) is None else s[key] for s in steps], float)

    band = "std"
    for label, res in runs.items():
        steps = res["steps"]
        mean = values(steps, "spearman_mean")
        if "spearman_low" in steps[0]:
            lo, hi, band = values(steps, "spearman_low"), values(steps, "spearman_high"), "interval"
        else:
            std = values(steps, "spearman_std")
            lo, hi = mean - std, mean + std
        x = np.arange(len(steps))
        ax.plot(x, mean, marker="o", ms=3, label=label or None)
        ax.fill_between(x, lo, hi, alpha=0.2)
    longest = max(runs.values(), key=lambda r: len(r["steps"]))["steps"]
    ax.set_xticks(range(len(longest)), [s["layer"] for s in longest], rotation=70, fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("randomised down to (cumulative, top layer first)")
    ax.set_ylabel("Spearman rank correlation")
    level = next(iter(runs.values())).get("level", 0.95)
    spread = f"{level:.0%} interval" if band == "interval" else "± std"
    ax.set_title(f"Cascading randomisation (mean, {spread} over images)")
    if len(runs) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_deletion(deletion: dict) -> plt.Figure:
    """Target probability as the most salient pixels are removed first, against the mask's cells
    in random order (the check's baseline) and pixels in random order, with AUCs."""
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    f = deletion["fractions"]
    ax.plot(f, deletion["curve_salient"], marker="o", ms=3,
            label=f"{deletion['method']} order (AUC {deletion['auc_salient']:.3f})")
    cells = "x".join(map(str, deletion.get("map_size", [])))
    baseline = f"random cells of the {cells} map" if cells else "random order"   # older results: pixels
    ax.plot(f, deletion["curve_random"], marker="o", ms=3, ls="--",
            label=f"{baseline} (AUC {deletion['auc_random']:.3f})")
    if "curve_random_pixels" in deletion:
        ax.plot(f, deletion["curve_random_pixels"], marker=".", ms=3, ls=":",
                label=f"random pixels (AUC {deletion['auc_random_pixels']:.3f})")
    ax.set_xlabel("fraction of pixels removed")
    ax.set_ylabel("target probability (mean)")
    ax.set_ylim(0, 1)
    title = f"Deletion, n = {deletion['n_images']} (lower AUC: more faithful)"
    if "auc_difference" in deletion:   # the paired difference and its interval over images
        lo, hi = deletion["auc_difference_low"], deletion["auc_difference_high"]
        title += f"\nAUC difference {deletion['auc_difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_fig2(images, masks: np.ndarray, threshold: float = 0.5,
              titles: list[str] | None = None) -> plt.Figure:
    """The paper's Fig. 2 per image: original, weighted mask, overlay, visual explanation.

    images: n uint8 images (S_i, S_i, 3), an array (n, S, S, 3) or a list of any sizes (e.g.
    ``imagecache.full_view``); masks (n, h, w) at any resolution, upsampled to each image.
    """
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(8, 2.1 * n), squeeze=False)
    heads = ["image", "weighted mask", "overlay", f"explanation (mask ≥ {threshold:g})"]
    for i in range(n):
        image = np.asarray(images[i])
        up = saliency.upsample(np.asarray(masks[i])[None], image.shape[0])[0]      # (S_i, S_i)
        panels = [image, up, saliency.heatmap_overlay(image, up),
                  saliency.explanation(image, up, threshold)]
        for j, (ax, p) in enumerate(zip(axes[i], panels)):
            ax.imshow(p, cmap="jet" if j == 1 else None, vmin=0, vmax=1 if j == 1 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(heads[j], fontsize=9)
        if titles:
            axes[i, 0].set_ylabel(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def plot_city_examples(result: "gradcam.GradCAMResult", cache, seed: int = 0,
                       threshold: float | None = None) -> plt.Figure:
    """Fig. 2 for every city: one correctly and one wrongly predicted test image (when any)."""
    rng = np.random.default_rng(seed)
    picks, titles = [], []
    for city in result.meta["cities"]:
        for correct in (True, False):
            rows = np.flatnonzero((result.index["city"] == city).to_numpy()
                                  & (result.index["correct"].astype(bool) == correct).to_numpy())
            if rows.size:
                picks.append(int(rng.choice(rows)))
                r = result.index.iloc[picks[-1]]
                titles.append(f"{r['city']} → {r['predicted']} ({'right' if correct else 'wrong'})")
    rows = result.index["index"].to_numpy()[picks]
    return plot_fig2([imagecache.full_view(cache, int(r)) for r in rows],
                     np.asarray(result.masks[picks], dtype=np.float32),
                     result.threshold if threshold is None else threshold, titles)
