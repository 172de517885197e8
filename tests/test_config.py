"""Strict settings dataclasses: unknown keys and wrong types fail, naming the key."""
from dataclasses import dataclass, field
from typing import Literal

import pytest

from citylib.core.config import ConfigError, config_hash, from_dict


@dataclass(frozen=True)
class Inner:
    size: int = 64
    ratio: float = 0.5


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    split: tuple[float, float, float] = (6.0, 2.0, 2.0)
    mode: Literal["a", "b"] = "a"
    pattern: str | None = None

    def __post_init__(self):
        if self.inner.size < 1:
            raise ValueError("'inner.size' must be >= 1")


def test_builds_nested_and_coerces_ints_to_floats():
    cfg = from_dict(Outer, {"name": "x", "inner": {"ratio": 1}, "split": [4, 1, 1]})
    assert cfg.inner == Inner(size=64, ratio=1.0)
    assert cfg.split == (4.0, 1.0, 1.0) and isinstance(cfg.split[0], float)


@pytest.mark.parametrize("data, needle", [
    ({"name": "x", "colour": 1}, "colour"),
    ({"name": "x", "inner": {"sise": 3}}, "inner.sise"),
    ({"name": "x", "inner": {"size": "big"}}, "inner.size"),
    ({"name": "x", "inner": {"size": True}}, "inner.size"),
    ({"name": "x", "split": [1, 2]}, "split"),
    ({"name": "x", "mode": "c"}, "mode"),
    ({"name": 3}, "name"),
    ({}, "name"),
    ({"name": "x", "inner": {"size": 0}}, "inner.size"),
])
def test_errors_name_the_key_and_the_source(data, needle):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data, where="my.yaml")
    assert needle in str(err.value) and "my.yaml" in str(err.value)


def test_optional_accepts_none_and_value():
    assert from_dict(Outer, {"name": "x", "pattern": None}).pattern is None
    assert from_dict(Outer, {"name": "x", "pattern": "^a"}).pattern == "^a"


def test_hash_is_stable_and_covers_every_setting():
    a = from_dict(Outer, {"name": "x"})
    assert config_hash(a) == config_hash(from_dict(Outer, {"name": "x"}))
    assert config_hash(a) != config_hash(from_dict(Outer, {"name": "x", "inner": {"ratio": 0.25}}))
    assert config_hash(a) != config_hash(from_dict(Outer, {"name": "x", "split": [6, 2, 3]}))
