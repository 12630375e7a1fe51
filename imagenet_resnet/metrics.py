"""Top-k counting on the device, and the rank-0 writer of metrics.jsonl and Weights & Biases.

    counts = topk_correct(logits, labels)             # tensor([top1_count, top5_count])
    log = RunLog(cfg, out_dir, start_epoch=0, resumed=False)   # rank 0 only
    log.epoch({"epoch": 0, "val_top1": 41.2, ...})
    log.close()
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from imagenet_resnet.config import Config, config_to_dict

METRICS = "metrics.jsonl"
WANDB_ID = "wandb_run_id.txt"


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows have the label among the top k, for each k; stays on the device."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wandb_api_key_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class RunLog:
    """metrics.jsonl plus wandb. Create it on rank 0 only: it is the one place for log side effects.

    On resume, records of epochs at or after `start_epoch` are dropped before appending, so an
    epoch logged just before a crash and recomputed after the restart appears once.
    """

    def __init__(self, cfg: Config, out_dir: Path, start_epoch: int, resumed: bool) -> None:
        self.path = out_dir / METRICS
        kept = [r for r in read_metrics(out_dir) if r["epoch"] < start_epoch] if resumed else []
        tmp = self.path.with_name(METRICS + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self.wandb = self._start_wandb(cfg, out_dir, resumed)

    @staticmethod
    def _start_wandb(cfg: Config, out_dir: Path, resumed: bool):
        mode = cfg.wandb.mode
        if mode == "disabled":
            return None
        import wandb

        if mode == "online" and not wandb_api_key_present():
            print("wandb: no API key found (wandb login); logging offline, sync later with `wandb sync`", flush=True)
            mode = "offline"
        id_file = out_dir / WANDB_ID
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        return wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity or None,
            name=cfg.wandb.name or out_dir.name,
            dir=str(out_dir),
            mode=mode,
            id=run_id,
            resume="allow",  # same id after a restart: the same run continues
            config=config_to_dict(cfg),
        )

    def step(self, global_step: int, values: dict[str, float]) -> None:
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in values.items()}, step=global_step)

    def epoch(self, global_step: int, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.wandb is not None:
            self.wandb.log({f"epoch/{k}": v for k, v in record.items()}, step=global_step)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        sys.stdout.flush()
