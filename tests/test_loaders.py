"""The torchvision and DALI (CPU mode) loaders on a prepared ImageNet-layout folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from conftest import resumed_after
from imagenet_resnet.config import load_config
from imagenet_resnet.data import build_loaders
from imagenet_resnet.distributed import DistInfo

CPU = torch.device("cpu")


def loaders(root, loader, rank=0, world=1, batch=4, extra=(), dtype=torch.float32):
    cfg = load_config(
        None,
        [
            f"data.root={root}",
            "data.dataset=imagenet",
            f"data.loader={loader}",
            "data.image_size=32",
            f"data.batch_size={batch}",
            "data.workers=1",
            *extra,
        ],
    )
    return build_loaders(cfg, DistInfo(rank, rank, world, CPU), dtype)


def test_dali_and_torchvision_give_the_same_file_the_same_label(imagenet_root):
    tv_val = [b for b in loaders(imagenet_root, "torchvision")[1]]
    dali_val = [b for b in loaders(imagenet_root, "dali")[1]]
    tv_labels = torch.cat([y for _, y in tv_val])
    assert torch.equal(tv_labels, torch.cat([y for _, y in dali_val]))
    folder = ImageFolder(str(imagenet_root / "val"))
    assert tv_labels.tolist() == [label for _, label in sorted(folder.samples)]  # ImageFolder's indices
    tv_images, dali_images = torch.cat([x for x, _ in tv_val]), torch.cat([x for x, _ in dali_val])
    assert tv_images.shape == dali_images.shape == (21, 3, 32, 32)
    # Same files in the same order: the two resize implementations differ by little, other images by much.
    same = (tv_images - dali_images).abs().mean()
    shifted = (tv_images - dali_images.roll(1, 0)).abs().mean()
    assert same < 0.25 < shifted


def test_dali_normalises_in_its_pipeline_as_the_one_op_normaliser_does(imagenet_root):
    """float32: crop_mirror_normalize normalises; bfloat16 (no DALI type): uint8 out, then the
    loader's addcmul. Both give the same images, to bfloat16's precision."""
    val = loaders(imagenet_root, "dali")[1]
    in_dali = torch.cat([x for x, _ in val])
    first = torch.from_numpy(np.asarray(val._pipeline(32).run()[0].as_tensor()))  # the pipeline's own output
    assert torch.equal(first, in_dali[:4])
    by_torch = torch.cat([x for x, _ in loaders(imagenet_root, "dali", dtype=torch.bfloat16)[1]])
    assert in_dali.dtype == torch.float32 and by_torch.dtype == torch.bfloat16
    torch.testing.assert_close(by_torch.float(), in_dali, rtol=2**-8, atol=1e-5)


def test_dali_builds_its_val_pipeline_once_and_each_pass_gives_the_same_batches(imagenet_root):
    _, val, _ = loaders(imagenet_root, "dali", rank=1, world=2, batch=4)  # 11 images: a partial last batch
    first = [(x.clone(), y.clone()) for x, y in val]
    built = val.evaluation
    for _ in range(2):  # as the model's and then the EMA's evaluation, and the next epoch's
        again = list(val)
        assert val.evaluation is built  # restarted, not rebuilt
        assert [len(y) for _, y in again] == [4, 4, 3]
        assert all(torch.equal(a, b) and torch.equal(p, q) for (a, p), (b, q) in zip(first, again))


def test_dali_builds_its_train_pipeline_once_per_size_and_takes_each_epochs_order_from_the_sampler(imagenet_root):
    """Progressive resizing 32 px (epochs 0-1) to 64 (epoch 2): two pipelines in three epochs; each
    epoch's labels are TrainSampler's order for it, and a run resumed from the state() saved at an
    epoch's end (or at its last step) gets the very next epoch."""
    ramp = ("data.start_image_size=32", "data.image_size=64", "data.resize_ramp_epochs=[1,2]")
    train = loaders(imagenet_root, "dali", extra=ramp)[0]
    labels = [label for _, label in train.samples]
    built, sizes, epochs, states = [], [], [], []
    for epoch in range(3):
        train.set_position(epoch)
        batches = list(train)
        built.append(train.batches)
        sizes.append(batches[0][0].shape[-1])
        epochs.append(batches)
        states.append(train.state())
        assert torch.cat([y for _, y in batches]).tolist() == [labels[i] for i in train.sampler.order(epoch)[0]]
    assert sizes == [32, 32, 64] and built[0] is built[1] is not built[2]
    for stop in ((1, 0), (0, train.steps_per_epoch)):  # saved after epoch 0 as (1, 0) or as (0, last step)
        resumed = loaders(imagenet_root, "dali", extra=ramp)[0]
        resumed.restore(states[0])
        if stop != (1, 0):
            resumed.set_position(*stop)
            assert list(resumed) == []
        resumed.set_position(1)
        again = list(resumed)
        assert resumed.source.first == (0, 0)  # rebuilt where the saved pipeline was built, from its checkpoint
        assert all(torch.equal(x, a) and torch.equal(y, b) for (x, y), (a, b) in zip(again, epochs[1], strict=True))


