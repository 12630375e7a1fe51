import math

import pytest

from imagenet_resnet.models import build_model
from imagenet_resnet.optim import NORM_TYPES, Schedule, param_groups, scaled_lr


def test_linear_scaling_rule():
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    assert scaled_lr(0.1, 8192) == pytest.approx(3.2)


@pytest.mark.parametrize("name", ["resnet50", "seresnet50", "cifar_seresnet20"])
def test_no_decay_on_every_norm_parameter_and_bias(name):
    model = build_model(name, 10)
    decay, no_decay = param_groups(model, 1e-4)  # (decay, no decay): nothing pretrained
    no_decay_ids = {id(p) for p in no_decay["params"]}
    expected = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    expected |= {id(m.bias) for m in model.modules() if getattr(m, "bias", None) is not None}
    assert no_decay_ids == expected
    assert all(p.ndim > 1 for p in decay["params"])  # only conv and linear weights decay
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    if name == "resnet50":  # the downsample BN that name-based rules ('bn' in name) miss
        assert id(model.layer1[0].downsample[1].weight) in no_decay_ids
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (1e-4, 0.0)


def test_step_schedule_milestones_are_fractions_of_the_run():
    s = Schedule(total_steps=64_000, warmup_steps=0, milestones=(0.5, 0.75))
    assert [s.factor(t) for t in (0, 31_999, 32_000, 47_999, 48_000, 63_999)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_linear_and_constant_warmup():
    linear = Schedule(total_steps=1000, warmup_steps=100, warmup_start_factor=0.0)
    assert [linear.factor(t) for t in (0, 50, 100)] == pytest.approx([0.0, 0.5, 1.0])
    const = Schedule(total_steps=1000, warmup_steps=400, warmup_kind="constant", warmup_start_factor=0.1)
    assert [const.factor(t) for t in (0, 399, 400)] == pytest.approx([0.1, 0.1, 1.0])


def test_cosine_after_warmup():
    s = Schedule(total_steps=1100, warmup_steps=100, kind="cosine")
    assert s.factor(100) == pytest.approx(1.0)
    assert s.factor(600) == pytest.approx(0.5)
    assert s.factor(1100) == pytest.approx(0.0, abs=1e-12)
    assert s.factor(350) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
