"""Training: one architecture, one seed, on the data stage's image cache.

Reads a ``Cache`` (``images`` uint8 (N, S, S, 3), ``y`` int64 (N,), ``cities``, ``index``,
``split_indices(name)``) and, on a rerun, the run folder's own checkpoints. Writes into the run
folder ``out`` (``outputs/runs/<name>/``):

- ``checkpoints/epoch_XXX.pt``: model, optimizer, scheduler, epoch, history, config, key and
  every RNG state (torch, numpy, python, the data-order generator; on a GPU its own); every
  tensor on the CPU, so it loads anywhere with ``weights_only=True``.
- ``best.pt``: the weights of the epoch with the best validation accuracy (ties: earlier).
- ``history.csv``: epoch, lr, train_loss, train_acc, val_loss, val_acc, seconds.
- ``training.json``: test accuracy of ``best.pt``, per-city accuracy, confusion matrix (rows true,
  cols predicted, in ``cities`` order), config, key and the device it trained on.
- ``predictions.csv``: one row per test image with one probability column per city.
- ``.results/training.json``: the marker of the finished training (``artifacts.ResultFolder``).

A training is keyed (``key``) by the architecture, the seed, the training settings, the data it
reads (the key of the data snapshot's cache) and this module's code with the modules it imports:
nothing else, so a later stage's settings never make it train again. Results of another key in
the folder are stale and replaced.

Training follows the paper: cross-entropy, Adam, lr 1e-4 times 0.1 every 10 epochs. The seed
fixes the initial weights and the data order/augmentation; the same config gives bit-identical
weights on CPU, and an interrupted run resumes to the same weights as an uninterrupted one.
``device`` (``citylib.devices``; ``auto``: a GPU when there is one) chooses where: on CUDA the
network is channels-last, forward passes run under bf16 autocast (the loss in fp32) and batches
go from pinned memory; deterministic kernels are asked for there too, but the numbers are not
the CPU's.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from citylib.core import devices, distributed
from citylib.nets import models
from citylib.core.artifacts import (ResultFolder, StaleError, atomic_path, code_key, read_json, remove_leftovers,
                               write_csv, write_json)
from citylib.core.config import check, config_hash, to_dict

# Inputs are mapped from [0, 255] to [-1, 1]: (x / 255 - MEAN) / STD. Fixed constants rather
# than dataset statistics, so a checkpoint needs nothing else to be used on new images.
MEAN, STD = 0.5, 0.5
SPLITS = ("train", "val", "test")
NAME = "training"   # the result marker's name in the run folder
OUTPUT_FILES = ("best.pt", "history.csv", "training.json", "predictions.csv")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; every one is part of the training's key."""

    epochs: int = 4
    batch_size: int = 16
    lr: float = 1e-4           # Adam; the paper's initial rate
    lr_step: int = 10          # multiply lr by lr_gamma every lr_step epochs (paper: 10, 0.1)
    lr_gamma: float = 0.1
    weight_decay: float = 0.0
    flip: bool = True          # random horizontal flip
    crop_jitter: int = 4       # random translation by up to this many pixels (pad and crop)
    threads: int = 2           # torch CPU threads; results are bit-identical only at equal count
    device: str = "auto"       # auto, cpu, cuda, cuda:K or mps (citylib.devices); the key holds its kind
    processes: int = 1         # > 1: trained by that many processes with DDP, launched by torchrun
    sync_batchnorm: bool = False   # with processes > 1 on CUDA: batch norm over the global batch
    loader_threads: int = 4    # off the CPU: threads making the next batches (speed only, not in the key)

    def __post_init__(self):
        check(self, epochs=">= 1", batch_size=">= 1", lr="> 0", lr_step=">= 1", lr_gamma="in (0, 1]",
              weight_decay=">= 0", crop_jitter="in [0, 32]", threads=">= 1", processes=">= 1",
              loader_threads=">= 0")
        devices.validate(self)


@dataclass(frozen=True)
class TrainResult:
    """What ``run`` did: the run folder, its config and key, history and test metrics."""

    folder: Path           # the run folder
    config: dict
    key: str
    history: pd.DataFrame
    metrics: dict          # training.json; empty while the run is unfinished
    finished: bool
    reused: bool           # True: a finished training with this key was found, nothing ran
    resumed_from: int      # last epoch found in checkpoints/ (0: started fresh)


