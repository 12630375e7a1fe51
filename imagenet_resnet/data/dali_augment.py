"""timm's RandAugment (e.g. `rand-m7-mstd0.5-inc1`, ResNet strikes back) as a DALI graph, so it runs
on the GPU beside the JPEG decoder; imported only by the DALI loader.

timm's own policy object (`timm.data.auto_augment.rand_augment_transform`) is the one source: the ops,
their probability, magnitude, magnitude noise and bound are read from it, so a string means the same
here as in timm. Each timm op has a twin here, written with DALI operators and wrapped in DALI
auto_aug's `augmentation` blocks with timm's magnitude-to-parameter maps. Per image and layer, as
timm's `RandAugment` and `AugmentOp` draw them:

- an op chosen uniformly from the set, with replacement between layers;
- a coin: the op runs with probability p (0.5 unless `-p` says otherwise);
- a magnitude from N(m, mstd) (uniform in [0, m] for mstd > 100), clipped to [0, mmax] (10), in
  steps of 0.01; a random sign for the signed ops;
- geometric ops fill with the mean pixel and translate by a fraction of the image size.

What differs from timm's PIL ops, measured op by op in tests/test_augment.py: Equalize follows OpenCV
(DALI's) rather than PIL's lookup table; rotate, shear and translate interpolate bilinearly (DALI's
warp has no bicubic); the enhance ops round where PIL truncates in a few places.

    policy = timm_policy("rand-m7-mstd0.5-inc1", size=224, mean=(0.485, 0.456, 0.406))
    images = rand_augment(images, policy, size=224)       # inside a DALI pipeline, uint8 HWC
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug.core import _Augmentation, augmentation, select, signed_bin
from nvidia.dali.pipeline import do_not_convert

from imagenet_resnet.config import parse_rand_augment
from imagenet_resnet.data.transforms import timm_hparams
from imagenet_resnet.errors import UserError

LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes are out of 10
MAG_STEP = 0.01  # the magnitude grid of the parameter tables (timm's magnitudes are continuous)


@dataclass(frozen=True)
class Policy:
    """What timm's RandAugment object says, in plain values."""

    ops: tuple[str, ...]  # timm op names, e.g. ("AutoContrast", ..., "TranslateYRel")
    layers: int  # ops chosen per image
    prob: float  # each chosen op runs with this probability
    magnitude: float
    magnitude_std: float  # 0: fixed, inf: uniform in [0, magnitude]
    magnitude_max: float  # magnitudes are clipped to [0, this]
    translate_pct: float  # TranslateXRel/YRel at magnitude 10, as a fraction of the image size
    fill: tuple[int, int, int]  # geometric ops' fill: the mean pixel


def timm_policy(config: str, size: int, mean: tuple[float, ...]) -> Policy:
    """The policy timm builds from `config` for a train crop of `size` (fill: the dataset's mean)."""
    transform = parse_rand_augment(config, timm_hparams(size, mean, "bilinear"))
    if transform.choice_weights is not None:
        raise UserError(f"config key data.auto_augment={config!r}: weighted op choice (-t) has no DALI version here; "
                        "use data.loader=torchvision")
    unknown = sorted({op.name for op in transform.ops} - set(OPS))
    if unknown:
        raise UserError(
            f"config key data.auto_augment={config!r}: ops without a DALI version here: {', '.join(unknown)}; "
            "use data.loader=torchvision"
        )
    first = transform.ops[0]
    return Policy(
        ops=tuple(op.name for op in transform.ops),
        layers=transform.num_layers,
        prob=first.prob,
        magnitude=float(first.magnitude),
        magnitude_std=float(first.magnitude_std),
        magnitude_max=float(first.magnitude_max or LEVEL),
        translate_pct=first.hparams.get("translate_pct", 0.45),
        fill=first.hparams["img_mean"],
    )


# --- the ops: uint8 HWC in and out, as PIL computes them -------------------------------------------


def _uint8(x):
    """PIL's blend stores floor(value) clipped to [0, 255]."""
    return fn.cast(dmath.clamp(dmath.floor(x), 0.0, 255.0), dtype=types.UINT8)


def _gray(data):
    """PIL's convert("L"): ITU-R 601-2 luma, rounded, one channel kept (HW1)."""
    rgb = fn.cast(data, dtype=types.FLOAT)
    weights = types.Constant(np.array([0.299, 0.587, 0.114], dtype=np.float32))
    return dmath.floor(fn.reductions.sum(rgb * weights, axes=2, keep_dims=True) + 0.5)


def _blend(degenerate, data, factor):
    """PIL's Image.blend(degenerate, data, factor)."""
    return _uint8(degenerate + factor * (fn.cast(data, dtype=types.FLOAT) - degenerate))


def color(data, factor):
    return _blend(_gray(data), data, factor)


def contrast(data, factor):
    mean = dmath.floor(fn.reductions.mean(_gray(data), axes=(0, 1, 2), keep_dims=True) + 0.5)
    return _blend(mean, data, factor)


