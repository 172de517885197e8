"""Models: the registry of city-recognition CNNs, built with random weights (``train.init`` then
starts them from pretrained weights: ``citylib.nets.pretrained``).

Reads and writes nothing. Each architecture is one ``@register`` entry: its name, its display
name, its builder, the layer Grad-CAM explains, its layers for the method sweep and its head (the
classifier a pretrained start refits to the cities and may resize; the rest is its backbone). A
new architecture is one more entry. ``build(arch, num_classes, image_size)`` returns a fresh,
randomly initialised network (the caller seeds torch first); ``gradcam_layer(model)`` returns the
module whose forward output is the last convolutional feature map after its ReLU, the map
Grad-CAM weighs; ``sweep_layers(model)`` the layers of the sweep.

Architectures (input: (B, 3, S, S) normalised RGB, any S >= 64; the paper uses S = 224):

- ``simple``, ``simpler``: the two shallow networks of Shi, Khademi & van Gemert,
  "Deep Visual City Recognition Visualization", Table 1.
- ``vgg11``, ``resnet18``, ``alexnet``: torchvision's definitions, ``weights=None``. Below the
  size torchvision was made for, the adaptive pool before vgg11's and alexnet's classifier would
  copy each value of a smaller map many times into the first fc layer (at 64 px, vgg11's 2 x 2
  map fills a 7 x 7 grid: a 25,088-wide fc1 of 102 M parameters, about 40% of a training step,
  holding nothing a 2,048-wide one cannot express, since a linear map of copies is a linear map
  of the originals). There the pool keeps the map's own size and fc1 is sized to it, initialised
  as torchvision initialises it; at 224 px (and above) the models are torchvision's exactly.
- ``vgg_s``: VGG-CNN-S of Chatfield et al. 2014, "Return of the Devil in the Details".

Grad-CAM map size at 64 px / 224 px: simple 8/28, simpler 16/56, vgg11 4/14, resnet18 2/7,
alexnet 3/13, vgg_s 4/18 (every architecture gives at least 2x2 at 64 px).
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

MIN_IMAGE_SIZE = 64


@dataclass(frozen=True)
class Arch:
    """One architecture, declared once (``register``): what a parameter file's ``arch`` names, how
    tables and figures name it, its builder, the layer Grad-CAM explains (a module name: the last
    convolutional feature map after its ReLU) and the layers of the method sweep. The registry's
    order is the paper's (Table 2), which tables follow."""

    name: str                  # the parameter files' ``arch:``
    display: str               # tables and figures: "VGG11", "ResNet18", ...
    builder: Callable[[int, int], nn.Module]     # (num_classes, image_size) -> a fresh network
    gradcam_layer: str | None                    # its Grad-CAM layer's module name (None: the
    #                                              network's class declares ``gradcam_target``)
    sweep: Callable[[nn.Module, int], tuple[str, ...]]   # (model, n) -> the sweep's layers
    head: str = "classifier"                     # the classifier's module name; the rest: backbone


_REGISTRY: dict[str, Arch] = {}
REGISTRY = types.MappingProxyType(_REGISTRY)   # read-only view, filled by ``register`` below


def register(name: str, display: str, gradcam_layer: str | None = None,
             sweep: Callable[[nn.Module, int], tuple[str, ...]] | None = None, head: str = "classifier"):
    """Declare the decorated ``builder(num_classes, image_size)`` as architecture ``name``;
    ``sweep`` defaults to the ends of the conv blocks before the Grad-CAM layer (``block_ends``)."""
    def deco(builder):
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is declared twice")
        _REGISTRY[name] = Arch(name, display, builder, gradcam_layer, sweep or block_ends, head)
        return builder
    return deco


def block_ends(model: nn.Module, n: int) -> tuple[str, ...]:
    """The last ``n`` stages of a ``features`` stack, finest first, the Grad-CAM layer last: the
    ReLUs that end a conv block, just before its max pool."""
    target = model.gradcam_target
    feats = model.get_submodule("features")
    ends = [f"features.{i}" for i in range(len(feats) - 1)
            if isinstance(feats[i], nn.ReLU) and isinstance(feats[i + 1], nn.MaxPool2d)]
    ends = [e for e in ends if int(e.split(".")[1]) < int(target.split(".")[1])]
    return tuple(ends[-(n - 1):] + [target]) if n > 1 else (target,)


