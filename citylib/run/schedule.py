"""Scheduling the runs' notebooks on the cores: trainings and analyses side by side, each in a
worker process with its own thread settings.

A run's training (notebook 02) takes ``train.threads`` x ``train.processes`` cores, its analysis
(notebooks 03-05) ``cores / jobs``; ``schedule`` starts them in order whenever their cores are
free (``ready``), each in a worker process (``processes.end_with``: it never outlives the
runner). Writes what the notebooks write.
"""
from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from citylib.run import processes, table
from citylib.run.notebooks import Job, Progress, RunnerResult, in_order

RUN = table.notebooks("run")   # a run's notebooks: RUN[0] trains, the rest analyse

# Thread pools of the kernels when several run side by side: each kernel as many as the cores
# its task takes, so that the kernels never ask for more threads than there are cores (OpenMP
# threads that wait for a busy core spin and slow everything down).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


@dataclass(frozen=True)
class Task:
    """One run's notebooks that go together: its training, or its analysis (after training)."""

    run: str
    notebooks: tuple[str, ...]
    cores: int

    @property
    def training(self) -> bool:
        return self.notebooks == RUN[:1]


def schedule(runs: dict, job: Job, cores: int, analysis_cores: int, progress: Progress) -> list[str]:
    """Notebooks 02-05 of ``runs``; returns those that finished, in parameter-file order.

    A run's training (notebook 02) takes ``train.threads`` x ``train.processes`` cores, its analysis (03-05)
    ``analysis_cores``. Tasks start in order -- every training, those on the most cores first,
    then every analysis once its run is trained -- whenever their cores are free, each in a
    worker process with that many threads: runs that train on one thread train side by side,
    and the first analyses use a core that a training has left. The first task that does not fit waits, and everything after
    it waits too, so that a training on every core is not starved by one-core tasks. When no two
    tasks can ever share the cores, everything runs here, one task after another."""
    trainings = [Task(n, RUN[:1], min(cores, cfg.train.threads * cfg.train.processes))
                 for n, (cfg, _, _) in runs.items()]
    trainings.sort(key=lambda t: -t.cores)   # the widest first; at the end analyses fill the gaps
    analyses = [Task(n, RUN[1:], analysis_cores) for n in runs]
    if 2 * min((t.cores for t in trainings + analyses), default=cores) > cores:
        trained = [t.run for t in trainings if _run_task(t, runs, job, progress)]
        for t in analyses:
            if t.run in trained and _run_task(t, runs, job, progress):
                progress.result.finished.append(t.run)
        return [n for n in runs if n in progress.result.finished]
    return _schedule_in_workers(trainings, analyses, runs, job, cores, progress)


def _run_task(task: Task, runs: dict, job: Job, progress: Progress) -> bool:
    _, file, keys = runs[task.run]
    ok = in_order(job, task.notebooks, task.run, file, keys, progress)
    if not ok and task.training:
        progress.never(len(RUN) - len(task.notebooks))   # its analysis never starts
    return ok


def _schedule_in_workers(trainings: list[Task], analyses: list[Task], runs: dict, job: Job,
                         cores: int, progress: Progress) -> list[str]:
    """The worker-process side of ``schedule``: papermill changes the process's working
    directory for each notebook, which notebooks running side by side in threads of one process
    would share; and each kernel inherits its worker's thread settings."""
    import multiprocessing

    user_set = {k for k in THREAD_VARS if k in os.environ}   # a value the user set is left alone
    pending, running, free = trainings + analyses, {}, cores
    trained, finished, lost = set(), set(), set()
    with ProcessPoolExecutor(cores, multiprocessing.get_context("spawn"), initializer=processes.end_with,
                             initargs=(os.getpid(),)) as pool, processes.ended_on_interrupt(pool):
        while pending or running:
            start, dropped = ready(pending, trained, lost, free)
            for task in start + dropped:
                pending.remove(task)
            for task in start:
                _, file, keys = runs[task.run]
                env = {k: str(task.cores) for k in THREAD_VARS if k not in user_set}
                with processes.sigint_ignored():          # a worker it starts inherits that: Ctrl-C is ours
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
                    progress.never(len(RUN) - 1)
                elif ok:
                    finished.add(task.run)
                    progress.result.finished.append(task.run)
    return [n for n in runs if n in finished]


def ready(pending: list[Task], trained: set[str], lost: set[str], free: int
           ) -> tuple[list[Task], list[Task]]:
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


def _task_worker(job: Job, name: str, notebooks: tuple[str, ...], file: Path, keys: dict[str, str],
                 env: dict[str, str]) -> tuple[RunnerResult, bool]:
    """In a worker process: some notebooks of one run, with a silent progress bar; ``env`` (the
    thread settings) goes to the kernels it starts."""
    os.environ.update(env)
    result = RunnerResult()
    with tqdm(total=len(notebooks), disable=True) as bar:
        ok = in_order(job, notebooks, name, file, keys, Progress(result, bar))
    return result, ok
