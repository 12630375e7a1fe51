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

from imagenet_resnet.checkpoint import load_checkpoint
from imagenet_resnet.config import Config, config_from_dict
from imagenet_resnet.data.datasets import class_names, normalization
from imagenet_resnet.data.loader import Normalizer
from imagenet_resnet.data.transforms import val_transform
from imagenet_resnet.errors import UserError
from imagenet_resnet.models import library_constructor
from imagenet_resnet.network import build_network, load_weights


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


def load_trained(path: Path, weights: str = "model") -> Trained:
    """The network of a checkpoint written by training, with its model or EMA weights."""
    saved = load_checkpoint(path)
    cfg = config_from_dict(saved.config, str(path))
    num_classes = saved.num_classes
    net = build_network(cfg, num_classes, torch.device("cpu"))
    load_weights(net, saved.weights(weights, path), path, cfg.model.name, num_classes)
    names = saved.class_names
    if len(names) != num_classes:  # a checkpoint from before names were saved: ask the data, if still there
        try:
            names = class_names(cfg)
        except (OSError, UserError):
            names = []
    if len(names) != num_classes:
        names = [str(label) for label in range(num_classes)]
    return Trained(net.eval(), cfg, names, weights, val_transform(cfg), *normalization(cfg.data.dataset))
