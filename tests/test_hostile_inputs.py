"""Hostile inputs, round 3 (issue 36): no write through a link, safe extraction, downloads that time
out, and no silent wrong numbers. Real files, a real HTTP server on 127.0.0.1, real sockets."""

from __future__ import annotations

import fcntl
import hashlib
import io
import pickle
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from conftest import run_module
from imagenet_resnet import resume
from imagenet_resnet.checkpoint import Checkpoint, Position, load_file
from imagenet_resnet.config import config_to_dict, load_config
from imagenet_resnet.data import download
from imagenet_resnet.data.datasets import read_cifar, read_mnist, read_synsets
from imagenet_resnet.data.download import ensure_dataset
from imagenet_resnet.data.sizes import train_image_size
from imagenet_resnet.errors import UserError
from imagenet_resnet.metrics import read_metrics, saved_run_id
from imagenet_resnet.optim import plan_text
from test_download import server  # noqa: F401  (the HTTP server fixture)
from test_integrity import one_error_line

# --- writes never go through a link ------------------------------------------------------------


@pytest.mark.e2e
def test_links_planted_in_the_run_folder_are_replaced_not_written_through(cifar_root, tmp_path):
    out, outside = tmp_path / "run", tmp_path / "outside"
    out.mkdir(), outside.mkdir()
    names = ("config.yaml", "wandb_run_id.txt", "metrics.jsonl", "metrics.jsonl.tmp", "last.pt.tmp")
    for name in names:
        (outside / name).write_text(f"the user's own {name}\n")
        (out / name).symlink_to(outside / name)
    run_module("imagenet_resnet.train", "--config", "configs/cifar10_resnet20.yaml", f"data.root={cifar_root}",
               f"run.out_dir={out}", "data.batch_size=128", "schedule.epochs=1", "wandb.mode=offline")
    assert all((outside / name).read_text() == f"the user's own {name}\n" for name in names)
    assert not (out / "config.yaml").is_symlink() and len(read_metrics(out)) == 1


def test_a_linked_download_lock_is_replaced_and_its_target_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    root, precious = tmp_path / "data", tmp_path / "precious.txt"
    root.mkdir()
    precious.write_text("keep me")
    (root / ".download.lock").symlink_to(precious)
    with pytest.raises(UserError, match="could not download it"):
        ensure_dataset(root, "cifar10", "auto")
    assert precious.read_text() == "keep me" and not (root / ".download.lock").is_symlink()


# --- extraction ----------------------------------------------------------------------------------


def serve_archive(served: Path, members: dict[str, bytes | str], monkeypatch) -> None:
    """cifar-10-python.tar.gz with `members` (bytes: a file; str: a symlink to that target), and its md5."""
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())


@pytest.mark.parametrize("members", [
    {"cifar-10-batches-py/data_batch_1": b"x", "../escaped.txt": b"outside"},
    {"cifar-10-batches-py/data_batch_1": b"x", "cifar-10-batches-py/up": "../../escaped.txt"},
    {"cifar-10-batches-py/data_batch_1": b"x", "cifar-10-batches-py/abs": "/tmp/imagenet-resnet-absolute-escape.txt"},
])
def test_an_archive_member_reaching_outside_data_root_is_refused(tmp_path, server, monkeypatch, members):  # noqa: F811
    served, base = server
    serve_archive(served, members, monkeypatch)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", base + "cifar-10-python.tar.gz")
    root = tmp_path / "data"
    with pytest.raises(UserError, match="refused a member of the archive.*nothing extracted"):
        ensure_dataset(root, "cifar10", "auto")
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/imagenet-resnet-absolute-escape.txt").exists()
    assert sorted(p.name for p in root.iterdir()) == [".download.lock"]


def test_an_archive_that_unpacks_past_the_bound_is_refused(tmp_path, server, monkeypatch):  # noqa: F811
    served, base = server
    serve_archive(served, {"cifar-10-batches-py/big": bytes(4096)}, monkeypatch)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", base + "cifar-10-python.tar.gz")
    monkeypatch.setattr(download, "MAX_EXTRACTED_BYTES", 1000)
    with pytest.raises(UserError, match="would unpack to 4,096 bytes, more than 1,000; nothing extracted"):
        ensure_dataset(tmp_path / "data", "cifar10", "auto")


# --- downloads that stop answering ---------------------------------------------------------------


