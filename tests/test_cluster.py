"""The grid on a cluster: one ``citylib run --only NAME`` per run, side by side on one outputs
folder, then one ``citylib run`` that finds every run done and writes the comparison.

Two runners start together on a fresh outputs folder: the data stage (the generated world, the
image store) is made by one of them while the other waits, then reused; each trains and analyses
its own run. (A runner of a run that another runner is running is refused: ``test_runner``.)
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pandas as pd

from citylib.core.paths import PARAMETERS
from citylib.run import runner

DRIVER = ("import json, sys; from citylib.run import runner; "
          "r = runner.run(params=sys.argv[1], only=[a for a in sys.argv[2:3] if a] or None, outputs=sys.argv[3]); "
          "print(json.dumps({'executed': r.executed, 'skipped': r.skipped, 'failed': r.failed}))")


def _start(params, only, out):
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(params), only, str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc) -> tuple[dict, str]:
    stdout, stderr = proc.communicate(timeout=1500)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def test_two_only_runs_share_one_outputs_folder(tmp_path):
    params, out = tmp_path / "params", tmp_path / "outputs"
    params.mkdir()
    shutil.copy(PARAMETERS / "smoke" / "simple_seed0.yaml", params / "a.yaml")
    shutil.copy(PARAMETERS / "smoke" / "simpler_seed0.yaml", params / "b.yaml")
    procs = {name: _start(params, name, out) for name in ("a", "b")}
    got = {name: _result(p) for name, p in procs.items()}
    data = "data/01_data.ipynb"
    made = [n for n, (r, _) in got.items() if data in r["executed"]]
    reused = [n for n, (r, _) in got.items() if data in r["skipped"]]
    assert len(made) == 1 and len(reused) == 1, got
    waited = got[reused[0]][1]
    assert "waiting for another process building" in waited
    # on a line of its own, not stuck to the end of the progress bar's
    assert any(piece.startswith("waiting for another process building") for piece in re.split(r"[\r\n]", waited))
    for name, (r, _) in got.items():
        assert not r["failed"], r
        assert all(f"{name}/{nb}" in r["executed"] for nb in runner.RUN_NOTEBOOKS)
        assert not any(label.startswith("ab"[name == "a"] + "/") for label in r["executed"])
    assert len(list((out / "data" / "cache").glob("[!.]*/meta.json"))) == 1
    assert len(list((out / "world").glob("[!.]*/world.json"))) == 1

    final, _ = _result(_start(params, "", out))            # every run found done: nothing trains
    assert not final["failed"] and all(label.startswith("comparison/") for label in final["executed"])
    assert {f"{n}/{nb}" for n in "ab" for nb in runner.RUN_NOTEBOOKS} <= set(final["skipped"])
    summary = pd.read_csv(out / "runs" / "summary.csv")
    assert summary["status"].tolist() == ["done", "done"]
    assert (out / "comparison" / "06_comparison.ipynb").is_file()
    ar = pd.read_csv(out / "comparison" / "ar.csv")
    assert {"a", "b"} <= set(ar["run_a"]) | set(ar["run_b"])                  # both compared
