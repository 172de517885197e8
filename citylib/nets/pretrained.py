"""Where a training starts (``train.init``): from scratch, from torchvision's ImageNet weights, or
from a file of weights (torchvision's state-dict format or a citylib checkpoint).

``resolve(init, arch)`` reads what ``init`` names into a ``Start``: the state dict, the file and
its content hash (the training key holds the hash, so a changed file trains again), the input
normalisation the weights expect and, for a citylib checkpoint, the cities of its output layer.
``imagenet`` goes through torchvision's weights API (``ResNet18_Weights.IMAGENET1K_V1`` ...),
which reads ``$TORCH_HOME/hub/checkpoints/<file>`` and downloads it there when it is missing;
where it cannot, the error names the file and where it goes. ``check`` tries a ``Start`` on the
architecture's shapes (a network on the meta device: no memory, no time), so a file of another
architecture stops the run before any work. ``apply`` copies the weights into a freshly built
network and says which tensors were loaded and which newly initialised: the output layer is
refitted to the dataset's cities unless the file is a citylib checkpoint of the same cities,
and any classifier tensor whose shape differs (fc1 at small image sizes) stays new.
Fine-tuning: ``frozen`` lists the parameters ``train.freeze`` keeps fixed (``frozen_norms`` the
batch-norm layers kept in eval mode with them), ``optimiser`` gives the backbone its smaller
learning rate (``train.backbone_lr_scale``). Reads the weights file; writes only what
torchvision's download writes.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from citylib.core.config import ConfigError
from citylib.nets import infer, models

SCRATCH, IMAGENET = "scratch", "imagenet"
# the architectures torchvision has ImageNet weights for: the name of their weights enum
TORCHVISION_WEIGHTS = {"vgg11": "VGG11_Weights", "resnet18": "ResNet18_Weights", "alexnet": "AlexNet_Weights"}


@dataclass(frozen=True)
class Start:
    """What a training starts from: ``init`` as given (``scratch``, ``imagenet`` or a path), the
    file read (None: scratch), its sha256, the normalisation the weights expect, the state dict
    and, for a citylib checkpoint, the cities of its output layer."""

    init: str
    file: Path | None = None
    sha256: str = ""
    normalisation: infer.Normalisation = infer.SCRATCH
    state: dict | None = field(default=None, repr=False, compare=False)
    cities: tuple[str, ...] | None = None


def keyed(init: str, arch: str) -> str:
    """What a training key holds of ``init``: the kind of start and the weights' content (its
    sha256), not the file's path, so a changed file trains again and a moved one does not."""
    if init == SCRATCH:
        return SCRATCH
    path = imagenet_file(arch) if init == IMAGENET else Path(init).expanduser()
    return f"{IMAGENET if init == IMAGENET else 'file'}:{file_hash(path) if path.is_file() else 'absent'}"


def resolve(init: str, arch: str) -> Start:
    """``init`` read for ``arch``; ConfigError (one line, naming the file) when it cannot be."""
    if init == SCRATCH:
        return Start(SCRATCH)
    if init == IMAGENET:
        return _imagenet(arch)
    path = Path(init).expanduser()
    if not path.is_file():
        raise ConfigError(f"'train.init' = {init!r}: no such file (scratch, imagenet or a weights file)")
    state = _read(path)
    cities = None
    if isinstance(state.get("config"), dict) and "model" in state:           # a citylib checkpoint
        config = state["config"]
        if config.get("arch") != arch:
            raise ConfigError(f"'train.init' = {init!r}: a checkpoint of {config.get('arch')!r}, "
                              f"but this run's architecture is {arch!r}")
        cities = tuple(map(str, config.get("cities", ())))
        norm = infer.Normalisation.of(config.get("normalisation"))
        state = state["model"]
    else:                                            # torchvision's format: ImageNet's inputs
        state = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
        norm = infer.IMAGENET
    state = {k.removeprefix("module."): v for k, v in state.items()}      # saved from a DDP wrapper
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"'train.init' = {init!r}: not a state dict (names to tensors)")
    return Start(str(path.resolve()), path.resolve(), file_hash(path), norm, state, cities)


