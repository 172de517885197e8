"""Grad-CAM++, Chattopadhay et al. 2018: closed-form higher-order channel weights."""
from __future__ import annotations

import torch

from citylib.explain.cams.base import BaseCAM, register


@register
class GradCAMPlusPlus(BaseCAM):
    """Chattopadhay et al. 2018, eq. 19 (exp-score closed form), as pytorch-grad-cam computes it.

    alpha = g^2 / (2 g^2 + sum_ij A * g^3), zero where g = 0; w_k = sum_ij alpha * ReLU(g).
    """

    name = "gradcam++"

    @staticmethod
    def channel_weights(act, grad):
        g2 = grad * grad
        g3 = g2 * grad
        sum_act = act.sum((2, 3), keepdim=True)                     # (B, K, 1, 1)
        alpha = g2 / (2 * g2 + sum_act * g3 + 1e-6)
        alpha = torch.where(grad != 0, alpha, torch.zeros_like(alpha))
        return (grad.clamp_min(0) * alpha).sum((2, 3))              # (B, K)
