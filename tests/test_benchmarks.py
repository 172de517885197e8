"""The benchmark scripts are not run by the tests (they take minutes), so what they call in
citylib is checked here: every ``module.name`` they use exists, and each script parses its
``--help``."""
import ast
import importlib
import importlib.util
import subprocess
import sys

import pytest

from citylib.core import paths

SCRIPTS = sorted((paths.ROOT / "benchmarks").glob("*.py"))


def citylib_attributes(source: str) -> set[tuple[str, str]]:
    """(module, attribute) for each ``module.attribute`` where ``module`` was imported with
    ``from citylib.<sub-package> import module`` (at any depth of the script); the module by its
    full name."""
    tree = ast.parse(source)
    modules = {a.asname or a.name: f"{node.module}.{a.name}" for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("citylib")
               for a in node.names}
    return {(modules[n.value.id], n.attr) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules}


def _module(name: str) -> bool:
    """Whether ``name`` is a module (``from citylib.core import paths``), not a function or
    class imported by name."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, AttributeError, ValueError):
        return False


def test_the_check_finds_a_name_that_is_gone():
    used = citylib_attributes("from citylib.run import params\nparams.replace(cfg)\n")
    assert used == {("citylib.run.params", "replace")}
    assert not hasattr(importlib.import_module("citylib.run.params"), "replace")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_citylib_name_a_benchmark_uses_exists(script):
    missing = [f"{m}.{a}" for m, a in sorted(citylib_attributes(script.read_text()))
               if _module(m) and not hasattr(importlib.import_module(m), a)]
    assert not missing, f"{script.name} uses names citylib no longer has: {', '.join(missing)}"


IPYTHON = ("'display'", "'get_ipython'")   # names a notebook's kernel defines


@pytest.mark.parametrize("notebook", sorted((paths.ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_every_citylib_name_a_notebook_uses_exists(notebook):
    """The same for the notebooks, all code cells read as one script: a name moved away breaks
    a notebook only when nbval or a job runs it."""
    import json

    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    source = "\n".join(line for c in cells for line in "".join(c["source"]).splitlines()
                       if not line.lstrip().startswith(("%", "!")))
    used = citylib_attributes(source)
    assert used, f"{notebook.name} uses nothing of citylib"
    missing = [f"{m}.{a}" for m, a in sorted(used) if _module(m) and not hasattr(importlib.import_module(m), a)]
    assert not missing, f"{notebook.name} uses names citylib no longer has: {', '.join(missing)}"
    from pyflakes.api import check
    from pyflakes.reporter import Reporter

    class Collect(Reporter):
        def __init__(self):
            self.found = []

        def flake(self, message):
            if "undefined name" in str(message) and not str(message).endswith(IPYTHON):
                self.found.append(str(message))

    reporter = Collect()
    check(source, notebook.name, reporter)
    assert not reporter.found, reporter.found


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


def test_profile_stages_extends_each_stage_along_its_line(tmp_path):
    """Fake runner results at 50 and 100 spots: an epoch of 10 s and 20 s, notebooks of 30 s and
    40 s. At the profile's 1,000 spots and 30 epochs: training 20 * 10 * 30 s = 1.67 h; a
    notebook 40 + (40 - 30) / 50 * 900 = 220 s."""
    import json

    for spots, epoch, nb in ((50, 10.0, 30.0), (100, 20.0, 40.0)):
        out = tmp_path / f"outputs_{spots}"
        for where in ("data/.results/01_data.json", "comparison/.results/06_comparison.json",
                      *(f"runs/{a}_seed0/.results/{n}.json" for a in ("resnet18", "simple", "simpler", "vgg11")
                        for n in ("03_gradcam", "04_embedding", "05_objects"))):
            (out / where).parent.mkdir(parents=True, exist_ok=True)
            (out / where).write_text(json.dumps({"seconds": nb}))
        for a in ("resnet18", "simple", "simpler", "vgg11"):
            (out / f"runs/{a}_seed0/history.csv").write_text(f"epoch,seconds\n1,{epoch}\n")
    done = subprocess.run([sys.executable, str(paths.ROOT / "benchmarks" / "profile_stages.py"), str(tmp_path),
                           "--report-only"], capture_output=True, text=True, timeout=120, cwd=paths.ROOT)
    assert done.returncode == 0, done.stderr[-1500:]
    lines = {line.split(" s")[0].split(" h")[0]: line for line in done.stdout.splitlines()}
    assert lines["training"].split()[-4:] == ["1.7"] * 4
    assert lines["05_objects"].split()[-1] == "220" and lines["05_objects"].count("->") == 1 + 4
    assert "01_data s, once: 30.0 (50 spots), 40.0 (100) -> 220 (full)" in done.stdout


def test_same_results_reads_paths_and_key_folders_alike_and_finds_a_changed_number(tmp_path):
    import importlib.util

    import numpy as np
    import pandas as pd

    spec = importlib.util.spec_from_file_location("same_results", paths.ROOT / "benchmarks" / "same_results.py")
    same = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(same)

    def job(root, key, effect):
        (root / "data" / "cache" / key).mkdir(parents=True)
        (root / "runs" / "a").mkdir(parents=True)
        pd.DataFrame({"path": [f"{root.resolve()}/world/{key}/images/x.jpg"], "split": ["test"]}).to_csv(
            root / "data" / "manifest.csv", index=False)
        pd.DataFrame({"epoch": [1], "val_acc": [0.5], "seconds": [float(len(key))]}).to_csv(
            root / "runs" / "a" / "history.csv", index=False)
        pd.DataFrame({"object": ["tree"], "effect": [effect]}).to_csv(root / "runs" / "a" / "causal.csv", index=False)
        np.save(root / "data" / "cache" / key / "images.npy", np.arange(6, dtype=np.uint8))
        return root

    before = job(tmp_path / "before", "0123456789ab", -1.25)
    after = job(tmp_path / "after", "ba9876543210", -1.25)
    causal = pd.read_csv(after / "runs" / "a" / "causal.csv")
    causal[["effect", "object"]].to_csv(after / "runs" / "a" / "causal.csv", index=False)   # columns reordered
    assert same.main([str(before), str(after)]) == 0
    changed = job(tmp_path / "changed", "ba9876543210", -1.2500000000000002)
    assert same.main([str(before), str(changed)]) == 1
    (changed / "runs" / "a" / "causal.csv").unlink()
    assert ("runs/a/causal.csv (only in before)", False) in same.compare(before, changed)


def test_the_gpu_check_says_in_one_line_that_there_is_no_gpu_and_exits_0():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is here: the script would run")
    done = subprocess.run([sys.executable, str(paths.ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().count("\n") == 0, done.stdout + done.stderr
    assert "no CUDA device" in done.stdout


def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    """Every step of the GPU check, on the CPU at smoke size: what it measures, runs and writes
    works before a GPU is ever lent to it."""
    import json

    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(paths.ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--quick", "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert list(steps) == ["throughput", "smoke_grid", "ddp", "repeatable"]
    assert all(s.get("ok") is True for s in steps.values()), steps
    assert {r["arch"] for r in steps["throughput"]["rows"]} == {"resnet18", "vgg11", "-"}
    assert steps["smoke_grid"]["ok"] and not steps["smoke_grid"]["failed"]
    assert steps["ddp"]["ok"] and steps["repeatable"]["identical"]       # the CPU path is bit-identical
    assert report["device"].startswith("cpu")
