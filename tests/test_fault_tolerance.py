"""Kills, restarts, preemption and bad steps, with real processes and real signals."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import REPO, cli_env
from imagenet_resnet.checkpoint import load_file
from imagenet_resnet.metrics import read_metrics

pytestmark = pytest.mark.e2e

EXACT_KEYS = ("epoch", "train_loss", "train_top1", "lr", "val_loss", "val_top1", "val_top5", "val_images")


def train_cmd(nproc: int, cifar_root: Path, out: Path, *extra: str, max_restarts: int = 0) -> list[str]:
    args = ["--config", "configs/cifar10_resnet20.yaml", f"data.root={cifar_root}", f"run.out_dir={out}",
            "schedule.epochs=2", "run.checkpoint_every_steps=3", "run.log_every_steps=1", "wandb.mode=disabled",
            f"data.batch_size={32 // nproc}", *extra]
    if nproc == 1:
        return [sys.executable, "-m", "imagenet_resnet.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "imagenet_resnet.train", *args]


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=cli_env() | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 300) -> str:
    """Read the process's output until a line contains `text`; return what was read."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"never saw {text!r}:\n" + "".join(seen)[-3000:])


def kill_when(proc: subprocess.Popen, text: str, delay_s: float = 0.0) -> None:
    """SIGKILL the whole process group once its output shows `text` (plus a delay)."""
    wait_for(proc, text)
    time.sleep(delay_s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    return out


def stopped(proc: subprocess.Popen) -> str:
    """Output of a run stopped by SIGTERM: status 143, stopped after its checkpoint, not finished."""
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 143 and "stopped by SIGTERM" in out, out[-3000:]
    return out


def exact(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in EXACT_KEYS} for r in records]


def reference_run(nproc: int, cifar_root: Path, out: Path) -> list[dict]:
    """An uninterrupted run, to compare every interrupted one against."""
    finish(start(train_cmd(nproc, cifar_root, out)))
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1]
    return exact(records)


@pytest.fixture(scope="module")
def reference1(cifar_root, tmp_path_factory) -> list[dict]:
    return reference_run(1, cifar_root, tmp_path_factory.mktemp("reference1"))


@pytest.fixture(scope="module")
def reference2(cifar_root, tmp_path_factory) -> list[dict]:
    return reference_run(2, cifar_root, tmp_path_factory.mktemp("reference2"))


@pytest.fixture(params=[1, 2], ids=["1proc", "2proc"])
def reference(request) -> tuple[int, list[dict]]:
    return request.param, request.getfixturevalue(f"reference{request.param}")


def test_sigkill_at_random_moments_then_same_command_gives_identical_metrics(reference, cifar_root, tmp_path):
    nproc, expected = reference
    rng = random.Random(nproc)
    out = tmp_path / "run"
    for kill in range(2):
        kill_when(start(train_cmd(nproc, cifar_root, out)), "step ", rng.uniform(0.2, 3.0))  # mid-training
    finish(start(train_cmd(nproc, cifar_root, out)))
    assert exact(read_metrics(out)) == expected  # every epoch once, every number the same


def test_elastic_restart_after_a_worker_dies(cifar_root, tmp_path, reference2):
    out = tmp_path / "run"
    proc = start(train_cmd(2, cifar_root, out, max_restarts=2))
    wait_for(proc, "epoch 0 step 8/")
    workers = [int(p) for p in subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "imagenet_resnet.train"],
                                              capture_output=True, text=True).stdout.split()]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # one worker dies mid-epoch; torchrun restarts the group
    output = finish(proc)
    assert "resumed from" in output
    assert exact(read_metrics(out)) == reference2


def test_sigterm_checkpoints_at_a_step_boundary_and_exits_cleanly(cifar_root, tmp_path, reference1):
    """One plain process; torchrun and the launch scripts: test_sigterm_to_the_launcher_..."""
    nproc, expected = 1, reference1
    out = tmp_path / "run"
    proc = start(train_cmd(nproc, cifar_root, out))
    wait_for(proc, "epoch 1 step 2/")
    proc.send_signal(signal.SIGTERM)  # to torchrun for 2 processes: it passes SIGTERM on to its workers
    output = proc.communicate(timeout=300)[0]
    assert "stopped by SIGTERM at epoch 1" in output, output[-3000:]
    assert proc.returncode == (143 if nproc == 1 else 1)  # torchrun itself, signalled, ends with 1
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["position"]["epoch"] == 1 and state["position"]["step_in_epoch"] > 0
    finish(start(train_cmd(nproc, cifar_root, out)))
    assert exact(read_metrics(out)) == expected


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(cifar_root, tmp_path, reference1):
    out = tmp_path / "run"
    finish(start(train_cmd(1, cifar_root, out, "run.checkpoint_every_steps=0")))
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])  # a truncated write
    output = finish(start(train_cmd(1, cifar_root, out, "run.checkpoint_every_steps=0")))
    assert "last.pt: unreadable checkpoint" in output and "trying the previous checkpoint" in output
    assert "resumed from" in output and "last.pt.prev: epoch 1, step 0" in output
    assert exact(read_metrics(out)) == reference1


