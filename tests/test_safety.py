"""Safe to load, one job per run folder, and a failed checkpoint write that loses nothing (issue 14),
with real processes, real torchrun and real files."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, cli_env, run_module
from imagenet_resnet.checkpoint import REQUIRED_KEYS, load_file
from imagenet_resnet.metrics import read_metrics
from test_fault_tolerance import start, stopped, wait_for
from test_integrity import one_error_line

pytestmark = pytest.mark.e2e

LEASE_TIMEOUT = "run.lease_timeout_s=3"


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", "configs/cifar10_resnet20.yaml", f"data.root={root}", f"run.out_dir={out}",
            "data.batch_size=64", "schedule.epochs=1", "wandb.mode=disabled", LEASE_TIMEOUT, *extra]


def train(root: Path, out: Path, *extra: str, check: bool = True):
    return run_module("imagenet_resnet.train", *train_args(root, out, *extra), check=check)


class RunsCode:
    """Unpickling this calls open(marker, "w"): the file appears only if the load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


# --- weights_only loading ---------------------------------------------------------------------


def test_files_whose_pickle_would_run_code_are_refused_by_every_entry_point(cifar_root, tmp_path):
    marker = tmp_path / "marker"
    checkpoint = tmp_path / "evil.pt"
    torch.save({**{key: 0 for key in REQUIRED_KEYS}, "model": RunsCode(marker)}, checkpoint)
    weights = tmp_path / "evil_weights.pt"
    torch.save({"conv1.weight": torch.zeros(16, 3, 3, 3), "fc.bias": RunsCode(marker)}, weights)
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(checkpoint.read_bytes())

    cases = {
        "auto-resume": (train(cifar_root, out, check=False), out / "last.pt"),
        "run.resume": (train(cifar_root, tmp_path / "fresh", f"run.resume={checkpoint}", check=False), checkpoint),
        "evaluate": (run_module("imagenet_resnet.evaluate", "--config", "configs/cifar10_resnet20.yaml",
                                f"data.root={cifar_root}", "--checkpoint", str(checkpoint), check=False), checkpoint),
        "model.init_from": (train(cifar_root, tmp_path / "tuned", f"model.init_from={weights}", check=False), weights),
    }
    for name, (proc, path) in cases.items():
        line = one_error_line(proc, str(path), "refused to load", "io.open", "nothing from it was run")
        assert not marker.exists(), (name, line)
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]  # nothing written beside it
    torch.load(checkpoint, weights_only=False)  # the same file, loaded the unsafe way, does run code
    assert marker.exists()


def test_a_checkpoint_from_before_the_rule_names_the_upgrade_command_and_then_resumes(cifar_root, tmp_path):
    out = tmp_path / "run"
    train(cifar_root, out)
    old_format(out / "last.pt")
    command = f"python -m imagenet_resnet.checkpoint upgrade {out / 'last.pt'}"
    one_error_line(train(cifar_root, out, "schedule.epochs=2", check=False), "older imagenet_resnet", command)
    upgraded = run_module("imagenet_resnet.checkpoint", "upgrade", str(out / "last.pt"))
    assert "original is kept as" in upgraded.stdout and (out / "last.pt.orig").is_file()
    assert "left as it is" in run_module("imagenet_resnet.checkpoint", "upgrade", str(out / "last.pt")).stdout
    assert f"resumed from {out / 'last.pt'}: epoch 1" in train(cifar_root, out, "schedule.epochs=2").stdout
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]


# --- one job per run folder -------------------------------------------------------------------


def running_job(root: Path, out: Path, *extra: str) -> subprocess.Popen:
    proc = start([sys.executable, "-m", "imagenet_resnet.train",
                  *train_args(root, out, "schedule.epochs=2", "data.batch_size=16", "run.log_every_steps=1", *extra)])
    wait_for(proc, "epoch 0 step 2/")
    return proc


