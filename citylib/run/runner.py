"""The batch runner: papermill over the ordered notebooks for every parameter file.

Reads ``parameters/*.yaml`` (or the files given), validates all of them before any work,
then executes: the data notebook once, the per-run notebooks once per parameter file, and
the grid notebooks once over all runs. Each run's training (notebook 02) takes as many cores as
its ``train.threads`` (which the weights depend on), its later notebooks (Grad-CAM, embedding,
objects; mostly single-threaded work) ``cores / jobs``; runs go side by side, each in a worker
process, as long as the cores they take are free. Writes every executed
notebook under ``outputs/`` (``data/``, ``runs/<run>/``, ``comparison/``), a result marker per
finished notebook (``.results/<notebook>.json``, an ``artifacts.ResultFolder``), and
``outputs/runs/summary.csv``. A notebook is keyed by its own source and the key of the stage it
runs (``pipeline.keys``: that stage's settings, its inputs' keys and its code), so a changed
threshold reruns the objects and comparison notebooks and nothing before them, and a changed
source folder ("source changed: ...") reruns everything that read the data. A notebook whose
key matches is skipped; a failing run is reported at the end and the others go on.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from citylib.core import artifacts, paths
from citylib.data import dataset
from citylib.core.artifacts import ResultFolder
from citylib.core.config import config_hash
from citylib.run.params import RunConfig, discover, load_all

# The suite's notebooks, in order. Data: once per grid; run: once per parameter file;
# grid: once over all runs.
DATA_NOTEBOOKS = ("01_data.ipynb",)
RUN_NOTEBOOKS = ("02_training.ipynb", "03_gradcam.ipynb", "04_embedding.ipynb", "05_objects.ipynb")
GRID_NOTEBOOKS = ("06_comparison.ipynb",)
# The stage each per-run notebook runs: its key (``pipeline.keys``) keys the notebook.
# The stages each per-run notebook runs (notebook 05: the objects, and on a generated world the
# causal effects and the method sweep): a notebook's key is theirs.
STAGES = dict(zip(RUN_NOTEBOOKS, (("training",), ("gradcam",), ("embedding",), ("objects", "causal", "methods"))))

# glibc malloc settings for the notebook kernels: keep freed memory in the heap instead of
# handing every large tensor back to the system and faulting it in again on the next batch.
# In the default job on 2 cores they cut minor page faults tenfold and system time from 303 s
# to 161 s (`/usr/bin/time -v make run`); wall time stayed within run-to-run noise. A value the
# user has set is left alone.
KERNEL_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
# Thread pools of the kernels when several run side by side: each kernel as many as the cores
# its task takes, so that the kernels never ask for more threads than there are cores (OpenMP
# threads that wait for a busy core spin and slow everything down).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


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
class _Job:
    """What every notebook of one ``citylib run`` shares."""

    out: Path            # the outputs folder
    notebooks: Path      # the folder of the suite's notebooks
    force: bool          # execute even the notebooks whose key matches


class _Progress:
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
    configs = load_all(files)  # every file is validated before any work
    by_name = {c.name: (c, f) for c, f in zip(configs, files)}
    everything = dict(by_name)
    if only:
        unknown = sorted(set(only) - set(by_name))
        if unknown:
            raise ValueError(f"--only: no parameter file for run(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
        by_name = {n: v for n, v in by_name.items() if n in only}

    with _kernel_env(KERNEL_ENV), _lock(out, by_name), _terminate_as_interrupt():
        return _run(by_name, everything, _Job(out, nb_dir, force), jobs, cores)


class Busy(ValueError):
    """Another ``citylib run`` is running one of these runs on the same outputs folder."""


LOCKS = ".citylib-run"   # the outputs' lock files: runs/<run>.lock, and stages/<stage>.lock for
#                          the stages the runs share (apart: a run may be called "data")


@contextlib.contextmanager
def _lock(out: Path, names) -> None:
    """Hold ``out/.citylib-run/runs/<run>.lock`` for every run asked for: a second ``citylib run`` of
    one of them on the same outputs stops at once and says who holds it, while runs of other
    runs (``--only``: one job per run on a cluster) go on side by side. The locks are the
    kernel's (``flock``), so a killed runner never leaves a stale one."""
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(_hold(out, name))
        yield


