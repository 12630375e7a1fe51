"""Process-group setup from torchrun's environment, and the few collectives the trainer needs.

Under `torchrun` (RANK / LOCAL_RANK / WORLD_SIZE set) it joins the group: NCCL on CUDA, gloo
on the CPU. As a plain process it is rank 0 of 1 and no group is created.

    dist = init_distributed("auto")
    if dist.is_main: print("only once")
    totals = all_reduce_sum(torch.tensor([correct, count], device=dist.device))
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as torch_dist

from imagenet_resnet.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    store: Any = None  # torchrun's key-value store (ranks report their progress there)
    timeout_s: float = 600.0  # of every collective

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("config key run.device=cuda: no CUDA device is visible")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def store_prefix(world_size: int) -> str:
    """Keys of this group in torchrun's store, which outlives a restart of the workers.

    Without a prefix per attempt, a restarted gloo group can read a dead worker's address from
    the previous attempt and wait for it (seen with torch 2.14 on one node). The restart count
    is the same for every rank only under one agent (one node): across nodes agents count
    restarts independently, so there torch's own key names are kept.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    one_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) == world_size
    return f"default_pg/attempt{attempt}" if one_node else "default_pg"


# Start-up (data lists, checkpoint, wandb, DALI pipelines, torch.compile's first compile, up to the
# end of the first step) may keep one rank away from the others this long: run.collective_timeout_s
# applies from then on (`set_collective_timeout`).
STARTUP_TIMEOUT_S = 1800.0


def init_distributed(requested_device: str, timeout_s: float = 600.0) -> DistInfo:
    """Join torchrun's group (if any). The rendezvous and every collective of start-up wait at most
    max(timeout_s, STARTUP_TIMEOUT_S); `set_collective_timeout` then lowers it to timeout_s."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = None
    if world_size > 1 and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=max(timeout_s, STARTUP_TIMEOUT_S))
        store, _, _ = next(torch_dist.rendezvous("env://", rank, world_size, timeout=timeout))
        store = torch_dist.PrefixStore(store_prefix(world_size), store)
        torch_dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                                      device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, local_rank, world_size, device, store, timeout_s)


def set_collective_timeout(dist: DistInfo) -> None:
    """Start-up is over (every rank has finished a step): collectives wait at most dist.timeout_s."""
    if torch_dist.is_initialized():
        set_timeout = getattr(torch_dist, "set_timeout", None) or torch_dist.distributed_c10d._set_pg_timeout
        set_timeout(timedelta(seconds=dist.timeout_s))


def report_progress(dist: DistInfo, mark: tuple[int, int], where: str) -> None:
    """Where this rank is, in the job's store: a rank whose collective times out names the ranks
    that had not got as far. `mark` orders the places (global step, then phase: 0 training, 1
    evaluation); one small write at the trainer's agreement points."""
    if dist.store is not None:
        dist.store.set(f"progress/{dist.rank}", json.dumps([list(mark), where, time.time()]))


def collective_timed_out(err: BaseException) -> bool:
    """gloo's and NCCL's ways of saying a collective waited past the group's timeout."""
    return isinstance(err, RuntimeError) and bool(re.search(r"timed out|timeout", str(err), re.IGNORECASE))


def laggards(dist: DistInfo) -> str:
    """The other ranks' last reports, those behind this rank's first: who had not got as far."""
    if dist.store is None:
        return "no reports"
    marks = {rank: json.loads(dist.store.get(f"progress/{rank}")) for rank in range(dist.world_size)
             if dist.store.check([f"progress/{rank}"])}
    own = marks.get(dist.rank, [[-1, 0]])[0]
    others = [(mark >= own, f"rank {rank} at {where}, {time.time() - at:.0f} s ago")
              for rank, (mark, where, at) in sorted(marks.items()) if rank != dist.rank]
    behind = [text for level, text in others if not level]
    silent = [
        f"rank {rank} (no report yet)" for rank in range(dist.world_size) if rank not in marks and rank != dist.rank
    ]
    if behind or silent:
        return "behind this rank: " + ", ".join(behind + silent)
    return "no rank is behind this one's last report; the others last reported: " + ", ".join(t for _, t in others)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op in a single process); returns the tensor."""
    if torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BN running stats) over ranks.

    Without SyncBN each rank's running statistics follow its own batches (DDP does not broadcast
    them: broadcast_buffers=False); averaging at each epoch's end, before evaluation and saving,
    makes the number logged and the checkpoint written describe the same model (timm's
    distribute_bn "reduce").
    """
    if not torch_dist.is_initialized():
        return
    world = torch_dist.get_world_size()
    for buf in module.buffers():
        if buf.is_floating_point():
            torch_dist.all_reduce(buf, op=torch_dist.ReduceOp.SUM)
            buf.div_(world)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if not torch_dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def main_only(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 alone; its result there, None elsewhere. A UserError on rank 0 stops
    every rank: rank 0 raises it (one message), the others exit with status 2 quietly rather than
    wait in a collective rank 0 will never join."""
    result, error = None, None
    if not torch_dist.is_initialized() or torch_dist.get_rank() == 0:
        try:
            result = fn()
        except UserError as err:
            error = err
    if broadcast_object(error is not None):
        if error is not None:
            raise error
        raise SystemExit(2)
    return result


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
