"""Numbers checked against their definitions, not against each other (issue 25): top-k counts,
the evaluation crop's geometry, the train crops' and flips' distributions, and the lr each
optimizer step uses. Each guards a one-line bug that the end-to-end comparisons cannot see,
because both sides of those comparisons would share it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from conftest import REPO, cli_env
from imagenet_resnet.config import load_config
from imagenet_resnet.data.transforms import train_transform, val_transform
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.evaluation import evaluate
from imagenet_resnet.metrics import read_metrics, topk_correct
from imagenet_resnet.trainer import Trainer

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


# --- top-k ------------------------------------------------------------------------------------


def logits_ranking_label_at(ranks: list[int], classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per rank: the label (0) is the rank-th largest logit (1 = the top)."""
    rows = []
    for rank in ranks:
        row = torch.arange(classes, 0, -1, dtype=torch.float32)  # class 0 first, class 9 last ...
        row[[0, rank - 1]] = row[[rank - 1, 0]]  # ... then label 0 swapped into place `rank`
        rows.append(row)
    return torch.stack(rows), torch.zeros(len(ranks), dtype=torch.long)


RANKS = [1, 1, 2, 3, 5, 6, 10, 4]  # top-1: 2 rows; top-5: 6 rows


def test_topk_counts_on_hand_made_logits():
    logits, labels = logits_ranking_label_at(RANKS)
    assert topk_correct(logits, labels).tolist() == [2, 6]
    assert topk_correct(logits, labels, (1, 2, 6)).tolist() == [2, 3, 7]


class FixedLogits(torch.nn.Module):
    """A model whose logits are looked up by the image's first pixel (its row number)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.table[images[:, 0, 0, 0].long()]


def test_evaluate_reports_top1_top5_and_loss_of_known_logits():
    logits, labels = logits_ranking_label_at(RANKS)
    images = torch.arange(len(RANKS), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    batches = [(images[:3], labels[:3]), (images[3:], labels[3:])]
    stats = evaluate(FixedLogits(logits), batches, None, torch.device("cpu"))
    assert stats["val_top1"] == pytest.approx(100 * 2 / 8) and stats["val_top5"] == pytest.approx(100 * 6 / 8)
    assert stats["val_images"] == 8
    assert stats["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())


# --- the evaluation crop ----------------------------------------------------------------------


def ramp(width: int, height: int) -> np.ndarray:
    """HWC uint8: red = x, green = y (each 0..255 across the image), blue 128."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return np.stack([x, y, np.full_like(x, 128)], axis=2).round().astype(np.uint8)


def expected_edges(width: int, height: int, size: int, crop_fraction: float) -> tuple[float, float, float, float]:
    """Red at the crop's first and last column, green at its first and last row, by the definition:
    shorter side to floor(size / crop_fraction) (timm's rule; the longer in proportion), then the centre
    size x size."""
    short = math.floor(size / crop_fraction)
    scale = short / min(width, height)
    new_w, new_h = int(width * scale), int(height * scale)  # the longer side truncated, as torchvision does
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)

    def source(offset: int, new: int, old: int) -> float:  # pixel centre in the resized image -> ramp value
        return ((offset + 0.5) * old / new - 0.5) * 255 / (old - 1)

    return (source(left, new_w, width), source(left + size - 1, new_w, width),
            source(top, new_h, height), source(top + size - 1, new_h, height))


def edges(crop: np.ndarray) -> tuple[float, float, float, float]:
    """(red first col, red last col, green first row, green last row) of an HWC crop."""
    crop = crop.astype(np.float64)
    return crop[:, 0, 0].mean(), crop[:, -1, 0].mean(), crop[0, :, 1].mean(), crop[-1, :, 1].mean()


EVAL_SETTINGS = [  # (train size, data.val_image_size, data.val_crop_fraction)
    (64, 0, 0.875), (32, 48, 0.875), (64, 0, 1.0), (32, 64, 0.95)]


def imagenet_cfg(size: int, val_size: int = 0, crop: float = 0.875, *extra: str):
    return load_config(None, ["data.dataset=folder", f"data.image_size={size}", f"data.val_image_size={val_size}",
                              f"data.val_crop_fraction={crop}", *extra])


@pytest.mark.parametrize("size, val_size, crop", EVAL_SETTINGS)
def test_torchvision_evaluation_crop_is_the_definition(size, val_size, crop):
    image = torch.from_numpy(ramp(300, 200)).permute(2, 0, 1)
    got = val_transform(imagenet_cfg(size, val_size, crop))(image)
    final = val_size or size
    want = v2.Compose([v2.Resize(math.floor(final / crop), antialias=True), v2.CenterCrop(final)])(image)
    assert torch.equal(got, want)
    assert edges(got.permute(1, 2, 0).numpy()) == pytest.approx(expected_edges(300, 200, final, crop), abs=1.0)


