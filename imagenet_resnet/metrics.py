"""Top-k counting on the device, and the rank-0 writer of metrics.jsonl and Weights & Biases.

    counts = topk_correct(logits, labels)             # tensor([top1_count, top5_count])
    log = RunLog(cfg, out_dir, start_epoch=0, resumed=False)   # rank 0 only
    log.epoch({"epoch": 0, "val_top1": 41.2, ...})
    log.close()
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import torch

from imagenet_resnet.config import Config, config_to_dict
from imagenet_resnet.errors import UserError
from imagenet_resnet.files import write_atomic

METRICS = "metrics.jsonl"
WANDB_ID = "wandb_run_id.txt"


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows have the label among the top k, for each k; stays on the device."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. An incomplete last line (an append cut short by a crash) is
    left out; a bad line before the last is refused with its number."""
    path = Path(out_dir) / METRICS
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            if number == len(lines):
                print(f"warning: {path}: line {number} is incomplete (interrupted write); ignored",
                      file=sys.stderr, flush=True)
                break
            raise UserError(f"{path}: line {number} is not a JSON record ({err}); fix or remove that line") from err
        if not (isinstance(record, dict) and type(record.get("epoch")) is int):
            raise UserError(f"{path}: line {number} is not an epoch record (a JSON object with a whole-number "
                            f"\"epoch\"): {line[:80]!r}; fix or remove that line")
        records.append(record)
    return records


def wandb_mode(configured: str) -> str:
    """The mode wandb runs in: the environment's WANDB_MODE / WANDB_DISABLED win over the config
    (clusters set them to keep runs off the network), and online needs credentials wandb knows."""
    import wandb

    mode, source = configured, "wandb.mode"
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        mode, source = "disabled", "WANDB_DISABLED"
    elif env_mode:
        mode, source = {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode), "WANDB_MODE"
        if mode not in ("online", "offline", "disabled"):
            raise UserError(f"WANDB_MODE={env_mode}: expected online, offline or disabled")
    if mode != configured:
        print(f"wandb: {source} from the environment: {mode} (wandb.mode={configured} overridden)", flush=True)
    if mode == "online" and not wandb.login(prompt=False, verify=False):  # env key, .netrc, for wandb's own host
        print("wandb: no API key found (wandb login); logging offline, sync later with `wandb sync`", flush=True)
        mode = "offline"
    return mode


def saved_run_id(id_file: Path) -> str:
    """The wandb run id a resumed run continues; UserError if the file holds none."""
    try:
        run_id = id_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as err:
        run_id = f"unreadable ({err})"
    if not re.fullmatch(r"[a-z0-9]{1,64}", run_id):
        raise UserError(f"{id_file}: not a wandb run id ({run_id[:40]!r}); remove the file to log the resumed run "
                        f"as a new wandb run")
    return run_id


class RunLog:
    """metrics.jsonl plus wandb. Create it on rank 0 only: it is the one place for log side effects.

    On resume, records of epochs at or after `start_epoch` are dropped before appending, so an
    epoch logged just before a crash and recomputed after the restart appears once.
    """

    def __init__(self, cfg: Config, out_dir: Path, start_epoch: int, resumed: bool) -> None:
        self.path = out_dir / METRICS
        kept = [r for r in read_metrics(out_dir) if r["epoch"] < start_epoch] if resumed else []
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.wandb = self._start_wandb(cfg, out_dir, resumed)

    @staticmethod
    def _start_wandb(cfg: Config, out_dir: Path, resumed: bool):
        mode = wandb_mode(cfg.wandb.mode)
        if mode == "disabled":
            return None
        import wandb

        id_file = out_dir / WANDB_ID
        run_id = saved_run_id(id_file) if resumed and id_file.exists() else secrets.token_hex(4)
        args = dict(project=cfg.wandb.project, entity=cfg.wandb.entity or None, name=cfg.wandb.name or out_dir.name,
                    group=cfg.wandb.group or None, tags=cfg.wandb.tags or None, notes=cfg.wandb.notes or None,
                    dir=str(out_dir), resume="allow",  # same id after a restart: the same run continues
                    config=config_to_dict(cfg), settings=wandb.Settings(init_timeout=cfg.wandb.init_timeout_s))
        try:
            write_atomic(id_file, run_id)
            return wandb.init(mode=mode, id=run_id, **args)
        except Exception as err:  # no network, server down, bad key: training matters more than the dashboard
            if mode != "online":
                raise
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"warning: wandb could not start online ({first_line}); logging offline, sync later with "
                  f"`wandb sync {out_dir / 'wandb'}`", file=sys.stderr, flush=True)
            run_id = secrets.token_hex(4)  # the failed attempt keeps its id busy in wandb's service
            write_atomic(id_file, run_id)
            return wandb.init(mode="offline", id=run_id, **args)

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
