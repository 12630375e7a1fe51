"""Several real processes on the CPU with gloo, started by the launch scripts users run."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from conftest import REPO, cli_env, run_module
from imagenet_resnet.metrics import read_metrics

pytestmark = pytest.mark.e2e

IMAGENET_ARGS = ["data.image_size=32", "data.batch_size=8", "data.workers=1", "schedule.epochs=2",
                 "schedule.warmup_epochs=0.5", "run.log_every_steps=2",
                 "data.val_crop_first=true", "data.train_interpolation=random"]  # issue 32: exact with them set


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *args: str, env: dict[str, str] | None = None, wait: bool = True):
    cmd = ["bash", script, *args]
    full_env = dict(cli_env(), PYTHON=str(REPO / ".venv/bin/python"), **(env or {}))
    if not wait:
        return subprocess.Popen(
            cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def evaluate(config, checkpoint, root, loader, nproc: int) -> dict:
    args = ["--config", str(config), "--checkpoint", str(checkpoint), f"data.root={root}", f"data.loader={loader}"]
    if nproc == 1:
        out = run_module("imagenet_resnet.evaluate", *args).stdout
    else:
        out = run_module("torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                         "-m", "imagenet_resnet.evaluate", *args).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_torchrun_two_processes_then_exact_evaluation(imagenet_root, tmp_path, loader):
    out = tmp_path / "run"
    proc = launch("launch/single_node.sh", "configs/imagenet_resnet18.yaml", f"data.root={imagenet_root}",
                  f"data.loader={loader}", f"run.out_dir={out}", "wandb.mode=offline", *IMAGENET_ARGS,
                  env={"NPROC": "2"})
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(r["val_images"] == 21 for r in records)
    assert proc.stdout.count("model resnet18") == 1 and "2 process(es)" in proc.stdout  # rank 0 alone reports
    assert "global batch 16 = 8 x 2 process(es); lr 0.00625" in proc.stdout  # linear scaling over the world size
    assert len(list(out.glob("wandb/offline-run-*"))) == 1  # one wandb run, from rank 0
    one = evaluate(out / "config.yaml", out / "last.pt", imagenet_root, loader, nproc=1)
    two = evaluate(out / "config.yaml", out / "last.pt", imagenet_root, loader, nproc=2)
    three = evaluate(out / "config.yaml", out / "last.pt", imagenet_root, loader, nproc=3)
    assert one["val_images"] == two["val_images"] == three["val_images"] == 21
    assert one["val_top1"] == two["val_top1"] == three["val_top1"] == pytest.approx(records[-1]["val_top1"])
    assert one["val_top5"] == two["val_top5"] == three["val_top5"]
    assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-5)


def test_two_nodes_on_localhost_with_c10d_rendezvous(cifar_root, tmp_path):
    out = tmp_path / "run"
    env = {"NNODES": "2", "NPROC": "1", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "RDZV_ID": "two-node-test"}
    args = ["configs/cifar10_resnet20.yaml", f"data.root={cifar_root}", f"run.out_dir={out}", "schedule.epochs=2",
            "data.batch_size=32", "wandb.mode=disabled"]
    nodes = [launch("launch/multi_node.sh", *args, env=env, wait=False) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert sum("2 process(es)" in o for o in outputs) == 1  # rank 0 lives on one of the nodes
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]
    assert all(r["val_images"] == 110 for r in read_metrics(out))


def test_syncbn_on_cpu_is_refused_clearly(cifar_root, tmp_path):
    proc = run_module("torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "imagenet_resnet.train",
                      "--config", "configs/cifar10_resnet20.yaml", f"data.root={cifar_root}", "model.sync_bn=true",
                      f"run.out_dir={tmp_path}", "wandb.mode=disabled", check=False)
    assert proc.returncode != 0 and "model.sync_bn=true: PyTorch's SyncBatchNorm runs on CUDA only" in proc.stderr
