"""Removal operators: one object taken out of a picture, for the reliance stage.

Each operator maps a batch of uint8 images (N, H, W, 3) and boolean masks (N, H, W) (True: the
pixels to remove) to new uint8 images in which the masked pixels, and only they, are replaced:

- ``mean``: the mean colour of the image's unmasked pixels (the plainest fill);
- ``blur``: the image blurred (Gaussian, ``sigma`` pixels), pasted into the mask (the blur
  perturbation of Fong & Vedaldi; the object's own colours leak into its fill);
- ``linear``: ROAD's noisy linear imputation (Rong et al. 2022): every removed pixel the
  weighted mean of its 8 neighbours (1/6 side, 1/12 corner), a sparse linear system per image
  solved by multigrid (``multigrid``; within 1e-5 of the exact solution on the [0, 1] scale, a
  400th of a grey level), plus Gaussian noise of ``noise`` (on the same scale);
- ``telea``: OpenCV's fast-marching inpainting (Telea 2004) with ``radius`` pixels (OpenCV's
  implementation is off by up to 4 grey levels on a constant image);
- ``ns``: OpenCV's Navier-Stokes inpainting (Bertalmio et al. 2001) with ``radius`` pixels.

``dilate`` grows the masks first, so that an object's edge goes with it. Reads and writes
nothing; ``OPERATORS`` holds them by name (``@register``).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import cv2
import numpy as np
import torch
from scipy import ndimage, sparse
from scipy.sparse.linalg import splu

from citylib.explain import multigrid

OPERATORS: dict[str, Callable[..., np.ndarray]] = {}
TOL = 5e-6           # the linear fill stops when its estimated error is below this ([0, 1] scale)
MAX_CYCLES = 30      # beyond: that image is solved directly

# ROAD's neighbour weights (pytorch-grad-cam's ``neighbors_weights``): (dy, dx) -> weight
NEIGHBOURS = ((1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12),
              (0, -1, 1 / 6), (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6))


def register(name: str):
    """Make ``fn(images, masks, rng, **settings) -> values`` the removal operator ``name``: the
    new uint8 values (K, 3) of the masked pixels, in ``images[masks]`` order."""
    def add(fn):
        OPERATORS[name] = fn
        return fn
    return add


def remove(operator: str, images: np.ndarray, masks: np.ndarray, *, dilation: int = 0, seed: int = 0,
           **settings) -> np.ndarray:
    """``images`` (N, H, W, 3) uint8 with the pixels of ``masks`` (N, H, W) bool, grown by
    ``dilation`` pixels, replaced by ``operator``; ``seed`` fixes its noise (``linear``)."""
    if operator not in OPERATORS:
        raise ValueError(f"removal operator {operator!r}: not one of {', '.join(sorted(OPERATORS))}")
    images, masks = np.asarray(images), np.asarray(masks, bool)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or masks.shape != images.shape[:3]:
        raise ValueError(f"removal wants uint8 images (N, H, W, 3) and masks (N, H, W): got "
                         f"{images.dtype} {images.shape} and {masks.shape}")
    masks = dilate(masks, dilation)
    out = images.copy()                                   # nothing outside the mask moves
    values = OPERATORS[operator](images, masks, np.random.default_rng(seed), **settings)
    out.reshape(-1, images.shape[-1])[np.flatnonzero(masks)] = values
    return out


def dilate(masks: np.ndarray, pixels: int) -> np.ndarray:
    """(N, H, W) bool grown by ``pixels`` in every direction (a square of side 2 pixels + 1)."""
    masks = np.asarray(masks, bool)
    if pixels <= 0 or not masks.any():
        return masks
    square = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)    # OpenCV: O(1) per pixel in its side
    return np.stack([cv2.dilate(m.view(np.uint8), square) for m in masks]).astype(bool)


@register("mean")
def mean_fill(images: np.ndarray, masks: np.ndarray, rng, **_) -> np.ndarray:
    keep = ~masks                                                                      # (N, H, W)
    n = np.maximum(keep.sum((1, 2)), 1)[:, None]                                       # (N, 1)
    colour = (images * keep[..., None]).sum((1, 2)) / n                                # (N, 3)
    colour = np.where(keep.any((1, 2))[:, None], colour, images.mean((1, 2)))         # all removed
    return np.repeat(np.rint(colour).astype(np.uint8), masks.sum((1, 2)), axis=0)


@register("blur")
def blur_fill(images: np.ndarray, masks: np.ndarray, rng, sigma: float = 10.0, **_) -> np.ndarray:
    return np.stack([cv2.GaussianBlur(im, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) for im in images])[masks]


@register("telea")
def telea_fill(images: np.ndarray, masks: np.ndarray, rng, radius: int = 3, **_) -> np.ndarray:
    return np.stack([cv2.inpaint(np.ascontiguousarray(im), m.astype(np.uint8), radius, cv2.INPAINT_TELEA)
                     for im, m in zip(images, masks)])[masks]


@register("ns")
def ns_fill(images: np.ndarray, masks: np.ndarray, rng, radius: int = 3, **_) -> np.ndarray:
    return np.stack([cv2.inpaint(np.ascontiguousarray(im), m.astype(np.uint8), radius, cv2.INPAINT_NS)
                     for im, m in zip(images, masks)])[masks]


@register("linear")
def linear_fill(images: np.ndarray, masks: np.ndarray, rng, noise: float = 0.01, **_) -> np.ndarray:
    values = _imputed_values(images, masks, 255.0)                                     # (K, 3) in [0, 1]
    if noise > 0:                                   # drawn for the removed pixels only
        values += rng.normal(0.0, noise, values.shape)
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


def imputed(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """ROAD's linear imputation without noise, float (N, H, W, C) -> (N, H, W, C): every masked
    pixel the weighted mean of its in-image neighbours, known or imputed. An image with every
    pixel masked has nothing to impute from and keeps its values."""
    out, masks = np.array(images, np.float64), np.asarray(masks, bool)
    out[masks] = _imputed_values(out, masks)
    return out


def _imputed_values(images: np.ndarray, masks: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``imputed``'s values of the masked pixels, (K, C) float64 in ``np.flatnonzero(masks)``
    order, the images' values divided by ``scale``: solved by multigrid (``multigrid.fill``) to
    within ``TOL``, the images shared among torch's threads; an image whose cycles do not settle
    is solved directly (``_direct_values``)."""
    n, h, w, c = images.shape
    counts = np.count_nonzero(masks.reshape(n, -1), axis=1)
    starts = np.concatenate([[0], np.cumsum(counts)])
    values = np.empty((int(starts[-1]), c))

    def one(i: int) -> None:
        out = values[starts[i]:starts[i + 1]]
        if counts[i] == h * w:                                      # nothing known: kept
            out[:] = images[i].reshape(-1, c) / scale
        elif counts[i] and (c > multigrid.NC or multigrid.fill(images[i], masks[i], scale, TOL, MAX_CYCLES,
                                                                out) > MAX_CYCLES):
            out[:] = _direct_values(images[i:i + 1], masks[i:i + 1], scale)

    threads = min(torch.get_num_threads(), n)
    if threads <= 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(n)))
    return values


