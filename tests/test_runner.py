"""The papermill grid in smoke size: skip identical runs, go on past a failing run; workers end
with the runner."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from citylib.core import artifacts, paths
from citylib.core.paths import PARAMETERS
from citylib.run import cli, processes, runner, schedule
from citylib.stats import intervals


@pytest.fixture
def grid(smoke_grid):
    return smoke_grid


def test_failing_run_is_reported_with_nonzero_exit_and_others_finish(grid):
    params_dir, out, code = grid
    assert code == 1
    for nb in runner.DATA_NOTEBOOKS:
        assert (out / "data" / nb).exists()
    for nb in runner.RUN_NOTEBOOKS:
        assert (out / "runs" / "good" / nb).exists()
    assert (out / "runs" / "broken" / "02_training.failed.ipynb").exists()
    assert (out / "data" / "manifest.csv").exists()
    summary = pd.read_csv(out / "runs" / "summary.csv").set_index("run")
    assert summary.loc["good", "status"] == "done" and summary.loc["broken", "status"] == "failed"
    assert 0 <= summary.loc["good", "test_accuracy"] <= 1
    good = summary.loc["good"]       # every headline number with its 95% interval around it
    for name in ("test_accuracy", "knn_2d", "planted_mrr"):
        # (a resample of one spot per city is the sample itself, up to float rounding)
        assert good[f"{name}_low"] - 1e-9 <= good[name] <= good[f"{name}_high"] + 1e-9, name
    assert (good.test_accuracy_low, good.test_accuracy_high) == pytest.approx(
        intervals.wilson(round(good.test_accuracy * good.n_test), good.n_test))
    # planted-cue recovery beside the ideal detector's on a map of the network's size
    objects = artifacts.read_json(out / "runs" / "good" / "metrics.json")["objects"]
    masks = np.load(out / "runs" / "good" / "gradcam" / "masks.npy", mmap_mode="r")
    assert objects["ceiling"]["map_size"] == list(masks.shape[1:])
    assert objects["ceiling"]["planted_rr"].keys() == objects["planted_rr"].keys()
    assert summary.loc["good", "planted_mrr_ceiling"] == objects["ceiling"]["planted_mrr"]
    # the comparison ran once over the runs that finished, not the broken one
    assert (out / "comparison" / "06_comparison.ipynb").exists()
    ar = pd.read_csv(out / "comparison" / "ar.csv")
    assert set(ar["run_a"]) | set(ar["run_b"]) == {"good", "other", "good (randomised)", "other (randomised)"}
    assert set(ar["kind"]) == {"architecture", "randomised"}
    assert {"ar_heatmap.png", "fig6.png", "tests.json"} <= {p.name for p in (out / "comparison").iterdir()}


def test_every_result_holds_the_key_the_stage_table_derives(grid):
    """The key a stage computed from what it read when it ran is the one the table derives from
    the settings before anything runs (which decides the notebooks to execute): every stage of
    the table, its figures, and the comparison."""
    from citylib.core.artifacts import ResultFolder
    from citylib.run import pipeline, table

    params_dir, out, _ = grid
    run = pipeline.open_run(params_dir / "good.yaml", out)
    keys = pipeline.keys(run)
    stages = [s for s in table.STAGES if s.scope == "run"]
    assert [s.name for s in stages if s.name in keys] == ["training", "gradcam", "embedding", "objects",
                                                          "causal", "reliance", "places", "calibration", "methods"]
    for stage in stages:
        assert stage.marker(run).finished()["key"] == keys[stage.name], stage.name
        if stage.figures is not None:
            drawn = ResultFolder(run.dir, f"{stage.name}_figures").finished()
            assert drawn["key"] == pipeline.figure_key(stage, keys[stage.name]), stage.name
    grid_runs = pipeline.open_grid([params_dir / "good.yaml", params_dir / "other.yaml"], out)
    comparison = table.BY_NAME["comparison"]
    assert comparison.marker(grid_runs).finished()["key"] == comparison.key(
        grid_runs, {r.cfg.name: pipeline.keys(r) for r in grid_runs.runs})


def test_identical_runs_are_skipped_and_force_redoes_them(grid):
    params_dir, out, _ = grid
    written = (out / "runs" / "good" / "config.json").stat().st_mtime_ns
    again = runner.run(params=params_dir, only=["good"], outputs=out)
    assert again.ok and not again.executed
    # a rerun with nothing to do writes nothing a read-only outputs folder would refuse
    assert (out / "runs" / "good" / "config.json").stat().st_mtime_ns == written
    assert list(again.summary.set_index("run")["status"][["good", "other", "broken"]]) == ["done", "done", "not started"]
    # the comparison still covers 'other' (finished earlier, not selected), so it is identical
    assert set(again.skipped) == ({"data/01_data.ipynb", "comparison/06_comparison.ipynb"}
                                  | {f"good/{nb}" for nb in runner.RUN_NOTEBOOKS})
    forced = runner.run(params=params_dir, only=["good"], outputs=out, force=True)
    assert forced.ok and len(forced.executed) == (len(runner.DATA_NOTEBOOKS) + len(runner.RUN_NOTEBOOKS)
                                                  + len(runner.GRID_NOTEBOOKS))


def test_unknown_run_in_only_is_an_error(grid):
    params_dir, out, _ = grid
    assert cli.main(["run", "--params", str(params_dir), "--outputs", str(out), "--only", "nope"]) == 2


def test_jobs_below_one_is_an_error_before_any_work(grid, tmp_path):
    params_dir, _, _ = grid
    out = tmp_path / "never"
    assert cli.main(["run", "--params", str(params_dir), "--outputs", str(out), "--jobs", "0"]) == 2
    assert not out.exists()


def test_predict_prints_cities_and_names_unreadable_images(grid, tmp_path, capsys):
    _, out, _ = grid
    manifest = pd.read_csv(out / "data" / "manifest.csv")
    image = manifest["path"].iloc[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"no image here")
    code = cli.main(["predict", "--run", str(out / "runs" / "good"), image, str(broken)])
    printed = capsys.readouterr().out
    assert code == 1  # one image could not be read
    assert image in printed and "broken.jpg" in printed and "not an image" in printed
    cities = sorted(manifest["city"].unique())
    assert all(c in printed for c in cities)


def test_report_renders_every_executed_notebook(grid):
    _, out, _ = grid
    assert cli.main(["report", "--outputs", str(out)]) == 0
    index = (out / "report" / "index.html").read_text()
    assert "good" in index  # the runs table
    for section in ("Accuracy per run", "Planted-cue recovery", "MRR ceiling", "Table 2", "Tests of",
                    "../comparison/ar_heatmap.png", "../runs/good/r_histograms.png",
                    "../runs/good/gallery.png", "../runs/other/map_city.png"):
        assert section in index, section
    for nb in runner.RUN_NOTEBOOKS:
        page = out / "report" / f"runs__good__{nb.replace('.ipynb', '.html')}"
        assert page.exists() and page.name in index
    assert (out / "report" / "data__01_data.html").exists()


def test_analysis_failure_in_a_worker_process_is_reported_and_the_other_run_finishes(grid, tmp_path):
    """Notebooks 03-05 of several runs go to worker processes; one failing there is reported
    like any other failure, and the run beside it still finishes."""
    params_dir, work, _ = grid    # the last test of the grid: it may leave a failed run there
    nb_dir = tmp_path / "notebooks"
    shutil.copytree(paths.NOTEBOOKS, nb_dir)
    gradcam_nb = nb_dir / "03_gradcam.ipynb"
    nb = nbformat.read(gradcam_nb, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        'if "other" in str(params_file):\n    raise RuntimeError("deliberate failure")'))
    nbformat.write(nb, gradcam_nb)

    result = runner.run(params=params_dir, only=["good", "other"], outputs=work, notebooks=nb_dir,
                        jobs=2)
    assert set(result.failed) == {"other/03_gradcam.ipynb"}
    assert "deliberate failure" in result.failed["other/03_gradcam.ipynb"]
    assert (work / "runs" / "other" / "03_gradcam.failed.ipynb").exists()
    # training was already done (same notebook source): skipped, not redone
    assert {"good/02_training.ipynb", "other/02_training.ipynb"} <= set(result.skipped)
    # good's changed notebook 03 reran in its worker; 04 and 05 are unchanged and reused
    assert "good/03_gradcam.ipynb" in result.executed
    assert {f"good/{nb}" for nb in runner.RUN_NOTEBOOKS[2:]} <= set(result.skipped)
    assert not any(label.startswith("other/0") and label != "other/02_training.ipynb"
                   for label in result.executed + result.skipped)
    summary = result.summary.set_index("run")
    assert summary.loc["good", "status"] == "done" and summary.loc["other", "status"] == "failed"


def test_tasks_start_in_order_while_their_cores_are_free():
    """The scheduler's choice: one-thread trainings go side by side, a task on more cores than
    are free holds up those behind it, an analysis waits for its own run's training only."""
    train = lambda run, cores: schedule.Task(run, runner.RUN_NOTEBOOKS[:1], cores)  # noqa: E731
    analyse = lambda run: schedule.Task(run, runner.RUN_NOTEBOOKS[1:], 1)  # noqa: E731
    pending = [train("a", 1), train("b", 1), train("c", 2), analyse("a"), analyse("b")]
    assert schedule.ready(pending, set(), set(), 2) == (pending[:2], [])
    # 'a' trained, 'b' still training: 'c' needs both cores and holds up a's analysis
    assert schedule.ready(pending[2:], {"a"}, set(), 1) == ([], [])
    # 'c' started on both cores and finished; b's analysis waits, a's goes
    assert schedule.ready(pending[3:], {"a", "c"}, set(), 1) == ([pending[3]], [])
    # 'b' failed: its analysis is dropped, not run
    assert schedule.ready(pending[4:], {"a", "c"}, {"b"}, 2) == ([], [pending[4]])



