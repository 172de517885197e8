"""Calibration stage: how far each removal operator lands from the true counterfactual, on a
generated world.

The world re-renders a test spot without one object kind (``synth.render_spot``'s ``delete``):
the true deletion. A removal operator fills the same pixels (those whose label the deletion
changed) in the original image. Per (city, object) both give a mean change of log p(true city);
``agreement`` scores the operator's means against the true ones:

- ``spearman_rho`` over the (city, object) pairs with ``min_images`` images or more, with a 95%
  interval from resampling whole spots within each city (every pair's means recomputed);
- ``sign_agreement``: the share of the pairs whose true interval excludes 0 where the operator's
  mean has the true sign (``signs_checked`` of them);
- ``mae``: the mean absolute difference of the means (log p);
- ``strongest_same``: the cities whose most negative pair is the same under both;
- ``truth_reliability``: how well the true means agree with themselves: Spearman's ρ between
  the true means of two random halves of each city's spots, averaged over 50 splits and
  stepped up to the whole sample (Spearman-Brown). No operator can rank the pairs much more
  alike than the truth's own two halves would: an estimate of the ceiling of ``spearman_rho``.

The run's own operator is also scored with its matched null subtracted (``adjusted``, as in
``reliance``), so that the table shows whether the null helps. Every deletion is scored, small
objects too: the reliance stage's ``min_share`` would leave fewer than 20 (city, object) pairs
per run on the default world (18 for ResNet18, seed 0).

Reads the run's ``best.pt``, the snapshot's cache and its true deletions
(``counterfactual.CounterfactualSet.deleted_*``). Writes into the run folder
``calibration.csv`` (per operator and measure: ``COLUMNS``) and ``calibration_images.csv`` (per
deletion: row, city, group, view, object, share, ``true`` and each operator's change of log p,
and its null's); ``.results/calibration.json`` marks the finished result, keyed by the reliance
settings, the training's key, the counterfactual images' key and the code.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps
from tqdm.auto import tqdm

from citylib.core import devices
from citylib.core.artifacts import ResultFolder, StaleError, code_key, write_csv
from citylib.core.config import config_hash
from citylib.explain import removal
from citylib.nets import checkpoint, infer
from citylib.stages.reliance import RelianceConfig, null_mask
from citylib.stats import resampling

NAME = "calibration"

COLUMNS = ["operator", "measure", "spearman_rho", "rho_ci_low", "rho_ci_high", "n_pairs", "sign_agreement", "signs_checked", "mae",
           "strongest_same", "cities", "truth_reliability"]


def pair_means(images: pd.DataFrame, column: str, min_images: int = 5) -> pd.DataFrame:
    """Per (city, object) with ``min_images`` rows or more: n and the mean of ``column``."""
    g = images.groupby(["city", "object"], sort=True)[column]
    out = pd.DataFrame({"n": g.size(), "mean": g.mean()}).reset_index()
    return out[out["n"] >= min_images].reset_index(drop=True)


def agreement(images: pd.DataFrame, estimate: str, truth: str = "true", *, min_images: int = 5,
              n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """See ``_agreement``; a constant column (an operator that changes nothing) ranks nothing:
    its ρ is NaN, said without a warning per resample."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sps.ConstantInputWarning)
        return _agreement(images, estimate, truth, min_images=min_images, n_boot=n_boot, level=level, seed=seed)