def test_explicit_resume_path_into_a_new_folder(cifar_root, tmp_path, reference1):
    first = tmp_path / "first"
    kill_when(start(train_cmd(1, cifar_root, first)), "epoch 1 step 4/")
    epoch = torch.load(first / "last.pt", weights_only=True)["position"]["epoch"]
    second = tmp_path / "second"
    output = finish(start(train_cmd(1, cifar_root, second, f"run.resume={first / 'last.pt'}")))
    assert f"resumed from {first / 'last.pt'}: epoch {epoch}" in output
    assert exact(read_metrics(second)) == reference1[epoch:]


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_checkpoint(cifar_root, tmp_path):
    out = tmp_path / "run"  # 2 processes: the ranks must agree to stop
    finish(start(train_cmd(2, cifar_root, out, "schedule.epochs=1", "run.checkpoint_every_steps=0")))
    before = (out / "last.pt").read_bytes()
    proc = start(train_cmd(2, cifar_root, out, "optim.base_lr=1e12", "run.checkpoint_every_steps=0"))
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert "non-finite training loss at epoch 1, step" in output
    assert (out / "last.pt").read_bytes() == before
    assert [r["epoch"] for r in read_metrics(out)] == [0]


@pytest.mark.parametrize("policy, expect", [
    ("keep_global_batch", "global batch 32 -> 32 = 16 x 1 process(es) x 2 accumulation step(s), from 2 -> 1 processes "
                          "(run.on_world_size_change=keep_global_batch); lr 0.1"),
    ("scale_lr", "global batch 32 -> 16 = 16 x 1 process(es) x 1 accumulation step(s), from 2 -> 1 processes "
                 "(run.on_world_size_change=scale_lr); lr 0.05"),
])
def test_resume_on_a_different_world_size_follows_the_policy(cifar_root, tmp_path, policy, expect):
    out = tmp_path / "run"  # starts on 2 processes, resumes on 1
    kill_when(start(train_cmd(2, cifar_root, out, "optim.base_lr=0.8")), "epoch 1 step 5/")
    output = finish(start(train_cmd(1, cifar_root, out, "optim.base_lr=0.8", "data.batch_size=16",
                                    f"run.on_world_size_change={policy}")))
    assert f"resume: {expect}" in output
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1] and records[-1]["val_images"] == 110


IMAGENET_STOP_ARGS = ["data.image_size=32", "data.batch_size=4", "data.workers=2", "schedule.epochs=2",
                      "schedule.warmup_epochs=0", "run.log_every_steps=1", "run.checkpoint_every_steps=0",
                      "wandb.mode=disabled"]


