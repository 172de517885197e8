"""What the training loop is fed: batches read from the image store a batch at a time,
augmented (random translation and horizontal flip, drawn from the training's generator), made
float and moved to the device, optionally by helper threads. Reads the store it is given;
writes nothing.
"""
from __future__ import annotations

import numpy as np
import torch

from citylib.core import devices, distributed
from citylib.nets import infer

def batches(images: np.ndarray, y: torch.Tensor, order: np.ndarray, starts, cfg,
            gen: torch.Generator, device: torch.device, threads: int = 0,
            norm: infer.Normalisation = infer.SCRATCH):
    """(cache rows (B,), inputs (b, 3, S, S), targets (b,)) of the batches of ``order`` that
    begin at ``starts``, this process's share of each on ``device``: read from the store,
    augmented, made float by ``norm``, copied. With ``threads`` > 0 that many helper threads make the next
    batches while the caller trains on this one (up to 2 x threads ahead); the random draws are
    made here, in order, so the batches are the same either way."""
    rank, size = distributed.world()
    jobs = ((order[b:b + cfg.batch_size], cfg.crop_jitter) for b in starts)
    jobs = ((rows, p, _draw(len(rows), cfg, gen), images, y, slice(rank, None, size), device, norm)
            for rows, p in jobs)
    if threads <= 0:
        yield from map(_batch, jobs)
        return
    yield from devices.spread(lambda _, job: _batch(job), [None] * threads, jobs, alone_here=False)


def _batch(job) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    rows, p, draws, images, y, mine, device, norm = job
    x = infer.to_device(infer.to_tensor(_augmented(images[rows], p, draws)[mine], norm), device)   # (b, 3, S, S)
    return rows, x, infer.to_device(y[torch.from_numpy(rows[mine])], device)           # (b,)


def augment(images: np.ndarray, cfg, gen: torch.Generator) -> np.ndarray:
    """Random translation and horizontal flip of a uint8 batch (B, S, S, 3), drawn from ``gen``.

    Translation: reflect-pad by ``crop_jitter`` pixels, then crop S x S at a random offset
    (reflection adds no artificial edges the network could learn from).
    """
    return _augmented(images, cfg.crop_jitter, _draw(len(images), cfg, gen))


def _draw(n: int, cfg, gen: torch.Generator) -> tuple | None:
    """The random part of ``augment`` for a batch of ``n``: (dy, dx, flip), or None (none)."""
    p = cfg.crop_jitter
    if p == 0 and not cfg.flip:
        return None
    dy, dx = torch.randint(0, 2 * p + 1, (2, n), generator=gen).tolist()       # offsets in [0, 2p]
    flip = (torch.rand(n, generator=gen) < 0.5).tolist() if cfg.flip else [False] * n
    return dy, dx, flip


def _augmented(images: np.ndarray, p: int, draws: tuple | None) -> np.ndarray:
    """``augment``'s pixel work, with its random draws given."""
    if draws is None:
        return images
    B, H, W, _ = images.shape
    dy, dx, flip = draws
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")  # (B, H+2p, W+2p, 3)
    out = np.empty_like(images)
    for i in range(B):
        crop = padded[i, dy[i]:dy[i] + H, dx[i]:dx[i] + W]                      # (H, W, 3)
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out
