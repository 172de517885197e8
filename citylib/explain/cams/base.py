"""The mechanics every CAM method shares: one forward and one backward per batch, the hook on
the explained layer, the targets, and running a method over many images.

A mask is ReLU(cam(A, g)) over the layer's activations A^k and the gradients g^k of the target
score, min-max normalised per image (``saliency.normalise``); a constant map (all zero, say)
stays all zero. A method is a ``BaseCAM`` subclass in its own file of this package, decorated
with ``register``; it gives either the channel weights w_k (``channel_weights``, the CAM then
sum_k w_k A^k) or the whole map (``cam``). The network runs without autograd up to the layer and
records only what comes after it, and the backward stops at the layer (no parameter gradients).
Reads and writes nothing.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from citylib.core import devices
from citylib.explain.saliency import normalise
from citylib.nets import infer, models


@dataclass(frozen=True)
class CamResult:
    """One batch: masks (B, h, w) float32 in [0, 1], logits and probs (B, C), target (B,) int64."""

    masks: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    target: np.ndarray


class BaseCAM:
    """Shared mechanics of the gradient-weighted CAMs; subclasses give the channel weights.

    Use as a context manager: the forward hook on ``layer`` is removed on exit, also after an
    exception. ``layer`` defaults to the architecture's declared one (``models.gradcam_layer``).
    ``channels_last`` (default: on CPU) passes the batch in channels-last layout, which the
    convolutions keep: oneDNN runs them 1.3-1.5x faster on CPU than in the default layout; the
    values are the same up to float rounding. The model itself is not changed.
    """

    name: ClassVar[str] = ""

    def __init__(self, model: nn.Module, layer: nn.Module | None = None,
                 channels_last: bool | None = None):
        self.model = model
        self.channels_last = channels_last
        self.layer = models.gradcam_layer(model) if layer is None else layer
        self.layer_name = next((n for n, m in model.named_modules() if m is self.layer), "?")
        self._armed = False          # the hook acts only inside __call__
        self._act: torch.Tensor | None = None
        self._handle = self.layer.register_forward_hook(self._keep)

    def __enter__(self) -> "BaseCAM":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def __del__(self):
        self.release()

    def release(self) -> None:
        """Remove the hook; the object is unusable afterwards."""
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.remove()
            self._handle = None

    def _keep(self, module: nn.Module, inputs, output):
        if not self._armed:
            return None
        if self._act is not None:
            raise RuntimeError(f"layer {self.layer_name!r} runs more than once per forward; "
                               "choose a module the network uses once")
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise ValueError(f"layer {self.layer_name!r} must output one (B, K, h, w) tensor")
        # The forward so far ran under no_grad: the activation becomes a leaf (the backward
        # stops here) and autograd records from here on. The network goes on with a copy, so an
        # in-place op after the layer cannot change the activation we weigh. (An in-place ReLU
        # as the layer itself is harmless: its output is the final value.)
        # In fp32 also under bf16 autocast, so that the gradients reaching it, and the CAM
        # made of both, are accumulated in fp32 (on the CPU this is the activation itself).
        self._act = output.detach().float().requires_grad_()  # (B, K, h, w)
        torch.set_grad_enabled(True)   # undone by the no_grad block around the forward
        return self._act.clone()

    def __call__(self, x: torch.Tensor, target=None) -> CamResult:
        """Masks for a batch ``x`` (B, 3, S, S) normalised float.

        ``target``: None or "predicted" (argmax), one class index for all images, or one per
        image (sequence, array or tensor of B ints).
        """
        act, grad, logits, target = self.forward_backward(x, target)
        with torch.no_grad():
            cam = self.cam(act, grad).clamp_min_(0)                        # (B, h, w)
            logits = logits.float()
            return CamResult(normalise(cam).cpu().numpy(), logits.cpu().numpy(),
                             torch.softmax(logits, 1).cpu().numpy(), target.cpu().numpy())

    def forward_backward(self, x: torch.Tensor, target=None):
        """One forward and one backward: the layer's activations and the gradients of the
        target scores with respect to them, (B, K, h, w) each, the logits (B, C) and the
        targets (B,)."""
        if self._handle is None:
            raise RuntimeError(f"{type(self).__name__} was released; make a new one")
        model = self.model
        was_training = model.training
        model.eval()                  # BatchNorm statistics fixed: images are independent
        self._armed, self._act = True, None
        try:
            param = next(model.parameters(), None)
            x = x.to(x.device if param is None else param.device)
            if x.device.type == "cpu" if self.channels_last is None else self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)  # (B, 3, S, S), NHWC
            # gradients are needed even if the caller runs under no_grad or inference_mode
            with torch.inference_mode(False), torch.enable_grad():
                with torch.no_grad(), devices.autocast(x.device):   # bf16 on CUDA
                    logits = model(x)                               # (B, C)
                act, self._act = self._act, None
                if act is None or not logits.requires_grad:
                    raise RuntimeError(f"layer {self.layer_name!r} did not run in the forward "
                                       "pass, or the output does not depend on it")
                target = _resolve_target(target, logits.detach())  # (B,)
                score = logits.gather(1, target[:, None]).sum()     # images are independent
                grad, = torch.autograd.grad(score, act)             # (B, K, h, w)
        finally:
            self._armed, self._act = False, None
            model.train(was_training)
        return act.detach(), grad, logits.detach(), target

    @classmethod
    def cam(cls, act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) activations and gradients -> (B, h, w) map before ReLU: by default
        sum_k w_k A^k with the method's channel weights."""
        return torch.einsum("bk,bkhw->bhw", cls.channel_weights(act, grad), act)

    @staticmethod
    def channel_weights(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) activations and d score / d activations -> (B, K) channel weights."""
        raise NotImplementedError


_METHODS: dict[str, type[BaseCAM]] = {}
METHODS = types.MappingProxyType(_METHODS)   # name -> class, in the order the method files load


def register(cls: type[BaseCAM]) -> type[BaseCAM]:
    """Class decorator: make a ``BaseCAM`` subclass available under its ``name``."""
    if not cls.name or cls.name in _METHODS:
        raise ValueError(f"CAM method {cls.__name__}: name {cls.name!r} is empty or taken")
    _METHODS[cls.name] = cls
    return cls


def make(method: str, model: nn.Module, layer: nn.Module | None = None, **kw) -> BaseCAM:
    """The CAM object for ``method`` (one of METHODS: gradcam, gradcam++, hirescam, layercam, and
    any other method file of this package)."""
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method](model, layer, **kw)


def _resolve_target(target, logits: torch.Tensor) -> torch.Tensor:
    """Target class per image (B,) int64 from None/"predicted", an int, or B ints."""
    B, C = logits.shape
    if target is None or (isinstance(target, str) and target == "predicted"):
        return logits.argmax(1)
    if isinstance(target, str):
        raise ValueError(f"target {target!r}: expected None, 'predicted' or class indices")
    t = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"target must be integer class indices, got dtype {t.dtype}")
    t = t.to(torch.int64).reshape(-1) if t.dim() else t.to(torch.int64).expand(B)
    if t.shape != (B,):
        raise ValueError(f"target has {t.numel()} entries for a batch of {B}")
    bad = t[(t < 0) | (t >= C)]
    if len(bad):
        raise ValueError(f"target class {int(bad[0])} out of range: the model has {C} classes "
                         f"(0..{C - 1})")
    return t.to(logits.device)


def masks_for(model: nn.Module, images: np.ndarray, method: str = "gradcam", target=None,
              batch_size: int = 32, progress: bool = False) -> CamResult:
    """CAMs of uint8 images (N, S, S, 3), in batches; ``target`` as in ``BaseCAM.__call__``."""
    with make(method, model) as cam:
        parts = [res for _, res in batches(cam, images, target, batch_size, progress)]
    return CamResult(*(np.concatenate([getattr(p, f) for p in parts])
                       for f in ("masks", "logits", "probs", "target")))


def batches(cam: BaseCAM | list[BaseCAM], images: np.ndarray, target, batch_size: int, progress: bool,
            rows: np.ndarray | None = None):
    """(slice, CamResult) per batch of ``images[rows]`` (all rows by default), in order; with a
    list of CAMs (one per copy of the network, each on its own device) the batches are shared
    out among them in turn (``devices.spread``)."""
    cams = cam if isinstance(cam, list) else [cam]
    rows = np.arange(len(images)) if rows is None else rows
    per_image = target is not None and not isinstance(target, str) and np.ndim(target) > 0
    starts = tqdm(range(0, len(rows), batch_size), desc=f"{cams[0].name} {cams[0].layer_name}",
                  disable=not progress, leave=False, unit="batch")
    norm = infer.normalisation(cams[0].model)
    jobs = ((slice(b, b + batch_size), infer.to_tensor(images[rows[b:b + batch_size]], norm))   # (B, 3, S, S)
            for b in starts)
    yield from devices.spread(lambda c, job: (job[0], c(job[1], np.asarray(target)[job[0]] if per_image
                                                        else target)), cams, jobs)
