"""``outputs/runs/summary.csv``: one row per run, its status and each stage's headline numbers.

The columns after run, arch, seed and status are the stages' own, in the stage table's order
(``table.Stage.summary``: test accuracy with its Wilson 95% interval, the sanity verdicts, kNN
agreement and planted-cue MRR each with its 95% interval over resampled test spots, the
cue-free check, decided over the grid's runs at once: ``table.Stage.across``), then the
notebooks' time and the config's hash. Reads each run's
``metrics.json`` and notebook markers; writes the file only when it changes.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from citylib.core import artifacts
from citylib.core.artifacts import ResultFolder
from citylib.run import table
from citylib.run.notebooks import RunnerResult
from citylib.run.params import RunConfig


def write_summary(out: Path, configs: list[RunConfig], result: RunnerResult) -> pd.DataFrame:
    """Write ``<out>/runs/summary.csv`` for ``configs`` after the runner's ``result``; return it."""
    rows = []
    for cfg in configs:
        metrics_path = out / "runs" / cfg.name / "metrics.json"
        metrics = artifacts.read_json(metrics_path) if metrics_path.exists() else {}
        row = {"run": cfg.name, "arch": cfg.arch, "seed": cfg.seed, "status": status(cfg.name, result)}
        for stage in table.STAGES:
            if stage.summary is not None:
                row.update(stage.summary(metrics))
        row["notebook_seconds"] = sum(_seconds(out / "runs" / cfg.name, nb) for nb in table.notebooks("run")) or None
        row["config_hash"] = cfg.hash
        rows.append(row)
    frame = pd.DataFrame(rows)
    for stage in table.STAGES:        # what is decided once over the grid's runs
        if stage.across is not None and len(frame):
            frame = stage.across(frame)
    path = out / "runs" / "summary.csv"
    try:
        same = path.read_text() == frame.to_csv(index=False)
    except OSError:
        same = False
    if not same:                       # a rerun that changed nothing writes nothing
        artifacts.write_csv(path, frame)
    return frame


def status(name: str, result: RunnerResult) -> str:
    """done, failed, interrupted or not started."""
    failed = [k for k in result.failed if k == name or k.startswith(name + "/")]
    return ("done" if name in result.finished else "failed" if failed
            else "interrupted" if result.interrupted and name in result.started else "not started")


def _seconds(out_dir: Path, notebook: str) -> float:
    """How long the notebook's last finished execution into ``out_dir`` took (0 if none)."""
    marker = ResultFolder(out_dir, Path(notebook).stem).read()
    return float(marker.get("seconds", 0.0)) if marker else 0.0
