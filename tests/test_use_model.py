"""A trained model people can use: predict and export (issue 14), on real checkpoints from real runs."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file as load_safetensors

from conftest import run_module
from data_prep.generate import CIFAR10_NAMES
from imagenet_resnet.config import load_config
from imagenet_resnet.data import build_loaders
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.finetune import load_init_from
from imagenet_resnet.inference import load_trained
from imagenet_resnet.models import build_model
from test_integrity import one_error_line

pytestmark = pytest.mark.e2e


def trained(root: Path, out: Path, config: str, *extra: str) -> Path:
    run_module("imagenet_resnet.train", "--config", config, f"data.root={root}", f"run.out_dir={out}",
               "schedule.epochs=1", "schedule.warmup_epochs=0", "wandb.mode=disabled", *extra)
    return out / "last.pt"


@pytest.fixture(scope="module")
def resnet18(imagenet_root, tmp_path_factory) -> Path:
    return trained(imagenet_root, tmp_path_factory.mktemp("resnet18"), "configs/imagenet_resnet18.yaml",
                   "data.loader=torchvision", "data.image_size=32", "data.batch_size=16", "data.workers=1")


@pytest.fixture(scope="module")
def seresnet18(imagenet_root, tmp_path_factory) -> Path:
    return trained(imagenet_root, tmp_path_factory.mktemp("seresnet18"), "configs/imagenet_seresnet18.yaml",
                   "data.loader=torchvision", "data.image_size=32", "data.batch_size=16", "data.workers=1")


@pytest.fixture(scope="module")
def cifar(cifar_root, tmp_path_factory) -> Path:
    return trained(cifar_root, tmp_path_factory.mktemp("cifar"), "configs/cifar10_resnet20.yaml", "data.batch_size=64")


def synset_words(root: Path) -> list[str]:
    return [line.split(" ", 2)[2] for line in (root / "synsets.txt").read_text().splitlines()]


# --- predict ----------------------------------------------------------------------------------


def test_predict_matches_evaluation_of_the_same_images_and_names_the_classes(resnet18, imagenet_root):
    val = [line.rpartition(" ")[0] for line in (imagenet_root / "val.txt").read_text().splitlines()][:6]
    files = [str(imagenet_root / "val" / name) for name in val]
    proc = run_module("imagenet_resnet.predict", "--checkpoint", str(resnet18), *files, "--json", "--batch-size", "4")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [row["file"] for row in rows] == files and all(len(row["top"]) == 5 for row in rows)

    # The same images through the val loader that evaluation uses, and the same weights.
    cfg = load_config(resnet18.parent / "config.yaml", ["data.batch_size=6", "data.workers=0"])
    _, val_loader, _ = build_loaders(cfg, DistInfo(0, 0, 1, torch.device("cpu")), torch.float32)
    images, _ = next(iter(val_loader))
    net = load_trained(resnet18).net
    with torch.no_grad():
        want = net(images).softmax(dim=1).topk(5, dim=1)
    names = synset_words(imagenet_root)
    for row, probs, labels in zip(rows, want.values.tolist(), want.indices.tolist()):
        assert [t["label"] for t in row["top"]] == labels
        assert [t["probability"] for t in row["top"]] == pytest.approx(probs, abs=1e-5)
        assert [t["name"] for t in row["top"]] == [names[label] for label in labels]

    folder = imagenet_root / "val" / Path(val[0]).parent.name
    lines = run_module("imagenet_resnet.predict", "--checkpoint", str(resnet18), str(folder)).stdout.splitlines()
    assert len(lines) == len(list(folder.iterdir()))
    assert all(
        re.fullmatch(rf"{re.escape(str(folder))}/\S+: (.+ \d+\.\d%, ){{4}}.+ \d+\.\d%", line) for line in lines
    ), lines


def test_predict_on_a_cifar_checkpoint_uses_the_dataset_class_names(cifar, tmp_path):
    image = tmp_path / "photo.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(image)  # any size: resized and cropped as evaluation does
    row = json.loads(run_module("imagenet_resnet.predict", "--checkpoint", str(cifar), str(image), "--json",
                                "--top", "3").stdout)
    assert len(row["top"]) == 3 and all(t["name"] == CIFAR10_NAMES[t["label"]] for t in row["top"])
    assert sum(t["probability"] for t in row["top"]) <= 1 + 1e-6


def test_predict_and_export_refuse_bad_input_naming_it(cifar, tmp_path):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not a picture")
    one_error_line(run_module("imagenet_resnet.predict", "--checkpoint", str(cifar), str(not_image), check=False),
                   str(not_image), "not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(run_module("imagenet_resnet.predict", "--checkpoint", str(cifar), str(empty), check=False),
                   str(empty), "no image files")
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # weights, not a training checkpoint
    one_error_line(run_module("imagenet_resnet.export", "--checkpoint", str(weights), "--format", "onnx",
                              "--out", str(tmp_path / "x.onnx"), check=False), str(weights), "not a checkpoint")
    one_error_line(run_module("imagenet_resnet.export", "--checkpoint", str(cifar), "--format", "onnx", "--out",
                              str(tmp_path / "x.onnx"), "--weights", "ema", check=False), str(cifar), "no EMA weights")
    bad_format = run_module("imagenet_resnet.export", "--checkpoint", str(cifar), "--format", "tflite", "--out",
                            str(tmp_path / "x"), check=False)
    assert bad_format.returncode == 2 and "--format: invalid choice: 'tflite'" in bad_format.stderr
    one_error_line(run_module("imagenet_resnet.export", "--checkpoint", str(cifar), "--format", "onnx", "--out",
                              str(tmp_path / "no" / "x.onnx"), check=False), "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes.jpg", "resnet18.pth"]  # nothing half-written


# --- export -----------------------------------------------------------------------------------


def exported(checkpoint: Path, fmt: str, out: Path, *extra: str) -> Path:
    run_module("imagenet_resnet.export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out), *extra)
    return out


def logits(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(images)


def test_safetensors_load_strictly_into_the_torchvision_and_timm_models(resnet18, seresnet18, tmp_path):
    images = torch.randn(2, 3, 32, 32)
    for checkpoint, library_model in ((resnet18, torchvision.models.resnet18(num_classes=7)),
                                      (seresnet18, timm.create_model("seresnet18", num_classes=7))):
        state = load_safetensors(
            exported(checkpoint, "safetensors", tmp_path / f"{checkpoint.parent.name}.safetensors")
        )
        library_model.load_state_dict(state, strict=True)
        assert torch.equal(logits(library_model, images), logits(load_trained(checkpoint).net, images))


def test_torchscript_and_onnx_give_pytorchs_logits(resnet18, tmp_path):
    import onnxruntime

    images = torch.randn(5, 3, 32, 32)  # another batch size than the export's example: the batch axis is dynamic
    want = logits(load_trained(resnet18).net, images)
    scripted = torch.jit.load(str(exported(resnet18, "torchscript", tmp_path / "model.pt")))
    assert torch.allclose(scripted(images), want, atol=1e-5)
    proc = run_module("imagenet_resnet.export", "--checkpoint", str(resnet18), "--format", "onnx",
                      "--out", str(tmp_path / "model.onnx"))
    assert "onnxruntime matches PyTorch" in proc.stdout
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # the stated tolerance: 1e-4 of the largest logit


def test_ema_weights_are_exported_when_asked(cifar, tmp_path):
    state = torch.load(cifar, weights_only=True)
    state["model_ema"] = {k: v * 0.5 if v.is_floating_point() else v for k, v in state["model"].items()}
    with_ema = tmp_path / "ema.pt"
    torch.save(state, with_ema)
    plain = load_safetensors(exported(with_ema, "safetensors", tmp_path / "model.safetensors"))
    ema = load_safetensors(exported(with_ema, "safetensors", tmp_path / "ema.safetensors", "--weights", "ema"))
    assert torch.equal(plain["fc.weight"], state["model"]["fc.weight"])
    assert torch.equal(ema["fc.weight"], state["model_ema"]["fc.weight"])
    net = build_model("cifar_resnet20", 10)
    load_init_from(net, tmp_path / "ema.safetensors")  # an export is a model.init_from for fine-tuning
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state["model_ema"].items())


# --- issue 21: what export may write, what its metadata promises, what predict reads ---------


def test_export_writes_only_a_new_file_or_a_writable_regular_one(cifar, tmp_path):
    target = tmp_path / "target.safetensors"
    target.write_bytes(b"precious")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    device = tmp_path / "full"
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # /dev/full's numbers, in a temp folder
    read_only = tmp_path / "read_only.safetensors"
    read_only.write_bytes(b"keep")
    read_only.chmod(0o444)
    copy = tmp_path / "best.pt"
    copy.write_bytes(cifar.read_bytes())
    cases = {link: "symbolic link", fifo: "not a regular file", device: "not a regular file",
             read_only: "read-only", copy: "is the checkpoint being exported"}
    for out, why in cases.items():
        proc = run_module("imagenet_resnet.export", "--checkpoint", str(copy), "--format", "torchscript", "--out",
                          str(out), check=False)
        one_error_line(proc, f"--out {out}", why)
    assert link.is_symlink() and target.read_bytes() == b"precious" and stat.S_ISFIFO(fifo.lstat().st_mode)
    assert stat.S_ISCHR(device.lstat().st_mode) and read_only.read_bytes() == b"keep"
    assert copy.read_bytes() == cifar.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]

    umask = os.umask(0)
    os.umask(umask)
    for fmt in ("safetensors", "torchscript"):  # a new file: the umask's mode, whatever the writer library does
        assert exported(cifar, fmt, tmp_path / f"new.{fmt}").stat().st_mode & 0o777 == 0o666 & ~umask
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"old")
    existing.chmod(0o640)
    exported(cifar, "safetensors", existing)  # an existing regular file is replaced and keeps its mode
    assert existing.stat().st_mode & 0o777 == 0o640 and load_safetensors(existing)


def test_a_blurpool_export_names_the_network_it_is(resnet18, tmp_path):
    """ffcv's BlurPool has no library version: the metadata names this project's builder, whose
    network takes the weights strictly with the same logits; torchvision's ResNet refuses them."""
    state = torch.load(resnet18, weights_only=True)
    state["config"]["model"]["blurpool"] = True
    net = build_model("resnet18", 7, blurpool=True)
    plain = state["model"]  # the wrapped convs' weights under their new keys, the blur filters as built
    state["model"] = {k: plain.get(k.replace(".conv.weight", ".weight"), v) for k, v in net.state_dict().items()}
    blurpool = tmp_path / "blurpool.pt"
    torch.save(state, blurpool)
    images = torch.randn(2, 3, 64, 64)
    plain_meta = safe_open_metadata(exported(resnet18, "safetensors", tmp_path / "plain.safetensors"))
    assert plain_meta["loads_into"] == "torchvision.models.resnet18(num_classes=7)"
    out = exported(blurpool, "safetensors", tmp_path / "blur.safetensors")
    meta = safe_open_metadata(out)
    assert meta["loads_into"] == "imagenet_resnet.models.build_model('resnet18', num_classes=7, blurpool=True)"
    assert json.loads(meta["architecture"]) == {"model": "resnet18", "in_chans": 3, "drop_path": 0.0, "blurpool": True}
    want = logits(load_trained(blurpool).net, images)
    named = build_model("resnet18", num_classes=7, blurpool=True)
    named.load_state_dict(load_safetensors(out), strict=True)
    assert torch.equal(logits(named, images), want)
    with pytest.raises(RuntimeError, match="blur_filter"):
        torchvision.models.resnet18(num_classes=7).load_state_dict(load_safetensors(out), strict=True)


