"""Benchmarks behind docs/BENCHMARKS.md: model step, loaders, end to end, recipes, CIFAR epoch, data_prep,
the step loop's costs (benchmarks/steploop.py).

    python -m benchmarks.bench --out bench                  # all this machine can run
    python -m benchmarks.bench --out bench --only model,prep --quick
    python -m benchmarks.bench --out bench/r50 --only model --models resnet50

Every figure goes to <out>/results.json and <out>/results.md with the device, software versions,
command and date. Without a GPU, the GPU-only configurations are listed as skipped and the rest
run at sizes a CPU finishes in minutes (marked in the notes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from benchmarks.record import Record
from benchmarks.steploop import bench_steploop
from data_prep.devkit import read_devkit
from data_prep.generate import generate, generate_cifar
from imagenet_resnet.cli import command, run_main
from imagenet_resnet.config import load_config
from imagenet_resnet.data import build_loaders
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.errors import UserError
from imagenet_resnet.files import write_atomic
from imagenet_resnet.layout import DEVKIT, TRAIN_TAR, VAL_TAR
from imagenet_resnet.metrics import read_metrics
from imagenet_resnet.models import build_model, list_models
from imagenet_resnet.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("model", "loader", "e2e", "recipes", "cifar", "prep", "steploop")
# profile: written by the model section
TABLES = ("model", "profile", "loader", "e2e", "recipes", "cifar", "prep", "steploop")


def environment() -> dict[str, str]:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
        device = f"CPU: {model}, {os.cpu_count()} cores"
    try:
        import nvidia.dali

        dali = nvidia.dali.__version__
    except ImportError:
        dali = "not installed"
    import torchvision

    return {"device": device, "torch": torch.__version__, "torchvision": torchvision.__version__, "dali": dali,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python -m benchmarks.bench", *sys.argv[1:]])}


def timed(fn: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls after `warmup` untimed ones, the device drained at both ends."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


# --- 1. model step on device-resident data ----------------------------------------------------


def train_step_fn(model: nn.Module, optimizer, images, labels, bf16: bool) -> Callable[[], None]:
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def reference_speed(name: str, images: torch.Tensor, labels: torch.Tensor, steps: int, device: torch.device) -> float:
    """Images/s of pytorch/examples' step: torchvision-style model, fp32, NCHW, plain SGD."""
    model = build_model(name, 1000, zero_init_residual=False).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return len(images) * steps / timed(train_step_fn(model, optimizer, images, labels, False), 2, steps, device)


def bench_model(device: torch.device, names: list[str], out: Path) -> list[Record]:
    """Reference step vs ours in each variant; then a profile of our fastest variant per model."""
    cuda = device.type == "cuda"
    size, batches = (224, (128, 256)) if cuda else (128, (16,))
    variants = [("fp32", False, False), ("bf16", False, False), ("bf16", True, False), ("bf16", True, True)]
    steps = 30 if cuda else 3
    cfg = load_config(None, ["optim.base_lr=0.1"])
    records = []
    for name in names:
        fastest: tuple[float, str, Callable[[], None]] | None = None  # at the largest batch
        for batch in batches:
            images = torch.randn(batch, 3, size, size, device=device)
            labels = torch.randint(0, 1000, (batch,), device=device)
            reference = reference_speed(name, images, labels, steps, device)
            records.append(Record("model", f"{name} b{batch} reference fp32 NCHW", reference, "images/s",
                                  f"{size}px; pytorch/examples step"))
            for precision, channels_last, compiled in variants:
                label = f"{name} b{batch} ours {precision}{' channels_last' if channels_last else ''}" \
                        f"{' compile' if compiled else ''}"
                if not cuda and (precision == "bf16" or compiled):
                    records.append(Record("model", label, None, "images/s", "skipped: GPU configuration"))
                    continue
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                model = build_model(name, 1000).to(device, memory_format=fmt)
                opt = build_optimizer(model, cfg.optim, 0.1)
                net = torch.compile(model) if compiled else model
                step = train_step_fn(net, opt, images.contiguous(memory_format=fmt), labels, precision == "bf16")
                speed = batch * steps / timed(step, 10 if compiled else 3, steps, device)
                records.append(
                    Record("model", label, speed, "images/s", f"{size}px; {speed / reference:.2f}x reference")
                )
                if batch == batches[-1] and (fastest is None or speed > fastest[0]):
                    fastest = (speed, label, step)  # keeps this model alive until profiled
                del model, opt, net, step
        if fastest is not None:
            speed, label, step = fastest
            records += profile_step(step, device, batches[-1] / speed, label, out)
            del fastest, step
    return records


