"""Curves and a summary table for one or more run folders (metrics.jsonl), overlaid to compare.

    python -m imagenet_resnet.plot runs/demo                      # -> runs/demo/curves.png
    python -m imagenet_resnet.plot runs/a runs/b --out compare.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from imagenet_resnet.cli import run_main
from imagenet_resnet.errors import UserError
from imagenet_resnet.metrics import read_metrics


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in run_dirs:
        records = read_metrics(run)
        epochs = [r["epoch"] + 1 for r in records]
        ax_loss.plot(epochs, [r["train_loss"] for r in records], marker="o", label=f"{run.name} train")
        ax_loss.plot(epochs, [r["val_loss"] for r in records], marker=".", linestyle="--", label=f"{run.name} val")
        ax_acc.plot(epochs, [r["val_top1"] for r in records], marker="o", label=f"{run.name} top-1")
        ax_acc.plot(epochs, [r["val_top5"] for r in records], marker=".", linestyle="--", label=f"{run.name} top-5")
        ax_lr.plot(epochs, [r["lr"] for r in records], marker="o", label=run.name)
    for ax, title, ylabel in ((ax_loss, "loss", "cross-entropy"), (ax_acc, "val accuracy", "%"),
                              (ax_lr, "learning rate (end of epoch)", "lr")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def summary_table(run_dirs: list[Path]) -> str:
    rows = ["| run | epochs | images/s | data wait | val top-1 | val top-5 | val images |", "|---|---|---|---|---|---|---|"]
    for run in run_dirs:
        records = read_metrics(run)
        last = records[-1]
        speed = sum(r["images_per_sec"] for r in records) / len(records)
        rows.append(f"| {run} | {len(records)} | {speed:.0f} | {100 * last['data_wait_fraction']:.0f}% | "
                    f"{last['val_top1']:.2f} | {last['val_top5']:.2f} | {last['val_images']} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description="Plot train loss, val top-1/top-5 and lr against epoch.")
    p.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.jsonl")
    p.add_argument("--out", type=Path, help="PNG path (default: <first run>/curves.png)")
    a = p.parse_args()
    for run in a.runs:
        if not run.is_dir():
            raise UserError(f"{run}: not a run folder")
    out = a.out or a.runs[0] / "curves.png"
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UserError(f"--out {out}: expected a .png, .pdf or .svg file name")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    empty = [str(r) for r in a.runs if not read_metrics(r)]
    if empty:
        raise UserError(f"{', '.join(empty)}: no metrics.jsonl records to plot")
    plot_runs(a.runs, out)
    print(summary_table(a.runs))
    print(f"plot: {out}")


if __name__ == "__main__":
    run_main(main)