def dali_batch(files: list[Path], train: bool, size: int, crop: float = 0.875, seed: int = 0, crop_first: bool = False,
               **keys) -> np.ndarray:
    """The DALI pipeline the loaders use, in CPU mode, over `files`: uint8 NHWC (`keys`: min_area, interpolation,
    policy)."""
    from imagenet_resnet.data.dali_loader import imagenet_pipeline

    keys.setdefault("policy", None)
    pipe = imagenet_pipeline(file_root=str(files[0].parent), files=[f.name for f in files], labels=[0] * len(files),
                             train=train, gpu=False, size=size, resize_side=math.floor(size / crop),
                             crop_first=crop if crop_first else 0.0,
                             batch_size=len(files), num_threads=1, device_id=None, seed=seed, **keys)
    pipe.build()
    return np.asarray(pipe.run()[0].as_tensor())


# DALI centres an odd margin half a pixel the other way and keeps the resized size fractional: its
# crop edges may sit up to one output pixel (+ 1 level of rounding) from the definition's.
DALI_EDGE_TOLERANCE_PX = 1.0
DALI_MEAN_TOLERANCE = 2.0  # mean |difference| from the torchvision crop, 8-bit levels


def levels_per_output_pixel(width: int, height: int, size: int, crop_fraction: float) -> float:
    scale = math.floor(size / crop_fraction) / min(width, height)
    return max(255 / (width - 1) / scale, 255 / (height - 1) / scale)


@pytest.mark.parametrize("size, val_size, crop", EVAL_SETTINGS)
def test_dali_evaluation_crop_is_the_definition_within_tolerance(tmp_path, size, val_size, crop):
    path = tmp_path / "ramp.png"
    Image.fromarray(ramp(300, 200)).save(path)
    final = val_size or size
    got = dali_batch([path], train=False, size=final, crop=crop)[0]
    tolerance = DALI_EDGE_TOLERANCE_PX * levels_per_output_pixel(300, 200, final, crop) + 1
    assert edges(got) == pytest.approx(expected_edges(300, 200, final, crop), abs=tolerance)
    reference = val_transform(imagenet_cfg(size, val_size, crop))(torch.from_numpy(ramp(300, 200)).permute(2, 0, 1))
    difference = np.abs(got.astype(np.float64) - reference.permute(1, 2, 0).numpy()).mean()
    assert difference < DALI_MEAN_TOLERANCE


@pytest.mark.parametrize("size, crop", [(224, 0.95), (224, 0.875), (256, 0.875), (160, 0.95), (288, 1.0), (176, 0.9)])
def test_the_evaluation_resize_is_timms(size, crop):
    """timm's eval transform resizes to floor(size / crop_pct) (224 / 0.95 -> 235, where rounding gives 236)."""
    from timm.data.transforms_factory import transforms_imagenet_eval

    from imagenet_resnet.data.sizes import val_resize_side

    timm_resize = next(t for t in transforms_imagenet_eval(size, crop_pct=crop).transforms if hasattr(t, "size"))
    data = imagenet_cfg(size, 0, crop).data
    assert val_resize_side(data) == timm_resize.size
    # evaluate --pretrained passes a published transform's resize as the fraction crop / resize
    assert val_resize_side(imagenet_cfg(size, 0, size / timm_resize.size).data) == timm_resize.size


def test_crop_first_takes_ffcvs_centre_square_then_resizes(tmp_path):
    """ffcv's CenterCropRGBImageDecoder: a square of int(0.875 x 200) = 175 px at offsets
    ((200 - 175) // 2, (300 - 175) // 2) = (12, 62), resized to the val size; DALI's the same."""
    image = torch.from_numpy(ramp(300, 200)).permute(2, 0, 1)
    got = val_transform(imagenet_cfg(32, 48, 0.875, "data.val_crop_first=true"))(image)
    assert torch.equal(got, v2.Resize((48, 48), antialias=True)(image[:, 12:187, 62:237]))
    path = tmp_path / "ramp.png"
    Image.fromarray(ramp(300, 200)).save(path)
    reference = got.permute(1, 2, 0).numpy().astype(np.float64)
    dali = dali_batch([path], train=False, size=48, crop=0.875, crop_first=True)[0]
    assert np.abs(dali - reference).mean() < 0.1  # 0.007 levels measured: the same square, the same resize
    plain = dali_batch([path], train=False, size=48, crop=0.875)[0]  # resize first: a square 1 px off
    assert np.abs(plain - reference).mean() > 0.5


