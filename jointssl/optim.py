"""Optimisation as in the SwAV / DeepCluster-v2 reference recipe: SGD + momentum with LARS, warm-up then cosine."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (LARS), as in SwAV's LARC and solo-learn's LARS.

    For every parameter tensor ``p`` with gradient ``g`` (parameters whose grad is None are skipped):

        if p takes part in LARS and ||p|| > 0 and ||g|| > 0:
            trust = eta * ||p|| / (||g|| + weight_decay * ||p|| + eps)
            if clip: trust = min(trust / lr, 1)
            d = trust * (g + weight_decay * p)
        else:
            d = g
        buf = d                      (first step)
        buf = momentum * buf + d     (later steps)
        p  -= lr * buf

    With ``exclude_bias_and_norm`` (the default), tensors with ``ndim <= 1`` (biases, norm scales and shifts) take
    no part in LARS: they get neither weight decay nor trust-ratio scaling. Like the references, a tensor whose
    norm or gradient norm is zero gets no weight decay either (a zeroed gradient means "frozen this step").
    ``trust_coefficient=0`` switches the adaptation off: plain SGD + momentum, with weight decay on the tensors
    that would have been adapted. All options are per param group.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 1e-3,
        clip: bool = False,
        exclude_bias_and_norm: bool = True,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"invalid momentum {momentum}")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if trust_coefficient < 0:
            raise ValueError(f"invalid trust_coefficient {trust_coefficient}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "clip": clip,
            "exclude_bias_and_norm": exclude_bias_and_norm,
            "eps": eps,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients")
            grads = [p.grad for p in params]
            updates = self._lars_updates(params, grads, group)
            self._momentum_step(params, updates, group)
        return loss

    @staticmethod
    def _lars_updates(params: list[Tensor], grads: list[Tensor], group: dict[str, Any]) -> list[Tensor]:
        """Per-tensor updates ``d`` (see the class docstring), computed without host synchronisation."""
        weight_decay = group["weight_decay"]
        adapted = [p.ndim > 1 or not group["exclude_bias_and_norm"] for p in params]
        if group["trust_coefficient"] == 0:
            # LARS switched off: SGD with weight decay on the tensors LARS would have adapted.
            return [g.add(p, alpha=weight_decay) if a else g for p, g, a in zip(params, grads, adapted)]
        adapted_params = [p for p, a in zip(params, adapted) if a]
        adapted_grads = [g for g, a in zip(grads, adapted) if a]
        param_norms = torch._foreach_norm(adapted_params) if adapted_params else []
        grad_norms = torch._foreach_norm(adapted_grads) if adapted_grads else []

        updates: list[Tensor] = []
        adapted_index = 0
        for p, g, is_adapted in zip(params, grads, adapted):
            if not is_adapted:
                updates.append(g)
                continue
            p_norm, g_norm = param_norms[adapted_index], grad_norms[adapted_index]
            adapted_index += 1
            # torch.where instead of `if p_norm > 0` keeps the step free of GPU->CPU syncs.
            active = (p_norm > 0) & (g_norm > 0)
            trust = group["trust_coefficient"] * p_norm / (g_norm + weight_decay * p_norm + group["eps"])
            if group["clip"]:
                trust = torch.clamp(trust / group["lr"], max=1.0)
            scale = torch.where(active, trust, torch.ones_like(trust)).to(g.dtype)
            decay = weight_decay * active.to(g.dtype)  # computed in g's dtype: a float32 0.1 != a float64 0.1
            updates.append((g + decay * p) * scale)
        return updates

    def _momentum_step(self, params: list[Tensor], updates: list[Tensor], group: dict[str, Any]) -> None:
        """Heavy-ball momentum (torch SGD convention, no dampening), then ``p -= lr * buf``."""
        momentum = group["momentum"]
        if momentum == 0:
            torch._foreach_add_(params, updates, alpha=-group["lr"])
            return
        buffers: list[Tensor] = []
        for p, update in zip(params, updates):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = update.detach().clone()
            else:
                state["momentum_buffer"].mul_(momentum).add_(update)
            buffers.append(state["momentum_buffer"])
        torch._foreach_add_(params, buffers, alpha=-group["lr"])


def split_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two param groups for optimizers other than LARS: tensors with ``ndim > 1`` get ``weight_decay``, biases and
    norm parameters get none. (LARS applies the same rule by itself via ``exclude_bias_and_norm``.)"""
    decayed = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    not_decayed = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
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