def run(cfg: TrainConfig, out: str | Path, cache, *, arch: str, seed: int, name: str,
        extra_config: dict | None = None, progress: bool = True, stop_after: int | None = None,
        force: bool = False, keep_checkpoints: int | None = None) -> TrainResult:
    """Train ``arch`` with ``seed`` on ``cache``, writing into ``out``; reuse or resume if possible.

    ``extra_config`` (the run's full resolved config) is stored in every artifact, as information:
    it is not part of the key. ``stop_after=k`` stops after epoch k (an interruption, for resuming
    later). ``force`` clears whatever results the folder holds and trains from the start.
    ``keep_checkpoints=k`` keeps only the last k epoch checkpoints (all by default).
    """
    out = Path(out)
    idx = {s: np.asarray(cache.split_indices(s), dtype=np.int64) for s in SPLITS}
    for s in SPLITS:
        if len(idx[s]) == 0:
            raise ValueError(f"{name}: the '{s}' split is empty")
    device = distributed.local_device(devices.resolve(cfg.device))
    if cfg.sync_batchnorm and cfg.processes > 1 and device.type != "cuda":
        raise ValueError(f"{name}: train.sync_batchnorm needs one CUDA GPU per process (PyTorch's "
                         f"SyncBatchNorm has no {device.type} kernels); set it to false")
    if distributed.world()[1] != cfg.processes:
        raise ValueError(f"{name}: train.processes is {cfg.processes} but {distributed.world()[1]} "
                         f"process(es) run this training; set train.processes: {distributed.world()[1]}")
    config = run_config(arch, seed, cfg, cache, idx, extra_config)
    chash = key(arch, seed, cfg, config["data_key"])
    folder = ResultFolder(out, NAME, chash)
    if not force and folder.done() is not None:
        return TrainResult(out, config, chash, pd.read_csv(out / "history.csv"),
                           read_json(out / "training.json"), True, True, cfg.epochs)
    last = _prepare(folder, out, chash, force, name)

    images = cache.images                                    # (N, S, S, 3) uint8
    y = torch.tensor(np.asarray(cache.y), dtype=torch.int64)   # (N,), a copy: the cache is read-only
    with _deterministic(cfg.threads, device):
        main, shown = distributed.main(), devices.describe(cfg.device, device)
        progress = progress and main
        if progress:
            tqdm.write(f"{name}: training on {shown}" + _processes())
        t = _begin(arch, seed, cfg, len(cache.cities), config["image_size"], last, device)
        writer = _Writer()
        try:
            for epoch in range(t.start + 1, cfg.epochs + 1):
                row = _epoch(t, epoch, cfg, images, y, idx, name, progress)
                rngs = distributed.everyone(_get_rng_state(t.gen, device))   # each process's own
                if main:
                    writer.wait()                            # the previous epoch's files are on disk
                    _store(t, row, writer, out, config, chash, keep_checkpoints, rngs)
                if progress:
                    tqdm.write(f"{name} {epoch}/{cfg.epochs}: lr {row['lr']:.2g}  train loss "
                               f"{row['train_loss']:.3f} acc {row['train_acc']:.3f}  val loss "
                               f"{row['val_loss']:.3f} acc {row['val_acc']:.3f}")
                if stop_after is not None and epoch >= stop_after and epoch < cfg.epochs:
                    return TrainResult(out, config, chash, pd.DataFrame(t.history), {}, False, False,
                                       t.start)
        finally:
            writer.close()                                   # every file on disk before going on
        if main:
            probs = _test(t, out, images, idx["test"], cfg.batch_size)   # (n_test, C)
            metrics = _write_test_results(out, cache, idx, probs, config, chash, t.best, name,
                                          shown + _processes())
            folder.commit(OUTPUT_FILES, arch=arch, seed=int(seed), data_key=config["data_key"],
                          test_accuracy=metrics["test_accuracy"], config=config)
    distributed.barrier()                                    # the others wait for rank 0's files
    metrics = metrics if main else read_json(out / "training.json")
    return TrainResult(out, config, chash, pd.DataFrame(t.history), metrics, True, False, t.start)


def _prepare(folder: ResultFolder, out: Path, chash: str, force: bool, name: str) -> Path | None:
    """The checkpoint to resume from (None: start fresh), the same in every process. Rank 0
    marks the folder as in progress and removes half-written files of a killed run (a
    checkpoint is 0.1-1.5 GB) and results of another key; the others wait for it."""
    last = None
    if distributed.main():
        folder.begin()
        remove_leftovers(out)
        last = _resumable(out, chash, force, name)
    return distributed.share(last)


