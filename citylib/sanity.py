"""Sanity and faithfulness checks of Grad-CAM masks; ``gradcam.run`` stores their results.

Reads a trained model and a few uint8 images (N, S, S, 3) with their target classes; writes
nothing, and never changes the model it is given (randomisation works on a copy).

- ``cascade``: Adebayo et al. 2018, "Sanity Checks for Saliency Maps", cascading model
  parameter randomisation. Layers are re-initialised from the top (the last classifier layer)
  downward, cumulatively, each with its own ``reset_parameters`` (PyTorch's initialisation;
  a BatchNorm is reset together with the convolution it follows: weight 1, bias 0, running
  statistics 0 / 1). After each step the masks for the same target classes are compared with
  the trained model's by Spearman rank correlation per image (at the layer's resolution); a
  mask that is constant has no ranking and is left out of the mean ("n_defined").
- ``deletion``: Petsiuk et al. 2018 (RISE) deletion curve. The most salient pixels (of the
  mask upsampled to S x S) are removed first, in ``steps`` equal steps, and the target
  probability is tracked; the same for a random order (seeded) as the baseline. A removed
  pixel is set to 0 in the network's normalised input space, i.e. mid-grey (127.5 in each
  channel): with inputs mapped to [-1, 1] that is the centre of the range and needs no
  dataset statistics. Ties in the mask are broken at random (seeded). Lower AUC = more
  faithful; the random curve's AUC is the reference.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from citylib import gradcam, train

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FILL = "0 in normalised input space (mid-grey, 127.5 per channel)"


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
            batch_size: int = 32, seed: int = 0, progress: bool = False) -> dict:
    """Cascading randomisation: one entry per step with the layer reset and the mean Spearman."""
    target = np.asarray(target, dtype=np.int64)
    base = gradcam.masks_for(model, images, method, target, batch_size).masks  # (n, h, w)
    rand = copy.deepcopy(model)
    rows = [_summary(0, "none (trained)", spearman_rows(base, base))]
    with torch.random.fork_rng(devices=[]):
        steps = cascade_steps(rand)
        for k, (name, modules) in enumerate(tqdm(steps, desc="cascade", disable=not progress,
                                                 leave=False, unit="layer"), 1):
            torch.manual_seed(seed * 1000 + k)
            for m in modules:
                m.reset_parameters()
            masks = gradcam.masks_for(rand, images, method, target, batch_size).masks
            rows.append(_summary(k, name, spearman_rows(base, masks)))
    return {"method": method, "n_images": len(images), "seed": seed, "steps": rows}


def _summary(step: int, layer: str, rho: np.ndarray) -> dict:
    ok = np.isfinite(rho)
    return {"step": step, "layer": layer,
            "spearman_mean": float(rho[ok].mean()) if ok.any() else None,
            "spearman_std": float(rho[ok].std()) if ok.any() else None,
            "n_defined": int(ok.sum())}


def deletion(model: nn.Module, images: np.ndarray, target: np.ndarray, method: str = "gradcam",
             steps: int = 16, batch_size: int = 32, seed: int = 0,
             progress: bool = False) -> dict:
    """Deletion curves (mean target probability per fraction removed) and their AUCs."""
    target = np.asarray(target, dtype=np.int64)
    n, S = len(images), images.shape[1]
    masks = gradcam.upsample(gradcam.masks_for(model, images, method, target, batch_size).masks,
                             S).reshape(n, S * S)                     # (n, S*S)
    rng = np.random.default_rng(seed)
    salient = np.lexsort((rng.random((n, S * S)), -masks), axis=-1)   # most salient first
    random = rng.permuted(np.tile(np.arange(S * S), (n, 1)), axis=1)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.round(fractions * S * S).astype(np.int64)
    x = train.to_tensor(images)                                       # (n, 3, S, S)
    # nothing and everything removed are the same images in both orders: computed once
    ends = {c: _target_prob(model, x * (c == 0), target, batch_size).mean() for c in (0, S * S)}
    curves = {}
    bar = tqdm(total=2 * (len(counts) - 2), desc="deletion", disable=not progress, leave=False)
    for name, order in (("salient", salient), ("random", random)):
        rank = np.empty_like(order)                                   # rank[i, pixel]
        np.put_along_axis(rank, order, np.arange(S * S)[None].repeat(n, 0), axis=1)
        rank = torch.from_numpy(rank).view(n, 1, S, S)
        curves[name] = np.array([ends[c] if c in ends else
                                 _target_prob(model, x * (rank >= c), target, batch_size, bar).mean()
                                 for c in counts])
    bar.close()
    return {"method": method, "fill": FILL, "n_images": n, "steps": steps, "seed": seed,
            "fractions": fractions.tolist(),
            "curve_salient": curves["salient"].tolist(), "curve_random": curves["random"].tolist(),
            "auc_salient": float(np.trapezoid(curves["salient"], fractions)),
            "auc_random": float(np.trapezoid(curves["random"], fractions))}


def _target_prob(model: nn.Module, x: torch.Tensor, target: np.ndarray, batch_size: int,
                 bar=None) -> np.ndarray:
    """Softmax probability of ``target`` (n,) for normalised inputs x (n, 3, S, S)."""
    was_training = model.training
    model.eval()
    probs = []
    try:
        with torch.no_grad():
            for b in range(0, len(x), batch_size):
                # channels-last: oneDNN's faster CPU convolutions, as in gradcam.BaseCAM
                xb = x[b:b + batch_size].contiguous(memory_format=torch.channels_last)
                probs.append(torch.softmax(model(xb).float(), 1))      # (B, C)
    finally:
        model.train(was_training)
    if bar is not None:
        bar.update()
    return torch.cat(probs)[torch.arange(len(x)), torch.from_numpy(target)].numpy()
