"""benchmarks/readme_figures.py on a tiny hand-made outputs folder."""
import importlib.util
import json
import re
from pathlib import Path

import pandas as pd

spec = importlib.util.spec_from_file_location(
    "readme_figures", Path(__file__).resolve().parent.parent / "benchmarks" / "readme_figures.py")
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)


def _outputs(tmp_path: Path) -> Path:
    out = tmp_path / "outputs"
    (out / "runs").mkdir(parents=True)
    pd.DataFrame({"run": ["vgg11_seed0", "vgg11_seed1", "resnet18_seed0"], "arch": ["vgg11", "vgg11", "resnet18"],
                  "seed": [0, 1, 0], "status": "done", "n_test": 312,
                  "test_accuracy": [0.901, 0.958, 0.929], "test_accuracy_low": [0.862, 0.930, 0.896],
                  "test_accuracy_high": [0.929, 0.975, 0.953]}).to_csv(out / "runs" / "summary.csv", index=False)
    for run, (arch, seed), effects in (("vgg11_seed0", ("vgg11", 0), (-0.35, -0.02, -0.50)),
                                       ("resnet18_seed0", ("resnet18", 0), (-1.54, 0.03, -2.74))):
        d = out / "runs" / run
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"config": {"arch": arch, "seed": seed}}))
        e = pd.Series(effects)
        pd.DataFrame({"city": "signtown", "object": ["signboard", "fence", "cue-free"], "n": 104, "spots": 26,
                      "effect": e, "ci_low": e - 0.1, "ci_high": e + 0.1, "accuracy_with": 1.0,
                      "accuracy_without": 0.5, "rank": [1, 2, None]}).to_csv(d / "causal.csv", index=False)
    return out


def test_accuracy_table_and_overlap(tmp_path):
    text = figures.accuracy(_outputs(tmp_path))
    assert "| VGG11    | 0.901 [0.862, 0.929] | 0.958 [0.930, 0.975] |" in text
    assert "| ResNet18 | 0.929 [0.896, 0.953] | —" in text
    assert "different architectures: all overlap" in text
    # only VGG11's two seeds are apart: 0.929 < 0.930
    assert text.count(" vs ") == 1 and "vgg11_seed0 0.901 [0.862, 0.929] vs vgg11_seed1" in text


def test_reliance_ranges_and_missing_sections(tmp_path):
    out = _outputs(tmp_path)
    text = figures.reliance(out)
    # signboard: -0.35 and -1.54, upper ends -0.25 and -1.44; fence: +0.03 + 0.1 reaches over 0
    assert "| signtown | signboard | 2    | -1.54      | -0.35      | -1.64         | -0.25           | 2/2" in text
    assert "| signtown | fence     | 2    | -0.02      | +0.03      | -0.12         | +0.13           | 0/2" in text
    assert text.index("fence") < text.index("cue-free")
    assert figures.table2(out) == figures.MISSING and figures.sanity(out) == figures.MISSING


def test_sanity_reads_the_stored_verdict(tmp_path):
    out = _outputs(tmp_path)
    verdict = {"deletion": {"passed": True, "auc_difference": -0.085, "auc_difference_low": -0.143,
                            "auc_difference_high": -0.025, "n_images": 32},
               "cascade": {"passed": False, "spearman_mean": 0.1, "spearman_low": -0.2, "spearman_high": 0.6,
                           "n_defined": 10, "n_images": 32}}
    (out / "runs" / "vgg11_seed0" / "metrics.json").write_text(json.dumps({"sanity_verdict": verdict}))
    text = re.sub(" +", " ", figures.sanity(out))     # cells are padded to their column's width
    assert "| vgg11_seed0 | -0.085 [-0.143, -0.025] | passed | — " in text
    assert "| 0.10 [-0.20, 0.60] | failed | 32 | 10 " in text
    assert "deletion: passed by 1 of 1 runs (vgg11_seed0)\ncascade: passed by 0 of 1 runs" in text
