"""Grad-CAM: the weighted masks ("mask_norm") of a trained run, as in Shi et al., section 2.1.

Reads a run folder's ``best.pt`` (through ``train.load_model``) and the test images of the data
stage's ``Cache``. Writes ``<run>/gradcam/``:

- ``masks.npy``: (N, h, w) float16, one min-max normalised mask per test image at the
  Grad-CAM layer's own resolution (vgg11: 14 x 14 at 224 px); ``upsample`` brings them to S x S.
- ``index.csv``: row = cache row index, path, city, target, predicted, correct, prob_<city>.
- ``sanity.json``: the cascading-randomisation and deletion checks (``citylib.sanity``) and
  their ``verdict`` (pass or fail of each, with the numbers behind it).
- ``meta.json``: method, layer, map size, image size, config, the key of the training and of
  the data it read, and this result's key (``key``: the settings, the training's key, the code).
- ``.results/gradcam.json``: the marker of the finished result (``artifacts.ResultFolder``).

The cache must be the one the training read (its data snapshot); StaleError otherwise, so that
the masks are always those of the model's own test split.

A mask is ReLU(sum_k w_k A^k) over the layer's channels A^k, min-max normalised per image; a
constant map (all zero, say) stays all zero. Grad-CAM: w_k = spatial mean of d score / d A^k.
Grad-CAM++: the closed form of Chattopadhay et al. (eq. 19, exp-score), as pytorch-grad-cam.
HiResCAM and LayerCAM weigh each position instead of each channel: sum_k g^k_ij A^k_ij, and
sum_k ReLU(g^k_ij) A^k_ij.
One forward and one backward per batch: the network runs without autograd up to the layer and
records only what comes after it, and the backward stops at the layer (no parameter gradients).
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from citylib import models, train
from citylib.artifacts import ResultFolder, StaleError, atomic_path, code_key, read_json, write_csv, write_json
from citylib.config import config_hash, to_dict

FOLDER = NAME = "gradcam"   # the run's sub-folder, and its result marker's name


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
        self._act = output.detach().requires_grad_()          # (B, K, h, w)
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
            return CamResult(normalise(cam).numpy(), logits.float().numpy(),
                             torch.softmax(logits.float(), 1).numpy(), target.numpy())

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
                with torch.no_grad():
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


class GradCAM(BaseCAM):
    """Selvaraju et al. 2017: w_k = mean over (i, j) of d score / d A^k_ij."""

    name = "gradcam"

    @staticmethod
    def channel_weights(act, grad):
        return grad.mean((2, 3))                                    # (B, K)


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


class HiResCAM(BaseCAM):
    """Draelos and Carin 2020: sum_k g^k_ij A^k_ij, the gradient times the activation at each
    position (no spatial averaging), faithful to what the score's gradient says there."""

    name = "hirescam"

    @classmethod
    def cam(cls, act, grad):
        return (grad * act).sum(1)                                  # (B, h, w)


class LayerCAM(BaseCAM):
    """Jiang et al. 2021: sum_k ReLU(g^k_ij) A^k_ij, positive gradients only, per position;
    meant for earlier, finer layers as well as the last one."""

    name = "layercam"

    @classmethod
    def cam(cls, act, grad):
        return (grad.clamp_min(0) * act).sum(1)                     # (B, h, w)


METHODS = types.MappingProxyType({c.name: c for c in (GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM)})


def make(method: str, model: nn.Module, layer: nn.Module | None = None, **kw) -> BaseCAM:
    """The CAM object for ``method`` (one of METHODS: gradcam, gradcam++, hirescam, layercam)."""
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


def heatmap_overlay(image: np.ndarray, mask_up: np.ndarray, alpha: float = 0.5,
                    cmap: str = "jet") -> np.ndarray:
    """(S, S, 3) uint8 image blended with the colour-mapped mask (S, S): (1-a) img + a map."""
    import matplotlib

    colours = matplotlib.colormaps[cmap](np.clip(mask_up, 0, 1))[..., :3] * 255.0
    out = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return out.clip(0, 255).round().astype(np.uint8)


