"""Sanity and faithfulness checks of saliency masks, and their verdict; ``gradcam.run`` stores them.

Reads a trained model and a few uint8 images (N, S, S, 3) with their target classes; writes
nothing, and never changes the model it is given (randomisation works on a copy). The masks come
from an explainer, ``explain(model, images, target (N,) int64) -> (N, h, w) float in [0, 1]``
(default ``explainer(method)``: the Grad-CAM stage's masks), so that any explanation, a broken
one included, goes through the same checks.

- ``cascade``: Adebayo et al. 2018, "Sanity Checks for Saliency Maps", cascading model
  parameter randomisation. Layers are re-initialised from the top (the last classifier layer)
  downward, cumulatively, each with its own ``reset_parameters`` (PyTorch's initialisation;
  a BatchNorm is reset together with the convolution it follows: weight 1, bias 0, running
  statistics 0 / 1). After each step the masks for the same target classes are compared with
  the trained model's by Spearman rank correlation per image (at the mask's resolution); a
  mask that is constant has no ranking and is left out ("n_defined"). Per step: each image's
  value, their mean and its percentile-bootstrap interval over images. Step 0 compares the
  trained masks with themselves (1 by construction): the curve's starting point, not a finding.
- ``deletion``: Petsiuk et al. 2018 (RISE) deletion curve. The most salient pixels (of the
  mask upsampled to S x S) are removed first, in ``steps`` equal steps, and the target
  probability is tracked; the same for a random order (seeded) as the baseline. A removed
  pixel is set to 0 in the network's normalised input space, i.e. mid-grey (127.5 in each
  channel): with inputs mapped to [-1, 1] that is the centre of the range and needs no
  dataset statistics. Ties in the mask are broken at random (seeded). Lower AUC = more
  faithful. Two random orders: Petsiuk's, pixel by pixel ("random_pixels"), and the baseline
  the check uses, the cells of the mask's own h x w grid in random order, each cell's pixels
  together ("random": blocks of the native map's cell size). A mask of h x w cells can only
  say which cells matter, and it removes contiguous regions; scattering the same number of
  grey pixels over the whole image is a different perturbation (at 64 px it hurts a network
  more than one grey block of the same area), so a pixel baseline judges the mask's shape,
  not its choice of cells. On a mask at image resolution the two coincide. Per image: the AUC
  of each order; the check is the paired difference AUC(salient) - AUC(random), its mean and
  percentile-bootstrap interval over images.
- ``verdict``: pass or fail per check, with the numbers behind it.

  - deletion passes when the whole interval of the mean AUC(salient) - AUC(random) lies below
    0: removing what the mask calls salient lowers the target probability faster than removing
    its cells in random order, by more than the spread over these images allows by chance. A
    mask that ranks its cells no better than chance (constant, or blind to where the evidence
    is) fails. The difference against the pixel order is reported beside it.
  - cascade passes when, with every layer re-initialised, the interval's upper end of the mean
    Spearman is below ``max_rho`` (default 0.5), on a defined correlation for at least
    ``min_defined`` (default half) of the images. An explanation that ignores the model scores 1
    at every step; one that follows image structure rather than the model (edges, bright
    regions; an untrained network's Grad-CAM does so in part) keeps a clear positive
    correlation, whereas Adebayo et al. find Grad-CAM near 0 after full randomisation. 0.5 is
    midway between no relation and identity: at least half the trained ranking must be gone,
    and the upper end rather than the mean must be below it, so a few images cannot pass by
    luck. Randomised masks that are constant for most images leave nothing to rank: the check
    passes on evidence only, so that is a fail (the count is reported).
  - either check needs at least ``min_images`` (default 10) values: a percentile bootstrap over
    fewer is too narrow (over 4 images it has 35 distinct resamples and never sees the tails),
    so a handful of images would pass on a difference that means nothing.
"""
from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from citylib.core import devices
from citylib.explain import cams, saliency
from citylib.nets import infer
from citylib.stats import resampling

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FILL = "0 in normalised input space (mid-grey, 127.5 per channel)"
MAX_RHO = 0.5       # cascade: upper end of the fully randomised Spearman interval must be below
MIN_DEFINED = 0.5   # cascade: share of images that must have a defined correlation
MIN_IMAGES = 10     # either check: fewest values a bootstrap interval is trusted on

