"""Why a run stops early, in one place: SIGTERM (preemption), a non-finite training loss, a diverged
evaluation. The step loop only notes what it sees on the device; every rank reads the notes
together at the agreement points (one small all-reduce), so all ranks stop at the same step.

    guards = Guards(device, out_dir / "last.pt")
    with guards.watching_sigterm():
        guards.note_loss(loss, step)              # no host sync
        if guards.agree(epoch):                   # UserError if a loss was not finite; True on SIGTERM
            save(); raise StopRequested
"""

from __future__ import annotations

import contextlib
import math
import signal
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from imagenet_resnet.distributed import all_reduce_sum
from imagenet_resnet.errors import UserError

# The exit status after a SIGTERM stop with its checkpoint written: 128 + SIGTERM, as a shell reports it.
STOPPED_EXIT = 143
# Ranks agree on a SIGTERM this often (one tiny all-reduce): well inside torchrun's and Slurm's grace time.
STOP_CHECK_EVERY_STEPS = 10


class StopRequested(Exception):
    """SIGTERM arrived (preemption): a checkpoint was written; exit cleanly."""


class Guards:
    def __init__(self, device: torch.device, last_checkpoint: Path) -> None:
        self.device, self.last_checkpoint = device, last_checkpoint
        self.stop_requested = False
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # the epoch's first non-finite step

    @contextlib.contextmanager
    def watching_sigterm(self) -> Iterator[None]:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def start_epoch(self) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)

    def note_loss(self, loss: torch.Tensor, step: int) -> None:
        """Remember the first step whose loss is not finite, on the device (no host sync)."""
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)

    def agree(self, epoch: int, failed: UserError | None = None) -> bool:
        """Collective, one all-reduce and one host read: UserError if any rank saw a non-finite loss
        or `failed` (rank 0's background checkpoint write; the other ranks exit with status 2
        quietly, as after any rank-0 error); else whether any rank got SIGTERM."""
        host = torch.tensor([float(self.stop_requested), float(failed is not None)], dtype=torch.float64)
        flags = torch.cat([(self.first_bad >= 0).double().reshape(1), host.to(self.device)])
        bad, stop, write_failed = all_reduce_sum(flags).tolist()
        if write_failed:
            if failed is not None:
                raise failed
            raise SystemExit(2)
        if bad:
            local = int(self.first_bad.item())
            raise self.diverged(f"non-finite training loss at epoch {epoch}, "
                                + (f"step {local}" if local >= 0 else "a step on another rank"))
        return stop > 0

    def check_evaluation(self, stats: dict[str, float], nets: list[tuple[str, nn.Module]], epoch: int) -> None:
        """A diverged model evaluates to NaN or carries inf BatchNorm statistics: no result to keep.
        Every rank sees the same (all-reduced loss, rank-averaged buffers), so all stop together."""
        bad = [f"{key} {stats[key]}" for key in ("val_loss", "val_loss_ema")
               if key in stats and not math.isfinite(stats[key])]
        buffers = [f"{which}{name}" for which, net in nets for name, buf in net.named_buffers()
                   if buf.is_floating_point() and not torch.isfinite(buf).all()]
        if buffers:
            bad.append(f"{len(buffers)} non-finite buffers ({', '.join(buffers[:3])}"
                       f"{', ...' if len(buffers) > 3 else ''})")
        if bad:
            raise self.diverged(f"non-finite evaluation at epoch {epoch}: {'; '.join(bad)}")

    def diverged(self, what: str) -> UserError:
        saved = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint.exists()
                 else "no checkpoint was written yet")
        return UserError(f"{what}; stopped without saving, {saved}. Lower optim.base_lr or lengthen "
                         f"schedule.warmup_epochs.")
