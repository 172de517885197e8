"""Results keyed by exactly what made them, in smoke size: a later stage's setting reruns that
stage alone, a changed source folder reruns everything that read it, runs of different data
snapshots are never compared, the analysis notebooks never rebuild the split, and edited code
invalidates the results it made. The tests share one grid and run in order."""
import shutil

import pandas as pd
import pytest
import torch
import yaml

from citylib.core import artifacts
from citylib.run import cli, pipeline, runner
from citylib.stages import gradcam
from citylib.world import synth

PARAMS = {"arch": "simple", "seed": 0, "data": {"image_size": 64},
          "train": {"epochs": 1, "batch_size": 8}}


def write_params(path, source, **changes):
    params = {**PARAMS, "data": {**PARAMS["data"], "source": str(source)}, **changes}
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A folder of city folders (a small generated world's images, no label maps), one
    parameter file, and the whole chain run once."""
    root = tmp_path_factory.mktemp("keys")
    world = root / "world"
    synth.run(synth.SynthConfig(spots_per_city=6, views=2, size=64), world)
    src = root / "src"
    for city_dir in (world / "images").iterdir():
        shutil.copytree(city_dir, src / city_dir.name)
    params, out = root / "params", root / "outputs"
    params.mkdir()
    write_params(params / "a.yaml", src)
    assert cli.main(["run", "--params", str(params), "--outputs", str(out)]) == 0
    return params, out, src


def files_in(folder):
    return sorted(str(p) for p in folder.rglob("*.jpg"))


def test_a_later_setting_reruns_that_stage_alone(grid):
    params, out, src = grid
    best = out / "runs" / "a" / "best.pt"
    before = best.stat().st_mtime_ns
    write_params(params / "a.yaml", src, stats={"threshold": 0.4})
    result = runner.run(params=params, outputs=out)
    assert result.ok, result.failed
    assert set(result.executed) == {"a/05_objects.ipynb", "comparison/06_comparison.ipynb"}
    assert {"data/01_data.ipynb", "a/02_training.ipynb", "a/03_gradcam.ipynb",
            "a/04_embedding.ipynb"} <= set(result.skipped)
    assert best.stat().st_mtime_ns == before                         # not retrained
    metrics = artifacts.read_json(out / "runs" / "a" / "metrics.json")
    assert metrics["objects"]["threshold"] == 0.4
    assert metrics["settings"]["stats"]["threshold"] == 0.4 and "extra" not in metrics["config"]
    assert pd.read_csv(out / "runs" / "a" / "r_scores.csv").shape[0] > 0


def test_a_changed_source_is_reported_and_everything_after_it_reruns(grid, capsys):
    params, out, src = grid
    city = sorted(p for p in src.iterdir())[0]
    images = sorted(city.glob("*.jpg"))
    for i, image in enumerate(images[:6]):
        shutil.copyfile(image, city / f"added_{i}.jpg")
    images[-1].unlink()
    result = runner.run(params=params, outputs=out)
    assert result.ok, result.failed
    assert "source changed: 6 files added, 1 removed, 0 modified" in capsys.readouterr().out
    assert set(result.executed) == ({"data/01_data.ipynb", "comparison/06_comparison.ipynb"}
                                    | {f"a/{nb}" for nb in runner.RUN_NOTEBOOKS})
    manifest = pd.read_csv(out / "data" / "manifest.csv")
    assert sorted(manifest["path"]) == files_in(src)                 # the folder as it is now
    snapshot = pipeline.load_cache(pipeline.open_run(params / "a.yaml", out)).key
    trained = torch.load(out / "runs" / "a" / "best.pt", weights_only=True)["config"]
    assert trained["data_key"] == snapshot
    assert artifacts.read_json(out / "runs" / "a" / "metrics.json")["n_test"] == \
        int((manifest["split"] == "test").sum())


def test_runs_of_different_snapshots_are_never_compared(grid):
    params, out, src = grid
    write_params(params / "b.yaml", src, seed=1, stats={"threshold": 0.4})
    city = sorted(p for p in src.iterdir())[1]
    shutil.copyfile(sorted(city.glob("*.jpg"))[0], city / "one_more.jpg")
    result = runner.run(params=params, only=["b"], outputs=out)
    assert result.ok, result.failed
    # 'a' was trained on the old snapshot: it is not finished on this one, so not compared
    ar = pd.read_csv(out / "comparison" / "ar.csv")
    assert set(ar["run_a"]) | set(ar["run_b"]) <= {"b", "b (randomised)"}
    both = pipeline.open_grid([params / "a.yaml", params / "b.yaml"], out)
    with pytest.raises(pipeline.StaleError, match="different data snapshots"):
        pipeline.result(both, "comparison")
    assert set(ar["run_a"]) == set(pd.read_csv(out / "comparison" / "ar.csv")["run_a"])


def test_the_analysis_never_rebuilds_the_split(grid):
    params, out, src = grid
    run = pipeline.open_run(params / "b.yaml", out)
    trained = torch.load(run.dir / "best.pt", weights_only=True)["config"]["data_key"]
    city = sorted(p for p in src.iterdir())[2]
    for i, image in enumerate(sorted(city.glob("*.jpg"))[:4]):
        shutil.copyfile(image, city / f"late_{i}.jpg")
    manifest = (out / "data" / "manifest.csv").read_bytes()
    # the source changed, but the analysis reads the frozen snapshot the model was trained on
    cams = pipeline.result(run, "gradcam")
    assert cams.meta["data_key"] == trained
    assert pipeline.load_cache(run).key == trained and (out / "data" / "manifest.csv").read_bytes() == manifest
    cache = pipeline.load_cache(run)
    assert set(cams.index["index"]) == set(cache.split_indices("test"))
    # once the data stage made a new snapshot, the analysis refuses until training reruns
    new = pipeline.result(run, "data")
    assert not new.reused and new.key != trained
    for stage in ("gradcam", "embedding", "objects"):
        with pytest.raises(pipeline.StaleError, match="train again"):
            pipeline.result(run, stage)


def test_edited_stage_code_invalidates_its_results_only(grid, tmp_path, monkeypatch):
    params, out, _ = grid
    run = pipeline.open_run(params / "b.yaml", out)
    pipeline.result(run, "training")                 # on the current snapshot, as the runner would
    with pytest.raises(pipeline.StaleError, match="run Grad-CAM first"):   # masks of the old model
        pipeline.result(run, "objects")
    pipeline.result(run, "gradcam")
    first = pipeline.result(run, "objects")
    again = pipeline.result(run, "objects")
    assert not first.reused and again.reused
    keys = pipeline.keys(run)
    package = tmp_path / "citylib"             # the package with one stage module edited
    shutil.copytree(artifacts.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(package / "stats" / "histograms.py", "a") as fh:
        fh.write("\n# an edit\n")
    monkeypatch.setattr(artifacts, "PACKAGE", package)
    edited = pipeline.keys(run)
    # the objects stage and the method sweep count masks with the histograms; nothing else does
    assert [s for s in keys if keys[s] != edited[s]] == ["objects", "methods"]
    assert not pipeline.result(run, "objects").reused                      # recomputed
    assert pipeline.result(run, "gradcam").reused                          # what it reads: reused
    assert pipeline.result(run, "training").reused
    assert gradcam.load(run.dir).meta["key"] == edited["gradcam"]
