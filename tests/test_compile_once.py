"""torch.compile compiles each shape once (issue 31): a 3-epoch resize-ramp run with a partial last
val batch costs one graph per train size and one for evaluation, counted by Dynamo itself."""

import pytest
import torch
from torch._dynamo.utils import counters

from imagenet_resnet.config import load_config
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.evaluation import padded
from imagenet_resnet.trainer import Trainer

pytestmark = pytest.mark.e2e


def test_a_resize_ramp_run_compiles_once_per_train_size_and_once_for_evaluation(imagenet_root, tmp_path,
                                                                                 monkeypatch):
    """Dynamo decides what to compile and when; its graphs go to the eager backend here (Inductor's
    code generation, a minute on this CPU, has no say in the count; `make bench` runs it with Inductor)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, dynamic=None: real_compile(
        model, backend="eager", dynamic=dynamic))
    cfg = load_config("configs/imagenet_resnet18.yaml", [
        f"data.root={imagenet_root}", f"run.out_dir={tmp_path}", "model.name=cifar_resnet20",  # small: quick to compile
        "data.batch_size=8", "data.image_size=32", "data.start_image_size=16", "data.resize_ramp_epochs=[0,1]",
        "data.val_image_size=32", "data.workers=0", "data.loader=torchvision", "schedule.epochs=3",
        "schedule.warmup_epochs=0", "run.compile=true", "run.device=cpu", "wandb.mode=disabled"])
    torch._dynamo.reset()
    counters.clear()
    records = Trainer(cfg, DistInfo(0, 0, 1, torch.device("cpu"))).fit()
    sizes = {r["train_image_size"] for r in records}
    assert sizes == {16, 32} and records[-1]["val_images"] % 8  # a partial last val batch
    assert counters["stats"]["unique_graphs"] == len(sizes) + 1, dict(counters["stats"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_padded_batch_keeps_its_images_and_memory_format(channels_last):

    images = torch.randn(3, 3, 5, 4)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    out = padded(images, 8)
    assert out.shape == (8, 3, 5, 4) and torch.equal(out[:3], images) and not out[3:].any()
    assert out.stride() == torch.empty(8, 3, 5, 4).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format).stride()