def test_a_second_job_on_a_held_folder_stops_naming_the_holder_and_changes_nothing(cifar_root, tmp_path):
    out = tmp_path / "run"
    first = running_job(cifar_root, out, "schedule.epochs=100")  # busy until stopped below
    second = train(cifar_root, out, "schedule.epochs=100", check=False)
    line = one_error_line(second, str(out), "in use by host", f"PID {first.pid}", "Nothing was changed")
    assert "model cifar_resnet20" not in second.stdout, line  # it never got as far as starting a run
    nproc2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "imagenet_resnet.train", *train_args(cifar_root, out, "schedule.epochs=100")],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert nproc2.returncode != 0 and f"PID {first.pid}" in nproc2.stderr  # under torchrun: stops, no rank waits
    assert first.poll() is None  # the holder ran on throughout
    first.send_signal(signal.SIGTERM)
    stopped(first)
    epochs = [r["epoch"] for r in read_metrics(out)]
    assert epochs == list(range(len(epochs)))  # each epoch logged once, by the holder
    assert not (out / "lease.json").exists()  # released at the end


def test_a_killed_holder_frees_the_folder_at_once_on_its_own_host(cifar_root, tmp_path):
    out = tmp_path / "run"
    first = running_job(cifar_root, out, "run.checkpoint_every_steps=2", "run.lease_timeout_s=600")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (out / "lease.json").is_file()
    started = time.monotonic()
    proc = train(cifar_root, out, "schedule.epochs=2", "run.lease_timeout_s=600")
    assert "taken over from host" in proc.stderr and f"its process {first.pid} is gone" in proc.stderr
    assert time.monotonic() - started < 600  # it did not wait out the 10-minute lease
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]


def beat(lease: Path, stop: threading.Event) -> None:
    """A job on another node of a shared filesystem: renews its lease every half second."""
    record = {"token": "other", "host": "node-b", "pid_namespace": "1", "pid": 4242, "job": "77",
              "since": "2026-11-24T10:00:00+00:00", "beat": 0}
    while not stop.is_set():
        record["beat"] += 1
        tmp = lease.with_name("lease.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, lease)
        stop.wait(0.5)


def test_a_lease_from_another_node_blocks_while_renewed_and_is_taken_once_it_stops(cifar_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stop = threading.Event()
    other = threading.Thread(target=beat, args=(out / "lease.json", stop))
    other.start()
    try:
        one_error_line(train(cifar_root, out, check=False), "in use by host node-b PID 4242, Slurm job 77")
    finally:
        stop.set()
        other.join()
    proc = train(cifar_root, out)  # node-b died: its last heartbeat stays as it was
    assert "taken over from host node-b PID 4242" in proc.stderr and "no heartbeat for 3 s" in proc.stderr
    assert [r["epoch"] for r in read_metrics(out)] == [0]


def test_a_job_that_lost_its_folder_while_frozen_stops_without_writing(cifar_root, tmp_path):
    """A hung node (SIGSTOP) stops renewing; a requeued job takes over; the old one, thawed, writes nothing."""
    out = tmp_path / "run"
    frozen = running_job(cifar_root, out)
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        successor = train(cifar_root, out, "schedule.epochs=2")
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert "no heartbeat for 3 s" in successor.stderr
    written = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "lease.json"}
    output = frozen.communicate(timeout=300)[0]
    assert frozen.returncode == 2 and "no longer holds the run folder" in output, output[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == written
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]


# --- a checkpoint write that fails ------------------------------------------------------------


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_says_why(cifar_root, tmp_path):
    out = tmp_path / "run"
    train(cifar_root, out)
    before = (out / "last.pt").read_bytes()
    limit = len(before) // 4  # `ulimit -f`: the new checkpoint cannot be written in full

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(  # the write of step 3's checkpoint fails in the background
        [sys.executable, "-m", "imagenet_resnet.train",
         *train_args(cifar_root, out, "schedule.epochs=2", "run.checkpoint_every_steps=3", "run.log_every_steps=1")],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        timeout=300,
    )
    one_error_line(
        proc, str(out), "could not write checkpoint last.pt", "File too large", "previous last.pt is unchanged"
    )
    assert (out / "last.pt").read_bytes() == before and not (out / "last.pt.tmp").exists()
    assert load_file(out / "last.pt")["position"]["epoch"] == 1
    assert [r["epoch"] for r in read_metrics(out)] == [0]  # stopped at an agreement point inside epoch 1
    # Seen at the next agreement point (every step here), not only at the next save (step 6).
    assert "epoch 1 step 3/" in proc.stdout and "epoch 1 step 5/" not in proc.stdout
    proc = train(cifar_root, out, "schedule.epochs=2")  # the same command, with room again
    assert f"resumed from {out / 'last.pt'}: epoch 1" in proc.stdout
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]


