"""The stage table: every stage of a job, in the order a job runs it, declared once.

A row names its stage, the notebook that shows it, the parameter-file sections it owns, how its
key is made from the run's settings and the keys of the stages before it, how it is run, where
its result marker lies, what it adds to ``metrics.json`` and to ``runs/summary.csv``, and its
figure function. Everything else is derived from this table: the sections of a parameter file
(``params.RunConfig``), every stage's key and each notebook's (``pipeline.keys``),
``metrics.json`` (``pipeline.write_metrics``), the notebooks ``citylib run`` executes and in
which order (``runner``), the summary's columns (``summary``) and the report's figures.

A row's functions take ``run``: a parameter file's settings and folders (``pipeline.Run``, or
``pipeline.Grid`` for the comparison: ``cfg``, ``dir``, ``data_dir``, ``outputs``). Reads and
writes what its stages do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import pandas as pd

from citylib.core.artifacts import ResultFolder, StaleError, read_json
from citylib.core.config import config_hash
from citylib.data import dataset, segment
from citylib.explain import cues
from citylib.figures import compare_plots, gallery, places_plots, reliance_plots, stats_plots
from citylib.nets import checkpoint, train
from citylib.stages import calibration, causal, compare, embed, gradcam, methods, objects, places, reliance
from citylib.stats import histograms, intervals


@dataclass(frozen=True)
class Stage:
    """One row of the table (see the module docstring)."""

    name: str                                    # the stage, its key and its result marker
    notebook: str                                # the notebook that runs and shows it
    settings: tuple[tuple[str, type], ...] = ()  # (parameter-file section, its settings class)
    scope: Literal["data", "run", "grid"] = "run"   # once per grid before the runs, per run, or over them
    key: Callable[[Any, dict], str | None] | None = None   # (run, earlier keys) -> key; None: not here
    run: Callable[..., Any] | None = None        # (run, progress, **options) -> its result
    marker: Callable[[Any], ResultFolder] | None = None    # (run) -> its result's marker (no key)
    metrics: Callable[[Any], dict] | None = None  # (run) -> what it adds to metrics.json
    summary: Callable[[dict], dict] | None = None  # (metrics.json) -> its summary.csv columns
    figures: Callable[[Any, Any], dict] | None = None   # (run, result) -> {name: PNG path}
    report: tuple[tuple[str, str], ...] = ()     # (figure name, caption) for the report
    across: Callable[[pd.DataFrame], pd.DataFrame] | None = None   # summary columns decided over the grid's runs


# ---------------------------------------------------------------- what the rows share


def load_cache(run):
    """The decoded-image cache of the current data snapshot (StaleError if there is none)."""
    return dataset.load(run.cfg.data, run.data_dir)


def planted_cues(run) -> dict[str, tuple[str, ...]]:
    """City -> planted cue names of the run's generated world; empty for other data."""
    cfg = run.cfg.data
    return cues.planted(cfg.world.world) if cfg.source == "world" else {}


def counterfactuals(run):
    """The current snapshot's counterfactual images (a generated world), else None."""
    return dataset.load_counterfactuals(run.cfg.data, run.data_dir)


def explained(run):
    """The cache, once the run's model is known to be trained on it and its Grad-CAM masks to
    be those of that model and settings (StaleError otherwise)."""
    cache = load_cache(run)
    gradcam.check_cache(run.dir, checkpoint.load_model(run.dir)[2], cache)
    if ResultFolder(run.dir / gradcam.FOLDER, gradcam.NAME, keys(run)["gradcam"]).done() is None:
        raise StaleError(f"{run.dir / gradcam.FOLDER}: no Grad-CAM masks of this training and "
                         "these settings: run Grad-CAM first (notebook 03, or `citylib run`)")
    return cache


def labels_key(run) -> str:
    """The key of the test images' label maps (``segment``)."""
    cache = load_cache(run)
    return segment.key(run.cfg.segment, cache, cache.split_indices("test"))


def _at(summary: dict, *path, default=None):
    """``summary[path[0]][path[1]]...``, or ``default`` where a level is missing or None."""
    for name in path:
        if not isinstance(summary, dict) or summary.get(name) is None:
            return default
        summary = summary[name]
    return summary


