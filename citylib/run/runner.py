"""The batch runner: papermill over the ordered notebooks for every parameter file.

Reads ``parameters/*.yaml`` (or the files given), validates all of them before any work, then
executes the stage table's notebooks (``table.notebooks``): the data notebook once, the per-run
notebooks once per parameter file, and the grid notebook once over all runs. Each run's
training (notebook 02) takes as many cores as its ``train.threads`` (which the weights depend
on), its later notebooks ``cores / jobs``; runs go side by side, each in a worker process, as
long as the cores they take are free (``schedule``). Writes every executed notebook under
``outputs/`` (``data/``, ``runs/<run>/``, ``comparison/``), a result marker per finished
notebook (``notebooks.execute``), and ``outputs/runs/summary.csv`` (``summary``). A notebook is
keyed by its own source and the keys of the stages it runs and of their figures
(``pipeline.notebook_keys``, from the stage table), so a changed threshold reruns the objects and
comparison notebooks and nothing before them, and a changed source folder ("source changed:
...") reruns everything that read the data. A notebook whose key matches is skipped; a failing
run is reported at the end and the others go on.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from citylib.core import artifacts, paths
from citylib.data import dataset
from citylib.data.inventory import DatasetError
from citylib.run import processes, table
from citylib.run.notebooks import Job, Progress, RunnerResult, execute, is_done
from citylib.run.params import RunConfig, discover, load_all
from citylib.run.schedule import schedule
from citylib.run.summary import write_summary

# The suite's notebooks, in order (the stage table's): data, once per grid; run, once per
# parameter file; grid, once over all runs.
DATA_NOTEBOOKS, RUN_NOTEBOOKS, GRID_NOTEBOOKS = (table.notebooks(s) for s in ("data", "run", "grid"))


def run(
    params: str | Path | None = None,
    only: list[str] | None = None,
    force: bool = False,
    outputs: str | Path | None = None,
    notebooks: Path | None = None,
    jobs: int | None = None,
) -> RunnerResult:
    """Execute the grid; see the module docstring. ``only`` selects runs by name; ``jobs``:
    runs analysed side by side, ``cores / jobs`` cores each (default: one per core)."""
    cores = os.cpu_count() or 1
    jobs = cores if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    out = paths.outputs(outputs)
    nb_dir = notebooks or paths.NOTEBOOKS
    files = discover(params)
    configs = load_all(files)  # every file is validated before any work, and the dataset
    if found := dataset.problems(configs[0].data):
        raise DatasetError("the dataset cannot be used as it is:\n  " + "\n  ".join(found))
    by_name = {c.name: (c, f) for c, f in zip(configs, files)}
    everything = dict(by_name)
    if only:
        unknown = sorted(set(only) - set(by_name))
        if unknown:
            raise ValueError(f"--only: no parameter file for run(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
        by_name = {n: v for n, v in by_name.items() if n in only}

    with processes.kernel_env(processes.KERNEL_ENV), processes.lock(out, by_name), processes.terminate_as_interrupt():
        return _run(by_name, everything, Job(out, nb_dir, force), jobs, cores)


def _write_config(path: Path, cfg: RunConfig) -> None:
    """The run's resolved settings, written only when they changed (a finished run's rerun
    writes nothing, and so works on a read-only outputs folder)."""
    content = {"config": cfg.to_dict(), "config_hash": cfg.hash}
    if not artifacts.holds_json(path, content):
        artifacts.write_json(path, content)


def _run(by_name: dict, everything: dict, job: Job, jobs: int, cores: int) -> RunnerResult:
    out, result = job.out, RunnerResult()
    total = len(DATA_NOTEBOOKS) + len(RUN_NOTEBOOKS) * len(by_name) + len(GRID_NOTEBOOKS)
    progress = Progress(result, tqdm(total=total, desc="citylib run", unit="notebook"))
    first_cfg, first_file = next(iter(by_name.values()))
    try:
        with processes.shared(out, "data"):             # made once, also by runners of other runs side by side
            data_ok = _data(job, first_cfg, first_file, progress)
        rejected = out / "data" / "rejected.csv"
        if data_ok and rejected.is_file() and (n := len(pd.read_csv(rejected))):
            tqdm.write(f"{n} file(s) of the dataset rejected, each with its reason: {rejected}")

        runs, keys = {}, {}
        for name, (cfg, _) in everything.items() if data_ok else ():
            try:
                keys[name] = _keys(cfg, out)
            except Exception as e:   # reported for the runs asked for; the others are left out
                if name in by_name:
                    result.failed[name] = f"{type(e).__name__}: {e}"
        for name, (cfg, file) in by_name.items():
            if name not in keys:
                result.failed.setdefault(name, "skipped: the data stage failed")
                progress.never(len(RUN_NOTEBOOKS))
                continue
            _write_config(out / "runs" / name / "config.json", cfg)
            runs[name] = (cfg, file, keys[name])
        finished = schedule(runs, job, cores, max(1, cores // jobs), progress)
        with processes.shared(out, "comparison"):
            # the grid compares every finished run of these files, also those left out by
            # --only: found done once the lock is held, so a runner that waited for another
            # never writes a comparison of fewer runs over the other's
            finished += [n for n in everything if n not in by_name and n in keys
                         and is_done(out / "runs" / n, keys[n], job.notebooks)]
            result.finished[:] = [n for n in everything if n in finished]
            _compare(job, everything, [n for n in everything if n in finished], progress)
    except KeyboardInterrupt:          # the summary says what finished, then the caller says why
        result.interrupted = True
        raise
    finally:
        progress.bar.close()
        result.summary = write_summary(out, [c for c, _ in everything.values()], result)
    return result


def _data(job: Job, cfg: RunConfig, file: Path, progress: Progress) -> bool:
    """The data notebook, unless its marker matches the data stage's key; True if it is done."""
    out, ok = job.out, True
    try:
        from citylib.run import pipeline   # it imports every stage: only once notebooks are to run

        data_key = pipeline.data_key(pipeline.Run(cfg, out))
        changes = dataset.changes(cfg.data, out / "data")
        if changes:
            tqdm.write(f"{out / 'data'}: {changes}: a new data snapshot, and every stage that "
                       "read the old one runs again")
    except Exception as e:   # the data notebook reports it
        data_key = f"unreadable: {type(e).__name__}: {e}"
    for nb in DATA_NOTEBOOKS:
        ok &= execute(job, nb, out / "data", f"data/{nb}", file, data_key, progress)
    return ok


def _compare(job: Job, everything: dict, finished: list[str], progress: Progress) -> None:
    """The grid notebooks over the ``finished`` runs (in parameter-file order)."""
    grid = [str(everything[n][1]) for n in finished]
    for nb in GRID_NOTEBOOKS:
        if not grid:
            progress.result.failed[f"comparison/{nb}"] = "skipped: no run finished"
            progress.never(1)
            continue
        try:
            key = _grid_key([everything[n][0] for n in finished], job.out)
        except Exception as e:   # e.g. runs of different data snapshots: the notebook says so
            key = f"unreadable: {type(e).__name__}: {e}"
        execute(job, nb, job.out / "comparison", f"comparison/{nb}", grid, key, progress)


def _keys(cfg: RunConfig, out: Path) -> dict[str, str]:
    """Each per-run notebook's key (``pipeline.notebook_keys``) on the current data snapshot."""
    from citylib.run import pipeline  # it imports every stage: only once notebooks are to run

    return pipeline.notebook_keys(pipeline.Run(cfg, out))


def _grid_key(configs: list[RunConfig], out: Path) -> str:
    from citylib.run import pipeline

    return pipeline.grid_key([pipeline.Run(c, out) for c in configs])
