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