# ---------------------------------------------------------------- training


def _train(run, progress: bool = True, force: bool = False, stop_after: int | None = None):
    """Train (or reuse, or resume) the run's network on the current data snapshot (made first
    when there is none yet); ``stop_after``: stop after that epoch. With ``train.processes`` > 1
    and no process group yet, under torchrun (``processes.torchrun``). Only the latest epoch
    checkpoint is kept (all a resume needs; a VGG11 checkpoint with its optimiser state is
    0.4 GB at 64 px and 1.5 GB at 224 px), besides ``best.pt``."""
    from citylib.core import distributed
    from citylib.run import processes

    cfg = run.cfg
    try:
        cache = load_cache(run)
    except StaleError:
        cache = dataset.load_cache(dataset.run(cfg.data, run.data_dir, progress=progress).cache_dir)
    if cfg.train.processes > 1 and distributed.world()[1] == 1:
        return processes.torchrun(run, force, progress, stop_after)
    return train.run(cfg.train, run.dir, cache, arch=cfg.arch, seed=cfg.seed, name=cfg.name,
                     extra_config=cfg.to_dict(), force=force, progress=progress,
                     keep_checkpoints=1, stop_after=stop_after)


def _training_metrics(run) -> dict:
    """``training.json``, but its ``config`` without the run's whole config as it was when it
    trained (``extra``): ``settings``, the run's current config, says what made every part of
    metrics.json, since only parts made with the current settings are in it."""
    metrics = read_json(run.dir / "training.json")
    metrics["config"] = {k: v for k, v in metrics["config"].items() if k != "extra"}
    return {**metrics, "settings": run.cfg.to_dict()}


def _accuracy(m: dict) -> dict:
    accuracy, n_test = m.get("test_accuracy"), m.get("n_test")
    low, high = (intervals.wilson(round(accuracy * n_test), n_test) if accuracy is not None and n_test
                 else (None, None))
    return {"test_accuracy": accuracy, "test_accuracy_low": low, "test_accuracy_high": high,
            "best_epoch": m.get("best_epoch"), "n_test": n_test}


# ---------------------------------------------------------------- the analyses


def _gradcam_metrics(run) -> dict:
    cams = gradcam.load(run.dir)
    return {"gradcam": {n: cams.meta[n] for n in ("method", "layer", "map_size", "n", "config", "key")},
            "gradcam_sanity": cams.sanity.get("cascade"), "deletion": cams.sanity.get("deletion"),
            "sanity_verdict": cams.sanity.get("verdict")}


def _embedding_metrics(run) -> dict:
    summary = read_json(run.dir / embed.FOLDER / f"{run.cfg.embed.tag}.json")
    return {"embedding": {n: v for n, v in summary.items() if n != "figures"}}


def _objects(run, progress: bool = True):
    return objects.run(run.cfg.stats, run.dir, explained(run), planted_cues(run), segment_cfg=run.cfg.segment,
                       segment_dir=run.data_dir / "segment", progress=progress)


def _causal(run, progress: bool = True):
    cf = counterfactuals(run)
    return None if cf is None else causal.run(run.cfg.causal, run.dir, load_cache(run), cf, progress=progress)


def _methods(run, progress: bool = True, reliance=None):
    """``reliance``: the run's causal result, measured or reused here when not given (None on
    other data than a generated world); the methods are scored against it and against reliance
    by removal."""
    causal_result = reliance if reliance is not None else _causal(run, progress)
    cfg = run.cfg
    return methods.run(cfg.methods, run.dir, load_cache(run), planted_cues(run), causal_result, stats_cfg=cfg.stats,
                       segment_cfg=cfg.segment, segment_dir=run.data_dir / "segment",
                       target=cfg.gradcam.target, removal_result=_reliance(run, progress),
                       min_images=cfg.reliance.min_images, progress=progress)


def _reliance(run, progress: bool = True):
    return reliance.run(run.cfg.reliance, run.dir, load_cache(run), segment_cfg=run.cfg.segment,
                        segment_dir=run.data_dir / "segment", progress=progress)