@pytest.mark.parametrize("kind", ["torchvision", "dali"])
def test_val_counts_each_image_once_over_uneven_shards(imagenet_root, kind):
    counts = []
    for rank in range(4):
        _, val, _ = loaders(imagenet_root, kind, rank, world=4, batch=2)
        counts.append(sum(len(y) for _, y in val))
    assert counts == [5, 5, 5, 6]


@pytest.mark.parametrize("kind", ["torchvision", "dali"])
def test_train_epoch_shapes_ranks_and_exact_resume(imagenet_root, kind):
    train0 = loaders(imagenet_root, kind, 0, world=2)[0]
    train1 = loaders(imagenet_root, kind, 1, world=2)[0]
    n = train0.num_images
    assert train0.steps_per_epoch == train1.steps_per_epoch == (n // 2) // 4
    train0.set_position(1)
    full = list(train0)
    assert len(full) == train0.steps_per_epoch and all(len(y) == 4 for _, y in full)
    # A checkpoint after 2 batches: a new loader given the saved state() continues with the very
    # same augmented images (torchvision: per-image seeds; DALI: its checkpointed RNG and reader).
    rest = resumed_after(lambda: loaders(imagenet_root, kind, 0, world=2)[0], epoch=1, steps=2)
    assert len(rest) == len(full) - 2
    assert all(torch.equal(x, fx) and torch.equal(y, fy) for (x, y), (fx, fy) in zip(rest, full[2:]))
    # Without a state (a resume on another world size): the same files in the same order.
    bare = loaders(imagenet_root, kind, 0, world=2)[0]
    bare.set_position(1, start_step=2)
    assert [y.tolist() for _, y in bare] == [y.tolist() for _, y in full[2:]]


def test_the_torchvision_loader_moves_the_next_batch_before_handing_over_the_current():
    """One batch ahead (on CUDA its copy and normalisation run on a side stream meanwhile)."""
    from imagenet_resnet.data.loader import Normalizer
    from imagenet_resnet.data.torchvision_loader import ahead_on_device

    moved = []  # the batches normalised on the device so far

    def normalize(images):
        moved.append(int(images[0, 0, 0, 0]))
        return Normalizer.create((0.0,) * 3, (1 / 255,) * 3, CPU, torch.float32, False)(images)

    host_batches = ((torch.full((1, 3, 2, 2), k, dtype=torch.uint8), torch.tensor([k])) for k in range(3))
    seen = [(labels.item(), list(moved)) for _, labels in ahead_on_device(host_batches, CPU, normalize)]
    assert seen == [(0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2])]


def test_a_slow_loader_that_is_decoding_is_not_taken_for_a_stuck_one(imagenet_root):
    """Each batch takes 2.4 s with a 1 s timeout: the workers keep finishing images, so it waits."""
    import time

    from torch.utils.data import DataLoader

    from imagenet_resnet.data.datasets import read_file_lists
    from imagenet_resnet.data.loader import Normalizer
    from imagenet_resnet.data.torchvision_loader import HostLoader, ImageFileDataset

    def slow(size: int):
        def transform(image: torch.Tensor) -> torch.Tensor:
            time.sleep(0.3)
            return image[:, :16, :16]
        return transform

    samples, _ = read_file_lists(imagenet_root)
    dataset = ImageFileDataset(imagenet_root / "val", samples["val"], slow, workers=1)
    loader = DataLoader(dataset, batch_size=8, sampler=[(i, 0, 0) for i in range(16)], num_workers=1, timeout=1)
    cpu = torch.device("cpu")
    host = HostLoader(loader, Normalizer.create((0.5,) * 3, (0.5,) * 3, cpu, torch.float32, False), cpu, 16, 2,
                      split="val")
    batches = list(host)
    assert [images.shape for images, _ in batches] == [(8, 3, 16, 16)] * 2
