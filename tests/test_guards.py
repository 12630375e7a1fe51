"""Why a run stops early, in one place (guards.py): unit checks in one process; the same guards
across ranks are in test_fault_tolerance.py and test_resume_policy.py."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from imagenet_resnet.errors import UserError
from imagenet_resnet.guards import Guards

CPU = torch.device("cpu")


def test_the_first_non_finite_step_of_the_epoch_stops_the_run_naming_it(tmp_path):
    guards = Guards(CPU, tmp_path / "last.pt")
    for step, loss in enumerate([1.0, 2.0, float("nan"), float("inf"), 3.0]):
        guards.note_loss(torch.tensor(loss, dtype=torch.float64), step)
    with pytest.raises(UserError, match="non-finite training loss at epoch 4, step 2; .*no checkpoint was written"):
        guards.agree(epoch=4)
    guards.start_epoch()  # a new epoch starts clean
    guards.note_loss(torch.tensor(0.5, dtype=torch.float64), 0)
    assert guards.agree(epoch=5) is False


def test_sigterm_is_noted_and_agreed_and_the_handler_restored(tmp_path):
    guards = Guards(CPU, tmp_path / "last.pt")
    before = signal.getsignal(signal.SIGTERM)
    with guards.watching_sigterm():
        assert guards.agree(epoch=0) is False
        os.kill(os.getpid(), signal.SIGTERM)
        assert guards.agree(epoch=0) is True
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_diverged_evaluation_names_the_values_and_the_last_good_checkpoint(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"")
    guards = Guards(CPU, tmp_path / "last.pt")
    net = torch.nn.BatchNorm2d(3)
    guards.check_evaluation({"val_loss": 1.0}, [("", net)], epoch=1)  # finite: nothing to say
    net.running_var[0] = float("inf")
    with pytest.raises(UserError, match=r"non-finite evaluation at epoch 1: val_loss nan; 1 non-finite buffers "
                                        rf"\(running_var\); .*last good checkpoint is {tmp_path / 'last.pt'}"):
        guards.check_evaluation({"val_loss": float("nan")}, [("", net)], epoch=1)


def test_a_sigterm_during_start_up_stops_before_the_first_step_and_says_nothing_was_saved(cifar_root, tmp_path,
                                                                                        capsys):
    from imagenet_resnet.config import load_config
    from imagenet_resnet.distributed import DistInfo
    from imagenet_resnet.trainer import Trainer

    cfg = load_config("configs/cifar10_resnet20.yaml", [f"data.root={cifar_root}", f"run.out_dir={tmp_path / 'run'}",
                                                        "wandb.mode=disabled", "schedule.epochs=1"])
    trainer = Trainer(cfg, DistInfo(0, 0, 1, CPU))
    trainer.guards.stop_requested = True  # as the handler run_training installs first would note it
    with pytest.raises(SystemExit) as stopped:
        trainer.fit()
    assert stopped.value.code == 143 and not (tmp_path / "run" / "last.pt").exists()
    assert "before the first step; nothing needed saving" in capsys.readouterr().out