def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _long_grid(tmp_path) -> Path:
    """Two long one-thread trainings: the runner trains them side by side, in workers."""
    params = tmp_path / "params"
    params.mkdir()
    text = (PARAMETERS / "smoke" / "simple_seed0.yaml").read_text().replace("  epochs: 1\n", "")
    for name in ("a", "b"):
        (params / f"{name}.yaml").write_text(text.replace("train:\n", "train:\n  threads: 1\n  epochs: 200\n"))
    return params


def _as_a_terminal_job() -> None:
    """In the child before exec: Ctrl-C at its default, as for a command typed at a terminal.
    A shell without job control starts a background command (``make test &`` in a script) with
    SIGINT ignored, and the ignored state is inherited through exec, so that a runner started
    from such a test process would rightly never see the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(tmp_path, params: Path) -> tuple[subprocess.Popen, set[int]]:
    """``citylib run`` in a session of its own, once a training has written an epoch; the
    processes below it then."""
    proc = subprocess.Popen([sys.executable, "-m", "citylib", "run", "--params", str(params),
                             "--outputs", str(tmp_path / "out")], start_new_session=True,
                            preexec_fn=_as_a_terminal_job,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        seen |= set(processes.descendants(proc.pid))
        if any((tmp_path / "out" / "runs" / n / "history.csv").is_file() for n in ("a", "b")):
            break                                               # an epoch done: training under way
        time.sleep(0.5)
    seen |= set(processes.descendants(proc.pid))
    assert proc.poll() is None and any("ipykernel" in _cmdline(p) for p in seen), \
        "the runner never started a kernel in a worker"
    return proc, seen


def _gone(seen: set[int], seconds: float = 20) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in seen):
        time.sleep(0.5)
    return [p for p in seen if _alive(p)]


def _kill_all(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc")
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_run_stops_everything_and_writes_its_summary(tmp_path, how):
    """Ctrl-C (SIGINT to the terminal's process group) or SIGTERM to the runner (a scheduler's
    cancel, `kill`): exit 130 with a line saying so, no worker or kernel left, summary.csv."""
    proc, seen = _start(tmp_path, _long_grid(tmp_path))
    try:
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=180)          # a loaded machine stops kernels slowly
        assert proc.returncode == 130
        assert "citylib run: interrupted; finished results are kept" in err
        assert not _gone(seen), f"workers or kernels outlived {how}"
        summary = pd.read_csv(tmp_path / "out" / "runs" / "summary.csv").set_index("run")
        assert set(summary["status"]) == {"interrupted"}
    finally:
        _kill_all(seen | {proc.pid})


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc")
def test_workers_end_when_the_runner_is_killed_on_its_own(tmp_path):
    """Killing only the runner's PID (not its process group, as a closed terminal or a
    scheduler's cancel can) leaves no worker or notebook kernel running."""
    proc, seen = _start(tmp_path, _long_grid(tmp_path))
    try:
        os.kill(proc.pid, signal.SIGKILL)                       # the runner alone
        proc.wait()
        assert not _gone(seen), "workers or kernels outlived the runner"
    finally:
        _kill_all(seen)


