"""Typed run configuration: one dataclass per section, every default defined once, here.

A recipe is a YAML file whose sections mirror these classes; `key=value` overrides use the
dotted names. Unknown keys, wrong types and bad choices are refused with the key's name.

    cfg = load_config("configs/cifar10_resnet20.yaml", ["schedule.epochs=10", "run.seed=1"])
    cfg.data.batch_size        # 128
    save_config(cfg, "runs/x/config.yaml")
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from imagenet_resnet.errors import UserError


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"config key {key}={value!r}: expected one of {', '.join(allowed)}")


@dataclass
class ModelConfig:
    name: str = "cifar_resnet20"  # a name from imagenet_resnet.models.list_models()
    zero_init_residual: bool = True  # last BN gamma of each block starts at 0 (Goyal et al. 2017)
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm under DDP
    init_from: str = ""  # weights to start from: a checkpoint of this project or a torchvision/timm state_dict file
    freeze: str = "none"  # none | backbone (train the head only) | up_to_stage:K (stem and stages 1..K fixed)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"none|backbone|up_to_stage:[1-9]", self.freeze):
            raise UserError(f"config key model.freeze={self.freeze!r}: expected none, backbone or up_to_stage:K")


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # cifar10 | cifar100 | mnist | fashion_mnist | imagenet | folder
    # cifar: holds cifar-10-batches-py/; mnist: the idx files; imagenet: the prepare-imagenet DEST;
    # folder: any train/<class>/, val/<class>/ image folders
    root: str = "data"
    batch_size: int = 128  # per process; the global batch is this x world size
    image_size: int = 32  # train crop and val centre crop, in pixels
    loader: str = "auto"  # auto | device (CIFAR, whole set on the device) | torchvision | dali
    workers: int = 8  # DataLoader worker processes (torchvision) or DALI threads, per process
    crop_padding: int = 4  # CIFAR/MNIST augmentation: zero-pad then random crop (He et al. 2016)

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, ("cifar10", "cifar100", "mnist", "fashion_mnist", "imagenet", "folder"))
        _choice("data.loader", self.loader, ("auto", "device", "torchvision", "dali"))
        if self.batch_size < 1:
            raise UserError(f"config key data.batch_size={self.batch_size}: must be >= 1")


@dataclass
class OptimConfig:
    base_lr: float = 0.2  # per 256 images: lr = base_lr * global_batch / 256; 0.2 is He et al.'s 0.1 at batch 128
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4  # never applied to norm layers or biases
    label_smoothing: float = 0.0
    accumulation_steps: int = 1  # micro-batches per optimizer step; global batch includes it
    pretrained_lr_scale: float = 1.0  # lr multiplier for weights loaded by model.init_from (fine-tuning)

    def __post_init__(self) -> None:
        if self.accumulation_steps < 1:
            raise UserError(f"config key optim.accumulation_steps={self.accumulation_steps}: must be >= 1")


@dataclass
class ScheduleConfig:
    epochs: int = 164  # He et al.: 64k iterations at batch 128 on 50k images
    kind: str = "step"  # step | cosine
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of the run
    gamma: float = 0.1  # step decay factor at each milestone
    warmup_epochs: float = 0.0
    warmup_kind: str = "linear"  # linear ramp from start factor to 1, or constant at start factor
    warmup_start_factor: float = 0.0  # fraction of the peak lr at step 0

    def __post_init__(self) -> None:
        _choice("schedule.kind", self.kind, ("step", "cosine"))
        _choice("schedule.warmup_kind", self.warmup_kind, ("linear", "constant"))
        if any(not 0.0 < m < 1.0 for m in self.milestones):
            raise UserError(f"config key schedule.milestones={self.milestones}: fractions in (0, 1)")


@dataclass
class RunConfig:
    out_dir: str = "runs/default"  # config.yaml, metrics.jsonl, checkpoints; the run's identity
    seed: int = 0  # offset by rank in each process
    device: str = "auto"  # auto (cuda if present) | cuda | cpu
    precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp32
    channels_last: bool = True  # NHWC activations on cuda (tensor cores); ignored on cpu
    compile: bool = False  # torch.compile the model
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs; pays off for small CIFAR nets) | max-autotune
    resume: str = ""  # a checkpoint path; empty: continue from out_dir/last.pt if present
    checkpoint_every_steps: int = 0  # also save inside an epoch every N steps (0: epoch ends only)
    log_every_steps: int = 50  # step loss/lr to wandb and plain log lines
    # Resuming on a different number of processes: keep_global_batch changes gradient accumulation
    # so the global batch and schedule stay as they were; scale_lr keeps the per-process batch and
    # rescales lr by the linear rule.
    on_world_size_change: str = "keep_global_batch"

    def __post_init__(self) -> None:
        _choice("run.device", self.device, ("auto", "cuda", "cpu"))
        _choice("run.precision", self.precision, ("auto", "bf16", "fp32"))
        _choice("run.compile_mode", self.compile_mode, ("default", "reduce-overhead", "max-autotune"))
        _choice("run.on_world_size_change", self.on_world_size_change, ("keep_global_batch", "scale_lr"))


@dataclass
class WandbConfig:
    mode: str = "online"  # online (offline when no API key is set up) | offline | disabled
    project: str = "imagenet-resnet"
    entity: str = ""
    name: str = ""  # defaults to the out_dir's name

    def __post_init__(self) -> None:
        _choice("wandb.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    """First line of OmegaConf's message plus the dotted key it names."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), "")
    return f"config key {key}: {lines[0]}" if key else lines[0]


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML recipe, then `section.key=value` overrides, validated."""
    merged = [OmegaConf.structured(Config)]
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"{path}: config file not found")
        try:
            merged.append(OmegaConf.load(path))
        except Exception as err:  # yaml.YAMLError and friends: name the file
            raise UserError(f"{path}: not valid YAML: {err}") from err
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected section.key=value")
    try:
        merged.append(OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(OmegaConf.merge(*merged))
    except OmegaConfBaseException as err:
        where = f"{path}: " if path is not None else ""
        raise UserError(where + _omegaconf_message(err)) from err


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config saved with config_to_dict (e.g. inside a checkpoint)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), values))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