def masks_for(model: nn.Module, images: np.ndarray, method: str = "gradcam", target=None,
              batch_size: int = 32, progress: bool = False) -> CamResult:
    """CAMs of uint8 images (N, S, S, 3), in batches; ``target`` as in ``BaseCAM.__call__``."""
    with make(method, model) as cam:
        parts = [res for _, res in _batches(cam, images, target, batch_size, progress)]
    return CamResult(*(np.concatenate([getattr(p, f) for p in parts])
                       for f in ("masks", "logits", "probs", "target")))


def _batches(cam: BaseCAM, images: np.ndarray, target, batch_size: int, progress: bool,
             rows: np.ndarray | None = None):
    """(slice, CamResult) per batch of ``images[rows]`` (all rows by default)."""
    rows = np.arange(len(images)) if rows is None else rows
    per_image = target is not None and not isinstance(target, str) and np.ndim(target) > 0
    for b in tqdm(range(0, len(rows), batch_size), desc=f"{cam.name} {cam.layer_name}",
                  disable=not progress, leave=False, unit="batch"):
        sl = slice(b, b + batch_size)
        x = train.to_tensor(images[rows[sl]])                        # (B, 3, S, S)
        yield sl, cam(x, np.asarray(target)[sl] if per_image else target)


@dataclass(frozen=True)
class GradCAMConfig:
    """Grad-CAM stage settings; every one is part of the result folder's hash."""

    method: Literal["gradcam", "gradcam++", "hirescam", "layercam"] = "gradcam"
    target: Literal["predicted", "true"] = "predicted"   # which city's score is explained
    batch_size: int = 32
    threshold: float = 0.5       # visual explanation: the image where mask >= threshold
    sanity_images: int = 32      # test images for randomisation and deletion checks (0: skip)
    deletion_steps: int = 8      # deletion curve: fractions 0, 1/k, ..., 1 of the pixels
    seed: int = 0                # sanity images, re-initialisation, random deletion order

    def __post_init__(self):
        ok = {"method": self.method in METHODS, "target": self.target in ("predicted", "true"),
              "batch_size": self.batch_size >= 1, "threshold": 0 <= self.threshold <= 1,
              "sanity_images": self.sanity_images >= 0, "deletion_steps": self.deletion_steps >= 1,
              "seed": self.seed >= 0}
        bad = [f"'{k}' = {getattr(self, k)!r}" for k, good in ok.items() if not good]
        if bad:
            raise ValueError(f"out of range: {', '.join(bad)} (method in {list(METHODS)}; target "
                             "'predicted' or 'true'; batch_size, deletion_steps >= 1; "
                             "0 <= threshold <= 1; sanity_images, seed >= 0)")


@dataclass(frozen=True)
class GradCAMResult:
    """A finished ``<run>/gradcam`` folder, as ``run`` and ``load`` return it."""

    folder: Path               # <run>/gradcam
    masks: np.ndarray          # (N, h, w) float16 in [0, 1], memory-mapped; row i = index row i
    index: pd.DataFrame        # index, path, city, target, predicted, correct, prob_<city>
    meta: dict                 # method, layer, map_size, image_size, cities, config, key, ...
    sanity: dict               # rows, cascade, deletion, verdict; empty if sanity_images = 0
    reused: bool               # True: a finished folder with this key was found, nothing ran

    @property
    def threshold(self) -> float:
        return float(self.meta["config"]["threshold"])