def _processes() -> str:
    size = distributed.world()[1]
    return f", {size} processes (DDP)" if size > 1 else ""


@dataclass
class _Training:
    """What the epoch loop works on: the model, its optimiser and schedule, the generator of
    data order and augmentation, the history so far, the best epoch (and, once an epoch of
    this process beats it, its weights) and the epoch it started after (0: fresh)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    history: list[dict]
    best: dict
    start: int
    best_weights: dict | None = None
    net: nn.Module | None = None     # what trains: the model, or its DDP wrapper under torchrun


def _begin(arch: str, seed: int, cfg: TrainConfig, n_classes: int, image_size: int,
           last: Path | None, device: torch.device) -> _Training:
    """The seeded model (on ``device``) and optimiser, or their state where the checkpoint
    ``last`` ends. The weights are drawn on the CPU, so a seed starts from the same network on
    every device."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    model = models.build(arch, n_classes, image_size)
    rank, size = distributed.world()
    if rank > 0:    # the same weights, but each process its own dropout masks
        torch.manual_seed(int(hashlib.sha256(f"{seed}:{rank}".encode()).hexdigest()[:15], 16))
    model = devices.place(model, device)
    # fused: one kernel over all parameters; the per-tensor loop took half of VGG11's step on CPU
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    gen = torch.Generator().manual_seed(seed)                # data order and augmentation
    t = _Training(model, opt, sched, gen, [], {"epoch": 0, "val_acc": -1.0}, 0)
    if last is not None:                                     # resume where the checkpoint ends
        ck = torch.load(last, weights_only=True, map_location="cpu")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck.get("rng_ranks", [ck["rng"]])[rank], gen, device)
        t.history, t.best, t.start = ck["history"], ck["best"], ck["epoch"]
    t.net = model
    if size > 1:                            # gradients averaged over the processes
        if cfg.sync_batchnorm:              # the same modules, parameters and buffers, synced
            t.net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        t.net = nn.parallel.DistributedDataParallel(
            t.net, device_ids=[device.index] if device.type == "cuda" else None)
    return t


def _epoch(t: _Training, epoch: int, cfg: TrainConfig, images: np.ndarray, y: torch.Tensor,
           idx: dict, name: str, progress: bool) -> dict:
    """One epoch of training, its validation and the schedule's step: the history row."""
    t0 = time.perf_counter()
    lr = t.opt.param_groups[0]["lr"]
    train_loss, train_acc = train_one_epoch(t.net, t.opt, images, y, idx["train"], cfg, t.gen,
                                            desc=f"{name} {epoch}/{cfg.epochs}", progress=progress)
    distributed.same_buffers(t.model)       # batch norm: rank 0's statistics, the ones it saves
    val_loss, val_acc = evaluate(t.model, images, y, idx["val"], cfg.batch_size)
    t.sched.step()
    row = dict(epoch=epoch, lr=lr, train_loss=train_loss, train_acc=train_acc,
               val_loss=val_loss, val_acc=val_acc, seconds=time.perf_counter() - t0)
    t.history.append(row)
    return row


def _store(t: _Training, row: dict, writer: "_Writer", out: Path, config: dict, chash: str,
           keep_checkpoints: int | None, rngs: list[dict]) -> None:
    """The epoch's files, written in the background: ``best.pt`` when the epoch beats the best
    (strictly: ties keep the earlier), its checkpoint (with ``rngs``, every process's RNG
    states, rank 0's as ``rng``), and ``history.csv``."""
    epoch, val_acc = row["epoch"], row["val_acc"]
    weights = _snapshot(t.model.state_dict())
    if val_acc > t.best["val_acc"]:
        t.best, t.best_weights = {"epoch": epoch, "val_acc": val_acc}, weights
        writer.submit(_save, {"model": weights, "epoch": epoch, "config": config,
                              "key": chash, "val_acc": val_acc}, out / "best.pt")
    writer.submit(_save_checkpoint, {
        "model": weights, "optimizer": _snapshot(t.opt.state_dict()),
        "scheduler": t.sched.state_dict(), "epoch": epoch, "history": list(t.history),
        "best": dict(t.best), "config": config, "key": chash,
        "rng": rngs[0], **({"rng_ranks": rngs} if len(rngs) > 1 else {})},
        out / "checkpoints", epoch, keep_checkpoints)
    write_csv(out / "history.csv", pd.DataFrame(t.history))