def _agreement(images: pd.DataFrame, estimate: str, truth: str = "true", *, min_images: int = 5,
               n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """``images``: one row per (image, object) with city, object, group (the spot) and the
    changes of log p under the true deletion (``truth``) and under the operator (``estimate``).
    Returns ``COLUMNS[2:]`` (see the module's docstring)."""
    keep = images.groupby(["city", "object"])["city"].transform("size") >= min_images
    images = images[keep].reset_index(drop=True)
    pairs = images.groupby(["city", "object"], sort=True).ngroup().to_numpy()              # (n,)
    n_pairs = int(pairs.max()) + 1 if len(pairs) else 0
    if n_pairs < 3:           # too few to rank: said by n_pairs, every figure NaN
        return {**dict.fromkeys(COLUMNS[2:], float("nan")), "n_pairs": n_pairs, "signs_checked": 0,
                "strongest_same": 0, "cities": int(images["city"].nunique())}
    names = images.groupby(["city", "object"], sort=True).size().index
    one_hot = np.zeros((len(images), n_pairs))
    one_hot[np.arange(len(images)), pairs] = 1.0                                           # (n, P)
    true_v, est_v = images[truth].to_numpy(float), images[estimate].to_numpy(float)
    true_m, est_m = (true_v @ one_hot) / one_hot.sum(0), (est_v @ one_hot) / one_hot.sum(0)  # (P,)
    rho = float(sps.spearmanr(true_m, est_m).statistic)

    w = resampling.spot_weights(images["group"].to_numpy(), images["city"].to_numpy(), n_boot, seed)  # (B, n)
    size = w @ one_hot                                                                     # (B, P)
    with np.errstate(invalid="ignore", divide="ignore"):
        true_b, est_b = (w * true_v) @ one_hot / size, (w * est_v) @ one_hot / size       # (B, P); NaN: undrawn
    rhos = np.array([sps.spearmanr(t[ok], e[ok]).statistic if (ok := np.isfinite(t)).sum() >= 3 else np.nan
                     for t, e in zip(true_b, est_b)])
    lo, hi = np.nanquantile(rhos, [(1 - level) / 2, (1 + level) / 2])

    t_lo, t_hi = np.nanquantile(true_b, [(1 - level) / 2, (1 + level) / 2], axis=0)        # (P,) each
    sure = (t_lo > 0) | (t_hi < 0)
    agree = np.sign(est_m[sure]) == np.sign(true_m[sure])
    cities = np.asarray([c for c, _ in names])
    same = [np.argmin(true_m[cities == c]) == np.argmin(est_m[cities == c]) for c in np.unique(cities)]
    return {"spearman_rho": rho, "rho_ci_low": float(lo), "rho_ci_high": float(hi), "n_pairs": n_pairs,
            "sign_agreement": float(agree.mean()) if sure.any() else float("nan"), "signs_checked": int(sure.sum()),
            "mae": float(np.abs(est_m - true_m).mean()), "strongest_same": int(sum(same)), "cities": len(same),
            "truth_reliability": reliability(images, truth, one_hot, seed)}


def reliability(images: pd.DataFrame, column: str, one_hot: np.ndarray, seed: int = 0, splits: int = 50) -> float:
    """Split-half reliability of the per-pair means of ``column``: each city's spots halved at
    random, Spearman's ρ between the two halves' means over the pairs both halves hold, averaged
    over ``splits`` and stepped up by Spearman-Brown (2ρ / (1 + ρ)); NaN without 2 spots a city."""
    rng = np.random.default_rng(seed)
    values, groups, cities = images[column].to_numpy(float), images["group"].to_numpy(str), images["city"].to_numpy(str)
    rhos = []
    for _ in range(splits):
        half = np.zeros(len(images), bool)
        for city in np.unique(cities):
            spots = np.unique(groups[cities == city])
            if len(spots) < 2:
                return float("nan")
            half |= np.isin(groups, rng.permutation(spots)[: len(spots) // 2])
        sums = [(values * h) @ one_hot for h in (half, ~half)]
        sizes = [h.astype(float) @ one_hot for h in (half, ~half)]
        both = (sizes[0] > 0) & (sizes[1] > 0)
        if both.sum() >= 3:
            rhos.append(sps.spearmanr(sums[0][both] / sizes[0][both], sums[1][both] / sizes[1][both]).statistic)
    r = float(np.nanmean(rhos)) if rhos else float("nan")
    return 2 * r / (1 + r) if np.isfinite(r) and r > -1 else float("nan")


@dataclass(frozen=True)
class CalibrationResult:
    table: pd.DataFrame     # calibration.csv
    images: pd.DataFrame    # calibration_images.csv
    key: str
    folder: Path
    reused: bool = False
    figures: dict = field(default_factory=dict)   # name -> PNG (``pipeline.result``)


def key(cfg: RelianceConfig, training_key: str, counterfactual_key: str) -> str:
    return config_hash(NAME, code_key(__name__), devices.keyed(cfg), training_key, counterfactual_key)


def run(cfg: RelianceConfig, run_dir: str | Path, cache, counterfactuals, *, progress: bool = True) -> CalibrationResult:
    """Score every operator of ``cfg.calibrate`` against the true deletions, written into
    ``run_dir`` (reused when the key matches)."""
    run_dir = Path(run_dir)
    model, cities, training_key = checkpoint.trained(run_dir, cache, cfg.device)
    folder = ResultFolder(run_dir, NAME, key(cfg, training_key, counterfactuals.key))
    if folder.done() is not None:
        return _load(run_dir, folder.key)
    if counterfactuals.deleted_index is None or len(counterfactuals.deleted_index) == 0:
        raise StaleError(f"{counterfactuals.folder}: no true deletions to calibrate against (data.deletion_spots is 0)")
    folder.begin()
    nets = devices.replicas(model, devices.every(cfg.device))
    images = changes(nets, cache, counterfactuals, list(cities), cfg, progress=progress)
    table = pd.DataFrame([{"operator": op, "measure": measure,
                           **agreement(images, op if measure == "effect" else f"{op}_adjusted",
                                       min_images=cfg.min_images, n_boot=cfg.n_boot, level=cfg.level, seed=cfg.seed)}
                          for op in operators(cfg) for measure in ("effect", "adjusted")
                          if measure == "effect" or (op == cfg.operator and cfg.calibrate_null)], columns=COLUMNS)
    write_csv(run_dir / "calibration.csv", table)
    write_csv(run_dir / "calibration_images.csv", images)
    folder.commit(["calibration.csv", "calibration_images.csv"], training_key=training_key)
    return CalibrationResult(table, images, folder.key, run_dir)


def changes(model, cache, counterfactuals, cities: list[str], cfg: RelianceConfig, *,
            progress: bool = False) -> pd.DataFrame:
    """Per true deletion: the change of log p(true city) it makes (``true``), each operator's
    of ``operators(cfg)`` on the same pixels of the original (``<op>``) and, where
    ``cfg.calibrate_null``, the run's operator's null (``<op>_null``) and the difference
    (``<op>_adjusted``). Each original image passes the network once, the deletions a batch at
    a time."""
    index = counterfactuals.deleted_index.reset_index(drop=True)
    shares = np.zeros(len(index))
    target = np.array([cities.index(c) for c in index["city"]], np.int64)
    ops = operators(cfg)
    null = f"{cfg.operator}_null"
    out = {name: np.zeros(len(index)) for name in ["true", *ops, *([null] if cfg.calibrate_null else [])]}
    fill = dict(dilation=cfg.dilation, **cfg.settings())
    all_rows = index["row"].to_numpy(np.int64)
    unique = np.unique(all_rows)                               # an image has several deletions
    original_logp = infer.log_p(model, cache.images, cfg.batch_size, unique)                # (U, C)
    for start in tqdm(range(0, len(index), cfg.batch_size), desc="calibration", disable=not progress):
        at = np.arange(start, min(start + cfg.batch_size, len(index)))
        rows = all_rows[at]
        original = np.asarray(cache.images[rows])                                      # (B, S, S, 3)
        masks = np.asarray(counterfactuals.deleted_masks[at])                    # (B, S, S)
        shares[at] = masks.mean((1, 2))
        batch = {"true": np.asarray(counterfactuals.deleted_images[at])}
        for op in ops:
            batch[op] = removal.remove(op, original, masks, seed=cfg.seed + start, **fill)
        fits = np.ones(len(at), bool)
        if cfg.calibrate_null:
            labels = np.asarray(cache.labels[rows])
            nulls = np.stack([null_mask(lab, m, cfg.ring, cfg.dilation)[0] for lab, m in zip(labels, masks)])
            fits = nulls.any((1, 2))             # a null that fits nowhere leaves the image as it is
            batch[null] = removal.remove(cfg.operator, original[fits], nulls[fits], seed=cfg.seed + start + 1, **fill)
        logp = infer.log_p(model, np.concatenate(list(batch.values())), cfg.batch_size)
        ends = np.cumsum([0] + [len(v) for v in batch.values()])
        base = original_logp[np.searchsorted(unique, rows), target[at]]                  # (B,)
        for k, name in enumerate(batch):
            part = logp[ends[k]:ends[k + 1]]
            if name == null:                                 # 0 where the null fits nowhere
                out[name][at[fits]] = part[np.arange(fits.sum()), target[at][fits]] - base[fits]
            else:
                out[name][at] = part[np.arange(len(at)), target[at]] - base
    frame = index.assign(share=shares, **out)
    if cfg.calibrate_null:
        frame[f"{cfg.operator}_adjusted"] = frame[cfg.operator] - frame[null]
    return frame


def operators(cfg: RelianceConfig) -> tuple[str, ...]:
    """The operators a calibration scores: ``cfg.calibrate``, and the run's own first."""
    return tuple(dict.fromkeys((cfg.operator, *cfg.calibrate)))


def _load(run_dir: Path, key: str) -> CalibrationResult:
    return CalibrationResult(pd.read_csv(run_dir / "calibration.csv"),
                             pd.read_csv(run_dir / "calibration_images.csv", dtype={"city": str, "object": str,
                                                                                    "group": str}),
                             key, run_dir, reused=True)