@contextlib.contextmanager
def _hold(out: Path, name: str):
    import json

    def refuse(fh):
        fh.seek(0)
        try:
            holder = json.loads(fh.read() or "{}")
        except ValueError:
            holder = {}
        raise Busy(f"{out}: another citylib run is running {name} here (pid {holder.get('pid', '?')}, "
                   f"started {holder.get('started', '?')}); wait for it, or give another --outputs")

    with artifacts.flocked(out / LOCKS / "runs" / f"{name}.lock", refuse) as fh:
        if fh is not None:   # None: a read-only folder, where a rerun with nothing to do still works
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
            fh.flush()
        yield


def _shared(out: Path, stage: str):
    """The lock of a stage the runs share (the data, the comparison): a runner that finds another
    one making it waits, then finds it made and skips it."""
    return artifacts.exclusive(out / LOCKS / "stages" / f"{stage}.lock", f"{out / stage}")


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a job scheduler's cancel, ``kill``) stops the runner as Ctrl-C does: workers
    ended, ``summary.csv`` written."""
    def stop(*_):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _write_config(path: Path, cfg: RunConfig) -> None:
    """The run's resolved settings, written only when they changed (a finished run's rerun
    writes nothing, and so works on a read-only outputs folder)."""
    content = {"config": cfg.to_dict(), "config_hash": cfg.hash}
    if not artifacts.holds_json(path, content):
        artifacts.write_json(path, content)


@contextlib.contextmanager
def _kernel_env(env: dict[str, str]):
    """Set ``env`` (where unset) for the kernels started inside; restore afterwards."""
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _run(by_name: dict, everything: dict, job: _Job, jobs: int, cores: int) -> RunnerResult:
    out, result = job.out, RunnerResult()
    total = len(DATA_NOTEBOOKS) + len(RUN_NOTEBOOKS) * len(by_name) + len(GRID_NOTEBOOKS)
    progress = _Progress(result, tqdm(total=total, desc="citylib run", unit="notebook"))
    first_cfg, first_file = next(iter(by_name.values()))
    try:
        with _shared(out, "data"):             # made once, also by runners of other runs side by side
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
        finished = _schedule(runs, job, cores, max(1, cores // jobs), progress)
        with _shared(out, "comparison"):
            # the grid compares every finished run of these files, also those left out by
            # --only: found done once the lock is held, so a runner that waited for another
            # never writes a comparison of fewer runs over the other's
            finished += [n for n in everything if n not in by_name and n in keys
                         and _is_done(out / "runs" / n, keys[n], job.notebooks)]
            result.finished[:] = [n for n in everything if n in finished]
            _compare(job, everything, [n for n in everything if n in finished], progress)
    except KeyboardInterrupt:          # the summary says what finished, then the caller says why
        result.interrupted = True
        raise
    finally:
        progress.bar.close()
        result.summary = write_summary(out, [c for c, _ in everything.values()], result)
    return result


def _data(job: _Job, cfg: RunConfig, file: Path, progress: _Progress) -> bool:
    """The data notebook, unless its marker matches the data stage's key; True if it is done."""
    out, ok = job.out, True
    try:
        data_key = dataset.key(cfg.data, out / "data")
        changes = dataset.changes(cfg.data, out / "data")
        if changes:
            tqdm.write(f"{out / 'data'}: {changes}: a new data snapshot, and every stage that "
                       "read the old one runs again")
    except Exception as e:   # the data notebook reports it
        data_key = f"unreadable: {type(e).__name__}: {e}"
    for nb in DATA_NOTEBOOKS:
        ok &= _execute(job, nb, out / "data", f"data/{nb}", file, data_key, progress)
    return ok


def _compare(job: _Job, everything: dict, finished: list[str], progress: _Progress) -> None:
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
        _execute(job, nb, job.out / "comparison", f"comparison/{nb}", grid, key, progress)


def _keys(cfg: RunConfig, out: Path) -> dict[str, str]:
    """Each per-run notebook's stage key (``pipeline.keys``) on the current data snapshot."""
    from citylib.run import pipeline  # it imports every stage: only once notebooks are to run

    stage = pipeline.keys(pipeline.Run(cfg, out))
    return {nb: config_hash(*(stage[s] for s in names if s in stage)) for nb, names in STAGES.items()}


