"""Test-only classes that inject faults into `jointssl fit` runs; configs name them by class path
(`tests.fault_injection.<Name>`, with the repository root on PYTHONPATH). Nothing here is part of the package."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import Dataset, get_worker_info

from jointssl.data import JointDataModule
from jointssl.pretrain import JointSSL

INJECTED_DATA_FAULT = "injected data-worker fault"
INJECTED_STEP_FAULT = "injected training-step fault"


class PauseAtStep(Callback):
    """At the start of the batch after `step` optimizer steps (so after the checkpoint written at `step`), write
    `marker` and sleep: the test process kills the run from outside while it waits here."""

    def __init__(self, step: int, marker: str, seconds: float = 120.0):
        self.step = step
        self.marker = marker
        self.seconds = seconds

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(f"{trainer.current_epoch} {batch_idx}")
            time.sleep(self.seconds)


class _FailingInWorker(Dataset):
    """Delegates to `base`; raises after `after` items in a DataLoader worker process of the failing rank."""

    def __init__(self, base: Dataset, fail: bool, after: int):
        self.base = base
        self.fail = fail
        self.after = after
        self.served = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        worker = get_worker_info()
        if self.fail and worker is not None:
            self.served += 1
            if self.served > self.after:
                raise RuntimeError(f"{INJECTED_DATA_FAULT} in worker {worker.id}")
        return self.base[key]


class DataFaultModule(JointDataModule):
    """JointDataModule whose 2D stream raises in a DataLoader worker of rank `fail_rank` after `fail_after`
    samples."""

    def __init__(self, *args: Any, fail_rank: int = 1, fail_after: int = 8, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fail_rank = fail_rank
        self.fail_after = fail_after

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.image_stream is not None and not isinstance(self.image_stream, _FailingInWorker):
            self.image_stream = _FailingInWorker(self.image_stream, self._rank() == self.fail_rank, self.fail_after)


class StepFaultSSL(JointSSL):
    """JointSSL whose training step raises on rank `fail_rank` at optimizer step `fail_step`."""

    def __init__(self, *args: Any, fail_rank: int = 1, fail_step: int = 2, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fail_rank = fail_rank
        self.fail_step = fail_step

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        if self.global_rank == self.fail_rank and self.global_step == self.fail_step:
            raise RuntimeError(f"{INJECTED_STEP_FAULT} on rank {self.global_rank}")
        return super().training_step(batch, batch_idx)
