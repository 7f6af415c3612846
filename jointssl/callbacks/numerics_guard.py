"""NumericsGuard: skip a training step whose loss or gradient is not finite, and stop after too many in a row.

A step whose loss (any term, on any rank) is not finite is skipped: the module's ``training_step`` asks
:meth:`NumericsGuard.skip_non_finite_loss`, which returns the loss to back-propagate instead (an exact zero that
reaches every trainable parameter, so DDP's reducer sees all of them) and restores the BatchNorm running statistics
of before the forward pass (the NaN batch's statistics must not stay in them: training would go on, but every
evaluation-mode use of the encoder would be NaN). A step whose gradient is not finite is skipped in
``on_before_optimizer_step``. A skipped step updates no weight and no momentum (SGD/LARS skip parameters without
``.grad``) but counts towards ``max_steps`` and the learning-rate schedule; ``train/skipped_steps`` counts them.
``max_consecutive_bad_steps`` in a row raise :class:`NonFiniteTrainingError` naming the loss term and the batch's
samples. With fp16 mixed precision non-finite gradients are left to the gradient scaler (it must see them to find
its scale); non-finite losses are still skipped.
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
    docstring). The module's ``training_step`` must call :meth:`skip_non_finite_loss` with its loss terms.

    Args:
        max_consecutive_bad_steps: this many skipped steps in a row stop the run.
    """

    def __init__(self, max_consecutive_bad_steps: int = 10) -> None:
        if max_consecutive_bad_steps < 1:
            raise ValueError(f"max_consecutive_bad_steps must be >= 1, got {max_consecutive_bad_steps}")
        self.max_consecutive_bad_steps = max_consecutive_bad_steps
        self.consecutive_bad_steps = 0
        self.skipped_steps = 0
        self._skip_optimizer_step = False
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

    def skip_non_finite_loss(self, pl_module: LightningModule, terms: dict[str, Tensor]) -> Tensor | None:
        """Called by ``training_step`` with the loss terms (name -> scalar): None when every term is finite on
        every rank (one small all-reduce, so that all ranks skip together), else the loss to return instead."""
        names = list(terms)
        bad = torch.stack([~torch.isfinite(terms[name].detach()).all() for name in names]).to(torch.int32)
        bad = distributed.all_reduce_max(bad)
        bad_terms = [f"L_{name}" for name, flag in zip(names, bad.tolist()) if flag]
        if not bad_terms:
            if self._fp16:  # the gradient check is the scaler's: a finite loss ends a run of bad steps
                self.consecutive_bad_steps = 0
            return None
        self._count_bad_step(f"non-finite loss term(s) {', '.join(bad_terms)}")
        if self._norm_statistics:
            torch._foreach_copy_(self._norm_statistics, self._norm_snapshot)
        self._skip_optimizer_step = True
        # Lightning refuses a None loss under DDP, so backward runs on an exact zero that reaches every trainable
        # parameter (the NaN graph is never touched); on_before_optimizer_step then removes the gradients.
        return sum((p * 0.0).sum() for p in pl_module.parameters() if p.requires_grad)

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._skip_optimizer_step:
            # No gradient = no update: SGD/LARS skip parameters without .grad (weights, momentum, weight decay).
            self._skip_optimizer_step = False
            optimizer.zero_grad(set_to_none=True)
            return
        if self._fp16:
            return
        named = [(name, p.grad) for name, p in pl_module.named_parameters() if p.grad is not None]
        if not named:
            return
        # DDP has already averaged the gradients, so every rank reaches the same verdict here.
        norms = torch.stack(torch._foreach_norm([grad for _, grad in named]))
        if bool(torch.isfinite(norms).all()):
            self.consecutive_bad_steps = 0
            return
        bad = [name for (name, _), norm in zip(named, norms.tolist()) if not math.isfinite(norm)]
        optimizer.zero_grad(set_to_none=True)
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
