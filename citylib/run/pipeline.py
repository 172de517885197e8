"""One run's stages, chained as the notebooks call them.

``open_run`` reads a parameter file into a ``Run`` (its resolved settings and folders); each
``run_*`` function runs one stage for that run and returns the stage's result, reusing a
finished result whose key is the same (``keys``: every stage's key, from its settings, its
inputs' keys and its code). Only the data stage makes a data snapshot; every later stage reads
the current one and never rebuilds it behind the user's back. ``write_metrics`` assembles the
run's ``metrics.json`` from the stages' current results, in this one place. The notebooks, the
batch runner and the tests all call these, so the chain is written once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from citylib.core import artifacts, distributed, paths
from citylib.data import dataset, segment
from citylib.explain import cues
from citylib.figures import compare_plots, plots
from citylib.nets import checkpoint, train
from citylib.stages import causal, compare, embed, gradcam, methods, objects
from citylib.core.artifacts import ResultFolder, StaleError
from citylib.stages.objects import ObjectsResult  # noqa: F401 (the objects stage's result, as before)
from citylib.run.params import RunConfig, discover, load, load_all


@dataclass(frozen=True)
class Run:
    """A parameter file's resolved settings and the folders its results go to."""

    cfg: RunConfig
    outputs: Path
    params_file: Path | None = None   # the file it was read from (a torchrun training reads it again)

    @property
    def dir(self) -> Path:
        """``outputs/runs/<name>/``: everything this run makes."""
        return self.outputs / "runs" / self.cfg.name

    @property
    def data_dir(self) -> Path:
        """``outputs/data/``: the data stage, shared by the runs of a grid."""
        return self.outputs / "data"


def open_run(params_file: str | Path, outputs: str | Path | None = None) -> Run:
    """Validate a parameter file and locate its outputs (``outputs`` overrides the default)."""
    return Run(load(params_file), paths.outputs(outputs), Path(params_file).resolve())


def run_data(run: Run, progress: bool = True) -> dataset.DataResult:
    """The data stage: check, split and cache the dataset (``outputs/data/``): a new snapshot
    when the settings, the source's files or the code changed, else the current one."""
    return dataset.run(run.cfg.data, run.data_dir, progress=progress)


def load_cache(run: Run):
    """The decoded-image cache of the current data snapshot (StaleError if there is none)."""
    return dataset.load(run.cfg.data, run.data_dir)


def run_training(run: Run, force: bool = False, progress: bool = True,
                 stop_after: int | None = None) -> train.TrainResult:
    """Train (or reuse, or resume) the run's network on the current data snapshot (made first
    when there is none yet); ``stop_after``: stop after that epoch. Under torchrun (``citylib
    train``) every process trains and the first writes the metrics.

    Only the latest epoch checkpoint is kept (it is all a resume needs; a VGG11 checkpoint with
    its optimiser state is 0.4 GB at 64 px and 1.5 GB at 224 px), besides ``best.pt``.
    """
    cfg = run.cfg
    try:
        cache = load_cache(run)
    except StaleError:
        cache = dataset.load_cache(run_data(run, progress).cache_dir)
    if cfg.train.processes > 1 and distributed.world()[1] == 1:
        return _torchrun(run, force, progress, stop_after)
    result = train.run(cfg.train, run.dir, cache, arch=cfg.arch, seed=cfg.seed, name=cfg.name,
                       extra_config=cfg.to_dict(), force=force, progress=progress,
                       keep_checkpoints=1, stop_after=stop_after)
    if distributed.main():
        write_metrics(run)
    return result


def _torchrun(run: Run, force: bool, progress: bool, stop_after: int | None) -> train.TrainResult:
    """``citylib train`` for this run under ``torchrun --nproc_per_node train.processes`` (its
    output printed line by line as it comes), then the result its processes wrote."""
    import os
    import subprocess
    import sys

    if run.params_file is None:
        raise ValueError(f"{run.cfg.name}: train.processes > 1 needs the run's parameter file (open_run)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={run.cfg.train.processes}", "-m", "citylib", "train",
           "--params", str(run.params_file), "--outputs", str(run.outputs)]
    cmd += ["--force"] * force + ["--quiet"] * (not progress)
    cmd += ["--stop-after", str(stop_after)] if stop_after is not None else []
    print(f"{run.cfg.name}: training with {run.cfg.train.processes} processes (torchrun, DDP)", flush=True)
    env = {**os.environ, "TQDM_DISABLE": "1"}   # each epoch's line, not every redraw of its bar
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        try:
            for line in proc.stdout:
                print(line, end="", flush=True)
        except BaseException:                    # interrupted here: torchrun stops its workers too
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if proc.returncode != 0:
        raise RuntimeError(f"{run.cfg.name}: the torchrun training failed (exit status {proc.returncode}); "
                           "its output is above")
    history = pd.read_csv(run.dir / "history.csv")
    marker = ResultFolder(run.dir, train.NAME, "").finished()
    if marker is None:                                   # stopped after ``stop_after``, as asked
        return train.TrainResult(run.dir, {}, "", history, {}, False, False, 0)
    write_metrics(run)
    return train.TrainResult(run.dir, marker["config"], marker["key"], history,
                             artifacts.read_json(run.dir / "training.json"), True, False, 0)