# --- issue 21: upgrade runs nothing, leases that are garbled or on vfat, the launch pre-check ---


class RunsNumpyCode:
    """Unpickles to numpy.testing's runstring(code): a NumPy global, as an older checkpoint's are."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        from numpy.testing._private.utils import runstring

        return runstring, (f"open({str(self.marker)!r}, 'w')", {})


def test_upgrade_runs_no_code_from_a_crafted_numpy_global(cifar_root, tmp_path):
    marker = tmp_path / "marker"
    out = tmp_path / "run"
    train(cifar_root, out)
    state = load_file(out / "last.pt")
    state["rng"][0]["numpy"] = RunsNumpyCode(marker)
    torch.save(state, out / "last.pt")
    before = (out / "last.pt").read_bytes()
    line = one_error_line(
        train(cifar_root, out, "schedule.epochs=2", check=False), "numpy.testing._private.utils.runstring"
    )
    assert (
        "imagenet_resnet.checkpoint upgrade" not in line
    )  # only a file of exactly the old NumPy RNG globals is sent there
    line = one_error_line(run_module("imagenet_resnet.checkpoint", "upgrade", str(out / "last.pt"), check=False),
                          "refused", "numpy.testing._private.utils.runstring", "nothing from it was run")
    assert not marker.exists() and (out / "last.pt").read_bytes() == before and not (out / "last.pt.orig").exists()
    torch.load(out / "last.pt", weights_only=False)  # control: loaded the unsafe way, the payload runs
    assert marker.exists()


def test_upgrade_refuses_what_is_not_a_checkpoint_in_one_line(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    one_error_line(
        run_module("imagenet_resnet.checkpoint", "upgrade", str(text), check=False), str(text), "not a checkpoint"
    )
    proc = run_module("imagenet_resnet.checkpoint", "upgrade", str(tmp_path), check=False)
    assert proc.returncode == 2 and "is a folder" in proc.stderr and "Traceback" not in proc.stderr
    assert text.read_text() == "not a checkpoint"


def old_format(path: Path) -> None:
    """Rewrite a checkpoint as capture_rng wrote it before: NumPy's own tuple with an ndarray."""
    state = load_file(path)
    for rng in state["rng"]:
        numpy = rng["numpy"]
        rng["numpy"] = (numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                        numpy["cached_gaussian"])
    torch.save(state, path)


def test_upgrade_keeps_the_files_mode(cifar_root, tmp_path):
    out = tmp_path / "run"
    train(cifar_root, out)
    old_format(out / "last.pt")
    os.chmod(out / "last.pt", 0o640)
    run_module("imagenet_resnet.checkpoint", "upgrade", str(out / "last.pt"))
    assert (out / "last.pt").stat().st_mode & 0o777 == 0o640 and load_file(out / "last.pt")


GARBLED_LEASES = {
    "not UTF-8": b"\xff\xfe\x00garbage",
    "a number": b"42",
    "a list": b"[1, 2]",
    "a string": b'"held"',
    "pid abc": json.dumps({"host": "h", "pid": "abc"}).encode(),
    "pid null": json.dumps({"host": "h", "pid": None}).encode(),
    "pid 1e20": b'{"host": "h", "pid": 100000000000000000000}',
    "empty": b"",
}


