"""The recipes' sources, operation by operation (issue 22): timm's RandAugment in DALI against timm's
own ops and draws, repeated augmentation against timm's RepeatAugSampler, ffcv's BlurPool against
its formula, and the keys these replaced."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from imagenet_resnet.config import load_config
from imagenet_resnet.data.sampling import TrainSampler
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.errors import UserError
from imagenet_resnet.models import BlurPoolConv2d, build_model

SIZE = 48
MEAN = (0.485, 0.456, 0.406)


def test_images(n: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Photographs' ingredients at SIZE px: smooth colour waves, a flat patch, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = []
    for _ in range(n):
        waves = [127 + 100 * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y + rng.uniform()))
                 for _ in range(3)]
        image = np.stack(waves, -1)
        top, left = rng.integers(0, SIZE // 2, 2)
        image[top : top + SIZE // 3, left : left + SIZE // 4] = rng.integers(0, 255, 3)
        out.append(np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8))
    return out


# --- each DALI op against timm's -------------------------------------------------------------------

# Mean absolute difference allowed, in 8-bit levels, over the test images, timm's ops interpolating
# bilinearly as DALI's warp does. Measured: geometric ops 0.74-1.12 (mostly at the fill's edge,
# where PIL and DALI weigh the pixels next to it differently); Equalize 0.84 (DALI follows OpenCV's
# lookup table, PIL its own); the rest 0-0.001 (a level here and there where PIL's fixed point
# rounds otherwise).
# With timm's bicubic (the RSB recipes' interpolation) the geometric ops differ by 1.2-3.5 levels.
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
TOLERANCE = {**{name: 1.5 for name in GEOMETRIC}, "Equalize": 3.5}
EXACT = 0.01


def dali_op_outputs(name: str, cases: list[tuple[float, int]], images: list[np.ndarray]) -> list[list[np.ndarray]]:
    """The DALI twin of timm op `name` at each (magnitude, negate) case, on `images`."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug.core import signed_bin

    from imagenet_resnet.data import dali_augment as da

    policy = da.timm_policy("rand-inc1", SIZE, MEAN)
    augment = dict(zip(da.OPS, da.augmentations(dataclass_replace(policy, ops=da.OPS), SIZE)))[name]

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=0)
    def pipe():
        data = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        outs = []
        for magnitude, negate in cases:
            sign = fn.random.uniform(values=[negate], dtype=types.INT32)
            bin_ = signed_bin(int(round(magnitude / da.MAG_STEP)), random_sign=sign)
            outs.append(augment(data, magnitude_bin=bin_, num_magnitude_bins=len(da.magnitudes(policy)),
                                fill=policy.fill, interp_type=types.INTERP_LINEAR, size=SIZE))
        return tuple(outs)

    built = pipe()
    built.build()
    return [[np.asarray(t) for t in out] for out in built.run()]


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def timm_op_output(name: str, magnitude: float, negate: int, image: np.ndarray) -> np.ndarray:
    """timm's AugmentOp at a fixed magnitude, its random sign forced by seeding Python's generator."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    from imagenet_resnet.data.transforms import timm_hparams

    op = AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=timm_hparams(SIZE, MEAN, "bilinear"))
    seed = 0 if negate else 1  # random.seed(0): first draw 0.84 > 0.5, negated; seed 1: 0.13, kept
    random.seed(seed)
    assert (random.random() > 0.5) == bool(negate)
    random.seed(seed)
    return np.asarray(op(Image.fromarray(image)))


@pytest.mark.parametrize("name", sorted(__import__("imagenet_resnet.data.dali_augment", fromlist=["OPS"]).OPS))
def test_each_dali_op_matches_timms_op(name):
    """Both signs for every op: whether an op is signed comes from timm's output, not from our table."""
    cases = [(m, negate) for m in (2.5, 7.0, 9.5) for negate in (0, 1)]
    images = test_images()
    for (magnitude, negate), outputs in zip(cases, dali_op_outputs(name, cases, images)):
        want = [timm_op_output(name, magnitude, negate, image) for image in images]
        diff = np.mean([np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(outputs, want)])
        assert diff <= TOLERANCE.get(name, EXACT), f"{name} m{magnitude} negate={negate}: {diff:.3f} levels"
        if name not in TOLERANCE:
            assert max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(outputs, want)) <= 1


