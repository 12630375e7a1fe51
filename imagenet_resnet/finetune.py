"""Start from trained weights: this project's checkpoints, torchvision/timm state_dict files, or
published weights by name (`torchvision:resnet50.IMAGENET1K_V2`, `timm:seresnet50.ra2_in1k`: the
SOURCE names of imagenet_resnet.published, fetched into torch hub's or Hugging Face's cache).

The classifier `fc` is replaced (kept freshly initialised) when the class count differs; every
other tensor must match by name and shape, or the error names the ones that do not. `freeze`
chooses what trains: `none` (everything), `backbone` (only the head), `up_to_stage:K` (the stem
and stages 1..K stay fixed; BatchNorm statistics of frozen parts still adapt).

    loaded = load_init_from(model, "resnet50.pth")     # names of the tensors loaded
    loaded = load_init_from(model, "torchvision:resnet50.IMAGENET1K_V2")
    apply_freeze(model, "up_to_stage:3")                    # ResNet-50: train layer4 and fc
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from imagenet_resnet.checkpoint import Checkpoint, read_weights
from imagenet_resnet.errors import UserError
from imagenet_resnet.models import stages
from imagenet_resnet.published import is_source, load_published

HEAD = "fc."


def init_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """The tensors model.init_from names: published weights (a SOURCE) or a weights file."""
    if is_source(str(source)):
        return load_published(str(source)).net.state_dict()
    if not Path(source).is_file():
        raise UserError(f"config key model.init_from={source}: file not found (nothing is downloaded)")
    return read_weights(Path(source))


def load_init_from(model: nn.Module, path: str | Path) -> set[str]:
    """Load everything but a head of another class count; returns the names of loaded tensors."""
    state = init_weights(path)
    own = model.state_dict()
    new_head = {k for k in own if k.startswith(HEAD) and k in state and state[k].shape != own[k].shape}
    state = {k: v for k, v in state.items() if k not in new_head}
    missing = sorted(own.keys() - state.keys() - new_head)
    unexpected = sorted(state.keys() - own.keys())
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(state.keys() & own.keys())
                   if state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        parts = [f"{label} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong_shape))
                 if items]
        raise UserError(f"{path}: does not fit this model; " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return set(state)


def load_init_tensors(model: nn.Module, init_from: str, saved: Checkpoint | None) -> set[str]:
    """The tensors model.init_from loads: at a fresh start, loading them; on resume, as the
    checkpoint recorded them (the run's own weights replace them)."""
    if saved is not None and saved.init_tensors is not None:
        return set(saved.init_tensors)
    return load_init_from(model, init_from) if init_from else set()


def apply_freeze(model: nn.Module, spec: str) -> None:
    if spec == "none":
        return
    all_stages = stages(model)
    frozen = [model.conv1, model.bn1] + all_stages[: len(all_stages) if spec == "backbone" else int(spec.split(":")[1])]
    for module in frozen:
        for param in module.parameters():
            param.requires_grad_(False)
    if spec == "backbone":  # anything else outside the head (timm extras) too
        for name, param in model.named_parameters():
            if not name.startswith(HEAD):
                param.requires_grad_(False)