def resnet_stages(model: nn.Module, n: int) -> tuple[str, ...]:
    """The outputs of ResNet's last ``n`` stages (``layer2``-``layer4`` for 3), finest first."""
    return tuple(f"layer{k}" for k in range(5 - n, 5))


# Table 1 of the paper: (kernel, channels) per conv; each conv is followed by ReLU and a 2x2 max
# pool. Tuples, so nothing here can be changed by a caller.
SIMPLE_CONVS = ((5, 20), (7, 64), (5, 96), (7, 128))
SIMPLER_CONVS = ((9, 20), (9, 64), (9, 96))
PAPER_FC = (4096, 100)


class TableNet(nn.Module):
    """A Table 1 network: [conv k x k (same padding) -> ReLU -> maxpool 2x2] * n -> fc -> fc -> fc.

    The paper does not state padding; 'same' padding (k // 2) keeps each conv's output the size
    of its input, so any S >= 64 works and the last feature map is S / 2^(n-1) wide (the fc
    input size follows from S). The paper lists fc-4096, fc-100, fc-classes without saying what
    sits between them; we put a ReLU after each hidden fc (no dropout, none is mentioned).
    """

    def __init__(self, convs: tuple[tuple[int, int], ...], num_classes: int, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, side = 3, image_size
        for k, c_out in convs:
            layers += [nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, side = c_out, side // 2
        self.features = nn.Sequential(*layers)
        self.gradcam_target = f"features.{len(layers) - 2}"   # the ReLU after the last conv
        self.classifier = nn.Sequential(
            nn.Linear(c_in * side * side, PAPER_FC[0]), nn.ReLU(),
            nn.Linear(PAPER_FC[0], PAPER_FC[1]), nn.ReLU(),
            nn.Linear(PAPER_FC[1], num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)                   # (B, C, S/2^n, S/2^n)
        return self.classifier(x.flatten(1))   # (B, num_classes)


class VGGS(nn.Module):
    """VGG-CNN-S (Chatfield et al. 2014, Table 1, column CNN-S).

    conv1 7x7/2 96 + LRN + 3x3/3 pool; conv2 5x5/1 pad 1 256 + LRN + 2x2/2 pool;
    conv3-5 3x3 pad 1 512; 3x3/3 pool; fc 4096 + dropout; fc 4096 + dropout; fc classes.
    Pools use ``ceil_mode=True`` as the original Caffe model does (that is what gives its 6x6
    map before fc6 at 224 px); it also keeps a 2x2 map before fc6 at 64 px, where floor mode
    would leave 1x1. LRN uses Caffe's settings (size 5, alpha 5e-4, beta 0.75, k 2). Deviation:
    the original expects 224 px only; here the fc6 input size follows from S.
    """

    def __init__(self, num_classes: int, image_size: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 7, stride=2), nn.ReLU(),
            nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0),
            nn.MaxPool2d(3, stride=3, ceil_mode=True),
            nn.Conv2d(96, 256, 5, stride=1, padding=1), nn.ReLU(),
            nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0),
            nn.MaxPool2d(2, stride=2, ceil_mode=True),
            nn.Conv2d(256, 512, 3, padding=1), nn.ReLU(),
            nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(),
            nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(),   # features.13: Grad-CAM map
            nn.MaxPool2d(3, stride=3, ceil_mode=True),
        )
        self.gradcam_target = "features.13"
        side = _feature_side(self.features, image_size)
        self.classifier = nn.Sequential(
            nn.Linear(512 * side * side, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)                   # (B, 512, s, s); s = 6 at 224 px, 2 at 64 px
        return self.classifier(x.flatten(1))   # (B, num_classes)


def _feature_side(features: nn.Module, image_size: int) -> int:
    """Spatial side of ``features``' output for a (1, 3, S, S) input (a shape-only pass)."""
    with torch.no_grad():
        out = features(torch.zeros(1, 3, image_size, image_size, device="meta"))
    return out.shape[-1]


def _fit_classifier(model: nn.Module, fc1_init: str, image_size: int) -> None:
    """Size torchvision's avgpool + fc1 to the feature map where the pool would only copy values.

    torchvision's pool output is P x P (vgg 7, alexnet 6). For a map of side s < P the pool
    becomes s x s (an identity) and fc1 takes C * s * s inputs; fc1 is initialised as
    torchvision does for that model (``fc1_init`` "normal": N(0, 0.01), bias 0, as for vgg;
    "default": PyTorch's, as for alexnet).
    """
    pool = model.avgpool.output_size
    pool = pool if isinstance(pool, int) else pool[0]
    side = _feature_side(model.features, image_size)
    if side >= pool:
        return
    i, old = next((i, m) for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear))
    fc1 = nn.Linear(old.in_features // (pool * pool) * side * side, old.out_features)
    if fc1_init == "normal":
        nn.init.normal_(fc1.weight, 0, 0.01)
        nn.init.constant_(fc1.bias, 0)
    model.avgpool = nn.AdaptiveAvgPool2d(side)
    model.classifier[i] = fc1


@register("vgg11", "VGG11", "features.19")          # ReLU after conv5_2 (features.20: last max pool)
def _vgg11(num_classes: int, image_size: int) -> nn.Module:
    return _torchvision("vgg11", num_classes, image_size, fc1_init="normal")


@register("resnet18", "ResNet18", "layer4", resnet_stages, head="fc")   # layer4: the last BasicBlock, ending in its ReLU
def _resnet18(num_classes: int, image_size: int) -> nn.Module:
    return _torchvision("resnet18", num_classes, image_size)


@register("simple", "Simple")     # TableNet declares its layer: the ReLU after the last conv
def _simple(num_classes: int, image_size: int) -> nn.Module:
    return TableNet(SIMPLE_CONVS, num_classes, image_size)


@register("simpler", "Simpler")
def _simpler(num_classes: int, image_size: int) -> nn.Module:
    return TableNet(SIMPLER_CONVS, num_classes, image_size)


@register("alexnet", "AlexNet", "features.11")       # ReLU after conv5 (features.12: last max pool)
def _alexnet(num_classes: int, image_size: int) -> nn.Module:
    return _torchvision("alexnet", num_classes, image_size, fc1_init="default")


@register("vgg_s", "VGG-S")      # VGGS declares its layer: features.13
def _vgg_s(num_classes: int, image_size: int) -> nn.Module:
    return VGGS(num_classes, image_size)


ARCHS = tuple(REGISTRY)


def build(arch: str, num_classes: int, image_size: int) -> nn.Module:
    """A fresh, randomly initialised ``arch`` for ``num_classes`` cities and S x S inputs, which
    knows its architecture (``model.arch``) and its Grad-CAM layer (``model.gradcam_target``).

    Seed torch before calling: the initial weights come from torch's global generator.
    """
    if arch not in REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(REGISTRY)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    spec = REGISTRY[arch]
    model = spec.builder(num_classes, image_size)
    model.arch = arch
    if spec.gradcam_layer is not None:
        model.gradcam_target = spec.gradcam_layer
    return model


def _torchvision(name: str, num_classes: int, image_size: int, fc1_init: str | None = None) -> nn.Module:
    """torchvision's ``name`` as torchvision builds it (its ReLUs are in-place; the Grad-CAM stage
    deals with that when it hooks them). Its adaptive average pool before the classifier makes it
    accept any S >= 64; below its design size the pool and fc1 are fitted to the map
    (``fc1_init``: how torchvision initialises that model's fc1, see ``_fit_classifier``)."""
    from torchvision import models as tvm     # here: importing it costs a second or more

    model = getattr(tvm, name)(weights=None, num_classes=num_classes)
    if fc1_init is not None:
        _fit_classifier(model, fc1_init, image_size)
    return model


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The module whose output is the last conv feature map after its ReLU, (B, C, h, w)."""
    target = getattr(model, "gradcam_target", None)
    if not isinstance(target, str):
        raise ValueError(f"{type(model).__name__} was not made by citylib.models.build: "
                         "it declares no Grad-CAM layer")
    return model.get_submodule(target)


def sweep_layers(model: nn.Module, n: int = 3) -> tuple[str, ...]:
    """Names of the layers an explanation is taken at in the layer sweep, finest first and the
    paper's Grad-CAM layer last: the architecture's declared sweep (ResNet: layer2-4; the others:
    the ReLUs that end a conv block, just before its max pool)."""
    gradcam_layer(model)
    return REGISTRY[model.arch].sweep(model, n)