def silent_server(reply: bytes = b"", hang_up: bool = False) -> tuple[str, socket.socket]:
    """A server on 127.0.0.1 that accepts, sends `reply` (maybe nothing), then says nothing more
    (or, with hang_up, closes the connection)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            conn.recv(65536)  # the request, read: a close then ends the stream instead of resetting it
            conn.sendall(reply)
            if hang_up:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/cifar-10-python.tar.gz", listener


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n" + bytes(500)])
def test_a_server_that_stops_answering_ends_the_download_and_frees_the_lock(tmp_path, monkeypatch, reply):
    url, listener = silent_server(reply)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", url)
    root = tmp_path / "data"
    start = time.monotonic()
    with pytest.raises(UserError, match="could not download it.*(timed out|TimeoutError)"):
        ensure_dataset(root, "cifar10", "auto", timeout_s=1)
    assert time.monotonic() - start < 30
    with open(root / ".download.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released: another process may try again
    assert sorted(p.name for p in root.iterdir()) == [".download.lock"]
    listener.close()


@pytest.mark.parametrize(("reply", "error"), [
    (b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n" + bytes(500), "IncompleteRead"),  # not "checksum"
    (b"not HTTP at all\r\n\r\n", "BadStatusLine"),
    (b"HTTP/1.0 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", "LineTooLong"),
])
def test_a_broken_answer_is_one_line(tmp_path, monkeypatch, reply, error):
    url, listener = silent_server(reply, hang_up=True)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", url)
    with pytest.raises(UserError, match=f"could not download it.*{error}"):
        ensure_dataset(tmp_path / "data", "cifar10", "auto", timeout_s=2)
    listener.close()


# --- no silent wrong numbers ---------------------------------------------------------------------


def rewrite_batch(root: Path, change) -> Path:
    path = root / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    with open(path, "wb") as f:
        pickle.dump(change(batch), f, protocol=2)
    return path


@pytest.mark.parametrize(("change", "message"), [
    (lambda b: {**b, "labels": b["labels"][:-3]}, "117 labels for 120 images"),
    (lambda b: {**b, "labels": [10] + b["labels"][1:]}, "label 10 is not a class of this dataset"),
    (lambda b: {**b, "labels": [-100] * len(b["labels"])}, "label -100 is not a class"),
    (lambda b: {**b, "data": b["data"].astype(np.float32)}, "'data' is not a uint8 array"),
    (lambda b: {**b, "labels": "abc"}, "labels are not a list of whole numbers"),
    (lambda b: [b], "not a cifar10 batch file"),
])
def test_cifar_labels_and_images_that_do_not_pair_up_are_refused_naming_the_file(cifar_root, tmp_path, change,
                                                                                 message):
    root = tmp_path / "data"
    import shutil

    shutil.copytree(cifar_root, root)
    path = rewrite_batch(root, change)
    with pytest.raises(UserError, match=f"{path}: .*{message}"):
        read_cifar(root, "cifar10")


def test_mnist_labels_that_do_not_pair_up_are_refused(tmp_path):
    from data_prep.generate import generate_mnist

    generate_mnist(tmp_path, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    data = labels.read_bytes()
    labels.write_bytes(data[:4] + (len(data) - 9).to_bytes(4, "big") + data[8:-1])  # one label short
    with pytest.raises(UserError, match=f"{labels}: 99 labels for 100 images"):
        read_mnist(tmp_path, "mnist")


def test_the_small_datasets_keep_their_own_size_and_say_so():
    with pytest.raises(UserError, match="data.image_size=224: applies to data.dataset=imagenet or folder"):
        load_config("configs/cifar10_resnet20.yaml", ["data.image_size=224"])
    assert train_image_size(load_config("configs/mnist_resnet20.yaml").data, 0) == 28
    assert train_image_size(load_config("configs/cifar10_resnet20.yaml").data, 0) == 32


def test_the_plan_says_when_goyals_warmup_has_nothing_to_rise_to():
    cfg = load_config("configs/imagenet_resnet50.yaml", ["schedule.warmup_from_base_lr=true",
                                                           "schedule.warmup_start_factor=0"])
    assert "no warmup: schedule.warmup_from_base_lr starts at base_lr" in plan_text(cfg, 1, 1, 100)  # 128 images
    assert "warmup 500 steps (5 epochs)" in plan_text(cfg, 4, 1, 100)  # 512 images: a real rise
    sync = load_config("configs/imagenet_resnet50.yaml", ["model.sync_bn=true"])
    assert "model.sync_bn has no effect in one process" in plan_text(sync, 1, 1, 100)
    assert "sync_bn" not in plan_text(sync, 8, 1, 100)


def test_a_new_seed_is_refused_mid_epoch_and_taken_at_an_epochs_start(tmp_path):
    cfg = load_config("configs/cifar10_resnet20.yaml")

    def saved(step_in_epoch: int) -> Checkpoint:
        return Checkpoint(model={}, optimizer={}, position=Position(1, step_in_epoch, 400 + step_in_epoch),
                          train_sums=[], best_top1=0.0, rng=[], loader=[], config=config_to_dict(cfg),
                          num_classes=10, world_size=1, global_batch=128)

    new_seed = load_config("configs/cifar10_resnet20.yaml", ["run.seed=1"])
    with pytest.raises(UserError, match="run.seed: checkpoint 0, now 1 in the middle of epoch 1"):
        resume.config_changes(saved(40), new_seed, 10, tmp_path)
    assert resume.config_changes(saved(0), new_seed, 10, tmp_path) == {"run.seed": (0, 1)}


def test_a_rand_augment_string_without_mstd_runs_on_dali():
    from nvidia.dali import pipeline_def

    from imagenet_resnet.data import dali_augment as da

    policy = da.timm_policy("rand-m9", 64, (0.485, 0.456, 0.406))

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=3)
    def pipe():
        return da.draw(policy).magnitude_bin

    built = pipe()
    built.build()
    (bins,) = built.run()
    assert {int(b) for sample in bins for b in np.asarray(sample)} == {900}  # magnitude 9, every layer


@pytest.mark.parametrize(("override", "message"), [
    ("data.auto_augment=rand-n100-m9", "n100: expected 1 to 10 ops"),
    ("data.auto_augment=rand-m9-mmax1000", "mmax1000: expected 0 to 30"),
    ("data.workers=²", "data.workers='²'"),
    ("wandb.project=a/b", "wandb.project='a/b'"),
])
def test_values_no_loader_or_service_can_take_are_refused_by_key(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_config("configs/imagenet_resnet18.yaml", [override])


def test_files_of_the_wrong_kind_are_one_line_naming_them(tmp_path):
    garbled = tmp_path / "wandb_run_id.txt"
    garbled.write_bytes(b"\xff\xfe not an id")
    with pytest.raises(UserError, match=f"{garbled}: not a wandb run id"):
        saved_run_id(garbled)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n[1, 2]\n{"epoch": 1}\n')
    with pytest.raises(UserError, match="line 2 is not an epoch record"):
        read_metrics(tmp_path)
    (tmp_path / "synsets.txt").write_bytes(b"0 n01440764 tench\n1 n01443537 gold\xfffish\n")
    with pytest.raises(UserError, match="synsets.txt: not UTF-8 text"):
        read_synsets(tmp_path)
    (tmp_path / "cifar-10-batches-py").write_text("a file, not the folder")
    with pytest.raises(UserError, match="cifar-10-batches-py: is a file"):
        ensure_dataset(tmp_path, "cifar10", "auto")
    with pytest.raises(UserError, match="cifar-10-batches-py: is a file"):
        read_cifar(tmp_path, "cifar10")


def test_a_checkpoint_whose_config_is_not_a_mapping_is_refused(cifar_root, tmp_path):
    cfg = load_config("configs/cifar10_resnet20.yaml")
    state = Checkpoint(model={}, optimizer={}, position=Position(), train_sums=[], best_top1=0.0, rng=[], loader=[],
                       config=config_to_dict(cfg), num_classes=10, world_size=1, global_batch=128).to_state()
    torch.save({**state, "config": ["not", "a", "mapping"]}, tmp_path / "last.pt")
    with pytest.raises(UserError, match="not a checkpoint written by imagenet_resnet training \\(config of the"):
        load_file(tmp_path / "last.pt")
    proc = run_module("imagenet_resnet.evaluate", "--checkpoint", str(tmp_path / "last.pt"), check=False)
    one_error_line(proc, "last.pt", "config of the wrong kind")


def test_a_full_disk_during_download_is_named_as_the_disk_not_the_network(tmp_path, server):  # noqa: F811
    import resource
    import signal
    import subprocess
    import sys

    from conftest import REPO, cli_env

    served, base = server
    (served / "cifar-10-python.tar.gz").write_bytes(bytes(300_000))
    script = (f"import torchvision; torchvision.datasets.CIFAR10.url = {base + 'cifar-10-python.tar.gz'!r}\n"
              "from imagenet_resnet.cli import run_main\n"
              "from imagenet_resnet.data.download import ensure_dataset\nfrom pathlib import Path\n"
              f"run_main(lambda: ensure_dataset(Path({str(tmp_path / 'data')!r}), 'cifar10', 'auto'))\n")

    def small_disk() -> None:  # files over 100 kB fail with EFBIG, as a full quota or disk would
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          preexec_fn=small_disk, timeout=120)
    line = one_error_line(proc, str(tmp_path / "data"), "cannot write the download there", "Nothing was kept")
    assert "could not download" not in line and not list((tmp_path / "data").glob(".partial-*"))


def test_a_file_in_torch_hubs_cache_that_is_not_the_published_one_is_refused(tmp_path, monkeypatch):
    from imagenet_resnet.published import load_published

    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url  # .../resnet18-f37072fd.pth
    cached = tmp_path / "hub" / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(np.random.default_rng(0).bytes(4096))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=f"{cached} is not the published file .*does not start with f37072fd"):
        load_published("torchvision:resnet18.IMAGENET1K_V1")
