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

import yaml

from citylib import paths
from citylib.config import ConfigError, config_hash, from_dict, to_dict
from citylib.causal import CausalConfig
from citylib.compare import CompareConfig
from citylib.data import DataConfig
from citylib.embed import EmbedConfig
from citylib.gradcam import GradCAMConfig
from citylib.methods import MethodsConfig
from citylib.models import ARCHS
from citylib.segment import SegmentConfig
from citylib.stats import StatsConfig
from citylib.train import TrainConfig


@dataclass(frozen=True)
class RunConfig:
    """Everything that makes one run: architecture, seed and every stage's settings."""

    name: str
    arch: str
    seed: int
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gradcam: GradCAMConfig = field(default_factory=GradCAMConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)  # grid-wide: equal in every file

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"'arch' = {self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.seed < 0:
            raise ValueError(f"'seed' must be >= 0, got {self.seed}")

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
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of settings at the top level")
    if "name" in raw:
        raise ConfigError(f"{where}: 'name' is not a setting; the run is named after the file")
    cfg = from_dict(RunConfig, {"name": path.stem, **raw}, where=where)
    _check_dataset(cfg.data, where, base=path.parent)
    return cfg


def _check_dataset(data: DataConfig, where: str, base: Path) -> None:
    """A dataset path must exist before any work starts."""
    if data.source == "world":
        world = data.world.world
        if not (paths.WORLDS / f"{world}.yaml").is_file() and not paths.resolve(world).is_file():
            raise ConfigError(f"{where}: 'data.world.world' = {world!r}: no such built-in world or file")
        return
    if not paths.resolve(data.source).exists():
        raise ConfigError(f"{where}: 'data.source' = {data.source!r}: dataset not found")


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
    for section in ("data", "compare"):
        seen = {config_hash(getattr(c, section)): c.name for c in configs}
        if len(seen) > 1:
            raise ConfigError(
                f"the runs of one grid must share the same '{section}' section; these differ: "
                + ", ".join(sorted(seen.values()))
            )
    return configs


def replace(cfg: RunConfig, **changes) -> RunConfig:
    """A copy of ``cfg`` with top-level fields changed (e.g. a different seed)."""
    return dataclasses.replace(cfg, **changes)
