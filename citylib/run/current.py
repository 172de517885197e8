"""Which results are current, for what a person reads: the runs of the last ``citylib run``'s grid
(``runs/summary.csv``) whose training read the current data snapshot, and the comparison only
when it was made of such runs. Everything else in the outputs folder is left out of the report
and listed, one line each, with the reason.

Reads ``runs/summary.csv``, ``data/snapshot.json``, each run's ``training.json`` and
``comparison/meta.json``; writes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from citylib.core.artifacts import read_json
from citylib.data import dataset


@dataclass(frozen=True)
class Current:
    runs: list[Path]                                  # run folders to show, in the grid's order
    left_out: list[str] = field(default_factory=list)  # "<run> — why" for every result not shown
    comparison: bool = False                          # whether outputs/comparison is of shown runs


def current(out: Path) -> Current:
    """The current results of the outputs folder ``out`` (see the module docstring)."""
    folders = {p.name: p for p in sorted((out / "runs").glob("*/")) if (p / "metrics.json").is_file()}
    summary = out / "runs" / "summary.csv"
    grid = list(pd.read_csv(summary, dtype={"run": str})["run"]) if summary.is_file() else list(folders)
    snapshot = (dataset.read_snapshot(out / "data") or {}).get("key")
    shown, left_out = [], []
    for name in [n for n in grid if n in folders] + sorted(set(folders) - set(grid)):
        why = _why_not(folders[name], name in grid, snapshot)
        if why:
            left_out.append(f"{name} — {why}")
        else:
            shown.append(folders[name])
    made_of = _comparison_runs(out)
    comparison = bool(made_of) and made_of <= {p.name for p in shown}
    if made_of and not comparison:
        left_out.append(f"comparison — made of {', '.join(sorted(made_of))}, not of the runs shown: run "
                        "`citylib run` to compare these")
    return Current(shown, left_out, comparison)


def _why_not(run_dir: Path, in_grid: bool, snapshot: str | None) -> str | None:
    """Why a run folder is not shown, or None."""
    if not in_grid:
        return "no parameter file in the last `citylib run`"
    try:
        trained = read_json(run_dir / "training.json")["config"]["data_key"]
    except (OSError, ValueError, KeyError):
        return "not trained"
    if snapshot is not None and trained != snapshot:
        return f"trained on data snapshot {trained}, not the current {snapshot}: train it again (`citylib run`)"
    return None


def _comparison_runs(out: Path) -> set[str]:
    try:
        return {r["name"] for r in read_json(out / "comparison" / "meta.json")["runs"]}
    except (OSError, ValueError, KeyError):
        return set()
