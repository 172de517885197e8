"""Executing the suite's notebooks with papermill, each only when its result is not there yet.

A notebook executed into a folder leaves a result marker (``.results/<notebook>.json``, an
``artifacts.ResultFolder``) keyed by the key of the stages it runs (``pipeline.notebook_keys``)
and its own source: ``execute`` skips a notebook whose marker matches, else runs it into a
hidden partial copy and renames it into place (a failed one is kept as ``<notebook>.failed.ipynb``).
``RunnerResult`` and ``Progress`` keep what happened. Writes the executed notebooks and markers.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from citylib.core.artifacts import ResultFolder
from citylib.core.config import config_hash
from citylib.run import table

@dataclass
class RunnerResult:
    """What happened: executed, skipped and failed notebooks (``run/notebook``: error)."""

    executed: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)   # wall time of each executed notebook
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)         # runs with a notebook begun
    finished: list[str] = field(default_factory=list)        # runs with every notebook done
    interrupted: bool = False                                # stopped by Ctrl-C (or SIGTERM)
    summary: pd.DataFrame | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class Job:
    """What every notebook of one ``citylib run`` shares."""

    out: Path            # the outputs folder
    notebooks: Path      # the folder of the suite's notebooks
    force: bool          # execute even the notebooks whose key matches


class Progress:
    """What has happened so far (a ``RunnerResult``) and the progress bar that shows it: the
    scheduling code says what happened, this keeps the counts."""

    def __init__(self, result: RunnerResult, bar):
        self.result, self.bar = result, bar

    def begin(self, label: str) -> None:
        self.bar.set_postfix_str(label)

    def skipped(self, label: str) -> None:
        self.result.skipped.append(label)
        self.bar.update(1)

    def executed(self, label: str, seconds: float) -> None:
        self.result.executed.append(label)
        self.result.seconds[label] = seconds
        self.bar.update(1)

    def failed(self, label: str, reason: str, line: str) -> None:
        """``reason`` goes to the summary, ``line`` to the console."""
        self.result.failed[label] = reason
        tqdm.write(f"FAILED {label}: {line}")
        self.bar.update(1)

    def never(self, notebooks: int) -> None:
        """Notebooks that will not run: something they need failed."""
        self.bar.update(notebooks)

    def merge(self, part: RunnerResult, label: str, notebooks: int) -> None:
        """A worker's ``part`` of the result, for its task ``label`` of ``notebooks`` notebooks."""
        self.result.executed += part.executed
        self.result.seconds.update(part.seconds)
        self.result.skipped += part.skipped
        self.result.failed.update(part.failed)
        self.bar.set_postfix_str(f"{label} done")
        self.bar.update(notebooks)


def in_order(job: Job, names: tuple[str, ...], name: str, file: Path, keys: dict[str, str],
               progress: Progress) -> bool:
    """``names`` of one run in order; True if all are done (a failure skips the rest)."""
    progress.result.started.append(name)
    for i, nb in enumerate(names):
        if not execute(job, nb, job.out / "runs" / name, f"{name}/{nb}", file, keys[nb], progress):
            progress.never(len(names) - i - 1)   # later notebooks need the earlier ones
            return False
    return True


def is_done(run_dir: Path, keys: dict[str, str], nb_dir: Path) -> bool:
    """Every per-run notebook of ``run_dir`` finished with these keys and notebook source."""
    return all(notebook_marker(nb_dir / nb, run_dir, keys[nb]).done() is not None for nb in table.notebooks("run"))


def notebook_marker(notebook: Path, out_dir: Path, key: str) -> ResultFolder:
    """The result marker of a notebook executed into ``out_dir``: keyed by the stage's key and
    the notebook's own source."""
    source = hashlib.sha256(notebook.read_bytes()).hexdigest()[:12]
    return ResultFolder(out_dir, notebook.stem, config_hash(key, source))


def execute(job: Job, name: str, out_dir: Path, label: str, params_file: Path | list[str], key: str,
            progress: Progress) -> bool:
    """Run the notebook ``name`` with papermill unless its marker matches; True if it is done."""
    import papermill as pm  # heavy import, only when notebooks run

    notebook = job.notebooks / name
    marker = notebook_marker(notebook, out_dir, key)
    target = out_dir / notebook.name
    if not job.force and marker.done() is not None:
        with contextlib.suppress(OSError):   # an earlier failure's copy, now outdated
            (out_dir / f"{notebook.stem}.failed.ipynb").unlink(missing_ok=True)
        progress.skipped(label)
        return True
    marker.begin()
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{notebook.stem}.partial.ipynb"
    progress.begin(label)
    parameters = {"params_file": params_file if isinstance(params_file, list) else str(params_file),
                  "outputs": str(job.out)}
    if "force" in pm.inspect_notebook(str(notebook)):     # the training notebook's: retrain
        parameters["force"] = job.force
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(notebook), str(partial), parameters=parameters, kernel_name="python3",
                            progress_bar=False, cwd=str(notebook.parent))
    except Exception as e:  # papermill wraps the cell's exception; keep going with other runs
        failed = out_dir / f"{notebook.stem}.failed.ipynb"
        if partial.exists():
            os.replace(partial, failed)
        progress.failed(label, f"{type(e).__name__}: {_last_line(e)} (see {failed})", _last_line(e))
        return False
    os.replace(partial, target)
    (out_dir / f"{notebook.stem}.failed.ipynb").unlink(missing_ok=True)
    seconds = round(time.perf_counter() - t0, 1)
    marker.commit([notebook.name], seconds=seconds)
    progress.executed(label, seconds)
    return True


def _last_line(e: Exception) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
