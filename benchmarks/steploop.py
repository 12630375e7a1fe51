"""What the step loop pays that a GPU would expose (issue 31), measured on any machine:

- seconds a save blocks the step loop (ResNet-50, with and without EMA): the synchronous write
  it replaced (one serialisation, last.pt and best.pt each written and fsynced) against
  `CheckpointWriter.submit` (the copy to host memory; the write goes on in the background);
- operators per DDP step (ResNet-50, 2 gloo processes, torch.profiler): DDP's defaults against
  broadcast_buffers=False + gradient_as_bucket_view=True;
- straggler hook calls per synchronising backward (ResNet-50);
- kernels per normalisation of a batch (the four-op form against the Normalizer's one op);
- Dynamo graphs compiled by a 3-epoch resize-ramp run with a partial last val batch;
- DALI (CPU mode), ImageNet-sized file lists for rank 0 of 8: seconds before an evaluation's first
  batch (the val pipeline built, the first time, or restarted) and the main thread's time at a
  train epoch's boundary, with and without the RSB A1 RandAugment policy (one pipeline across
  epochs);
- host milliseconds per step outside PyTorch's operators (Python, hooks, the loader's hand-off)
  for a launch-bound tiny model (CIFAR ResNet-20, batch 8): what a GPU would wait for.

    python -m benchmarks.bench --out bench --only steploop
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from timm.utils import ModelEmaV3
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel

from benchmarks.record import Record
from data_prep.generate import class_image, encode, generate_cifar
from imagenet_resnet.checkpoint import BEST, LAST, Checkpoint, CheckpointWriter, Position, capture_rng
from imagenet_resnet.config import load_config
from imagenet_resnet.data.datasets import normalization
from imagenet_resnet.data.loader import Normalizer
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.files import write_atomic
from imagenet_resnet.models import build_model
from imagenet_resnet.stragglers import GradientWait
from imagenet_resnet.trainer import Trainer


def trained_state(ema: bool) -> Checkpoint:
    """A ResNet-50 checkpoint as training writes one: weights, SGD momentum, optionally the EMA."""
    net = build_model("resnet50", 1000)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    average = ModelEmaV3(net, decay=0.9999) if ema else None
    return Checkpoint(model=net.state_dict(), optimizer=optimizer.state_dict(), position=Position(3, 100, 5100),
                      train_sums=[torch.zeros(3, dtype=torch.float64)], best_top1=0.0, rng=[capture_rng()],
                      loader=[None], config={}, num_classes=1000, world_size=1, global_batch=256,
                      model_ema=average.module.state_dict() if average else None)


def blocked_per_save(ema: bool, folder: Path, repeats: int = 3) -> tuple[float, float, float, int]:
    """(seconds blocked before, after, the background write's seconds, bytes) for a best save."""
    checkpoint = trained_state(ema)
    before, after, background = [], [], []
    size = 0
    for _ in range(repeats):
        start = time.perf_counter()
        data = io.BytesIO()
        torch.save(checkpoint.to_state(), data)
        for name in (LAST, BEST):  # what save() did before: the same bytes written twice
            write_atomic(folder / name, data.getbuffer(), previous=".prev")
        before.append(time.perf_counter() - start)
        size = data.getbuffer().nbytes
        writer = CheckpointWriter()
        start = time.perf_counter()
        writer.submit(checkpoint, folder, best=True)
        after.append(time.perf_counter() - start)
        writer.wait()
        background.append(time.perf_counter() - start)
    return min(before), min(after), min(background), size


def bench_saves(work: Path) -> list[Record]:
    records = []
    for ema in (False, True):
        folder = Path(tempfile.mkdtemp(dir=work))
        before, after, background, size = blocked_per_save(ema, folder)
        label = "ResNet-50 + SGD momentum" + (" + EMA" if ema else "")
        note = f"{size / 1e6:.0f} MB state; best of 3; on {folder.parent}"
        records += [
            Record("steploop", f"save blocks the step loop, before: {label} (serialise, write last.pt and best.pt)",
                   1000 * before, "ms", note),
            Record("steploop", f"save blocks the step loop, after: {label} (copy to host, write in background)",
                   1000 * after, "ms", f"{note}; {100 * after / before:.1f}% of before; the background write took "
                                       f"{background:.2f} s"),
        ]
    return records


def _ddp_step_operators(rank: int, world: int, init: str, defaults: bool, out: str) -> None:
    torch_dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    net = build_model("resnet50", 10)
    options = {} if defaults else {"broadcast_buffers": False, "gradient_as_bucket_view": True}
    model = DistributedDataParallel(net, **options)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])

    def step() -> None:
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # DDP builds its buckets on the first step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    if rank == 0:
        counts = Counter({event.key: event.count for event in prof.key_averages()})
        torch.save(dict(counts), out)
    torch_dist.destroy_process_group()


