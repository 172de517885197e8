"""Comparison stage: do different architectures (and random initialisations) look at the same
pixels? The average residual AR of Shi et al., section 3.4.1, Eq. 2 and Table 2, with CIs and tests.

Reads, per run folder: ``config.json`` (name, arch, seed; ``metrics.json``'s config otherwise),
``gradcam/`` (``gradcam.load``), ``r_scores.csv`` if there is one, and ``best.pt`` plus the
data cache for the randomised reference. Writes ``<out_dir>/`` (default
``outputs/comparison``): ``ar.csv`` (COLUMNS: run_a, run_b, kind, ar, ci_low, ci_high, n_images,
arch_a, arch_b; then EXTRA: both native map sizes, the pair's and the shared grid, AR and CI on
each grid, the null in each view and AR / null), ``tests.json`` (the paper's tests, the same
tests under each control, the conclusion), ``table2.csv``, ``lift_correlation.csv``,
``per_image.npz`` (row k of ar.csv: ``rows_k`` cache rows, ``ar_k``, ``ar_pair_grid_k``,
``ar_shared_grid_k`` float32 AR per image), ``meta.json`` and the
marker ``.results/comparison.json``, keyed (``key``) by the settings, each run's name, arch, seed,
Grad-CAM and objects keys, and the code. The runs must have been trained on one data snapshot:
a grid that mixes snapshots is refused (StaleError), never compared.

The maths is in ``citylib.stages.ar`` (AR per image, streamed, in each resolution view, with
each pair's null) and ``citylib.stages.table2`` (the rows of ar.csv, Table 2, the tests and
their conclusion).

- kind: "architecture" (archs differ), "seed" (same arch, other seed: the paper's "retrained"),
  "randomised" (a run against a copy of its model with every layer re-initialised - the end
  state of ``sanity.cascade``: each layer's own ``reset_parameters``, torch seeded with
  ``seed`` - explaining the same target classes; a scale for "unrelated masks"), "other".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import reduce
from itertools import combinations
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from citylib.core import paths
from citylib.core.artifacts import ResultFolder, StaleError, atomic_path, code_key, read_json, write_csv, write_json
from citylib.core.config import check, config_hash, to_dict
from citylib.stages import gradcam
from citylib.stages.ar_tables import all_tests, ar_frame, table2
from citylib.stages.residuals import VIEWS, col, randomised_masks, views_ar

NAME = "comparison"
RANDOMISED = " (randomised)"     # run_b of a run's randomised reference: "<run> (randomised)"


@dataclass(frozen=True)
class CompareConfig:
    """Comparison stage settings; every one is part of the result folder's hash."""

    batch_size: int = 256        # test images per streaming step
    bootstrap: int = 1000        # resamples for each pair's 95% CI
    permutations: int = 10000    # Monte Carlo relabellings / sign flips (exact below this count)
    seed: int = 0                # bootstrap, tests, re-initialisation, Fig. 6 images
    randomised: bool = True      # add each run against its re-initialised model (needs the cache)
    fig6_per_city: int = 2       # Fig. 6 test images per city

    def __post_init__(self):
        check(self, batch_size=">= 1", bootstrap=">= 1", permutations=">= 1", seed=">= 0",
              fig6_per_city=">= 0")


@dataclass(frozen=True)
class CompareResult:
    """A finished comparison folder, as ``run`` and ``load`` return it."""

    folder: Path
    ar: pd.DataFrame                 # COLUMNS, one row per pair
    tests: dict                      # {"pairs": {kind: [[a, b], ...]}, "pair_permutation": {...},
                                     #  "image_sign_flip": {...}, "controls": {...}, "conclusion": {...}}
    table2: pd.DataFrame             # the paper's Table 2 layout (``table2``)
    lift_correlation: pd.DataFrame   # run_a, run_b, spearman, n_objects
    per_image: dict                  # (run_a, run_b) -> (cache rows (n,) int64, AR (n,) float32)
    fig6_rows: list                  # cache rows of the Fig. 6 images
    reused: bool = False
    per_view: dict = dataclasses.field(default_factory=dict)   # view -> per_image of that view
    figures: dict = dataclasses.field(default_factory=dict)    # name -> PNG path (``pipeline``)


