"""Training stage on a tiny synthetic cache: learning, determinism, resume, reuse, artifacts."""
from __future__ import annotations

import dataclasses
import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from citylib.core import artifacts, devices
from citylib.core.artifacts import read_json
from citylib.nets import checkpoint, infer, loader, models, train

CITIES = ["amsterdam", "berlin", "cairo"]
SIZE = 64


FAST = train.TrainConfig(epochs=2, batch_size=12, lr=1e-4, threads=2)


@pytest.fixture(scope="module")
def cache(make_cache):
    return make_cache()                     # 20 images per city, 12/4/4


def _weights(run_dir, which="last"):
    return checkpoint.load_model(run_dir, which)[0].state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_checks():
    with pytest.raises(ValueError, match="epochs"):
        train.TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr_gamma"):
        train.TrainConfig(lr_gamma=1.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        FAST.lr = 1.0


@pytest.mark.skipif(torch.cuda.is_available() or devices._mps(), reason="a machine without a GPU")
def test_auto_device_without_a_gpu_is_the_cpu_and_says_so(cache, tmp_path, capsys):
    res = train.run(dataclasses.replace(FAST, epochs=1), tmp_path / "r", cache, arch="simpler", seed=0,
                    name="r", progress=True)
    assert "r: training on auto -> cpu (2 threads, no GPU found)" in capsys.readouterr().out
    assert res.metrics["device"] == "auto -> cpu (2 threads, no GPU found)"
    assert train.key("simpler", 0, dataclasses.replace(FAST, device="cpu"), "d") == train.key("simpler", 0, FAST, "d")
    with pytest.raises(devices.DeviceError, match="device 'cuda': torch sees no CUDA GPU here"):
        train.run(dataclasses.replace(FAST, device="cuda"), tmp_path / "gpu", cache, arch="simpler", seed=0,
                  name="gpu", progress=False)
    assert not (tmp_path / "gpu").exists()                                 # before any work


def test_sync_batchnorm_on_the_cpu_is_refused_before_any_work(cache, tmp_path):
    cfg = dataclasses.replace(FAST, processes=2, sync_batchnorm=True, device="cpu")
    with pytest.raises(ValueError, match="sync_batchnorm needs one CUDA GPU per process"):
        train.run(cfg, tmp_path / "r", cache, arch="resnet18", seed=0, name="r", progress=False)
    assert not (tmp_path / "r").exists()


def test_batches_made_ahead_train_as_batches_made_in_turn(cache):
    """Batches made ahead by helper threads (``train.loader_threads``, off the CPU) give the
    same weights, loss and accuracy as batches made in turn, and draw their augmentation in the
    same order."""
    got = []
    for threads in (0, 3):
        torch.manual_seed(0)
        model = train.models.build("simpler", len(cache.cities), SIZE)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        gen = torch.Generator().manual_seed(0)
        y = torch.from_numpy(np.asarray(cache.y))
        stats = [train.train_one_epoch(model, opt, cache.images, y, cache.split_indices("train"), FAST,
                                       gen, progress=False, loader_threads=threads) for _ in range(2)]
        got.append((stats, model.state_dict(), gen.get_state()))
    (stats0, w0, g0), (stats1, w1, g1) = got
    assert stats0 == stats1 and _same(w0, w1) and torch.equal(g0, g1)
    assert stats0[0] != stats0[1]                                          # it trained


def test_a_snapshot_is_a_copy_on_the_cpu():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    snap = checkpoint.snapshot({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1})
    assert snap["epoch"] == 1 and list(snap["model"]) == ["weight", "bias"]
    assert snap["model"]._metadata == model.state_dict()._metadata
    assert all(t.device.type == "cpu" for t in snap["model"].values())
    assert torch.equal(snap["optimizer"]["state"][0]["exp_avg"], opt.state[model.weight]["exp_avg"])
    with torch.no_grad():
        model.weight += 1                                                  # later steps change nothing in it
    assert not torch.equal(snap["model"]["weight"], model.weight)


class Store:
    """An image store that says how many images were ever read from it at once."""

    def __init__(self, images):
        self.images, self.most = images, 0

    def __getitem__(self, rows):
        got = self.images[rows]
        self.most = max(self.most, len(got) if got.ndim == 4 else 1)
        return got

    def __len__(self):
        return len(self.images)

    @property
    def shape(self):
        return self.images.shape

    @property
    def ndim(self):
        return self.images.ndim


def test_a_training_reads_the_store_a_batch_at_a_time(cache, tmp_path):
    """Training, validation and the test predictions gather one batch of images at a time, so a
    memory-mapped store far larger than RAM is never loaded whole (validation and test sets
    were once gathered in one piece)."""
    store = Store(np.asarray(cache.images))
    small = dataclasses.replace(FAST, epochs=1, batch_size=5)
    on_store = types.SimpleNamespace(**{**vars(cache), "images": store, "key": "store"})
    res = train.run(small, tmp_path / "r", on_store, arch="simpler", seed=0, name="r", progress=False)
    assert res.finished and 0 < store.most <= small.batch_size
    direct = train.run(small, tmp_path / "d", cache, arch="simpler", seed=0, name="d", progress=False)
    assert _same(_weights(res.folder), _weights(direct.folder))            # the same training
    assert res.metrics["test_accuracy"] == direct.metrics["test_accuracy"]


def test_learns_above_chance(cache, tmp_path):
    cfg = dataclasses.replace(FAST, epochs=4, batch_size=6, lr=5e-4)
    res = train.run(cfg, tmp_path / "r", cache, arch="simple", seed=0, name="r", progress=False)
    assert res.finished and not res.reused
    assert res.history["train_loss"].iloc[-1] < res.history["train_loss"].iloc[0]
    # chance is 1/3; 8 of 12 right by chance has probability < 2%
    assert res.metrics["test_accuracy"] >= 0.6, res.metrics


def test_same_seed_bit_identical_other_seed_differs(cache, tmp_path):
    a = train.run(FAST, tmp_path / "a", cache, arch="simple", seed=1, name="a", progress=False)
    b = train.run(FAST, tmp_path / "b", cache, arch="simple", seed=1, name="b", progress=False)
    c = train.run(FAST, tmp_path / "c", cache, arch="simple", seed=2, name="c", progress=False)
    assert a.key == b.key != c.key
    assert _same(_weights(a.folder), _weights(b.folder))
    assert not _same(_weights(a.folder), _weights(c.folder))
    cols = ["train_loss", "train_acc", "val_loss", "val_acc"]
    pd.testing.assert_frame_equal(a.history[cols], b.history[cols])


def test_resume_equals_uninterrupted(cache, tmp_path):
    cfg = dataclasses.replace(FAST, epochs=3)
    full = train.run(cfg, tmp_path / "full", cache, arch="simple", seed=3, name="x", progress=False)
    part = train.run(cfg, tmp_path / "part", cache, arch="simple", seed=3, name="x", progress=False, stop_after=1)
    assert not part.finished and not (tmp_path / "part" / "training.json").exists()
    assert [p.name for p in sorted((tmp_path / "part" / "checkpoints").iterdir())] == ["epoch_001.pt"]
    # a kill during a checkpoint write leaves its temporary file: the next run removes it
    (tmp_path / "part" / "checkpoints" / ".epoch_002.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "part" / ".history.csv.k1ll3d.tmp").write_text("epoch\n")
    resumed = train.run(cfg, tmp_path / "part", cache, arch="simple", seed=3, name="x", progress=False)
    assert resumed.finished and resumed.resumed_from == 1
    assert not list((tmp_path / "part").rglob("*.tmp"))
    assert _same(_weights(full.folder), _weights(resumed.folder))
    assert _same(_weights(full.folder, "best"), _weights(resumed.folder, "best"))
    assert full.metrics["test_accuracy"] == resumed.metrics["test_accuracy"]
    assert len(pd.read_csv(resumed.folder / "history.csv")) == 3


def test_finished_run_is_reused_and_stale_results_replaced(cache, tmp_path, make_cache):
    out = tmp_path / "run"
    first = train.run(FAST, out, cache, arch="simple", seed=0, name="run", extra_config={"k": 1}, progress=False)
    mtime = (out / "best.pt").stat().st_mtime_ns
    # the full config is stored, not keyed: another later-stage setting reuses the training
    again = train.run(FAST, out, cache, arch="simple", seed=0, name="run", extra_config={"k": 2}, progress=False)
    assert again.reused and again.metrics == first.metrics
    assert (out / "best.pt").stat().st_mtime_ns == mtime
    redo = train.run(FAST, out, cache, arch="simple", seed=0, name="run", extra_config={"k": 1}, progress=False,
                     force=True)   # force trains again, from the start, to the same weights
    assert not redo.reused and redo.resumed_from == 0 and redo.metrics == first.metrics
    assert (out / "best.pt").stat().st_mtime_ns != mtime
    # other training settings: the old results are stale, replaced by a fresh training
    other = train.run(dataclasses.replace(FAST, lr=2e-4), out, cache, arch="simple", seed=0, name="run",
                      progress=False)
    assert not other.reused and other.resumed_from == 0 and other.key != first.key
    assert torch.load(out / "best.pt", weights_only=True)["key"] == other.key
    # an interrupted run of another seed is not resumed by this one
    part = tmp_path / "part"
    train.run(FAST, part, cache, arch="simple", seed=0, name="p", progress=False, stop_after=1)
    fresh = train.run(FAST, part, cache, arch="simple", seed=1, name="p", progress=False)
    assert fresh.finished and fresh.resumed_from == 0
    assert _same(_weights(part), _weights(train.run(FAST, tmp_path / "q", cache, arch="simple", seed=1, name="q",
                                                    progress=False).folder))
    # the key follows the data: another split of the same images is another training
    moved = make_cache()
    moved.index.loc[0, "split"], moved.index.loc[12, "split"] = "val", "train"
    assert checkpoint.data_key(moved, {s: moved.split_indices(s) for s in checkpoint.SPLITS}) != \
        first.config["data_key"]


def test_artifacts(cache, tmp_path):
    cfg = dataclasses.replace(FAST, lr_step=1, lr_gamma=0.5)
    res = train.run(cfg, tmp_path / "r", cache, arch="simple", seed=0, name="r", extra_config={"note": "x"},
                    progress=False)
    out = res.folder
    ck = torch.load(out / "checkpoints" / "epoch_002.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "config", "key", "rng"} <= set(ck)
    assert set(ck["rng"]) == {"torch", "numpy", "python", "generator"}
    assert ck["epoch"] == 2 and ck["config"]["extra"] == {"note": "x"}
    assert ck["config"]["train"]["lr_step"] == 1
    best = torch.load(out / "best.pt", weights_only=True)
    hist = pd.read_csv(out / "history.csv")
    assert list(hist.columns) == ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                                  "seconds"]
    assert hist["lr"].tolist() == pytest.approx([1e-4, 5e-5])       # lr * gamma after lr_step
    assert best["epoch"] == hist["epoch"][hist["val_acc"].idxmax()]  # first of the maxima
    m = read_json(out / "training.json")
    for key in ("test_accuracy", "per_city_accuracy", "confusion_matrix", "cities", "best_epoch",
                "n_train", "n_val", "n_test", "config", "key"):
        assert key in m, key
    assert m["cities"] == CITIES and (m["n_train"], m["n_val"], m["n_test"]) == (36, 12, 12)
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 12 and cm.sum(1).tolist() == [4, 4, 4]
    assert m["test_accuracy"] == pytest.approx(np.trace(cm) / 12)
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == 12 and {"index", "path", "city", "predicted", "correct"} <= set(pred.columns)
    probs = pred[[f"prob_{c}" for c in CITIES]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (pred["correct"] == (pred["city"] == pred["predicted"])).all()
    assert artifacts.ResultFolder(out, train.NAME, res.key).done()["files"] == list(checkpoint.OUTPUT_FILES)
    # load_model + predict reproduce the stored test probabilities
    model, cities, config = checkpoint.load_model(out)
    assert cities == CITIES and config["arch"] == "simple" and not model.training
    p = infer.predict(model, cache.images[pred["index"].to_numpy()], batch_size=5)
    np.testing.assert_allclose(p, probs, atol=1e-5)


def test_keep_checkpoints_and_caller_rng_untouched(cache, tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    threads = torch.get_num_threads()
    cfg = dataclasses.replace(FAST, epochs=3)
    train.run(cfg, tmp_path / "r", cache, arch="simple", seed=0, name="r", progress=False, keep_checkpoints=1)
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["epoch_003.pt"]
    assert torch.equal(torch.get_rng_state(), before) and torch.get_num_threads() == threads


def test_to_tensor_and_augment(cache):
    x = infer.to_tensor(cache.images[:4])                               # (4, 3, 64, 64)
    assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32 and x.is_contiguous()
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert torch.equal(infer.to_tensor(np.array([[[[0, 255, 51]]]], np.uint8)).flatten(),
                       torch.tensor([-1.0, 1.0, -0.6]))
    u = cache.images[:8]                                                # (8, 64, 64, 3)
    off = dataclasses.replace(FAST, flip=False, crop_jitter=0)
    assert loader.augment(u, off, torch.Generator()) is u
    p = 3
    cfg = dataclasses.replace(FAST, flip=True, crop_jitter=p)
    a = loader.augment(u, cfg, torch.Generator().manual_seed(0))
    assert a.shape == u.shape and a.dtype == np.uint8
    assert np.array_equal(a, loader.augment(u, cfg, torch.Generator().manual_seed(0)))
    # each output is a crop of the reflect-padded image, possibly mirrored
    padded = np.pad(u, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    for i in range(len(u)):
        crops = [padded[i, dy:dy + SIZE, dx:dx + SIZE] for dy in range(2 * p + 1)
                 for dx in range(2 * p + 1)]
        assert any(np.array_equal(a[i], c) or np.array_equal(a[i], c[:, ::-1]) for c in crops)


def test_a_corrupt_checkpoint_is_one_clear_line(tmp_path, capsys):
    from citylib.run import cli

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"PK\x03\x04 half a checkpoint")
    with pytest.raises(ValueError, match="best.pt: not a readable citylib checkpoint"):
        checkpoint.load_model(run)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert cli.main(["predict", "--run", str(run), str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable citylib checkpoint" in err[0]


@pytest.mark.parametrize("arch", ["vgg11", "resnet18", "simpler"])
def test_load_model_takes_every_tensor_from_the_checkpoint(tmp_path, arch):
    # the network is built without initial weights: every tensor must come from the file, the
    # caller's random state is left alone, and a checkpoint short of a tensor is refused
    torch.manual_seed(0)
    net = models.build(arch, 3, 64).eval()
    config = {"arch": arch, "cities": CITIES, "image_size": 64}
    torch.save({"config": config, "model": net.state_dict()}, tmp_path / "best.pt")
    before = torch.get_rng_state()
    model, cities, _ = checkpoint.load_model(tmp_path)
    assert torch.equal(torch.get_rng_state(), before) and cities == CITIES
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    state = net.state_dict()
    state.pop(next(iter(state)))
    torch.save({"config": config, "model": state}, tmp_path / "best.pt")
    with pytest.raises(ValueError, match="best.pt: not a readable citylib checkpoint"):
        checkpoint.load_model(tmp_path)