@pytest.mark.parametrize("content", GARBLED_LEASES.values(), ids=GARBLED_LEASES.keys())
def test_a_garbled_lease_is_taken_over_as_stale_after_the_timeout(tmp_path, capsys, content):
    from imagenet_resnet.lease import hold_lease

    (tmp_path / "lease.json").write_bytes(content)
    with hold_lease(tmp_path, timeout_s=1) as lease:
        assert json.loads((tmp_path / "lease.json").read_text())["token"] == lease.record["token"]
    assert "taken over from a lease file that holds no lease record (unchanged for 1 s)" in capsys.readouterr().err
    assert not (tmp_path / "lease.json").exists()


def test_a_lease_that_cannot_be_read_or_replaced_is_one_line(cifar_root, tmp_path):
    folder = tmp_path / "run_folder"
    (folder / "lease.json").mkdir(parents=True)
    one_error_line(train(cifar_root, folder, check=False), str(folder / "lease.json"), "cannot use", "Is a directory")
    loop = tmp_path / "run_loop"
    loop.mkdir()
    (loop / "lease.json").symlink_to("lease.json")
    one_error_line(train(cifar_root, loop, check=False), "cannot use", "symbolic links")
    dangling = tmp_path / "run_dangling"
    dangling.mkdir()
    (dangling / "lease.json").symlink_to(tmp_path / "nowhere")
    one_error_line(train(cifar_root, dangling, check=False), "cannot use", "link to nothing")
    assert (folder / "lease.json").is_dir() and (loop / "lease.json").is_symlink()


def test_training_runs_on_a_filesystem_without_hard_links(cifar_root, vfat):
    (vfat / "file").write_text("x")
    with pytest.raises(PermissionError):
        os.link(vfat / "file", vfat / "link")  # the filesystem really has none
    from imagenet_resnet.errors import UserError
    from imagenet_resnet.lease import hold_lease

    with hold_lease(vfat / "held", timeout_s=1) as lease:  # exclusive create: a second holder is refused
        assert json.loads((vfat / "held" / "lease.json").read_text())["token"] == lease.record["token"]
        with pytest.raises(UserError, match="in use by host"):
            with hold_lease(vfat / "held", timeout_s=1):
                pass
    out = vfat / "run"
    proc = train(cifar_root, out)
    assert [r["epoch"] for r in read_metrics(out)] == [0] and load_file(out / "last.pt")
    assert not (out / "lease.json").exists(), proc.stderr


def test_the_launch_script_stops_at_once_on_a_held_run_folder(cifar_root, tmp_path):
    out = tmp_path / "run"
    holder = running_job(cifar_root, out, "schedule.epochs=100")
    try:
        proc = subprocess.run(
            ["bash", "launch/single_node.sh", *train_args(cifar_root, out, "schedule.epochs=100")[1:]],
            cwd=REPO,
            env={**cli_env(), "NPROC": "1", "PYTHON": sys.executable},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.send_signal(signal.SIGTERM)
        stopped(holder)
    one_error_line(proc, str(out), f"PID {holder.pid}", "Nothing was changed")
    assert "ChildFailedError" not in proc.stderr and "model cifar_resnet20" not in proc.stdout  # torchrun never ran


def test_upgrade_in_a_read_only_folder_is_one_line_and_changes_nothing(cifar_root, tmp_path, vfat):
    out = tmp_path / "run"
    train(cifar_root, out)
    old_format(out / "last.pt")
    (vfat / "last.pt").write_bytes((out / "last.pt").read_bytes())
    subprocess.run(["fusermount", "-u", str(vfat)], check=True)
    subprocess.run(["fusefat", "-o", "ro", str(tmp_path / "fat.img"), str(vfat)], check=True, capture_output=True)
    proc = run_module("imagenet_resnet.checkpoint", "upgrade", str(vfat / "last.pt"), check=False)
    one_error_line(proc, str(vfat / "last.pt"), "could not write", "the file is unchanged")
    assert (vfat / "last.pt").read_bytes() == (out / "last.pt").read_bytes()
    assert sorted(p.name for p in vfat.iterdir()) == ["last.pt"]
