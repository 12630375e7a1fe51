"""The network a config describes, on its device, in its precision; and weights loaded into it.

Training, evaluation, predict and export all build the network here, so a checkpoint's config
always rebuilds the network that wrote it.

    net = build_network(cfg, num_classes, torch.device("cuda", 0), distributed=True)
    with autocast(device, amp_dtype(cfg, device)):
        logits = net(images)
    load_weights(net, checkpoint.weights("ema", path), path, cfg.model.name, num_classes)
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from imagenet_resnet.checkpoint import Checkpoint, unwrap
from imagenet_resnet.config import Config, RunConfig
from imagenet_resnet.data.datasets import input_channels
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.errors import UserError
from imagenet_resnet.models import build_model


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of run.precision (auto: bf16 on CUDA, fp32 on the CPU); None for fp32."""
    precision = cfg.run.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def build_network(cfg: Config, num_classes: int, device: torch.device, distributed: bool = False) -> nn.Module:
    """The model on `device`, in channels_last on CUDA, SyncBN under DDP if asked; not yet wrapped."""
    net = build_model(cfg.model.name, num_classes, cfg.model.zero_init_residual,
                      input_channels(cfg.data.dataset), drop_path=cfg.model.drop_path,
                      blurpool=cfg.model.blurpool)
    if cfg.model.sync_bn and distributed:
        if device.type != "cuda":
            raise UserError("config key model.sync_bn=true: PyTorch's SyncBatchNorm runs on CUDA only")
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    channels_last = cfg.run.channels_last and device.type == "cuda"
    return net.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def load_weights(net: nn.Module, weights: dict[str, torch.Tensor], path: Path, model: str, num_classes: int) -> None:
    """Load a checkpoint's weights strictly; UserError naming the file if they do not fit."""
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"{path}: its weights do not fit {model} with {num_classes} classes "
                        f"({str(err).splitlines()[0]})") from err


def wrap_model(net: nn.Module, dist: DistInfo, run: RunConfig) -> tuple[nn.Module, nn.Module]:
    """(the module that trains: DDP and torch.compile around `net`; the module that evaluates).

    torch.compile goes around DDP, as PyTorch documents: DDPOptimizer then splits the graph at
    DDP's bucket boundaries, so each bucket's all-reduce overlaps the rest of the backward (a
    compiled module inside DDP fires DDP's hooks only after its whole backward). Evaluation runs
    the bare module (ranks hold different numbers of val batches), compiled on its own.
    dynamic=False: each shape gets a static graph, compiled once (each train size of a resize
    ramp; evaluation's batch, whose last one `evaluate` pads to it), instead of Dynamo switching
    to a graph dynamic in size after the second shape.
    """
    wrapped = net
    if dist.is_distributed:
        # broadcast_buffers=False: no broadcast of rank 0's BatchNorm statistics at every forward
        # (timm's --no-ddp-bb); each rank keeps its own, averaged before evaluation and saving
        # (timm's distribute_bn "reduce") and saved per rank mid-epoch. gradient_as_bucket_view:
        # gradients live in DDP's all-reduce buckets, no copy in and out (PyTorch's DDP docs).
        wrapped = DistributedDataParallel(net, device_ids=[dist.device] if dist.device.type == "cuda" else None,
                                          broadcast_buffers=False, gradient_as_bucket_view=True)
    if not run.compile:
        return wrapped, net
    return (torch.compile(wrapped, mode=run.compile_mode, dynamic=False),
            torch.compile(net, mode=run.compile_mode, dynamic=False))


def build_ema(net: nn.Module, decay: float, saved: Checkpoint | None, dist: DistInfo) -> ModelEmaV3 | None:
    """timm's ModelEmaV3 of the weights (None when decay is 0), continued from the checkpoint's if it
    has one (else started from the current weights: EMA switched on when resuming begins there)."""
    if not decay:
        return None
    ema = ModelEmaV3(unwrap(net), decay=decay)
    if saved is not None and saved.model_ema is not None:
        ema.module.load_state_dict(saved.model_ema)
        restore_own_buffers(ema.module, saved.ema_buffers, saved, dist)
    return ema


def restore_own_buffers(module: nn.Module, per_rank: list[dict[str, torch.Tensor]] | None, saved: Checkpoint,
                        dist: DistInfo) -> None:
    """This rank's own BatchNorm statistics from a checkpoint of the same world size, as if never
    stopped (each rank's follow its own batches: DDP does not broadcast them). Call it after DDP
    has given every rank rank 0's."""
    if per_rank and saved.world_size == dist.world_size:
        module.load_state_dict(per_rank[dist.rank], strict=False)
