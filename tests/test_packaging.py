"""The layout and the two dependency declarations agree."""
import re
import tomllib

import yaml

from citylib.core import paths


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_declares_the_same_requirements_as_pyproject():
    project = tomllib.loads((paths.ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    env = yaml.safe_load((paths.ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert {r.replace(" ", "") for r in pip_section} == {r.replace(" ", "") for r in declared}
    assert "python=3.11" in env["dependencies"]
    assert {_name(r) for r in declared} >= {"torch", "papermill", "nbval", "ipywidgets", "umap-learn"}


def test_layout_exists():
    for rel in ["notebooks", "citylib", "parameters", "outputs/README.md", "tests", "benchmarks",
                "Makefile", "README.md", ".ci/run", "environment.yml", "pyproject.toml"]:
        assert (paths.ROOT / rel).exists(), rel


def test_every_sub_package_is_installed():
    """A wheel holds only the packages pyproject names; an editable install would hide one left out."""
    listed = set(tomllib.loads((paths.ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(paths.ROOT).parts) for p in (paths.ROOT / "citylib").rglob("__init__.py")}
    assert found == listed


def test_notebooks_are_committed_without_outputs():
    import json

    for nb in paths.NOTEBOOKS.glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), nb.name
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb.name} needs exactly one cell tagged 'parameters'"


def imports_inside(package) -> dict[str, set[str]]:
    """{module: the citylib modules it imports}, read from the source of every module of the
    package and its sub-packages (dotted names below citylib: ``train``, ``streetview.collect``):
    every import statement, at module level or inside a function, except those under
    ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    import ast

    files = {".".join(p.relative_to(package).with_suffix("").parts).removesuffix(".__init__")
             .removesuffix("__init__"): p for p in package.rglob("*.py")}
    names = set(files) - {""}

    def module(dotted):  # "citylib.a.b" or "a.b" -> the deepest module of citylib it names
        parts = dotted.removeprefix("citylib").strip(".").split(".")
        while parts and ".".join(parts) not in names:
            parts.pop()
        return ".".join(parts)

    graph = {}
    for name in names:
        tree = ast.parse(files[name].read_text())
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for n in ast.walk(node)}
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "citylib":
                deps |= {module(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {module(a.name) for a in node.names if a.name.split(".")[0] == "citylib"}
        graph[name] = (deps & names) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle: a path from a module back to itself, each cycle once."""
    found = set()

    def walk(path):
        for nxt in sorted(graph[path[-1]]):
            if nxt == path[0]:
                found.add(tuple(path))
            elif nxt not in path and nxt > path[0]:        # each cycle from its smallest name
                walk(path + [nxt])

    for start in sorted(graph):
        walk([start])
    return [list(c) for c in sorted(found)]


def test_no_import_cycles_inside_citylib():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = imports_inside(paths.ROOT / "citylib")
    assert {"nets.train", "data.streetview.collect", "data.streetview.static_api"} <= set(graph)
    assert graph["data.streetview.collect"] >= {"data.streetview.geosample", "data.streetview.static_api",
                                                "data.inventory"}
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in found)


# The sub-packages from the bottom up: each imports only from those before it (and itself).
LAYERS = ("core", "stats", "world", "data", "nets", "explain", "stages", "figures", "run")


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """Every import of a module from a sub-package above its own, and every module in a
    sub-package the layers do not place (the package's own ``__init__`` and ``__main__`` sit on
    top and may import anything)."""
    rank = {name: i for i, name in enumerate(layers)}
    found = []
    for module, deps in sorted(graph.items()):
        if "." not in module:
            continue
        own = module.split(".")[0]
        if own not in rank:
            found.append(f"{module}: sub-package {own!r} has no layer")
            continue
        found += [f"{module} imports {d}" for d in sorted(deps)
                  if "." in d and rank.get(d.split(".")[0], -1) > rank[own]]
    return found


def test_each_sub_package_imports_only_from_the_layers_below_it():
    assert upward_imports({"core.paths": {"run.cli", "core.config"}, "run.cli": {"core.paths"}}) == \
        ["core.paths imports run.cli"]
    assert upward_imports({"extra.x": set()}) == ["extra.x: sub-package 'extra' has no layer"]
    graph = imports_inside(paths.ROOT / "citylib")
    assert {m.split(".")[0] for m in graph if "." in m} == set(LAYERS)
    found = upward_imports(graph)
    assert not found, "imports against the layering: " + "; ".join(found)


def test_no_module_is_longer_than_400_lines_and_no_function_than_60():
    import ast

    long = []
    for path in sorted((paths.ROOT / "citylib").rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long.append(f"{path.relative_to(paths.ROOT)} ({len(text.splitlines())} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(paths.ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "too long: " + ", ".join(long)


def notebook_leaks(notebook: dict) -> list[str]:
    """What a notebook does that belongs in the package: a loop, a function or class defined in
    a cell; or a parameter of its ``parameters`` cell that no other cell reads."""
    import ast

    found, params, read = [], set(), set()
    for i, cell in enumerate(c for c in notebook["cells"] if c["cell_type"] == "code"):
        lines = "".join(cell["source"]).splitlines()
        tree = ast.parse("\n".join(ln for ln in lines if not ln.lstrip().startswith(("%", "!"))))
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            params |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets}
            continue
        found += [f"code cell {i}: a {type(n).__name__}" for n in ast.walk(tree)
                  if isinstance(n, (ast.For, ast.While, ast.FunctionDef, ast.ClassDef))]
        read |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return found + [f"parameter '{p}' is never read" for p in sorted(params - read)]


def test_notebook_cells_only_call_into_the_package():
    import json

    for nb in sorted(paths.NOTEBOOKS.glob("*.ipynb")):
        assert notebook_leaks(json.loads(nb.read_text())) == [], nb.name


def test_notebook_leaks_are_found():
    cell = lambda src, tags=(): {"cell_type": "code", "source": src, "metadata": {"tags": list(tags)}}  # noqa: E731
    notebook = {"cells": [cell("params_file = 'x'\nforce = False\n", ["parameters"]),
                          cell("%matplotlib inline\nrun = open(params_file)\n"),
                          cell("for row in run:\n    print(row)")]}
    assert notebook_leaks(notebook) == ["code cell 2: a For", "parameter 'force' is never read"]
