"""No data file runs code (issue 34): CIFAR's pickles are read by a restricted unpickler that builds
plain values and NumPy arrays only, and refuses anything else in one line naming the file and the
global, before any of it runs."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_module
from imagenet_resnet.config import load_config
from imagenet_resnet.data.datasets import class_names, read_cifar
from imagenet_resnet.errors import UserError
from test_integrity import one_error_line


class Payload:
    """Unpickling this calls os.system: a marker file appears only if the load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_copy(cifar_root: Path, tmp_path: Path, name: str, replace) -> Path:
    root = tmp_path / "data"
    shutil.copytree(cifar_root, root)
    path = root / "cifar-10-batches-py" / name
    with open(path, "rb") as f:
        content = pickle.load(f, encoding="latin1")
    with open(path, "wb") as f:
        pickle.dump(replace(content), f, protocol=2)
    return root


@pytest.mark.parametrize("name", ["data_batch_1", "batches.meta"])
def test_a_cifar_file_whose_pickle_runs_code_is_refused_and_nothing_runs(cifar_root, tmp_path, name):
    marker = tmp_path / "marker"
    root = hostile_copy(cifar_root, tmp_path, name, lambda content: {**content, "extra": Payload(marker)})
    cfg = load_config("configs/cifar10_resnet20.yaml", [f"data.root={root}", "data.download=never"])
    read = read_cifar if name.startswith("data_batch") else lambda root, _: class_names(cfg)
    with pytest.raises(UserError, match=f"{name}: refused: .* would call posix.system.*nothing from it was run"):
        read(root, "cifar10")
    assert not marker.exists()


def test_training_on_a_hostile_cifar_folder_stops_in_one_line_before_it_runs_anything(cifar_root, tmp_path):
    marker = tmp_path / "marker"
    root = hostile_copy(cifar_root, tmp_path, "data_batch_1", lambda content: {**content, "x": Payload(marker)})
    proc = run_module("imagenet_resnet.train", "--config", "configs/cifar10_resnet20.yaml", f"data.root={root}",
                      "data.download=never", f"run.out_dir={tmp_path / 'run'}", "wandb.mode=disabled", check=False)
    one_error_line(proc, "data_batch_1", "refused", "posix.system")
    assert not marker.exists() and not (tmp_path / "run" / "last.pt").exists()


def test_the_released_format_still_loads_bytes_and_arrays_at_protocol_2(cifar_root, tmp_path):
    """What CIFAR's release holds, as pickle.dump writes it at protocol 2 from Python 3: bytes go
    through _codecs.encode, the array through NumPy's _reconstruct."""
    def released(content):
        return {"batch_label": b"training batch 1 of 5", "labels": list(content["labels"]),
                "data": np.asarray(content["data"], dtype=np.uint8),
                "filenames": [name.encode() for name in content["filenames"]]}
    root = hostile_copy(cifar_root, tmp_path, "data_batch_1", released)
    train_x, train_y, _, _ = read_cifar(root, "cifar10")
    expected_x, expected_y, _, _ = read_cifar(cifar_root, "cifar10")
    assert (train_x == expected_x).all() and (train_y == expected_y).all()


def test_a_codec_other_than_latin1_is_refused(cifar_root, tmp_path):
    class OtherCodec:
        def __reduce__(self):
            import _codecs
            return _codecs.encode, ("abc", "rot13")

    root = hostile_copy(cifar_root, tmp_path, "data_batch_1", lambda content: {**content, "x": OtherCodec()})
    with pytest.raises(UserError, match="not a cifar10 batch file.*rot13"):
        read_cifar(root, "cifar10")


# --- every other reader of a user's bytes: a crafted file, no marker, one line, exit 2 -----------


