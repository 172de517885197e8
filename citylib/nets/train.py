"""Training: one architecture, one seed, on the data stage's image cache; the loop in plain view.

Reads a ``Cache`` (``images`` uint8 (N, S, S, 3), ``y`` int64 (N,), ``cities``, ``index``,
``split_indices(name)``) and, on a rerun, the run folder's own checkpoints. Writes into the run
folder ``out`` (``outputs/runs/<name>/``), through ``citylib.nets.checkpoint``:

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
``device`` (``citylib.core.devices``; ``auto``: a GPU when there is one) chooses where: on CUDA
the network is channels-last, forward passes run under bf16 autocast (the loss in fp32) and
batches go from pinned memory; deterministic kernels are asked for there too, but the numbers
are not the CPU's. Loading a trained network and running it is ``checkpoint`` and ``infer``.
"""
from __future__ import annotations

import hashlib
import random
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from citylib.core import devices, distributed
from citylib.core.artifacts import ResultFolder, code_key, read_json, remove_leftovers, write_csv
from citylib.core.config import check, config_hash
from citylib.nets import checkpoint, infer, loader, models, pretrained
from citylib.nets.checkpoint import OUTPUT_FILES, SPLITS

NAME = checkpoint.TRAINING   # the result marker's name in the run folder


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
    init: str = "scratch"      # scratch, imagenet or a weights file (citylib.nets.pretrained); the key
    #                            holds the weights' content hash, not the path
    freeze: tuple[str, ...] = ()   # parameter-name prefixes kept fixed (e.g. conv1, bn1, layer1)
    backbone_lr_scale: float = 1.0  # the backbone's learning rate is lr times this; the head's is lr

    def __post_init__(self):
        check(self, epochs=">= 1", batch_size=">= 1", lr="> 0", lr_step=">= 1", lr_gamma="in (0, 1]",
              weight_decay=">= 0", crop_jitter="in [0, 32]", threads=">= 1", processes=">= 1",
              loader_threads=">= 0", backbone_lr_scale="> 0")
        if not self.init.strip():
            raise ValueError("'init' is empty: scratch, imagenet or the path of a weights file")
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
    device = _checked(cfg, idx, name)
    start = pretrained.resolve(cfg.init, arch)               # ConfigError before any work
    pretrained.check(start, arch, int(cache.images.shape[1]), cfg.freeze)
    config = checkpoint.run_config(arch, seed, cfg, cache, idx, extra_config, start.normalisation)
    chash = key(arch, seed, cfg, config["data_key"])
    folder = ResultFolder(out, NAME, chash)
    if not force and folder.done() is not None:
        return TrainResult(out, config, chash, pd.read_csv(out / "history.csv"),
                           read_json(out / "training.json"), True, True, cfg.epochs)
    last = _prepare(folder, out, chash, force, name)

    images = cache.images                                    # (N, S, S, 3) uint8
    y = torch.tensor(np.asarray(cache.y), dtype=torch.int64)   # (N,), a copy: the cache is read-only
    with checkpoint.deterministic(cfg.threads, device):
        main, shown = distributed.main(), devices.describe(cfg.device, device)
        progress = progress and main
        if progress:
            tqdm.write(f"{name}: training on {shown}" + _processes())
        t = _begin(arch, seed, cfg, config, start, last, device)
        if progress:
            tqdm.write(f"{name}: starting {pretrained.describe(t.init)}")
        writer = checkpoint.Writer()
        try:
            for epoch in range(t.start + 1, cfg.epochs + 1):
                row = _epoch(t, epoch, cfg, images, y, idx, name, progress)
                rngs = distributed.everyone(checkpoint.rng_state(t.gen, device))   # each process's own
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
            metrics = checkpoint.write_test_results(out, cache, idx, probs, config, chash, t.best, t.init, name,
                                          shown + _processes())
            folder.commit(OUTPUT_FILES, arch=arch, seed=int(seed), data_key=config["data_key"],
                          test_accuracy=metrics["test_accuracy"], config=config)
    distributed.barrier()                                    # the others wait for rank 0's files
    metrics = metrics if main else read_json(out / "training.json")
    return TrainResult(out, config, chash, pd.DataFrame(t.history), metrics, True, False, t.start)


def _checked(cfg: TrainConfig, idx: dict, name: str) -> torch.device:
    """The device this process trains on, once the splits and the process settings are usable."""
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
    return device


