from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_module
from imagenet_resnet.config import Config, load_config, save_config
from imagenet_resnet.errors import UserError
from imagenet_resnet.models import list_models


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_cites_a_source(path: Path):
    cfg = load_config(path)
    assert cfg.model.name in list_models()
    assert path.read_text().startswith("#"), "each recipe opens with a comment citing its source"


def test_overrides_are_typed_and_dotted():
    cfg = load_config(REPO / "configs/cifar10_resnet20.yaml", ["schedule.epochs=3", "optim.base_lr=0.5",
                                                               "schedule.milestones=[0.3,0.9]", "run.compile=true"])
    assert (cfg.schedule.epochs, cfg.optim.base_lr, cfg.schedule.milestones, cfg.run.compile) == (3, 0.5, [0.3, 0.9], True)
    assert isinstance(cfg, Config) and cfg.data.batch_size == 128


@pytest.mark.parametrize(
    "override, named",
    [
        ("data.batch_sise=3", "data.batch_sise"),
        ("modle.name=x", "modle"),
        ("data.batch_size=abc", "data.batch_size"),
        ("run.compile=maybe", "run.compile"),
        ("data.loader=ffcv", "data.loader"),
        ("schedule.milestones=[1.5]", "schedule.milestones"),
        ("epochs", "epochs"),
    ],
)
def test_bad_overrides_name_the_key(override, named):
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_yaml_key_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(UserError, match=r"bad\.yaml.*optim\.lr"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs/imagenet_resnet50.yaml", ["run.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["run"]["seed"] == 7
    assert load_config(tmp_path / "config.yaml") == cfg


def test_cli_rejects_bad_input_with_a_message_not_a_traceback():
    proc = run_module("imagenet_resnet.train", "--config", "configs/cifar10_resnet20.yaml", "data.bach_size=1", check=False)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "data.bach_size" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_module("imagenet_resnet.train", "--config", "configs/nope.yaml", check=False)
    assert proc.returncode == 2 and "configs/nope.yaml" in proc.stderr


def test_missing_cifar_names_the_path(tmp_path):
    proc = run_module("imagenet_resnet.train", "--config", "configs/cifar10_resnet20.yaml", f"data.root={tmp_path}",
                      "wandb.mode=disabled", check=False)
    assert proc.returncode == 2
    assert str(tmp_path / "cifar-10-batches-py") in proc.stderr and "Traceback" not in proc.stderr
