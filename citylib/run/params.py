"""Parameter files: one YAML file per run (``parameters/<arch>_seed<k>.yaml``).

Reads a parameter file, validates every key and type against the stages' settings
dataclasses, and returns a frozen ``RunConfig``. The run's name (and its output folder,
``outputs/runs/<name>/``) is the file's stem. Nothing is written here. Validation happens
before any work: an unknown key, an unknown architecture, a wrong type or a missing
dataset stops with a message naming the file and the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from citylib.core import paths
from citylib.core.config import ConfigError, check, config_hash, from_dict, load_yaml, to_dict
from citylib.data.dataset import DataConfig
from citylib.nets import pretrained
from citylib.nets.models import ARCHS, MIN_IMAGE_SIZE
from citylib.run import table
from citylib.world import worldfile


def _sections(cls):
    """``cls`` as a frozen dataclass with one field per section of the stage table, each
    defaulting to its settings class's defaults."""
    for name, settings in table.sections():
        cls.__annotations__[name] = settings
        setattr(cls, name, field(default_factory=settings))
    return dataclass(frozen=True)(cls)


@_sections
class RunConfig:
    """Everything that makes one run: architecture, seed and every stage's settings (one field
    per parameter-file section the stage table declares: data, train, gradcam, embed, segment,
    stats, causal, methods, compare)."""

    name: str
    arch: str
    seed: int

    def __post_init__(self):
        check(self, arch=ARCHS, seed=">= 0")
        if self.data.image_size < MIN_IMAGE_SIZE:   # else the data stage runs and training fails
            raise ValueError(f"'data.image_size' = {self.data.image_size}: the networks need >= {MIN_IMAGE_SIZE}")

    @property
    def hash(self) -> str:
        """Cache key over the whole resolved config (every setting that made a result)."""
        return config_hash(self)

    def to_dict(self) -> dict:
        return to_dict(self)


def load(path: str | Path) -> RunConfig:
    """Read and validate one parameter file; raise ConfigError naming the file and key."""
    path = paths.resolve(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: parameter file not found")
    raw = load_yaml(path.read_text(), where) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of settings at the top level")
    if "name" in raw:
        raise ConfigError(f"{where}: 'name' is not a setting; the run is named after the file")
    cfg = from_dict(RunConfig, {"name": path.stem, **raw}, where=where)
    cfg = _anchored(cfg, path.parent)
    _check_dataset(cfg.data, where, raw.get("data") or {})
    _check_start(cfg, where)
    return cfg


def _anchored(cfg: RunConfig, base: Path) -> RunConfig:
    """The parameter file's own relative paths (``data.source``, a world file, a weights file in
    ``train.init``) taken from the file's folder, wherever citylib runs from; stored absolute."""
    init = cfg.train.init
    if init not in (pretrained.SCRATCH, pretrained.IMAGENET) and not Path(init).expanduser().is_absolute():
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init=str(paths.resolve(init, base=base))))
    data = cfg.data
    if data.source != "world" and not Path(data.source).expanduser().is_absolute():
        data = dataclasses.replace(data, source=str(paths.resolve(data.source, base=base)))
    world = data.world.world
    if world.endswith((".yaml", ".yml")) and not Path(world).expanduser().is_absolute():
        data = dataclasses.replace(data, world=dataclasses.replace(data.world, world=str(paths.resolve(world, base=base))))
    return dataclasses.replace(cfg, data=data) if data is not cfg.data else cfg


def _check_dataset(data: DataConfig, where: str, given: dict) -> None:
    """A dataset path must exist before any work starts; the message shows where it looked."""
    if data.source == "world":
        world = data.world.world
        if not (paths.WORLDS / f"{world}.yaml").is_file() and not Path(world).is_file():
            asked = (given.get("world") or {}).get("world", world) if isinstance(given.get("world"), dict) else world
            raise ConfigError(f"{where}: 'data.world.world' = {asked!r}: no such built-in world or file"
                              + (f" ({world})" if asked != world else ""))
        try:                        # the world file read and checked now, not in the data notebook
            worldfile.load_world(world)
        except ConfigError as e:
            raise ConfigError(f"{where}: 'data.world.world': {e}") from None
        return
    if not Path(data.source).exists():
        raise ConfigError(f"{where}: 'data.source' = {given.get('source', data.source)!r}: dataset not found "
                          f"at {data.source} (a relative path is taken from the parameter file's folder)")


def _check_start(cfg: RunConfig, where: str) -> None:
    """The weights ``train.init`` names are read and tried on the architecture's shapes, and the
    ``train.freeze`` prefixes on its parameters, before any work (for imagenet: downloaded into
    torchvision's folder if they can be, else the one-line error says where the file goes)."""
    if cfg.train.init == pretrained.SCRATCH and not cfg.train.freeze:
        return
    try:
        start = pretrained.resolve(cfg.train.init, cfg.arch)
        pretrained.check(start, cfg.arch, cfg.data.image_size, cfg.train.freeze)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def discover(params: str | Path | None = None) -> list[Path]:
    """Parameter files to run: a file, every ``*.yaml`` in a folder, or ``parameters/``.

    Files whose names start with ``_`` are not runs and are left out.
    """
    target = paths.resolve(params) if params else paths.PARAMETERS
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise ConfigError(f"{target}: no such parameter file or folder")
    files = sorted(p for p in target.glob("*.yaml") if not p.name.startswith("_"))
    if not files:
        raise ConfigError(f"{target}: holds no parameter files (*.yaml)")
    return files


def load_all(files: list[Path]) -> list[RunConfig]:
    """Validate every file first; report every bad one at once, naming each."""
    configs, errors = [], []
    for f in files:
        try:
            configs.append(load(f))
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError("invalid parameter file(s):\n  " + "\n  ".join(errors))
    for section, _ in table.sections("data", "grid"):
        seen = {config_hash(getattr(c, section)): c.name for c in configs}
        if len(seen) > 1:
            raise ConfigError(
                f"the runs of one grid must share the same '{section}' section; these differ: "
                + ", ".join(sorted(seen.values()))
            )
    return configs
