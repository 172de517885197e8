"""Atomic writes: all or nothing, and the file mode any new file would get."""
import errno
import os

import pytest

from citylib.core import artifacts


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


def _package(root, files: dict):
    pkg = root / "citylib"
    pkg.mkdir()
    for name, text in files.items():
        (pkg / name).write_text(text)
    return pkg


def test_code_key_follows_every_import_of_the_package(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "stage.py": "from citylib import helper\nfrom .rel import x\n\ndef f():\n"
                    "    import citylib.lazy\n    from citylib.deep import y\n",
        "helper.py": "import os\n", "rel.py": "x = 1\n", "lazy.py": "", "deep.py": "y = 2\n",
        "other.py": "from citylib import stage\n"})
    key = artifacts.code_key("stage", root=pkg)
    assert artifacts.code_key("citylib.stage", root=pkg) == key
    for name in ("stage.py", "helper.py", "rel.py", "lazy.py", "deep.py"):   # each one counts
        before = (pkg / name).read_text()
        (pkg / name).write_text(before + "# edited\n")
        assert artifacts.code_key("stage", root=pkg) != key, name
        (pkg / name).write_text(before)
    (pkg / "other.py").write_text("# a module that imports the stage, not one it imports\n")
    (pkg / "__init__.py").write_text("# nor the package's __init__\n")
    assert artifacts.code_key("stage", root=pkg) == key


def test_code_key_of_the_real_stages():
    """The training's key does not depend on the statistics code, and the objects stage's does."""
    train, objects = (artifacts._package_imports(artifacts._source_file(artifacts.PACKAGE, m).read_bytes(), m,
                                                 artifacts.PACKAGE) for m in ("nets.train", "stages.objects"))
    assert "nets.models" in train and "stats.histograms" not in train
    assert {"stats.histograms", "explain.cues", "data.segment", "stages.gradcam"} <= objects


def test_code_key_counts_sub_packages_and_discovered_modules(tmp_path):
    """A module in a sub-package counts that sub-package's ``__init__``; a package that imports
    its modules by discovery counts every one of them, a file added to it too."""
    pkg = _package(tmp_path, {"__init__.py": "", "stage.py": "from citylib.explain.cams.one import x\n"})
    (pkg / "explain" / "cams").mkdir(parents=True)
    (pkg / "explain" / "__init__.py").write_text("")
    (pkg / "explain" / "cams" / "__init__.py").write_text(
        "import importlib, pkgutil\nfor m in pkgutil.iter_modules(__path__):\n"
        "    importlib.import_module(f'{__name__}.{m.name}')\n")
    (pkg / "explain" / "cams" / "one.py").write_text("x = 1\n")
    key = artifacts.code_key("stage", root=pkg)
    for name in ("explain/__init__.py", "explain/cams/__init__.py", "explain/cams/one.py"):
        before = (pkg / name).read_text()
        (pkg / name).write_text(before + "# edited\n")
        assert artifacts.code_key("stage", root=pkg) != key, name
        (pkg / name).write_text(before)
    assert artifacts.code_key("stage", root=pkg) == key
    (pkg / "explain" / "cams" / "two.py").write_text("y = 2\n")      # a new method file
    assert artifacts.code_key("stage", root=pkg) != key


def test_result_folder_reuse_begin_commit(tmp_path):
    folder = artifacts.ResultFolder(tmp_path, "stage", "k1")
    assert folder.done() is None and folder.read() is None
    (tmp_path / "a.csv").write_text("x\n")
    folder.commit(["a.csv", tmp_path / "sub" / "b.npy"], note="info")
    assert folder.done() is None                                   # a file is missing
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.npy").write_bytes(b"")
    assert folder.done() == {"key": "k1", "files": ["a.csv", "sub/b.npy"], "note": "info"}
    assert artifacts.ResultFolder(tmp_path, "stage", "k2").done() is None   # another key
    assert artifacts.ResultFolder(tmp_path, "other", "k1").done() is None   # another name
    folder.begin()
    assert folder.done() is None and (tmp_path / "a.csv").exists()


def test_atomic_dir_all_or_nothing(tmp_path):
    target = tmp_path / "built"
    with pytest.raises(RuntimeError):
        with artifacts.atomic_dir(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with artifacts.atomic_dir(target) as tmp:
        (tmp / "whole").write_text("x")
    assert [p.name for p in target.iterdir()] == ["whole"]
    with artifacts.atomic_dir(target) as tmp:                      # already there: kept as is
        assert tmp is None


def test_a_file_system_without_flock_is_a_one_line_error(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(artifacts.LockError, match=r"x\.lock: cannot lock it \(No locks available\); put the outputs"):
        with artifacts.exclusive(tmp_path / "x.lock", "x"):
            pass


@pytest.fixture
def small_disk(tmp_path):
    """A 512 kB file system of its own (tmpfs), where a large write runs out of space."""
    import subprocess

    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_half_written(small_disk):
    import numpy as np
    import pandas as pd

    big = np.zeros(1 << 20, np.uint8)                       # 1 MB, on a 512 kB disk
    with pytest.raises(OSError) as saved:                    # numpy's short write has no errno
        with artifacts.atomic_path(small_disk / "arrays" / "big.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, big)
    assert saved.value.strerror.startswith(f"{small_disk / 'arrays' / 'big.npy'}: no space left on the device (")
    assert saved.value.errno == errno.ENOSPC and "\n" not in str(saved.value)
    np.lib.format.open_memmap(small_disk / "store.npy", "w+", np.uint8, (1 << 20,))   # sparse: fits, for now
    with pytest.raises(OSError, match=r"store\.npy: no space left on the device"):
        artifacts.reserve(small_disk / "store.npy")         # said now, not a SIGBUS later
    (small_disk / "store.npy").unlink()
    with pytest.raises(OSError, match=r"table\.csv: no space left on the device"):
        artifacts.write_csv(small_disk / "table.csv", pd.DataFrame({"x": np.arange(200_000)}))
    assert not [p for p in small_disk.rglob("*") if p.is_file()]     # nothing half-written
    with pytest.raises(FileNotFoundError):                   # other errors pass as they are
        with artifacts.atomic_path(small_disk / "x.txt"):
            open(small_disk / "no-such-input")


def test_a_full_disk_in_the_data_stage_says_so_in_one_line(small_disk, capsys):
    """The data stage of a smoke world on a disk too small for it: ``citylib run`` reports the
    failure in one line saying "no space left" and the path, exit 1, no finished snapshot."""
    from citylib.core.paths import PARAMETERS
    from citylib.run import cli

    code = cli.main(["run", "--params", str(PARAMETERS / "smoke" / "simple_seed0.yaml"),
                     "--outputs", str(small_disk / "out")])
    assert code == 1
    failed = [ln for ln in capsys.readouterr().err.splitlines() if "FAILED data/01_data.ipynb" in ln]
    assert failed and "no space left on the device" in failed[0] and str(small_disk) in failed[0], failed
    assert not (small_disk / "out" / "data" / ".results" / "data.json").exists()
    assert not list(small_disk.rglob("*.tmp"))
