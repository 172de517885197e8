"""One run's stages, chained as the stage table (``citylib.run.table``) declares them.

``open_run`` reads a parameter file into a ``Run`` (its resolved settings and folders);
``result(run, name)`` runs the stage ``name`` for it, or reuses a finished result whose key is
the same (``keys``: every stage's key, from its settings, its inputs' keys and its code), draws
its figures (their own result, keyed by the stage's key and the figure code) and rewrites the
run's ``metrics.json`` (``write_metrics``: each stage's part, from its current result). Only the
data stage makes a data snapshot; every later stage reads the current one and never rebuilds it
behind the user's back. ``open_grid`` and ``result(grid, "comparison")`` do the same for the
runs of a grid. The notebooks, the batch runner, ``citylib train`` and the tests all call these,
so the chain is written once.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from citylib.core import artifacts, distributed, paths
from citylib.core.artifacts import ResultFolder, StaleError, code_key
from citylib.core.config import config_hash
from citylib.run.params import RunConfig, discover, load, load_all
from citylib.run.table import BY_NAME, STAGES, Stage, keys, load_cache, of_notebook, planted_cues

__all__ = ["Run", "Grid", "open_run", "open_grid", "result", "keys", "notebook_keys", "grid_key",
           "write_metrics", "metrics", "load_cache", "planted_cues", "StaleError"]


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


@dataclass(frozen=True)
class Grid:
    """The runs a comparison reads: those of the parameter files whose masks exist."""

    runs: list[Run]          # finished runs (Grad-CAM masks on disk), in file order
    missing: list[str]       # named runs without masks yet (left out, listed)

    @property
    def dir(self) -> Path:
        """``outputs/comparison/``."""
        return self.runs[0].outputs / "comparison"

    @property
    def cfg(self) -> RunConfig:
        """The first run's settings: the grid-wide sections (data, compare) are every run's."""
        return self.runs[0].cfg

    @property
    def data_dir(self) -> Path:
        return self.runs[0].data_dir


def open_grid(params: str | Path | list, outputs: str | Path | None = None) -> Grid:
    """Parameter files (a file, a folder, or a list of files) -> the grid of finished runs.

    All files are validated together (they must share the data and compare sections); runs
    whose Grad-CAM stage has not finished are listed in ``missing``, not compared.
    """
    files = [paths.resolve(f) for f in params] if isinstance(params, (list, tuple)) else discover(params)
    out = paths.outputs(outputs)
    runs = [Run(cfg, out) for cfg in load_all(files)]
    done = [r for r in runs if (r.dir / "gradcam" / "meta.json").is_file()]   # any masks
    if not done:
        raise FileNotFoundError(f"none of the {len(runs)} run(s) has Grad-CAM masks under "
                                f"{out / 'runs'}: run notebooks 02-03 (or `citylib run`) first")
    return Grid(done, [r.cfg.name for r in runs if r not in done])


def result(run: Run | Grid, name: str, progress: bool = True, **options) -> Any:
    """Stage ``name``'s result for ``run`` (a ``Grid`` for the comparison): computed, or reused
    when its key matches; its figures drawn (or reused) into ``result.figures`` where it has any;
    then ``metrics.json`` rewritten. None where the stage does not apply (``causal`` and
    ``methods`` on other data than a generated world). ``options`` go to the stage's run."""
    stage = BY_NAME[name]
    out = stage.run(run, progress, **options)
    if out is None or not getattr(out, "finished", True):       # stopped early, as asked
        return out
    if stage.figures is not None:
        out = _with_figures(stage, run, out)
    if stage.scope == "run" and distributed.main():
        write_metrics(run)
    return out


def _with_figures(stage: Stage, run, out):
    """``out`` with its stage's figures (drawn unless those of this result and this figure code
    are there: a marker ``.results/<stage>_figures.json`` in the run's or grid's folder)."""
    marker = ResultFolder(run.dir, f"{stage.name}_figures", figure_key(stage, stage.marker(run).finished()["key"]))
    done = marker.done()
    if done is not None:
        figures = {n: run.dir / f for n, f in done["figures"].items()}
    else:
        marker.begin()
        figures = stage.figures(run, out)
        marker.commit(figures.values(), figures={n: str(Path(p).relative_to(run.dir)) for n, p in figures.items()})
    return replace(out, figures=figures) if hasattr(out, "figures") else out


def figure_key(stage: Stage, stage_key: str) -> str:
    """What a stage's figures depend on: the stage's result (its key) and the figure code."""
    return config_hash(f"{stage.name}_figures", stage_key, code_key(stage.figures.__module__))


def notebook_keys(run: Run) -> dict[str, str]:
    """Each per-run notebook's key: the keys of the stages it runs and of their figures."""
    k = keys(run)
    out = {}
    for nb in dict.fromkeys(s.notebook for s in STAGES if s.scope == "run"):
        parts = [k[s.name] for s in of_notebook(nb) if s.name in k]
        parts += [figure_key(s, k[s.name]) for s in of_notebook(nb) if s.name in k and s.figures]
        out[nb] = config_hash(*parts)
    return out


def grid_key(runs: list[Run]) -> str:
    """The comparison's key for these runs now (as ``compare.run`` computes it from the runs),
    with its figures'."""
    grid, stage = Grid(runs, []), BY_NAME["comparison"]
    k = stage.key(grid, {r.cfg.name: keys(r) for r in runs})
    return config_hash(k, figure_key(stage, k))


def data_key(run: Run) -> str:
    """The data stage's key now (its settings, the source's files, its code)."""
    return BY_NAME["data"].key(run, {})


def write_metrics(run: Run) -> dict:
    """Assemble ``metrics.json`` from the stages' results that are current (made with this
    run's keys), each stage's part in table order. The one place that writes the file."""
    k, out = keys(run), {}
    for stage in STAGES:
        if stage.scope == "run" and stage.metrics is not None and stage.name in k:
            marker = stage.marker(run)
            if ResultFolder(marker.folder, marker.name, k[stage.name]).done() is not None:
                out.update(stage.metrics(run))
    artifacts.write_json(run.dir / "metrics.json", out)
    return out


def metrics(run: Run) -> dict:
    """The run's ``metrics.json`` (``write_metrics`` assembles it after every stage)."""
    return artifacts.read_json(run.dir / "metrics.json")
