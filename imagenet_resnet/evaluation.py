"""Exact evaluation: every val image counted once over all ranks, top-1/top-5 from the summed counts.

    stats = evaluate(net, val_loader, torch.bfloat16, device)     # {"val_top1": 76.1, ...}
    stats |= evaluate(ema_net, val_loader, torch.bfloat16, device, suffix="_ema")
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from imagenet_resnet.distributed import all_reduce_sum
from imagenet_resnet.metrics import topk_correct
from imagenet_resnet.network import autocast


@torch.no_grad()
def evaluate(net: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype | None,
             device: torch.device, flip_tta: bool = False, suffix: str = "", pad_to: int = 0) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over every val image once, summed over ranks; with
    flip_tta the logits are the mean of the image's and its mirror's. Keys end with `suffix`.

    `net` must be the bare module, not the DDP wrapper: ranks may hold different numbers of
    batches, and DDP's forward would wait for a collective on the rank that has finished.
    pad_to: a shorter (last) batch is padded to this many images, their logits dropped, so that a
    compiled net sees one shape and compiles once (in eval mode each image's logits are its own).
    """
    net.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, images
    for images, labels in loader:
        if labels.numel() == 0:  # DALI's PARTIAL policy can yield an empty last batch
            continue
        real = labels.numel()
        if real < pad_to:
            images = padded(images, pad_to)
        with autocast(device, dtype):
            logits = net(images).float()
            if flip_tta:
                logits = (logits + net(images.flip(3)).float()) / 2
            logits = logits[:real]
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        sums[0] += loss
        sums[1:3] += topk_correct(logits, labels)
        sums[3] += labels.numel()
    loss_sum, top1, top5, images = all_reduce_sum(sums).tolist()
    count = max(images, 1)
    return {f"val_loss{suffix}": loss_sum / count, f"val_top1{suffix}": 100 * top1 / count,
            f"val_top5{suffix}": 100 * top5 / count, f"val_images{suffix}": int(images)}


def padded(images: torch.Tensor, size: int) -> torch.Tensor:
    """`images` followed by zero images up to `size`, in the same memory format (a compiled
    graph's guards check strides too)."""
    out = images.new_zeros((size, *images.shape[1:]))
    if images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    out[: len(images)] = images
    return out