def _grid_key(configs: list[RunConfig], out: Path) -> str:
    from citylib.run import pipeline

    return pipeline.grid_key([pipeline.Run(c, out) for c in configs])


def _notebooks(job: _Job, names: tuple[str, ...], name: str, file: Path, keys: dict[str, str],
               progress: _Progress) -> bool:
    """``names`` of one run in order; True if all are done (a failure skips the rest)."""
    progress.result.started.append(name)
    for i, nb in enumerate(names):
        if not _execute(job, nb, job.out / "runs" / name, f"{name}/{nb}", file, keys[nb], progress):
            progress.never(len(names) - i - 1)   # later notebooks need the earlier ones
            return False
    return True


@dataclass(frozen=True)
class _Task:
    """One run's notebooks that go together: its training, or its analysis (after training)."""

    run: str
    notebooks: tuple[str, ...]
    cores: int

    @property
    def training(self) -> bool:
        return self.notebooks == RUN_NOTEBOOKS[:1]


def _schedule(runs: dict, job: _Job, cores: int, analysis_cores: int, progress: _Progress) -> list[str]:
    """Notebooks 02-05 of ``runs``; returns those that finished, in parameter-file order.

    A run's training (notebook 02) takes ``train.threads`` x ``train.processes`` cores, its analysis (03-05)
    ``analysis_cores``. Tasks start in order -- every training, those on the most cores first,
    then every analysis once its run is trained -- whenever their cores are free, each in a
    worker process with that many threads: runs that train on one thread train side by side,
    and the first analyses use a core that a training has left. The first task that does not fit waits, and everything after
    it waits too, so that a training on every core is not starved by one-core tasks. When no two
    tasks can ever share the cores, everything runs here, one task after another."""
    trainings = [_Task(n, RUN_NOTEBOOKS[:1], min(cores, cfg.train.threads * cfg.train.processes))
                 for n, (cfg, _, _) in runs.items()]
    trainings.sort(key=lambda t: -t.cores)   # the widest first; at the end analyses fill the gaps
    analyses = [_Task(n, RUN_NOTEBOOKS[1:], analysis_cores) for n in runs]
    if 2 * min((t.cores for t in trainings + analyses), default=cores) > cores:
        trained = [t.run for t in trainings if _run_task(t, runs, job, progress)]
        for t in analyses:
            if t.run in trained and _run_task(t, runs, job, progress):
                progress.result.finished.append(t.run)
        return [n for n in runs if n in progress.result.finished]
    return _schedule_in_workers(trainings, analyses, runs, job, cores, progress)


def _run_task(task: _Task, runs: dict, job: _Job, progress: _Progress) -> bool:
    _, file, keys = runs[task.run]
    ok = _notebooks(job, task.notebooks, task.run, file, keys, progress)
    if not ok and task.training:
        progress.never(len(RUN_NOTEBOOKS) - len(task.notebooks))   # its analysis never starts
    return ok


def _schedule_in_workers(trainings: list[_Task], analyses: list[_Task], runs: dict, job: _Job,
                         cores: int, progress: _Progress) -> list[str]:
    """The worker-process side of ``_schedule``: papermill changes the process's working
    directory for each notebook, which notebooks running side by side in threads of one process
    would share; and each kernel inherits its worker's thread settings."""
    import multiprocessing

    user_set = {k for k in THREAD_VARS if k in os.environ}   # a value the user set is left alone
    pending, running, free = trainings + analyses, {}, cores
    trained, finished, lost = set(), set(), set()
    with ProcessPoolExecutor(cores, multiprocessing.get_context("spawn"), initializer=_end_with,
                             initargs=(os.getpid(),)) as pool, _ended_on_interrupt(pool):
        while pending or running:
            start, dropped = _ready(pending, trained, lost, free)
            for task in start + dropped:
                pending.remove(task)
            for task in start:
                _, file, keys = runs[task.run]
                env = {k: str(task.cores) for k in THREAD_VARS if k not in user_set}
                with _sigint_ignored():          # a worker it starts inherits that: Ctrl-C is ours
                    future = pool.submit(_task_worker, job, task.run, task.notebooks, file, keys, env)
                running[future] = task
                free -= task.cores
                progress.result.started.append(task.run)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                free += task.cores
                label = f"{task.run}/{task.notebooks[0] if task.training else 'analysis'}"
                try:
                    part, ok = future.result()
                except Exception as e:   # the worker process itself died
                    part, ok = RunnerResult(failed={label: f"{type(e).__name__}: {e}"}), False
                    tqdm.write(f"FAILED {label}: {type(e).__name__}: {e}")
                progress.merge(part, label, len(task.notebooks))
                if task.training and ok:
                    trained.add(task.run)
                elif task.training:
                    lost.add(task.run)
                    progress.never(len(RUN_NOTEBOOKS) - 1)
                elif ok:
                    finished.add(task.run)
                    progress.result.finished.append(task.run)
    return [n for n in runs if n in finished]