def test_dali_flips_before_randaugment_as_timm_so_sheary_fills_the_same_side(tmp_path):
    """timm: crop, flip, RandAugment. On a uniform image the flip changes nothing, and PIL's ShearY
    (either sign) opens its fill wedge towards the right edge; a flip after RandAugment would put
    the wedge on the left in half of the images."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    from imagenet_resnet.data import dali_augment as da
    from imagenet_resnet.data.dali_loader import imagenet_pipeline
    from imagenet_resnet.data.transforms import timm_hparams

    black = np.zeros((SIZE, SIZE, 3), np.uint8)
    random.seed(0)
    op = AugmentOp("ShearY", prob=1.0, magnitude=9, hparams=timm_hparams(SIZE, MEAN, "bilinear"))
    timm_out = np.stack([np.asarray(op(Image.fromarray(black))) for _ in range(64)])
    Image.fromarray(black).save(tmp_path / "black.png")
    policy = dataclass_replace(da.timm_policy("rand-m9-n1-mstd0", SIZE, MEAN), ops=("ShearY",), prob=1.0)
    pipe = imagenet_pipeline(file_root=str(tmp_path), files=["black.png"] * 64, labels=[0] * 64, train=True, size=SIZE,
                             gpu=False, policy=policy, batch_size=64, num_threads=1, device_id=None, seed=0)
    pipe.build()
    dali_out = np.asarray(pipe.run()[0].as_tensor())

    def right_share(images: np.ndarray) -> float:  # of the filled (non-black) pixels, the share in the right half
        filled = images.max(axis=-1) > 40
        return filled[:, :, SIZE // 2 :].sum() / filled.sum()

    assert right_share(timm_out) > 0.7
    assert abs(right_share(dali_out) - right_share(timm_out)) < 0.05


def test_posterize_at_magnitude_ten_is_black_as_timm_meant():
    """timm's PosterizeIncreasing at 10 keeps 0 bits: Pillow >= 11 raises, the wrapper returns black."""
    from PIL import Image

    from imagenet_resnet.data.transforms import timm_rand_augment

    augment = timm_rand_augment("rand-m10-n1-p1.0-inc1", {"img_mean": (124, 116, 104)})
    augment.ops = [op for op in augment.ops if op.name == "PosterizeIncreasing"]
    assert not np.asarray(augment(Image.fromarray(test_images(1)[0]))).any()


# --- the draws: how many ops, which, how strong ---------------------------------------------------


def dali_draws(config: str, images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(op index, ran, magnitude) per image and layer, from the DALI graph's own draws."""
    from nvidia.dali import pipeline_def

    from imagenet_resnet.data import dali_augment as da

    policy = da.timm_policy(config, SIZE, MEAN)

    @pipeline_def(batch_size=images, num_threads=1, device_id=None, seed=7)
    def pipe():
        d = da.draw(policy)
        return d.op, d.runs, d.magnitude_bin

    built = pipe()
    built.build()
    op, runs, bins = (np.stack([np.asarray(t) for t in out]) for out in built.run())
    return op, runs, bins * da.MAG_STEP


def timm_draws(config: str, images: int) -> tuple[list[list[str]], list[float]]:
    """The ops timm's RandAugment applies to each image, and the magnitudes it used, recorded by
    wrapping each op's level function and op function (timm's code runs as it is)."""
    from PIL import Image

    from imagenet_resnet.data.transforms import timm_hparams, timm_rand_augment

    augment = timm_rand_augment(config, timm_hparams(SIZE, MEAN, "bilinear"))
    applied: list[str] = []
    magnitudes: list[float] = []
    for op in augment.ops:
        level, fn_ = op.level_fn, op.aug_fn
        if level is not None:
            op.level_fn = lambda m, h, level=level: (magnitudes.append(m), level(m, h))[1]
        op.aug_fn = lambda img, *a, name=op.name, fn_=fn_, **k: (applied.append(name), img)[1]
    image = Image.fromarray(test_images(1)[0])
    random.seed(3)
    np.random.seed(3)
    per_image = []
    for _ in range(images):
        applied.clear()
        augment(image)
        per_image.append(list(applied))
    return per_image, magnitudes


def within(p: float, q: float, n: int, m: int, sigmas: float = 4.5) -> bool:
    """Two sample proportions agree within `sigmas` standard errors."""
    pooled = (p * n + q * m) / (n + m)
    return abs(p - q) <= sigmas * math.sqrt(max(pooled * (1 - pooled), 1e-9) * (1 / n + 1 / m))


def test_dali_draws_ops_and_magnitudes_as_timm_does():
    from imagenet_resnet.data.dali_augment import timm_policy

    config, n = "rand-m7-mstd0.5-inc1", 3000
    op, runs, magnitude = dali_draws(config, n)
    per_image, timm_magnitudes = timm_draws(config, n)
    names = timm_policy(config, SIZE, MEAN).ops
    dali_counts = Counter(runs.sum(axis=1).tolist())
    timm_counts = Counter(len(ops) for ops in per_image)
    for k in (0, 1, 2):  # ops applied per image: Binomial(2, 0.5)
        assert within(dali_counts[k] / n, timm_counts[k] / n, n, n), (k, dali_counts, timm_counts)
    dali_ops = Counter(names[i] for i in op[runs].tolist())
    timm_ops = Counter(name for ops in per_image for name in ops)
    d_total, t_total = sum(dali_ops.values()), sum(timm_ops.values())
    assert set(dali_ops) == set(timm_ops) == set(names)
    for name in names:
        assert within(dali_ops[name] / d_total, timm_ops[name] / t_total, d_total, t_total), name
    drawn = magnitude.ravel()
    assert drawn.mean() == pytest.approx(np.mean(timm_magnitudes), abs=0.05)
    assert drawn.std() == pytest.approx(np.std(timm_magnitudes), abs=0.05)
    assert drawn.min() >= 0 and drawn.max() <= 10


def test_each_layer_flips_its_own_coin():
    """Two layers of Invert, each run with p=0.5: an image ends inverted when exactly one ran, so half
    of them (timm draws a coin per layer); were the layers to share one coin, none would."""
    from nvidia.dali import fn, pipeline_def

    from imagenet_resnet.data import dali_augment as da

    images = [np.full((SIZE, SIZE, 3), 10, np.uint8)] * 400
    policy = dataclass_replace(da.timm_policy("rand-n2-m5-p0.5", SIZE, MEAN), ops=("Invert",))

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=11, enable_conditionals=True)
    def pipe():
        return da.rand_augment(fn.external_source(source=lambda: images, batch=True, layout="HWC"), policy, SIZE)

    built = pipe()
    built.build()
    inverted = np.mean([np.asarray(out)[0, 0, 0] == 245 for out in built.run()[0]])
    assert abs(inverted - 0.5) < 4 * (0.25 / len(images)) ** 0.5, inverted


