"""ADE20K's 150-class vocabulary, and summaries of label maps.

Every label map in the suite, ground truth or predicted, uses ADE20K's indices
(1 wall, 2 building, 3 sky, ...; 0 = unlabelled). Reads ``labels.txt`` beside the ADE20K
model (``paths.ade20k_model_dir()``) when it is there; otherwise names the street
vocabulary below, which is what the generated world uses. Writes nothing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from citylib.core import paths

# The street vocabulary of the generated world: ADE20K name -> index.
STREET = {
    "building": 2, "sky": 3, "tree": 5, "road": 7, "grass": 10, "sidewalk": 12,
    "person": 13, "earth": 14, "plant": 18, "car": 21, "fence": 33, "signboard": 44,
    "skyscraper": 49, "awning": 87, "streetlight": 88, "pole": 94, "traffic light": 137,
}
NUM_CLASSES = 150


def names(model_dir: str | Path | None = None) -> dict[int, str]:
    """Index -> class name, from ``labels.txt`` if present, else the street vocabulary."""
    path = Path(model_dir or paths.ade20k_model_dir()) / "labels.txt"
    if path.is_file():
        table = {}
        for line in path.read_text().splitlines():
            if line.strip():
                idx, name = line.split("\t", 1)
                table[int(idx)] = name.strip()
        # labels.txt shortens some names to their first word; keep ours where they match.
        table.update({i: n for n, i in STREET.items() if table.get(i, "").split()[0] == n.split()[0]})
        return table
    return {i: n for n, i in STREET.items()}


def pixel_counts(label_maps: np.ndarray) -> np.ndarray:
    """Per-image pixel count of every class: (N, H, W) uint8 -> (N, 151) int64."""
    n = len(label_maps)
    flat = np.asarray(label_maps).reshape(n, -1).astype(np.int64)
    offsets = (np.arange(n, dtype=np.int64) * (NUM_CLASSES + 1))[:, None]
    return np.bincount((flat + offsets).ravel(), minlength=n * (NUM_CLASSES + 1)).reshape(n, NUM_CLASSES + 1)


def pixel_share(label_maps: np.ndarray, cities: np.ndarray | list, name_of: dict[int, str] | None = None,
                min_share: float = 0.001) -> pd.DataFrame:
    """Mean share of each object's pixels per image, per city, and the share of images showing it.

    Returns a long table: city, object, index, share, presence. Classes below ``min_share``
    in every city are dropped.
    """
    name_of = name_of or names()
    counts = pixel_counts(label_maps)  # (N, 151)
    share = counts / counts.sum(axis=1, keepdims=True)
    cities = np.asarray(cities)
    rows = []
    for city in sorted(set(cities)):
        sel = cities == city
        mean, present = share[sel].mean(axis=0), (counts[sel] > 0).mean(axis=0)
        for idx in range(1, NUM_CLASSES + 1):
            rows.append({"city": city, "object": name_of.get(idx, str(idx)), "index": idx,
                         "share": float(mean[idx]), "presence": float(present[idx])})
    frame = pd.DataFrame(rows)
    keep = frame.groupby("index")["share"].transform("max") >= min_share
    return frame[keep].reset_index(drop=True)
