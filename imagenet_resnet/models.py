"""Model registry: a name in a config is all it takes to get a network.

ImageNet networks come from torchvision (ResNet-18/50, the reference implementations behind
the published 69.76 / 76.13 top-1) and timm (SE-ResNets, ResNeXts). The CIFAR ResNets of He et
al. 2016 (Sec. 4.2) are written here, since no library ships them with option-A shortcuts.
Every model names its parts alike: stem `conv1`/`bn1`, stages `layer1`..`layerN`, head `fc`
(fine-tuning freezes by these).

    model = build_model("cifar_resnet56", num_classes=10)
    model = build_model("seresnet50", num_classes=1000, zero_init_residual=True)
    model = build_model("cifar_resnet20", num_classes=10, in_chans=1)   # MNIST
    list_models()  # ['cifar_resnet110', 'cifar_resnet18', ...]
"""

from __future__ import annotations

from typing import Callable

import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import SEModule
from torch import nn

from imagenet_resnet.errors import UserError

ModelFn = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFn] = {}


def register(name: str) -> Callable[[ModelFn], ModelFn]:
    def add(fn: ModelFn) -> ModelFn:
        _REGISTRY[name] = fn
        return fn

    return add


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int, zero_init_residual: bool = True, in_chans: int = 3,
                drop_path: float = 0.0, blurpool: bool = False) -> nn.Module:
    """A freshly initialised network; zero_init_residual zeroes each block's last BN gamma.
    drop_path (stochastic depth) and blurpool apply to the ImageNet models (TIMM_EXTRAS_MODELS)."""
    if name not in _REGISTRY:
        raise UserError(f"config key model.name={name!r}: unknown model; known: {', '.join(list_models())}")
    if (drop_path or blurpool) and name not in TIMM_EXTRAS_MODELS:
        raise UserError(
            f"model.name={name}: no stochastic depth or BlurPool; models with them: {', '.join(TIMM_EXTRAS_MODELS)}"
        )
    extras = {"drop_path": drop_path} if drop_path else {}
    model = _REGISTRY[name](num_classes=num_classes, zero_init_residual=zero_init_residual, in_chans=in_chans, **extras)
    return apply_blurpool(model) if blurpool else model


