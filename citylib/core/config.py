"""Strict settings: frozen dataclasses built from plain dicts (YAML, papermill parameters).

An unknown key or a value of the wrong type fails at once with a message that names the key
and where it came from. ``config_hash`` turns a whole resolved config into a cache key.
Reads and writes nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A parameter file or a settings dict is wrong; the message names the key and the source."""


def cores() -> int:
    """The cores this process may use: those the scheduler gave it (a Slurm job's
    ``--cpus-per-task``, ``taskset``), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):       # not Linux
        return os.cpu_count() or 1


def _check(value: Any, tp: Any, key: str, where: str) -> Any:
    """Return ``value`` coerced to ``tp`` (int -> float, list -> tuple), or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _check(value, arm, key, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: '{key}' = {value!r} is not {_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: '{key}' = {value!r} is not None")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: '{key}' = {value!r} must be one of {list(args)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' = {value!r} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: '{key}' must have {len(args)} items, got {len(value)}")
        return tuple(_check(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' = {value!r} must be a mapping")
        return {k: _check(v, args[1], f"{key}.{k}", where) for k, v in value.items()} if args else dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping of settings, got {value!r}")
        return from_dict(tp, value, where=where, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: '{key}' = {value!r} must be {_name(tp)}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def from_dict(cls: type[T], data: dict | None, where: str = "settings", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and ill-typed values raise ConfigError.

    ``where`` names the source (a file path) so that the message points at it.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name in fields:
        if name in data:
            kwargs[name] = _check(data[name], hints[name], prefix + name, where)
        elif fields[name].default is dataclasses.MISSING and fields[name].default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{prefix + name}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ range checks
        raise ConfigError(f"{where}: {e}") from None


_RULE = re.compile(r"(>=|>) (\S+)|in ([\[(])(\S+), (\S+)([\])])")


def check(cfg: Any, **rules: str | typing.Collection) -> None:
    """The range checks of a settings dataclass, one rule per field: ``">= 1"``, ``"> 0"``, an
    interval ``"in [0, 1]"`` / ``"in (0, 1]"`` / ``"in [0.5, 1)"``, or the collection of allowed
    values. Raises one ValueError naming every field that breaks its rule."""
    bad = []
    for name, rule in rules.items():
        value = getattr(cfg, name)
        if isinstance(rule, str):
            m = _RULE.fullmatch(rule)
            if m is None:
                raise ValueError(f"bad rule {rule!r} for '{name}'")
            if m[1]:
                ok = value >= float(m[2]) if m[1] == ">=" else value > float(m[2])
            else:
                lo, hi = float(m[4]), float(m[5])
                ok = (lo <= value if m[3] == "[" else lo < value) and (value <= hi if m[6] == "]" else value < hi)
            want = rule
        else:
            ok, want = value in rule, f"one of {list(rule)}"
        if not ok:
            bad.append(f"'{name}' = {value!r} must be {want}")
    if bad:
        raise ValueError(f"out of range: {'; '.join(bad)}")


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a (nested) config dataclass; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(*parts: Any, length: int = 12) -> str:
    """A short stable hash of configs (dataclasses, dicts, strings) for cache keys."""
    def norm(p: Any) -> Any:
        if dataclasses.is_dataclass(p):
            return {"__type__": type(p).__name__, **to_dict(p)}
        if isinstance(p, Path):
            return str(p)
        return p
    blob = json.dumps([norm(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def load_yaml(text: str, where: str) -> Any:
    """Parse a settings file strictly: a key given twice in one mapping is an error (not "the
    last wins"), and ``1e-4`` is a float as in YAML 1.2 (YAML 1.1 wants ``1.0e-4``)."""
    import re

    import yaml

    class Strict(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            first: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in first and key != "<<":
                    raise ConfigError(f"{where}: line {key_node.start_mark.line + 1}: key {key!r} given twice "
                                      f"(first on line {first[key] + 1})")
                first[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    Strict.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    try:
        return yaml.load(text, Loader=Strict)
    except yaml.YAMLError as e:   # one line: where, and what (yaml's own message spans several)
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{where}: {at}not valid YAML: {what}") from None