def safe_open_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_predict_scales_16_bit_images_and_reads_any_file_name(cifar, tmp_path):
    import numpy as np

    gray = np.random.RandomState(0).randint(0, 256, (40, 50), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "eight.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # the same picture in 16 bits
    odd_name = tmp_path / os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    odd_name.write_bytes((tmp_path / "eight.png").read_bytes())
    rows = {row["file"]: row["top"] for row in map(json.loads, run_module(
        "imagenet_resnet.predict", "--checkpoint", str(cifar), str(tmp_path), "--json").stdout.splitlines())}
    assert rows[str(tmp_path / "sixteen.png")] == rows[str(tmp_path / "eight.png")]
    assert rows[f"{tmp_path}/caf\\xe9.png"] == rows[str(tmp_path / "eight.png")]
    text = run_module("imagenet_resnet.predict", "--checkpoint", str(cifar), str(odd_name)).stdout
    assert text.startswith(f"{tmp_path}/caf\\xe9.png: ")


def test_predict_decodes_large_jpegs_reduced_and_refuses_images_over_the_pixel_limit(cifar, tmp_path):
    big_jpeg, big_png = tmp_path / "big.jpg", tmp_path / "big.png"
    Image.new("RGB", (4000, 3000), (120, 60, 30)).save(big_jpeg)  # 12 MP; at 1/8 scale 500x375
    Image.new("RGB", (1200, 1000), (120, 60, 30)).save(big_png)  # 1.2 MP, and PNG has no reduced decoding
    limit = ["--max-pixels", "1000000"]  # below the JPEG's full size: only its reduced decoding fits
    row = json.loads(run_module("imagenet_resnet.predict", "--checkpoint", str(cifar), str(big_jpeg), "--json",
                                *limit).stdout)
    assert len(row["top"]) == 5 and row["file"] == str(big_jpeg)
    proc = run_module("imagenet_resnet.predict", "--checkpoint", str(cifar), str(big_png), *limit, check=False)
    one_error_line(proc, str(big_png), "1200x1000 pixels is more than --max-pixels 1,000,000")