def run_gradcam(run: Run, progress: bool = True) -> gradcam.GradCAMResult:
    """Grad-CAM masks of every test image, with the sanity and deletion checks."""
    result = gradcam.run(run.cfg.gradcam, run.dir, load_cache(run), progress=progress)
    write_metrics(run)
    return result


def run_objects(run: Run, progress: bool = True) -> ObjectsResult:
    """Label every test image (once per dataset), then R, coverage and lift per city and object
    (``citylib.objects``)."""
    cache = _explained(run)
    result = objects.run(run.cfg.stats, run.dir, cache, planted_cues(run), segment_cfg=run.cfg.segment,
                         segment_dir=run.data_dir / "segment", progress=progress)
    write_metrics(run)
    return result


def run_causal(run: Run, progress: bool = True) -> causal.CausalResult | None:
    """How much the network relies on each planted cue: its decisions on the counterfactual
    test images of a generated world (``citylib.causal``); None for other data."""
    cf = dataset.load_counterfactuals(run.cfg.data, run.data_dir)
    if cf is None:
        return None
    result = causal.run(run.cfg.causal, run.dir, load_cache(run), cf, progress=progress)
    write_metrics(run)
    return result


def run_methods(run: Run, reliance: causal.CausalResult | None = None,
                progress: bool = True) -> methods.MethodsResult | None:
    """Every CAM method at every layer of the sweep, scored by planted-cue recovery and by
    agreement with the causal ranking (``citylib.methods``; ``reliance``: the run's
    ``run_causal`` result, measured or reused here when not given); None for other data."""
    if reliance is None and (reliance := run_causal(run, progress)) is None:
        return None
    cfg = run.cfg
    result = methods.run(cfg.methods, run.dir, load_cache(run), planted_cues(run), reliance,
                         stats_cfg=cfg.stats, segment_cfg=cfg.segment, segment_dir=run.data_dir / "segment",
                         target=cfg.gradcam.target, progress=progress)
    write_metrics(run)
    return result


def planted_cues(run: Run) -> dict[str, tuple[str, ...]]:
    """City -> planted cue names of the run's generated world; empty for other data."""
    cfg = run.cfg.data
    return cues.planted(cfg.world.world) if cfg.source == "world" else {}


def run_embedding(run: Run, progress: bool = True) -> embed.EmbedResult:
    """PCA -> t-SNE/UMAP map of the run's masks, its figures and galleries, kNN agreement."""
    cache = _explained(run)
    result = embed.run(run.cfg.embed, run.dir, cache, progress=progress)
    write_metrics(run)
    return result


def _explained(run: Run):
    """The cache, once the run's model is known to be trained on it and its Grad-CAM masks to
    be those of that model and settings (StaleError otherwise)."""
    cache = load_cache(run)
    gradcam.check_cache(run.dir, checkpoint.load_model(run.dir)[2], cache)
    if ResultFolder(run.dir / gradcam.FOLDER, gradcam.NAME, keys(run)["gradcam"]).done() is None:
        raise StaleError(f"{run.dir / gradcam.FOLDER}: no Grad-CAM masks of this training and "
                         "these settings: run Grad-CAM first (notebook 03, or `citylib run`)")
    return cache


def keys(run: Run) -> dict[str, str]:
    """Each stage's key for this run now, on the current data snapshot: what its result must
    have been made from to be reused (the stages compute the same keys from their inputs)."""
    cfg, cache = run.cfg, load_cache(run)
    k = {"data": cache.key}
    k["training"] = train.key(cfg.arch, cfg.seed, cfg.train, cache.key)
    k["gradcam"] = gradcam.key(cfg.gradcam, k["training"])
    k["embedding"] = embed.key(cfg.embed, k["gradcam"])
    labels = segment.key(cfg.segment, cache, cache.split_indices("test"))
    k["objects"] = objects.key(cfg.stats, labels, k["gradcam"], planted_cues(run))
    cf = dataset.load_counterfactuals(cfg.data, run.data_dir)
    if cf is not None:
        k["causal"] = causal.key(cfg.causal, k["training"], cf.key)
        k["methods"] = methods.key(cfg.methods, cfg.stats, k["training"], labels, k["causal"], cfg.gradcam.target)
    return k


