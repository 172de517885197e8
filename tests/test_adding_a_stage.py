"""The README's "Adding a stage", walked through: a tiny stage defined here (not shipped) gets its
module, one row in the stage table, its notebook and its figure function, in a copy of the
package, and ``citylib run`` on a smoke run then runs it, keys it, reports it and reruns it alone
when its setting changes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pandas as pd
import yaml

from citylib.core import paths

STAGE = '''
"""Brightness stage: how bright the pixels each city's explanations keep are, per city.

Reads the run's Grad-CAM masks and the test images; writes ``brightness.csv`` (city, brightness)
and its marker ``.results/brightness.json``, keyed by the settings, the Grad-CAM key and the code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from citylib.core.artifacts import ResultFolder, code_key, write_csv
from citylib.core.config import check, config_hash
from citylib.explain import saliency
from citylib.stages import gradcam

NAME = "brightness"


@dataclass(frozen=True)
class BrightnessConfig:
    threshold: float = 0.5     # a pixel is explained where its mask >= threshold

    def __post_init__(self):
        check(self, threshold="in [0, 1]")


@dataclass(frozen=True)
class BrightnessResult:
    table: pd.DataFrame
    reused: bool = False
    figures: dict = field(default_factory=dict)


def key(cfg: BrightnessConfig, gradcam_key: str) -> str:
    return config_hash(NAME, code_key(__name__), cfg, gradcam_key)


def run(cfg: BrightnessConfig, run_dir, cache, *, progress: bool = True) -> BrightnessResult:
    run_dir = Path(run_dir)
    cams = gradcam.load(run_dir)
    folder = ResultFolder(run_dir, NAME, key(cfg, cams.meta["key"]))
    if folder.done() is not None:
        return BrightnessResult(pd.read_csv(run_dir / "brightness.csv"), reused=True)
    folder.begin()
    rows = cams.index["index"].to_numpy()
    grey = np.asarray(cache.images[rows], np.float32).mean(-1)              # (n, S, S)
    kept = saliency.upsample(np.asarray(cams.masks), grey.shape[1]) >= cfg.threshold
    each = (grey * kept).sum((1, 2)) / np.maximum(kept.sum((1, 2)), 1)      # (n,)
    table = pd.DataFrame({"city": cams.index["city"], "brightness": each}).groupby(
        "city", as_index=False)["brightness"].mean()
    write_csv(run_dir / "brightness.csv", table)
    folder.commit(["brightness.csv"])
    return BrightnessResult(table)
'''

FIGURES = '''
"""The brightness stage's figure: one bar per city."""
from __future__ import annotations

import matplotlib.pyplot as plt

from citylib.figures import plots


def draw(run, result) -> dict:
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(result.table["city"], result.table["brightness"])
    ax.set(ylabel="mean grey level of the explained pixels")
    path = plots.save(fig, run.dir / "brightness.png")
    plt.close(fig)
    return {"brightness": path}
'''

ROW = '''
    Stage("brightness", "07_brightness.ipynb", (("brightness", brightness.BrightnessConfig),),
          key=lambda run, k: brightness.key(run.cfg.brightness, k["gradcam"]),
          run=lambda run, progress=True: brightness.run(run.cfg.brightness, run.dir, explained(run),
                                                        progress=progress),
          marker=lambda run: ResultFolder(run.dir, brightness.NAME),
          metrics=lambda run: {"brightness": pd.read_csv(run.dir / "brightness.csv").to_dict("records")},
          summary=lambda m: {"brightness_mean": (sum(r["brightness"] for r in m["brightness"]) / len(m["brightness"])
                                                 if m.get("brightness") else None)},
          figures=brightness_plots.draw, report=(("brightness", "Brightness of the explained pixels"),)),