def brightness(data, factor):
    return _blend(types.Constant(0.0), data, factor)


SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13  # PIL's ImageFilter.SMOOTH


def sharpness(data, factor, size):
    """PIL smooths the inside (rounded), keeps the 1-pixel border as it was, then blends."""
    image = fn.cast(data, dtype=types.FLOAT)
    smooth = dmath.floor(fn.filter(image, SMOOTH) + 0.5)
    inside = np.zeros((size, size, 1), dtype=np.float32)
    inside[1:-1, 1:-1] = 1.0
    inside = types.Constant(inside)
    return _blend(smooth * inside + image * (1.0 - inside), data, factor)


def auto_contrast(data, _):
    """PIL's autocontrast: each channel's [min, max] stretched to [0, 255] (lut = int(x * scale + offset))."""
    image = fn.cast(data, dtype=types.FLOAT)
    lo = fn.reductions.min(image, axes=(0, 1), keep_dims=True)
    hi = fn.reductions.max(image, axes=(0, 1), keep_dims=True)
    spread = hi - lo
    flat = spread <= 0.0
    scale = 255.0 / (spread + 255.0 * flat)  # 1 where the channel is flat: unchanged
    return _uint8((image - lo * (flat ^ True)) * scale)


def equalize(data, _):
    return fn.equalize(data)  # OpenCV's rule; PIL's lookup table differs by a level or two


def invert(data, _):
    return types.Constant(255, dtype=types.UINT8) - data


def posterize(data, mask):
    return data & mask


def solarize(data, threshold):
    """Pixels at or above the threshold inverted (threshold 256: none)."""
    level = fn.cast(data, dtype=types.INT32)
    inverted = level >= threshold
    return fn.cast(level + inverted * (255 - 2 * level), dtype=types.UINT8)


def solarize_add(data, add):
    """Pixels below 128 raised by `add` (at most 128, so at most 255)."""
    level = fn.cast(data, dtype=types.INT32)
    return fn.cast(level + (level < 128) * add, dtype=types.UINT8)


def _with_fill(data, fill, warp):
    """`warp` (a geometric DALI op) with the mean pixel as fill: DALI fills with one value for all
    channels, so the image is shifted by the mean, filled with 0, and shifted back."""
    mean = types.Constant(np.array(fill, dtype=np.float32))
    moved = warp(fn.cast(data, dtype=types.FLOAT) - mean)
    return fn.cast(dmath.clamp(dmath.floor(moved + mean + 0.5), 0.0, 255.0), dtype=types.UINT8)


def affine(data, matrix, fill, interp_type):
    """PIL's Image.transform(AFFINE): `matrix` maps each output pixel to the input pixel it shows."""
    return _with_fill(data, fill, lambda x: fn.warp_affine(x, matrix=matrix, fill_value=0.0, interp_type=interp_type,
                                                           inverse_map=True))


def rotate(data, degrees, fill, interp_type):
    """PIL's rotate: counter-clockwise by `degrees` about the image centre, same size."""
    return _with_fill(data, fill, lambda x: fn.rotate(x, angle=degrees, keep_size=True, fill_value=0.0,
                                                      interp_type=interp_type))


# --- timm's magnitude-to-argument maps (timm/data/auto_augment.py, *_level_to_arg) ------------------
# A signed op receives its magnitude already negated (DALI's random sign); timm negates inside.


def _mask(bits: int) -> np.ndarray:
    """PIL's posterize keeps `bits` high bits (8 or more: all)."""
    return np.array((0xFF << (8 - min(bits, 8))) & 0xFF, dtype=np.uint8)


def _affine(row: int, column: int) -> Callable[[float], np.ndarray]:
    """An identity 2x3 matrix with one entry set to the parameter."""

    def matrix(value: float) -> np.ndarray:
        out = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
        out[row, column] = value
        return out

    return matrix


def _compose(first: Callable, then: Callable) -> Callable:
    return lambda m: then(first(m))