def write_metrics(run: Run) -> dict:
    """Assemble ``metrics.json`` from the stages' results that are current (made with this
    run's keys): training's test metrics at the top, then "gradcam", "gradcam_sanity",
    "deletion", "sanity_verdict", "embedding" and "objects". The one place that writes the file."""
    d, k, cfg = run.dir, keys(run), run.cfg

    def current(folder: Path, name: str, stage: str) -> bool:
        return ResultFolder(folder, name, k[stage]).done() is not None

    out = {}
    if current(d, train.NAME, "training"):
        out.update(artifacts.read_json(d / "training.json"))
    if current(d / gradcam.FOLDER, gradcam.NAME, "gradcam"):
        cams = gradcam.load(d)
        out["gradcam"] = {n: cams.meta[n] for n in ("method", "layer", "map_size", "n", "config", "key")}
        out["gradcam_sanity"] = cams.sanity.get("cascade")
        out["deletion"] = cams.sanity.get("deletion")
        out["sanity_verdict"] = cams.sanity.get("verdict")
    if current(d / embed.FOLDER, cfg.embed.tag, "embedding"):
        summary = artifacts.read_json(d / embed.FOLDER / f"{cfg.embed.tag}.json")
        out["embedding"] = {n: v for n, v in summary.items() if n != "figures"}
    if current(d, objects.NAME, "objects"):
        out["objects"] = artifacts.read_json(d / "objects.json")
    if "causal" in k and current(d, causal.NAME, "causal"):
        out["causal"] = {**artifacts.read_json(d / "causal.json"),
                         "effects": pd.read_csv(d / "causal.csv").to_dict("records")}
    if "methods" in k and current(d, methods.NAME, "methods"):
        out["methods"] = artifacts.read_json(d / "methods.json")
    artifacts.write_json(d / "metrics.json", out)
    return out


@dataclass(frozen=True)
class Grid:
    """The runs a comparison reads: those of the parameter files whose masks exist."""

    runs: list[Run]          # finished runs (Grad-CAM masks on disk), in file order
    missing: list[str]       # named runs without masks yet (left out, listed)

    @property
    def dir(self) -> Path:
        """``outputs/comparison/``."""
        return self.runs[0].outputs / "comparison"


def open_grid(params: str | Path | list, outputs: str | Path | None = None) -> Grid:
    """Parameter files (a file, a folder, or a list of files) -> the grid of finished runs.

    All files are validated together (they must share the data and compare sections); runs
    whose Grad-CAM stage has not finished are listed in ``missing``, not compared.
    """
    files = [paths.resolve(f) for f in params] if isinstance(params, (list, tuple)) else discover(params)
    out = paths.outputs(outputs)
    runs = [Run(cfg, out) for cfg in load_all(files)]
    done = [r for r in runs if (r.dir / gradcam.FOLDER / "meta.json").is_file()]   # any masks
    if not done:
        raise FileNotFoundError(f"none of the {len(runs)} run(s) has Grad-CAM masks under "
                                f"{out / 'runs'}: run notebooks 02-03 (or `citylib run`) first")
    return Grid(done, [r.cfg.name for r in runs if r not in done])


def run_comparison(grid: Grid, progress: bool = True) -> compare.CompareResult:
    """AR of every pair of runs (and against re-initialised models), tests and Table 2."""
    first, dirs = grid.runs[0], [r.dir for r in grid.runs]
    cache = load_cache(first)   # the runs must all have been trained on this snapshot
    result = compare.run(first.cfg.compare, grid.dir, dirs, cache, progress=progress)
    scores = compare.lift_scores(dirs)
    figures = {"ar_heatmap": lambda: compare_plots.plot_ar_heatmap(result.ar),
               "fig6": lambda: compare_plots.plot_fig6(cache, dirs, result.fig6_rows),
               "lift_comparison": (lambda: compare_plots.plot_lift_comparison(scores)) if scores else None}
    saved = {}
    for name, draw in figures.items():       # for the notebook and the report
        if draw is not None:
            fig = draw()
            saved[name] = plots.save(fig, grid.dir / f"{name}.png")
            plt.close(fig)
    return dataclasses.replace(result, figures=saved)


def grid_key(runs: list[Run]) -> str:
    """The comparison's key for these runs now (as ``compare.run`` computes it from the runs)."""
    cfg, cache = runs[0].cfg.compare, load_cache(runs[0])
    entries = []
    for r in runs:
        k = keys(r)
        entries.append(compare.entry({"name": r.cfg.name, "arch": r.cfg.arch, "seed": r.cfg.seed},
                                     k["gradcam"], k["objects"]))
    return compare.key(cfg, entries, cache.key if cfg.randomised else "")


def metrics(run: Run) -> dict:
    """The run's ``metrics.json`` (``write_metrics`` assembles it after every stage)."""
    return artifacts.read_json(run.dir / "metrics.json")
