"""Grad-CAM stage: agreement with pytorch-grad-cam, in-place ReLUs, edge cases, hooks, storage."""
from __future__ import annotations

import copy
import dataclasses
import functools
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from citylib.core import artifacts, devices
from citylib.explain import cams, saliency
from citylib.nets import checkpoint, infer, models, train
from citylib.stages import gradcam
from citylib.stats import histograms

SIZE = 64
CITIES = ["amsterdam", "berlin", "cairo"]


def _model(arch: str, trained: bool = False, seed: int = 0, size: int = SIZE) -> nn.Module:
    """``arch`` with random weights, or after two Adam steps on random data (a fresh copy)."""
    if not trained:
        torch.manual_seed(seed)
        return models.build(arch, len(CITIES), size).eval()
    return copy.deepcopy(_trained(arch, seed, size))


@functools.lru_cache(maxsize=None)
def _trained(arch: str, seed: int, size: int) -> nn.Module:
    torch.manual_seed(seed)
    model = models.build(arch, len(CITIES), size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        x, y = torch.randn(4, 3, size, size), torch.randint(0, len(CITIES), (4,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _x(n: int = 4, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _no_hooks(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)
               for m in model.modules())


@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
@pytest.mark.parametrize("arch", ["resnet18", "simple", "simpler"])
def test_matches_pytorch_grad_cam(arch, trained):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM

    model, x = _model(arch, trained), _x()
    layer = models.gradcam_layer(model)
    for ours, theirs in ((cams.GradCAM, GradCAM), (cams.GradCAMPlusPlus, GradCAMPlusPlus),
                         (cams.HiResCAM, HiResCAM), (cams.LayerCAM, LayerCAM)):
        with ours(model) as cam:
            res = cam(x)
        # pytorch-grad-cam: ReLU -> min-max (eps 1e-7) -> cv2 bilinear resize -> min-max again;
        # ``upsample`` is the same resize + renormalisation applied to our normalised masks.
        with theirs(model, [layer]) as cam:
            ref = cam(x, None)                                       # (B, S, S), argmax target
        np.testing.assert_allclose(saliency.upsample(res.masks, SIZE), ref, atol=1e-4)
        assert np.array_equal(res.target, res.logits.argmax(1))


@pytest.mark.parametrize("arch", ["vgg11", "alexnet", "vgg_s"])
def test_inplace_relu_gives_the_same_masks(arch):
    model, x = _model(arch), _x()
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules()) or arch == "vgg_s"
    for method in cams.METHODS:
        with cams.make(method, model) as a, cams.make(method, plain) as b:
            ra, rb = a(x), b(x)
        np.testing.assert_allclose(ra.masks, rb.masks, atol=1e-6)
        np.testing.assert_allclose(ra.logits, rb.logits, atol=1e-5)
        assert ra.masks.max() == 1.0


class Tiny(nn.Module):
    """1x1 conv (3 -> 2) -> ReLU -> global average pool -> linear (2 -> 2): CAMs by hand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])[:, :, None, None])
            self.fc.weight.copy_(torch.tensor([[2.0, -1.0], [-1.0, 1.0]]))
        self.gradcam_target = "relu"

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def test_hand_computed_cam():
    # channel 0 of the map = red, channel 1 = green (after ReLU); score_c = sum_k W[c,k] mean(A^k)
    # so dscore_c/dA^k_ij = W[c,k] / 4 and CAM_c = ReLU(sum_k W[c,k] / 4 * A^k).
    red = torch.tensor([[4.0, 0.0], [2.0, -3.0]])
    green = torch.tensor([[0.0, 2.0], [2.0, 1.0]])
    x = torch.stack([red, green, torch.zeros(2, 2)])[None]          # (1, 3, 2, 2)
    A0, A1 = red.clamp(min=0), green                                 # ReLU
    # class 0: (2*A0 - A1)/4 = [[2, -.5], [.5, -.25]] -> ReLU [[2, 0], [.5, 0]] -> /2
    # class 1: (-A0 + A1)/4 = [[-1, .5], [0, .25]] -> ReLU [[0, .5], [0, .25]] -> /0.5
    expected = {0: [[1.0, 0.0], [0.25, 0.0]], 1: [[0.0, 1.0], [0.0, 0.5]]}
    with cams.GradCAM(Tiny()) as cam:
        for c, want in expected.items():
            res = cam(x, target=c)
            np.testing.assert_allclose(res.masks[0], want, atol=1e-6)
            assert res.target.tolist() == [c]
        # logits: [2*1.5 - 1.25, -1.5 + 1.25] = [1.75, -0.25] -> predicted 0
        np.testing.assert_allclose(cam(x).logits[0], [1.75, -0.25], atol=1e-6)
        assert cam(x).target.tolist() == [0]


def test_edge_cases_batch_of_one_constant_image_sizes():
    model = _model("resnet18")
    with cams.GradCAM(model) as cam:
        one = cam(_x(1))
        assert one.masks.shape == (1, 2, 2) and one.probs.shape == (1, 3)
        const = cam(torch.full((2, 3, SIZE, SIZE), 0.3))
        assert np.isfinite(const.masks).all()
        big = cam(_x(2, 96))                                         # another size, same object
        assert big.masks.shape == (2, 3, 3)
        for r in (one, const, big):
            assert r.masks.dtype == np.float32 and 0 <= r.masks.min() and r.masks.max() <= 1
    np.testing.assert_allclose(one.probs.sum(1), 1, atol=1e-5)


def test_all_zero_layer_gives_zero_masks():
    model = _model("simple")
    last_conv = model.features[9]                                    # before features.10 (ReLU)
    with torch.no_grad():
        last_conv.weight.zero_()
        last_conv.bias.fill_(-1.0)                                   # ReLU output all zero
    for method in cams.METHODS:
        with cams.make(method, model) as cam:
            res = cam(_x(3))
        assert not np.isnan(res.masks).any() and (res.masks == 0).all()
    # and the normalisation alone: zero and constant maps stay zero
    maps = torch.stack([torch.zeros(3, 3), torch.full((3, 3), 7.0), torch.arange(9.).view(3, 3)])
    out = saliency.normalise(maps)
    assert (out[:2] == 0).all() and out[2].min() == 0 and out[2].max() == 1


def test_targets_predicted_true_explicit_and_out_of_range():
    model, x = _model("simple", trained=True), _x(4)
    with cams.GradCAM(model) as cam:
        pred = cam(x)
        assert np.array_equal(cam(x, "predicted").masks, pred.masks)
        true = np.array([2, 0, 1, 2])                                # e.g. cache.y of the batch
        res = cam(x, true)
        assert res.target.tolist() == true.tolist()
        assert cam(x, torch.tensor(true)).target.tolist() == true.tolist()
        assert cam(x, 1).target.tolist() == [1, 1, 1, 1]
        other = (pred.target + 1) % 3
        assert not np.allclose(cam(x, other).masks, pred.masks)
        for bad in (3, -1, [0, 1, 2, 5]):
            with pytest.raises(ValueError, match="out of range"):
                cam(x, bad)
        with pytest.raises(ValueError, match="integer"):
            cam(x, 1.0)
        with pytest.raises(ValueError, match="entries"):
            cam(x, [0, 1])
        assert cam(x).masks.shape == (4, 8, 8)                       # still usable after errors


def test_hooks_removed_and_state_restored():
    model = _model("vgg11").train()
    with pytest.raises(KeyError):
        with cams.GradCAM(model) as cam:
            assert not _no_hooks(model)
            cam(_x(2))
            raise KeyError("inside the with block")
    assert _no_hooks(model)
    assert model.training                                            # mode restored
    assert all(p.grad is None for p in model.parameters())           # no parameter gradients
    assert torch.is_grad_enabled()
    with cams.GradCAMPlusPlus(model) as cam:
        with pytest.raises(ValueError):
            cam(_x(2), target=9)                                     # fails inside the call
        assert torch.is_grad_enabled() and model.training
    assert _no_hooks(model)
    with pytest.raises(RuntimeError, match="released"):
        cam(_x(2))
    # the caller's grad mode does not matter, and is left as it was
    model.eval()
    with cams.GradCAM(model) as cam:
        x = _x(2)
        want = cam(x).masks
        with torch.no_grad():
            np.testing.assert_array_equal(cam(x).masks, want)
            assert not torch.is_grad_enabled()
        with torch.inference_mode():
            np.testing.assert_array_equal(cam(x).masks, want)
    # outside a call the hook leaves the model alone
    with cams.GradCAM(model.eval()) as cam, torch.no_grad():
        model(_x(1))
        assert not torch.is_grad_enabled()


def test_hand_computed_hirescam_and_layercam():
    # Tiny's gradient is W[c, k] / 4 at every position, so for class 0 (W = [2, -1]):
    # HiResCAM = sum_k g^k A^k = (2 A0 - A1) / 4 (the same as Grad-CAM here: g is constant);
    # LayerCAM = sum_k ReLU(g^k) A^k = 2 A0 / 4 = [[2, 0], [1, 0]] -> /2.
    # Class 1 (W = [-1, 1]): LayerCAM = A1 / 4 = [[0, .5], [.5, .25]] -> /0.5.
    red = torch.tensor([[4.0, 0.0], [2.0, -3.0]])
    green = torch.tensor([[0.0, 2.0], [2.0, 1.0]])
    x = torch.stack([red, green, torch.zeros(2, 2)])[None]
    with cams.HiResCAM(Tiny()) as cam:
        np.testing.assert_allclose(cam(x, target=0).masks[0], [[1.0, 0.0], [0.25, 0.0]], atol=1e-6)
    with cams.LayerCAM(Tiny()) as cam:
        np.testing.assert_allclose(cam(x, target=0).masks[0], [[1.0, 0.0], [0.5, 0.0]], atol=1e-6)
        np.testing.assert_allclose(cam(x, target=1).masks[0], [[0.0, 1.0], [1.0, 0.5]], atol=1e-6)


def test_position_weighted_methods_differ_from_gradcam_where_gradients_vary():
    model, x = _model("simple", trained=True), _x(4)
    found = {}
    for method in ("gradcam", "hirescam", "layercam"):
        with cams.make(method, model) as cam:
            found[method] = cam(x).masks
    assert np.abs(found["gradcam"] - found["hirescam"]).max() > 1e-3
    assert np.abs(found["hirescam"] - found["layercam"]).max() > 1e-3


def test_gradcam_plus_plus_differs_and_registry():
    model, x = _model("resnet18", trained=True), _x(4)
    with cams.make("gradcam", model) as a, cams.make("gradcam++", model) as b:
        ra, rb = a(x), b(x)
    assert ra.masks.shape == rb.masks.shape
    assert np.abs(ra.masks - rb.masks).max() > 1e-3
    assert set(cams.METHODS) == {"gradcam", "gradcam++", "hirescam", "layercam"}
    with pytest.raises(ValueError, match="unknown CAM method"):
        cams.make("scorecam", model)


def test_upsample_explanation_overlay():
    masks = np.array([[[0.0, 1.0], [0.5, 0.25]], [[0.0, 0.0], [0.0, 0.0]]], np.float16)
    up = saliency.upsample(masks, 8)
    assert up.shape == (2, 8, 8) and up.dtype == np.float32
    assert up[0].min() == 0 and up[0].max() == 1 and (up[1] == 0).all()
    image = np.full((8, 8, 3), 200, np.uint8)
    exp = saliency.explanation(image, up[0], 0.5)
    assert exp.dtype == np.uint8
    assert (exp[up[0] < 0.5] == 0).all() and (exp[up[0] >= 0.5] == 200).all()
    assert (saliency.explanation(np.stack([image] * 2), up, 0.5)[1] == 0).all()
    with pytest.raises(ValueError, match="upsample"):
        saliency.explanation(image, masks[0].astype(np.float32))
    over = saliency.heatmap_overlay(image, up[0], alpha=0.4)
    assert over.shape == image.shape and over.dtype == np.uint8


def _map_size(arch: str, image_size: int) -> tuple[int, int]:
    """(h, w) of the stored masks for S x S inputs: a forward on the meta device (no weights)."""
    with torch.device("meta"):
        model = models.build(arch, 2, image_size).eval()
        seen = {}
        models.gradcam_layer(model).register_forward_hook(lambda m, i, o: seen.update(a=o))
        model(torch.zeros(1, 3, image_size, image_size))
    return tuple(seen["a"].shape[-2:])


def test_mask_storage_size():
    """float16 masks.npy for 30,000 images at 224 px: vgg11 (14 x 14) within 50 MB."""
    size = {a: _map_size(a, 224) for a in models.ARCHS}
    mb = {a: (30_000 * h * w * 2 + 128) / 1e6 for a, (h, w) in size.items()}
    print({a: f"{size[a]} {mb[a]:.1f} MB" for a in models.ARCHS})
    assert size["vgg11"] == (14, 14) and mb["vgg11"] <= 50           # 11.8 MB
    assert size == {"simple": (28, 28), "simpler": (56, 56), "vgg11": (14, 14),
                    "resnet18": (7, 7), "alexnet": (13, 13), "vgg_s": (18, 18)}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, make_cache):
    cache = make_cache(per_city=8, split=(4, 2, 2), size=SIZE)
    out = tmp_path_factory.mktemp("runs") / "simple_seed0"
    train.run(train.TrainConfig(epochs=1, batch_size=6), out, cache, arch="simple", seed=0,
              name="simple_seed0", progress=False)
    return out, cache


def test_run_load_reuse(trained_run):
    run_dir, cache = trained_run
    cfg = gradcam.GradCAMConfig(batch_size=4, sanity_images=4, deletion_steps=4)
    res = gradcam.run(cfg, run_dir, cache, progress=False)
    test = cache.split_indices("test")
    assert not res.reused and res.masks.dtype == np.float16 and res.masks.shape == (6, 8, 8)
    assert list(res.index.columns) == ["index", "path", "city", "target", "predicted", "correct",
                                       *[f"prob_{c}" for c in CITIES]]
    assert res.index["index"].tolist() == test.tolist()
    assert (res.index["target"] == res.index["predicted"]).all()     # target: predicted
    assert res.meta["layer"] == "features.10" and res.meta["map_size"] == [8, 8]
    # the stored masks are the CAMs of the best model, to float16 precision
    model, _, _ = checkpoint.load_model(run_dir)
    direct = cams.masks_for(model, cache.images[test])
    np.testing.assert_allclose(res.masks, direct.masks, atol=1e-3)
    training_key = torch.load(run_dir / "best.pt", weights_only=True)["key"]
    assert res.meta["key"] == gradcam.key(cfg, training_key)
    assert len(res.sanity["cascade"]["steps"]) == 1 + 7              # trained + 4 conv + 3 fc
    assert len(res.sanity["deletion"]["curve_salient"]) == 5
    # 4 images are too few for either check to pass: the verdict says so rather than guess
    assert res.sanity["verdict"]["passed"] is False
    assert {"cascade", "deletion"} <= set(res.sanity["verdict"])

    loaded = gradcam.load(run_dir)
    assert np.array_equal(loaded.masks, res.masks) and loaded.meta == res.meta
    pd.testing.assert_frame_equal(loaded.index, res.index)
    mtime = (res.folder / "masks.npy").stat().st_mtime_ns
    again = gradcam.run(cfg, run_dir, cache, progress=False)
    assert again.reused and (res.folder / "masks.npy").stat().st_mtime_ns == mtime

    true = gradcam.run(gradcam.GradCAMConfig(target="true", batch_size=4, sanity_images=0),
                       run_dir, cache, progress=False)
    assert not true.reused and true.sanity == {}
    assert (true.index["target"] == true.index["city"]).all()
    assert true.meta["key"] != res.meta["key"]


def test_config_checks(trained_run):
    from citylib.core.config import ConfigError, from_dict

    with pytest.raises(ValueError, match="threshold"):
        gradcam.GradCAMConfig(threshold=1.5)
    with pytest.raises(ConfigError, match="method"):
        from_dict(gradcam.GradCAMConfig, {"method": "scorecam"})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(gradcam.GradCAMConfig, {"treshold": 0.4})
    run_dir, cache = trained_run
    other = SimpleNamespace(**{**cache.__dict__, "cities": ["x", "y", "z"]})
    with pytest.raises(artifacts.StaleError, match="train again"):
        gradcam.run(gradcam.GradCAMConfig(), run_dir, other, progress=False)
    moved = SimpleNamespace(**{**cache.__dict__, "index": cache.index.assign(
        split=np.roll(cache.index["split"].to_numpy(), 1))})
    moved.split_indices = lambda s: np.flatnonzero(moved.index["split"].to_numpy() == s)
    with pytest.raises(artifacts.StaleError, match="trained on data snapshot"):   # another split
        gradcam.run(gradcam.GradCAMConfig(), run_dir, moved, progress=False)
    with pytest.raises(FileNotFoundError, match="gradcam.run"):
        gradcam.load(run_dir.parent / "nothing")


@pytest.mark.skipif(torch.cuda.is_available() or devices._mps(), reason="a machine without a GPU")
def test_the_analyses_device_setting_without_a_gpu(trained_run, tmp_path):
    from citylib.run import predict
    from citylib.stages import causal, methods

    run_dir, cache = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(gradcam.FOLDER))
    cfg = gradcam.GradCAMConfig(batch_size=4, sanity_images=0)
    res = gradcam.run(cfg, copy, cache, progress=False)
    assert res.meta["device"].startswith("auto -> cpu (") and res.meta["device"].endswith("no GPU found)")
    assert gradcam.key(dataclasses.replace(cfg, device="cpu"), "t") == gradcam.key(cfg, "t")
    assert gradcam.key(dataclasses.replace(cfg, device="cuda:1"), "t") != gradcam.key(cfg, "t")
    assert causal.key(causal.CausalConfig(device="cpu"), "t", "c") == causal.key(causal.CausalConfig(), "t", "c")
    methods_key = lambda c: methods.key(c, histograms.StatsConfig(), "t", "l", "c", "predicted")   # noqa: E731
    assert methods_key(methods.MethodsConfig(device="cpu")) == methods_key(methods.MethodsConfig())
    with pytest.raises(ValueError, match="'device' = 'gpu'"):
        gradcam.GradCAMConfig(device="gpu")
    again = tmp_path / "again"
    shutil.copytree(run_dir, again, ignore=shutil.ignore_patterns(gradcam.FOLDER))
    with pytest.raises(devices.DeviceError, match="torch sees no CUDA GPU here"):
        gradcam.run(dataclasses.replace(cfg, device="cuda"), again, cache, progress=False)
    assert not (again / gradcam.FOLDER).exists()                          # before any work
    with pytest.raises(devices.DeviceError, match="torch sees no CUDA GPU here"):
        predict.run(run_dir, [], device="cuda")


def test_copies_on_several_devices_give_one_device_masks(trained_run, tmp_path, monkeypatch):
    """``cuda:all`` shares the batches out among copies of the network, one per GPU; here two
    copies on the CPU take the same path, each in its own thread."""
    run_dir, cache = trained_run
    cfg = gradcam.GradCAMConfig(batch_size=2, sanity_images=0, device="cpu")
    runs = {}
    for copies in (1, 2):
        monkeypatch.setattr(devices, "every", lambda name, k=copies: [torch.device("cpu")] * k)
        where = tmp_path / f"copies{copies}"
        shutil.copytree(run_dir, where, ignore=shutil.ignore_patterns(gradcam.FOLDER))
        runs[copies] = gradcam.run(cfg, where, cache, progress=False)
    assert len(runs[1].index) == 6 and len(range(0, 6, cfg.batch_size)) == 3   # 3 batches over 2 copies
    assert np.array_equal(runs[1].masks, runs[2].masks)
    pd.testing.assert_frame_equal(runs[1].index, runs[2].index)
    model = checkpoint.load_model(run_dir)[0]
    rows = cache.split_indices("test")
    assert np.array_equal(infer.logits([model, copy.deepcopy(model)], cache.images, 4, rows),
                          infer.logits(model, cache.images, 4, rows))
    assert _no_hooks(model)
