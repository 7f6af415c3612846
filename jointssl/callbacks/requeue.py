"""Save, stop and requeue a Slurm job when its time is nearly up (`#SBATCH --signal=USR1@<seconds>`).

Slurm sends the signal to every task of the job step at slightly different moments. Saving inside the signal
handler (what Lightning's `SLURMEnvironment(auto_requeue=True)` does) runs collectives from an arbitrary point of
each rank's program and deadlocked under DDP here (Lightning-AI/pytorch-lightning#21406). `SlurmRequeue` splits
the work in two:

1. the handler only sets a flag;
2. at the next training batch boundary every rank contributes its flag to a max all-reduce, so all ranks see the
   same decision at the same step, save `<checkpoint dir>/last.ckpt` together (`trainer.save_checkpoint`, which
   gathers the per-rank state of the model) and stop the trainer.

When the trainer has shut down, rank 0 runs `scontrol requeue $SLURM_JOB_ID`. Requeueing a running job makes Slurm
terminate its tasks (SIGTERM, SIGKILL after KillWait); by then nothing is left to do but exit, so every rank ignores
SIGTERM from that point and the processes finish (loggers flushed, exit status 0) on their own. The requeued job
starts again with `--ckpt_path last` and resumes from that checkpoint (see `jointssl.cli`).

Outside Slurm (no `SLURM_JOB_ID`) the signal still makes a clean save and stop, without requeue: useful for any
scheduler that announces preemption with a signal.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from types import FrameType

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from jointssl.distributed import all_reduce_max

#: Where the checkpoint goes when the trainer has no ModelCheckpoint (relative to `trainer.default_root_dir`).
DEFAULT_CHECKPOINT_SUBDIR = "checkpoints"


def parse_signal(value: str | int) -> signal.Signals:
    """`"SIGUSR1"`, `"USR1"` or `10` -> `signal.SIGUSR1`."""
    if isinstance(value, int):
        return signal.Signals(value)
    name = value.strip().upper()
    if name.isdigit():
        return signal.Signals(int(name))
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"unknown signal {value!r} (expected a name such as SIGUSR1 or a number)") from None


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` expects: `<array job>_<task>` for array tasks, else `SLURM_JOB_ID`; None outside
    Slurm."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID") or None


def last_checkpoint_path(trainer: Trainer) -> str:
    """`last.ckpt` in the directory of the trainer's first ModelCheckpoint, where `ckpt_path="last"` looks for it;
    `<default_root_dir>/checkpoints/last.ckpt` when there is none."""
    checkpoint = trainer.checkpoint_callback
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
        return os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, DEFAULT_CHECKPOINT_SUBDIR, "last" + ModelCheckpoint.FILE_EXTENSION)


class SlurmRequeue(Callback):
    """On `requeue_signal`: all ranks save `last.ckpt` at the next optimizer step, the trainer stops, and (inside a
    Slurm batch job) rank 0 requeues the job once the trainer has shut down.

    Args:
        requeue_signal: the signal Slurm is told to send (`#SBATCH --signal=USR1@<seconds>`): a name or number.
        check_every_n_steps: how often (in optimizer steps) the ranks agree on the flag; each check is one tiny
            all-reduce (and a device sync on GPU). The signal's lead time must cover this many steps plus a save.
        requeue: run `scontrol requeue` inside Slurm; False only saves and stops.
    """

    def __init__(self, requeue_signal: str | int = "SIGUSR1", check_every_n_steps: int = 1, requeue: bool = True):
        super().__init__()
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.requeue_signal = parse_signal(requeue_signal)
        self.check_every_n_steps = check_every_n_steps
        self.requeue = requeue
        self.signal_received = False
        #: Path of the checkpoint saved on the signal (None until then).
        self.saved_checkpoint: str | None = None
        self._requeue_job_id: str | None = None
        self._previous_handler: signal.Handlers | int | None = None
        self._installed = False

    # ------------------------------------------------------------------ signal handling
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: anything else (logging, I/O, collectives) is unsafe at an arbitrary point of the program.
        self.signal_received = True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            # Python delivers signals to the main thread only; a trainer run elsewhere cannot be preempted this way.
            print(f"jointssl: SlurmRequeue: fit runs outside the main thread, {self.requeue_signal.name} not handled",
                  flush=True)
            return
        self.signal_received, self.saved_checkpoint, self._requeue_job_id = False, None, None  # a new fit
        self._previous_handler = signal.signal(self.requeue_signal, self._on_signal)
        self._installed = True

    def _restore_handler(self) -> None:
        if self._installed:
            signal.signal(self.requeue_signal, self._previous_handler)
            self._installed = False

    # ------------------------------------------------------------------ the decision, at a batch boundary
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self._installed or self.saved_checkpoint is not None:
            return
        # Only where an optimizer step has just finished (not inside gradient accumulation), and only every n
        # steps; global_step is the same on every rank, so all ranks take part in the same all-reduces.
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        if trainer.global_step % self.check_every_n_steps != 0:
            return
        flag = torch.tensor([1 if self.signal_received else 0], dtype=torch.int32, device=pl_module.device)
        if int(all_reduce_max(flag).item()) == 0:
            return
        self._save_and_stop(trainer)

    def _save_and_stop(self, trainer: Trainer) -> None:
        path = last_checkpoint_path(trainer)
        job_id = slurm_job_id() if self.requeue else None
        if trainer.is_global_zero:
            then = f"requeueing job {job_id}" if job_id else "stopping (not a Slurm job: no requeue)"
            print(f"jointssl: {self.requeue_signal.name} received at step {trainer.global_step}, saving {path} and "
                  f"{then}", flush=True)
        checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        for checkpoint in checkpoints:
            if checkpoint.save_last and checkpoint.dirpath == os.path.dirname(path):
                # Saved inside the checkpoint: after resuming, ModelCheckpoint overwrites this last.ckpt instead of
                # writing last-v1.ckpt beside it.
                checkpoint.last_model_path = path
        trainer.save_checkpoint(path, weights_only=False)  # collective: every rank takes part, rank 0 writes
        for checkpoint in checkpoints:
            # ModelCheckpoint would otherwise save this mid-epoch state once more when the stopped epoch "ends"
            # (on_train_epoch_end / on_train_end), as if the epoch were complete. These are the fields its own
            # `_save_checkpoint` sets; Lightning has no public way to tell it a step is saved.
            checkpoint._last_global_step_saved = trainer.global_step
            if checkpoint.last_model_path == path:
                checkpoint._last_checkpoint_saved = path
        self.saved_checkpoint = path
        self._requeue_job_id = job_id
        trainer.should_stop = True

    # ------------------------------------------------------------------ after the trainer shut down
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._restore_handler()
        if self._requeue_job_id is None:
            return
        # `scontrol requeue` makes Slurm SIGTERM every process of the job, helpers included (W&B's service process
        # dies on it): close the loggers first (Lightning would only do it after this hook; a second finalize is a
        # no-op), and let each rank finish its exit instead of dying in it. Lightning restored its own SIGTERM
        # handler before this hook, so ours stays.
        for logger in trainer.loggers:
            logger.finalize("success")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        trainer.strategy.barrier("jointssl-slurm-requeue")  # no rank is still inside the trainer when the TERM comes
        if trainer.is_global_zero:
            requeue_job(self._requeue_job_id)


def requeue_job(job_id: str) -> bool:
    """`scontrol requeue <job_id>`; prints the outcome. Returns whether Slurm accepted it."""
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        print(f"jointssl: not requeueing: {job_id!r} is not a Slurm job id", flush=True)
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"jointssl: scontrol requeue {job_id} failed: {error}", flush=True)
        return False
    if result.returncode != 0:
        print(f"jointssl: scontrol requeue {job_id} failed (exit {result.returncode}): {result.stderr.strip()}",
              flush=True)
        return False
    print(f"jointssl: requeued Slurm job {job_id}", flush=True)
    return True
