"""Start from trained weights: this project's checkpoints, torchvision/timm state_dict files, or
published weights by name (`torchvision:resnet50.IMAGENET1K_V2`, `timm:seresnet50.ra2_in1k`: the
SOURCE names of imagenet_resnet.pretrained, fetched into torch hub's or Hugging Face's cache).

The classifier `fc` is replaced (kept freshly initialised) when the class count differs; every
other tensor must match by name and shape, or the error names the ones that do not. `freeze`
chooses what trains: `none` (everything), `backbone` (only the head), `up_to_stage:K` (the stem
and stages 1..K stay fixed; BatchNorm statistics of frozen parts still adapt).

    pretrained = load_pretrained(model, "resnet50.pth")     # names of the tensors loaded
    pretrained = load_pretrained(model, "torchvision:resnet50.IMAGENET1K_V2")
    apply_freeze(model, "up_to_stage:3")                    # ResNet-50: train layer4 and fc
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from imagenet_resnet.checkpoint import safe_load
from imagenet_resnet.errors import UserError
from imagenet_resnet.models import stages

HEAD = "fc."


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .pt/.pth file (our checkpoint, a plain or wrapped state_dict) or .safetensors.

    .pt files load with weights_only=True, as torchvision and timm load theirs: a downloaded file
    whose pickle would run code is refused.
    """
    from imagenet_resnet.pretrained import is_source, load_published

    if is_source(str(path)):
        return load_published(str(path)).net.state_dict()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config key model.init_from={path}: file not found (nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # unreadable in any of its ways: name the file
            raise UserError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    else:
        state = safe_load(path, "weights file")
    for key in ("model", "state_dict"):  # our checkpoints; timm/lightning-style wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: holds no state_dict of tensors")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def load_pretrained(model: nn.Module, path: str | Path) -> set[str]:
    """Load everything but a head of another class count; returns the names of loaded tensors."""
    state = read_state_dict(path)
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