'''

NOTEBOOK_CELLS = [
    ("markdown", [], "# 07 · Brightness\n\nHow bright the pixels each city's explanations keep are."),
    ("code", ["parameters"], 'params_file = "parameters/smoke/simple_seed0.yaml"\noutputs = None'),
    ("code", [], 'from citylib.run import pipeline\n\nrun = pipeline.open_run(params_file, outputs)\n'
                 'result = pipeline.result(run, "brightness")\nresult.table'),
]


def notebook() -> dict:
    cells = [{"cell_type": kind, "id": f"07-{i}", "metadata": {"tags": tags} if tags else {},
              "source": source, **({"outputs": [], "execution_count": None} if kind == "code" else {})}
             for i, (kind, tags, source) in enumerate(NOTEBOOK_CELLS)]
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def add_the_stage(root) -> None:
    """The README's four steps, in a copy of the package at ``root``."""
    pkg = root / "citylib"
    (pkg / "stages" / "brightness.py").write_text(textwrap.dedent(STAGE).lstrip())         # 1. its module
    table = (pkg / "run" / "table.py").read_text()                                          # 2. its row
    table = table.replace("from citylib.stages import ", "from citylib.stages import brightness, ", 1)
    table = table.replace("from citylib.figures import ", "from citylib.figures import brightness_plots, ", 1)
    assert "\n)\nBY_NAME" in table
    table = table.replace("\n)\nBY_NAME", "\n" + ROW.strip("\n") + "\n)\nBY_NAME", 1)
    (pkg / "run" / "table.py").write_text(table)
    (root / "notebooks" / "07_brightness.ipynb").write_text(json.dumps(notebook(), indent=1))   # 3. its notebook
    (pkg / "figures" / "brightness_plots.py").write_text(textwrap.dedent(FIGURES).lstrip())    # 4. its figures


def citylib(root, *args, check=True):
    env = {**os.environ, "PYTHONPATH": str(root), "CITYLIB_SHARED": str(paths.shared())}
    done = subprocess.run([sys.executable, "-m", "citylib", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert not check or done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_a_stage_added_as_the_readme_says_runs_through_citylib_run(tmp_path):
    root = tmp_path / "repo"
    for folder in ("citylib", "notebooks"):
        shutil.copytree(paths.ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    add_the_stage(root)
    params, out = root / "params", tmp_path / "outputs"
    params.mkdir()
    smoke = yaml.safe_load((paths.PARAMETERS / "smoke" / "simple_seed0.yaml").read_text())
    (params / "tiny.yaml").write_text(yaml.safe_dump({**smoke, "brightness": {"threshold": 0.5}}))

    first = citylib(root, "run", "--params", str(params), "--outputs", str(out))
    run_dir = out / "runs" / "tiny"
    assert (run_dir / "07_brightness.ipynb").is_file(), first.stdout[-2000:]
    table = pd.read_csv(run_dir / "brightness.csv")
    assert sorted(table["city"]) == ["signtown", "towerville", "treeville"]
    assert table["brightness"].between(0, 255).all()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["city"] for r in metrics["brightness"]] == list(table["city"])
    summary = pd.read_csv(out / "runs" / "summary.csv")
    assert summary.loc[0, "brightness_mean"] == table["brightness"].mean()
    assert (run_dir / "brightness.png").is_file()
    citylib(root, "report", "--outputs", str(out))
    assert "runs/tiny/brightness.png" in (out / "report" / "index.html").read_text()

    # its own setting reruns its notebook alone
    (params / "tiny.yaml").write_text(yaml.safe_dump({**smoke, "brightness": {"threshold": 0.25}}))
    again = citylib(root, "run", "--params", str(params), "--outputs", str(out))
    assert "executed 1, skipped" in again.stdout, again.stdout[-2000:]
    assert not table.equals(pd.read_csv(run_dir / "brightness.csv"))

    # a bad value of it is refused before any work, naming the file and the key
    (params / "tiny.yaml").write_text(yaml.safe_dump({**smoke, "brightness": {"threshold": 2}}))
    bad = citylib(root, "run", "--params", str(params), "--outputs", str(out), check=False)
    assert bad.returncode == 2 and "tiny.yaml" in bad.stderr and "threshold" in bad.stderr


CAM = '''
"""A test's CAM method: every position weighed by the gradient's absolute value."""
from __future__ import annotations