def describe(run_dir: str | Path) -> dict:
    """{"name", "arch", "seed"} of a run folder, from config.json (else metrics.json)."""
    run_dir = Path(run_dir)
    for f in ("config.json", "metrics.json"):
        c = read_json(run_dir / f).get("config", {}) if (run_dir / f).is_file() else {}
        if "arch" in c and "seed" in c:
            return {"name": str(c.get("name", run_dir.name)), "arch": c["arch"], "seed": int(c["seed"])}
    raise FileNotFoundError(f"{run_dir}: no config.json or metrics.json naming arch and seed")


def lift_scores(run_dirs: Sequence[str | Path]) -> dict[str, pd.DataFrame]:
    """{run name: its r_scores.csv} for the runs that have one."""
    return {describe(d)["name"]: pd.read_csv(Path(d) / "r_scores.csv", keep_default_na=False,
                                             na_values=["", "nan", "NaN"])
            for d in run_dirs if (Path(d) / "r_scores.csv").is_file()}


def lift_correlation(scores: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Spearman rank correlation of lift between every pair of runs, over the (city, object)
    rows both have with a finite lift (lift is relative to each city's coverage, so rows of
    different cities are comparable); NaN with fewer than 3 such rows."""
    from scipy.stats import spearmanr   # here: scipy.stats takes a second to import

    out = []
    for a, b in combinations(scores, 2):
        m = scores[a].merge(scores[b], on=["city", "object"], suffixes=("_a", "_b"))
        m = m[np.isfinite(m["lift_a"]) & np.isfinite(m["lift_b"])]
        rho = spearmanr(m["lift_a"], m["lift_b"])[0] if len(m) >= 3 else np.nan
        out.append([a, b, float(rho), len(m)])
    return pd.DataFrame(out, columns=["run_a", "run_b", "spearman", "n_objects"])


def fig6_rows(indexes: Sequence[pd.DataFrame], per_city: int, seed: int = 0) -> list[int]:
    """``per_city`` test images per city (seeded) that every run has: cache rows, by city."""
    common = reduce(np.intersect1d, [ix["index"].to_numpy(np.int64) for ix in indexes])
    city = indexes[0].set_index("index").loc[common, "city"].to_numpy()
    rng, out = np.random.default_rng(seed), []
    for c in sorted(set(city)):
        cand = common[city == c]
        out += sorted(rng.choice(cand, min(per_city, len(cand)), replace=False).tolist())
    return [int(r) for r in out]


# ---------------------------------------------------------------- the stage


def run(cfg: CompareConfig, out: str | Path | None, run_dirs: Sequence[str | Path], cache=None, *,
        progress: bool = True) -> CompareResult:
    """AR of every pair of runs, tests, Table 2 and lift correlations, written into ``out``
    (default ``outputs/comparison``); reused if unchanged."""
    run_dirs = [Path(d) for d in run_dirs]
    infos = {i["name"]: i for i in map(describe, run_dirs)}
    if len(infos) != len(run_dirs):
        raise ValueError("two run folders have the same run name")
    if len(run_dirs) < (1 if cfg.randomised else 2):
        raise ValueError(f"{len(run_dirs)} run(s): nothing to compare")
    results = [gradcam.load(d) for d in run_dirs]
    sizes = {int(c.meta["image_size"]) for c in results}
    if len(sizes) != 1:
        raise ValueError(f"the runs' masks were made at different image sizes {sorted(sizes)}")
    if cfg.randomised and cache is None:
        raise ValueError("randomised=True needs the data cache (the test images)")
    S, names = sizes.pop(), list(infos)
    check_one_snapshot(infos, results, cache)
    out = Path(out) if out is not None else paths.outputs() / "comparison"
    entries = [entry(i, c.meta["key"], objects_key(d)) for i, c, d in zip(infos.values(), results, run_dirs)]
    folder = ResultFolder(out, NAME, key(cfg, entries, cache.key if cfg.randomised else ""))
    if folder.done() is not None:
        return dataclasses.replace(load(out), reused=True)

    folder.begin()
    sources = {n: (c.index["index"].to_numpy(np.int64), c.masks) for n, c in zip(names, results)}
    pairs = list(combinations(names, 2))
    if cfg.randomised:
        for n, d in zip(names, run_dirs):
            sources[n + RANDOMISED] = randomised_masks(d, cache, cfg, progress)
            pairs.append((n, n + RANDOMISED))
    per_view, nulls, grids = views_ar(sources, pairs, S, cfg, progress)
    native = {n: tuple(int(v) for v in m.shape[1:]) for n, (_, m) in sources.items()}
    frame = ar_frame(per_view, infos, cfg, nulls, grids, native)
    result = CompareResult(out, frame, all_tests(frame, per_view, nulls, cfg), table2(frame),
                           lift_correlation(lift_scores(run_dirs)), per_view["image"],
                           fig6_rows([c.index for c in results], cfg.fig6_per_city, cfg.seed),
                           per_view=per_view)
    write_csv(out / "ar.csv", result.ar)
    write_json(out / "tests.json", result.tests)
    write_csv(out / "table2.csv", result.table2)
    write_csv(out / "lift_correlation.csv", result.lift_correlation)
    with atomic_path(out / "per_image.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{f"{w}_{k}": v for k, p in enumerate(pairs) for w, v in
                        [("rows", per_view["image"][p][0])] + [(col("ar", view), per_view[view][p][1])
                                                               for view in VIEWS]})
    write_json(out / "meta.json", {"runs": list(infos.values()), "image_size": S,
                                   "fig6_rows": result.fig6_rows, "config": to_dict(cfg),
                                   "key": folder.key})
    folder.commit(["ar.csv", "tests.json", "table2.csv", "lift_correlation.csv", "per_image.npz",
                   "meta.json"])
    return result


def key(cfg: CompareConfig, entries: list, cache_key: str = "") -> str:
    """What a comparison depends on: the settings, each run's ``entry``, the cache (only for the
    randomised reference) and the code."""
    return config_hash(NAME, code_key(__name__), cfg, entries, cache_key)


def entry(info: dict, gradcam_key: str, objects_key: str | None) -> list:
    """A run as a comparison's key sees it: name, arch, seed, its masks' and its scores' keys."""
    return [info["name"], info["arch"], int(info["seed"]), gradcam_key, objects_key]