def test_predict_reads_a_large_jpeg_reduced_and_crops_it_as_evaluation_does(tmp_path):
    from imagenet_resnet.data.sizes import val_resize_side
    from imagenet_resnet.predict import load_image

    path = tmp_path / "large.jpg"
    Image.fromarray(ramp(2400, 1600)).save(path, quality=95)
    cfg = imagenet_cfg(64)
    image = load_image(path, 3, val_resize_side(cfg.data), max_pixels=10**6)  # 3.8 MP in full: only 1/8 fits
    assert image.shape == (3, 200, 300)
    crop = val_transform(cfg)(image).permute(1, 2, 0).numpy()
    assert edges(crop) == pytest.approx(expected_edges(2400, 1600, 64, 0.875), abs=3.0)  # + JPEG's own error


# --- train augmentation -----------------------------------------------------------------------

SIDE, DRAWS = 256, 300


def crop_boxes(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area fraction, aspect ratio (w/h) and mirrored flag of each NHWC crop of the ramp image."""
    n = crops.shape[1]
    red = crops[..., 0].astype(np.float64)
    green = crops[..., 1].astype(np.float64)
    left, right = red[:, :, 0].mean(1), red[:, :, -1].mean(1)
    top, bottom = green[:, 0, :].mean(1), green[:, -1, :].mean(1)
    # The edge pixels' centres lie half an output pixel inside the crop box.
    width = np.abs(right - left) * n / (n - 1) * SIDE / 255
    height = np.abs(bottom - top) * n / (n - 1) * SIDE / 255
    return width * height / SIDE**2, width / height, right < left


def check_crop_distribution(crops: np.ndarray, min_area: float = 0.08) -> None:
    area, aspect, mirrored = crop_boxes(crops)
    assert area.min() < min_area + 0.07 and area.max() > 0.85  # the configured area range is min_area .. 1
    assert area.min() > min_area - 0.02, area.min()  # and none smaller
    assert aspect.min() < 0.8 and aspect.max() > 1.25  # the configured ratio range is 3/4 .. 4/3
    assert 0.7 < aspect.min() and aspect.max() < 1 / 0.7  # and nothing far beyond it
    sigma = (0.25 / len(mirrored)) ** 0.5
    assert abs(mirrored.mean() - 0.5) < 3.5 * sigma  # half of the images mirrored


@pytest.mark.parametrize("min_area", [0.08, 0.3])
def test_torchvision_train_crops_and_flips_follow_the_configured_distributions(min_area):
    transform = train_transform(imagenet_cfg(32, 0, 0.875, f"data.crop_min_area={min_area}").data, size=32)
    image = torch.from_numpy(ramp(SIDE, SIDE)).permute(2, 0, 1)
    crops = []
    for seed in range(DRAWS):
        torch.manual_seed(seed)
        crops.append(transform(image).permute(1, 2, 0).numpy())
    check_crop_distribution(np.stack(crops), min_area)


@pytest.mark.parametrize("min_area", [0.08, 0.3])
def test_dali_train_crops_and_flips_follow_the_configured_distributions(tmp_path, min_area):
    path = tmp_path / "ramp.png"
    Image.fromarray(ramp(SIDE, SIDE)).save(path)
    crops = np.concatenate([dali_batch([path] * 50, train=True, size=32, seed=seed, min_area=min_area)
                            for seed in range(DRAWS // 50)])
    check_crop_distribution(crops, min_area)


def noise(side: int = 96) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)


def test_the_interpolation_key_reaches_both_loaders_train_crops(tmp_path):
    """The same crops resized bilinearly and bicubically differ on a noisy image; the default is bilinear."""
    image = torch.from_numpy(noise()).permute(2, 0, 1)

    def torchvision_crop(*keys: str) -> torch.Tensor:
        torch.manual_seed(3)
        return train_transform(imagenet_cfg(32, 0, 0.875, *keys).data, size=32)(image)

    assert torch.equal(torchvision_crop(), torchvision_crop("data.interpolation=bilinear"))
    assert not torch.equal(torchvision_crop(), torchvision_crop("data.interpolation=bicubic"))
    path = tmp_path / "noise.png"
    Image.fromarray(noise()).save(path)
    bilinear, default, bicubic = (dali_batch([path] * 4, train=True, size=32, seed=3, **keys)
                                  for keys in ({"interpolation": "bilinear"}, {}, {"interpolation": "bicubic"}))
    assert np.array_equal(bilinear, default) and not np.array_equal(bilinear, bicubic)


def test_random_train_interpolation_picks_bilinear_or_bicubic_per_image_in_both_loaders(tmp_path):
    """timm's --train-interpolation random (RSB): each crop bilinear or bicubic, by a coin per image;
    data.interpolation stays evaluation's. RandAugment's geometric ops then pick per op (timm's
    hparams without an interpolation)."""
    from timm.data.auto_augment import _RANDOM_INTERPOLATION, AugmentOp

    from imagenet_resnet.data.transforms import timm_hparams

    image = torch.from_numpy(noise()).permute(2, 0, 1)

    def torchvision_crop(seed: int, *keys: str) -> torch.Tensor:
        torch.manual_seed(seed)
        return train_transform(imagenet_cfg(32, 0, 0.875, "data.interpolation=bicubic", *keys).data, size=32)(image)

    picked = []
    for seed in range(30):
        crop = torchvision_crop(seed, "data.train_interpolation=random")
        picked.append([torch.equal(crop, torchvision_crop(seed, f"data.train_interpolation={name}"))
                       for name in ("bilinear", "bicubic")])
    assert all(sum(p) == 1 for p in picked) and 5 < sum(p[0] for p in picked) < 25
    path = tmp_path / "noise.png"
    Image.fromarray(noise()).save(path)
    crops = {name: dali_batch([path] * 16, train=True, size=32, seed=3, interpolation=name)
             for name in ("random", "bilinear", "bicubic")}

    def same(a: np.ndarray, b: np.ndarray) -> bool:  # up to the flip, whose coin the extra one moves
        return np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])

    kinds = [[same(crops["random"][i], crops[name][i]) for name in ("bilinear", "bicubic")] for i in range(16)]
    assert all(sum(k) == 1 for k in kinds) and 2 <= sum(k[0] for k in kinds) <= 14
    op = AugmentOp("Rotate", hparams=timm_hparams(32, (0.5, 0.5, 0.5), "random"))
    assert op.kwargs["resample"] == _RANDOM_INTERPOLATION


# --- the lr of each optimizer step ------------------------------------------------------------


@pytest.mark.parametrize("optim, accumulation", [("sgd", 1), ("lars", 1), ("lamb", 1), ("sgd", 2)])
def test_each_optimizer_step_uses_the_scheduled_lr_of_its_own_step(cifar_root, tmp_path, optim, accumulation):
    cfg = load_config("configs/cifar10_resnet20.yaml", [
        f"data.root={cifar_root}", f"run.out_dir={tmp_path / 'run'}", "wandb.mode=disabled", "schedule.epochs=2",
        f"data.batch_size={128 // accumulation}", f"optim.accumulation_steps={accumulation}", f"optim.name={optim}",
        "schedule.kind=cosine", "schedule.warmup_epochs=1", "schedule.warmup_start_factor=0"])
    trainer = Trainer(cfg, CPU)
    used, unchanged = [], []

    def before_step(optimizer, args, kwargs) -> None:
        used.append([group["lr"] / group["lr_scale"] for group in optimizer.param_groups])
        if len(used) == 1:
            before_step.weights = [p.detach().clone() for p in trainer.net.parameters()]

    def after_step(optimizer, args, kwargs) -> None:
        if len(used) == 1:  # warmup from 0: the first step moves nothing
            unchanged.append(all(torch.equal(a, p) for a, p in zip(before_step.weights, trainer.net.parameters())))

    trainer.optimizer.register_step_pre_hook(before_step)
    trainer.optimizer.register_step_post_hook(after_step)
    trainer.fit()
    steps = trainer.steps_per_epoch * cfg.schedule.epochs
    assert len(used) == steps and trainer.global_batch == 128
    for step, lrs in enumerate(used):
        assert lrs == pytest.approx([trainer.peak_lr * trainer.schedule.factor(step)] * len(lrs), rel=1e-12, abs=1e-15)
    assert unchanged == [True]
    assert read_metrics(tmp_path / "run")[-1]["lr"] == pytest.approx(
        trainer.peak_lr * trainer.schedule.factor(steps - 1)
    )


# --- evaluation of the bare module under DDP --------------------------------------------------


@pytest.mark.e2e
def test_a_rank_without_val_images_does_not_stall_evaluation(tmp_path):
    """One val image on 2 ranks: rank 0's shard is empty, so it never calls the model. Through the
    DDP wrapper, rank 1's first forward after training would broadcast buffers while rank 0 sums
    its (empty) counts: the ranks would wait on each other. The bare module has no collective."""
    import subprocess

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split, name, count in (("train", "a", 8), ("train", "b", 8), ("val", "a", 1)):
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "imagenet_resnet.train",
            "--config",
            "configs/imagenet_resnet18.yaml",
            f"data.root={root}",
            "data.dataset=folder",
            "data.loader=torchvision",
            "data.workers=0",
            "data.image_size=32",
            "data.batch_size=4",
            "schedule.epochs=1",
            "schedule.warmup_epochs=0",
            f"run.out_dir={out}",
            "wandb.mode=disabled",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(out)[-1]["val_images"] == 1