from citylib.explain.cams.base import BaseCAM, register


@register
class AbsCAM(BaseCAM):
    name = "abscam"

    @classmethod
    def cam(cls, act, grad):
        return (grad.abs() * act).sum(1)
'''


def _python(code: str, root) -> list[str]:
    """The lines ``code`` prints, run with the package at ``root``."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=root, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


def test_a_new_cam_method_is_one_file(tmp_path):
    """A copy of the package with one more file in ``explain/cams/``: the method is known to the
    Grad-CAM stage's settings and to the sweep's default methods, it makes masks, and the
    stages that use the methods are keyed anew."""
    shutil.copytree(paths.ROOT / "citylib", tmp_path / "citylib", ignore=shutil.ignore_patterns("__pycache__"))
    known = """
        from citylib.core import artifacts
        from citylib.explain import cams
        from citylib.stages import methods
        print(list(cams.METHODS), methods.MethodsConfig().methods)
        print(artifacts.code_key("stages.methods"), artifacts.code_key("stages.gradcam"))
        """
    before = _python(known, tmp_path)
    assert "abscam" not in before[0]
    (tmp_path / "citylib" / "explain" / "cams" / "abscam.py").write_text(textwrap.dedent(CAM).lstrip())
    after = _python(known, tmp_path)
    assert after[0].count("'abscam'") == 2                       # registered, and in the sweep
    assert all(a != b for a, b in zip(after[1].split(), before[1].split()))   # both rekeyed
    masks = _python("""
        import torch
        from citylib.explain import cams
        from citylib.nets import models
        from citylib.stages import gradcam
        gradcam.GradCAMConfig(method="abscam")
        torch.manual_seed(0)
        images = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8).numpy()
        res = cams.masks_for(models.build("simple", 3, 64).eval(), images, "abscam")
        print(res.masks.shape, float(res.masks.min()), float(res.masks.max()))
        """, tmp_path)
    assert masks == ["(2, 8, 8) 0.0 1.0"]


def test_a_new_architecture_is_one_registry_entry(tmp_path):
    """One ``@register`` entry in a copy of ``nets/models.py``: parameter files accept the
    architecture, it builds, trains a step, and Grad-CAM and the sweep find its layers."""
    shutil.copytree(paths.ROOT / "citylib", tmp_path / "citylib", ignore=shutil.ignore_patterns("__pycache__"))
    models_py = tmp_path / "citylib" / "nets" / "models.py"
    entry = textwrap.dedent("""
        @register("tiny", "Tiny")
        def _tiny(num_classes: int, image_size: int) -> nn.Module:
            return TableNet(((3, 8), (3, 8), (3, 8)), num_classes, image_size)


        ARCHS = tuple(REGISTRY)
        """)
    models_py.write_text(models_py.read_text().replace("\nARCHS = tuple(REGISTRY)\n", entry, 1))
    out = _python("""
        import torch
        from citylib.core.config import from_dict
        from citylib.explain import cams
        from citylib.nets import models
        from citylib.run.params import RunConfig
        print(from_dict(RunConfig, {"name": "t", "arch": "tiny", "seed": 0}).arch, models.ARCHS[-1])
        torch.manual_seed(0)
        model = models.build("tiny", 3, 64)
        loss = model(torch.randn(2, 3, 64, 64)).sum()
        loss.backward()
        print(models.gradcam_layer(model) is model.features[7], models.sweep_layers(model))
        print(cams.masks_for(model.eval(), torch.zeros(1, 64, 64, 3, dtype=torch.uint8).numpy()).masks.shape)
        """, tmp_path)
    assert out == ["tiny tiny", "True ('features.1', 'features.4', 'features.7')", "(1, 16, 16)"]
