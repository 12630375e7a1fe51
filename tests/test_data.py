import pytest
import torch

from imagenet_resnet.data.datasets import read_cifar
from imagenet_resnet.data.device_loader import DeviceLoader
from imagenet_resnet.data.loader import Normalizer
from imagenet_resnet.data.sampling import TrainSampler, shard_range
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.errors import UserError

CPU = torch.device("cpu")


def dist(rank: int = 0, world: int = 1) -> DistInfo:
    return DistInfo(rank, rank, world, CPU)


def identity() -> Normalizer:
    return Normalizer.create((0.0,) * 3, (1 / 255,) * 3, torch.device("cpu"), torch.float32, channels_last=False)


@pytest.mark.parametrize("n, world", [(10, 3), (7, 2), (2, 4), (50_000, 8)])
def test_val_shards_cover_every_item_once(n, world):
    seen = [i for r in range(world) for i in shard_range(n, r, world)]
    assert seen == list(range(n))


def test_train_sampler_ranks_are_disjoint_and_epochs_differ():
    a = TrainSampler(103, dist(0, 2), seed=1, batch_size=10)
    b = TrainSampler(103, dist(1, 2), seed=1, batch_size=10)
    a.set_position(0), b.set_position(0)
    ia, ib = a.indices(), b.indices()
    assert len(ia) == len(ib) == 50 and not set(ia) & set(ib)
    a.set_position(1)
    assert a.indices() != ia
    a.set_position(0, start_step=2, size=96)
    assert a.indices() == ia[20:] and [i for i, _, _ in a] == ia[20:]
    assert {size for _, _, size in a} == {96}  # the epoch's train size travels with each key to the workers


@pytest.mark.parametrize("n, world", [(103, 1), (103, 2), (103, 3), (10, 4)])
def test_train_sampler_deals_what_torchs_distributed_sampler_deals(n, world):
    """Its order is computed with arrays (milliseconds for ImageNet): the same as torch's sampler."""
    from torch.utils.data import DistributedSampler

    for rank in range(world):
        for epoch in (0, 3):
            ours = TrainSampler(n, dist(rank, world), seed=5, batch_size=2)
            ours.set_position(epoch)
            torchs = DistributedSampler(range(n), world, rank, shuffle=True, seed=5, drop_last=True)
            torchs.set_epoch(epoch)
            assert ours.indices() == list(torchs)[: ours.steps_per_epoch * 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalisation_is_one_op_into_the_models_dtype_and_layout(dtype):
    """addcmul into an output in the model's dtype and layout: one kernel on CUDA (there the casts
    happen in the kernel; on the CPU, inside addcmul, as its child operators)."""
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalize = Normalizer.create(mean, std, torch.device("cpu"), dtype, channels_last=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = normalize(images)
    assert [e.name for e in prof.events() if e.cpu_parent is None] == ["aten::empty", "aten::addcmul"]
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    want = (images.double() - torch.tensor(mean).view(1, 3, 1, 1).double() * 255) / (
        torch.tensor(std).view(1, 3, 1, 1).double() * 255)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-2)


def test_read_cifar_real_format(cifar_root):
    train_x, train_y, val_x, val_y = read_cifar(cifar_root, "cifar10")
    assert train_x.shape == (600, 3, 32, 32) and train_x.dtype == torch.uint8
    assert val_x.shape == (110, 3, 32, 32) and sorted(set(val_y.tolist())) == list(range(10))


def test_read_cifar_rejects_garbage(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_1"):
        read_cifar(tmp_path, "cifar10")


def loader(images, train=True, rank=0, world=1, batch=8, padding=4):
    return DeviceLoader(images, torch.arange(len(images)), batch, identity(), dist(rank, world), seed=3,
                        train=train, padding=padding, flip=True)


def test_device_loader_crops_are_crops_of_the_padded_image():
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    padded = torch.nn.functional.pad(images, [4] * 4)
    for x, y in loader(images):
        for img, idx in zip(x, y):
            candidates = [padded[idx, :, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
            candidates += [c.flip(2) for c in candidates]
            assert any(torch.equal(img.to(torch.uint8), c) for c in candidates)


def test_device_loader_resumes_mid_epoch_with_identical_batches():
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    full = loader(images)
    full.set_position(2)
    batches = list(full)
    resumed = loader(images)
    resumed.set_position(2, start_step=3)
    rest = list(resumed)
    assert len(batches) == 6 and len(rest) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches[3:], rest))


def test_device_loader_val_counts_each_image_once_across_ranks():
    images = torch.randint(0, 256, (23, 3, 32, 32), dtype=torch.uint8)
    labels = [y for r in range(3) for _, y in loader(images, train=False, rank=r, world=3, batch=4)]
    assert torch.cat(labels).tolist() == list(range(23))