def _ready(pending: list[_Task], trained: set[str], lost: set[str], free: int
           ) -> tuple[list[_Task], list[_Task]]:
    """(tasks of ``pending`` to start now on ``free`` cores, in order; analyses to drop because
    their run's training failed). An analysis waits for its run's training without holding up
    the tasks behind it; the first task that does not fit holds up everything behind it."""
    start, dropped = [], []
    for task in pending:
        if not task.training and task.run not in trained:
            if task.run in lost:
                dropped.append(task)
            continue
        if task.cores > free:
            break
        start.append(task)
        free -= task.cores
    return start, dropped


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored for a moment: a worker process started now begins with it ignored (an
    ignored signal stays ignored across exec, and Python then installs no KeyboardInterrupt
    handler), so a Ctrl-C while it starts up prints no traceback from it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@contextlib.contextmanager
def _ended_on_interrupt(pool: ProcessPoolExecutor):
    """On Ctrl-C, end the workers (and their kernels) now instead of waiting for their tasks."""
    try:
        yield
    except KeyboardInterrupt:
        workers = list((getattr(pool, "_processes", None) or {}).values())
        for process in workers:
            with contextlib.suppress(Exception):
                process.terminate()                        # SIGTERM: the worker ends its kernels
        for process in workers:
            process.join(timeout=10)
        pool.shutdown(wait=True, cancel_futures=True)      # its queues' semaphores go too
        raise


