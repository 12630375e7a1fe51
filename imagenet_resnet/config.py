"""Typed run configuration: one dataclass per section, every default defined once, here.

A recipe is a YAML file whose sections mirror these classes; `key=value` overrides use the
dotted names. Unknown keys, wrong types and bad choices are refused with the key's name.

    cfg = load_config("configs/cifar10_resnet20.yaml", ["schedule.epochs=10", "run.seed=1"])
    cfg.data.batch_size        # 128
    save_config(cfg, "runs/x/config.yaml")
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from timm.data.auto_augment import rand_augment_transform

from imagenet_resnet.errors import UserError
from imagenet_resnet.files import write_atomic
from imagenet_resnet.models import TIMM_EXTRAS_MODELS, list_models


def _require(key: str, value: Any, ok: bool, expected: str) -> None:
    """The one way a value is refused: `config key <key>=<value>: <what is expected>`."""
    if not ok:
        raise UserError(f"config key {key}={value!r}: {expected}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(key, value, value in allowed, f"expected one of {', '.join(allowed)}")


def _number(key: str, value: float, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> None:
    """A finite number in [low, high], either end open if asked."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if high == math.inf:
        expected = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    _require(key, value, math.isfinite(value) and above and below, f"expected {expected}")


def _not_a_folder(key: str, value: str) -> None:
    _require(key, value, not value or not Path(value).is_dir(), "is a folder; expected a file")


def _folder_or_absent(key: str, value: str) -> None:
    _require(key, value, bool(value), "must not be empty")
    _require(key, value, not Path(value).exists() or Path(value).is_dir(), "exists and is not a folder")


MAX_RAND_AUGMENT_OPS = 10  # timm's recipes use 2 or 3
MAX_RAND_AUGMENT_MAGNITUDE = 30  # timm's scale is 0 to 10; beyond 30 the ops' parameters are meaningless


def parse_rand_augment(config: str, hparams: dict):
    """timm's RandAugment object for data.auto_augment=`config`, or a UserError naming the key: the
    config is checked by building what the loaders will build."""
    if not (config == "rand" or config.startswith("rand-")):
        raise UserError(f"config key data.auto_augment={config!r}: expected timm's RandAugment string, "
                        "e.g. rand-m9-mstd0.5-inc1 (sections m, n, p, mstd, mmax, inc)")
    try:
        transform = rand_augment_transform(config, dict(hparams))
    except (AssertionError, ValueError, KeyError) as err:
        raise UserError(f"config key data.auto_augment={config!r}: timm does not read it "
                        f"({type(err).__name__}{': ' + str(err) if str(err) else ''})") from err
    first = transform.ops[0]
    _require("data.auto_augment", config, 1 <= transform.num_layers <= MAX_RAND_AUGMENT_OPS,
             f"n{transform.num_layers}: expected 1 to {MAX_RAND_AUGMENT_OPS} ops per image")
    for name, value in (("m", first.magnitude), ("mmax", first.magnitude_max or 10)):
        _require("data.auto_augment", config, 0 <= value <= MAX_RAND_AUGMENT_MAGNITUDE,
                 f"{name}{value:g}: expected 0 to {MAX_RAND_AUGMENT_MAGNITUDE} (timm's magnitudes are out of 10)")
    return transform


@dataclass
class ModelConfig:
    name: str = "cifar_resnet20"  # a name from imagenet_resnet.models.list_models()
    zero_init_residual: bool = True  # last BN gamma of each block starts at 0 (Goyal et al. 2017)
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm under DDP
    # weights to start from: a checkpoint of this project, a torchvision/timm state_dict file, or
    # published weights by name: torchvision:resnet50.IMAGENET1K_V2, timm:seresnet50.ra2_in1k
    init_from: str = ""
    freeze: str = "none"  # none | backbone (train the head only) | up_to_stage:K (stem and stages 1..K fixed)
    ema_decay: float = 0.0  # > 0: also keep an EMA of the weights (timm ModelEmaV3), evaluated as val_top1_ema
    drop_path: float = 0.0  # stochastic depth rate (timm's drop_path_rate); ImageNet models only
    blurpool: bool = False  # ffcv's BlurPool: a 3x3 binomial blur before each stride-2 conv with >= 16 input channels

    def __post_init__(self) -> None:
        _choice("model.name", self.name, tuple(list_models()))
        _number("model.ema_decay", self.ema_decay, 0, 1, high_open=True)
        _number("model.drop_path", self.drop_path, 0, 1, high_open=True)
        for key, used in (("model.drop_path", self.drop_path > 0), ("model.blurpool", self.blurpool)):
            _require(key, getattr(self, key.split(".")[1]), not used or self.name in TIMM_EXTRAS_MODELS,
                     f"model.name={self.name} does not support it; models that do: {', '.join(TIMM_EXTRAS_MODELS)}")
        _require("model.freeze", self.freeze, bool(re.fullmatch(r"none|backbone|up_to_stage:[1-9]", self.freeze)),
                 "expected none, backbone or up_to_stage:K")
        _not_a_folder("model.init_from", self.init_from)