# --- repeated augmentation against timm's sampler --------------------------------------------------


@pytest.mark.parametrize("world,images,round_to", [(1, 103, 0), (2, 103, 0), (3, 103, 0), (4, 103, 0),
                                                    (2, 300, 256), (3, 520, 256), (4, 103, 256)])
def test_repeated_augmentation_deals_what_timms_repeat_aug_sampler_deals(world, images, round_to):
    from timm.data.distributed_sampler import RepeatAugSampler

    batch, repeats = 4, 3
    for epoch in (0, 5):
        seen = Counter()
        ranks_of: dict[int, set[int]] = {}
        for rank in range(world):
            ours = TrainSampler(images, DistInfo(rank, rank, world, torch.device("cpu")), seed=0, batch_size=batch,
                                repeats=repeats, round_to=round_to)
            ours.set_position(epoch)
            timms = RepeatAugSampler(range(images), num_replicas=world, rank=rank, num_repeats=repeats,
                                     selected_round=round_to)
            timms.set_epoch(epoch)
            mine = ours.indices()
            # timm's train loader drops the last partial batch
            assert mine == list(timms)[: len(timms) // batch * batch]
            keys = list(ours)
            seeds = Counter((i, s) for i, s, _ in keys)
            assert max(seeds.values()) == 1  # each copy augmented with a seed of its own
            seen.update(mine)
            for i in mine:
                ranks_of.setdefault(i, set()).add(rank)
            ours.set_position(epoch, start_step=2)  # mid-epoch: the rest of the same list
            assert ours.indices() == mine[2 * batch :]
        assert max(seen.values()) <= repeats
        assert len(seen) < images  # about a third of the images, each several times
        if world >= repeats:  # copies on different ranks
            assert all(len(ranks) == seen[i] for i, ranks in ranks_of.items())


def test_repeated_augmentation_steps_match_timms_default_round_where_the_plain_split_would_not():
    """The issue's shape: 2 processes x 64 per batch; timm's default selected_round=256 gives one
    step fewer than images // world."""
    from timm.data.distributed_sampler import RepeatAugSampler

    images, world, batch = 1_281_167, 2, 64
    ours = TrainSampler(images, DistInfo(0, 0, world, torch.device("cpu")), seed=0, batch_size=batch, repeats=3)
    assert ours.steps_per_epoch == len(RepeatAugSampler(range(images), world, 0, num_repeats=3)) // batch == 10_008
    assert images // world // batch == 10_009


def test_repeated_augmentation_off_is_the_plain_distributed_sampler():
    dist = DistInfo(1, 1, 2, torch.device("cpu"))
    plain, off = TrainSampler(50, dist, 0, 4), TrainSampler(50, dist, 0, 4, repeats=1)
    assert plain.indices() == off.indices() and len(set(plain.indices())) == len(plain.indices())


# --- ffcv's BlurPool ------------------------------------------------------------------------------


def test_blurpool_conv_is_the_binomial_blur_then_the_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, stride=2, padding=1, bias=False)
    x = torch.randn(1, 16, 7, 7, dtype=torch.float64)
    conv = conv.double()
    padded = np.pad(x[0].numpy(), ((0, 0), (1, 1), (1, 1)))  # ffcv: F.conv2d(padding=1), zeros
    weights = np.outer([1, 2, 1], [1, 2, 1]) / 16
    blurred = np.zeros((16, 7, 7))
    for i in range(7):
        for j in range(7):
            blurred[:, i, j] = (padded[:, i : i + 3, j : j + 3] * weights).sum(axis=(1, 2))
    want = conv(torch.from_numpy(blurred)[None])
    got = BlurPoolConv2d(conv).double()(x)
    assert torch.allclose(got, want, atol=1e-12)
    delta = torch.zeros(1, 16, 5, 5, dtype=torch.float64)
    delta[0, :, 2, 2] = 1
    identity = nn.Conv2d(16, 16, 1, groups=16, bias=False).double()
    nn.init.ones_(identity.weight)
    impulse = BlurPoolConv2d(identity).double()(delta)[0, 0, 1:4, 1:4]  # the blur's own kernel
    assert torch.allclose(impulse, torch.from_numpy(weights))


