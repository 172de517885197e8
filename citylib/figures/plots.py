"""Figures shared by the notebooks (matplotlib + seaborn); every function returns a Figure.

Reads the arrays and tables it is given; writes nothing unless ``save`` is called.
"""
from __future__ import annotations

import io
from pathlib import Path

# seaborn is imported inside the functions that draw with it: it brings scipy.stats, a second
# of every notebook kernel's start that the other notebooks need not pay.
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from citylib.core import artifacts


def label_colours(seed: int = 3) -> np.ndarray:
    """A fixed colour for each of ADE20K's 151 indices (0 = unlabelled is black): (151, 3) uint8."""
    rng = np.random.default_rng(seed)
    lut = rng.integers(40, 256, size=(151, 3), dtype=np.uint8)
    lut[0] = 0
    return lut


def overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a label map's colours over an image: (H, W, 3) uint8, (H, W) -> (H, W, 3) uint8."""
    colours = label_colours()[label_map].astype(np.float32)
    out = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return out.clip(0, 255).astype(np.uint8)


def sample_grid(cache, per_city: int = 6, labels: bool = True, seed: int = 0):
    """Random images of every city (rows), each with its label overlay below when available."""
    rng = np.random.default_rng(seed)
    cities = list(cache.cities)
    has_labels = labels and bool(cache.index.get("has_labels", pd.Series([False])).any())
    rows_per_city = 2 if has_labels else 1
    fig, axes = plt.subplots(len(cities) * rows_per_city, per_city,
                             figsize=(1.6 * per_city, 1.7 * len(cities) * rows_per_city), squeeze=False)
    for c, city in enumerate(cities):
        idx = np.flatnonzero(cache.y == c)
        pick = np.sort(rng.choice(idx, size=min(per_city, len(idx)), replace=False))
        for j in range(per_city):
            top = axes[c * rows_per_city, j]
            if j < len(pick):
                top.imshow(cache.images[pick[j]])
                if has_labels:
                    axes[c * rows_per_city + 1, j].imshow(overlay(cache.images[pick[j]], cache.labels[pick[j]]))
            top.set_title(city if j == 0 else "", fontsize=9, loc="left")
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def class_balance(manifest: pd.DataFrame):
    """Images per city, split by train/val/test."""
    import seaborn as sns
    fig, ax = plt.subplots(figsize=(6, 3))
    sns.countplot(data=manifest, x="city", hue="split", hue_order=["train", "val", "test"], ax=ax)
    ax.set_ylabel("images")
    fig.tight_layout()
    return fig


def object_share(share: pd.DataFrame, top: int = 15):
    """Mean pixel share of the most common objects, per city (from ``ade20k.pixel_share``)."""
    import seaborn as sns
    order = share.groupby("object")["share"].max().sort_values(ascending=False).index[:top]
    fig, ax = plt.subplots(figsize=(8, 4))
    sns.barplot(data=share[share["object"].isin(order)], x="object", y="share", hue="city", order=order, ax=ax)
    ax.set_yscale("log")
    ax.set_ylabel("mean pixel share per image")
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    return fig


def learning_curves(history: pd.DataFrame):
    """Loss and accuracy per epoch, train and validation (from ``history.csv``)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3))
    for split, style in (("train", "-"), ("val", "--")):
        ax_loss.plot(history["epoch"], history[f"{split}_loss"], style, marker="o", label=split)
        ax_acc.plot(history["epoch"], history[f"{split}_acc"], style, marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    ax_acc.legend()
    fig.tight_layout()
    return fig


def confusion(metrics: dict):
    """The test confusion matrix (rows: true city, columns: predicted), row-normalised."""
    import seaborn as sns
    cities = metrics["cities"]
    counts = np.asarray(metrics["confusion_matrix"], dtype=float)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(cities) + 2, 1.1 * len(cities) + 1))
    sns.heatmap(pd.DataFrame(rates, index=cities, columns=cities), annot=counts.astype(int), fmt="d",
                vmin=0, vmax=1, cmap="Blues", cbar_kws={"label": "share of the true city"}, ax=ax)
    ax.set(xlabel="predicted", ylabel="true")
    fig.tight_layout()
    return fig


def examples(cache, predictions: pd.DataFrame, correct: bool = False, n: int = 12, seed: int = 0):
    """Test images the network got right (or wrong), titled true → predicted (probability)."""
    rows = predictions[predictions["correct"].astype(bool) == correct]
    if rows.empty:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.text(0.5, 0.5, "no " + ("correct" if correct else "misclassified") + " test images",
                ha="center", va="center")
        ax.set_axis_off()
        return fig
    rows = rows.sample(min(n, len(rows)), random_state=seed)
    cols = min(6, len(rows))
    fig, axes = plt.subplots(-(-len(rows) // cols), cols, figsize=(2 * cols, 2.2 * -(-len(rows) // cols)),
                             squeeze=False)
    for ax, (_, r) in zip(axes.flat, rows.iterrows()):
        ax.imshow(cache.images[int(r["index"])])
        ax.set_title(f"{r['city']} → {r['predicted']} ({r['prob_' + r['predicted']]:.2f})", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure atomically as PNG."""
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    return Path(path)


def png(fig, dpi: int = 100) -> bytes:
    """A figure as PNG bytes (for ipywidgets.Image); the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def label_overlays(cache, objects, n: int = 8, seed: int = 0):
    """Test images with their label maps overlaid, titled with their four largest classes.

    ``objects``: the objects stage's ``ObjectsResult`` (label maps and the cache rows they belong to).
    """
    from citylib.core import ade20k

    name_of = ade20k.names()
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(objects.labels), min(n, len(objects.labels)), replace=False))
    fig, axes = plt.subplots(1, len(pick), figsize=(2.2 * len(pick), 2.8), squeeze=False)
    for ax, i in zip(axes[0], pick):
        lab = objects.labels[i]
        image = cache.images[int(objects.rows[i])]
        ax.imshow(overlay(image, lab))
        present = np.bincount(lab.ravel(), minlength=151)
        top = [name_of.get(int(k), str(k)) for k in np.argsort(present)[::-1][:4] if present[k] and k]
        ax.set_title("\n".join(top), fontsize=7)
        ax.set_axis_off()
    fig.tight_layout()
    return fig