def _ops(size: int, translate_pct: float) -> dict[str, tuple[Callable, bool, Callable]]:
    """timm op name -> (DALI op, signed, magnitude -> argument)."""
    enhance = lambda m: np.float32(m / LEVEL * 1.8 + 0.1)  # noqa: E731
    enhance_increasing = lambda m: np.float32(max(0.1, 1.0 + m / LEVEL * 0.9))  # noqa: E731
    posterize_bits = lambda m: int(m / LEVEL * 4)  # noqa: E731
    solarize_threshold = lambda m: min(256, int(m / LEVEL * 256))  # noqa: E731
    pixels = lambda m: m / LEVEL * translate_pct * size  # noqa: E731
    return {
        "AutoContrast": (auto_contrast, False, None),
        "Equalize": (equalize, False, None),
        "Invert": (invert, False, None),
        "Rotate": (rotate, True, lambda m: np.float32(m / LEVEL * 30)),
        "Posterize": (posterize, False, lambda m: _mask(posterize_bits(m))),
        "PosterizeIncreasing": (posterize, False, lambda m: _mask(4 - posterize_bits(m))),
        "PosterizeOriginal": (posterize, False, lambda m: _mask(posterize_bits(m) + 4)),
        "Solarize": (solarize, False, lambda m: np.int32(solarize_threshold(m))),
        "SolarizeIncreasing": (solarize, False, lambda m: np.int32(256 - solarize_threshold(m))),
        "SolarizeAdd": (solarize_add, False, lambda m: np.int32(min(128, int(m / LEVEL * 110)))),
        "Color": (color, False, enhance),
        "ColorIncreasing": (color, True, enhance_increasing),
        "Contrast": (contrast, False, enhance),
        "ContrastIncreasing": (contrast, True, enhance_increasing),
        "Brightness": (brightness, False, enhance),
        "BrightnessIncreasing": (brightness, True, enhance_increasing),
        "Sharpness": (sharpness, False, enhance),
        "SharpnessIncreasing": (sharpness, True, enhance_increasing),
        "ShearX": (affine, True, _compose(lambda m: m / LEVEL * 0.3, _affine(0, 1))),
        "ShearY": (affine, True, _compose(lambda m: m / LEVEL * 0.3, _affine(1, 0))),
        "TranslateXRel": (affine, True, _compose(pixels, _affine(0, 2))),
        "TranslateYRel": (affine, True, _compose(pixels, _affine(1, 2))),
    }


OPS = tuple(_ops(224, 0.45))


def magnitudes(policy: Policy) -> np.ndarray:
    """The magnitude grid: 0, 0.01, ..., magnitude_max."""
    return np.arange(round(policy.magnitude_max / MAG_STEP) + 1) * MAG_STEP


class Tabulated(_Augmentation):
    """DALI's Augmentation, its parameter table built without AutoGraph: the table is plain NumPy,
    and converting each of the grid's thousands of calls made defining a pipeline take a minute."""

    @do_not_convert
    def _map_mags_to_params(self, magnitudes):
        return super()._map_mags_to_params(magnitudes)


@do_not_convert
def augmentations(policy: Policy, size: int) -> list:
    """DALI augmentations for the policy's ops, in its order, parameters tabulated on the grid."""
    table = _ops(size, policy.translate_pct)
    grid = magnitudes(policy)
    out = []
    for name in policy.ops:
        op, signed, to_param = table[name]
        if to_param is None:
            out.append(augmentation(op, name=name, augmentation_cls=Tabulated))
        else:
            out.append(augmentation(op, mag_range=grid, randomly_negate=signed, mag_to_param=to_param,
                                    param_device="auto", name=name, augmentation_cls=Tabulated))
    return out


@dataclass
class Draws:
    """Per image, one entry per layer: the op's index in policy.ops, whether its coin came up, its
    magnitude's index in the grid, and its sign (1: negated)."""

    op: object
    runs: object
    magnitude_bin: object
    negate: object


@do_not_convert
def draw(policy: Policy) -> Draws:
    """timm's random choices for a batch: ops uniformly with replacement, a coin with p per op, the
    magnitude from N(m, mstd) (uniform in [0, m] for mstd inf) clipped to [0, mmax], a fair sign."""
    shape = (policy.layers,)
    if math.isinf(policy.magnitude_std):
        magnitude = fn.random.uniform(range=[0.0, policy.magnitude], shape=shape)
    elif policy.magnitude_std > 0:
        magnitude = fn.random.normal(shape=shape) * policy.magnitude_std + policy.magnitude
    else:  # a fixed magnitude (DALI's uniform refuses an empty range)
        magnitude = fn.random.normal(shape=shape) * 0.0 + policy.magnitude
    magnitude = dmath.clamp(magnitude, 0.0, policy.magnitude_max)
    return Draws(op=fn.random.uniform(values=list(range(len(policy.ops))), shape=shape, dtype=types.INT32),
                 runs=fn.random.coin_flip(probability=policy.prob, shape=shape, dtype=types.BOOL),
                 magnitude_bin=fn.cast(dmath.floor(magnitude / MAG_STEP + 0.5), dtype=types.INT32),
                 negate=fn.random.uniform(values=[0, 1], shape=shape, dtype=types.INT32))


def rand_augment(images, policy: Policy, size: int):
    """timm's RandAugment on a batch of uint8 HWC `size` x `size` images."""
    ops = augmentations(policy, size)
    chosen = draw(policy)
    bins = signed_bin(chosen.magnitude_bin, random_sign=chosen.negate)
    for layer in range(policy.layers):
        if chosen.runs[layer]:
            images = select(ops, chosen.op[layer], images, magnitude_bin=bins[layer], fill=policy.fill,
                            interp_type=types.INTERP_LINEAR, size=size)
    return images