def _places_key(run, k: dict) -> str | None:
    """Where the snapshot has coordinates: from the training's and the reliance's keys and the
    snapshot's places (its manifest's path, lat, lon, date)."""
    manifest = run.data_dir / "manifest.csv"
    if not manifest.is_file() or not places.applies(pd.read_csv(manifest, nrows=0).columns):
        return None
    placed = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    where = placed[[c for c in ("path", "lat", "lon", "date") if c in placed]].to_numpy().tolist()
    return places.key(k["training"], k.get("reliance"), config_hash(k["snapshot"], where),
                      config_hash(run.cfg.data.block_m, run.cfg.reliance.min_images))


def _places(run, progress: bool = True):
    """The places stage, where the snapshot has coordinates (None elsewhere)."""
    key = keys(run).get("places")          # from the current training and reliance, not older ones
    if key is None:
        return None
    return places.run(run.dir, dataset.current(run.cfg.data, run.data_dir).manifest, key,
                      within_m=run.cfg.data.block_m, min_images=run.cfg.reliance.min_images)


def _calibration(run, progress: bool = True):
    cf = counterfactuals(run)
    if cf is None or cf.deleted_index is None or cf.deleted_index.empty:
        return None
    return calibration.run(run.cfg.reliance, run.dir, load_cache(run), cf, progress=progress)


def _calibration_key(run, k: dict) -> str | None:
    cf = counterfactuals(run)
    if cf is None or cf.deleted_index is None or cf.deleted_index.empty:
        return None
    return calibration.key(run.cfg.reliance, k["training"], cf.key)


def _calibration_metrics(run) -> dict:
    table = pd.read_csv(run.dir / "calibration.csv")
    return {"calibration": {"operator": run.cfg.reliance.operator, "table": table.to_dict("records")}}


def _calibration_summary(m: dict) -> dict:
    """The run's operator's calibration, unadjusted, for ``summary.csv``."""
    rows = [r for r in _at(m, "calibration", "table", default=[])
            if r["operator"] == _at(m, "calibration", "operator") and r["measure"] == "effect"]
    row = rows[0] if rows else {}
    return {"calibration_rho": row.get("spearman_rho"), "calibration_rho_low": row.get("rho_ci_low"),
            "calibration_rho_high": row.get("rho_ci_high"), "calibration_mae": row.get("mae")}


def _comparison_key(grid, of_runs: dict) -> str:
    """The comparison's key for ``grid``'s runs, from each run's keys (``of_runs``: name -> keys)."""
    cfg = grid.cfg.compare
    entries = [compare.entry({"name": r.cfg.name, "arch": r.cfg.arch, "seed": r.cfg.seed},
                             of_runs[r.cfg.name]["gradcam"], of_runs[r.cfg.name].get("objects")) for r in grid.runs]
    return compare.key(cfg, entries, load_cache(grid).key if cfg.randomised else "")


def _cue_free_across(frame: pd.DataFrame) -> pd.DataFrame:
    """The cue-free check decided once for the grid's runs (``causal.holm_decision``): each
    run's p-value Holm-adjusted over the runs that have one; "at chance" unless below 0.05."""
    has = frame["cue_free_p"].notna() if "cue_free_p" in frame else pd.Series(False, index=frame.index)
    decided = causal.holm_decision(dict(zip(frame.index[has], frame.loc[has, "cue_free_p"])))
    frame = frame.copy()
    frame["cue_free_p_holm"] = [decided[i]["p_holm"] if i in decided else None for i in frame.index]
    frame["cue_free_at_chance"] = [decided[i]["at_chance"] if i in decided else None for i in frame.index]
    return frame


def _causal_key(run, k: dict) -> str | None:
    cf = counterfactuals(run)
    return None if cf is None else causal.key(run.cfg.causal, k["training"], cf.key)


def _methods_key(run, k: dict) -> str | None:
    cfg = run.cfg
    return methods.key(cfg.methods, cfg.stats, k["training"], labels_key(run), k.get("causal"),
                       cfg.gradcam.target, k["reliance"])


