"""Curves and a summary table for one or more run folders (metrics.jsonl), overlaid to compare.

    python -m imagenet_resnet.plot runs/demo                      # -> runs/demo/curves.png
    python -m imagenet_resnet.plot runs/a runs/b --out compare.png
"""

from __future__ import annotations

from pathlib import Path

from imagenet_resnet.cli import command, run_main
from imagenet_resnet.errors import UserError
from imagenet_resnet.metrics import read_metrics

# Per panel: (metrics key, label, line style). One colour per run, one line style per series,
# so several runs overlaid can still be told apart; EMA series appear when the run has them.
PANELS = {
    ("loss", "cross-entropy"): [
        ("train_loss", "train", "-"),
        ("val_loss", "val", "--"),
        ("val_loss_ema", "val EMA", ":"),
    ],
    ("val accuracy", "%"): [
        ("val_top1", "top-1", "-"),
        ("val_top5", "top-5", "--"),
        ("val_top1_ema", "top-1 EMA", ":"),
    ],
    ("learning rate (end of epoch)", "lr"): [("lr", "lr", "-")],
}


def draw(run_dirs: list[Path]):
    """A matplotlib figure of every run's curves against the epoch, numbered as in metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(run_dirs):
        records = read_metrics(run)
        for ax, series in zip(axes, PANELS.values()):
            for key, label, style in series:
                points = [(r["epoch"], r[key]) for r in records if key in r]
                if points:
                    epochs, values = zip(*points)
                    ax.plot(epochs, values, color=colours[index % len(colours)], linestyle=style,
                            marker="o" if style == "-" else ".", label=f"{run.name} {label}")
    for ax, (title, ylabel) in zip(axes, PANELS):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = draw(run_dirs)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def summary_table(run_dirs: list[Path]) -> str:
    rows = [
        "| run | epochs | images/s | data wait | val top-1 | val top-5 | val images |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in run_dirs:
        records = read_metrics(run)
        last = next((r for r in reversed(records) if "val_top1" in r), {"val_top1": float("nan"),
                                                                         "val_top5": float("nan"), "val_images": 0})
        speed = sum(r["images_per_sec"] for r in records) / len(records)
        rows.append(f"| {run} | {len(records)} | {speed:.0f} | {100 * last['data_wait_fraction']:.0f}% | "
                    f"{last['val_top1']:.2f} | {last['val_top5']:.2f} | {last['val_images']} |")
    return "\n".join(rows)


def main() -> None:
    p = command(__spec__.name, "Plot train loss, val top-1/top-5 and lr against epoch.")
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
