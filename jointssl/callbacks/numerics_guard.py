"""NumericsGuard: skip a training step whose loss or gradient is not finite, and stop after too many in a row.

The module's ``training_step`` hands the guard its loss terms (:meth:`NumericsGuard.check_loss`), which records
as a device tensor which of them are not finite on any rank; before the optimizer step the guard reads that and
whether every gradient is finite in one host sync (the only one it needs per step). A step with either is
skipped: its gradients are dropped, so that no weight and no momentum moves (SGD/LARS skip parameters without
``.grad``; a NaN loss has back-propagated NaN, which DDP averaged onto every rank, so all ranks skip together),
and the BatchNorm running statistics go back to before the forward pass (the bad batch's statistics must not stay
in them: training would go on, but every evaluation-mode use of the encoder would be NaN). A skipped step counts
towards ``max_steps`` and the learning-rate schedule; ``train/skipped_steps`` counts them, and its logged losses
are the non-finite values. ``max_consecutive_bad_steps`` in a row raise :class:`NonFiniteTrainingError` naming the
loss term and the batch's samples. With fp16 mixed precision non-finite gradients are left to the gradient scaler
(it must see them to find its scale); non-finite losses are still skipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from jointssl import distributed

log = logging.getLogger("jointssl")


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient."""


def describe_batch(batch: dict[str, Any], describe_sample: Callable[[int], str] | None = None, limit: int = 8) -> str:
    """The samples of a training batch for messages: each stream's global indices and sources, and with
    `describe_sample` (e.g. `JointDataModule.describe_sample`) the files behind the first `limit` of them."""
    parts = []
    for stream, fields in batch.items():
        if fields is None:
            continue
        index = fields["index"].tolist()
        sources = sorted(set(fields.get("source", [])))
        more = f" (+{len(index) - limit} more)" if len(index) > limit else ""
        text = f"{stream} index {index[:limit]}{more} from {', '.join(sources) or 'unknown sources'}"
        if describe_sample is not None:
            text += " (" + ", ".join(describe_sample(i) for i in index[:limit]) + more + ")"
        parts.append(text)
    return "; ".join(parts)


class NumericsGuard(Callback):
    """Skips training steps with a non-finite loss or gradient and stops the run after too many in a row (module
    docstring). The module's ``training_step`` must call :meth:`check_loss` with its loss terms.

    Args:
        max_consecutive_bad_steps: this many skipped steps in a row stop the run.
    """

    def __init__(self, max_consecutive_bad_steps: int = 10) -> None:
        if max_consecutive_bad_steps < 1:
            raise ValueError(f"max_consecutive_bad_steps must be >= 1, got {max_consecutive_bad_steps}")
        self.max_consecutive_bad_steps = max_consecutive_bad_steps
        self.consecutive_bad_steps = 0
        self.skipped_steps = 0
        #: True when the last optimizer step was skipped (read by the collapse monitor: its assignments are void).
        self.skipped_last_step = False
        # Which loss terms were not finite (a device tensor, read at the optimizer step), and their names.
        self._loss_flags: Tensor | None = None
        self._loss_names: list[str] = []
        self._batch_samples: dict[str, Any] = {}
        self._describe_sample: Callable[[int], str] | None = None
        self._global_step = 0
        self._epoch = 0
        self._fp16 = False
        # BatchNorm running statistics and their copy from before the current step (set in on_train_start).
        self._norm_statistics: list[Tensor] = []
        self._norm_snapshot: list[Tensor] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Found once, here: the model is on its device by now (moving it replaces the buffer tensors).
        self._norm_statistics = [
            buffer for module in pl_module.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked) if buffer is not None
        ]
        self._norm_snapshot = [buffer.clone() for buffer in self._norm_statistics]
        self._fp16 = str(trainer.precision).startswith("16")
        self._describe_sample = getattr(trainer.datamodule, "describe_sample", None)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._norm_statistics:
            torch._foreach_copy_(self._norm_snapshot, self._norm_statistics)
        # Only the samples' identity is kept (described lazily: no device sync on good steps).
        self._batch_samples = {k: {"index": v["index"], "source": v.get("source", [])} for k, v in batch.items() if v}
        self._global_step, self._epoch = trainer.global_step, trainer.current_epoch

    def check_loss(self, terms: dict[str, Tensor]) -> None:
        """Called by ``training_step`` with the loss terms (name -> scalar). Which terms are not finite on any rank
        is recorded as a device tensor (one small all-reduce, so that all ranks skip together; no host sync): the
        verdict is read once per optimizer step, with the gradients', in :meth:`on_before_optimizer_step`.
        Under gradient accumulation a term that is not finite in any micro-batch counts."""
        names = list(terms)
        bad = torch.stack([~torch.isfinite(terms[name].detach()).all() for name in names]).to(torch.int32)
        bad = distributed.all_reduce_max(bad)
        if self._loss_flags is not None and self._loss_names == names:
            bad = torch.maximum(self._loss_flags, bad)
        self._loss_names, self._loss_flags = names, bad

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss_flags, self._loss_flags = self._loss_flags, None
        named = [] if self._fp16 else [(name, p.grad) for name, p in pl_module.named_parameters() if p.grad is not None]
        parts = [] if loss_flags is None else [loss_flags]
        norms = None
        if named:
            # DDP has already averaged the gradients, so every rank reaches the same verdict here. With fp16 the
            # gradient scaler skips steps with non-finite gradients itself (and must see them to lower its scale).
            norms = torch.stack(torch._foreach_norm([grad for _, grad in named]))
            parts.append((~torch.isfinite(norms)).any().to(torch.int32).reshape(1))
        self.skipped_last_step = False
        if not parts:
            return
        verdict = torch.cat(parts).tolist()  # the step's one host sync
        term_flags = verdict[: 0 if loss_flags is None else len(self._loss_names)]
        bad_terms = [f"L_{name}" for name, flag in zip(self._loss_names, term_flags) if flag]
        bad_gradient = norms is not None and bool(verdict[-1])
        if not bad_terms and not bad_gradient:
            self.consecutive_bad_steps = 0
            return
        # No gradient = no update: SGD/LARS skip parameters without .grad (weights, momentum, weight decay). The
        # BatchNorm running statistics go back to before the forward pass: the bad batch's statistics must not stay
        # in them (training would go on, but every evaluation-mode use of the encoder would be NaN).
        optimizer.zero_grad(set_to_none=True)
        if self._norm_statistics:
            torch._foreach_copy_(self._norm_statistics, self._norm_snapshot)
        self.skipped_last_step = True
        if bad_terms:
            self._count_bad_step(f"non-finite loss term(s) {', '.join(bad_terms)}")
        else:
            bad = [name for (name, _), norm in zip(named, norms.tolist()) if not math.isfinite(norm)]
            self._count_bad_step(f"non-finite gradient of {_first(bad)}")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)

    def _count_bad_step(self, what: str) -> None:
        self.skipped_steps += 1
        self.consecutive_bad_steps += 1
        message = (
            f"{what} at global step {self._global_step} (epoch {self._epoch}); step skipped "
            f"({self.consecutive_bad_steps} in a row, {self.skipped_steps} in this run); batch: "
            f"{describe_batch(self._batch_samples, self._describe_sample)}"
        )
        if self.consecutive_bad_steps >= self.max_consecutive_bad_steps:
            raise NonFiniteTrainingError(
                f"stopping: {self.consecutive_bad_steps} consecutive non-finite steps "
                f"(max_consecutive_bad_steps={self.max_consecutive_bad_steps}); last: {message}"
            )
        log.warning(message)


def _first(names: Sequence[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
