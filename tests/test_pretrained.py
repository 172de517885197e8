"""Starting a training from pretrained weights (``train.init``), offline: every weights file here
is made by the test, under torchvision's own file name in a temporary TORCH_HOME for imagenet."""
from __future__ import annotations

import dataclasses
import urllib.error

import numpy as np
import pytest
import torch
import yaml

from citylib.core.config import ConfigError
from citylib.explain.cams import base as cams
from citylib.nets import checkpoint, infer, models, pretrained, train
from citylib.run import params

FAST = train.TrainConfig(epochs=1, batch_size=12, threads=2)


@pytest.fixture(scope="module")
def cache(make_cache):
    return make_cache()                     # three cities, 64 px


@pytest.fixture
def imagenet_home(tmp_path, monkeypatch):
    """A TORCH_HOME holding a resnet18 ImageNet-shaped state dict (1,000 classes) under
    torchvision's file name, its weights drawn at random; returns (home, the state dict)."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    torch.manual_seed(7)
    from torchvision.models import resnet18
    state = resnet18(weights=None).state_dict()
    target = pretrained.imagenet_file("resnet18")
    assert target.parent == home / "hub" / "checkpoints" and target.name.startswith("resnet18-")
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    return home, state


def _no_download(monkeypatch):
    def refuse(url, *a, **k):
        raise urllib.error.URLError(f"no route to {url}")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_imagenet_loads_torchvisions_file_and_refits_the_classifier(imagenet_home, monkeypatch):
    _no_download(monkeypatch)                        # the file is there: nothing is downloaded
    home, state = imagenet_home
    start = pretrained.resolve("imagenet", "resnet18")
    assert start.normalisation == infer.IMAGENET and start.file == pretrained.imagenet_file("resnet18")
    torch.manual_seed(0)
    model = models.build("resnet18", 3, 64)
    fc_before = model.fc.weight.clone()
    report = pretrained.apply(model, start, "resnet18", ["a", "b", "c"])
    assert report["new"] == ["fc.weight", "fc.bias"]
    mine = model.state_dict()
    assert set(report["loaded"]) == set(mine) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(mine[k], state[k]) for k in report["loaded"])
    assert torch.equal(model.fc.weight, fc_before) and model.fc.out_features == 3
    assert model.normalisation == infer.IMAGENET


def test_a_training_started_from_imagenet_records_it_and_its_inputs_travel(imagenet_home, cache, tmp_path,
                                                                          capsys):
    res = train.run(dataclasses.replace(FAST, init="imagenet"), tmp_path / "r", cache, arch="resnet18",
                    seed=0, name="r", progress=True)
    said = capsys.readouterr().out
    init = res.metrics["init"]
    assert init["init"] == "imagenet" and init["new"] == ["fc.weight", "fc.bias"] and len(init["loaded"]) == 120
    assert (f"r: starting from imagenet {pretrained.imagenet_file('resnet18')}: 120 tensors loaded, "
            "2 newly initialised (fc.weight, fc.bias)") in said
    assert init["sha256"] == pretrained.file_hash(pretrained.imagenet_file("resnet18"))
    assert res.config["normalisation"] == infer.IMAGENET.to_dict()
    model, _, _ = checkpoint.load_model(tmp_path / "r")
    assert model.normalisation == infer.IMAGENET
    # predict and Grad-CAM feed the network ImageNet-normalised inputs, not [-1, 1] ones
    images = cache.images[:6]
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
         - torch.tensor(infer.IMAGENET.mean).view(3, 1, 1)) / torch.tensor(infer.IMAGENET.std).view(3, 1, 1)
    with torch.no_grad():
        want = torch.softmax(model.double()(x), 1).numpy()
    model.float()
    assert np.allclose(infer.predict(model, images), want, atol=1e-5)
    cam = cams.masks_for(model, images)
    assert np.allclose(cam.probs, want, atol=1e-5)
    model.normalisation = infer.SCRATCH                                     # the wrong inputs differ
    assert not np.allclose(cams.masks_for(model, images).probs, want, atol=1e-3)


def test_a_path_loads_torchvision_format_and_citylib_checkpoints(tmp_path, cache):
    torch.manual_seed(3)
    from torchvision.models import resnet18
    state = resnet18(weights=None).state_dict()
    wrapped = tmp_path / "ddp.pth"               # a training script's {"state_dict": DDP names}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    start = pretrained.resolve(str(wrapped), "resnet18")
    model = models.build("resnet18", 3, 64)
    report = pretrained.apply(model, start, "resnet18", ["a", "b", "c"])
    assert report["new"] == ["fc.weight", "fc.bias"] and start.normalisation == infer.IMAGENET
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in report["loaded"])
    legacy = tmp_path / "legacy.pth"              # PyTorch's format before 1.6, as old torchvision files
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert all(torch.equal(pretrained.resolve(str(legacy), "resnet18").state[k], state[k]) for k in state)
    # a citylib checkpoint: its normalisation, and its output layer kept for the same cities only
    res = train.run(FAST, tmp_path / "mine", cache, arch="simpler", seed=0, name="mine", progress=False)
    best = tmp_path / "mine" / "best.pt"
    start = pretrained.resolve(str(best), "simpler")
    assert start.normalisation == infer.SCRATCH and list(start.cities) == res.config["cities"]
    same = pretrained.apply(models.build("simpler", 3, 64), start, "simpler", res.config["cities"])
    assert same["new"] == []
    other = pretrained.apply(models.build("simpler", 3, 64), start, "simpler", ["x", "y", "z"])
    assert other["new"] == list(pretrained.output_layer(models.build("simpler", 3, 64)))
    with pytest.raises(ConfigError, match=r"a checkpoint of 'simpler', but this run's architecture is 'simple'"):
        pretrained.resolve(str(best), "simple")


def _param_file(tmp_path, init, arch="resnet18", **train_extra):
    f = tmp_path / "p" / f"{arch}_seed0.yaml"
    f.parent.mkdir(exist_ok=True)
    f.write_text(yaml.safe_dump({"arch": arch, "seed": 0, "data": {"image_size": 64},
                                 "train": {"init": init, **train_extra}}))
    return f


def test_bad_weights_stop_the_parameter_file_in_one_line(tmp_path, monkeypatch):
    torch.manual_seed(3)
    from torchvision.models import resnet18
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    cfg = params.load(_param_file(tmp_path, "../r18.pth"))                # relative: from the file's folder
    assert cfg.train.init == str(tmp_path / "r18.pth")
    cases = {  # init, arch -> what the one line says
        ("../r18.pth", "simpler"): r"not simpler weights: \d+ tensor\(s\) it has no place for, e.g. 'bn1",
        ("../r18.pth", "vgg11"): r"not vgg11 weights",
        ("../corrupt.pth", "resnet18"): r"corrupt.pth: not a readable PyTorch weights file",
        ("../absent.pth", "resnet18"): r"absent.pth'?: no such file",
        ("imagenet", "simple"): r"torchvision has no ImageNet weights for 'simple'; those that have them: vgg11, resnet18, alexnet",
    }
    (tmp_path / "corrupt.pth").write_bytes(b"\x80\x02 not a weights file")
    for (init, arch), says in cases.items():
        f = _param_file(tmp_path, init, arch)
        with pytest.raises(ConfigError, match=says) as e:
            params.load(f)
        assert str(f) in str(e.value) and "'train.init'" in str(e.value) and "\n" not in str(e.value)
    # imagenet where the file is absent and cannot be downloaded: where it goes
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    _no_download(monkeypatch)
    target = pretrained.imagenet_file("resnet18")
    with pytest.raises(ConfigError) as e:
        params.load(_param_file(tmp_path, "imagenet"))
    said = str(e.value)
    assert f"place {pretrained.imagenet_weights('resnet18').url} at {target}" in said and "\n" not in said
    assert not target.exists()
    with pytest.raises(ConfigError, match=r"'train.freeze': 'layer9' names no parameter of resnet18"):
        params.load(_param_file(tmp_path, "scratch", freeze=["layer9"]))
    with pytest.raises(ConfigError, match=r"keeps every parameter of resnet18 fixed"):
        params.load(_param_file(tmp_path, "scratch", freeze=["conv1", "bn1", "layer1", "layer2", "layer3",
                                                             "layer4", "fc"]))


def test_the_key_follows_the_files_content_not_its_path(tmp_path):
    torch.manual_seed(1)
    torch.save(models.build("simple", 3, 64).state_dict(), tmp_path / "a.pt")
    cfg = dataclasses.replace(FAST, init=str(tmp_path / "a.pt"))
    before = train.key("simple", 0, cfg, "d")
    assert before != train.key("simple", 0, FAST, "d")
    (tmp_path / "a.pt").rename(tmp_path / "b.pt")
    assert train.key("simple", 0, dataclasses.replace(FAST, init=str(tmp_path / "b.pt")), "d") == before
    torch.save(models.build("simple", 3, 64).state_dict(), tmp_path / "b.pt")   # other weights
    assert train.key("simple", 0, dataclasses.replace(FAST, init=str(tmp_path / "b.pt")), "d") != before


def test_frozen_parameters_and_their_statistics_do_not_move(cache):
    torch.manual_seed(0)
    model = models.build("resnet18", 3, 64)
    cfg = dataclasses.replace(FAST, freeze=("conv1", "bn1", "layer1"), backbone_lr_scale=0.1)
    opt = pretrained.optimiser(model, "resnet18", cfg)
    assert [g["lr"] for g in opt.param_groups] == [cfg.lr, pytest.approx(cfg.lr * 0.1)]
    assert len(opt.param_groups[0]["params"]) == 2                              # fc.weight, fc.bias
    fixed = pretrained.frozen(model, cfg.freeze)
    assert "conv1.weight" in fixed and "layer1.1.bn2.bias" in fixed and "layer2.0.conv1.weight" not in fixed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = torch.as_tensor(cache.y)
    train.train_one_epoch(model, opt, cache.images, y, cache.split_indices("train"), cfg,
                          torch.Generator().manual_seed(0), progress=False, max_steps=2)
    after = model.state_dict()
    kept = [k for k in after if k.startswith(("conv1.", "bn1.", "layer1."))]
    moved = [k for k in after if k.startswith(("layer2.", "fc.")) and after[k].is_floating_point()]
    assert kept and all(torch.equal(after[k], before[k]) for k in kept)   # weights and running stats
    assert all(not torch.equal(after[k], before[k]) for k in moved)


def test_the_fine_tuning_profile_loads_where_its_weights_are(imagenet_home, tmp_path, monkeypatch):
    _no_download(monkeypatch)
    (tmp_path / "my_cities").mkdir()
    (tmp_path / "my_cities" / "manifest.csv").write_text("path,city\n")
    profile = params.paths.PARAMETERS / "examples" / "finetune" / "resnet18_seed0.yaml"
    (tmp_path / "my_finetune").mkdir()
    copy = tmp_path / "my_finetune" / profile.name
    copy.write_text(profile.read_text())
    assert pretrained.imagenet_file("resnet18").name in profile.read_text()    # what it says it downloads
    cfg = params.load(copy)
    assert (cfg.train.init, cfg.train.freeze, cfg.data.image_size) == ("imagenet", ("conv1", "bn1", "layer1"), 224)
