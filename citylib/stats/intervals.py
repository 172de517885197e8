"""Uncertainty of the numbers the suite compares: binomial and bootstrap intervals.

Pure functions on arrays; reads and writes nothing.
"""
from __future__ import annotations

import numpy as np
from scipy import stats as sps


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (NaN, NaN when n = 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    z = float(sps.norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def group_bootstrap(values: np.ndarray, groups: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                    seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` (n,) and its percentile interval, resampling whole ``groups`` (n,)
    with replacement (images of one spot are not independent): (mean, low, high)."""
    values = np.asarray(values, float)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    means = group_bootstrap_means(values, groups, n_boot, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(lo), float(hi)


def group_bootstrap_means(values: np.ndarray, groups: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_boot,) means of ``values`` over resamples of whole ``groups`` (for intervals of a
    difference between two independent samples, say)."""
    values = np.asarray(values, float)
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    sums, counts = np.bincount(g, values), np.bincount(g).astype(float)       # per group
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(sums), size=(n_boot, len(sums)))                # (B, G)
    return sums[pick].sum(1) / counts[pick].sum(1)                             # (B,)


def spot_weights(groups, strata, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, n) float64: how often each item is drawn in each resample when whole ``groups``
    (n,) (the views of one spot) are drawn with replacement within each of the ``strata`` (n,)
    (the cities, each keeping its number of spots). A weighted mean ``weights @ values /
    weights.sum(1)`` is then one resample's statistic."""
    groups, strata = np.asarray(groups).astype(str), np.asarray(strata).astype(str)
    weights = np.zeros((n_boot, len(groups)))
    rng = np.random.default_rng(seed)
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        spots, of = np.unique(groups[members], return_inverse=True)
        g = len(spots)
        draws = rng.integers(0, g, size=(n_boot, g)) + (np.arange(n_boot) * g)[:, None]
        counts = np.bincount(draws.ravel(), minlength=n_boot * g).reshape(n_boot, g)
        weights[:, members] = counts[:, of]
    return weights


def percentile(values, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of resampled statistics (B,), NaN resamples left out."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def holm(p) -> np.ndarray:
    """Holm's step-down adjusted p-values of ``p`` (m,): rejecting where adjusted p <= alpha
    keeps the chance of any false rejection among the m tests at alpha."""
    p = np.asarray(p, float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return out
