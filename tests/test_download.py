"""Public datasets on first use (issue 24): the real download path (torchvision's URL and checksum
attributes pointed at a local HTTP server serving archives in the real formats), a corrupted archive
refused with nothing half-extracted, and the offline message."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import tarfile
import threading
from functools import partial
from pathlib import Path

import pytest
import torchvision

from data_prep.generate import generate_cifar, generate_mnist
from imagenet_resnet.config import load_config
from imagenet_resnet.data.download import ensure_dataset
from imagenet_resnet.errors import UserError


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/served; yields its base URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def cifar_archive(tmp_path: Path, served: Path) -> str:
    """cifar-10-python.tar.gz as released (the cifar-10-batches-py folder inside); returns its md5."""
    source = generate_cifar(tmp_path / "source", "cifar10", train_per_class=20, val_per_class=5)
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return hashlib.md5(archive.read_bytes()).hexdigest()


def test_cifar_downloads_verifies_extracts_and_trains(tmp_path, server, monkeypatch, capsys):
    served, base = server
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", base + "cifar-10-python.tar.gz")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", cifar_archive(tmp_path, served))
    root = tmp_path / "data"
    from imagenet_resnet.train import run_training

    records = run_training(load_config("configs/cifar10_resnet20.yaml", [
        f"data.root={root}", f"run.out_dir={tmp_path / 'run'}", "schedule.epochs=1", "data.batch_size=50",
        "wandb.mode=disabled", "run.log_every_steps=100"]))
    assert records[0]["val_images"] == 50 and (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert sorted(p.name for p in root.iterdir()) == [".download.lock", "cifar-10-batches-py"]  # no archive, no temp
    ensure_dataset(root, "cifar10", "auto")  # present: nothing fetched again (the server would still answer)


def test_a_corrupted_archive_is_refused_and_nothing_is_left_as_if_complete(tmp_path, server, monkeypatch):
    served, base = server
    md5 = cifar_archive(tmp_path, served)
    archive = served / "cifar-10-python.tar.gz"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", base + "cifar-10-python.tar.gz")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", md5)
    root = tmp_path / "data"
    with pytest.raises(UserError, match="does not match torchvision's checksum .*nothing extracted"):
        ensure_dataset(root, "cifar10", "auto")
    assert [p.name for p in root.iterdir()] == [".download.lock"]  # no archive, no folder, no temporary


def test_offline_is_one_line_naming_the_url_and_where_it_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "url", "http://127.0.0.1:9/cifar-100-python.tar.gz")
    with pytest.raises(UserError) as err:
        ensure_dataset(tmp_path / "data", "cifar100", "auto")
    text = str(err.value)
    assert "\n" not in text and "could not download it: http://127.0.0.1:9/cifar-100-python.tar.gz" in text
    assert f"its extracted cifar-100-python in {tmp_path / 'data'}" in text
    ensure_dataset(tmp_path / "never", "cifar100", "never")  # never: no attempt, the reader says what is missing
    assert not (tmp_path / "never").exists()


def test_mnist_downloads_from_the_next_mirror_when_one_fails(tmp_path, server, monkeypatch):
    served, base = server
    generate_mnist(served, gz=False)
    for path in list(served.iterdir()):  # as the mirrors serve them: gzipped
        (served / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    resources = [(path.name, hashlib.md5(path.read_bytes()).hexdigest()) for path in sorted(served.iterdir())]
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/", base])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    root = tmp_path / "data"
    ensure_dataset(root, "mnist", "auto")
    from imagenet_resnet.data.datasets import read_mnist

    train_x, train_y, val_x, val_y = read_mnist(root, "mnist")
    assert train_x.shape[1:] == (1, 28, 28) and len(val_y) == 100
