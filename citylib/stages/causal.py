"""Causal stage: how much a run's network relies on each planted cue, with no explanation
method in the loop.

For every test image of a generated world and every planted cue of its city, the change in the
network's log-probability of the true city when that cue alone is reset to the base style
(``counterfactual``), and the same for the cue-free rendering (every cue reset at once).

Reads the run's ``best.pt`` (``checkpoint.load_model``), the snapshot's cache and its counterfactual
images (``data.load_counterfactuals``). Writes into the run folder:

- ``causal.csv``: city, object (a cue, or ``cue-free``), n, spots, effect (mean
  delta log p of the true city), ci_low, ci_high (bootstrap over spots), accuracy_with,
  accuracy_without, rank (1 = the city's causally strongest cue: the most negative effect).
- ``causal_images.csv``: one row per counterfactual image: row, city, group, view, object,
  logp, logp_without, correct, correct_without, predicted_without.
- ``causal_cue_free.csv``: every cue-free rendering the check uses, the test spots' views and
  the fresh spots' (``counterfactual``): sample (test / fresh), city, group, view, predicted,
  correct.
- ``sufficiency.csv`` (where the data stage added other cities' cues): per (city, donor,
  object), a test spot with the donor city's planted cue added: n, spots, donor_effect (mean
  delta log p of the donor city) and true_effect (of the true city), each with its bootstrap
  interval over spots, and the share of images called the donor city before and after. A
  network may know a city by the others' cues being absent (a default class): necessity alone
  cannot show that, sufficiency can.
- ``causal.json``: the cue-free check (``cue_free``) on all of them: accuracy, the 95% range a
  city-blind network's accuracy takes with the spots' cities permuted, the permutation p-value
  and ``at_chance``; the same per sample under ``samples``.

``.results/causal.json`` marks the finished result, keyed by the settings, the training's key,
the counterfactual images' key and the code.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from citylib.core import devices
from citylib.core.artifacts import ResultFolder, code_key, read_json, write_csv, write_json
from citylib.core.config import check, config_hash
from citylib.data.counterfactual import CUE_FREE
from citylib.nets import checkpoint, infer
from citylib.stats import intervals, resampling

NAME = "causal"
ALPHA = 0.05      # the cue-free check's false-alarm rate for a whole grid (``holm_decision``, ``pooled``)
COLUMNS = ["city", "object", "n", "spots", "effect", "ci_low", "ci_high", "accuracy_with",
           "accuracy_without", "rank"]


@dataclass(frozen=True)
class CausalConfig:
    """Settings of the causal stage (the ``causal:`` section of a parameter file)."""

    n_boot: int = 2000        # bootstrap resamples of the spots
    level: float = 0.95       # interval level
    batch_size: int = 128
    seed: int = 0             # of the bootstrap
    device: str = "auto"      # of the forward passes (citylib.devices); the key holds its kind

    def __post_init__(self):
        check(self, n_boot="in [100, 1000000]", level="in [0.5, 1)", batch_size=">= 1")
        devices.validate(self)


@dataclass(frozen=True)
class CausalResult:
    table: pd.DataFrame       # causal.csv
    images: pd.DataFrame      # causal_images.csv
    summary: dict             # causal.json
    cue_free: pd.DataFrame    # causal_cue_free.csv
    key: str                  # what made it: the settings, training, counterfactuals and code
    folder: Path              # the run folder, where these files are
    reused: bool = False
    sufficiency: pd.DataFrame | None = None   # sufficiency.csv


def key(cfg: CausalConfig, training_key: str, counterfactual_key: str) -> str:
    return config_hash(NAME, code_key(__name__), devices.keyed(cfg), training_key, counterfactual_key)


def run(cfg: CausalConfig, run_dir: str | Path, cache, counterfactuals, *, progress: bool = True) -> CausalResult:
    """Measure every cue's causal effect on the run's network, written into ``run_dir`` (reused
    when the key matches)."""
    run_dir = Path(run_dir)
    model, cities, training_key = checkpoint.trained(run_dir, cache, cfg.device)
    folder = ResultFolder(run_dir, NAME, key(cfg, training_key, counterfactuals.key))
    if folder.done() is not None:
        return _load(run_dir, folder.key)
    folder.begin()
    nets = devices.replicas(model, devices.every(cfg.device))   # one per device (cuda:all)
    added = counterfactuals.added_index
    rows = np.unique(np.concatenate([counterfactuals.index["row"].to_numpy(np.int64),
                                     added["row"].to_numpy(np.int64) if added is not None else []]).astype(np.int64))
    originals = (rows, infer.log_p(nets, cache.images, cfg.batch_size, rows))   # each image once
    images = effects(nets, cache, counterfactuals, list(cities), cfg.batch_size, originals=originals)
    table = summarise(images, cfg)
    free = cue_free_predictions(nets, images, counterfactuals, list(cities), cfg.batch_size)
    summary = {"cue_free": cue_free(free, len(cities), cfg), "counterfactuals": counterfactuals.key,
               "n_boot": cfg.n_boot, "level": cfg.level}
    write_csv(run_dir / "causal.csv", table)
    write_csv(run_dir / "causal_images.csv", images)
    write_csv(run_dir / "causal_cue_free.csv", free)
    enough = sufficiency(nets, cache, counterfactuals, list(cities), cfg, originals=originals)
    write_csv(run_dir / "sufficiency.csv", enough)
    write_json(run_dir / "causal.json", summary)
    folder.commit(["causal.csv", "causal_images.csv", "causal_cue_free.csv", "sufficiency.csv", "causal.json"],
                  training_key=training_key)
    return CausalResult(table, images, summary, free, folder.key, run_dir, sufficiency=enough)


def effects(model: torch.nn.Module | list[torch.nn.Module], cache, counterfactuals, cities: list[str],
            batch_size: int = 128, *, originals: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
    """Per counterfactual image: the log-probability of the true city on the original (its
    cache row) and on the counterfactual, and whether each is classified correctly. ``model``:
    the network, or copies of it on several devices (``infer.logits``); ``originals``: (sorted
    cache rows, their log-probabilities), when known already."""
    index = counterfactuals.index
    target = np.array([cities.index(c) for c in index["city"]], np.int64)             # (M,)
    rows, orig = _originals(model, cache, index["row"], batch_size, originals)       # (R,), (R, C)
    at = np.searchsorted(rows, index["row"].to_numpy(np.int64))
    logp, correct = orig[at, target], orig[at].argmax(1) == target
    cf = infer.log_p(model, np.asarray(counterfactuals.images), batch_size)  # (M, C)
    return pd.DataFrame({"row": index["row"], "city": index["city"], "group": index["group"],
                         "view": index["view"], "object": index["variant"], "logp": logp,
                         "logp_without": cf[np.arange(len(cf)), target], "correct": correct,
                         "correct_without": cf.argmax(1) == target,
                         "predicted_without": np.asarray(cities)[cf.argmax(1)]})


SUFFICIENCY_COLUMNS = ["city", "donor", "object", "n", "spots", "donor_effect", "donor_ci_low", "donor_ci_high",
                       "true_effect", "true_ci_low", "true_ci_high", "called_donor_before", "called_donor_after"]


def sufficiency(model, cache, counterfactuals, cities: list[str], cfg: CausalConfig = CausalConfig(), *,
                originals: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
    """sufficiency.csv (see the module docstring) from the views with another city's cue added;
    empty where the data stage added none. ``originals`` as for ``effects``."""
    index = counterfactuals.added_index
    if index is None or len(index) == 0:
        return pd.DataFrame(columns=SUFFICIENCY_COLUMNS)
    rows, orig = _originals(model, cache, index["row"], cfg.batch_size, originals)   # (R,), (R, C)
    at = np.searchsorted(rows, index["row"].to_numpy(np.int64))
    added = infer.log_p(model, np.asarray(counterfactuals.added_images), cfg.batch_size)  # (A, C)
    true = np.array([cities.index(c) for c in index["city"]])
    donor = np.array([cities.index(c) if c in cities else -1 for c in index["donor"]])
    keep = donor >= 0                                   # a donor the network knows
    n = np.arange(len(index))
    frame = index.assign(d_donor=added[n, donor] - orig[at, donor], d_true=added[n, true] - orig[at, true],
                         before=orig[at].argmax(1) == donor, after=added.argmax(1) == donor)[keep]
    out = []
    for (city, giver, obj), g in frame.groupby(["city", "donor", "object"], sort=True):
        groups = g["group"].to_numpy()
        d = resampling.bootstrap_interval(g["d_donor"].to_numpy(), groups, cfg.n_boot, cfg.level, cfg.seed)
        t = resampling.bootstrap_interval(g["d_true"].to_numpy(), groups, cfg.n_boot, cfg.level, cfg.seed)
        out.append([city, giver, obj, len(g), len(set(groups)), *d, *t, float(g["before"].mean()), float(g["after"].mean())])
    return pd.DataFrame(out, columns=SUFFICIENCY_COLUMNS)


def _originals(model, cache, wanted, batch_size: int, known: tuple[np.ndarray, np.ndarray] | None):
    """(sorted unique cache rows of ``wanted``, their log-probabilities): taken from ``known``
    (rows, log-probabilities) where it holds them all, else computed."""
    rows = np.unique(np.asarray(wanted, np.int64))
    if known is not None and np.isin(rows, known[0]).all():
        return rows, known[1][np.searchsorted(known[0], rows)]
    return rows, infer.log_p(model, cache.images, batch_size, rows)


def summarise(images: pd.DataFrame, cfg: CausalConfig = CausalConfig()) -> pd.DataFrame:
    """causal.csv from the per-image effects: per (city, object) the mean delta log p with its
    spot-bootstrap interval, the accuracies with and without, and the cues' causal rank."""
    out = []
    for (city, obj), g in images.groupby(["city", "object"], sort=False):
        delta = (g["logp_without"] - g["logp"]).to_numpy()
        effect, lo, hi = resampling.bootstrap_interval(delta, g["group"].to_numpy(), cfg.n_boot, cfg.level, cfg.seed)
        out.append({"city": city, "object": obj, "n": len(g), "spots": g["group"].nunique(),
                    "effect": effect, "ci_low": lo, "ci_high": hi,
                    "accuracy_with": float(g["correct"].mean()),
                    "accuracy_without": float(g["correct_without"].mean())})
    table = pd.DataFrame(out, columns=COLUMNS[:-1])
    cue = table["object"] != CUE_FREE
    table["rank"] = np.nan
    table.loc[cue, "rank"] = table[cue].groupby("city")["effect"].rank(method="min")
    return table[COLUMNS]


