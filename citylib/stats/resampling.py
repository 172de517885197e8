"""Resampling: the bootstrap, label permutations and sign flips, each written once and used by
every stage that draws an interval or a p-value (the Grad-CAM sanity checks, the statistics,
the causal effects and the cue-free check, the embedding's kNN agreement, the method sweep and
the comparison). Pure functions on arrays, seeded; reads and writes nothing.

- ``draws`` / ``counts``: B resamples of n items with replacement, as indices or as how often
  each item is drawn. Drawn ``chunk`` resamples per call to the generator: numpy's bounded
  integers drop the unused half of a 64-bit word at the end of each call, so a different chunk
  gives other (equally valid) resamples.
- ``bootstrap_means`` / ``bootstrap_interval``: the mean over resamples of whole groups (the
  views of one spot are not independent; without groups every value is its own), and its
  percentile interval. ``spot_weights``: the same draws as weights, stratified by city.
- ``permutation_null``: a statistic recomputed with the labels shuffled, B times.
- ``relabelling_test``: two groups of units, every (or a random) relabelling; one-sided.
- ``sign_flip_test``: paired differences symmetric about 0 under the null; one-sided.
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Callable, Iterator

import numpy as np

CHUNK = 256          # resamples, relabellings or sign flips drawn at once where memory matters


def draws(rng: np.random.Generator, n: int, n_boot: int, chunk: int | None = None) -> Iterator[np.ndarray]:
    """(b, n) int64 indices of ``n`` items drawn with replacement, ``n_boot`` rows in all,
    ``chunk`` rows per call (None: all at once)."""
    step = n_boot if chunk is None else chunk
    for s in range(0, n_boot, max(step, 1)):
        yield rng.integers(0, n, size=(min(step, n_boot - s), n))


def counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """(n_boot, n) float64: how often each of ``n`` items is drawn in each of ``n_boot``
    resamples of n with replacement."""
    pick = next(draws(rng, n, n_boot)) + (np.arange(n_boot) * n)[:, None]
    return np.bincount(pick.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def bootstrap_means(values, groups=None, n_boot: int = 2000, seed=0, chunk: int | None = None) -> np.ndarray:
    """(n_boot,) means of ``values`` (n,) over resamples of whole ``groups`` (n,) drawn with
    replacement (default: every value its own group)."""
    values = np.asarray(values, float)
    if groups is None:
        sums, sizes = values, np.ones(len(values))
    else:
        _, g = np.unique(np.asarray(groups), return_inverse=True)
        sums, sizes = np.bincount(g, values), np.bincount(g).astype(float)     # per group
    rng = np.random.default_rng(seed)
    return np.concatenate([sums[pick].sum(1) / sizes[pick].sum(1)               # (b,)
                           for pick in draws(rng, len(sums), n_boot, chunk)])


def bootstrap_interval(values, groups=None, n_boot: int = 2000, level: float = 0.95, seed=0,
                       chunk: int | None = None) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its percentile interval at ``level`` over
    resamples of whole ``groups`` (``bootstrap_means``); NaN for no values."""
    values = np.asarray(values, float)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    means = bootstrap_means(values, groups, n_boot, seed, chunk)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(lo), float(hi)


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
        weights[:, members] = counts(rng, len(spots), n_boot)[:, of]
    return weights


def permutation_null(labels, statistic: Callable[[np.ndarray], float], n: int, seed=0) -> np.ndarray:
    """(n,) ``statistic(labels shuffled)``, each time a new random order of ``labels``: what the
    statistic takes when the labels carry no information."""
    rng = np.random.default_rng(seed)
    return np.array([statistic(rng.permutation(labels)) for _ in range(n)])


def relabelling_test(x_a, x_b, permutations: int = 10000, seed: int = 0) -> dict:
    """One-sided test of mean(x_a) > mean(x_b) by relabelling the units: which k of the n units
    are "a". Every labelling when C(n, k) <= ``permutations`` (exact), else a seeded Monte
    Carlo; ties up to float rounding count as reaching the observed statistic."""
    x = np.concatenate([np.asarray(x_a, np.float64), np.asarray(x_b, np.float64)])
    n, k = len(x), len(x_a)
    if k == 0 or k == n:
        return {"statistic": None, "p_value": None, "method": "needs both kinds of pairs"}
    total = x.sum()

    def diff(s):                                        # the statistic from the "a" sum
        return s / k - (total - s) / (n - k)
    stat = diff(x[:k].sum())
    tol = 1e-9 * (np.abs(x).mean() + 1e-300)
    labellings = math.comb(n, k)
    if labellings <= permutations:
        picks = np.fromiter((i for c in combinations(range(n), k) for i in c), np.int64)
        sims = diff(x[picks.reshape(-1, k)].sum(1))     # (C(n, k),), the observed one included
        p, method = float(np.mean(sims >= stat - tol)), f"exact: all C({n},{k}) = {labellings} labellings"
    else:
        rng = np.random.default_rng(seed)
        picks = rng.permuted(np.tile(np.arange(n), (permutations, 1)), axis=1)[:, :k]
        p = float((1 + np.sum(diff(x[picks].sum(1)) >= stat - tol)) / (1 + permutations))
        method = f"Monte Carlo: {permutations} random labellings of C({n},{k}) = {labellings}"
    return {"statistic": float(stat), "p_value": p, "method": method, "n": n,
            "n_architecture": k, "n_seed": n - k, "alternative": "greater",
            "min_p": 1 / labellings if labellings <= permutations else 1 / (1 + permutations)}


def sign_flip_test(d, permutations: int = 10000, seed: int = 0) -> dict:
    """One-sided test of mean(d) > 0 when the d_i are symmetric about 0 under the null: every
    sign flip when 2^n <= ``permutations`` (and n <= 20), else a seeded Monte Carlo."""
    d = np.asarray(d, np.float64)
    n = len(d)
    if n == 0:
        return {"statistic": None, "p_value": None, "method": "no common images"}
    stat, tol = d.mean(), 1e-9 * (np.abs(d).mean() + 1e-300)
    if n <= 20 and 2 ** n <= permutations:
        signs = 1.0 - 2.0 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)   # (2^n, n)
        p, method = float(np.mean(signs @ d / n >= stat - tol)), f"exact: all 2^{n} sign flips"
    else:
        rng, hits = np.random.default_rng(seed), 0
        for s in range(0, permutations, CHUNK):
            signs = 1.0 - 2.0 * rng.integers(0, 2, (min(CHUNK, permutations - s), n))  # (m, n)
            hits += int(np.sum(signs @ d / n >= stat - tol))
        p, method = (1 + hits) / (1 + permutations), f"Monte Carlo: {permutations} random sign flips"
    return {"statistic": float(stat), "p_value": float(p), "method": method, "n": n,
            "alternative": "greater"}
