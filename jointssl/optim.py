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


def upgrade_single_group_lars(checkpoint: dict[str, Any], parameters: Iterable[nn.Parameter]) -> bool:
    """Rewrite, in place, the optimizer and scheduler state of a checkpoint written before jointssl's LARS became
    timm's ``Lars`` over :func:`decay_groups` (2026-12-02): one param group holding every trainable parameter in
    ``parameters`` order, with the keys of jointssl's own LARS class (``trust_coefficient``, ``clip``,
    ``exclude_bias_and_norm``). Its updates were the ones :func:`lars` makes (the ``ndim <= 1`` tensors neither
    adapted nor decayed), so the momentum buffers carry over unchanged; the group becomes the two groups :func:`lars`
    builds now, and the LambdaLR state gets one base and last learning rate per group. Returns whether it did.

    ``parameters``: the model's parameters (the trainable ones are taken), as :func:`lars` receives them. A checkpoint
    whose group does not list exactly that many parameters is left as it is (torch then reports the mismatch)."""
    optimizers = checkpoint.get("optimizer_states") or []
    if len(optimizers) != 1 or len(optimizers[0].get("param_groups", ())) != 1:
        return False
    saved = optimizers[0]
    old = saved["param_groups"][0]
    trainable = [p for p in parameters if p.requires_grad]
    if "trust_coefficient" not in old or len(old["params"]) != len(trainable):
        return False
    position = {id(p): i for i, p in enumerate(trainable)}
    # The groups lars() builds now, with every key of their optimizer's defaults (torch's load_state_dict takes the
    # saved group's keys as the group's settings, so none may be missing).
    template = lars([nn.Parameter(torch.zeros(1, 1)), nn.Parameter(torch.zeros(1))], lr=old["lr"],
                    momentum=old["momentum"], weight_decay=old["weight_decay"],
                    trust_coefficient=old["trust_coefficient"]).param_groups
    groups, state, index = [], {}, 0
    for template_group, members in zip(template, decay_groups(trainable, old["weight_decay"])):
        group = {key: value for key, value in template_group.items() if key != "params"}
        group.update({key: old[key] for key in ("lr", "initial_lr") if key in old})
        if "trust_coeff" in group:  # timm's Lars (SGD when the trust coefficient is 0)
            group.update(eps=old["eps"], trust_clip=old["clip"])
        group["params"] = []
        for parameter in members["params"]:
            old_index = old["params"][position[id(parameter)]]
            if old_index in saved["state"]:
                state[index] = saved["state"][old_index]
            group["params"].append(index)
            index += 1
        groups.append(group)
    saved["param_groups"], saved["state"] = groups, state
    for scheduler in checkpoint.get("lr_schedulers") or []:
        for key in ("base_lrs", "_last_lr"):
            if isinstance(scheduler.get(key), list) and len(scheduler[key]) == 1:
                scheduler[key] = scheduler[key] * len(groups)
        lambdas = scheduler.get("lr_lambdas")
        if isinstance(lambdas, list) and len(lambdas) == 1:
            scheduler["lr_lambdas"] = [lambdas[0]] + [dict(lambdas[0]) if lambdas[0] else None] * (len(groups) - 1)
    return True


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