# (model, images (N, S, S, 3) uint8, target (N,) int64) -> masks (N, h, w) float in [0, 1]
Explainer = Callable[[nn.Module, np.ndarray, np.ndarray], np.ndarray]


def cascade_steps(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(name, modules) per randomisation step, top layer first; BatchNorm goes with its conv."""
    owners = [(n, m) for n, m in model.named_modules()
              if next(m.parameters(recurse=False), None) is not None]
    steps, pending = [], []
    for name, module in reversed(owners):    # registration order = forward order here
        if isinstance(module, NORMS):
            pending.append(module)
            continue
        if not hasattr(module, "reset_parameters"):
            raise TypeError(f"{name} ({type(module).__name__}) cannot be re-initialised")
        steps.append((name, [module, *pending]))
        pending = []
    if pending:
        steps.append(("(first normalisation)", pending))
    return steps


def explainer(method: str = "gradcam", batch_size: int = 32) -> Explainer:
    """The default explanation: ``cams.masks_for``'s masks (N, h, w) of ``method``."""
    def explain(model: nn.Module, images: np.ndarray, target: np.ndarray) -> np.ndarray:
        return cams.masks_for(model, images, method, target, batch_size).masks
    explain.__name__ = method
    return explain


def _masks(explain: Explainer, model: nn.Module, images: np.ndarray,
           target: np.ndarray) -> np.ndarray:
    masks = np.asarray(explain(model, images, target), dtype=np.float32)
    if masks.ndim != 3 or len(masks) != len(images) or not np.isfinite(masks).all():
        raise ValueError(f"the explainer returned {masks.shape} "
                         f"(finite: {np.isfinite(masks).all()}); "
                         f"expected finite masks ({len(images)}, h, w)")
    return masks


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation per row of (N, ...) arrays -> (N,) float64; NaN if a row is constant."""
    from scipy.stats import rankdata   # here: scipy.stats takes a second to import

    ra = rankdata(a.reshape(len(a), -1), axis=1)                     # (N, P), ties: mean rank
    rb = rankdata(b.reshape(len(b), -1), axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / den, np.nan)


def cascade(model: nn.Module, images: np.ndarray, target: np.ndarray, method: str = "gradcam",
            batch_size: int = 32, seed: int = 0, progress: bool = False,
            explain: Explainer | None = None, n_boot: int = 2000, level: float = 0.95) -> dict:
    """Cascading randomisation: per step the layer reset and the Spearman of each image with the
    trained masks, their mean and bootstrap interval; ``explain`` replaces Grad-CAM (``method``)."""
    explain = explainer(method, batch_size) if explain is None else explain
    target = np.asarray(target, dtype=np.int64)
    base = _masks(explain, model, images, target)                     # (n, h, w)
    rand = copy.deepcopy(model)
    boot = dict(n_boot=n_boot, level=level, seed=seed)
    rows = [_summary(0, "none (trained)", spearman_rows(base, base), **boot)]
    device = infer.device_of(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # left as found
        steps = cascade_steps(rand)
        for k, (name, modules) in enumerate(tqdm(steps, desc="cascade", disable=not progress,
                                                 leave=False, unit="layer"), 1):
            torch.manual_seed(seed * 1000 + k)
            for m in modules:
                m.reset_parameters()
            masks = _masks(explain, rand, images, target)
            rows.append(_summary(k, name, spearman_rows(base, masks), **boot))
    return {"method": getattr(explain, "__name__", "custom"), "n_images": len(images), "seed": seed,
            "level": level, "n_boot": n_boot, "steps": rows}


def _summary(step: int, layer: str, rho: np.ndarray, n_boot: int, level: float, seed: int) -> dict:
    ok = np.isfinite(rho)
    mean, lo, hi = resampling.bootstrap_interval(rho[ok], np.arange(ok.sum()), n_boot, level, seed)
    return {"step": step, "layer": layer, "spearman_mean": _num(mean),
            "spearman_low": _num(lo), "spearman_high": _num(hi),
            "spearman_std": float(rho[ok].std()) if ok.any() else None, "n_defined": int(ok.sum()),
            "spearman_per_image": [_num(r) for r in rho]}


def _num(x: float) -> float | None:
    """JSON has no NaN: an undefined value is None."""
    return float(x) if np.isfinite(x) else None


def deletion(model: nn.Module, images: np.ndarray, target: np.ndarray, method: str = "gradcam",
             steps: int = 16, batch_size: int = 32, seed: int = 0, progress: bool = False,
             explain: Explainer | None = None, n_boot: int = 2000, level: float = 0.95) -> dict:
    """Deletion curves (mean target probability per fraction removed), per-image AUCs and the
    paired difference AUC(salient) - AUC(random) with its bootstrap interval over images."""
    explain = explainer(method, batch_size) if explain is None else explain
    target = np.asarray(target, dtype=np.int64)
    n, S = len(images), images.shape[1]
    native = _masks(explain, model, images, target)                  # (n, h, w)
    masks = saliency.upsample(native, S).reshape(n, S * S)
    rng = np.random.default_rng(seed)
    salient = np.lexsort((rng.random((n, S * S)), -masks), axis=-1)   # most salient first
    pixels = rng.permuted(np.tile(np.arange(S * S), (n, 1)), axis=1)
    blocks = block_order(native.shape[1:], S, n, rng)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.round(fractions * S * S).astype(np.int64)
    x = infer.to_tensor(images, infer.normalisation(model))          # (n, 3, S, S)
    # nothing and everything removed are the same images in both orders: computed once
    ends = {c: _target_prob(model, x * (c == 0), target, batch_size) for c in (0, S * S)}
    probs = {}                                                        # (steps + 1, n) per order
    orders = {"salient": salient, "random": blocks, "random_pixels": pixels}
    bar = tqdm(total=len(orders) * (len(counts) - 2), desc="deletion", disable=not progress, leave=False)
    for name, order in orders.items():
        rank = np.empty_like(order)                                   # rank[i, pixel]
        np.put_along_axis(rank, order, np.arange(S * S)[None].repeat(n, 0), axis=1)
        rank = torch.from_numpy(rank).view(n, 1, S, S)
        probs[name] = np.stack([ends[c] if c in ends else
                                _target_prob(model, x * (rank >= c), target, batch_size, bar)
                                for c in counts]).astype(np.float64)
    bar.close()
    auc = {k: np.trapezoid(p, fractions, axis=0) for k, p in probs.items()}   # (n,) each
    diff, lo, hi = resampling.bootstrap_interval(auc["salient"] - auc["random"], np.arange(n),
                                             n_boot, level, seed)
    pdiff, plo, phi = resampling.bootstrap_interval(auc["salient"] - auc["random_pixels"], np.arange(n),
                                                n_boot, level, seed)
    return {"method": getattr(explain, "__name__", "custom"), "fill": FILL, "n_images": n, "steps": steps,
            "seed": seed, "fractions": fractions.tolist(),
            "baseline": f"random blocks: the mask's {native.shape[1]} x {native.shape[2]} cells in random order",
            "map_size": list(native.shape[1:]),
            **{f"curve_{k}": p.mean(1).tolist() for k, p in probs.items()},
            **{f"auc_{k}": float(a.mean()) for k, a in auc.items()},
            "auc_difference": diff, "auc_difference_low": lo, "auc_difference_high": hi,
            "auc_difference_pixels": pdiff, "auc_difference_pixels_low": plo,
            "auc_difference_pixels_high": phi,
            "level": level, "n_boot": n_boot,
            **{f"auc_{k}_per_image": a.tolist() for k, a in auc.items()}}


def block_order(grid: tuple[int, int], S: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, S * S) deletion orders of an S x S image by the cells of an h x w grid: per image
    the cells in random order, each cell's pixels one after another (in random order within
    the cell). Pixel (i, j) belongs to cell (i * h // S, j * w // S), the cells a mask of
    that size covers."""
    h, w = grid
    cell = ((np.arange(S) * h // S)[:, None] * w + (np.arange(S) * w // S)[None, :]).ravel()
    cell_rank = rng.permuted(np.tile(np.arange(h * w), (n, 1)), axis=1)     # (n, h * w)
    return np.lexsort((rng.random((n, S * S)), cell_rank[:, cell]), axis=-1)


def verdict(checks: dict, max_rho: float = MAX_RHO, min_defined: float = MIN_DEFINED,
            min_images: int = MIN_IMAGES) -> dict:
    """Pass or fail of the "cascade" and "deletion" results in ``checks`` (rules: module
    docstring), each with the numbers behind it; "passed": all present checks passed."""
    out = {}
    if checks.get("cascade"):
        c = checks["cascade"]
        last = c["steps"][-1]                                          # every layer random
        high, defined = last["spearman_high"], last["n_defined"]
        out["cascade"] = {
            "passed": bool(defined >= max(min_defined * c["n_images"], min_images)
                           and high is not None and high < max_rho),
            "rule": f"all layers random: upper end of the {c['level']:.0%} interval of the mean "
                    f"Spearman < {max_rho:g}, defined for >= {min_defined:.0%} of the images "
                    f"and >= {min_images}",
            "layer": last["layer"], "spearman_mean": last["spearman_mean"],
            "spearman_low": last["spearman_low"], "spearman_high": high, "n_defined": defined,
            "n_images": c["n_images"], "max_rho": max_rho, "min_defined": min_defined,
            "min_images": min_images}
    if checks.get("deletion"):
        d = checks["deletion"]
        out["deletion"] = {
            "passed": bool(d["n_images"] >= min_images and d["auc_difference_high"] < 0),
            "rule": f"{d['level']:.0%} interval of the mean AUC(salient) - AUC(random) below 0, "
                    f"over >= {min_images} images; random: {d.get('baseline', 'pixels')}",
            **{k: d[k] for k in ("auc_salient", "auc_random", "auc_difference",
                                 "auc_difference_low", "auc_difference_high", "n_images")},
            **{k: d[k] for k in ("baseline", "map_size", "auc_difference_pixels",
                                 "auc_difference_pixels_low", "auc_difference_pixels_high") if k in d},
            "min_images": min_images}
    out["passed"] = all(v["passed"] for v in out.values()) if out else None
    return out


def _target_prob(model: nn.Module, x: torch.Tensor, target: np.ndarray, batch_size: int,
                 bar=None) -> np.ndarray:
    """Softmax probability of ``target`` (n,) for normalised inputs x (n, 3, S, S)."""
    was_training = model.training
    model.eval()
    device = infer.device_of(model)
    probs = []
    try:
        with torch.no_grad(), devices.autocast(device):
            for b in range(0, len(x), batch_size):
                # channels-last: oneDNN's faster CPU convolutions, as in cams.BaseCAM
                xb = x[b:b + batch_size].to(device).contiguous(memory_format=torch.channels_last)
                probs.append(torch.softmax(model(xb).float(), 1).cpu())   # (B, C)
    finally:
        model.train(was_training)
    if bar is not None:
        bar.update()
    return torch.cat(probs)[torch.arange(len(x)), torch.from_numpy(target)].numpy()