# What a kernel or operator is, by its name (aten ops on the CPU; cuDNN/cuBLAS/Triton kernels on CUDA).
OP_KINDS = (
    ("optimizer", re.compile(r"sgd|foreach|multi_tensor|Optimizer", re.I)),
    ("batch norm", re.compile(r"batch_norm|batchnorm|bn_fw|bn_bw|welford", re.I)),
    ("convolution / matmul", re.compile(r"conv|gemm|xmma|implicit|addmm|^aten::mm|cutlass|sm\d\d_|wgrad|dgrad", re.I)),
    (
        "elementwise / activation / pooling",
        re.compile(r"elementwise|relu|threshold|add|mul|pool|triton|vectorized|copy|fill|where|clamp", re.I),
    ),
)


def profile_step(step: Callable[[], None], device: torch.device, step_s: float, label: str,
                 out: Path) -> list[Record]:
    """Where a step's time goes: share of kernel (CUDA) or operator (CPU) time by kind, and on
    CUDA how busy the GPU is (kernel time / step time: well below 100% means launch- or host-bound).
    The top operators go to <out>/profile_<model>.txt."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    steps = 5 if cuda else 2
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        timed_events = [(e.key, e.self_device_time_total) for e in events
                        if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        sort_by, unit = "self_device_time_total", "% of GPU kernel time"
    else:
        timed_events = [(e.key, e.self_cpu_time_total) for e in events]
        sort_by, unit = "self_cpu_time_total", "% of CPU operator time"
    total = sum(t for _, t in timed_events) or 1.0
    shares = {kind: 0.0 for kind, _ in OP_KINDS} | {"other": 0.0}
    for key, t in timed_events:
        kind = next((k for k, pattern in OP_KINDS if pattern.search(key)), "other")
        shares[kind] += 100 * t / total
    model = label.split()[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{model}.txt").write_text(f"{label}, {steps} steps\n" + events.table(sort_by=sort_by, row_limit=25))
    records = [
        Record("profile", f"{label}: {kind}", share, unit, f"profile_{model}.txt") for kind, share in shares.items()
    ]
    if cuda:
        busy = 100 * total / 1e6 / steps / step_s  # profiler times are in microseconds
        records.append(Record("profile", f"{label}: GPU busy", busy, "% of step time",
                              "kernel time per step / unprofiled step time"))
    return records


# --- shared: a prepared folder of ImageNet-sized JPEGs -----------------------------------------


def prepared_folder(work: Path, classes: int, per_class: int) -> Path:
    dest = work / "imagenet"
    if (dest / "COMPLETE").exists():
        return dest
    src = generate(work / "archives", classes=classes, train_per_class=(per_class, per_class),
                   val_per_class=max(2, per_class // 5), size=(500, 375), quality=90, plant_problems=False)
    env = dict(os.environ, PYTHON=sys.executable, WORKERS=str(os.cpu_count()))
    subprocess.run(["bash", str(REPO / "data_prep/prepare_imagenet.sh"), str(src), str(dest)], check=True, env=env,
                   cwd=REPO, stdout=subprocess.DEVNULL)
    return dest


def jpeg_folder(work: Path, cuda: bool, quick: bool) -> tuple[Path, str]:
    """(data.root, data.dataset) of ImageNet-sized JPEGs for the loader and end-to-end benchmarks.

    A GPU decodes thousands of images a second, so there the 512 generated images are repeated
    (hard links, data.dataset=folder) to 20k train / 5k val files: enough that an epoch lasts
    seconds and the per-epoch start-up is a small part of it, as it is on ImageNet.
    """
    root = prepared_folder(work, classes=8, per_class=16 if quick else 64)
    if not cuda or quick:
        return root, "imagenet"
    folder = work / "repeated"
    if not folder.exists():
        for split, copies in (("train", 40), ("val", 50)):
            for image in sorted((root / split).glob("*/*")):
                target = folder / split / image.parent.name
                target.mkdir(parents=True, exist_ok=True)
                for k in range(copies):
                    os.link(image, target / f"{image.stem}_{k}{image.suffix}")
    return folder, "folder"


# --- 2. loaders alone ---------------------------------------------------------------------------


def bench_loader(device: torch.device, quick: bool, work: Path) -> list[Record]:
    cuda = device.type == "cuda"
    root, dataset = jpeg_folder(work, cuda, quick)
    batch = 128 if cuda else 32
    records = []
    for loader in ("torchvision", "dali"):
        cfg = load_config(None, [f"data.root={root}", f"data.dataset={dataset}", f"data.loader={loader}",
                                 "data.image_size=224", f"data.batch_size={batch}", f"data.workers={os.cpu_count()}"])
        try:
            train, val, _ = build_loaders(cfg, DistInfo(0, 0, 1, device), torch.bfloat16 if cuda else torch.float32)
        except Exception as err:  # DALI missing on this machine: say so in the table
            records.append(Record("loader", f"{loader}", None, "images/s", f"skipped: {err}"))
            continue
        where = "GPU decode" if (loader == "dali" and cuda) else "CPU decode"
        for split, it in (("train", train), ("val", val)):
            list(it)  # warm: page cache, cuDNN/nvJPEG handles
            start = time.perf_counter()
            batches = iter(it)
            _, first = next(batches)
            first_s = time.perf_counter() - start  # per pass: pipeline build or worker start-up
            rest = sum(len(y) for _, y in batches)
            if cuda:
                torch.cuda.synchronize()
            total_s = time.perf_counter() - start
            # After the first batch when there are more (steady state), else the whole pass.
            speed = rest / (total_s - first_s) if rest else len(first) / total_s
            records.append(Record("loader", f"{loader} {split}", speed, "images/s",
                                  f"{rest + len(first)} JPEGs 500x375 q90 -> 224px, batch {batch}, "
                                  f"{os.cpu_count()} workers, {where}; "
                                  + (f"after the first batch, which took {first_s:.2f} s (start-up of each pass)"
                                     if rest else "one batch: whole pass")))
    return records


# --- 3. end to end and 4. CIFAR: the real trainer in a subprocess --------------------------------


def run_trainer(config: str, out: Path, overrides: list[str]) -> list[dict]:
    """Per-epoch metrics of the real trainer under torchrun; raises RuntimeError with its last output."""
    nproc = max(1, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "imagenet_resnet.train", "--config", config, f"run.out_dir={out}", "wandb.mode=disabled", *overrides]
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}: " + " / ".join(done.stdout.strip().splitlines()[-3:]))
    return read_metrics(out)


def trainer_records(section: str, name: str, config: str, out: Path, overrides: list[str],
                    value: Callable[[dict], tuple[float, str]], unit: str) -> list[Record]:
    """One record from the last epoch (the first ones include start-up and compilation), or the failure."""
    try:
        metrics = run_trainer(config, out, overrides)
    except RuntimeError as err:
        return [Record(section, name, None, unit, f"failed: {err}")]
    number, notes = value(metrics[-1])
    return [Record(section, name, number, unit, notes)]


def bench_e2e(device: torch.device, quick: bool, work: Path) -> list[Record]:
    cuda = device.type == "cuda"
    root, dataset = jpeg_folder(work, cuda, quick)
    model, size, batch = ("resnet50", 224, 256) if cuda else ("resnet18", 112, 32)
    runs = [("torchvision", []), ("dali", [])] + ([("dali", ["run.compile=true"])] if cuda else [])
    records = []
    for loader, extra in runs:
        def value(last: dict) -> tuple[float, str]:
            return last["images_per_sec"], (f"{size}px, batch {batch}/process, {' '.join(extra) or 'no compile'}; "
                                            f"data wait {100 * last['data_wait_fraction']:.0f}% of step time")

        records += trainer_records(
            "e2e",
            f"{model} {loader}{' compile' if extra else ''}",
            "configs/imagenet_resnet50.yaml",
            work / f"e2e_{loader}{len(extra)}",
            [
                f"model.name={model}",
                f"data.root={root}",
                f"data.dataset={dataset}",
                f"data.loader={loader}",
                f"data.image_size={size}",
                f"data.batch_size={batch}",
                f"data.workers={os.cpu_count()}",
                f"schedule.epochs={3 if cuda else 2}",
                "schedule.warmup_epochs=0",
                "run.checkpoint_every_steps=0",
                *extra,
            ],
            value,
            "images/s",
        )
    return records


# What each recipe's extras cost (RandAugment, Mixup/CutMix, EMA, TTA, LAMB/LARS, BlurPool), at the
# recipe's own settings but sizes a CPU finishes: the resize ramp is moved into the 2 epochs run.
RECIPES = {
    "imagenet_resnet50.yaml": [],
    "imagenet_resnet50_ffcv_16.yaml": ["data.resize_ramp_epochs=[0,1]"],
    "imagenet_resnet50_rsb_a3.yaml": [],
    "imagenet_resnet50_lars.yaml": [],
}


def bench_recipes(device: torch.device, quick: bool, work: Path) -> list[Record]:
    cuda = device.type == "cuda"
    root, dataset = jpeg_folder(work, cuda, quick)
    model, size, batch = ("resnet50", 224, 256) if cuda else ("resnet18", 128, 32)
    records = []
    for config, extra in RECIPES.items():
        sizes = [f"data.image_size={size}", f"data.val_image_size={size}"] + (
            [f"data.start_image_size={size * 5 // 6 // 32 * 32}"] if extra else [])  # ffcv: 160 -> 192

        def value(last: dict) -> tuple[float, str]:
            return last["images_per_sec"], (f"{model} at {last.get('train_image_size', size)}px (last epoch), batch "
                                            f"{batch}/process, data.loader=dali; data wait "
                                            f"{100 * last['data_wait_fraction']:.0f}% of step time")

        records += trainer_records("recipes", config.removesuffix(".yaml"), f"configs/{config}", work / config, [
            f"model.name={model}", f"data.root={root}", f"data.dataset={dataset}", "data.loader=dali", *sizes,
            f"data.batch_size={batch}", f"data.workers={os.cpu_count()}", f"schedule.epochs={3 if cuda else 2}",
            "schedule.warmup_epochs=0", "run.checkpoint_every_steps=0", *extra], value, "images/s")
    return records


def bench_cifar(device: torch.device, quick: bool, work: Path) -> list[Record]:
    cuda = device.type == "cuda"
    per_class = 5000 if cuda and not quick else 200
    images = per_class * 10
    generate_cifar(work / "cifar", "cifar10", train_per_class=per_class, val_per_class=per_class // 5)
    runs = [("eager", [])]
    if cuda:  # small nets are launch-bound: CUDA graphs (reduce-overhead) are what should pay off
        runs += [("compile", ["run.compile=true"]),
                 ("compile reduce-overhead", ["run.compile=true", "run.compile_mode=reduce-overhead"])]
    records = []
    for label, extra in runs:
        def value(last: dict) -> tuple[float, str]:
            return 50_000 / last["images_per_sec"], (
                f"measured on {images} images: {last['images_per_sec']:.0f} images/s"
                + ("" if images == 50_000 else "; scaled to 50k")
            )

        records += trainer_records("cifar", f"cifar_resnet56 epoch, device loader, batch 128, {label}",
                                   "configs/cifar10_resnet56.yaml", work / f"cifar_{len(extra)}",
                                   [f"data.root={work / 'cifar'}", f"schedule.epochs={3 if cuda else 2}", *extra],
                                   value, "s per 50k images")
    return records


# --- 5. data_prep against the classic serial recipe ------------------------------------------------

SERIAL_RECIPE = """
set -e
mkdir -p "$DEST/train" "$DEST/val"
tar -xf "$SRC/ILSVRC2012_img_train.tar" -C "$DEST/train"
cd "$DEST/train"
for f in *.tar; do d="${f%.tar}"; mkdir -p "$d"; tar -xf "$f" -C "$d"; rm "$f"; done
tar -xf "$SRC/ILSVRC2012_img_val.tar" -C "$DEST/val"
cd "$DEST/val" && bash "$VALPREP"
"""


def bench_prep(quick: bool, work: Path) -> list[Record]:
    src = generate(
        work / "prep_archives",
        classes=6 if quick else 100,
        train_per_class=(8, 8) if quick else (100, 100),
        val_per_class=5,
        size=(500, 375),
        quality=90,
    )
    total = sum(p.stat().st_size for p in src.iterdir())
    kit = read_devkit(src / DEVKIT)
    valprep = work / "valprep.sh"  # the classic valprep.sh: one mkdir + mv per image
    valprep.write_text("".join(f"mkdir -p {w}\nmv {name} {w}/\n" for name, w in sorted(kit.val_wnids.items())))

    run = run_timed
    workers = str(os.cpu_count())
    ours = run(["bash", "data_prep/prepare_imagenet.sh", str(src), str(work / "prep_ours")],
               {"PYTHON": sys.executable, "WORKERS": workers})
    # The extraction phase alone (the two extract steps the entry script runs): what grows with the data.
    phase = work / "prep_phase"
    run([sys.executable, "-m", "data_prep.devkit", "--devkit", str(src / DEVKIT), "--dest", str(phase)])
    extract = sum(run([sys.executable, "-m", "data_prep.extract", "--split", split, "--archive", str(src / name),
                       "--dest", str(phase), "--workers", workers])
                  for split, name in (("train", TRAIN_TAR), ("val", VAL_TAR)))
    serial = run(
        ["bash", "-c", SERIAL_RECIPE], {"SRC": str(src), "DEST": str(work / "prep_serial"), "VALPREP": str(valprep)}
    )
    floor_dir = work / "prep_floor"
    floor_dir.mkdir()
    floor = run(["bash", "-c", f"for f in {src}/*.tar; do cp \"$f\" {floor_dir}/; done"])
    return prep_records(total / 1e6, ours, extract, serial, floor)


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds `cmd` takes, run from the repository with `env` added."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, **(env or {})), cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def prep_records(mb: float, ours: float, extract: float, serial: float, floor: float) -> list[Record]:
    note = f"{mb:.0f} MB of archives, {os.cpu_count()} cores, files in page cache"
    return [
        Record("prep", "make prepare-imagenet, whole command (extract + convert + lists + verify)", mb / ours, "MB/s",
               f"{note}; {ours:.1f} s, of which ~{ours - extract:.1f} s is size-independent start-up, devkit, lists"),
        Record("prep", "its extraction phase (parallel, with the content check of every image)", mb / extract, "MB/s",
               f"{note}; {extract:.1f} s"),
        Record("prep", "classic serial recipe (untar, untar each class, valprep.sh)", mb / serial, "MB/s",
               f"{note}; {serial:.1f} s"),
        Record("prep", "floor: copy each archive byte once (cp)", mb / floor, "MB/s", f"{note}; {floor:.1f} s"),
        Record("prep", "extraction phase vs serial recipe", serial / extract, "x speed-up", note),
        Record("prep", "whole command vs serial recipe", serial / ours, "x speed-up", note),
    ]


def markdown(env: dict[str, str], records: list[Record]) -> str:
    lines = [f"Device: {env['device']}; torch {env['torch']}, torchvision {env['torchvision']}, DALI {env['dali']}, "
             f"Python {env['python']}; {env['date']}; `{env['command']}`", ""]
    for section in TABLES:
        rows = [r for r in records if r.section == section]
        if not rows:
            continue
        lines += [f"### {section}", "", "| benchmark | value | unit | notes |", "|---|---:|---|---|"]
        lines += [
            f"| {r.name} | {'-' if r.value is None else f'{r.value:,.1f}'} | {r.unit} | {r.notes} |" for r in rows
        ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    a = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    records: list[Record] = []
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        for section in a.only.split(","):
            print(f"bench: {section} ...", flush=True)
            records += run_section(section, device, a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    write_atomic(a.out / "results.json", json.dumps({"environment": env, "records": [asdict(r) for r in records]},
                                                    indent=1))
    table = markdown(env, records)
    write_atomic(a.out / "results.md", table)
    print(table)


def run_section(section: str, device: torch.device, a: argparse.Namespace, work: Path) -> list[Record]:
    if section == "model":
        return bench_model(device, ["resnet18"] if a.quick else a.models.split(","), a.out)
    if section == "prep":
        return bench_prep(a.quick, work)
    if section == "steploop":
        return bench_steploop(work, a.quick)
    runner = {"loader": bench_loader, "e2e": bench_e2e, "recipes": bench_recipes, "cifar": bench_cifar}[section]
    return runner(device, a.quick, work)


def parse_args() -> argparse.Namespace:
    p = command(__spec__.name, "Measure throughput; write JSON and a Markdown table.")
    p.add_argument("--out", type=Path, default=Path("bench"), help="folder for results.json and the Markdown table")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="smallest sizes (for the test suite)")
    p.add_argument("--models", default="resnet18,resnet50,seresnet50", help="models of the model section")
    a = p.parse_args()
    unknown = [s for s in a.only.split(",") if s not in SECTIONS]
    unknown += [m for m in a.models.split(",") if m not in list_models()]
    if unknown:
        raise UserError(f"--only/--models: unknown {', '.join(unknown)}; sections: {', '.join(SECTIONS)}; "
                        f"models: see imagenet_resnet.models.list_models()")
    if a.out.exists() and not a.out.is_dir():
        raise UserError(f"--out {a.out}: exists and is not a folder")
    return a


if __name__ == "__main__":
    run_main(main)
