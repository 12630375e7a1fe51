import pytest
import torch
from torch import nn

from imagenet_resnet.errors import UserError
from imagenet_resnet.models import CifarResNet, build_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "depth, expected, paper_millions",
    [(20, 269_722, 0.27), (32, 464_154, 0.46), (44, 658_586, 0.66), (56, 853_018, 0.85), (110, 1_727_962, 1.7)],
)
def test_cifar_resnet_parameter_counts_match_table_6(depth, expected, paper_millions):
    count = n_params(build_model(f"cifar_resnet{depth}", 10))
    assert count == expected
    assert round(count / 1e6, 2 if depth < 110 else 1) == paper_millions


def test_option_a_shortcut_has_no_parameters_and_pads_channels():
    model = CifarResNet(20, 10)
    block = model.layer2[0]  # first block of stage 2: stride 2, 16 -> 32 channels
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2]) and out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())


@pytest.mark.parametrize("name, expected", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_imagenet_resnet_parameter_counts(name, expected):
    assert n_params(build_model(name, 1000)) == expected


def test_seresnet50_parameter_count():
    assert round(n_params(build_model("seresnet50", 1000)) / 1e6, 2) == 28.09


def test_cifar_seresnet_has_se_with_reduction_16():
    model = build_model("cifar_seresnet20", 10)
    se = model.layer3[-1].se
    assert se.fc1.out_channels == 64 // 16 and se.fc1.in_channels == 64


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18", "seresnet18"])
def test_zero_init_residual_zeroes_each_blocks_last_bn(name):
    model = build_model(name, 10, zero_init_residual=True)
    last_bns = [m.bn2 if hasattr(m, "bn2") and not hasattr(m, "bn3") else m.bn3 for m in model.modules()
                if hasattr(m, "conv2") and hasattr(m, "bn2")]
    assert last_bns and all(bn.weight.abs().sum() == 0 for bn in last_bns)
    model = build_model(name, 10, zero_init_residual=False)
    assert all(bn.weight.abs().sum() > 0 for bn in (m.bn2 for m in model.modules() if hasattr(m, "bn2")))


@pytest.mark.parametrize("name, size", [("cifar_resnet20", 32), ("cifar_seresnet20", 32), ("resnet18", 64)])
def test_forward_shapes(name, size):
    assert build_model(name, 7)(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(UserError, match="resnet51"):
        build_model("resnet51", 10)