def objects_key(run_dir: str | Path) -> str | None:
    """The key of a run's finished objects stage (its lift scores), or None."""
    marker = ResultFolder(run_dir, "objects").finished()
    return None if marker is None else marker["key"]


def check_one_snapshot(infos: Mapping[str, dict], results: Sequence, cache=None) -> None:
    """StaleError unless every run's model was trained on the same data snapshot (and, when
    given, the cache is that snapshot's)."""
    keys = {n: c.meta.get("data_key") for n, c in zip(infos, results)}
    if cache is not None:
        keys["the data stage's current snapshot"] = str(cache.key)
    if len(set(keys.values())) > 1:
        listed = ", ".join(f"{n}: {k}" for n, k in keys.items())
        raise StaleError(f"the runs were trained on different data snapshots ({listed}); retrain "
                         "them on one (`citylib run`) before comparing them")


def load(out_dir: str | Path) -> CompareResult:
    """A finished comparison folder."""
    out = Path(out_dir)
    if not (out / "meta.json").is_file():
        raise FileNotFoundError(f"{out}: no finished comparison (run compare.run first)")
    frame = pd.read_csv(out / "ar.csv", dtype={"run_a": str, "run_b": str})
    pairs = list(zip(frame["run_a"], frame["run_b"]))
    with np.load(out / "per_image.npz") as z:
        per_view = {view: {p: (z[f"rows_{k}"], z[f"{col('ar', view)}_{k}"]) for k, p in enumerate(pairs)}
                    for view in VIEWS if f"{col('ar', view)}_0" in z}
    return CompareResult(out, frame, read_json(out / "tests.json"),
                         pd.read_csv(out / "table2.csv"),
                         pd.read_csv(out / "lift_correlation.csv", dtype={"run_a": str, "run_b": str}),
                         per_view["image"], read_json(out / "meta.json")["fig6_rows"], per_view=per_view)
