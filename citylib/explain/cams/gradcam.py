"""Grad-CAM, Selvaraju et al. 2017: each channel weighed by its mean gradient."""
from __future__ import annotations

from citylib.explain.cams.base import BaseCAM, register


@register
class GradCAM(BaseCAM):
    """Selvaraju et al. 2017: w_k = mean over (i, j) of d score / d A^k_ij."""

    name = "gradcam"

    @staticmethod
    def channel_weights(act, grad):
        return grad.mean((2, 3))                                    # (B, K)