def _direct_values(images: np.ndarray, masks: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``_imputed_values`` by a sparse direct solve. Only the masked pixels and their neighbours
    are read: the unknowns are numbered hole by hole (8-connected, within one image), so the
    sparse system is block-diagonal and each hole's block is solved alone (SuperLU)."""
    n, h, w, c = images.shape
    flat = images.reshape(n * h * w, c)
    where = np.flatnonzero(masks.reshape(-1))                                       # (K,) row-major
    values = flat[where].astype(np.float64) / scale                                  # all masked: kept
    solvable = (~masks).any((1, 2))
    if where.size == 0 or not solvable.any():
        return values
    within = np.zeros((3, 3, 3), bool)
    within[1] = True                                           # 8-connected, never across images
    holes, _ = ndimage.label(masks & solvable[:, None, None], structure=within)
    hole = holes.reshape(-1)[where]
    order = np.argsort(hole, kind="stable")[np.count_nonzero(hole == 0):]   # solvable, hole by hole
    unknown, hole = where[order], hole[order]                                    # (U,)
    cuts = np.flatnonzero(np.diff(hole)) + 1
    var = np.full(n * h * w, -1, np.int64)
    var[unknown] = np.arange(unknown.size)
    img, rest = np.divmod(unknown, h * w)
    y, x = np.divmod(rest, w)
    diag = np.zeros(unknown.size)
    rhs = np.zeros((unknown.size, c))
    rows, cols, vals = [], [], []
    for dy, dx, weight in NEIGHBOURS:
        ny, nx = y + dy, x + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        at = np.flatnonzero(inside)
        neighbour = img[at] * h * w + ny[at] * w + nx[at]
        diag[at] -= weight                              # the weights of in-image neighbours
        free = var[neighbour] >= 0
        rows.append(at[free]); cols.append(var[neighbour[free]]); vals.append(np.full(free.sum(), weight))
        known = flat[neighbour[~free]].astype(np.float64) / scale                       # (k, C)
        for ch in range(c):
            rhs[:, ch] -= np.bincount(at[~free], weight * known[:, ch], minlength=unknown.size)
    a = sparse.csc_matrix((np.concatenate(vals + [diag]),
                           (np.concatenate(rows + [np.arange(unknown.size)]),
                            np.concatenate(cols + [np.arange(unknown.size)]))), shape=(unknown.size,) * 2)
    for lo, hi in zip([0, *cuts], [*cuts, unknown.size]):     # holes share no neighbour: apart
        # symmetric: SuperLU's symmetric mode (diagonal pivots, one ordering of A + A')
        lu = splu(a[lo:hi, lo:hi], permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                  options={"SymmetricMode": True})
        values[order[lo:hi]] = lu.solve(rhs[lo:hi])
    return values