def test_a_second_run_on_the_same_outputs_says_who_holds_it(tmp_path, capsys):
    import fcntl
    import json

    out = tmp_path / "out"
    (out / processes.LOCKS / "runs").mkdir(parents=True)
    with open(out / processes.LOCKS / "runs" / "simple_seed0.lock", "w") as fh:   # this run in progress
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write(json.dumps({"pid": 4242, "started": "2026-12-02 07:00:00"}))
        fh.flush()
        code = cli.main(["run", "--params", str(PARAMETERS / "smoke" / "simple_seed0.yaml"), "--outputs", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another citylib run is running simple_seed0 here (pid 4242" in err[0]
    assert not (out / "data").exists()                              # nothing was started


def test_a_finished_outputs_folder_moved_elsewhere_is_reused_whole(tmp_path):
    """Keys do not hold where the outputs folder lies: a finished smoke run, its folder moved
    (as users move, copy and sync results), runs nothing again, and its figures still find the
    generated world's images."""
    params = tmp_path / "params"
    params.mkdir()
    shutil.copy(PARAMETERS / "smoke" / "simple_seed0.yaml", params / "a.yaml")
    first = runner.run(params=params, outputs=tmp_path / "here")
    assert first.ok, first.failed
    shutil.move(tmp_path / "here", tmp_path / "there")
    again = runner.run(params=params, outputs=tmp_path / "there")
    assert again.ok and not again.executed, again.executed
    manifest = pd.read_csv(tmp_path / "there" / "data" / "manifest.csv")
    assert manifest["path"].str.startswith("world/").all()          # inside the folder: relative
    from citylib.run import pipeline

    cache = pipeline.load_cache(pipeline.open_run(params / "a.yaml", tmp_path / "there"))
    assert Path(cache.file(cache.index["path"].iloc[0])).is_file()