def test_blurpool_resnet50_wraps_ffcvs_convs_and_adds_only_the_blurs_flops():
    from torch.utils.flop_counter import FlopCounterMode

    plain, blur = build_model("resnet50", 1000).eval(), build_model("resnet50", 1000, blurpool=True).eval()
    wrapped = sorted(name for name, m in blur.named_modules() if isinstance(m, BlurPoolConv2d))
    assert wrapped == [f"layer{s}.0.{c}" for s in (2, 3, 4) for c in ("conv2", "downsample.0")]
    assert isinstance(blur.conv1, nn.Conv2d) and isinstance(blur.maxpool, nn.MaxPool2d)  # the stem as it was
    inputs: list[torch.Size] = []
    for m in blur.modules():
        if isinstance(m, BlurPoolConv2d):
            m.register_forward_hook(lambda mod, args, out: inputs.append(args[0].shape))
    x = torch.randn(1, 3, 224, 224)
    counts = []
    with torch.no_grad():
        for net in (plain, blur):
            with FlopCounterMode(display=False) as counter:
                net(x)
            counts.append(counter.get_total_flops())
    blur_flops = sum(2 * 9 * c * h * w for _, c, h, w in inputs)  # a 3x3 depthwise multiply-add per input pixel
    assert counts[1] - counts[0] == blur_flops
    assert blur_flops == 2 * 18_966_528  # 19.0 M multiply-adds on ResNet-50's 4.09 G at 224 px


# --- the keys these replaced ------------------------------------------------------------------------


def test_the_old_randaugment_keys_are_refused_naming_the_new_one(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("data:\n  dataset: imagenet\n  randaugment_n: 2\n  randaugment_m: 21\n")
    for source, overrides in ((recipe, []), (None, ["data.randaugment_m=9"])):
        with pytest.raises(UserError, match=r"data\.randaugment_[nm]: replaced by data\.auto_augment"):
            load_config(source, overrides)
    saved = {"data": {"dataset": "imagenet", "randaugment_n": 0, "randaugment_m": 9}}
    assert load_config(None, [], saved, "old.pt").data.auto_augment == ""  # off then, off now
    saved["data"]["randaugment_n"] = 2
    with pytest.raises(UserError, match="old.pt: saved config: .*resume it with the version that wrote it"):
        load_config(None, [], saved, "old.pt")


def test_a_weighted_policy_is_refused_by_the_dali_loader_only():
    from imagenet_resnet.data.dali_augment import timm_policy
    from imagenet_resnet.data.transforms import timm_rand_augment

    assert timm_rand_augment("rand-m9-tweights", {}).choice_weights is not None  # torchvision: timm's own
    with pytest.raises(UserError, match="data.auto_augment=.*use data.loader=torchvision"):
        timm_policy("rand-m9-tweights", SIZE, MEAN)
