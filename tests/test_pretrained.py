"""Published weights on a prepared ImageNet (issue 24): torchvision's weights from torch hub's cache,
their own transform, labels matched by WNID, the offline message, and check-imagenet's diagnosis.

No network here: the "published" ResNet-18 is a state_dict written into a temporary torch hub cache.
It is built by hand to classify the generated images by their colour (each generated class has
one), so a right and a wrong label mapping give different scores."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, built_once, cli_env, prepare
from data_prep.generate import generate
from imagenet_resnet.published import diagnosis, imagenet_wnids

SOURCE = "torchvision:resnet18.IMAGENET1K_V1"


@pytest.fixture(scope="session")
def subset(tmp_path_factory) -> Path:
    """A prepared set of 6 real ImageNet-1k classes that are not the first 6 (outputs 10, 100, ...)."""
    def build(folder: Path) -> Path:
        wnids = [imagenet_wnids()[i] for i in (10, 100, 207, 500, 817, 999)]
        src = generate(folder / "archives", train_per_class=(2, 3), val_per_class=3, size=(64, 56), seed=3,
                       plant_problems=False, wnids=wnids)
        return prepare(src, folder / "prepared" / "imagenet")

    return built_once(tmp_path_factory, "subset", build)


def colour_resnet18() -> torch.nn.Module:
    """A torchvision ResNet-18 whose features are the image's (max-pooled) mean colour: stem conv
    passes R, G, B; every block is an identity (last BN gamma 0, downsample passes the colours)."""
    import torchvision

    net = torchvision.models.resnet18()
    state = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    for c in range(3):
        state["conv1.weight"][c, c, 3, 3] = 1.0
    for key in state:
        if key.endswith("running_var"):
            state[key].fill_(1.0)
    state["bn1.weight"][:3], state["bn1.bias"][:3] = 1.0, 5.0  # keep the colours positive through the ReLU
    for stage in (2, 3, 4):
        for c in range(3):
            state[f"layer{stage}.0.downsample.0.weight"][c, c, 0, 0] = 1.0
        state[f"layer{stage}.0.downsample.1.weight"].fill_(1.0)
    net.load_state_dict(state)
    return net.eval()


@pytest.fixture(scope="session")
def torch_home(subset, tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "torch_home", lambda home: colour_hub_cache(subset, home))


def hub_file(torch_home: Path) -> Path:
    return next((torch_home / "hub" / "checkpoints").iterdir())


def published_env(torch_home: Path) -> dict[str, str]:
    """The environment of a process that reads torch_home's weights as torchvision's ResNet-18: the
    weights' URL names the cached file, whose sha256 prefix is right (tests/published_url/)."""
    url = "https://download.pytorch.org/models/" + hub_file(torch_home).name
    return cli_env() | {"TORCH_HOME": str(torch_home), "IMAGENET_RESNET_TEST_RESNET18_URL": url,
                        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests' / 'published_url'}"}


def colour_hub_cache(subset: Path, home: Path) -> Path:
    """torch hub's cache holding the colour ResNet-18 under the file name torchvision's URL gives,
    its fc a nearest-centroid classifier over the subset's classes, centroids from its val images."""
    import torchvision
    from torchvision.datasets import ImageFolder

    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    net = colour_resnet18()
    fc, net.fc = net.fc, torch.nn.Identity()
    folder = ImageFolder(str(subset / "val"), transform=weights.transforms())
    with torch.no_grad():
        feats = torch.stack([net(image[None])[0] for image, _ in folder])
    labels = torch.tensor(folder.targets)
    outputs = [imagenet_wnids().index(wnid) for wnid in folder.classes]
    fc.weight.data.zero_()
    fc.bias.data.fill_(-1e4)
    for k, out in enumerate(outputs):
        centre = feats[labels == k].mean(0)
        fc.weight.data[out] = 2 * centre
        fc.bias.data[out] = -centre.square().sum()
    net.fc = fc
    (home / "hub" / "checkpoints").mkdir(parents=True)
    saved = home / "hub" / "checkpoints" / "resnet18.pth"
    torch.save(net.state_dict(), saved)
    sha = hashlib.sha256(saved.read_bytes()).hexdigest()[:8]  # named as published files are: resnet18-<sha>.pth
    saved.rename(saved.with_name(f"resnet18-{sha}.pth"))
    return home


def evaluate_cli(root: Path, torch_home: Path, *extra: str) -> subprocess.CompletedProcess:
    env = published_env(torch_home) if torch_home.exists() else cli_env() | {"TORCH_HOME": str(torch_home)}
    env |= {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    return subprocess.run([sys.executable, "-m", "imagenet_resnet.evaluate", "--pretrained", SOURCE,
                           f"data.root={root}", "data.workers=0", *extra], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def independent_loop(root: Path, torch_home: Path) -> tuple[float, float]:
    """torchvision's own way, image by image: ImageFolder, weights.transforms(), outputs by WNID."""
    import torchvision
    from torchvision.datasets import ImageFolder

    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    net = torchvision.models.resnet18()
    net.load_state_dict(torch.load(hub_file(torch_home), weights_only=True))
    folder = ImageFolder(str(root / "val"), transform=weights.transforms())
    order = imagenet_wnids()
    top1 = top5 = 0
    with torch.no_grad():
        for image, label in folder:
            best = net.eval()(image[None])[0].topk(5).indices.tolist()
            target = order.index(folder.classes[label])
            top1 += best[0] == target
            top5 += target in best
    return 100 * top1 / len(folder), 100 * top5 / len(folder)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def by_source(subset, torch_home) -> dict:
    return last_json(evaluate_cli(subset, torch_home))


def test_published_weights_score_as_torchvisions_own_loop_with_labels_by_wnid(subset, torch_home, by_source):
    result = by_source
    top1, top5 = independent_loop(subset, torch_home)
    assert (result["val_top1"], result["val_top5"], result["val_images"]) == (top1, top5, 18)
    assert top1 > 80  # the colour classifier is right on (nearly) all: the mapping by WNID holds
    assert (result["published_top1"], result["published_top5"]) == (69.758, 89.078)  # weights.meta


def test_the_dali_loader_scores_the_same_weights_at_the_same_sizes(subset, torch_home):
    result = last_json(evaluate_cli(subset, torch_home, "data.loader=dali"))
    assert result["loader"] == "dali" and result["val_images"] == 18
    assert result["val_top1"] > 80  # DALI's resize differs from PIL's a little: not bit-equal, as good


def test_a_class_outside_imagenet_1k_is_refused_naming_it(imagenet_root, torch_home):
    proc = evaluate_cli(imagenet_root, torch_home)
    assert proc.returncode == 2 and "not among ImageNet-1k's 1000" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_offline_with_nothing_cached_is_one_line(subset, tmp_path):
    proc = evaluate_cli(subset, tmp_path / "empty_home")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "not in torch hub's cache and could not download https://download.pytorch.org/models/resnet18" in proc.stderr
    assert str(tmp_path / "empty_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in proc.stderr


def test_a_damaged_val_image_is_one_line_naming_it_also_from_loader_workers(subset, torch_home, tmp_path):
    damaged = tmp_path / "imagenet"
    shutil.copytree(subset, damaged)
    first = (damaged / "val.txt").read_text().split()[0]
    (damaged / "val" / first).write_bytes(b"not a JPEG")
    proc = evaluate_cli(damaged, torch_home, "data.workers=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{damaged / 'val' / first}: unreadable image" in errors[0], proc.stderr


def test_check_imagenet_names_a_label_mapping_that_does_not_fit(subset, torch_home, tmp_path):
    """make check-imagenet (with the test's ResNet-18 for its ResNet-50). The val labels shuffled (as an
    ILSVRC2012_ID mapping would leave them): FAIL, the diagnosis
    names the labels, exit 1. The same set as prepared fails too (a 6-class set is not ImageNet's
    50,000 at 69.76), but not on its labels."""
    shuffled = tmp_path / "imagenet"
    shutil.copytree(subset, shuffled)
    lines = (shuffled / "val.txt").read_text().splitlines()
    labels = [line.rpartition(" ")[2] for line in lines]
    labels = labels[3:] + labels[:3]  # every image with another image's label
    (shuffled / "val.txt").write_text(
        "".join(f"{line.rpartition(' ')[0]} {label}\n" for line, label in zip(lines, labels))
    )
    env = published_env(torch_home) | {"https_proxy": "http://127.0.0.1:9"}
    proc = subprocess.run(["make", "-s", "check-imagenet", f"DEST={shuffled}", f"CHECK_WEIGHTS={SOURCE}",
                           f"PY={sys.executable}", "ARGS=data.workers=0"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "FAIL: top-1" in proc.stdout and "the val labels do not belong to the images" in proc.stdout, proc.stdout
    assert "DALI loader at the same sizes: top-1" in proc.stdout
    as_prepared = evaluate_cli(subset, torch_home, "--check")
    assert as_prepared.returncode == 1 and "labels do not belong" not in as_prepared.stdout


def test_the_diagnosis_of_each_way_a_prepared_imagenet_goes_wrong():
    assert diagnosis(76.13, 50_000, 76.13, classes=1000) is None
    assert diagnosis(76.05, 50_000, 76.13, classes=1000) is None  # within 0.1
    assert "not 50,000" in diagnosis(76.13, 49_000, 76.13, classes=1000)
    assert "subset of 6 classes" in diagnosis(99.0, 18, 69.758, classes=6)
    assert "val labels do not belong" in diagnosis(0.1, 50_000, 76.13, classes=1000)
    assert "below the published" in diagnosis(73.0, 50_000, 76.13, classes=1000)


TIMM_SOURCE = "timm:resnet18.a1_in1k"


@pytest.fixture(scope="module")
def hf_home(torch_home, tmp_path_factory) -> Path:
    """Hugging Face's hub cache holding timm/resnet18.a1_in1k: the colour ResNet-18's weights (timm's
    ResNet has torchvision's key names) in the snapshot layout huggingface_hub reads offline."""
    from safetensors.torch import save_file

    state = torch.load(hub_file(torch_home), weights_only=True)
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--timm--resnet18.a1_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / commit / "model.safetensors"))
    return home


def test_timm_weights_score_as_timms_own_transform_image_by_image(subset, hf_home):
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    env = cli_env() | {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "imagenet_resnet.evaluate", "--pretrained", TIMM_SOURCE,
                           f"data.root={subset}", "data.workers=0"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    result = last_json(proc)
    assert "resize 288 bicubic, centre crop 288" in proc.stdout  # timm's test size and crop (288, 1.0)
    net = timm.create_model("resnet18", num_classes=1000)
    from safetensors.torch import load_file

    net.load_state_dict(load_file(str(next(hf_home.rglob("model.safetensors")))))
    net.eval()
    transform = create_transform(
        **resolve_data_config({}, model=timm.create_model("resnet18.a1_in1k"), use_test_size=True)
    )
    order, top1, images = imagenet_wnids(), 0, 0
    for line in (subset / "val.txt").read_text().splitlines():
        path, _, _ = line.rpartition(" ")
        with torch.no_grad():
            best = net(transform(Image.open(subset / "val" / path).convert("RGB"))[None])[0].argmax().item()
        top1 += best == order.index(path.split("/")[0])
        images += 1
    assert (result["val_top1"], result["val_images"]) == (100 * top1 / images, images)
    assert result["published_top1"] is None  # resnet18.a1_in1k is not in this project's table


def test_timm_offline_with_nothing_cached_is_one_line(subset, tmp_path):
    env = cli_env() | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "imagenet_resnet.evaluate", "--pretrained", "timm:resnet50.a1_in1k",
                           f"data.root={subset}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "could not load timm's weights" in proc.stderr and "models--timm--resnet50.a1_in1k" in proc.stderr


def test_fine_tuning_starts_from_published_weights_by_name(torch_home, monkeypatch):
    import torchvision

    from imagenet_resnet.finetune import load_init_from
    from imagenet_resnet.models import build_model

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    url = "https://download.pytorch.org/models/" + hub_file(torch_home).name  # as published_env names it
    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value, "url", url)
    net = build_model("resnet18", 7)
    loaded = load_init_from(net, SOURCE)
    cached = torch.load(next((torch_home / "hub" / "checkpoints").iterdir()), weights_only=True)
    assert loaded == set(cached) - {"fc.weight", "fc.bias"}  # all but the 1000-class head
    assert torch.equal(net.state_dict()["layer2.0.downsample.0.weight"], cached["layer2.0.downsample.0.weight"])


def test_a_weights_file_with_arch_scores_as_its_source(subset, torch_home, tmp_path, by_source):
    """Offline machines: the file itself, in --arch's network with its transform and figures."""
    weights = next((torch_home / "hub" / "checkpoints").iterdir())
    by_file = subprocess.run(
        [
            sys.executable,
            "-m",
            "imagenet_resnet.evaluate",
            "--pretrained",
            str(weights),
            "--arch",
            SOURCE,
            f"data.root={subset}",
            "data.workers=0",
        ],
        cwd=REPO,
        env=cli_env() | {"TORCH_HOME": str(tmp_path / "empty_home")},
        capture_output=True,
        text=True,
    )
    assert last_json(by_file) == by_source
    no_arch = subprocess.run([sys.executable, "-m", "imagenet_resnet.evaluate", "--pretrained", str(weights),
                              f"data.root={subset}"], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert no_arch.returncode == 2 and "needs --arch SOURCE" in no_arch.stderr
