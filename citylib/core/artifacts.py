"""Writing results safely, and reusing them only when exactly the same things made them.

Every file lands atomically (temp file, then rename): readers never see half-written files and
an interrupted write leaves the old file intact. ``ResultFolder`` is the one mechanism by which
every stage (and the batch runner) decides whether a finished result can be reused: a marker
holding the result's key, which hashes the settings it read, the keys of its inputs and the
source of the code that made it (``code_key``). Reads the package's own source; writes where it
is told.
"""
from __future__ import annotations

import ast
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


def described(e: OSError, path: str | os.PathLike) -> OSError | None:
    """A one-line error naming ``path`` for a write that failed for want of space (numpy's own
    "N requested and M written" included, which has no errno) or on a read-only file system;
    None for any other error, which is left as it is."""
    short = e.errno is None and re.search(r"\d+ requested and \d+ written", str(e))
    if e.errno in (errno.ENOSPC, errno.EDQUOT) or short:
        where = next((p for p in Path(path).absolute().parents if p.exists()), Path("/"))
        free = shutil.disk_usage(where).free
        return OSError(errno.ENOSPC, f"{path}: no space left on the device ({free / 1e6:.1f} MB free there)")
    if e.errno == errno.EROFS:
        return OSError(errno.EROFS, f"{path}: the file system is read-only")
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Writes to ``path`` inside: a full disk or a read-only file system is one line naming it
    (``described``); every other error passes unchanged."""
    try:
        yield
    except OSError as e:
        if (clear := described(e, path)) is None:
            raise
        raise clear from None


def reserve(path: str | os.PathLike) -> Path:
    """Allocate the whole of a file that was made sparse (a new memory map), so that a full disk
    is an error now, naming the file, not a crash (SIGBUS) when a page is first written later."""
    with writing(path), open(path, "r+b") as fh:
        os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``. A full
    disk is one line naming ``path`` (``writing``), and nothing half-written is left."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            # mkstemp makes the file private (0600); give it the mode any new file would get
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files ``atomic_path`` leaves under ``folder`` when its process is
    killed mid-write (``.<name>.*.tmp``); only for a folder no other process writes now."""
    gone = []
    for tmp in Path(folder).rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def holds_json(path: str | os.PathLike, obj: Any) -> bool:
    """Whether ``path`` already holds ``obj`` as ``write_json`` would write it."""
    try:
        return read_json(path) == json.loads(json.dumps(obj, default=_json_default))
    except (OSError, ValueError):
        return False


def write_csv(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame as CSV (no index), atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy arrays and scalars
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def merge_json(path: Path, updates: dict) -> dict:
    """Read-modify-write a JSON object under a lock; the write is atomic. Returns the result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = {**(read_json(path) if path.is_file() else {}), **updates}
        write_json(path, merged)
    return merged


# ---------------------------------------------------------------- results keyed by what made them

PACKAGE = Path(__file__).resolve().parents[1]   # the citylib package, whose source keys results


def code_key(module: str, root: str | os.PathLike | None = None) -> str:
    """A hash of ``module``'s source and of every citylib module it imports, at any depth.

    ``module`` is a dotted name inside the package (``"nets.train"`` or ``"citylib.nets.train"``).
    Imports inside functions count too, so a module that is imported lazily is covered; so does
    the ``__init__.py`` of every sub-package a module lies in (Python runs it on import), and a
    sub-package whose ``__init__.py`` imports its modules by discovery (``pkgutil.iter_modules``,
    as the CAM methods do) counts with every module in its folder. An edit to any of these
    files, a comment included, changes the key: a result is never reused across a code change.
    ``root`` is the package folder (default: this package).
    """
    root = Path(root) if root is not None else PACKAGE
    seen, todo = {}, [module.removeprefix(f"{root.name}.")]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        source = _source_file(root, name).read_bytes()
        seen[name] = hashlib.sha256(source).hexdigest()
        todo += [m for m in _package_imports(source, name, root) if m not in seen]
    return hashlib.sha256(json.dumps(sorted(seen.items())).encode()).hexdigest()[:12]


def _source_file(root: Path, name: str) -> Path:
    """The file of module ``name`` (``a.b``: ``a/b.py``, or ``a/b/__init__.py`` for a package)."""
    path = root / name.replace(".", "/")
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"


def _exists(root: Path, name: str) -> bool:
    path = root / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@functools.lru_cache(maxsize=1024)
def _import_nodes(source: bytes) -> tuple[tuple[str, tuple[str, ...], int, str | None], ...]:
    """The import statements of a module's source, parsed once per source text: (``import``,
    names, 0, None), (``from``, names, level, module) and (``iter_modules``, (), 0, None) for a
    call of ``iter_modules``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.append(("import", tuple(a.name for a in node.names), 0, None))
        elif isinstance(node, ast.ImportFrom):
            out.append(("from", tuple(a.name for a in node.names), node.level, node.module))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "iter_modules"):
            out.append(("iter_modules", (), 0, None))
    return tuple(out)


