"""The runner's processes: locks on the outputs folder, signals, worker processes that never
outlive the runner, the notebook kernels' environment, and torchrun for a DDP training.

- ``lock``: one ``citylib run`` per run and outputs folder (``flock``, so a killed runner never
  leaves a stale lock); ``shared``: the stages the runs share (the data, the comparison) made by
  one runner while the others wait.
- ``terminate_as_interrupt``, ``sigint_ignored``, ``ended_on_interrupt``, ``end_with``,
  ``end_descendants``: SIGTERM handled as Ctrl-C; a worker's kernels ended with it, and every
  worker ended when the runner is killed on its own (read from /proc).
- ``kernel_env``: malloc settings for the kernels; ``torchrun``: ``citylib train`` under torchrun.

Reads /proc; writes only the lock files under ``<outputs>/.citylib-run/``.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from citylib.core import artifacts
from citylib.core.artifacts import ResultFolder

# glibc malloc settings for the notebook kernels: keep freed memory in the heap instead of
# handing every large tensor back to the system and faulting it in again on the next batch.
# In the default job on 2 cores they cut minor page faults tenfold and system time from 303 s
# to 161 s (`/usr/bin/time -v make run`); wall time stayed within run-to-run noise. A value the
# user has set is left alone.
KERNEL_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


class Busy(ValueError):
    """Another ``citylib run`` is running one of these runs on the same outputs folder."""


LOCKS = ".citylib-run"   # the outputs' lock files: runs/<run>.lock, and stages/<stage>.lock for


@contextlib.contextmanager
def lock(out: Path, names) -> None:
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


def shared(out: Path, stage: str):
    """The lock of a stage the runs share (the data, the comparison): a runner that finds another
    one making it waits, then finds it made and skips it."""
    return artifacts.exclusive(out / LOCKS / "stages" / f"{stage}.lock", f"{out / stage}")


@contextlib.contextmanager
def terminate_as_interrupt():
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


@contextlib.contextmanager
def kernel_env(env: dict[str, str]):
    """Set ``env`` (where unset) for the kernels started inside; restore afterwards."""
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def sigint_ignored():
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
def ended_on_interrupt(pool: ProcessPoolExecutor):
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


def end_with(parent: int, every: float = 0.5) -> None:
    """Worker initializer: once the runner (``parent``) is gone -- killed on its own, as a closed
    terminal or a scheduler's cancel can do -- end this worker's notebook kernels, then the
    worker, so that nothing goes on writing into the outputs folder with no one to report it.
    Ctrl-C is the runner's to handle (it ends the workers); SIGTERM ends the kernels too."""
    def ended(*_):
        end_descendants()
        os._exit(143)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, ended)
    # tqdm's default lock is a multiprocessing one, whose semaphores a worker ended this way
    # would leave behind; a worker's bars are silent anyway
    tqdm.set_lock(threading.RLock())

    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        end_descendants()
        os._exit(1)

    threading.Thread(target=watch, name="citylib-runner-watch", daemon=True).start()


def descendants(pid: int) -> list[int]:
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


def end_descendants(grace: float = 3.0) -> None:
    """SIGTERM every process below this one; SIGKILL those still there after ``grace`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = descendants(os.getpid())
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = descendants(os.getpid())


def torchrun(run, force: bool, progress: bool, stop_after: int | None):
    """``citylib train`` for ``run`` (``pipeline.Run``) under ``torchrun --nproc_per_node
    train.processes`` (its output printed line by line as it comes), then the result its
    processes wrote."""
    import pandas as pd

    from citylib.nets import train

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
    return train.TrainResult(run.dir, marker["config"], marker["key"], history,
                             artifacts.read_json(run.dir / "training.json"), True, False, 0)
