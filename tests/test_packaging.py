"""The layout and the two dependency declarations agree."""
import re
import tomllib

import yaml

from citylib import paths


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


def test_notebooks_are_committed_without_outputs():
    import json

    for nb in paths.NOTEBOOKS.glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), nb.name
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb.name} needs exactly one cell tagged 'parameters'"