def _package_imports(source: bytes, module: str, root: Path) -> set[str]:
    """Names of the package's modules that ``source`` (the module ``module``) depends on: those
    it imports (absolute or relative), the sub-packages' ``__init__`` that run on the way, and,
    for a package that discovers its modules, each of them."""
    package, found = root.name, set()
    is_package = _source_file(root, module).name == "__init__.py" if module else False
    for kind, names, level, base_module in _import_nodes(source):
        if kind == "import":
            found |= {n.removeprefix(f"{package}.") for n in names if n.startswith(f"{package}.")}
        elif kind == "from":
            if level:   # relative: from the module's own package
                parts = [package, *module.split(".")[:-1 if not is_package else None]]
                parts = parts[:len(parts) + 1 - level]
                base = ".".join(parts + ([base_module] if base_module else []))
            else:
                base = base_module or ""
            if base != package and not base.startswith(f"{package}."):
                continue
            inner = base.removeprefix(package).lstrip(".")
            # `from citylib.nets import train` names modules; `from citylib.nets.train import run` a module
            for a in names:
                name = f"{inner}.{a}" if inner else a
                if _exists(root, name):
                    found.add(name)
            if inner and _exists(root, inner):
                found.add(inner)
        elif is_package:                                   # a package that imports every module
            folder = _source_file(root, module).parent
            found |= {f"{module}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__"}
    for name in list(found) + [module]:                     # the sub-packages' __init__ on the way
        parts = name.split(".")
        found |= {".".join(parts[:k]) for k in range(1, len(parts)) if _exists(root, ".".join(parts[:k]))}
    found.discard(module)
    return {m for m in found if m and _exists(root, m)}


class StaleError(RuntimeError):
    """A result was made from other data, or its input does not exist yet; the message says
    what to run."""


class ResultFolder:
    """One result in a folder, keyed by exactly what made it: settings, input keys and code.

    A finished result has a marker, ``<folder>/.results/<name>.json``, holding its key, the files
    it consists of (relative to the folder) and whatever the stage records about it. The stage
    asks ``done()`` before any work: the marker if the key matches and every file is there,
    else None. It calls ``begin()`` before writing (the folder holds no finished result of this
    name until ``commit``), and ``commit(files, **info)`` once every file is written.
    """

    def __init__(self, folder: str | os.PathLike, name: str, key: str | None = None):
        self.folder, self.name, self.key = Path(folder), name, key
        self.marker = self.folder / ".results" / f"{name}.json"

    def read(self) -> dict | None:
        """The marker, whatever its key; None when there is none (or it cannot be read)."""
        try:
            return read_json(self.marker)
        except (OSError, ValueError):
            return None

    def finished(self) -> dict | None:
        """The marker of a finished result of any key whose files all exist, else None."""
        marker = self.read()
        if marker is None or not all((self.folder / f).exists() for f in marker.get("files", ())):
            return None
        return marker

    def done(self) -> dict | None:
        """The marker of a finished result with this key whose files all exist, else None."""
        marker = self.finished()
        return marker if marker is not None and marker.get("key") == self.key else None

    def begin(self) -> None:
        """Mark the folder as holding no finished result of this name (until ``commit``)."""
        self.marker.unlink(missing_ok=True)

    def commit(self, files, **info) -> dict:
        """Record the finished result: its key, its files (paths under the folder) and ``info``."""
        names = [str(Path(f).relative_to(self.folder)) if Path(f).is_absolute() else str(f)
                 for f in files]
        marker = {"key": self.key, "files": names, **info}
        write_json(self.marker, marker)
        return marker


class LockError(OSError):
    """The file system of a lock file has no ``flock`` locks."""

    def __init__(self, path: Path, cause: OSError):
        super().__init__(cause.errno, f"{path}: cannot lock it ({cause.strerror}); put the outputs "
                                      "folder on a file system with flock locks (local disk, NFSv4, "
                                      "Lustre mounted with -o flock, GPFS)")


@contextlib.contextmanager
def flocked(lock: str | os.PathLike, on_busy=None) -> Iterator[IO | None]:
    """The file ``lock`` (made if needed) open and held with the kernel's exclusive lock
    (``flock``), so a killed holder never leaves a stale one. When another process holds it,
    ``on_busy(file)`` is called first (it may raise to give up), then this waits. Yields None,
    holding nothing, where the folder cannot be written; LockError where the file system has
    no ``flock``."""
    lock = Path(lock)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock, "a+")
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        yield None     # a folder this process cannot write: nothing can be built there to guard
        return
    with fh:
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_busy is not None:
                    on_busy(fh)
                fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as e:   # ENOLCK, ENOSYS: a file system without flock (Lustre's noflock)
            raise LockError(lock, e) from None
        try:
            yield fh
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike, what: str, quiet: bool = False) -> Iterator[None]:
    """Hold ``flocked(lock)`` while building ``what``: another process building the same thing
    waits for it (saying so once, unless ``quiet``) and then finds it made."""
    def waiting(_):
        from tqdm.auto import tqdm   # a line of its own, above the runner's progress bar

        tqdm.write(f"waiting for another process building {what}", file=sys.stderr)

    with flocked(lock, None if quiet else waiting):
        yield


@contextlib.contextmanager
def atomic_dir(folder: str | os.PathLike) -> Iterator[Path | None]:
    """Build a whole folder at once: yields a fresh hidden folder beside ``folder`` (None when
    ``folder`` already exists); on success it is renamed onto ``folder``, so readers see all of
    it or nothing. A folder made meanwhile by another process wins and this one is dropped."""
    folder = Path(folder)
    if folder.exists():
        yield None
        return
    with writing(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; results are meant to be shared
        try:
            yield tmp
            try:
                os.rename(tmp, folder)
            except OSError:
                if not folder.exists():  # not a concurrent twin: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