def ddp_operators(defaults: bool, work: Path) -> Counter:
    out = work / f"ddp_ops_{defaults}.pt"
    init = f"file://{work / f'ddp_store_{defaults}'}"
    mp.spawn(_ddp_step_operators, args=(2, init, defaults, str(out)), nprocs=2, join=True)
    return Counter(torch.load(out))


def bench_ddp(work: Path) -> list[Record]:
    records = []
    watched = ("aten::copy_", "aten::mul_", "aten::mul", "aten::div_", "aten::_foreach_copy_", "c10d::broadcast_")
    for defaults in (True, False):
        counts = ddp_operators(defaults, work)
        aten = sum(n for key, n in counts.items() if key.startswith("aten::"))
        label = "DDP defaults" if defaults else "broadcast_buffers=False, gradient_as_bucket_view=True"
        detail = ", ".join(f"{key} {counts[key]}" for key in watched if counts[key])
        records.append(Record("steploop", f"aten operators per DDP step, ResNet-50, 2 gloo processes: {label}",
                              aten, "ops", detail))
    return records


def bench_hooks() -> list[Record]:
    net = build_model("resnet50", 10)
    calls = Counter()

    class Counting(GradientWait):
        def _gradient_ready(self, param: torch.Tensor) -> None:
            calls["hook"] += 1
            super()._gradient_ready(param)

    waits = Counting(net, torch.device("cpu"))
    waits.arm()
    nn.functional.cross_entropy(net(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1])).backward()
    waits.step_done()
    before = sum(1 for p in net.parameters() if p.requires_grad)  # one hook on each trainable parameter
    return [Record("steploop", "straggler hook calls per synchronising backward, ResNet-50", calls["hook"], "calls",
                   f"before: {before} (a hook on every trainable parameter, also on no_sync micro-batches); "
                   f"now none on no_sync micro-batches")]