def _end_with(parent: int, every: float = 0.5) -> None:
    """Worker initializer: once the runner (``parent``) is gone -- killed on its own, as a closed
    terminal or a scheduler's cancel can do -- end this worker's notebook kernels, then the
    worker, so that nothing goes on writing into the outputs folder with no one to report it.
    Ctrl-C is the runner's to handle (it ends the workers); SIGTERM ends the kernels too."""
    def ended(*_):
        _end_descendants()
        os._exit(143)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, ended)
    # tqdm's default lock is a multiprocessing one, whose semaphores a worker ended this way
    # would leave behind; a worker's bars are silent anyway
    tqdm.set_lock(threading.RLock())

    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        _end_descendants()
        os._exit(1)

    threading.Thread(target=watch, name="citylib-runner-watch", daemon=True).start()


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, read from /proc (none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()   # after "(comm)": state, ppid, ...
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _end_descendants(grace: float = 3.0) -> None:
    """SIGTERM every process below this one; SIGKILL those still there after ``grace`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = _descendants(os.getpid())
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = _descendants(os.getpid())


def _task_worker(job: _Job, name: str, notebooks: tuple[str, ...], file: Path, keys: dict[str, str],
                 env: dict[str, str]) -> tuple[RunnerResult, bool]:
    """In a worker process: some notebooks of one run, with a silent progress bar; ``env`` (the
    thread settings) goes to the kernels it starts."""
    os.environ.update(env)
    result = RunnerResult()
    with tqdm(total=len(notebooks), disable=True) as bar:
        ok = _notebooks(job, notebooks, name, file, keys, _Progress(result, bar))
    return result, ok


def _is_done(run_dir: Path, keys: dict[str, str], nb_dir: Path) -> bool:
    """Every per-run notebook of ``run_dir`` finished with these keys and notebook source."""
    return all(_marker(nb_dir / nb, run_dir, keys[nb]).done() is not None for nb in RUN_NOTEBOOKS)


def _marker(notebook: Path, out_dir: Path, key: str) -> ResultFolder:
    """The result marker of a notebook executed into ``out_dir``: keyed by the stage's key and
    the notebook's own source."""
    source = hashlib.sha256(notebook.read_bytes()).hexdigest()[:12]
    return ResultFolder(out_dir, notebook.stem, config_hash(key, source))


def _execute(job: _Job, name: str, out_dir: Path, label: str, params_file: Path | list[str], key: str,
             progress: _Progress) -> bool:
    """Run the notebook ``name`` with papermill unless its marker matches; True if it is done."""
    import papermill as pm  # heavy import, only when notebooks run

    notebook = job.notebooks / name
    marker = _marker(notebook, out_dir, key)
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


def write_summary(out: Path, configs: list[RunConfig], result: RunnerResult) -> pd.DataFrame:
    """``outputs/runs/summary.csv``: one row per run with its status and key metrics, each with
    its 95% interval (``_low``, ``_high``): test accuracy Wilson's, kNN agreement and planted-cue
    MRR over resampled test spots."""
    rows = []
    for cfg in configs:
        metrics_path = out / "runs" / cfg.name / "metrics.json"
        metrics = artifacts.read_json(metrics_path) if metrics_path.exists() else {}
        failed = [k for k in result.failed if k == cfg.name or k.startswith(cfg.name + "/")]
        knn = metrics.get("embedding", {}).get("knn_2d", {})
        objects = metrics.get("objects", {})
        accuracy, n_test = metrics.get("test_accuracy"), metrics.get("n_test")
        acc_ci = (_wilson(round(accuracy * n_test), n_test) if accuracy is not None and n_test
                  else (None, None))
        rows.append({
            "run": cfg.name, "arch": cfg.arch, "seed": cfg.seed,
            "status": ("done" if cfg.name in result.finished else "failed" if failed
                       else "interrupted" if result.interrupted and cfg.name in result.started else "not started"),
            "test_accuracy": accuracy, "test_accuracy_low": acc_ci[0], "test_accuracy_high": acc_ci[1],
            "best_epoch": metrics.get("best_epoch"),
            "n_test": n_test,
            "knn_2d": knn.get("observed"), "knn_2d_low": knn.get("ci", [None, None])[0],
            "knn_2d_high": knn.get("ci", [None, None])[1], "knn_2d_shuffled": knn.get("baseline_mean"),
            "planted_mrr": objects.get("planted_mrr"),
            "planted_mrr_low": objects.get("planted_mrr_ci", [None, None])[0],
            "planted_mrr_high": objects.get("planted_mrr_ci", [None, None])[1],
            "planted_mrr_ceiling": objects.get("ceiling", {}).get("planted_mrr"),
            "sanity_deletion": (metrics.get("sanity_verdict") or {}).get("deletion", {}).get("passed"),
            "sanity_cascade": (metrics.get("sanity_verdict") or {}).get("cascade", {}).get("passed"),
            "cue_free_accuracy": metrics.get("causal", {}).get("cue_free", {}).get("accuracy"),
            "cue_free_at_chance": metrics.get("causal", {}).get("cue_free", {}).get("at_chance"),
            "notebook_seconds": sum(_seconds(out / "runs" / cfg.name, nb) for nb in RUN_NOTEBOOKS)
                                or None,
            "config_hash": cfg.hash,
        })
    frame = pd.DataFrame(rows)
    path = out / "runs" / "summary.csv"
    try:
        same = path.read_text() == frame.to_csv(index=False)
    except OSError:
        same = False
    if not same:                       # a rerun that changed nothing writes nothing
        artifacts.write_csv(path, frame)
    return frame


def _seconds(out_dir: Path, notebook: str) -> float:
    """How long the notebook's last finished execution into ``out_dir`` took (0 if none)."""
    marker = ResultFolder(out_dir, Path(notebook).stem).read()
    return float(marker.get("seconds", 0.0)) if marker else 0.0


def _wilson(k: int, n: int) -> tuple[float, float]:
    from citylib.stats import intervals  # scipy.stats takes a second to import: only when needed

    return intervals.wilson(k, n)