def _read(path: Path) -> dict:
    try:
        try:
            state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError as e:   # saved before PyTorch 1.6 (torchvision's older files): no mmap
            if "mmap" not in str(e):
                raise
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:   # truncated, not a PyTorch file, pickled code
        raise ConfigError(f"'train.init': {path}: not a readable PyTorch weights file "
                          f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"'train.init': {path}: holds a {type(state).__name__}, not a state dict")
    return state


def imagenet_weights(arch: str):
    """torchvision's ImageNet weights entry for ``arch`` (``IMAGENET1K_V1``); ConfigError for an
    architecture torchvision has none for."""
    if arch not in TORCHVISION_WEIGHTS:
        raise ConfigError(f"'train.init' = 'imagenet': torchvision has no ImageNet weights for {arch!r}; "
                          f"those that have them: {', '.join(TORCHVISION_WEIGHTS)}")
    from torchvision import models as tvm     # here: importing it costs a second or more

    return getattr(tvm, TORCHVISION_WEIGHTS[arch]).IMAGENET1K_V1


def imagenet_file(arch: str) -> Path:
    """Where torchvision keeps ``arch``'s ImageNet weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    url = imagenet_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _imagenet(arch: str) -> Start:
    weights = imagenet_weights(arch)
    target = imagenet_file(arch)
    try:                  # torchvision's API: the file where it keeps it, downloaded when missing
        state = weights.get_state_dict(progress=False)
    except Exception as e:
        if target.is_file():       # there, but unreadable
            raise ConfigError(f"'train.init' = 'imagenet': {target}: not a readable PyTorch weights file "
                              f"({type(e).__name__}); delete it, or place {weights.url} there") from None
        raise ConfigError(f"'train.init' = 'imagenet': {arch}'s ImageNet weights cannot be downloaded here "
                          f"({type(e).__name__}); place {weights.url} at {target}") from None
    return Start(IMAGENET, target, file_hash(target), infer.IMAGENET, dict(state))


_HASHES: dict[tuple, str] = {}


def file_hash(path: Path) -> str:
    """sha256 of a file's content (remembered per path, size and modification time)."""
    st = path.stat()
    at = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if at not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[at] = h.hexdigest()
    return _HASHES[at]


def check(start: Start, arch: str, image_size: int, freeze: tuple[str, ...] = ()) -> None:
    """ConfigError unless ``start``'s weights fit ``arch`` at ``image_size`` (tried on the meta
    device) and every ``freeze`` prefix names some of its parameters."""
    with torch.device("meta"):
        model = models.build(arch, 2, image_size)
    if start.state is not None:
        _plan(model, start, arch, None)
    names = [n for n, _ in model.named_parameters()]
    if freeze and len(frozen(model, freeze)) == len(names):
        raise ConfigError(f"'train.freeze' = {list(freeze)}: keeps every parameter of {arch} fixed; nothing would train")
    for prefix in freeze:
        if not any(under(n, prefix) for n in names):
            raise ConfigError(f"'train.freeze': {prefix!r} names no parameter of {arch}; its parameters "
                              f"begin {', '.join(sorted({n.split('.')[0] for n in names}))}")


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def frozen(model: nn.Module, freeze: tuple[str, ...]) -> list[str]:
    """Names of the parameters ``freeze`` (prefixes of parameter names) keeps fixed."""
    return [n for n, _ in model.named_parameters() if any(under(n, p) for p in freeze)]


def frozen_norms(model: nn.Module, freeze: tuple[str, ...]) -> list[nn.Module]:
    """The batch-norm layers whose parameters are all frozen: kept in eval mode while training,
    so that their running statistics stay those of the weights too (a DDP wrapper: its module's)."""
    if not freeze:
        return []
    base = getattr(model, "module", model)
    return [m for n, m in base.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and all(any(under(f"{n}.{p}", f) for f in freeze) for p, _ in m.named_parameters())]


