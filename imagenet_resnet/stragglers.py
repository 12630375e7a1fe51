"""Stragglers: which rank the others wait for, per epoch, so a slow node shows in metrics.jsonl
and wandb before it hangs a run.

    waits = GradientWait(net, device)                # before DDP wraps net
    waits.arm(); loss.backward(); waits.step_done()  # around the backward that synchronises
    rank_times(elapsed_s, data_wait_s, steps, waits) # at the epoch's end, on every rank
"""

from __future__ import annotations

import time
from typing import Any

import torch

from imagenet_resnet.distributed import all_gather_objects


class GradientWait:
    """How long this rank waits for the others in DDP's gradient all-reduce, summed over steps: from
    the moment its own last gradient is ready until backward returns, which under DDP is once every
    rank's gradients are summed. The last gradient backward computes is the first layer's (the
    first trainable parameter's): one post-accumulate-grad hook on it, armed only for the backward
    that synchronises (none on no_sync micro-batches), marks the moment.

    The rank that waits least is the one the others wait for: its step time minus this wait is the
    time it needs on its own, which is what tells a slow node from a fast one (with DDP's per-step
    synchronisation, every rank's wall time per step is the same). The hook runs on the thread that
    called backward, in Python: a hook of DDP's communication instead runs its Python callbacks on
    the backend's threads, and a DataLoader worker forked meanwhile can inherit a held interpreter
    lock and hang (seen with Python 3.11). On CUDA the two moments are CUDA events, read per epoch.

        waits = GradientWait(net, device)       # before DDP wraps net
        waits.arm(); loss.backward(); waits.step_done()   # around the backward that synchronises
        waits.take()                            # seconds since the last take
    """

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.first = next(param for param in net.parameters() if param.requires_grad)
        self.hook: Any = None
        self.ready: Any = None  # this step's last gradient: a host time, or a CUDA event
        self.seconds = 0.0
        self.events: list[tuple[Any, Any]] = []

    def arm(self) -> None:
        self.hook = self.first.register_post_accumulate_grad_hook(self._gradient_ready)

    def _gradient_ready(self, param: torch.Tensor) -> None:
        if self.cuda:
            self.ready = torch.cuda.Event(enable_timing=True)
            self.ready.record()
        else:
            self.ready = time.perf_counter()

    def step_done(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        if self.ready is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self.ready, end))
        else:
            self.seconds += time.perf_counter() - self.ready
        self.ready = None

    def take(self) -> float:
        """Seconds waited since the last call (synchronising with the GPU on CUDA)."""
        if self.events:
            self.events[-1][1].synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.events) / 1000
            self.events.clear()
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def rank_times(elapsed_s: float, data_wait_s: float, steps: int, waits: GradientWait | None) -> dict[str, float]:
    """Collective. Each rank's own step time (wall time minus its wait for the others in the
    gradient all-reduce) and data-wait share; the slowest and fastest rank's, and the mean
    data-wait share as data_wait_fraction."""
    own = (elapsed_s - (waits.take() if waits else 0.0)) / steps
    ranks = all_gather_objects((own, data_wait_s / elapsed_s))
    slowest = max(range(len(ranks)), key=lambda rank: ranks[rank][0])
    fastest = min(range(len(ranks)), key=lambda rank: ranks[rank][0])
    return {"data_wait_fraction": sum(share for _, share in ranks) / len(ranks),
            "rank_step_s_slowest": ranks[slowest][0], "rank_step_s_fastest": ranks[fastest][0],
            "rank_slowest": slowest, "rank_fastest": fastest,
            "rank_data_wait_slowest": ranks[slowest][1], "rank_data_wait_fastest": ranks[fastest][1]}
