"""The report shows the current results only: the runs of the last ``citylib run``'s grid trained
on the current data snapshot, and the comparison only when it was made of them; every result
left out is listed with its reason."""
from __future__ import annotations

import json

import nbformat
import pandas as pd

from citylib.run import report
from citylib.run.current import current


def _outputs(tmp_path):
    """Three run folders: ``a`` in the grid and trained on the current snapshot, ``b`` in the grid
    but trained on an older one, ``c`` whose parameter file is gone; a comparison of a and c."""
    out = tmp_path / "outputs"
    (out / "data" / ".results").mkdir(parents=True)
    (out / "data" / "snapshot.json").write_text(json.dumps({"key": "now"}))
    (out / "data" / ".results" / "data.json").write_text(json.dumps({"key": "k", "files": ["snapshot.json"]}))
    for name, snapshot in (("a", "now"), ("b", "before"), ("c", "now")):
        run = out / "runs" / name
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"config": {"arch": "simple"}, "cities": ["x", "y"]}))
        (run / "training.json").write_text(json.dumps({"config": {"data_key": snapshot}}))
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"run {name}")]),
                       run / "02_training.ipynb")
    pd.DataFrame({"run": ["a", "b"], "arch": "simple", "seed": [0, 1], "status": ["done", "failed"],
                  "test_accuracy": [0.9, 0.8]}).to_csv(out / "runs" / "summary.csv", index=False)
    (out / "comparison").mkdir()
    (out / "comparison" / "meta.json").write_text(json.dumps({"runs": [{"name": "a"}, {"name": "c"}]}))
    pd.DataFrame({"models": ["Simple-Simple retrained"], "kind": ["seed"], "ar": [0.3], "ci_low": [0.2],
                  "ci_high": [0.4]}).to_csv(out / "comparison" / "table2.csv", index=False)
    return out


def test_only_the_current_grid_on_the_current_snapshot_is_shown(tmp_path):
    out = _outputs(tmp_path)
    now = current(out)
    assert [p.name for p in now.runs] == ["a"] and not now.comparison
    assert now.left_out == [
        "b — trained on data snapshot before, not the current now: train it again (`citylib run`)",
        "c — no parameter file in the last `citylib run`",
        "comparison — made of a, c, not of the runs shown: run `citylib run` to compare these"]
    page = report.run(out).read_text()
    assert "Run a" in page and "Run b" not in page and "Run c" not in page
    assert "runs__b__" not in page and "runs__c__" not in page            # nor their notebooks
    assert "Table 2" not in page and "0.800" not in page                 # nor b's accuracy, nor the comparison
    for line in now.left_out:
        assert f"Not shown: {line.replace('`', '&#x60;')}" in page or f"Not shown: {line}" in page