def output_layer(model: nn.Module) -> tuple[str, ...]:
    """The state-dict names of the network's last linear layer, the one that scores the cities."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return (f"{name}.weight", f"{name}.bias")


def _plan(model: nn.Module, start: Start, arch: str, cities: list[str] | None) -> tuple[dict, list[str]]:
    """(tensors to load, names left newly initialised); ConfigError for a file of another
    network: a name the model lacks, a missing tensor or a shape that differs outside the head."""
    head, where = models.REGISTRY[arch].head, f"'train.init' = {start.init!r}"
    own = model.state_dict()
    extra = sorted(set(start.state) - set(own))
    if extra:
        raise ConfigError(f"{where}: not {arch} weights: {len(extra)} tensor(s) it has no place for, "
                          f"e.g. {extra[0]!r}")
    out = output_layer(model)
    keep_out = start.cities is not None and cities is not None and list(start.cities) == list(cities)
    load, new = {}, []
    for name, tensor in own.items():
        src = start.state.get(name)
        in_head = under(name, head)
        if src is None and not in_head and not name.endswith("num_batches_tracked"):
            raise ConfigError(f"{where}: not {arch} weights: {name!r} is missing")
        if src is not None and src.shape != tensor.shape and not in_head:
            raise ConfigError(f"{where}: not {arch} weights: {name!r} is {tuple(src.shape)}, "
                              f"{arch} has {tuple(tensor.shape)}")
        if src is None or src.shape != tensor.shape or (name in out and not keep_out):
            new.append(name)
        else:
            load[name] = src
    return load, new


def apply(model: nn.Module, start: Start, arch: str, cities: list[str]) -> dict:
    """Copy ``start``'s weights into ``model`` (freshly built, on the CPU) and record its input
    normalisation on it; returns what ``training.json`` says of the start: init, file, sha256,
    normalisation, the tensors loaded and those newly initialised."""
    model.normalisation = start.normalisation
    report = {"init": start.init, "file": str(start.file) if start.file else None, "sha256": start.sha256,
              "normalisation": start.normalisation.to_dict()}
    if start.state is None:
        return {**report, "loaded": [], "new": list(model.state_dict())}
    load, new = _plan(model, start, arch, cities)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in load:
                tensor.copy_(load[name])
    return {**report, "loaded": list(load), "new": new}


def describe(report: dict) -> str:
    """One line on what a training started from."""
    if report["file"] is None:
        return "from scratch"
    new = report["new"]
    return (f"from {report['init'] if report['init'] == IMAGENET else 'file'} {report['file']}: "
            f"{len(report['loaded'])} tensors loaded, {len(new)} newly initialised"
            + (f" ({', '.join(new[:4])}{', ...' if len(new) > 4 else ''})" if new else ""))


def optimiser(model: nn.Module, arch: str, cfg) -> torch.optim.Optimizer:
    """Adam over the parameters ``train.freeze`` leaves free (the frozen ones no longer need
    gradients); with ``backbone_lr_scale`` != 1 in two groups, the head's (at ``lr``, first, the
    history's ``lr``) and the backbone's (at ``lr`` times the scale)."""
    fixed = set(frozen(model, cfg.freeze))
    free = []
    for n, p in model.named_parameters():
        p.requires_grad_(n not in fixed)
        if n not in fixed:
            free.append((n, p))
    groups: list = [p for _, p in free]
    if cfg.backbone_lr_scale != 1.0:
        head = models.REGISTRY[arch].head
        in_head = [under(n, head) for n, _ in free]
        groups = [{"params": [p for (_, p), h in zip(free, in_head) if h]},
                  {"params": [p for (_, p), h in zip(free, in_head) if not h], "lr": cfg.lr * cfg.backbone_lr_scale}]
        groups = [g for g in groups if g["params"]]
    # fused: one kernel over all parameters; the per-tensor loop took half of VGG11's step on CPU
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