# ---------------------------------------------------------------- the table


STAGES = (
    Stage("data", "01_data.ipynb", (("data", dataset.DataConfig),), scope="data",
          key=lambda run, k: dataset.key(run.cfg.data, run.data_dir),
          run=lambda run, progress=True: dataset.run(run.cfg.data, run.data_dir, progress=progress),
          marker=lambda run: ResultFolder(run.data_dir, dataset.NAME)),
    Stage("training", "02_training.ipynb", (("train", train.TrainConfig),),
          key=lambda run, k: train.key(run.cfg.arch, run.cfg.seed, run.cfg.train, k["snapshot"]),
          run=_train, marker=lambda run: ResultFolder(run.dir, train.NAME),
          metrics=_training_metrics, summary=_accuracy),
    Stage("gradcam", "03_gradcam.ipynb", (("gradcam", gradcam.GradCAMConfig),),
          key=lambda run, k: gradcam.key(run.cfg.gradcam, k["training"]),
          run=lambda run, progress=True: gradcam.run(run.cfg.gradcam, run.dir, load_cache(run), progress=progress),
          marker=lambda run: ResultFolder(run.dir / gradcam.FOLDER, gradcam.NAME), metrics=_gradcam_metrics,
          summary=lambda m: {"sanity_deletion": _at(m, "sanity_verdict", "deletion", "passed"),
                             "sanity_cascade": _at(m, "sanity_verdict", "cascade", "passed")}),
    Stage("embedding", "04_embedding.ipynb", (("embed", embed.EmbedConfig),),
          key=lambda run, k: embed.key(run.cfg.embed, k["gradcam"]),
          run=lambda run, progress=True: embed.run(run.cfg.embed, run.dir, explained(run), progress=progress),
          marker=lambda run: ResultFolder(run.dir / embed.FOLDER, run.cfg.embed.tag), metrics=_embedding_metrics,
          summary=lambda m: {"knn_2d": _at(m, "embedding", "knn_2d", "observed"),
                             "knn_2d_low": _at(m, "embedding", "knn_2d", "ci", default=[None, None])[0],
                             "knn_2d_high": _at(m, "embedding", "knn_2d", "ci", default=[None, None])[1],
                             "knn_2d_shuffled": _at(m, "embedding", "knn_2d", "baseline_mean")},
          figures=gallery.draw, report=(("map_city", "Fig. 3: map of the weighted masks"),
                                        ("gallery", "Fig. 4: the gallery"))),
    Stage("objects", "05_objects.ipynb", (("segment", segment.SegmentConfig), ("stats", histograms.StatsConfig)),
          key=lambda run, k: objects.key(run.cfg.stats, labels_key(run), k["gradcam"], planted_cues(run)),
          run=_objects, marker=lambda run: ResultFolder(run.dir, objects.NAME),
          metrics=lambda run: {"objects": read_json(run.dir / "objects.json")},
          summary=lambda m: {"planted_mrr": _at(m, "objects", "planted_mrr"),
                             "planted_mrr_low": _at(m, "objects", "planted_mrr_ci", default=[None, None])[0],
                             "planted_mrr_high": _at(m, "objects", "planted_mrr_ci", default=[None, None])[1],
                             "planted_mrr_ceiling": _at(m, "objects", "ceiling", "planted_mrr")},
          figures=stats_plots.draw, report=(("r_histograms", "Fig. 5: R per object and city"),
                                            ("lift", "Lift with 95% CIs"))),
    Stage("causal", "05_objects.ipynb", (("causal", causal.CausalConfig),), key=_causal_key, run=_causal,
          marker=lambda run: ResultFolder(run.dir, causal.NAME),
          metrics=lambda run: {"causal": {**read_json(run.dir / "causal.json"),
                                          "effects": pd.read_csv(run.dir / "causal.csv").to_dict("records")}},
          summary=lambda m: {"cue_free_accuracy": _at(m, "causal", "cue_free", "accuracy"),
                             "cue_free_at_chance": None, "cue_free_p": _at(m, "causal", "cue_free", "p"),
                             "cue_free_p_holm": None},
          across=_cue_free_across),
    Stage("reliance", "05_objects.ipynb", (("reliance", reliance.RelianceConfig),),
          key=lambda run, k: reliance.key(run.cfg.reliance, k["training"], labels_key(run)),
          run=_reliance, marker=lambda run: ResultFolder(run.dir, reliance.NAME),
          metrics=lambda run: {"reliance": read_json(run.dir / "reliance.json")},
          figures=reliance_plots.draw,
          report=(("reliance", "What the network relies on: each object removed, against the same shape filled "
                               "elsewhere"), ("removal_examples", "What removal means: original, object removed, null"))),
    Stage("places", "05_objects.ipynb", key=_places_key, run=_places,
          marker=lambda run: ResultFolder(run.dir, places.NAME), figures=places_plots.draw,
          metrics=lambda run: ({"places": {"images": len(pd.read_csv(run.dir / "places.csv"))}}
                               if (run.dir / "places.csv").is_file() else {}),
          report=(("places", "Where each city looks like itself: typicality of the test images on the city's plan, "
                             "the images behind it, and the object each image relies on most"),
                  ("places_objects", "Where each city's strongest objects matter: the change in log p(true city) "
                                     "when the object is removed from each test image"))),
    Stage("calibration", "05_objects.ipynb", key=_calibration_key, run=_calibration,
          marker=lambda run: ResultFolder(run.dir, calibration.NAME), metrics=_calibration_metrics,
          summary=_calibration_summary, figures=reliance_plots.draw_calibration,
          report=(("calibration", "Removal against true deletion on the generated world, per (city, object)"),)),
    Stage("methods", "05_objects.ipynb", (("methods", methods.MethodsConfig),), key=_methods_key, run=_methods,
          marker=lambda run: ResultFolder(run.dir, methods.NAME),
          metrics=lambda run: {name: read_json(run.dir / f"{name}.json") for name in ("methods", "methods_removal")
                               if (run.dir / f"{name}.json").is_file()}),
    Stage("comparison", "06_comparison.ipynb", (("compare", compare.CompareConfig),), scope="grid",
          key=_comparison_key, run=lambda grid, progress=True: compare.run(grid.cfg.compare, grid.dir, [r.dir for r in grid.runs],
                                                      load_cache(grid), progress=progress),
          marker=lambda grid: ResultFolder(grid.dir, compare.NAME), figures=compare_plots.draw,
          report=(("ar_heatmap", "AR of every pair, at image resolution and on the pair's coarser map"),
                  ("fig6", "Fig. 6: the same images, every network: its mask over the image, then its explanation"),
                  ("lift_comparison", "Lift across runs"))),
)
BY_NAME = {s.name: s for s in STAGES}