class RunsCode:
    """Unpickling this calls open(marker, "w"): the file appears only if the load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_recipe_with_a_python_yaml_tag_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "marker"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"run:\n  seed: !!python/object/apply:os.system [\"touch {marker}\"]\n")
    proc = run_module("imagenet_resnet.train", "--check-config", "--config", str(recipe), check=False)
    one_error_line(proc, str(recipe), "not valid YAML")
    assert not marker.exists()


def test_a_crafted_file_in_torch_hubs_cache_is_refused_not_run(imagenet_root, tmp_path):
    """Its sha256 is not the one its name says (torch hub checks that on download only): refused
    before it is unpickled."""
    import torch
    import torchvision

    marker = tmp_path / "marker"
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    torch.save({"fc.bias": RunsCode(marker)}, cached)
    proc = run_module("imagenet_resnet.evaluate", "--pretrained", "torchvision:resnet18.IMAGENET1K_V1",
                      f"data.root={imagenet_root}", "data.workers=0", check=False,
                      env={"TORCH_HOME": str(tmp_path / "torch")})
    one_error_line(proc, str(cached), "is not the published file", "nothing from it was used")
    assert not marker.exists()


def test_a_crafted_pickle_in_hugging_faces_cache_is_refused_not_run(imagenet_root, tmp_path):
    import torch

    marker = tmp_path / "marker"
    snapshot = tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    torch.save({"fc.bias": RunsCode(marker)}, snapshot / "pytorch_model.bin")  # no safetensors: timm's fallback
    proc = run_module("imagenet_resnet.evaluate", "--pretrained", "timm:resnet18.a1_in1k",
                      f"data.root={imagenet_root}", "data.workers=0", check=False,
                      env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    one_error_line(proc, "timm:resnet18.a1_in1k", "refused", "nothing from them was run")
    assert not marker.exists()


# --- decoders: an image over the pixel bound is refused from its header, never decoded ----------


def bomb_png(path: Path, side: int = 8200) -> Path:
    """A black PNG of side x side pixels (over MAX_IMAGE_PIXELS): a few hundred KB that would decode
    to 200 MB."""
    from PIL import Image

    Image.new("L", (side, side)).save(path, optimize=True)
    return path


@pytest.fixture(scope="module")
def folder_with_a_bomb(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 32), (60 * i, 90, 30)).save(root / split / cls / f"{i}.jpg")
    bomb_png(root / "train" / "b" / "9.png")
    return root


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_both_loaders_refuse_an_image_over_the_pixel_bound_naming_it(folder_with_a_bomb, tmp_path, loader):
    proc = run_module("imagenet_resnet.train", "--config", "configs/imagenet_resnet18.yaml",
                      f"data.root={folder_with_a_bomb}", "data.dataset=folder", f"data.loader={loader}",
                      "data.batch_size=4", "data.image_size=32", "data.workers=1", "schedule.epochs=1",
                      "schedule.warmup_epochs=0",
                      "run.device=cpu", "wandb.mode=disabled", f"run.out_dir={tmp_path / 'run'}", check=False)
    one_error_line(proc, "9.png", "8200 x 8200 pixels, more than the 64,000,000")


def test_prepare_imagenet_reports_an_image_over_the_bound_as_unreadable(tmp_path):
    from data_prep.extract import problem

    data = bomb_png(tmp_path / "big.png").read_bytes()
    assert problem(data) == "unreadable: 8200 x 8200 pixels, more than the 64,000,000 the loaders decode"


@pytest.mark.parametrize("content", ["garbage", "wrong keys"])
def test_a_damaged_hugging_face_cache_is_one_line(imagenet_root, tmp_path, content):
    import torch
    from safetensors.torch import save_file

    snapshot = tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    if content == "garbage":
        (snapshot / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    else:
        save_file({"not.a.resnet.key": torch.zeros(3)}, str(snapshot / "model.safetensors"))
    proc = run_module("imagenet_resnet.evaluate", "--pretrained", "timm:resnet18.a1_in1k",
                      f"data.root={imagenet_root}", "data.workers=0", check=False,
                      env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    one_error_line(proc, "timm:resnet18.a1_in1k", "could not load timm's weights")
