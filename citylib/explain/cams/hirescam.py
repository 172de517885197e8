"""HiResCAM, Draelos and Carin 2020: gradient times activation at each position."""
from __future__ import annotations

from citylib.explain.cams.base import BaseCAM, register


@register
class HiResCAM(BaseCAM):
    """Draelos and Carin 2020: sum_k g^k_ij A^k_ij, the gradient times the activation at each
    position (no spatial averaging), faithful to what the score's gradient says there."""

    name = "hirescam"

    @classmethod
    def cam(cls, act, grad):
        return (grad * act).sum(1)                                  # (B, h, w)