def notebooks(scope: str) -> tuple[str, ...]:
    """The notebooks of the stages of ``scope``, in table order, each once."""
    return tuple(dict.fromkeys(s.notebook for s in STAGES if s.scope == scope))


def of_notebook(notebook: str) -> tuple[Stage, ...]:
    """The stages a notebook runs, in table order."""
    return tuple(s for s in STAGES if s.notebook == notebook)


def sections(*scopes: str) -> tuple[tuple[str, type], ...]:
    """The parameter-file sections the stages of ``scopes`` (default: all) own, in table order."""
    return tuple(s for stage in STAGES if not scopes or stage.scope in scopes for s in stage.settings)


def report_figures(scope: str) -> tuple[tuple[str, str], ...]:
    """(figure name, caption) of every stage of ``scope`` that shows figures in the report."""
    return tuple(f for s in STAGES if s.scope == scope for f in s.report)


def keys(run) -> dict[str, str]:
    """Each stage's key for this run now, on the current data snapshot (``snapshot``: its key),
    in table order: what its result must have been made from to be reused. A stage whose key is
    None does not apply to this run (the causal effects on other data than a generated world).
    The stage computes the same key from the inputs it reads when it runs."""
    k = {"snapshot": load_cache(run).key}
    for stage in STAGES:
        if stage.scope == "run" and (key := stage.key(run, k)) is not None:
            k[stage.name] = key
    return k