def launched(imagenet_root: Path, out: Path, loader: str) -> subprocess.Popen:
    """launch/single_node.sh with 2 processes, each with 2 loader worker processes (DALI: threads)."""
    return subprocess.Popen(
        [
            "bash",
            "launch/single_node.sh",
            "configs/imagenet_resnet18.yaml",
            f"data.root={imagenet_root}",
            f"data.loader={loader}",
            f"run.out_dir={out}",
            *IMAGENET_STOP_ARGS,
        ],
        cwd=REPO,
        env={**cli_env(), "NPROC": "2", "PYTHON": sys.executable},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def imagenet_reference(imagenet_root, tmp_path_factory) -> Callable[[str], list[dict]]:
    done: dict[str, list[dict]] = {}

    def reference(loader: str) -> list[dict]:
        if loader not in done:
            out = tmp_path_factory.mktemp(f"reference_{loader}")
            finish(launched(imagenet_root, out, loader))
            done[loader] = exact(read_metrics(out))
        return done[loader]

    return reference


def test_sigterm_to_the_launcher_with_loader_workers_checkpoints_and_resumes_exactly(imagenet_root, tmp_path,
                                                                                     imagenet_reference):
    """torchrun signals each rank's whole process group: DataLoader workers must not die of it first.
    (DALI reads in threads, not processes; its mid-epoch state across a kill is tested in
    test_recipes' DALI run, and this test takes a minute per loader.)"""
    out, loader = tmp_path / "run", "torchvision"
    proc = launched(imagenet_root, out, loader)
    wait_for(proc, "epoch 1 step 3/")
    proc.send_signal(signal.SIGTERM)
    output = stopped(proc)
    assert "stopped by SIGTERM at epoch 1" in output and "killed by signal" not in output, output[-3000:]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["position"]["epoch"] == 1 and state["position"]["step_in_epoch"] > 0
    finish(launched(imagenet_root, out, loader))
    assert exact(read_metrics(out)) == imagenet_reference(loader)


def test_slurm_script_checkpoints_and_requeues_on_the_time_limit_signal(imagenet_root, tmp_path, imagenet_reference):
    """launch/slurm.sbatch on a machine without Slurm: `srun` runs its command, `scontrol` logs its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec \"$@\"\n")
    calls = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n"
                                      "[[ $1 == show ]] && echo localhost\nexit 0\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    out = tmp_path / "run"
    env = dict(cli_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable,
               CONFIG="configs/imagenet_resnet18.yaml", SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1",
               SLURM_JOB_ID="4242", GPUS_PER_NODE="2", RDZV_PORT="29533")
    args = [f"data.root={imagenet_root}", "data.loader=torchvision", f"run.out_dir={out}", *IMAGENET_STOP_ARGS]
    job = subprocess.Popen(["bash", "launch/slurm.sbatch", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(job, "epoch 0 step 6/")
    job.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@180` delivers before the time limit
    output = job.communicate(timeout=300)[0]
    assert job.returncode == 0, output[-3000:]
    assert "checkpointing and requeueing job 4242" in output and "stopped by SIGTERM at epoch 0" in output
    assert "not 143" not in output and "killed by signal" not in output  # the step ended as a clean stop does
    assert "requeue 4242" in calls.read_text()
    assert torch.load(out / "last.pt", weights_only=True)["position"]["step_in_epoch"] > 0
    finish(launched(imagenet_root, out, "torchvision"))  # the requeued job: the same command
    assert exact(read_metrics(out)) == imagenet_reference("torchvision")


def rank_pids(torchrun: subprocess.Popen, count: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes, read from their environment."""
    deadline = time.time() + 60
    while time.time() < deadline:
        pids = subprocess.run(["pgrep", "-P", str(torchrun.pid), "-f", "imagenet_resnet.train"], capture_output=True,
                              text=True).stdout.split()
        ranks = {}
        for pid in pids:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((int(v.split(b"=")[1]) for v in env if v.startswith(b"RANK=")), None)
            if rank is not None:
                ranks[rank] = int(pid)
        if len(ranks) == count:
            return ranks
        time.sleep(0.5)
    raise AssertionError("torchrun's workers not found")


def test_a_hung_rank_ends_the_group_after_the_timeout_and_the_restart_finishes_exactly(cifar_root, tmp_path,
                                                                                       reference2):
    out = tmp_path / "run"
    proc = start(train_cmd(2, cifar_root, out, "run.collective_timeout_s=10", max_restarts=1))
    wait_for(proc, "epoch 0 step 5/")
    os.kill(rank_pids(proc, 2)[1], signal.SIGSTOP)  # a frozen rank: it neither works nor exits
    output = finish(proc)  # torchrun restarts the group once rank 0 gives up waiting
    assert "rank 0: a collective timed out after 10 s (run.collective_timeout_s) at epoch 0 step" in output, output[
        -3000:
    ]
    assert "resumed from" in output
    assert exact(read_metrics(out)) == reference2  # every epoch once, every number as if nothing happened


def test_compiled_ddp_trains_resumes_after_sigkill_and_matches_eager(cifar_root, tmp_path, reference2):
    """run.compile=true compiles the DDP-wrapped module (DDPOptimizer splits the graph at the buckets).
    Inductor's kernels round differently from eager ones, and this tiny run at a high lr amplifies
    that: the first steps' losses agree to 1e-3, the epochs' figures within the tolerances below."""
    out = tmp_path / "compiled"
    kill_when(start(train_cmd(2, cifar_root, out, "run.compile=true")), "epoch 1 step 4/", 0.5)
    output = finish(start(train_cmd(2, cifar_root, out, "run.compile=true"), TORCH_LOGS="ddp_graphs"))
    assert "resumed from" in output
    assert "[__ddp_graphs] ---split graph---" in output  # compiled around DDP: split at its buckets
    state = load_file(out / "last.pt")
    assert not any(key.startswith(("_orig_mod.", "module.")) for key in state["model"])
    compiled = exact(read_metrics(out))
    assert [r["epoch"] for r in compiled] == [0, 1]  # every epoch once, across the kill
    for got, want in zip(compiled, reference2):
        assert got["lr"] == want["lr"] and got["val_images"] == want["val_images"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=0.15)
        assert abs(got["val_top1"] - want["val_top1"]) <= 5.0


def test_a_stuck_loader_worker_ends_the_run_naming_the_data_loader(imagenet_root: Path, vfat: Path, tmp_path):
    """A single process whose DataLoader worker stops delivering stops after run.collective_timeout_s
    with one line, instead of waiting forever. The stall is real: the images are on a FUSE mount
    whose daemon the test freezes, so the worker's read waits in the kernel as on a stalled NFS."""
    image = vfat.parent / "fat.img"
    for path in sorted(imagenet_root.rglob("*")):  # FAT keeps no modes or times: copy bytes only
        target = vfat / "imagenet" / path.relative_to(imagenet_root)
        if path.is_dir():
            target.mkdir(parents=True)
        else:
            shutil.copyfile(path, target)
    subprocess.run(["fusermount", "-u", str(vfat)], check=True)  # remount: nothing left in the page cache
    subprocess.run(["fusefat", "-o", "ro", str(image), str(vfat)], check=True)
    daemon = int(
        subprocess.run(["pgrep", "-f", f"fusefat -o ro {image}"], capture_output=True, text=True).stdout.split()[0]
    )
    cmd = [sys.executable, "-m", "imagenet_resnet.train", "--config", "configs/imagenet_resnet18.yaml",
           f"data.root={vfat / 'imagenet'}", f"run.out_dir={tmp_path / 'run'}", "data.loader=torchvision",
           "data.workers=1", "data.batch_size=4", "data.image_size=32", "schedule.epochs=1",
           "schedule.warmup_epochs=0", "run.log_every_steps=1", "run.collective_timeout_s=5", "wandb.mode=disabled"]
    proc = start(cmd)
    guard = threading.Timer(120, proc.kill)  # no report within 2 minutes of the stall: fail, not hang
    try:
        wait_for(proc, "epoch 0 step 1/")
        os.kill(daemon, signal.SIGSTOP)
        guard.start()
        # The report comes with the mount still frozen. The exit may then wait for it: a worker whose
        # read the daemon had already taken sleeps uninterruptibly, SIGKILL or not, until the answer.
        output = wait_for(proc, "data loader finished no image")
    finally:
        os.kill(daemon, signal.SIGCONT)
        guard.cancel()
    output += proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, output[-3000:]
    assert ("error: the train data loader finished no image for 5 s (run.collective_timeout_s) at epoch 0 batch"
            in output), output[-3000:]
    assert "Traceback" not in output, output


def test_a_rank_slow_to_start_is_not_taken_for_a_hung_one(cifar_root, tmp_path):
    """run.collective_timeout_s=5 applies once every rank has finished its first step: rank 0 held
    for 12 s after building its Trainer (as a slow wandb start would) leaves the others waiting in
    their first collective, and the run trains on."""
    out = tmp_path / "run"
    proc = start(train_cmd(2, cifar_root, out, "schedule.epochs=1", "run.collective_timeout_s=5"))
    ranks = rank_pids(proc, 2)
    wait_for(proc, "global batch 32")  # rank 0's plan line: the end of its start-up
    os.kill(ranks[0], signal.SIGSTOP)
    time.sleep(12)
    os.kill(ranks[0], signal.SIGCONT)
    output = finish(proc)
    assert "timed out" not in output and len(read_metrics(out)) == 1


def test_a_slowed_rank_shows_as_the_slowest_in_every_epochs_record(cifar_root, tmp_path):
    """Stragglers, visible: rank 1 is slowed from outside (SIGSTOP/SIGCONT cycles, nothing in the
    package knows), and each epoch's record names it, with its own step time well above rank 0's."""
    out = tmp_path / "run"
    proc = start(
        train_cmd(2, cifar_root, out, "data.batch_size=8", "schedule.epochs=2", "run.checkpoint_every_steps=0")
    )
    wait_for(proc, "epoch 0 step 1/")
    slowed = rank_pids(proc, 2)[1]
    try:
        while proc.poll() is None:
            os.kill(slowed, signal.SIGSTOP)  # stopped three quarters of the time
            time.sleep(0.15)
            os.kill(slowed, signal.SIGCONT)
            time.sleep(0.05)
    except ProcessLookupError:
        pass  # rank 1 finished
    finish(proc)
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert (r["rank_slowest"], r["rank_fastest"]) == (1, 0), r
        assert r["rank_step_s_slowest"] > 1.5 * r["rank_step_s_fastest"], r
        assert 0 <= r["rank_data_wait_fastest"] <= 1 and 0 <= r["rank_data_wait_slowest"] <= 1
