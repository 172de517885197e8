"""Training under torchrun with DDP (gloo, 2 CPU processes) gives one process's weights.

``citylib train`` is started on one outputs folder (the data stage is made once): alone; under
``torchrun --nproc_per_node 2``; and with ``train.processes: 2`` (it starts torchrun itself),
stopped after epoch 1, then resumed. ``citylib run`` of such a file trains it with torchrun from
notebook 02 and goes on with the run's notebooks. The smoke network (Simple) has no batch norm and no dropout, so the processes share
nothing but the averaged gradients: the weights must agree with one process's to 1e-5 (the order
of floating-point sums differs), and the resumed training must end bit for bit where the
uninterrupted one does.
"""
from __future__ import annotations

import os
import subprocess
import sys

import nbformat
import pytest
import torch

from citylib.core import artifacts
from citylib.core.paths import PARAMETERS
from citylib.nets import checkpoint, models
from citylib.run import cli

EPOCHS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    text = (PARAMETERS / "smoke" / "simple_seed0.yaml").read_text()
    assert "  epochs: 1\n" in text and "  batch_size: 8\n" in text and "arch: simple" in text
    text = text.replace("  epochs: 1\n", f"  epochs: {EPOCHS}\n")
    two = text.replace("  batch_size: 8\n", "  batch_size: 8\n  processes: 2\n")
    for name, body in (("alone", text), ("ddp", two), ("resumed", two), ("grid", two)):
        (root / f"{name}.yaml").write_text(body)
    out = root / "outputs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def train_(name, *extra, torchrun=False):
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                  if torchrun else [sys.executable])
        cmd = launch + ["-m", "citylib", "train", "--params", str(root / f"{name}.yaml"),
                        "--outputs", str(out), "--quiet", *extra]
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    printed = {"alone": train_("alone"), "ddp": train_("ddp", torchrun=True),          # started by torchrun
               "stopped": train_("resumed", "--stop-after", "1"),                      # torchrun started by it
               "resumed": train_("resumed")}
    return root, out, printed


def _last(run_dir) -> dict:
    return checkpoint.load_model(run_dir, "last")[0].state_dict()


def test_two_processes_train_the_weights_of_one(trained):
    _, out, printed = trained
    runs = out / "runs"
    assert "2 processes (DDP)" in printed["ddp"] and "DDP" not in printed["alone"]
    alone, ddp = _last(runs / "alone"), _last(runs / "ddp")
    assert alone.keys() == ddp.keys()
    gap = max((alone[k] - ddp[k]).abs().max().item() for k in alone)
    torch.manual_seed(0)                              # the seed's initial weights, as training draws them
    start = models.build("simple", 3, 64).state_dict()
    moved = max((alone[k] - start[k]).abs().max().item() for k in alone)
    assert gap <= 1e-5 and gap < moved / 100, (gap, moved)   # equal, and training moved them far more


def test_stopped_and_resumed_under_ddp_ends_where_the_uninterrupted_run_does(trained):
    _, out, printed = trained
    runs = out / "runs"
    assert "stopped after epoch 1" in printed["stopped"]
    ddp, resumed = _last(runs / "ddp"), _last(runs / "resumed")
    assert all(torch.equal(ddp[k], resumed[k]) for k in ddp)
    assert sorted(p.name for p in (runs / "resumed" / "checkpoints").iterdir()) == [f"epoch_{EPOCHS:03d}.pt"]


def test_a_run_of_two_processes_launches_torchrun_and_completes_its_notebooks(trained):
    root, out, _ = trained
    assert cli.main(["run", "--params", str(root / "grid.yaml"), "--outputs", str(out)]) == 0
    run_dir = out / "runs" / "grid"
    shown = "".join(o.get("text", "") for c in nbformat.read(run_dir / "02_training.ipynb", as_version=4).cells
                    if c.cell_type == "code" for o in c.get("outputs", []))
    assert "grid: training with 2 processes (torchrun, DDP)" in shown
    assert "2 processes (DDP)" in artifacts.read_json(run_dir / "training.json")["device"]
    for nb in ("03_gradcam.ipynb", "04_embedding.ipynb", "05_objects.ipynb"):
        assert (run_dir / nb).is_file(), nb
    ddp, grid = _last(out / "runs" / "ddp"), _last(run_dir)                # the same settings: the same bits
    assert all(torch.equal(ddp[k], grid[k]) for k in ddp)


def test_a_process_count_other_than_the_settings_is_an_error(trained):
    root, out, _ = trained
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "citylib", "train", "--params", str(root / "alone.yaml"),
                           "--outputs", str(out), "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "alone: train.processes is 1 but 2 process(es) run this training" in done.stderr