def bench_normalise() -> list[Record]:
    """One 256-image 224 px batch, uint8 -> bf16 channels_last: the four-op form the Normalizer had
    against its one op (top-level operators, each a kernel and a pass over the batch on CUDA)."""
    images = torch.randint(0, 256, (256, 3, 224, 224), dtype=torch.uint8)
    normalize = Normalizer.create(*normalization("imagenet"), torch.device("cpu"), torch.bfloat16, True)
    mean, std = (torch.tensor(levels).view(1, 3, 1, 1) for levels in (normalize.mean, normalize.std))

    def before(batch: torch.Tensor) -> torch.Tensor:
        return ((batch.contiguous(memory_format=torch.channels_last).float() - mean) / std).to(torch.bfloat16)

    records = []
    for label, call in (("before (to float, subtract, divide, cast)", before),
                        ("after (addcmul into bf16)", normalize)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call(images)
        top = [e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
        kernels = [name for name in top if name not in ("aten::empty", "aten::empty_like")]
        records.append(Record("steploop", f"normalisation kernels per batch on CUDA, {label}", len(kernels), "ops",
                              f"top-level operators that run a kernel: {', '.join(kernels)}"))
    return records


def bench_compiles(work: Path) -> list[Record]:
    """Dynamo's graphs over a 3-epoch resize-ramp run (16 -> 32 px) with a partial last val batch, as
    tests/test_compile_once.py runs it (a CIFAR ResNet-20 on a small image folder: quick to compile)."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("val", 5)):  # 20 val images: a last batch of 4
        for label in range(4):
            folder = work / "compile" / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{i}.jpg").write_bytes(encode(class_image(label, rng, 48, 40)))
    cfg = load_config("configs/imagenet_resnet18.yaml", [
        f"data.root={work / 'compile'}", "data.dataset=folder", f"run.out_dir={work / 'compile_run'}",
        "model.name=cifar_resnet20", "data.batch_size=8", "data.image_size=32", "data.start_image_size=16",
        "data.resize_ramp_epochs=[0,1]", "data.val_image_size=32", "data.workers=0", "data.loader=torchvision",
        "schedule.epochs=3", "schedule.warmup_epochs=0", "run.compile=true", "run.device=cpu", "wandb.mode=disabled"])
    torch._dynamo.reset()
    counters.clear()
    sizes = sorted({r["train_image_size"] for r in Trainer(cfg, DistInfo(0, 0, 1, torch.device("cpu"))).fit()})
    return [Record("steploop", "Dynamo graphs compiled by a 3-epoch resize-ramp run with a partial last val batch",
                   counters["stats"]["unique_graphs"], "graphs",
                   f"train sizes {sizes} px, evaluation at 32 px; before: 4 (evaluation recompiled for the partial "
                   f"batch, dynamic in batch, then train dynamic in size)")]


def linked_images(folder: Path, count: int) -> list[tuple[str, int]]:
    """`count` links to one small JPEG in `folder`, as (relative path, label) samples (symbolic:
    a file takes at most 65,000 hard links on ext4)."""
    folder.mkdir(parents=True)
    first = folder / "0.JPEG"
    first.write_bytes(encode(class_image(0, np.random.default_rng(0), 64, 48)))
    for i in range(1, count):
        os.symlink(first, folder / f"{i}.JPEG")
    return [(f"c/{i}.JPEG", i % 1000) for i in range(count)]


def first_batch_s(loader) -> float:
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    elapsed = time.perf_counter() - start
    for _ in batches:  # the pass ends, as an evaluation's does
        pass
    return elapsed


def bench_dali(work: Path, quick: bool) -> list[Record]:
    from imagenet_resnet.data.dali_loader import DaliLoader  # DALI may be absent

    train_files, val_files = (12_800, 500) if quick else (1_281_167, 50_000)
    dist = DistInfo(0, 0, 8, torch.device("cpu"))  # rank 0 of 8: its shard of the lists
    cfg = load_config("configs/imagenet_resnet50_rsb_a1.yaml", [f"data.root={work / 'dali'}", "data.image_size=32",
                                                                "data.val_image_size=32", "data.workers=2"])
    normalize = Normalizer.create(*normalization("imagenet"), dist.device, torch.float32, False)
    samples = {split: linked_images(work / "dali" / split / "c", n) for split, n in
               (("train", train_files // 8), ("val", val_files))}
    val = DaliLoader(cfg, dist, normalize, "val", samples["val"])
    built, restarted = first_batch_s(val), min(first_batch_s(val) for _ in range(3))
    note = f"{len(val.shard):,} val files (rank 0 of 8 of {val_files:,}), 64x48 JPEGs, DALI CPU mode, batch 256"
    records = [Record("steploop", "DALI evaluation start, before (a pipeline built per evaluation)", 1000 * built,
                      "ms", note),
               Record("steploop", "DALI evaluation start, after (the pipeline restarted)", 1000 * restarted, "ms",
                      note)]
    # The train list is ImageNet's, rank 0 of 8 taking its share (names cycling over the links made).
    links = samples["train"]
    train_samples = [links[i % len(links)] for i in range(train_files)]
    for policy in ("", cfg.data.auto_augment):
        overrides = [f"data.root={work / 'dali'}", "data.dataset=imagenet", "data.image_size=32", "data.workers=2",
                     f"data.auto_augment={policy or chr(39) * 2}"]
        train = DaliLoader(load_config(None, overrides), dist, normalize, "train", train_samples)
        ends, firsts, steady = [], [], []
        end_epoch = train._next_epoch  # the main thread's work at an epoch's end, timed in place
        train._next_epoch = lambda batches: ends.append(time_s(lambda: end_epoch(batches)))
        for epoch in range(3):
            last = train.steps_per_epoch - 1
            train.set_position(epoch, last - 2)  # a pipeline built near the epoch's end (not timed)
            batches = iter(train)
            steady.append(min(time_s(lambda: next(batches)) for _ in range(2)))
            next(batches)  # the epoch's last batch: DALI's epoch ended, reset, the next one's order dealt
            train.set_position(epoch + 1)
            firsts.append(time_s(lambda: next(iter(train))))  # the next epoch's first batch, same pipeline
        label = f"RandAugment {policy}" if policy else "no RandAugment"
        records.append(Record(
            "steploop", f"DALI train epoch boundary, {label}: main-thread ms (reset, next epoch's order)",
            1000 * sorted(ends)[1], "ms",
            f"{train.steps_per_epoch * train.batch_size:,} train files (rank 0 of 8 of {train_files:,}); median of "
            f"3 boundaries; the next epoch's first batch then took {1000 * sorted(firsts)[1]:.0f} ms against "
            f"{1000 * sorted(steady)[1]:.0f} ms for a batch mid-epoch; before: a pipeline built per epoch"))
    return records


def time_s(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def bench_host_overhead(work: Path) -> list[Record]:
    generate_cifar(work / "cifar", "cifar10", train_per_class=40, val_per_class=4)
    cfg = load_config("configs/cifar10_resnet20.yaml", [f"data.root={work / 'cifar'}", "data.batch_size=8",
                                                        "run.device=cpu", "wandb.mode=disabled",
                                                        f"run.out_dir={work / 'host_run'}"])
    trainer = Trainer(cfg, DistInfo(0, 0, 1, torch.device("cpu")))
    trainer.model.train()
    trainer.train_loader.set_position(0)
    batches = iter(trainer.train_loader)
    for step in range(5):  # warm-up
        trainer.train_step(batches, 0, step)
    steps, step, shares = 10, 5, []
    start = time.perf_counter()
    for step in range(step, step + steps):
        trainer.train_step(batches, 0, step)
    wall_ms = 1000 * (time.perf_counter() - start) / steps  # unprofiled
    for _ in range(3):  # windows of `steps` profiled steps: wall time and operators' time in the same window
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for step in range(step + 1, step + 1 + steps):
                trainer.train_step(batches, 0, step)
        window_ms = 1000 * (time.perf_counter() - start) / steps
        # Each operator's self time (backward's included, on this thread): the rest is host work.
        inside_ms = sum(e.self_cpu_time_total for e in prof.events() if e.name.startswith("aten::")) / 1000 / steps
        shares.append((window_ms - inside_ms, window_ms))
    outside_ms, window_ms = sorted(shares)[1]
    return [Record("steploop", "host ms per step outside operators, CIFAR ResNet-20, batch 8 (launch-bound)",
                   outside_ms, "ms", f"median of 3 profiled windows of {steps} steps ({window_ms:.1f} ms a step "
                                     f"profiled, {wall_ms:.1f} ms unprofiled; the profiler's own bookkeeping "
                                     f"counts as outside: an upper bound)")]


def bench_steploop(work: Path, quick: bool = False) -> list[Record]:
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    return (bench_saves(work) + bench_ddp(work) + bench_hooks() + bench_normalise() + bench_compiles(work)
            + bench_dali(work, quick) + bench_host_overhead(work))