def _prepare(folder: ResultFolder, out: Path, chash: str, force: bool, name: str) -> Path | None:
    """The checkpoint to resume from (None: start fresh), the same in every process. Rank 0
    marks the folder as in progress and removes half-written files of a killed run (a
    checkpoint is 0.1-1.5 GB) and results of another key; the others wait for it."""
    last = None
    if distributed.main():
        folder.begin()
        remove_leftovers(out)
        last = checkpoint.resumable(out, chash, force, name)
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
    init: dict | None = None         # what it started from (``pretrained.apply``'s report)


def _begin(arch: str, seed: int, cfg: TrainConfig, config: dict, start: "pretrained.Start",
           last: Path | None, device: torch.device) -> _Training:
    """The seeded model (on ``device``), started from ``start``'s weights, and its optimiser, or
    their state where the checkpoint ``last`` ends. The weights are drawn on the CPU, so a seed
    starts from the same network on every device."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    model = models.build(arch, len(config["cities"]), config["image_size"])
    report = pretrained.apply(model, start, arch, config["cities"])
    rank, size = distributed.world()
    if rank > 0:    # the same weights, but each process its own dropout masks
        torch.manual_seed(int(hashlib.sha256(f"{seed}:{rank}".encode()).hexdigest()[:15], 16))
    model = devices.place(model, device)
    opt = pretrained.optimiser(model, arch, cfg)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    gen = torch.Generator().manual_seed(seed)                # data order and augmentation
    t = _Training(model, opt, sched, gen, [], {"epoch": 0, "val_acc": -1.0}, 0, init=report)
    if last is not None:                                     # resume where the checkpoint ends
        ck = torch.load(last, weights_only=True, map_location="cpu")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        checkpoint.set_rng_state(ck.get("rng_ranks", [ck["rng"]])[rank], gen, device)
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


def _store(t: _Training, row: dict, writer: "checkpoint.Writer", out: Path, config: dict, chash: str,
           keep_checkpoints: int | None, rngs: list[dict]) -> None:
    """The epoch's files, written in the background: ``best.pt`` when the epoch beats the best
    (strictly: ties keep the earlier), its checkpoint (with ``rngs``, every process's RNG
    states, rank 0's as ``rng``), and ``history.csv``."""
    epoch, val_acc = row["epoch"], row["val_acc"]
    weights = checkpoint.snapshot(t.model.state_dict())
    if val_acc > t.best["val_acc"]:
        t.best, t.best_weights = {"epoch": epoch, "val_acc": val_acc}, weights
        writer.submit(checkpoint.save, {"model": weights, "epoch": epoch, "config": config,
                              "key": chash, "val_acc": val_acc}, out / "best.pt")
    writer.submit(checkpoint.save_checkpoint, {
        "model": weights, "optimizer": checkpoint.snapshot(t.opt.state_dict()),
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
    return infer.predict(t.model, images, batch_size, rows)


def key(arch: str, seed: int, cfg: TrainConfig, data_key: str) -> str:
    """What a training's weights depend on: architecture, seed, settings (the device as its
    kind: ``cuda:1`` as ``cuda``; ``auto`` as what it finds here, ``cpu`` on a CPU-only
    machine), data and code."""
    cfg = dataclasses.replace(devices.keyed(cfg), loader_threads=0,      # speed only
                              init=pretrained.keyed(cfg.init, arch))     # the weights, not the path
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
    for norm_layer in pretrained.frozen_norms(model, getattr(cfg, "freeze", ())):
        norm_layer.eval()                    # frozen: its running statistics stay the weights' too
    device = infer.device_of(model)
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
    for batch, x, target in loader.batches(images, y, order, bar, cfg, gen, device, threads,
                                           infer.normalisation(model)):
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


def evaluate(model: nn.Module, images: np.ndarray, y: torch.Tensor, idx: np.ndarray,
             batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``images[idx]``; under torchrun each
    process scores every ``size``-th image and the sums are added up."""
    rank, size = distributed.world()
    if size == 1:
        logits = torch.from_numpy(infer.logits(model, images, batch_size, idx))   # (n, C)
        target = y[torch.from_numpy(idx)]                                   # (n,)
        return (F.cross_entropy(logits, target).item(),
                (logits.argmax(1) == target).float().mean().item())
    mine = idx[rank::size]
    loss = correct = 0.0
    if len(mine):
        logits = torch.from_numpy(infer.logits(model, images, batch_size, mine))  # (m, C)
        target = y[torch.from_numpy(mine)]
        loss = F.cross_entropy(logits, target, reduction="sum").item()
        correct = (logits.argmax(1) == target).sum().item()
    loss, correct = distributed.total(loss, correct)
    return loss / len(idx), correct / len(idx)