def _test(t: _Training, out: Path, images: np.ndarray, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities (n_test, C) of ``images[rows]`` with the best epoch's weights."""
    if t.best_weights is None:                               # best epoch came before a resume
        t.best_weights = torch.load(out / "best.pt", weights_only=True, map_location="cpu")["model"]
    t.model.load_state_dict(t.best_weights)
    return predict(t.model, images, batch_size, rows)


def key(arch: str, seed: int, cfg: TrainConfig, data_key: str) -> str:
    """What a training's weights depend on: architecture, seed, settings (the device as its
    kind: ``cuda:1`` as ``cuda``; ``auto`` as what it finds here, ``cpu`` on a CPU-only
    machine), data and code."""
    cfg = dataclasses.replace(devices.keyed(cfg), loader_threads=0)      # speed only
    return config_hash(NAME, code_key(__name__), arch, int(seed), cfg, data_key)


def train_one_epoch(model: nn.Module, opt: torch.optim.Optimizer, images: np.ndarray,
                    y: torch.Tensor, train_idx: np.ndarray, cfg: TrainConfig,
                    gen: torch.Generator, desc: str = "train", progress: bool = True,
                    max_steps: int | None = None, loader_threads: int | None = None) -> tuple[float, float]:
    """One pass over ``train_idx`` in an order drawn from ``gen``; returns (mean loss, accuracy).

    Under torchrun every process draws the same order and augmentation and trains on its share
    of each batch (every ``size``-th image from its rank on); its loss is the sum over its share
    times ``size`` / batch size, so that DDP's average of the gradients is the gradient of the
    whole batch's mean loss, as in one process, however the batch divides.

    Off the CPU ``cfg.loader_threads`` helper threads make the next batches meanwhile (on the
    CPU none: they would take the training's cores), unless ``loader_threads`` says otherwise;
    the results are the same.
    """
    model.train()
    device = _device_of(model)
    rank, size = distributed.world()
    order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
    starts = range(0, len(order), cfg.batch_size)
    if max_steps is not None:
        starts = starts[:max_steps]
    # running sums in float64 (the same sums as Python floats), kept on a CUDA GPU and read once
    # a second for the bar: a read per step would make the CPU wait for the GPU every step
    # (elsewhere on the CPU: MPS has no float64)
    sums = device if device.type == "cuda" else torch.device("cpu")
    loss_sum = torch.zeros((), dtype=torch.float64, device=sums)
    correct = torch.zeros((), dtype=torch.int64, device=sums)
    seen, shown = 0, time.monotonic()
    bar = tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch")
    threads = (0 if device.type == "cpu" else cfg.loader_threads) if loader_threads is None else loader_threads
    for batch, x, target in batches(images, y, order, bar, cfg, gen, device, threads):
        with devices.autocast(device):
            logits = model(x)                                                # (b, C)
        if size == 1:
            loss = F.cross_entropy(logits.float(), target)
            summed = loss.detach().to(sums).double() * len(batch)
        else:
            loss = F.cross_entropy(logits.float(), target, reduction="sum")
            summed = loss.detach().to(sums).double()
            loss = loss * (size / len(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += summed
        correct += (logits.argmax(1) == target).sum().to(sums)
        seen += len(target)
        if progress and time.monotonic() - shown > 1.0:
            shown = time.monotonic()
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                            refresh=False)
    loss_sum, correct, seen = distributed.total(loss_sum.item(), correct.item(), seen)
    return loss_sum / seen, correct / seen


def batches(images: np.ndarray, y: torch.Tensor, order: np.ndarray, starts, cfg: TrainConfig,
            gen: torch.Generator, device: torch.device, threads: int = 0):
    """(cache rows (B,), inputs (b, 3, S, S), targets (b,)) of the batches of ``order`` that
    begin at ``starts``, this process's share of each on ``device``: read from the store,
    augmented, made float, copied. With ``threads`` > 0 that many helper threads make the next
    batches while the caller trains on this one (up to 2 x threads ahead); the random draws are
    made here, in order, so the batches are the same either way."""
    rank, size = distributed.world()
    jobs = ((order[b:b + cfg.batch_size], cfg.crop_jitter) for b in starts)
    jobs = ((rows, p, _draw(len(rows), cfg, gen), images, y, slice(rank, None, size), device)
            for rows, p in jobs)
    if threads <= 0:
        yield from map(_batch, jobs)
        return
    yield from devices.spread(lambda _, job: _batch(job), [None] * threads, jobs, alone_here=False)


def _batch(job) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    rows, p, draws, images, y, mine, device = job
    x = _to(to_tensor(_augmented(images[rows], p, draws)[mine]), device)   # (b, 3, S, S) float
    return rows, x, _to(y[torch.from_numpy(rows[mine])], device)           # (b,)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S), (x / 255 - MEAN) / STD."""
    # numpy, single-threaded: on a shared 2-core CPU torch's threaded kernels are many times
    # slower on tensors this small, and batch preparation would rival the training step
    x = np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2), dtype=np.float32)
    x /= np.float32(255 * STD)
    x -= np.float32(MEAN / STD)
    return torch.from_numpy(x)


