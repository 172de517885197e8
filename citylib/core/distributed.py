"""Several processes training one network: PyTorch DDP, launched by ``torchrun``.

``torchrun --nproc_per_node N -m citylib train --params FILE`` starts N processes; each calls
``start`` (which reads torchrun's RANK, WORLD_SIZE, LOCAL_RANK and MASTER_* variables) and the
training then runs in all of them (``citylib.train``): every process draws the same global batch
order and augmentation from the run's seed, takes its share of each batch, and DDP averages the
gradients, so the weights are those of one process with the same global batch (up to the order
of floating-point sums). Process 0 alone writes files. Backend: NCCL when the processes train on
CUDA GPUs (one each, ``cuda:LOCAL_RANK``), else gloo on the CPU. Reads and writes nothing.

Without torchrun (or with one process) every function here is the single-process identity.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def start(device: str = "auto") -> bool:
    """Join the process group torchrun describes; False (nothing done) when there is none."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= gpus:
            raise RuntimeError(f"process {local} of this machine has no GPU of its own ({gpus} GPU(s)); "
                               "start at most that many processes per machine")
        torch.cuda.set_device(local)
    # long: the first process may be building the data stage while the others wait
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))
    return True


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def main() -> bool:
    """Whether this process writes the files (rank 0)."""
    return world()[0] == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def share(value):
    """Rank 0's ``value`` (any picklable object), in every process."""
    if not dist.is_initialized():
        return value
    box = [value if main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def everyone(value) -> list:
    """Each process's ``value`` (any picklable object), in rank order, in every process."""
    if not dist.is_initialized():
        return [value]
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, value)
    return found


def same_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (batch norm's running statistics) in every process's ``model``: DDP
    brings them into line only at its next forward pass, so before an evaluation they differ."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def total(*values: float) -> list[float]:
    """The sums over all processes of each of ``values`` (float64, on the CPU)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def local_device(device: torch.device) -> torch.device:
    """A CUDA device becomes this process's own GPU (``cuda:LOCAL_RANK``) under torchrun."""
    if device.type == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