def run(cfg: GradCAMConfig, run_dir: str | Path, cache, progress: bool = True) -> GradCAMResult:
    """Masks for every test image of ``cache`` with the run's best model; reuse if unchanged."""
    run_dir = Path(run_dir)
    out = run_dir / FOLDER
    model, cities, tconfig = train.load_model(run_dir)
    ckpt = torch.load(run_dir / "best.pt", weights_only=True, mmap=True)
    check_cache(run_dir, tconfig, cache)
    test = np.asarray(cache.split_indices("test"), dtype=np.int64)
    if len(test) == 0:
        raise ValueError("the cache's test split is empty")
    y = np.asarray(cache.y, dtype=np.int64)
    paths = cache.index["path"].to_numpy()[test]
    folder = ResultFolder(out, NAME, key(cfg, ckpt["key"]))
    if folder.done() is not None:
        return dataclasses.replace(load(run_dir), reused=True)

    folder.begin()
    target = None if cfg.target == "predicted" else y[test]
    probs, targets = np.zeros((len(test), len(cities)), np.float32), np.zeros(len(test), np.int64)
    with make(cfg.method, model) as cam, atomic_path(out / "masks.npy") as tmp:
        masks = None
        for sl, res in _batches(cam, cache.images, target, cfg.batch_size, progress, rows=test):
            if masks is None:                                        # (N, h, w) float16
                masks = np.lib.format.open_memmap(tmp, "w+", np.float16,
                                                  (len(test), *res.masks.shape[1:]))
            masks[sl], probs[sl], targets[sl] = res.masks, res.probs, res.target
        layer, map_hw = cam.layer_name, masks.shape[1:]
        masks.flush()
        del masks
    pred = probs.argmax(1)
    write_csv(out / "index.csv", pd.DataFrame({
        "index": test, "path": paths, "city": [cities[k] for k in y[test]],
        "target": [cities[k] for k in targets], "predicted": [cities[k] for k in pred],
        "correct": pred == y[test], **{f"prob_{c}": probs[:, k] for k, c in enumerate(cities)}}))

    checks = {}
    if cfg.sanity_images:
        from citylib import sanity   # sanity imports this module; import it only when needed
        pick = np.sort(np.random.default_rng(cfg.seed).choice(
            len(test), min(cfg.sanity_images, len(test)), replace=False))
        images = np.asarray(cache.images[test[pick]])                # (n, S, S, 3) uint8
        kw = dict(method=cfg.method, batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
        checks = {"rows": test[pick].tolist(),
                  "cascade": sanity.cascade(model, images, targets[pick], **kw),
                  "deletion": sanity.deletion(model, images, targets[pick],
                                              steps=cfg.deletion_steps, **kw)}
        checks["verdict"] = sanity.verdict(checks)
    write_json(out / "sanity.json", checks)
    write_json(out / "meta.json", {
        "method": cfg.method, "layer": layer, "map_size": list(map_hw),
        "image_size": int(tconfig["image_size"]), "n": int(len(test)), "cities": cities,
        "mask_dtype": "float16", "training_key": ckpt["key"], "data_key": tconfig["data_key"],
        "config": to_dict(cfg), "key": folder.key})
    folder.commit(["masks.npy", "index.csv", "sanity.json", "meta.json"])
    return load(run_dir)


def key(cfg: GradCAMConfig, training_key: str) -> str:
    """What the masks depend on: these settings, the trained model (its key) and the code."""
    return config_hash(NAME, code_key(__name__), cfg, training_key)


def check_cache(run_dir: Path, tconfig: dict, cache) -> None:
    """StaleError unless ``cache`` is the data the run's model was trained on."""
    train.check_data(run_dir, tconfig, cache, "explaining it")


def load(run_dir: str | Path) -> GradCAMResult:
    """The finished Grad-CAM results of a run (masks memory-mapped, read-only)."""
    out = Path(run_dir) / FOLDER
    if not (out / "meta.json").is_file():
        raise FileNotFoundError(f"{out}: no finished Grad-CAM results (run gradcam.run first)")
    index = pd.read_csv(out / "index.csv", keep_default_na=False,
                        dtype={"path": str, "city": str, "target": str, "predicted": str})
    return GradCAMResult(out, np.load(out / "masks.npy", mmap_mode="r"), index,
                         read_json(out / "meta.json"), read_json(out / "sanity.json"), False)