DEVICE_DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist")  # small enough to live on the device


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # cifar10 | cifar100 | mnist | fashion_mnist | imagenet | folder
    # cifar: holds cifar-10-batches-py/; mnist: the idx files; imagenet: the prepare-imagenet DEST;
    # folder: any train/<class>/, val/<class>/ image folders
    root: str = "data"
    # CIFAR-10/100, MNIST, Fashion-MNIST missing from data.root: auto downloads them (torchvision's
    # URLs and checksums), never stops with a message instead. ImageNet is never downloaded.
    download: str = "auto"
    download_timeout_s: float = 60.0  # a download server silent this long (connecting or mid-file) is given up on
    batch_size: int = 128  # per process; the global batch is this x world size
    image_size: int = 32  # train crop and val centre crop, in pixels
    loader: str = "auto"  # auto | device (CIFAR, whole set on the device) | torchvision | dali
    # DataLoader worker processes (torchvision) or DALI threads, per process; auto: min(8, usable
    # cores / processes on this node), so a small machine is not over-subscribed
    workers: str = "auto"
    crop_padding: int = 4  # CIFAR/MNIST augmentation: zero-pad then random crop (He et al. 2016)
    # Progressive resizing (FFCV): the train size grows from start_image_size to image_size between
    # the epochs resize_ramp_epochs=[start, end], in multiples of 32 px; 0 = off.
    start_image_size: int = 0
    resize_ramp_epochs: list[int] = field(default_factory=lambda: [0, 0])
    val_image_size: int = 0  # evaluation size (FixRes: larger than training); 0 = image_size
    # val: resize the shorter side to floor(val_image_size / this) (timm's rule), then the centre crop
    val_crop_fraction: float = 0.875
    # true: take the centre square of val_crop_fraction x the shorter side first, then resize it to
    # val_image_size (ffcv's CenterCropRGBImageDecoder); false: resize, then crop (timm, torchvision)
    val_crop_first: bool = False
    val_flip_tta: bool = False  # evaluate each image and its mirror, average the logits
    mixup_alpha: float = 0.0  # Mixup on the device batch (timm Mixup); 0 = off
    cutmix_alpha: float = 0.0  # CutMix (with Mixup: one or the other per batch, half the time each); 0 = off
    # timm's RandAugment string, as timm's --aa takes it: e.g. rand-m7-mstd0.5-inc1 (RSB A1/A2):
    # magnitude 7 of 10, N(7, 0.5) per op, the "increasing" op set, 2 ops per image, each p=0.5.
    # timm's own transform in the torchvision loader, its DALI twin in the DALI loader. Empty: off.
    auto_augment: str = ""
    interpolation: str = "bilinear"  # bilinear | bicubic: evaluation's resize, and the train crop's unless set below
    # bilinear | bicubic | random (each image and each geometric RandAugment op picks bilinear or
    # bicubic, as timm's --train-interpolation default does) | "" = data.interpolation
    train_interpolation: str = ""
    crop_min_area: float = 0.08  # random-resized crop: smallest fraction of the image's area (MLPerf LARS: 0.05)
    # Repeated augmentation (RSB A1/A2, DeiT): each selected image appears this many times in an
    # epoch, the copies on consecutive ranks with their own augmentation; an epoch keeps the
    # dataset's length (timm's RepeatAugSampler). 0 or 1: off.
    repeated_augmentation: int = 0
    # With repeated augmentation, an epoch covers floor(images / this) x this images, split across
    # the ranks (timm's RepeatAugSampler selected_round, 256 by default); 0: images // world size.
    repeated_augmentation_round: int = 256

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, (*DEVICE_DATASETS, "imagenet", "folder"))
        _choice("data.loader", self.loader, ("auto", "device", "torchvision", "dali"))
        _require("data.root", self.root, bool(self.root), "must not be empty")
        _choice("data.download", self.download, ("auto", "never"))
        _number("data.download_timeout_s", self.download_timeout_s, 1, 3600)
        _number("data.batch_size", self.batch_size, 1)
        _require("data.workers", self.workers, self.workers == "auto" or (re.fullmatch(r"[0-9]{1,3}", self.workers)
                 is not None and int(self.workers) <= 256), "expected auto or a whole number of workers in [0, 256]")
        self._check_sizes()
        self._check_augmentation()
        self._check_for_dataset()

    def _check_sizes(self) -> None:
        _number("data.image_size", self.image_size, 16, 2048)
        _require("data.start_image_size", self.start_image_size,
                 self.start_image_size == 0 or 16 <= self.start_image_size <= self.image_size,
                 f"expected 0 (off) or a size in [16, data.image_size={self.image_size}]")
        ramp = self.resize_ramp_epochs
        _require("data.resize_ramp_epochs", ramp, len(ramp) == 2 and 0 <= ramp[0] <= ramp[1],
                 "expected [start, end] epochs with 0 <= start <= end")
        _require("data.val_image_size", self.val_image_size,
                 self.val_image_size == 0 or 16 <= self.val_image_size <= 2048,
                 "expected 0 (= data.image_size) or a size in [16, 2048]")
        _number("data.val_crop_fraction", self.val_crop_fraction, 0.1, 1)

    def _check_augmentation(self) -> None:
        _number("data.crop_padding", self.crop_padding, 0, 64)
        _number("data.mixup_alpha", self.mixup_alpha, 0)
        _number("data.cutmix_alpha", self.cutmix_alpha, 0)
        _require("data.batch_size", self.batch_size, self.batch_size % 2 == 0 or not (self.mixup_alpha or
                 self.cutmix_alpha), "Mixup/CutMix pair each image with another of the batch: expected an even number")
        if self.auto_augment:
            parse_rand_augment(self.auto_augment, {})
        _choice("data.interpolation", self.interpolation, ("bilinear", "bicubic"))
        _choice("data.train_interpolation", self.train_interpolation, ("", "bilinear", "bicubic", "random"))
        _number("data.crop_min_area", self.crop_min_area, 0.01, 1)
        _number("data.repeated_augmentation", self.repeated_augmentation, 0, 16)
        _number("data.repeated_augmentation_round", self.repeated_augmentation_round, 0, 65536)

    def _check_for_dataset(self) -> None:
        """Keys of image-folder datasets stay at their defaults for the device-resident ones."""
        small = self.dataset in DEVICE_DATASETS
        for key, default in (("image_size", 32), ("start_image_size", 0), ("val_image_size", 0),
                             ("val_crop_fraction", 0.875), ("val_crop_first", False), ("auto_augment", ""),
                             ("interpolation", "bilinear"), ("train_interpolation", ""), ("crop_min_area", 0.08),
                             ("repeated_augmentation", 0)):
            _require(f"data.{key}", getattr(self, key), not small or getattr(self, key) == default,
                     f"applies to data.dataset=imagenet or folder (the device loader of {self.dataset} "
                     f"keeps the images at their own size, and its own augmentation)")
        _require("data.loader", self.loader, self.loader in (("auto", "device") if small else
                                                             ("auto", "torchvision", "dali")),
                 f"data.dataset={self.dataset} uses "
                 + ("data.loader=device (or auto)" if small else "data.loader=torchvision or dali (or auto)"))


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars | lamb (timm.optim; norm layers and biases: no weight decay, no trust ratio)
    base_lr: float = 0.2  # per 256 images: lr = base_lr * global_batch / 256; 0.2 is He et al.'s 0.1 at batch 128
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4  # never applied to norm layers or biases
    label_smoothing: float = 0.0
    loss: str = "cross_entropy"  # cross_entropy | bce (timm BinaryCrossEntropy, as ResNet strikes back)
    bce_target_threshold: float = 0.0  # bce: targets above this become 1 (RSB: 0.2); 0 = soft targets kept
    lars_trust_coeff: float = 0.001  # lars: eta of the layer-wise trust ratio (MLPerf LARSETA)
    accumulation_steps: int = 1  # micro-batches per optimizer step; global batch includes it
    pretrained_lr_scale: float = 1.0  # lr multiplier for weights loaded by model.init_from (fine-tuning)

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("sgd", "lars", "lamb"))
        _number("optim.base_lr", self.base_lr, 0, low_open=True)
        _number("optim.momentum", self.momentum, 0, 1, high_open=True)
        _require("optim.nesterov", self.nesterov, not self.nesterov or self.momentum > 0,
                 "Nesterov momentum needs optim.momentum > 0")
        _number("optim.weight_decay", self.weight_decay, 0)
        _number("optim.label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        _choice("optim.loss", self.loss, ("cross_entropy", "bce"))
        _number("optim.bce_target_threshold", self.bce_target_threshold, 0, 1, high_open=True)
        _number("optim.lars_trust_coeff", self.lars_trust_coeff, 0, 1, low_open=True)
        _number("optim.accumulation_steps", self.accumulation_steps, 1)
        _number("optim.pretrained_lr_scale", self.pretrained_lr_scale, 0)


@dataclass
class ScheduleConfig:
    epochs: int = 164  # He et al.: 64k iterations at batch 128 on 50k images
    kind: str = (
        "step"  # step | cosine | linear (to zero at the end: FFCV) | poly ((1 - progress)^poly_power: MLPerf LARS)
    )
    poly_power: float = 2.0
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of the run
    gamma: float = 0.1  # step decay factor at each milestone
    warmup_epochs: float = 0.0
    warmup_kind: str = "linear"  # linear ramp from start factor to 1, or constant at start factor
    warmup_start_factor: float = 0.0  # fraction of the peak lr at step 0
    # Goyal et al.'s gradual warmup: start at optim.base_lr (the lr of a 256-image batch) instead of
    # warmup_start_factor x peak, and rise linearly to the peak.
    warmup_from_base_lr: bool = False
    end_lr_factor: float = 0.0  # cosine, linear, poly: decay to this fraction of the peak lr (MLPerf LARS: 1e-4 / 10.5)
    # true: the decay's progress counts from the end of warmup; false: from step 0, warmup
    # overlapping the decay's start (timm's schedulers, warmup_prefix=False: RSB)
    warmup_prefix: bool = True
    per_epoch: bool = False  # the lr changes at epoch starts only (timm's default t_in_epochs: RSB); false: each step

    def __post_init__(self) -> None:
        _number("schedule.epochs", self.epochs, 1)
        _choice("schedule.kind", self.kind, ("step", "cosine", "linear", "poly"))
        _number("schedule.poly_power", self.poly_power, 0, 10, low_open=True)
        _require("schedule.milestones", self.milestones,
                 all(0.0 < m < 1.0 for m in self.milestones) and self.milestones == sorted(set(self.milestones)),
                 "increasing fractions of the run, each in (0, 1)")
        _number("schedule.gamma", self.gamma, 0, 1, low_open=True)
        _number("schedule.warmup_epochs", self.warmup_epochs, 0)
        _require("schedule.warmup_epochs", self.warmup_epochs, self.warmup_epochs <= self.epochs,
                 f"warmup longer than the run (schedule.epochs={self.epochs})")
        _choice("schedule.warmup_kind", self.warmup_kind, ("linear", "constant"))
        _number("schedule.warmup_start_factor", self.warmup_start_factor, 0, 1)
        _require(
            "schedule.warmup_from_base_lr",
            self.warmup_from_base_lr,
            not (self.warmup_from_base_lr and self.warmup_start_factor),
            "set schedule.warmup_start_factor=0 with it",
        )
        _number("schedule.end_lr_factor", self.end_lr_factor, 0, 1, high_open=True)
        _require("schedule.end_lr_factor", self.end_lr_factor, not (self.end_lr_factor and self.kind == "step"),
                 "applies to schedule.kind cosine, linear or poly")


@dataclass
class RunConfig:
    out_dir: str = "runs/default"  # config.yaml, metrics.jsonl, checkpoints; the run's identity
    seed: int = 0  # offset by rank in each process
    device: str = "auto"  # auto (cuda if present) | cuda | cpu
    precision: str = (
        "auto"  # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp16 (with a gradient scaler: V100, T4, RTX 20) | fp32
    )
    loss_scale: float = 65536.0  # fp16: the gradient scaler's starting scale (halved at each overflow, then grown)
    channels_last: bool = True  # NHWC activations on cuda (tensor cores); ignored on cpu
    compile: bool = False  # torch.compile the model
    compile_mode: str = (
        "default"  # default | reduce-overhead (CUDA graphs; pays off for small CIFAR nets) | max-autotune
    )
    resume: str = ""  # a checkpoint path; empty: continue from out_dir/last.pt if present
    checkpoint_every_steps: int = 0  # also save inside an epoch every N steps (0: epoch ends only)
    log_every_steps: int = 50  # step loss/lr to wandb and plain log lines
    # Evaluate after every N-th epoch and after the last (MLPerf evaluates every 4); best.pt is
    # chosen among evaluated epochs, and each metrics.jsonl record says whether it was evaluated.
    eval_every_epochs: int = 1
    # Resuming on a different number of processes: keep_global_batch changes gradient accumulation
    # so the global batch and schedule stay as they were; scale_lr keeps the per-process batch and
    # rescales lr by the linear rule.
    on_world_size_change: str = "keep_global_batch"
    # One job per out_dir: a job that died frees the folder after this long without a heartbeat
    # (at once on its own host, where a dead PID is recognised).
    lease_timeout_s: float = 60.0
    # A collective that waits longer than this (a rank hung: a GPU off the bus, a stalled read, a
    # frozen process) ends the rank, and torchrun restarts the group from the newest checkpoint.
    # NCCL's usual default.
    collective_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _folder_or_absent("run.out_dir", self.out_dir)
        _number("run.seed", self.seed, 0, 2**31 - 1)
        _choice("run.device", self.device, ("auto", "cuda", "cpu"))
        _choice("run.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        _number("run.loss_scale", self.loss_scale, 1, 2.0**64)
        _choice("run.compile_mode", self.compile_mode, ("default", "reduce-overhead", "max-autotune"))
        _choice("run.on_world_size_change", self.on_world_size_change, ("keep_global_batch", "scale_lr"))
        _not_a_folder("run.resume", self.resume)
        _number("run.checkpoint_every_steps", self.checkpoint_every_steps, 0)
        _number("run.log_every_steps", self.log_every_steps, 1)
        _number("run.eval_every_epochs", self.eval_every_epochs, 1, 10_000)
        _number("run.lease_timeout_s", self.lease_timeout_s, 1, 3600)
        _number("run.collective_timeout_s", self.collective_timeout_s, 5, 86400)


@dataclass
class WandbConfig:
    mode: str = "online"  # online (offline when no API key is set up) | offline | disabled
    project: str = "imagenet-resnet"
    entity: str = ""
    name: str = ""  # defaults to the out_dir's name
    group: str = ""  # runs to compare together in wandb's UI (seeds, a sweep); empty: none
    tags: list[str] = field(default_factory=list)  # e.g. [baseline, rn50]
    notes: str = ""  # a line of description shown with the run
    init_timeout_s: float = 60.0  # online: give up on the server after this long and log offline instead

    def __post_init__(self) -> None:
        _choice("wandb.mode", self.mode, ("online", "offline", "disabled"))
        _require("wandb.project", self.project, bool(self.project) and not set(self.project) & set("/\\#?%:"),
                 "a non-empty name without / \\ # ? % : (wandb's rule)")
        _number("wandb.init_timeout_s", self.init_timeout_s, 0, 3600, low_open=True)
        _require("wandb.tags", self.tags, all(0 < len(tag) <= 64 for tag in self.tags),
                 "each tag 1 to 64 characters (wandb's limit)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        """Rules across sections (those within one section are checked by it)."""
        _require("model.sync_bn", self.model.sync_bn, not (self.model.sync_bn and self.run.device == "cpu"),
                 "PyTorch's SyncBatchNorm runs on CUDA only (run.device=cpu)")
        ramp = self.data.resize_ramp_epochs
        _require("data.resize_ramp_epochs", ramp, not self.data.start_image_size or ramp[1] <= self.schedule.epochs,
                 f"the ramp ends after the run (schedule.epochs={self.schedule.epochs})")


# Keys this version no longer reads, and what replaced them.
REPLACED = {
    "data.randaugment_n": "data.auto_augment, which takes timm's RandAugment string (e.g. rand-m9-mstd0.5-inc1)",
    "data.randaugment_m": "data.auto_augment, which takes timm's RandAugment string (e.g. rand-m9-mstd0.5-inc1)",
}


def _replaced_keys(tree: dict[str, Any], where: str, saved: bool = False) -> dict[str, Any]:
    """Refuse a key in REPLACED, naming its successor. A saved config may carry one at the value
    that meant "off" (RandAugment with 0 ops): that is dropped, since today's default is off too."""
    tree = {section: dict(keys) if isinstance(keys, dict) else keys for section, keys in tree.items()}
    for key, successor in REPLACED.items():
        section, name = key.split(".")
        keys = tree.get(section)
        if not isinstance(keys, dict) or name not in keys:
            continue
        if saved and not keys.get("randaugment_n"):
            keys.pop(name)
            continue
        raise UserError(f"{where}config key {key}: replaced by {successor}" + (
            "; this checkpoint trained with the old RandAugment: resume it with the version that wrote it"
            if saved else ""))
    return tree


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    """First line of OmegaConf's message plus the dotted key it names."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), "")
    return f"config key {key}: {lines[0]}" if key else lines[0]


def load_config(path: str | Path | None, overrides: list[str] = (), saved: dict[str, Any] | None = None,
                saved_in: str = "") -> Config:
    """Defaults, then a config `saved` in checkpoint `saved_in` (if given), then the YAML recipe,
    then `section.key=value` overrides, validated.

    A key or type error names where it came from: the checkpoint, the recipe file, or the override.
    """
    merged = OmegaConf.structured(Config)
    if saved is not None:
        where = f"{saved_in}: saved config: "
        merged = _merge(merged, OmegaConf.create(_replaced_keys(saved, where, saved=True)), where)
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"{path}: config file not found")
        try:
            recipe = OmegaConf.load(path)
        except Exception as err:  # yaml.YAMLError and friends: name the file
            raise UserError(f"{path}: not valid YAML: {err}") from err
        if isinstance(recipe, DictConfig):
            recipe = OmegaConf.create(_replaced_keys(OmegaConf.to_container(recipe), f"{path}: "))
        merged = _merge(merged, recipe, f"{path}: ")
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected section.key=value")
        try:
            override = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise UserError(f"override {item!r}: {_omegaconf_message(err)}") from err
        _replaced_keys(OmegaConf.to_container(override), f"override {item!r}: ")
        merged = _merge(merged, override, f"override {item!r}: ")
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise UserError(_omegaconf_message(err)) from err


def _merge(base: Any, extra: Any, where: str) -> Any:
    try:
        return OmegaConf.merge(base, extra)
    except OmegaConfBaseException as err:
        raise UserError(where + _omegaconf_message(err)) from err


def config_from_dict(saved: dict[str, Any], where: str) -> Config:
    """A config saved in a checkpoint, with today's defaults for keys added since."""
    merged = _merge(OmegaConf.structured(Config), OmegaConf.create(_replaced_keys(saved, f"{where}: ", saved=True)),
                    f"{where}: ")
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise UserError(f"{where}: {_omegaconf_message(err)}") from err
    except UserError as err:
        raise UserError(f"{where}: saved {err}") from err


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(sections: dict[str, Any]) -> dict[str, Any]:
    """{"optim": {"momentum": 0.9}} -> {"optim.momentum": 0.9}."""
    return {f"{section}.{key}": value for section, keys in sections.items() for key, value in keys.items()}


def save_config(cfg: Config, path: str | Path) -> None:
    write_atomic(Path(path), OmegaConf.to_yaml(OmegaConf.structured(cfg)))