def augment(images: np.ndarray, cfg: TrainConfig, gen: torch.Generator) -> np.ndarray:
    """Random translation and horizontal flip of a uint8 batch (B, S, S, 3), drawn from ``gen``.

    Translation: reflect-pad by ``crop_jitter`` pixels, then crop S x S at a random offset
    (reflection adds no artificial edges the network could learn from).
    """
    return _augmented(images, cfg.crop_jitter, _draw(len(images), cfg, gen))


def _draw(n: int, cfg: TrainConfig, gen: torch.Generator) -> tuple | None:
    """The random part of ``augment`` for a batch of ``n``: (dy, dx, flip), or None (none)."""
    p = cfg.crop_jitter
    if p == 0 and not cfg.flip:
        return None
    dy, dx = torch.randint(0, 2 * p + 1, (2, n), generator=gen).tolist()       # offsets in [0, 2p]
    flip = (torch.rand(n, generator=gen) < 0.5).tolist() if cfg.flip else [False] * n
    return dy, dx, flip


def _augmented(images: np.ndarray, p: int, draws: tuple | None) -> np.ndarray:
    """``augment``'s pixel work, with its random draws given."""
    if draws is None:
        return images
    B, H, W, _ = images.shape
    dy, dx, flip = draws
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")  # (B, H+2p, W+2p, 3)
    out = np.empty_like(images)
    for i in range(B):
        crop = padded[i, dy[i]:dy[i] + H, dx[i]:dx[i] + W]                      # (H, W, 3)
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


