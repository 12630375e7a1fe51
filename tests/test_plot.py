import json

import numpy as np
from PIL import Image

from conftest import run_module


def fake_run(folder, top1_end: float):
    folder.mkdir()
    lines = [
        {
            "epoch": e,
            "train_loss": 2.0 - 0.3 * e,
            "val_loss": 2.1 - 0.3 * e,
            "val_top1": 20 + (top1_end - 20) * e / 4,
            "val_top5": 60 + 8 * e,
            "lr": 0.1 * (1 - e / 5),
            "images_per_sec": 100.0,
            "data_wait_fraction": 0.1,
            "val_images": 50,
        }
        for e in range(5)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_plot_writes_a_png_of_the_curves_and_a_table(tmp_path):
    a, b = fake_run(tmp_path / "a", 70), fake_run(tmp_path / "b", 50)
    proc = run_module("imagenet_resnet.plot", str(a), str(b), "--out", str(tmp_path / "cmp.png"))
    image = np.asarray(Image.open(tmp_path / "cmp.png").convert("RGB"))
    assert image.shape[0] > 300 and image.shape[1] > 1000
    coloured = (image.max(axis=2) - image.min(axis=2)) > 80  # the curves, not the grey axes
    assert coloured.sum() > 2000
    assert "| 70.00 |" in proc.stdout and "| 50.00 |" in proc.stdout


def test_plot_without_metrics_is_a_clear_error(tmp_path):
    proc = run_module("imagenet_resnet.plot", str(tmp_path), check=False)
    assert proc.returncode == 2 and "no metrics.jsonl" in proc.stderr


def test_plot_numbers_epochs_as_metrics_does_and_tells_runs_and_series_apart(tmp_path):
    from imagenet_resnet.plot import draw

    a, b = fake_run(tmp_path / "a", 70), fake_run(tmp_path / "b", 50)
    records = [json.loads(line) | {"val_top1_ema": 30.0, "val_loss_ema": 1.0}
               for line in (a / "metrics.jsonl").read_text().splitlines()]
    (a / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # run a has an EMA
    loss, accuracy, lr = draw([a, b]).axes
    lines = {line.get_label(): line for line in accuracy.get_lines()}
    assert sorted(lines) == ["a top-1", "a top-1 EMA", "a top-5", "b top-1", "b top-5"]
    assert list(lines["a top-1"].get_xdata()) == [0, 1, 2, 3, 4]  # epochs as metrics.jsonl numbers them
    assert list(lines["a top-1 EMA"].get_ydata()) == [30.0] * 5
    assert lines["a top-1"].get_color() == lines["a top-5"].get_color() == lines["a top-1 EMA"].get_color()
    assert lines["a top-1"].get_color() != lines["b top-1"].get_color()  # one colour per run
    assert [lines[f"a {s}"].get_linestyle() for s in ("top-1", "top-5", "top-1 EMA")] == ["-", "--", ":"]
    assert "a val EMA" in [line.get_label() for line in loss.get_lines()]
