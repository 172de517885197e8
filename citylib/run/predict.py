"""Predict the city of single images with a trained run (``citylib predict``).

Reads a run folder's ``best.pt`` and the given image files; writes nothing. Each image is
checked and decoded exactly as the data stage does (EXIF rotation, RGB, centre square,
resize to the run's image size); an unreadable image gets its reason in the ``error``
column instead of stopping the others.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from citylib.data import imagecache, inventory
from citylib.nets import checkpoint, infer


def run(run_dir: str | Path, images: list[str | Path], device: str = "auto") -> pd.DataFrame:
    """One row per image: image, predicted city, one probability column per city, error; the
    network runs on ``device`` (``citylib.devices``)."""
    model, cities, config = checkpoint.load_model(run_dir, device=device)
    size = config["image_size"]
    rows, batch, where = [], [], []
    for path in map(str, images):
        reason = inventory.check_file(path)
        if reason is None:
            img, _, _ = imagecache.prepare(path, "", size)  # (S, S, 3) uint8
            where.append(len(rows))
            batch.append(img)
        rows.append({"image": path, "predicted": "", **{c: np.nan for c in cities}, "error": reason or ""})
    if batch:
        probs = infer.predict(model, np.stack(batch))  # (B, C)
        for r, p in zip(where, probs):
            rows[r].update({"predicted": cities[int(p.argmax())], **dict(zip(cities, map(float, p)))})
    return pd.DataFrame(rows)
