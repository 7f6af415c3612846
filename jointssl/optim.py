"""Optimisation as in the SwAV / DeepCluster-v2 reference recipe: SGD + momentum with LARS, warm-up then cosine."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


def lars(
    parameters: Iterable[nn.Parameter],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-6,
    trust_coefficient: float = 1e-3,
) -> torch.optim.Optimizer:
    """SGD with momentum and layer-wise adaptive rate scaling (LARS), as in SwAV's LARC: timm's ``Lars`` over two
    groups of the trainable ``parameters``.

    Weight matrices and convolutions (``ndim > 1``) are adapted and decayed: ``d = trust * (g + weight_decay * p)``
    with ``trust = eta * ||p|| / (||g|| + weight_decay * ||p|| + eps)``; biases and norm parameters (``ndim <= 1``)
    are neither (``d = g``). Then heavy-ball momentum (``buf = d`` at the first step, ``momentum * buf + d``
    after) and ``p -= lr * buf``. Parameters without a gradient are left alone (weights, momentum, decay).
    One difference from the SwAV reference: a tensor whose gradient is exactly zero gets ``trust = 1`` and its
    weight decay (``d = weight_decay * p``), where LARC skipped it; jointssl never hands the optimizer such
    gradients (frozen prototypes and skipped steps have ``grad = None``). ``trust_coefficient=0`` switches the
    adaptation off: plain SGD + momentum with the same two decay groups.
    """
    from timm.optim import Lars

    adapted, plain = decay_groups(parameters, weight_decay)
    if trust_coefficient == 0:
        return torch.optim.SGD([g for g in (adapted, plain) if g["params"]], lr=lr, momentum=momentum)
    # timm adapts a group when its weight decay is non-zero or `always_adapt` is set: the ndim > 1 group always
    # (weight_decay 0 must still be LARS), the other never (its decay is 0: plain SGD + momentum).
    adapted["always_adapt"], plain["always_adapt"] = True, False
    return Lars([g for g in (adapted, plain) if g["params"]], lr=lr, momentum=momentum, trust_coeff=trust_coefficient)


def decay_groups(parameters: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Two param groups of the trainable ``parameters`` (LARS and every other optimizer): tensors with ``ndim > 1``
    get ``weight_decay``, biases and norm parameters (``ndim <= 1``) get none."""
    trainable = [p for p in parameters if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
    ]


class WarmupCosine:
    """LR multiplier for ``torch.optim.lr_scheduler.LambdaLR``: linear warm-up, then cosine decay.

    For step ``s`` (number of scheduler steps taken so far):
    - ``s < warmup_steps``: ``(s + 1) / warmup_steps`` (1/warmup_steps at the first step, 1 at the last warm-up step);
    - afterwards: ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * t)) / 2`` with
      ``t = (s - warmup_steps) / (total_steps - warmup_steps)``, clamped to [0, 1] — 1 right after warm-up,
      ``min_lr_ratio`` from ``total_steps`` on.

    A class rather than a closure so that it pickles, and so that ``LambdaLR.state_dict()`` records its settings.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> None:
        if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got "
                f"warmup_steps={warmup_steps}, total_steps={total_steps}"
            )
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        progress = 1.0 if decay_steps == 0 else min(max((step - self.warmup_steps) / decay_steps, 0.0), 1.0)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> WarmupCosine:
    """The ``lr_lambda`` for ``LambdaLR(optimizer, warmup_cosine_lambda(...))``; see :class:`WarmupCosine`."""
    return WarmupCosine(warmup_steps, total_steps, min_lr_ratio)


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, trainer: Trainer, warmup_epochs: float, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up over ``warmup_epochs`` then cosine decay to ``min_lr_ratio`` at the trainer's last
    optimizer step (``max_steps``, or ``max_epochs`` x batches per epoch)."""
    total_steps = max(1, int(trainer.estimated_stepping_batches))
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        # With max_epochs=-1 Lightning answers estimated_stepping_batches with max_steps without loading the
        # training data, so the batches per epoch are still unknown (inf): load the data now, as
        # estimated_stepping_batches itself does when max_epochs is set.
        trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
    steps_per_epoch = max(1, int(batches) // max(1, trainer.accumulate_grad_batches))
    warmup_steps = min(int(warmup_epochs * steps_per_epoch), total_steps - 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(warmup_steps, total_steps, min_lr_ratio))
