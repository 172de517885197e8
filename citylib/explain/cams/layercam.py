"""LayerCAM, Jiang et al. 2021: positive gradients times activation at each position."""
from __future__ import annotations

from citylib.explain.cams.base import BaseCAM, register


@register
class LayerCAM(BaseCAM):
    """Jiang et al. 2021: sum_k ReLU(g^k_ij) A^k_ij, positive gradients only, per position;
    meant for earlier, finer layers as well as the last one."""

    name = "layercam"

    @classmethod
    def cam(cls, act, grad):
        return (grad.clamp_min(0) * act).sum(1)                     # (B, h, w)
