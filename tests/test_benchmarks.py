"""The benchmark scripts are not run by the tests (they take minutes), so what they call in
citylib is checked here: every ``module.name`` they use exists, and each script parses its
``--help``."""
import ast
import importlib
import subprocess
import sys

import pytest

from citylib import paths

SCRIPTS = sorted((paths.ROOT / "benchmarks").glob("*.py"))


def citylib_attributes(source: str) -> set[tuple[str, str]]:
    """(module, attribute) for each ``module.attribute`` where ``module`` was imported with
    ``from citylib import module`` (at any depth of the script)."""
    tree = ast.parse(source)
    modules = {a.asname or a.name: a.name for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.module == "citylib" for a in node.names}
    return {(modules[n.value.id], n.attr) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules}


def test_the_check_finds_a_name_that_is_gone():
    used = citylib_attributes("from citylib import params\nparams.replace(cfg)\n")
    assert used == {("params", "replace")}
    assert not hasattr(importlib.import_module("citylib.params"), "replace")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_citylib_name_a_benchmark_uses_exists(script):
    missing = [f"{m}.{a}" for m, a in sorted(citylib_attributes(script.read_text()))
               if not hasattr(importlib.import_module(f"citylib.{m}"), a)]
    assert not missing, f"{script.name} uses names citylib no longer has: {', '.join(missing)}"


def test_no_script_uses_an_undefined_name():
    """A name a script never defines (a module renamed away, a typo) fails only when that line
    runs, minutes into a benchmark; pyflakes finds it without running anything."""
    from pyflakes.api import checkPath
    from pyflakes.reporter import Reporter

    files = [*SCRIPTS, *sorted((paths.ROOT / "citylib").rglob("*.py")), *sorted((paths.ROOT / "tests").glob("*.py"))]
    found = []

    class Collect(Reporter):
        def __init__(self):
            pass

        def flake(self, message):
            if "undefined name" in str(message):
                found.append(str(message))

        def syntaxError(self, filename, msg, lineno, offset, text):
            found.append(f"{filename}:{lineno}: {msg}")

        def unexpectedError(self, filename, msg):
            found.append(f"{filename}: {msg}")

    for f in files:
        checkPath(str(f), Collect())
    assert len(files) > 60 and not found, "\n".join(found)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_parses_its_help(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=paths.ROOT)
    assert done.returncode == 0 and "usage" in done.stdout, done.stderr[-1500:]
