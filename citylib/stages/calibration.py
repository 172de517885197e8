"""How far a removal operator lands from the true counterfactual, on a generated world.

The world re-renders a test spot without one object kind (``synth.render_spot``'s ``delete``):
the true deletion. A removal operator fills the same pixels (those whose label the deletion
changed) in the original image. Per (city, object) both give a mean change of log p(true city);
``agreement`` scores the operator's means against the true ones:

- ``spearman_rho`` over the (city, object) pairs with ``min_images`` images or more, with a 95%
  interval from resampling whole spots within each city (every pair's means recomputed);
- ``sign_agreement``: the share of the pairs whose true interval excludes 0 where the operator's
  mean has the true sign (``signs_checked`` of them);
- ``mae``: the mean absolute difference of the means (log p);
- ``strongest_same``: the cities whose most negative pair is the same under both.

Pure functions on tables; reads and writes nothing.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

from citylib.stats import resampling

COLUMNS = ["spearman_rho", "rho_ci_low", "rho_ci_high", "n_pairs", "sign_agreement", "signs_checked", "mae",
           "strongest_same", "cities"]


def pair_means(images: pd.DataFrame, column: str, min_images: int = 5) -> pd.DataFrame:
    """Per (city, object) with ``min_images`` rows or more: n and the mean of ``column``."""
    g = images.groupby(["city", "object"], sort=True)[column]
    out = pd.DataFrame({"n": g.size(), "mean": g.mean()}).reset_index()
    return out[out["n"] >= min_images].reset_index(drop=True)


def agreement(images: pd.DataFrame, estimate: str, truth: str = "true", *, min_images: int = 5,
              n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """``images``: one row per (image, object) with city, object, group (the spot) and the
    changes of log p under the true deletion (``truth``) and under the operator (``estimate``).
    Returns ``COLUMNS`` (see the module's docstring)."""
    keep = images.groupby(["city", "object"])["city"].transform("size") >= min_images
    images = images[keep].reset_index(drop=True)
    pairs = images.groupby(["city", "object"], sort=True).ngroup().to_numpy()              # (n,)
    n_pairs = int(pairs.max()) + 1 if len(pairs) else 0
    if n_pairs < 3:
        raise ValueError(f"{n_pairs} (city, object) pairs with {min_images} images or more: too few to rank")
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
            "mae": float(np.abs(est_m - true_m).mean()), "strongest_same": int(sum(same)), "cities": len(same)}