def evaluate(model: nn.Module, images: np.ndarray, y: torch.Tensor, idx: np.ndarray,
             batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``images[idx]``; under torchrun each
    process scores every ``size``-th image and the sums are added up."""
    rank, size = distributed.world()
    if size == 1:
        logits = torch.from_numpy(_logits(model, images, batch_size, idx))   # (n, C)
        target = y[torch.from_numpy(idx)]                                   # (n,)
        return (F.cross_entropy(logits, target).item(),
                (logits.argmax(1) == target).float().mean().item())
    mine = idx[rank::size]
    loss = correct = 0.0
    if len(mine):
        logits = torch.from_numpy(_logits(model, images, batch_size, mine))  # (m, C)
        target = y[torch.from_numpy(mine)]
        loss = F.cross_entropy(logits, target, reduction="sum").item()
        correct = (logits.argmax(1) == target).sum().item()
    loss, correct = distributed.total(loss, correct)
    return loss / len(idx), correct / len(idx)


def predict(model: nn.Module, images: np.ndarray, batch_size: int = 64,
            rows: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities (N, C) float32 for uint8 images (N, S, S, 3), or for ``images[rows]``
    read a batch at a time (a memory-mapped cache is never loaded whole); eval mode, no grad."""
    return torch.softmax(torch.from_numpy(_logits(model, images, batch_size, rows)), 1).numpy()


def _logits(model: nn.Module | list[nn.Module], images: np.ndarray, batch_size: int,
            rows: np.ndarray | None = None) -> np.ndarray:
    """Logits (n, C) float32 of the uint8 ``images[rows]`` (default: all), on the device the
    model is on (a list: copies of it on several devices, the batches shared out in turn); the
    images are read ``batch_size`` at a time, so a memory-mapped cache is never loaded whole."""
    nets = model if isinstance(model, list) else [model]
    was_training = [m.training for m in nets]
    for m in nets:
        m.eval()
    rows = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
    batches = (np.asarray(images[rows[b:b + batch_size]]) for b in range(0, len(rows), batch_size))

    def forward(net: nn.Module, batch: np.ndarray) -> torch.Tensor:                   # (B, S, S, 3)
        device = _device_of(net)
        with torch.no_grad(), devices.autocast(device):
            return net(_to(to_tensor(batch), device)).float().cpu()                    # (B, C)

    out = list(devices.spread(forward, nets, batches))
    for m, mode in zip(nets, was_training):
        m.train(mode)
    return torch.cat(out).numpy()


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) are; the CPU for a model with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``: as it is on the CPU; from pinned memory, without waiting, elsewhere."""
    if device.type == "cpu":
        return x
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def load_model(run_dir: str | Path, which: str | int = "best",
               device: str | torch.device = "cpu") -> tuple[nn.Module, list[str], dict]:
    """(model in eval mode, cities, config) from ``best.pt``, the ``"last"`` or a given epoch,
    on ``device`` (a ``device`` setting such as ``auto``, or a torch device)."""
    run_dir = Path(run_dir)
    if which == "best":
        path = run_dir / "best.pt"
    elif which == "last":
        found = _checkpoints(run_dir / "checkpoints")
        path = found[-1] if found else run_dir / "checkpoints" / "epoch_*.pt"
    else:
        path = run_dir / "checkpoints" / f"epoch_{int(which):03d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, weights_only=True, map_location="cpu")
        config = ck["config"]
        model = models.build(config["arch"], len(config["cities"]), config["image_size"])
        model.load_state_dict(ck["model"])
    except Exception as e:   # truncated, another file, another network's weights
        raise ValueError(f"{path}: not a readable citylib checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); train the run again") from None
    device = devices.resolve(device) if isinstance(device, str) else torch.device(device)
    return devices.place(model, device).eval(), list(config["cities"]), config


def run_config(arch: str, seed: int, cfg: TrainConfig, cache, idx: dict, extra: dict | None) -> dict:
    """What a training records about itself: settings, cities, image size, the data's key."""
    images = cache.images
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3:
        raise ValueError(f"cache.images must be (N, S, S, 3), got {images.shape}")
    return {
        "arch": arch, "seed": int(seed), "train": to_dict(cfg),
        "cities": [str(c) for c in cache.cities], "image_size": int(images.shape[1]),
        "data_key": data_key(cache, idx),
        # a JSON round trip keeps the stored config to plain types (weights_only loading)
        "extra": json.loads(json.dumps(extra or {}, default=str)),
    }


def data_key(cache, idx: dict) -> str:
    """The key of the data a training reads: its cache's (the data snapshot's) for a cache on
    disk, else a hash of the arrays and the split."""
    if getattr(cache, "key", None):
        return str(cache.key)
    h = hashlib.sha256()
    for part in (cache.images, np.asarray(cache.y, dtype=np.int64), *(idx[s] for s in SPLITS)):
        h.update(np.ascontiguousarray(part).data)
    return h.hexdigest()[:16]


def check_data(run_dir: Path, config: dict, cache, before: str = "using it") -> None:
    """StaleError unless ``cache`` is the data the run's model (its ``config``) was trained on."""
    have = data_key(cache, {s: cache.split_indices(s) for s in SPLITS})
    if have != config["data_key"] or list(map(str, cache.cities)) != list(config["cities"]):
        raise StaleError(f"{run_dir}: the model was trained on data snapshot {config['data_key']}, "
                         f"but the data stage now holds {have} (its source or settings changed): "
                         f"train again (notebook 02, or `citylib run`) before {before}")


