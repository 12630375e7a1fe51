"""The CUDA paths, on a machine with a GPU (skipped elsewhere, saying so).

bf16 autocast + channels_last + fused SGD, DALI's GPU decoder ("mixed") with its checkpointed
state, torch.compile including CUDA graphs (reduce-overhead). One GPU cannot hold an NCCL group
(NCCL refuses two ranks on one device), so the multi-process paths are tested on gloo elsewhere.

    PYTHONPATH=. python -m pytest -q tests/test_gpu.py    # needs DALI installed for the DALI tests
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import resumed_after, run_module
from imagenet_resnet.config import load_config
from imagenet_resnet.data import build_loaders
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.metrics import read_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def train(config: str, out, *overrides: str) -> tuple[str, list[dict]]:
    proc = run_module("imagenet_resnet.train", "--config", config, f"run.out_dir={out}", "wandb.mode=disabled",
                      "run.log_every_steps=1", *overrides, gpu=True)
    return proc.stdout, read_metrics(out)


@pytest.mark.parametrize("model", ["resnet18", "resnet50", "seresnet50"])
def test_imagenet_models_train_in_bf16_channels_last_from_dali_gpu_decode(imagenet_root, tmp_path, model):
    output, records = train("configs/imagenet_resnet50.yaml", tmp_path / "run", f"model.name={model}",
                            f"data.root={imagenet_root}", "data.loader=dali", "data.image_size=64",
                            "data.batch_size=16", "data.workers=2", "schedule.epochs=2", "schedule.warmup_epochs=0")
    assert "on cuda, bf16" in output
    assert [r["epoch"] for r in records] == [0, 1] and records[-1]["val_images"] == 21
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in records)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cifar_resnet_compiled_trains_saves_and_resumes(cifar_root, tmp_path, mode):
    out = tmp_path / "run"
    args = ["configs/cifar10_resnet20.yaml", out, f"data.root={cifar_root}", "run.compile=true",
            f"run.compile_mode={mode}"]
    _, first = train(*args, "schedule.epochs=3")
    state = torch.load(out / "last.pt", weights_only=True, map_location="cpu")
    assert not any("_orig_mod" in key for key in state["model"])  # loadable without torch.compile
    output, records = train(*args, "schedule.epochs=4")
    assert "resumed from" in output and [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["train_loss"] < first[0]["train_loss"]  # it learns, not just runs


def test_dali_gpu_decode_resumes_mid_epoch_with_the_same_images(imagenet_root):
    def loader():
        cfg = load_config(None, [f"data.root={imagenet_root}", "data.dataset=imagenet", "data.loader=dali",
                                 "data.image_size=32", "data.batch_size=4", "data.workers=2"])
        return build_loaders(cfg, DistInfo(0, 0, 1, torch.device("cuda", 0)), torch.bfloat16)[0]

    full_run = loader()
    full_run.set_position(1)
    full = list(full_run)
    rest = resumed_after(loader, epoch=1, steps=2)
    assert rest[0][0].is_cuda and rest[0][0].dtype == torch.bfloat16
    assert rest[0][0].is_contiguous(memory_format=torch.channels_last)
    assert len(rest) == len(full) - 2
    assert all(torch.equal(x, fx) and torch.equal(y, fy) for (x, y), (fx, fy) in zip(rest, full[2:]))


def test_torchvision_batches_reach_the_gpu_a_batch_ahead_on_a_side_stream_unchanged(imagenet_root):
    """ahead_on_device: the same normalised batches as on the CPU, in the model's dtype and layout."""
    cfg = load_config(None, [f"data.root={imagenet_root}", "data.dataset=imagenet", "data.loader=torchvision",
                             "data.image_size=32", "data.batch_size=4", "data.workers=2"])
    on_cpu = list(build_loaders(cfg, DistInfo(0, 0, 1, torch.device("cpu")), torch.float32)[1])
    on_gpu = list(build_loaders(cfg, DistInfo(0, 0, 1, torch.device("cuda", 0)), torch.float32)[1])
    assert all(x.is_cuda and x.is_contiguous(memory_format=torch.channels_last) for x, _ in on_gpu)
    for (x, y), (gx, gy) in zip(on_cpu, on_gpu, strict=True):
        torch.testing.assert_close(gx.cpu(), x, rtol=0, atol=1e-5)
        assert torch.equal(gy.cpu(), y)


def test_bench_runs_every_gpu_configuration_and_profiles_the_fastest(tmp_path):
    run_module("benchmarks.bench", "--out", str(tmp_path), "--quick", "--only", "model", timeout=1200, gpu=True)
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert all(r["value"] and r["value"] > 0 for r in records if r["section"] == "model")  # nothing skipped
    busy = [r["value"] for r in records if r["name"].endswith("GPU busy")]
    assert len(busy) == 1 and 0 < busy[0] <= 105  # kernel time per step against the unprofiled step time
