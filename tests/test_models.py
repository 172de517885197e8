"""Model registry: shapes at 64 and 224 px, Table 1 / VGG-S structure, Grad-CAM layers, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from citylib.nets import models


def _run_hooked(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, Grad-CAM layer output) with the hook removed afterwards."""
    seen = {}
    handle = models.gradcam_layer(model).register_forward_hook(lambda m, i, o: seen.update(a=o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, seen["a"]


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("classes", [2, 5])
@pytest.mark.parametrize("arch", models.ARCHS)
def test_shapes(arch, classes, size):
    # shape-only pass on the meta device: no memory for the big fc layers, no compute
    with torch.device("meta"):
        model = models.build(arch, classes, size)
        logits, fmap = _run_hooked(model, torch.zeros(2, 3, size, size))
    assert logits.shape == (2, classes)
    assert fmap.dim() == 4 and fmap.shape[0] == 2
    assert min(fmap.shape[2:]) >= (2 if size == 64 else 7), fmap.shape


@pytest.mark.parametrize("arch", models.ARCHS)
def test_one_step_at_64px(arch):
    torch.manual_seed(0)
    model = models.build(arch, 5, 64)
    layer = models.gradcam_layer(model)
    assert isinstance(layer, nn.ReLU) or arch == "resnet18"   # resnet18: a block ending in ReLU
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).weight
    before = first.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    logits, fmap = _run_hooked(model, torch.randn(2, 3, 64, 64))
    fmap.retain_grad()
    assert logits.shape == (2, 5)
    assert fmap.shape[0] == 2 and min(fmap.shape[2:]) >= 2 and (fmap >= 0).all()   # after ReLU
    nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    assert fmap.grad is not None and fmap.grad.shape == fmap.shape   # what Grad-CAM weighs
    opt.step()
    assert not torch.equal(before, first.detach())


@pytest.mark.parametrize("arch", ["simple", "resnet18"])
def test_real_forward_at_224px(arch):
    model = models.build(arch, 3, 224).eval()
    with torch.no_grad():
        logits, fmap = _run_hooked(model, torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 3) and fmap.shape[2:] == ((28, 28) if arch == "simple" else (7, 7))


def _convs(model):
    return [(m.kernel_size[0], m.out_channels) for m in model.features if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("arch,convs,side", [
    ("simple", [(5, 20), (7, 64), (5, 96), (7, 128)], 6),   # 96 / 2^4
    ("simpler", [(9, 20), (9, 64), (9, 96)], 12),           # 96 / 2^3
])
def test_table1_structure(arch, convs, side):
    with torch.device("meta"):
        model = models.build(arch, 4, 96)
    assert _convs(model) == convs
    layers = list(model.features)
    for i, m in enumerate(layers):
        if isinstance(m, nn.Conv2d):   # conv -> ReLU -> 2x2 max pool, 'same' padding
            assert m.padding[0] == m.kernel_size[0] // 2 and m.stride == (1, 1)
            assert isinstance(layers[i + 1], nn.ReLU)
            assert isinstance(layers[i + 2], nn.MaxPool2d) and layers[i + 2].kernel_size == 2
    fcs = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [f.out_features for f in fcs] == [4096, 100, 4]
    assert fcs[0].in_features == convs[-1][1] * side * side
    assert sum(isinstance(m, nn.ReLU) for m in model.classifier) == 2
    assert models.gradcam_layer(model) is layers[-2]   # ReLU after the last conv


def test_vgg_s_structure():
    with torch.device("meta"):
        model = models.build("vgg_s", 3, 224)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    c1 = convs[0]
    assert (c1.kernel_size, c1.stride, c1.out_channels) == ((7, 7), (2, 2), 96)
    assert (convs[1].kernel_size, convs[1].padding, convs[1].out_channels) == ((5, 5), (1, 1), 256)
    assert [(c.kernel_size, c.padding, c.out_channels) for c in convs[2:]] == [((3, 3), (1, 1), 512)] * 3
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in model.features) == 2
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride) for p in pools] == [(3, 3), (2, 2), (3, 3)]
    fcs = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [f.out_features for f in fcs] == [4096, 4096, 3]
    assert fcs[0].in_features == 512 * 6 * 6        # the original's 6x6 at 224 px
    assert sum(isinstance(m, nn.Dropout) for m in model.classifier) == 2
    assert models.gradcam_layer(model) is model.features[13]


def test_errors():
    with pytest.raises(ValueError, match="known: vgg11, resnet18, simple, simpler, alexnet, vgg_s"):
        models.build("vgg99", 2, 64)
    with pytest.raises(ValueError, match="image_size"):
        models.build("simple", 2, 32)
    with pytest.raises(ValueError, match="num_classes"):
        models.build("simple", 1, 64)
    with pytest.raises(ValueError, match="Grad-CAM"):
        models.gradcam_layer(nn.Linear(2, 2))


@pytest.mark.parametrize("arch", ["vgg11", "alexnet"])
def test_torchvision_classifier_fits_small_maps(arch):
    import torchvision

    reference = {k: v.shape for k, v in getattr(torchvision.models, arch)(num_classes=3).state_dict().items()}
    # at 224 px: torchvision's model, parameter for parameter
    assert {k: v.shape for k, v in models.build(arch, 3, 224).state_dict().items()} == reference
    # at 64 px the pool keeps the map (vgg11 2x2, alexnet 1x1) and fc1 takes exactly its values
    model = models.build(arch, 3, 64)
    side = {"vgg11": 2, "alexnet": 1}[arch]
    fc1 = next(m for m in model.classifier if isinstance(m, nn.Linear))
    assert fc1.in_features == {"vgg11": 512, "alexnet": 256}[arch] * side * side
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.features(x)
        assert feats.shape[-1] == side
        assert torch.equal(model.avgpool(feats), feats)
    if arch == "vgg11":   # torchvision's initialisation of a VGG linear layer
        assert fc1.bias.abs().max() == 0 and 0.005 < fc1.weight.std() < 0.015
