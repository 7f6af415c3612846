"""A tiny fit with `SlurmRequeue`, run in a subprocess by tests/test_slurm.py (signal handlers, SIGTERM and DDP
ranks stay out of the pytest process).

A helper callback sends the requeue signal to one rank's own process when that rank starts optimizer step
`--signal-at-step`; every rank writes `rank<R>.json` (the step it stopped at, whether it saved) at the end.

Usage: python -m tests.slurm_requeue_worker --out DIR --devices 1|2 --signal-at-step S [--signal-rank R]
       [--strategy ddp_fork|ddp] [--max-steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from jointssl.callbacks.requeue import SlurmRequeue


class SignalAtStep(Callback):
    """Sends `signum` to this process at the start of optimizer step `step` on rank `rank`."""

    def __init__(self, step: int, rank: int, signum: signal.Signals) -> None:
        self.step, self.rank, self.signum = step, rank, signum

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


class ReportAtEnd(Callback):
    def __init__(self, out: Path, requeue: SlurmRequeue) -> None:
        self.out, self.requeue = out, requeue

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        report = {
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "saved_checkpoint": self.requeue.saved_checkpoint,
            "should_stop": trainer.should_stop,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--signal-at-step", type=int, required=True)
    parser.add_argument("--signal-rank", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=20)
    # ddp_fork starts every rank as a child of a launcher process; ddp makes this process rank 0 (as under srun,
    # where every process of the job is a rank).
    parser.add_argument("--strategy", default="ddp_fork")
    options = parser.parse_args()
    torch.set_num_threads(1)
    requeue = SlurmRequeue()
    trainer = Trainer(
        accelerator="cpu",
        devices=options.devices,
        strategy=options.strategy if options.devices > 1 else "auto",
        max_steps=options.max_steps,
        limit_val_batches=0,
        default_root_dir=options.out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ModelCheckpoint(dirpath=options.out / "checkpoints", save_last=True),
            requeue,
            SignalAtStep(options.signal_at_step, options.signal_rank, requeue.requeue_signal),
            ReportAtEnd(options.out, requeue),
        ],
    )
    trainer.fit(BoringModel())


if __name__ == "__main__":
    main()
