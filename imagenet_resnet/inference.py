"""A trained model ready to use outside training: network, config, class names, preprocessing.

`predict` and `export` build on this: the network is rebuilt from the config saved in the
checkpoint, the weights (or their EMA) are loaded strictly, and images go through the very
resize, crop and normalisation that evaluation uses.

    trained = load_trained(Path("runs/x/best.pt"))          # weights="ema": the averaged weights
    batch = trained.preprocess([read_image(path, trained.channels) for path in paths])
    probabilities = trained.net(batch).softmax(dim=1)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from imagenet_resnet.checkpoint import load_file
from imagenet_resnet.config import Config, config_from_dict
from imagenet_resnet.data import Normalizer, class_names, input_channels, normalization, val_transform
from imagenet_resnet.errors import UserError
from imagenet_resnet.models import build_model, library_constructor

WEIGHTS = {"model": "model", "ema": "model_ema"}  # --weights choice -> checkpoint key


@dataclass
class Trained:
    net: nn.Module  # in eval mode, on the CPU until moved
    cfg: Config
    names: list[str]  # class names by label
    weights: str  # "model" or "ema"
    transform: Callable[[torch.Tensor], torch.Tensor]  # uint8 CHW image -> uint8 CHW crop
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def loads_into(self) -> str:
        """The library call that builds this network (for the exported weights)."""
        model = self.cfg.model
        return library_constructor(model.name, len(self.names), self.channels, model.drop_path, model.blurpool)

    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def size(self) -> int:
        """Side of the square input that evaluation feeds the network."""
        return self.transform(torch.zeros(self.channels, 64, 64, dtype=torch.uint8)).shape[-1]

    def preprocess(self, images: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
        """Decoded uint8 CHW images of any size -> one normalised float batch on `device` (from a
        generator, each image is cropped before the next is made)."""
        batch = torch.stack([self.transform(image) for image in images]).to(device)
        return Normalizer.create(self.mean, self.std, device, torch.float32, channels_last=False)(batch)


def weights_of(state: dict, weights: str, path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model or EMA state_dict; UserError if it has no EMA."""
    if WEIGHTS[weights] not in state:
        raise UserError(f"{path}: holds no EMA weights (trained with model.ema_decay=0); use --weights model")
    return state[WEIGHTS[weights]]


def load_trained(path: Path, weights: str = "model") -> Trained:
    """The network of a checkpoint written by training, with its model or EMA weights."""
    state = load_file(path)
    cfg = config_from_dict(state["config"], str(path))
    num_classes = state["num_classes"]
    net = build_model(cfg.model.name, num_classes, in_chans=input_channels(cfg.data.dataset),
                      drop_path=cfg.model.drop_path, blurpool=cfg.model.blurpool)
    try:
        net.load_state_dict(weights_of(state, weights, path))
    except RuntimeError as err:
        raise UserError(f"{path}: its weights do not fit {cfg.model.name} with {num_classes} classes "
                        f"({str(err).splitlines()[0]})") from err
    names = state.get("class_names") or []
    if len(names) != num_classes:  # a checkpoint from before names were saved: ask the data, if still there
        try:
            names = class_names(cfg)
        except (OSError, UserError):
            names = []
    if len(names) != num_classes:
        names = [str(label) for label in range(num_classes)]
    return Trained(net.eval(), cfg, names, weights, val_transform(cfg), *normalization(cfg.data.dataset))