class BlurPoolConv2d(nn.Module):
    """ffcv-imagenet's anti-aliasing (train_imagenet.py): a fixed depthwise 3x3 binomial blur
    [1,2,1]x[1,2,1]/16 (zero padding) at stride 1, then the wrapped convolution at its own stride.
    The wrapper shows in the state-dict keys (`conv.weight`, `blur_filter`), so these weights are
    never taken for a plain ResNet's."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        binomial = torch.tensor([1.0, 2.0, 1.0])
        kernel = torch.outer(binomial, binomial) / 16
        self.register_buffer("blur_filter", kernel.expand(conv.in_channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.conv2d(x, self.blur_filter, padding=1, groups=self.conv.in_channels))


def apply_blurpool(model: nn.Module) -> nn.Module:
    """Wrap every convolution with stride > 1 and at least 16 input channels, as ffcv does: in a
    ResNet each stage's first 3x3 (or 1x1 in torchvision's ResNet-50 v1.5: the 3x3) and its
    downsample; the stem (3 input channels) and its max-pool stay as they are."""
    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(model, name, BlurPoolConv2d(child))
        else:
            apply_blurpool(child)
    return model


def stages(model: nn.Module) -> list[nn.Module]:
    """The residual stages, input side first."""
    return [getattr(model, f"layer{i}") for i in range(1, 8) if hasattr(model, f"layer{i}")]


# --- CIFAR ResNets (He et al. 2016, Sec. 4.2) -------------------------------------------------


class CifarBasicBlock(nn.Module):
    """3x3-3x3 block; option A shortcut: stride-2 subsampling and zero-padded channels.

    Args:
        in_ch: input channels.
        out_ch: output channels (2 x in_ch where the stage halves the resolution).
        stride: 2 at the first block of stages 2 and 3.
        se: add squeeze-excitation (reduction 16) on the residual branch (Hu et al. 2018).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, se: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        # rd_divisor=1 keeps the paper's exact reduction (16 channels -> 1) instead of timm's rounding to 8.
        self.se = SEModule(out_ch, rd_ratio=1 / 16, rd_divisor=1) if se else nn.Identity()
        self.stride = stride
        self.pad_ch = out_ch - in_ch

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_ch:
            x = F.pad(x, (0, 0, 0, 0, self.pad_ch // 2, self.pad_ch - self.pad_ch // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))  # BN before the addition, ReLU after
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet: 3x3 conv, three stages of n blocks (16/32/64), pool, fc.

    Args:
        depth: 20, 32, 44, 56, 110, ... (6n+2).
        num_classes: classifier outputs.
        se: squeeze-excitation in every block.
        in_chans: image channels (1 for MNIST).
    """

    def __init__(self, depth: int, num_classes: int, se: bool = False, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(*(CifarBasicBlock(16, 16, 1, se) for _ in range(n)))
        self.layer2 = nn.Sequential(
            CifarBasicBlock(16, 32, 2, se), *(CifarBasicBlock(32, 32, 1, se) for _ in range(n - 1))
        )
        self.layer3 = nn.Sequential(
            CifarBasicBlock(32, 64, 2, se), *(CifarBasicBlock(64, 64, 1, se) for _ in range(n - 1))
        )
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # He et al. 2015

    def zero_init_residual(self) -> None:
        for block in (*self.layer1, *self.layer2, *self.layer3):
            nn.init.zeros_(block.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _cifar(depth: int, se: bool) -> ModelFn:
    def make(num_classes: int, zero_init_residual: bool, in_chans: int) -> nn.Module:
        model = CifarResNet(depth, num_classes, se=se, in_chans=in_chans)
        if zero_init_residual:
            model.zero_init_residual()
        return model

    return make


for _depth in (20, 32, 44, 56, 110):
    register(f"cifar_resnet{_depth}")(_cifar(_depth, se=False))
    register(f"cifar_seresnet{_depth}")(_cifar(_depth, se=True))


# --- ImageNet ResNets ------------------------------------------------------------------------


def _torchvision(arch: str, small_input: bool = False) -> ModelFn:
    """torchvision's ResNets; small_input: 3x3 stride-1 stem and no max-pool, for 32x32 images.
    With stochastic depth, timm's ResNet of the same name (the same layers and keys)."""

    def make(num_classes: int, zero_init_residual: bool, in_chans: int, **extras) -> nn.Module:
        if extras:
            return _timm(arch)(num_classes, zero_init_residual, in_chans, **extras)
        model = getattr(torchvision.models, arch)(num_classes=num_classes, zero_init_residual=zero_init_residual)
        if small_input or in_chans != 3:
            kernel, stride = (3, 1) if small_input else (7, 2)
            model.conv1 = nn.Conv2d(in_chans, 64, kernel, stride, kernel // 2, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        if small_input:
            model.maxpool = nn.Identity()
        return model

    return make


def _timm(arch: str) -> ModelFn:
    def make(num_classes: int, zero_init_residual: bool, in_chans: int, drop_path: float = 0.0) -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, zero_init_last=zero_init_residual,
                                 in_chans=in_chans, drop_path_rate=drop_path)

    return make


IMAGENET_TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101")
IMAGENET_TIMM = ("seresnet18", "seresnet34", "seresnet50", "resnext50_32x4d", "seresnext50_32x4d")
TIMM_EXTRAS_MODELS = IMAGENET_TORCHVISION + IMAGENET_TIMM  # those that take drop_path and blurpool
for _arch in IMAGENET_TORCHVISION:
    register(_arch)(_torchvision(_arch))
# The common CIFAR adaptation of the ImageNet ResNets (e.g. kuangliu/pytorch-cifar).
for _depth in (18, 34, 50):
    register(f"cifar_resnet{_depth}")(_torchvision(f"resnet{_depth}", small_input=True))
for _arch in IMAGENET_TIMM:
    register(_arch)(_timm(_arch))


def library_constructor(name: str, num_classes: int, in_chans: int = 3, drop_path: float = 0.0,
                        blurpool: bool = False) -> str:
    """The call that builds the same network, whose load_state_dict takes our weights strictly and
    computes the same logits (export writes it into its metadata): torchvision's or timm's where
    one has it; ffcv's BlurPool has no library version, so a BlurPool network names our builder."""
    options = f"num_classes={num_classes}" + (f", in_chans={in_chans}" if in_chans != 3 else "")
    if name not in TIMM_EXTRAS_MODELS or blurpool:
        extras = (f", drop_path={drop_path}" if drop_path else "") + (", blurpool=True" if blurpool else "")
        return f"imagenet_resnet.models.build_model({name!r}, {options}{extras})"
    if name in IMAGENET_TORCHVISION and in_chans == 3 and not drop_path:
        return f"torchvision.models.{name}({options})"
    return f"timm.create_model({name!r}, {options}{f', drop_path_rate={drop_path}' if drop_path else ''})"
