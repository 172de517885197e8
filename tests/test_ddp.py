"""Training under torchrun with DDP (gloo, 2 CPU processes) gives one process's weights.

``citylib train`` is started three times on one outputs folder (the data stage is made once):
alone; under ``torchrun --nproc_per_node 2``; and under torchrun stopped after epoch 1, then
resumed. The smoke network (Simple) has no batch norm and no dropout, so the processes share
nothing but the averaged gradients: the weights must agree with one process's to 1e-5 (the order
of floating-point sums differs), and the resumed training must end bit for bit where the
uninterrupted one does.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from citylib import models, train
from citylib.paths import PARAMETERS

EPOCHS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    text = (PARAMETERS / "smoke" / "simple_seed0.yaml").read_text()
    assert "  epochs: 1\n" in text and "arch: simple" in text
    for name in ("alone", "ddp", "resumed"):
        (root / f"{name}.yaml").write_text(text.replace("  epochs: 1\n", f"  epochs: {EPOCHS}\n"))
    out = root / "outputs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def train_(name, *extra, processes=1):
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                  if processes > 1 else [sys.executable])
        cmd = launch + ["-m", "citylib.cli", "train", "--params", str(root / f"{name}.yaml"),
                        "--outputs", str(out), "--quiet", *extra]
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    printed = {"alone": train_("alone"), "ddp": train_("ddp", processes=2),
               "stopped": train_("resumed", "--stop-after", "1", processes=2),
               "resumed": train_("resumed", processes=2)}
    return out / "runs", printed


def _last(run_dir) -> dict:
    return train.load_model(run_dir, "last")[0].state_dict()


def test_two_processes_train_the_weights_of_one(trained):
    runs, printed = trained
    assert "2 processes (DDP)" in printed["ddp"] and "DDP" not in printed["alone"]
    alone, ddp = _last(runs / "alone"), _last(runs / "ddp")
    assert alone.keys() == ddp.keys()
    gap = max((alone[k] - ddp[k]).abs().max().item() for k in alone)
    torch.manual_seed(0)                              # the seed's initial weights, as training draws them
    start = models.build("simple", 3, 64).state_dict()
    moved = max((alone[k] - start[k]).abs().max().item() for k in alone)
    assert gap <= 1e-5 and gap < moved / 100, (gap, moved)   # equal, and training moved them far more


def test_stopped_and_resumed_under_ddp_ends_where_the_uninterrupted_run_does(trained):
    runs, printed = trained
    assert "stopped after epoch 1" in printed["stopped"]
    ddp, resumed = _last(runs / "ddp"), _last(runs / "resumed")
    assert all(torch.equal(ddp[k], resumed[k]) for k in ddp)
    assert sorted(p.name for p in (runs / "resumed" / "checkpoints").iterdir()) == [f"epoch_{EPOCHS:03d}.pt"]
