"""Mixup and CutMix on the device batch (timm's Mixup), label smoothing folded into the soft
targets they make. Its random draws come from NumPy's generator, which the trainer seeds per
step: a resumed run mixes the same pairs with the same weights.

    mix = build_mixing(cfg, num_classes)      # None when data.mixup_alpha = data.cutmix_alpha = 0
    images, targets = mix(images, labels)     # targets: (batch, classes) soft labels
"""

from __future__ import annotations

from typing import Callable

import torch

from imagenet_resnet.config import Config

Mixing = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_mixing(cfg: Config, num_classes: int) -> Mixing | None:
    """Mixup (Zhang et al. 2018) and/or CutMix (Yun et al. 2019): with both, each batch gets one of
    them, half the time each, as in timm's training script and the RSB recipes."""
    if not (cfg.data.mixup_alpha or cfg.data.cutmix_alpha):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.data.mixup_alpha, cutmix_alpha=cfg.data.cutmix_alpha,
                 label_smoothing=cfg.optim.label_smoothing, num_classes=num_classes)