def _resumable(out: Path, chash: str, force: bool, name: str) -> Path | None:
    """The last checkpoint of this key to resume from, or None. ``force``, or results of
    another key (settings, data or code changed), clear the folder's training results first."""
    found = _checkpoints(out / "checkpoints")
    stale = bool(found) and torch.load(found[-1], weights_only=True, mmap=True).get("key") != chash
    if force or stale or any((out / f).exists() for f in OUTPUT_FILES) and not found:
        if stale and not force:
            tqdm.write(f"{name}: {out} holds a training of other settings, data or code: "
                       "training again")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for f in OUTPUT_FILES:
            (out / f).unlink(missing_ok=True)
        return None
    return found[-1] if found else None


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """Epoch checkpoints in epoch order."""
    return sorted(ckpt_dir.glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def _save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _save_checkpoint(obj: dict, ckpt_dir: Path, epoch: int, keep: int | None) -> None:
    """Write epoch ``epoch``'s checkpoint, then drop all but the last ``keep`` (None: keep all)."""
    _save(obj, ckpt_dir / f"epoch_{epoch:03d}.pt")
    if keep is not None:
        for old in _checkpoints(ckpt_dir)[:-max(1, keep)]:
            old.unlink()


def _snapshot(state: Any) -> Any:
    """A copy of a state dict that later training steps cannot change, every tensor cloned to
    the CPU (so that a checkpoint written on a GPU loads anywhere)."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        out = type(state)((k, _snapshot(v)) for k, v in state.items())
        if hasattr(state, "_metadata"):         # a module state dict's versions, as deepcopy keeps them
            out._metadata = copy.deepcopy(state._metadata)
        return out
    if isinstance(state, (list, tuple)):
        return type(state)(_snapshot(v) for v in state)
    return copy.deepcopy(state)


class _Writer:
    """Writes an epoch's files on a background thread while the next epoch trains.

    ``wait`` blocks until everything submitted is on disk and re-raises a failed write; each file
    is still written atomically, so an interruption leaves the previous checkpoint intact.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="citylib-checkpoint")
        self._pending: list = []

    def submit(self, fn, *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def _write_test_results(out: Path, cache, idx: dict, probs: np.ndarray, config: dict,
                        chash: str, best: dict, name: str, device: str) -> dict:
    """``predictions.csv`` and ``training.json`` (the test metrics); returns the metrics."""
    cities = list(config["cities"])
    test = idx["test"]
    true = np.asarray(cache.y, dtype=np.int64)[test]         # (n_test,)
    pred = probs.argmax(1)                                   # (n_test,)
    C = len(cities)
    confusion = np.zeros((C, C), dtype=np.int64)             # rows true, cols predicted
    np.add.at(confusion, (true, pred), 1)
    per_city = {c: (float(confusion[k, k] / confusion[k].sum()) if confusion[k].sum() else None)
                for k, c in enumerate(cities)}
    frame = pd.DataFrame({
        "index": test, "path": cache.index["path"].iloc[test].to_numpy(),
        "city": [cities[k] for k in true], "predicted": [cities[k] for k in pred],
        "correct": true == pred,
        **{f"prob_{c}": probs[:, k] for k, c in enumerate(cities)},
    })
    write_csv(out / "predictions.csv", frame)
    metrics = {
        "run": name, "test_accuracy": float((true == pred).mean()), "per_city_accuracy": per_city,
        "confusion_matrix": confusion.tolist(), "cities": cities, "best_epoch": best["epoch"],
        "best_val_accuracy": best["val_acc"],
        **{f"n_{s}": int(len(idx[s])) for s in SPLITS},
        "config": config, "key": chash, "device": device,
    }
    write_json(out / "training.json", metrics)
    return metrics


@contextlib.contextmanager
def _deterministic(threads: int, device: torch.device = torch.device("cpu")):
    """Fixed thread count, deterministic kernels; the caller's torch/numpy/python RNGs restored
    (on CUDA also the GPU's generator; cuBLAS then needs a fixed workspace to be deterministic)."""
    prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            np.random.get_state(), random.getstate(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark)
    torch.set_num_threads(threads)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    # CUDA has no deterministic backward for adaptive average pooling (VGG11, AlexNet) or the
    # average pool inside local response norm (VGG-S): there it warns instead of raising
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        torch.set_num_threads(prev[0])
        torch.use_deterministic_algorithms(prev[1], warn_only=prev[4])
        torch.backends.cudnn.benchmark = prev[5]
        np.random.set_state(prev[2])
        random.setstate(prev[3])


def _get_rng_state(gen: torch.Generator, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """Every RNG state as tensors and plain lists (loadable with weights_only=True); on CUDA
    also the generator of this process's GPU (dropout there draws from it)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    cuda = {"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
    return {
        **cuda, "torch": torch.get_rng_state(), "generator": gen.get_state(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def _set_rng_state(state: dict[str, Any], gen: torch.Generator,
                   device: torch.device = torch.device("cpu")) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    gen.set_state(state["generator"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
