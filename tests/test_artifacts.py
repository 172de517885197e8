"""Atomic writes: all or nothing, and the file mode any new file would get."""
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