def cue_free_predictions(model: torch.nn.Module | list[torch.nn.Module], images: pd.DataFrame, counterfactuals, cities: list[str],
                         batch_size: int = 128) -> pd.DataFrame:
    """causal_cue_free.csv: the network's decision on every cue-free rendering, the test spots'
    (from ``effects``' rows) and the fresh spots'."""
    test = images[images["object"] == CUE_FREE]
    fresh = counterfactuals.fresh_index
    pred = (infer.logits(model, np.asarray(counterfactuals.fresh_images), batch_size).argmax(1)
            if len(fresh) else np.zeros(0, np.int64))
    frames = [pd.DataFrame({"sample": "test", "city": test["city"], "group": test["group"], "view": test["view"],
                            "predicted": test["predicted_without"], "correct": test["correct_without"]}),
              pd.DataFrame({"sample": "fresh", "city": fresh["city"], "group": fresh["group"], "view": fresh["view"],
                            "predicted": np.asarray(cities)[pred], "correct": np.asarray(cities)[pred] == fresh["city"]})]
    return pd.concat(frames, ignore_index=True)


def cue_free(free: pd.DataFrame, n_cities: int, cfg: CausalConfig = CausalConfig()) -> dict:
    """Accuracy on the cue-free renderings ``free`` (``cue_free_predictions``' columns), and
    whether it is what a city-blind network gets; all samples pooled, and per ``sample``.

    Cue-free, every city is the base style: the images carry no information about their city,
    so the cities' labels are exchangeable between spots. ``interval`` is the central ``level``
    range of this network's accuracy with the spots' cities permuted (``cfg.n_boot`` times;
    views of one spot keep one city, which allows for their predictions being alike), and
    ``at_chance`` says whether the observed accuracy lies in it; ``p`` is the two-sided
    permutation p-value. ``wilson`` is the plain binomial interval of the observed accuracy.
    """
    out = _permutation(free, n_cities, cfg)
    if "sample" in free and free["sample"].nunique() > 1:
        out["samples"] = {name: _permutation(g, n_cities, cfg) for name, g in free.groupby("sample", sort=False)}
    return out


