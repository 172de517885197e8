"""Saliency-map maths, with no I/O and no network: what the CAM methods, the Grad-CAM stage,
the sanity checks, the statistics and the figures all compute masks with.

- ``normalise`` (the paper's mask_norm): per-image min-max to [0, 1];
- ``upsample`` (a native-resolution mask to the image), ``explanation`` (Fig. 2's visual
  explanation: the image where the mask passes a threshold), ``explanation_batches`` and
  ``heatmap_overlay``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def normalise(cam: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to [0, 1] (the paper's mask_norm): (B, h, w) -> (B, h, w) float32.

    A map whose range is zero, or below float32 resolution of its maximum, carries no ranking
    and becomes all zero (never NaN).
    """
    cam = cam.float()
    lo, hi = torch.aminmax(cam.flatten(1), dim=1)                   # (B,), (B,)
    span = hi - lo
    ok = (span > 0) & (span > 1e-6 * hi.abs())
    # (cam - lo) / span <= 1 exactly (IEEE rounding is monotonic), so no clamp is needed
    out = (cam - lo[:, None, None]).div_(torch.where(ok, span, 1.0)[:, None, None])
    if not ok.all():
        out[~ok] = 0.0
    return out


def upsample(masks: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> np.ndarray:
    """(N, h, w) masks -> (N, S, S) float32: bilinear, then min-max normalised again.

    The same as pytorch-grad-cam's ``scale_cam_image`` + its final rescale: ``cv2.resize``
    with INTER_LINEAR is bilinear with half-pixel centres (``align_corners=False``), and the
    upsampled map is renormalised so its maximum is 1 again.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    m = torch.as_tensor(np.asarray(masks, dtype=np.float32) if not torch.is_tensor(masks)
                        else masks.float())
    up = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return normalise(up).numpy()


def explanation(image: np.ndarray, mask_up: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Fig. 2's visual explanation: the image where mask >= threshold, black elsewhere.

    image (..., S, S, 3) uint8 and mask_up (..., S, S) at the same size -> (..., S, S, 3) uint8.
    """
    if mask_up.shape != image.shape[:-1]:
        raise ValueError(f"mask {mask_up.shape} does not match image {image.shape}; "
                         "upsample the mask to the image size first")
    return np.where(mask_up[..., None] >= threshold, image, 0).astype(np.uint8)


def explanation_batches(images: np.ndarray, masks: np.ndarray, threshold: float,
                        rows: np.ndarray | None = None, batch: int = 64):
    """(slice, (B, 3, S, S) float32 tensor in 0..255) per batch: the visual explanations of
    ``images[rows[i]]`` (default ``images[i]``) with ``masks[i]`` (M, h, w) upsampled to the
    image, read a batch at a time so that a memory-mapped cache is never loaded whole."""
    rows = np.arange(len(masks)) if rows is None else np.asarray(rows, np.int64)
    for b in range(0, len(rows), batch):
        img = np.asarray(images[rows[b:b + batch]])                            # (B, S, S, 3)
        up = upsample(np.asarray(masks[b:b + batch]), img.shape[1])           # (B, S, S)
        yield slice(b, b + len(img)), torch.from_numpy(explanation(img, up, threshold)).permute(0, 3, 1, 2).float()


def heatmap_overlay(image: np.ndarray, mask_up: np.ndarray, alpha: float = 0.5,
                    cmap: str = "jet") -> np.ndarray:
    """(S, S, 3) uint8 image blended with the colour-mapped mask (S, S): (1-a) img + a map."""
    import matplotlib

    colours = matplotlib.colormaps[cmap](np.clip(mask_up, 0, 1))[..., :3] * 255.0
    out = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return out.clip(0, 255).round().astype(np.uint8)


