"""Which device a stage computes on: the ``device`` setting, resolved once and said aloud.

``auto`` (the default) is the best the machine has: the first CUDA GPU, else Apple's MPS, else
the CPU. ``cpu``, ``cuda``, ``cuda:K`` and ``mps`` ask for one; asking for a device torch cannot
see is an error before any work. ``cuda:all`` is the first GPU for training and, for the
analyses' passes (Grad-CAM masks, the counterfactual passes, the method sweep), every GPU, a copy of the
network on each and the batches shared out in turn (``replicas``, ``spread``). Reads and writes
nothing.

What a device changes in the results: the CPU path is bit-identical from run to run at a
given thread count (``train.threads``). On CUDA the forward passes run under bf16 autocast and
the network in channels-last layout, so its numbers differ from the CPU's in the last bits and
beyond; a result's key therefore holds the device's kind (``setting_kind``), never ``auto``.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import re
from concurrent.futures import ThreadPoolExecutor

import torch

NAMES = "auto, cpu, cuda, cuda:K, cuda:all or mps"


class DeviceError(ValueError):
    """A device setting names a device this machine does not have."""
_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+|:all)?")


def check(name: str) -> str | None:
    """None when ``name`` is a device setting, else what it must be (for a config's error)."""
    return None if isinstance(name, str) and _NAME.fullmatch(name) else f"one of {NAMES}"


def validate(cfg) -> None:
    """ValueError unless a stage's settings ``cfg`` have a well-formed ``device``."""
    if (want := check(cfg.device)) is not None:
        raise ValueError(f"out of range: 'device' = {cfg.device!r} must be {want}")


def resolve(name: str) -> torch.device:
    """The device ``name`` means on this machine; DeviceError when torch cannot use it."""
    if check(name) is not None:
        raise ValueError(f"device {name!r} must be {NAMES}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device("cuda" if name == "cuda:all" else name)   # cuda:all: the first leads
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r}: torch sees no CUDA GPU here "
                               f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                               "use device: auto or cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps():
        raise DeviceError(f"device {name!r}: torch sees no MPS device here; use device: auto or cpu")
    return device


def kind(device: torch.device) -> str:
    """What a result's key holds of the device: ``cpu``, ``cuda`` or ``mps``."""
    return torch.device(device).type


def setting_kind(name: str) -> str:
    """The kind a ``device`` setting names: as written for ``cpu``, ``cuda[:K]`` and ``mps``
    (so the key of a run trained on a GPU is the same on a machine without one, where its later
    stages run), and for ``auto`` the kind it resolves to on this machine."""
    if check(name) is not None:
        raise ValueError(f"device {name!r} must be {NAMES}")
    return kind(resolve(name)) if name == "auto" else torch.device(name.removesuffix(":all")).type


def every(name: str) -> list[torch.device]:
    """The devices a stage spreads its forward passes over: every GPU for ``cuda:all``, else
    the one ``name`` means."""
    first = resolve(name)
    if name != "cuda:all":
        return [first]
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def replicas(model: torch.nn.Module, targets: list[torch.device]) -> list[torch.nn.Module]:
    """``model`` (on ``targets[0]``) and a copy of it in eval mode on each other device."""
    return [model] + [place(copy.deepcopy(model), d).eval() for d in targets[1:]]


def spread(fn, workers: list, jobs, alone_here: bool = True):
    """``fn(worker, job)`` for every job, job i by worker i mod K, each worker in its own thread
    (one per device: CUDA runs them side by side), at most 2K jobs ahead; yields the results in
    job order. One worker: here, in turn, unless not ``alone_here``."""
    if len(workers) == 1 and alone_here:
        for job in jobs:
            yield fn(workers[0], job)
        return
    pools = [ThreadPoolExecutor(1) for _ in workers]
    pending: collections.deque = collections.deque()
    try:
        for i, job in enumerate(jobs):
            k = i % len(workers)
            pending.append(pools[k].submit(fn, workers[k], job))
            if len(pending) >= 2 * len(workers):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)


def keyed(cfg):
    """A stage's settings as its key holds them: the ``device`` setting as its kind."""
    return dataclasses.replace(cfg, device=setting_kind(cfg.device))


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``: channels-last off the CPU (cuDNN's and MPS's faster layout)."""
    if torch.device(device).type == "cpu":
        return model
    return model.to(device, memory_format=torch.channels_last)


def describe(name: str, device: torch.device) -> str:
    """One line saying what was asked and what is used, e.g. "auto -> cpu (no GPU found)"."""
    if device.type == "cuda":
        what = f"{device} ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        what = f"cpu ({torch.get_num_threads()} threads" + (", no GPU found)" if name == "auto" else ")")
    else:
        what = str(device)
    return what if name == str(device) else f"{name} -> {what}"


def autocast(device: torch.device):
    """bf16 autocast for forward passes on CUDA; nothing elsewhere (the CPU stays in fp32)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _mps() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