def _permutation(free: pd.DataFrame, n_cities: int, cfg: CausalConfig) -> dict:
    k, n = int(free["correct"].sum()), len(free)
    if n == 0:
        raise ValueError("no cue-free rendering to check")
    spots, at = np.unique(free["group"].to_numpy(), return_inverse=True)
    city_of = free.groupby("group")["city"].first().reindex(spots).to_numpy()       # (G,)
    predicted = free["predicted"].to_numpy()
    null = resampling.permutation_null(city_of, lambda c: (predicted == c[at]).mean(), cfg.n_boot, cfg.seed)
    acc = k / n
    lo, hi = np.quantile(null, [(1 - cfg.level) / 2, (1 + cfg.level) / 2])
    centre = null.mean()
    p = float(min(1.0, (np.sum(np.abs(null - centre) >= abs(acc - centre) - 1e-12) + 1) / (len(null) + 1)))
    return {"accuracy": acc, "n": n, "spots": len(spots), "chance": 1.0 / n_cities,
            "interval": [float(lo), float(hi)], "p": p, "wilson": list(intervals.wilson(k, n, cfg.level)),
            "at_chance": bool(lo <= acc <= hi)}


def holm_decision(p: Mapping[str, float], alpha: float = ALPHA) -> dict[str, dict]:
    """The cue-free decision of every run of a grid at once: each run's permutation p-value
    adjusted by Holm over the grid's runs; a run is "at chance" unless its adjusted p is below
    ``alpha``. The chance that a grid of runs that all are at chance gets any run called
    otherwise is ``alpha`` at most, however many runs, and however alike their predictions."""
    names = list(p)
    adjusted = intervals.holm([p[n] for n in names]) if names else []
    return {n: {"p": float(p[n]), "p_holm": float(a), "at_chance": bool(a >= alpha)}
            for n, a in zip(names, adjusted)}


