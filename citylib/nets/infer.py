"""Inference: a trained network's input, forward passes and probabilities, with no I/O.

``to_tensor`` maps uint8 images (B, S, S, 3) to the networks' normalised input (B, 3, S, S), by
the normalisation the network's weights expect (``normalisation(model)``: [-1, 1] for a network
trained from scratch, ImageNet's mean and std for one started from ImageNet weights; the
checkpoint records it, so Grad-CAM, predict and every stage use what the training used);
``logits`` and ``predict`` run a network (or copies of it on several devices) over images read a
batch at a time, so a memory-mapped store is never loaded whole; ``device_of`` says where a
network is and ``to_device`` moves a batch there. Every stage that runs a trained network goes
through these. Reads and writes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from citylib.core import devices

# From scratch, inputs are mapped from [0, 255] to [-1, 1]: (x / 255 - MEAN) / STD. Fixed
# constants rather than dataset statistics, so a checkpoint needs nothing else to be used on new
# images.
MEAN, STD = 0.5, 0.5


@dataclass(frozen=True)
class Normalisation:
    """Per-channel (R, G, B) mean and std of the input map (x / 255 - mean) / std."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def of(cls, recorded: dict | None) -> "Normalisation":
        """A checkpoint's recorded normalisation; one that records none was trained from scratch."""
        return SCRATCH if not recorded else cls(tuple(recorded["mean"]), tuple(recorded["std"]))


SCRATCH = Normalisation((MEAN,) * 3, (STD,) * 3)
IMAGENET = Normalisation((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))   # torchvision's weights


def normalisation(model: nn.Module) -> Normalisation:
    """The input normalisation ``model``'s weights expect (a DDP wrapper: its module's)."""
    return getattr(getattr(model, "module", model), "normalisation", SCRATCH)


def to_tensor(images: np.ndarray, norm: Normalisation = SCRATCH) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S), (x / 255 - mean) / std per channel."""
    # numpy, single-threaded: on a shared 2-core CPU torch's threaded kernels are many times
    # slower on tensors this small, and batch preparation would rival the training step
    x = np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2), dtype=np.float32)
    std = np.asarray(norm.std, np.float32).reshape(3, 1, 1)
    x /= np.float32(255) * std
    x -= np.asarray(norm.mean, np.float32).reshape(3, 1, 1) / std
    return torch.from_numpy(x)


def predict(model: nn.Module, images: np.ndarray, batch_size: int = 64,
            rows: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities (N, C) float32 for uint8 images (N, S, S, 3), or for ``images[rows]``
    read a batch at a time (a memory-mapped cache is never loaded whole); eval mode, no grad."""
    return torch.softmax(torch.from_numpy(logits(model, images, batch_size, rows)), 1).numpy()


def log_p(model: nn.Module | list[nn.Module], images: np.ndarray, batch_size: int,
          rows: np.ndarray | None = None) -> np.ndarray:
    """Log-probabilities (n, C) float64 of ``logits``' images: what the analyses compare, in
    double precision so that differences of nearly equal values keep their digits."""
    return torch.log_softmax(torch.from_numpy(logits(model, images, batch_size, rows)).double(), 1).numpy()


def logits(model: nn.Module | list[nn.Module], images: np.ndarray, batch_size: int,
            rows: np.ndarray | None = None) -> np.ndarray:
    """Logits (n, C) float32 of the uint8 ``images[rows]`` (default: all), on the device the
    model is on (a list: copies of it on several devices, the batches shared out in turn); the
    images are read ``batch_size`` at a time, so a memory-mapped cache is never loaded whole."""
    nets = model if isinstance(model, list) else [model]
    was_training = [m.training for m in nets]
    for m in nets:
        m.eval()
    rows = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
    batches = (np.asarray(images[rows[b:b + batch_size]]) for b in range(0, len(rows), batch_size))

    def forward(net: nn.Module, batch: np.ndarray) -> torch.Tensor:                   # (B, S, S, 3)
        device = device_of(net)
        # channels last: the same numbers, a quarter faster for the VGG-like nets on a CPU
        x = to_device(to_tensor(batch, normalisation(net)), device).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), devices.autocast(device):
            return net(x).float().cpu()                                                   # (B, C)

    out = list(devices.spread(forward, nets, batches))
    for m, mode in zip(nets, was_training):
        m.train(mode)
    return torch.cat(out).numpy()


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) are; the CPU for a model with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``: as it is on the CPU; from pinned memory, without waiting, elsewhere."""
    if device.type == "cpu":
        return x
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)
