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
    assert (cfg.schedule.epochs, cfg.optim.base_lr, cfg.schedule.milestones, cfg.run.compile) == (
        3,
        0.5,
        [0.3, 0.9],
        True,
    )
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
    proc = run_module(
        "imagenet_resnet.train", "--config", "configs/cifar10_resnet20.yaml", "data.bach_size=1", check=False
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "data.bach_size" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_module("imagenet_resnet.train", "--config", "configs/nope.yaml", check=False)
    assert proc.returncode == 2 and "configs/nope.yaml" in proc.stderr


def test_missing_cifar_names_the_path(tmp_path):
    proc = run_module("imagenet_resnet.train", "--config", "configs/cifar10_resnet20.yaml", f"data.root={tmp_path}",
                      "wandb.mode=disabled", "data.download=never", check=False)
    assert proc.returncode == 2 and "data.download=auto fetch" in proc.stderr
    assert str(tmp_path / "cifar-10-batches-py") in proc.stderr and "Traceback" not in proc.stderr


# --- every key's valid range (issue 15) -------------------------------------------------------------

# Bad values for every key: each must end in one `error:` line naming the key, exit status 2.
BAD_VALUES = {
    "model.name": ["resnet51", "''"],
    "model.zero_init_residual": ["maybe"],
    "model.sync_bn": ["perhaps"],
    "model.init_from": ["{folder}"],
    "model.freeze": ["everything", "up_to_stage:0"],
    "model.ema_decay": ["1", "-0.5"],
    "model.drop_path": ["1", "-0.1", "0.1"],  # 0.1: cifar_resnet20 has no stochastic depth
    "model.blurpool": ["maybe", "true"],  # true: nor BlurPool
    "data.dataset": ["imagenet21k"],
    "data.root": ["''"],
    "data.download": ["always"],
    "data.download_timeout_s": ["0", "nan", "soon"],
    "data.batch_size": ["0", "-3", "many"],
    "data.image_size": ["0", "4096"],
    "data.loader": ["ffcv"],
    "data.workers": ["-1", "many", "300"],
    "data.crop_padding": ["-1"],
    "data.start_image_size": ["8", "4096"],
    "data.resize_ramp_epochs": ["[3,1]", "[1]"],
    "data.val_image_size": ["8"],
    "data.val_crop_fraction": ["0", "1.5"],
    "data.val_flip_tta": ["sometimes"],
    "data.mixup_alpha": ["-0.1", "nan"],
    "data.cutmix_alpha": ["-1"],
    "data.auto_augment": ["rand-x3", "v0", "rand-m9-q2"],  # not a timm RandAugment string
    "data.interpolation": ["lanczos", "random"],  # random: training's only (data.train_interpolation)
    "data.train_interpolation": ["lanczos"],
    "data.val_crop_first": ["sometimes"],
    "data.repeated_augmentation_round": ["-1", "70000"],
    "data.crop_min_area": ["0", "1.5"],
    "data.repeated_augmentation": ["-1", "17", "2"],  # 2: the device loader of CIFAR samples by itself
    "optim.name": ["adam"],
    "optim.base_lr": ["-1", "0", "nan", "inf"],
    "optim.momentum": ["1", "-0.1"],
    "optim.nesterov": ["often"],
    "optim.weight_decay": ["-1e-4", "nan"],
    "optim.label_smoothing": ["1", "-0.1"],
    "optim.loss": ["mse"],
    "optim.bce_target_threshold": ["1", "-0.1"],
    "optim.lars_trust_coeff": ["0", "2"],
    "optim.accumulation_steps": ["0"],
    "optim.pretrained_lr_scale": ["-1", "inf"],
    "schedule.epochs": ["0", "-1"],
    "schedule.kind": ["exponential"],
    "schedule.poly_power": ["0", "nan"],
    "schedule.milestones": ["[0.75,0.5]", "[1.0]", "[0]", "[0.5,0.5]"],
    "schedule.gamma": ["0", "1.5"],
    "schedule.warmup_epochs": ["-1", "500", "nan"],
    "schedule.warmup_kind": ["cubic"],
    "schedule.warmup_start_factor": ["1.5", "-0.1"],
    "schedule.warmup_from_base_lr": ["sometimes"],
    "schedule.warmup_prefix": ["sometimes"],
    "schedule.per_epoch": ["sometimes"],
    "schedule.end_lr_factor": ["1", "-0.1", "0.001"],  # 0.001: the default schedule.kind=step has no end lr
    "run.out_dir": ["{file}", "''"],
    "run.seed": ["-1", "3000000000"],
    "run.device": ["tpu"],
    "run.precision": ["fp8"],
    "run.loss_scale": ["0.5", "inf"],
    "run.channels_last": ["sometimes"],
    "run.compile": ["maybe"],
    "run.compile_mode": ["fast"],
    "run.resume": ["{folder}"],
    "run.checkpoint_every_steps": ["-1"],
    "run.log_every_steps": ["0"],
    "run.eval_every_epochs": ["0", "-1", "many"],
    "run.lease_timeout_s": ["0.5", "inf"],
    "run.collective_timeout_s": ["1", "inf"],
    "run.on_world_size_change": ["guess"],
    "wandb.mode": ["cloud"],
    "wandb.project": ["''"],
    "wandb.init_timeout_s": ["0", "nan"],
    "wandb.tags": ["[" + "x" * 65 + "]", "['']"],
}
ANY_STRING = {"wandb.entity", "wandb.name", "wandb.group", "wandb.notes"}  # free text: no value is wrong

# Rules across keys: (overrides, the key the error must name).
CROSS_KEY = [
    (["optim.nesterov=true", "optim.momentum=0"], "optim.nesterov"),
    (["schedule.epochs=1", "schedule.warmup_epochs=2"], "schedule.warmup_epochs"),
    (["data.dataset=imagenet", "data.loader=device"], "data.loader"),
    (["data.dataset=cifar10", "data.loader=torchvision"], "data.loader"),
    (["data.dataset=mnist", "data.loader=dali"], "data.loader"),
    (["model.sync_bn=true", "run.device=cpu"], "model.sync_bn"),
    (["data.dataset=imagenet", "data.loader=auto", "data.image_size=224", "data.start_image_size=160",
      "data.resize_ramp_epochs=[10,20]", "schedule.epochs=5"], "data.resize_ramp_epochs"),
    (["data.mixup_alpha=0.2", "data.batch_size=7"], "data.batch_size"),
    (["data.auto_augment=rand-m9-mstd0.5-inc1"], "data.auto_augment"),  # the device loader of CIFAR has no RandAugment
    (["schedule.warmup_from_base_lr=true", "schedule.warmup_start_factor=0.1"], "schedule.warmup_from_base_lr"),
    (["data.val_image_size=64"], "data.val_image_size"),
    (["data.val_crop_first=true"], "data.val_crop_first"),  # CIFAR's device loader evaluates whole images
    (["data.train_interpolation=bicubic"], "data.train_interpolation"),
]


def leaf_keys(cls, prefix: str = "") -> list[str]:
    import dataclasses

    keys = []
    for f in dataclasses.fields(cls):
        inner = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(inner):
            keys += leaf_keys(inner, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_the_table_covers_every_config_key():
    assert sorted(BAD_VALUES) == sorted(set(leaf_keys(Config)) - ANY_STRING)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """The real `train` entry in this process (run_main included): exit status and stderr."""
    from imagenet_resnet.cli import run_main
    from imagenet_resnet.train import main

    with pytest.raises(SystemExit) as stop:
        run_main(lambda: main(argv))
    return stop.value.code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, key: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert key in lines[0], lines[0]


BAD_CASES = [(key, value) for key, values in BAD_VALUES.items() for value in values]


@pytest.mark.parametrize("key, value", BAD_CASES, ids=[f"{k}={v}" for k, v in BAD_CASES])
def test_each_bad_value_is_refused_naming_the_key(key, value, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    value = value.format(file=tmp_path / "a_file", folder=tmp_path / "a_folder")
    out = tmp_path / "run"
    overrides = [f"run.out_dir={out}"] if key != "run.out_dir" else []
    code, err = run_cli(["--config", "configs/cifar10_resnet20.yaml", *overrides, f"{key}={value}"], capsys)
    assert_one_error_line(code, err, key)
    assert not out.exists(), "nothing may be written before the config is valid"


@pytest.mark.parametrize("overrides, key", CROSS_KEY, ids=[" ".join(o) for o, _ in CROSS_KEY])
def test_rules_across_keys(overrides, key, tmp_path, capsys):
    code, err = run_cli(["--config", "configs/cifar10_resnet20.yaml", f"run.out_dir={tmp_path / 'run'}", *overrides],
                        capsys)
    assert_one_error_line(code, err, key)
    assert not (tmp_path / "run").exists()


def test_batch_size_against_the_data(cifar_root, tmp_path, capsys):
    """Known only once the data is read (600 images here): still refused before anything is written."""
    code, err = run_cli(["--config", "configs/cifar10_resnet20.yaml", f"data.root={cifar_root}", "data.batch_size=1000",
                         f"run.out_dir={tmp_path / 'run'}", "wandb.mode=disabled"], capsys)
    assert_one_error_line(code, err, "data.batch_size")
    assert not (tmp_path / "run").exists()


def test_an_override_error_names_the_override_not_the_recipe(capsys):
    code, err = run_cli(["--config", "configs/cifar10_resnet20.yaml", "optim.lr=0.1"], capsys)
    assert_one_error_line(code, err, "override 'optim.lr=0.1'")
    assert "cifar10_resnet20.yaml" not in err


def test_check_config_validates_without_training(imagenet_root, tmp_path):
    proc = run_module("imagenet_resnet.train", "--check-config", "--config", "configs/imagenet_resnet50.yaml",
                      f"data.root={imagenet_root}", "data.batch_size=8", f"run.out_dir={tmp_path / 'run'}")
    assert "config OK: model resnet50" in proc.stdout and not (tmp_path / "run").exists()
    proc = run_module("imagenet_resnet.train", "--check-config", "--config", "configs/imagenet_resnet50.yaml",
                      f"data.root={imagenet_root}", f"run.out_dir={tmp_path / 'run'}", check=False)  # batch 128
    assert proc.returncode == 2 and "no full step per epoch" in proc.stderr


def test_out_dir_that_is_a_file_in_a_real_process(tmp_path):
    """The issue's report, as a user meets it: a real process, exit 2, one line, no traceback."""
    (tmp_path / "passwd").write_text("root:x:0:0\n")
    proc = run_module("imagenet_resnet.train", "--config", "configs/cifar10_resnet20.yaml",
                      f"run.out_dir={tmp_path / 'passwd'}", check=False)
    assert_one_error_line(proc.returncode, proc.stderr, "run.out_dir")
    assert "exists and is not a folder" in proc.stderr


# Bad command-line flags of the other tools: (module, args, what the one error must name). argparse's
# own refusals print a usage line first; either way exit 2, the flag named, no traceback.
BAD_FLAGS = [
    (
        "imagenet_resnet.evaluate",
        ["--config", "configs/cifar10_resnet20.yaml", "--checkpoint", "{tmp}/none.pt"],
        "--checkpoint",
    ),
    (
        "imagenet_resnet.evaluate",
        ["--config", "configs/cifar10_resnet20.yaml", "--checkpoint", "{tmp}/x.pt", "optim.base_lr=0"],
        "optim.base_lr",
    ),
    ("imagenet_resnet.plot", ["{tmp}/x.pt"], "not a run folder"),
    ("imagenet_resnet.plot", ["{tmp}", "--out", "{tmp}/curves.txt"], "--out"),
    ("imagenet_resnet.plot", ["{tmp}", "--out", "{tmp}/missing/curves.png"], "--out"),
    ("benchmarks.bench", ["--only", "gpu-burn"], "gpu-burn"),
    ("benchmarks.bench", ["--models", "resnet51"], "resnet51"),
    ("benchmarks.bench", ["--out", "{tmp}/x.pt"], "--out"),
    (
        "data_prep.extract",
        ["--split", "train", "--archive", "{tmp}/x.pt", "--dest", "{tmp}", "--workers", "0"],
        "--workers",
    ),
    ("data_prep.extract", ["--split", "train", "--archive", "{tmp}/none.tar", "--dest", "{tmp}"], "--archive"),
    ("data_prep.finish", ["--dest", "{tmp}", "--src", "{tmp}", "--workers", "-2"], "--workers"),
    ("data_prep.devkit", ["--devkit", "{tmp}/none.tar.gz", "--dest", "{tmp}"], "--devkit"),
    ("data_prep.generate", ["--out", "{tmp}/g", "--classes", "0"], "--classes"),
    ("data_prep.generate", ["--out", "{tmp}/g", "--train-per-class", "9", "3"], "--train-per-class"),
]


@pytest.mark.parametrize("module, args, named", BAD_FLAGS, ids=[f"{m} {' '.join(a[-2:])}" for m, a, _ in BAD_FLAGS])
def test_bad_flags_of_the_other_tools(module, args, named, tmp_path):
    (tmp_path / "x.pt").write_bytes(b"x")
    proc = run_module(module, *[a.format(tmp=tmp_path) for a in args], check=False)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and named in errors[0], proc.stderr
    assert not (tmp_path / "g").exists()


# --- the pre-check and what each tool says of itself (issue 26) --------------------------------


def test_check_config_prints_the_plan(cifar_root, tmp_path):
    proc = run_module(
        "imagenet_resnet.train",
        "--check-config",
        "--nproc",
        "4",
        "--config",
        "configs/cifar10_resnet20.yaml",
        f"data.root={cifar_root}",
        f"run.out_dir={tmp_path / 'run'}",
        "data.batch_size=16",
        "optim.accumulation_steps=2",
        "schedule.epochs=10",
        "schedule.warmup_epochs=2",
    )
    assert "(600 train / 110 val images)" in proc.stdout
    # 600 images / 4 processes = 150 each; 9 batches of 16; 4 optimizer steps of 2 micro-batches
    assert ("plan: global batch 128 = 16 x 4 process(es) x 2 accumulation; lr 0.1 = base_lr 0.2 x 128/256; "
            "warmup 8 steps (2 epochs); 4 steps/epoch x 10 epochs = 40 steps") in proc.stdout
    assert not (tmp_path / "run").exists()  # the lease was taken and let go; nothing left behind


@pytest.mark.parametrize("dataset, root, named", [
    ("imagenet", "{tmp}/nowhere", "no such folder"),
    ("imagenet", "{folders}", "use data.dataset=folder"),
    ("imagenet", "{tmp}", "not a finished prepare-imagenet output"),
    ("folder", "{tmp}", "expects train/ and val/"),
    ("cifar10", "{tmp}", "cifar10 not found"),
])
def test_the_launch_script_stops_once_on_missing_data(tmp_path, dataset, root, named):
    import subprocess
    import sys

    from conftest import cli_env

    folders = tmp_path / "own_images"
    for split in ("train", "val"):
        (folders / split / "cat").mkdir(parents=True)
    config = "configs/cifar10_resnet20.yaml" if dataset == "cifar10" else "configs/demo_resnet18.yaml"
    proc = subprocess.run(["bash", "launch/single_node.sh", config, f"data.dataset={dataset}",
                           f"data.root={root.format(tmp=tmp_path, folders=folders)}", f"run.out_dir={tmp_path / 'run'}",
                           "data.download=never"],
                          cwd=REPO, env={**cli_env(), "NPROC": "2", "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and named in errors[0], proc.stderr[-2000:]
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr  # torchrun never started


def test_data_workers_auto_follows_the_cores_and_the_processes_on_the_node(monkeypatch):
    import os

    from imagenet_resnet.data.loader import loader_workers

    cores = len(os.sched_getaffinity(0))
    assert load_config(None).data.workers == "auto" and loader_workers("3") == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers("auto") == max(1, min(8, cores))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's processes on this node
    assert loader_workers("auto") == max(1, min(8, cores // 2))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))
    assert loader_workers("auto") == 1


ENTRY_POINTS = [
    "imagenet_resnet.train",
    "imagenet_resnet.evaluate",
    "imagenet_resnet.predict",
    "imagenet_resnet.export",
    "imagenet_resnet.plot",
    "benchmarks.bench",
    "imagenet_resnet.checkpoint",
    "data_prep.generate",
    "data_prep.devkit",
    "data_prep.extract",
    "data_prep.finish",
]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_names_the_command_and_every_option_says_what_it_does_and_its_default(module, monkeypatch, capsys):
    import argparse
    import importlib
    import sys

    from imagenet_resnet import cli

    made = []
    real = cli.command
    monkeypatch.setattr(cli, "command", lambda *a, **k: made.append(real(*a, **k)) or made[-1])  # records, still real
    entry = importlib.import_module(module)
    monkeypatch.setattr(entry, "command", cli.command, raising=False)
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as stop:
        entry.main()
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")
    (parser,) = made
    parsers = [parser] + [sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                          for sub in action.choices.values()]
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)  # "(default: ...)" after help
    for each in parsers:
        for action in each._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{module} {action.option_strings or action.dest}: no help text"