def pooled(frames: Mapping[str, pd.DataFrame], n_cities: int, n_perm: int = 2000, seed: int = 0,
           alpha: float = ALPHA, level: float = 0.95) -> dict:
    """One cue-free decision for a grid: the runs' mean accuracy on the cue-free renderings they
    all predicted (each run's ``causal_cue_free.csv``, the same images in the same order) against
    the same mean with the spots' cities permuted, one permutation for every run at once, so that
    their predictions' likeness on shared images is kept. Two-sided; false-alarm rate ``alpha``
    for the grid, exactly."""
    names = list(frames)
    first = frames[names[0]]
    for n in names[1:]:
        if not frames[n][["sample", "city", "group", "view"]].equals(first[["sample", "city", "group", "view"]]):
            raise ValueError(f"{n}: its cue-free renderings are not {names[0]}'s; compare runs of one snapshot")
    spots, at = np.unique(first["group"].to_numpy(), return_inverse=True)
    city_of = first.groupby("group")["city"].first().reindex(spots).to_numpy()           # (G,)
    predicted = np.stack([frames[n]["predicted"].to_numpy() for n in names])              # (R, n)
    mean = float((predicted == first["city"].to_numpy()).mean())
    null = resampling.permutation_null(city_of, lambda c: (predicted == c[at]).mean(), n_perm, seed)
    centre = null.mean()
    p = float(min(1.0, (np.sum(np.abs(null - centre) >= abs(mean - centre) - 1e-12) + 1) / (len(null) + 1)))
    lo, hi = np.quantile(null, [(1 - level) / 2, (1 + level) / 2])
    return {"runs": names, "accuracy": mean, "images": len(first), "spots": len(spots),
            "chance": 1.0 / n_cities, "interval": [float(lo), float(hi)], "p": p, "alpha": alpha,
            "at_chance": bool(p >= alpha)}


def cue_free_text(free: dict) -> str:
    """``cue_free``'s result (``causal.json``'s ``cue_free``) in words, one line for all the
    cue-free images and one per sample of them."""
    return "\n".join(
        f"cue-free accuracy ({name}: {c['n']} images of {c['spots']} spots) {c['accuracy']:.3f}; a city-blind "
        f"network: [{c['interval'][0]:.3f}, {c['interval'][1]:.3f}] (p = {c['p']:.3f}), chance {c['chance']:.3f}: "
        f"at chance = {c['at_chance']}" for name, c in {"all": free, **free.get("samples", {})}.items())


def _load(run_dir: Path, key: str) -> CausalResult:
    return CausalResult(pd.read_csv(run_dir / "causal.csv", dtype={"city": str, "object": str}),
                        pd.read_csv(run_dir / "causal_images.csv", dtype={"city": str, "object": str, "group": str}),
                        read_json(run_dir / "causal.json"),
                        pd.read_csv(run_dir / "causal_cue_free.csv", dtype={"city": str, "group": str,
                                                                            "predicted": str}),
                        key, run_dir, reused=True,
                        sufficiency=pd.read_csv(run_dir / "sufficiency.csv", dtype={"city": str, "donor": str,
                                                                                   "object": str}))
