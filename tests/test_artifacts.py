"""Atomic writes: all or nothing, and the file mode any new file would get."""
import os

import pytest

from citylib import artifacts


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "result.json"
    artifacts.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("interrupted")
    assert artifacts.read_json(target) == {"a": 1}           # the old result is intact
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]   # no temp left


def test_atomic_write_uses_the_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = artifacts.write_json(tmp_path / "x.json", [1])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
