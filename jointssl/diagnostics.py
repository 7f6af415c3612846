"""Training diagnostics that read against a trivial baseline, so that a curve says by itself whether a loss learns.

A loss value alone means little: a clustering loss near ln K is chance, and a small masked-prediction error can
just mean that the slices of a volume barely differ. Each function here compares with what a predictor that
learned nothing would get:

* clustering (L_intra, L_inter): the loss over ln K (1 = chance) and the mean entropy of the targets and of the
  predictions over ln K (1 = uniform, 0 = one-hot);
* masked slice prediction (L_mask): R^2 of the predictions against two baselines computed from the visible slices
  only, the mean of the volume's visible slices and linear interpolation between the nearest visible neighbours
  (R^2 > 0: better than the baseline; 1: perfect);
* embeddings (f_intra, f_inter): the mean L2 norm (shrinkage) and the effective rank (collapse).

All functions are pure, take detached tensors (they never build a graph) and compute in float32. The neighbour
baseline is `jointssl.losses.masked.interpolate_masked_slices`, which L_mask also builds its prediction on.
:class:`PooledMaskR2` is the same R^2 pooled over many batches, to judge a finished model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jointssl.losses.masked import interpolate_masked_slices, visible_slices


@torch.no_grad()
def loss_over_chance(loss: Tensor, num_prototypes: int) -> Tensor:
    """A clustering loss over ln K, the loss of a uniform prediction: 1 = chance, 0 = perfect."""
    return loss.detach().float() / math.log(num_prototypes)


@torch.no_grad()
def normalised_entropy(probabilities: Tensor) -> Tensor:
    """Mean entropy of the rows of ``probabilities`` [B, K] over ln K (1 = uniform rows, 0 = one-hot rows)."""
    p = probabilities.detach().float()
    entropy = -(p * p.clamp(min=1e-12).log()).sum(dim=1)
    return entropy.mean() / math.log(p.shape[1])


@torch.no_grad()
def effective_rank(embeddings: Tensor) -> Tensor:
    """RankMe (Garrido et al., ICML 2023): exp of the entropy of the normalised singular values of [B, D].

    Between 1 (every embedding on one line: collapse) and min(B, D). Computed on the embeddings as they are
    (not centred), as RankMe does.
    """
    x = embeddings.detach().float()
    # Non-finite embeddings (a step the numerics guard skips) give NaN, not an SVD failure; decided on the device.
    finite = torch.isfinite(x).all()
    singular = torch.linalg.svdvals(torch.where(finite, x, torch.zeros_like(x)))
    p = singular / singular.sum().clamp(min=1e-12)
    entropy = -(p * p.clamp(min=1e-12).log()).sum()
    return torch.where(finite, entropy.exp(), torch.full_like(entropy, float("nan")))


@torch.no_grad()
def mean_norm(embeddings: Tensor) -> Tensor:
    """Mean L2 norm of the rows of [B, D]."""
    return embeddings.detach().float().norm(dim=1).mean()


@torch.no_grad()
def visible_mean_baseline(target: Tensor, mask: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """Every slice predicted as the mean of its volume's visible (real, unmasked) slices: [B, N, D]."""
    visible = visible_slices(mask, padding_mask).unsqueeze(-1)
    t = target.detach().float()
    summed = torch.where(visible, t, torch.zeros_like(t)).sum(dim=1, keepdim=True)
    mean = summed / visible.sum(dim=1, keepdim=True).clamp(min=1)
    return mean.expand_as(t)


#: The trivial predictors of a masked slice that L_mask is read against: name -> (target, mask, padding) -> [B, N, D].
MASK_BASELINES = {"mean": visible_mean_baseline, "neighbours": interpolate_masked_slices}


@torch.no_grad()
def masked_sse(predicted: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Sum of squared errors of ``predicted`` over the masked positions (float32 scalar)."""
    t = target.detach().float()
    return torch.where(mask.unsqueeze(-1), predicted.detach().float() - t, torch.zeros_like(t)).pow(2).sum()


@torch.no_grad()
def r2_against(predicted: Tensor, target: Tensor, baseline: Tensor, mask: Tensor) -> Tensor:
    """1 - SSE(predicted) / SSE(baseline) over the masked positions: > 0 beats the baseline, 1 is perfect.
    NaN when nothing is masked or the baseline is exact."""
    return 1.0 - masked_sse(predicted, target, mask) / masked_sse(baseline, target, mask)


class PooledMaskR2:
    """R^2 of masked-slice predictions against both baselines, pooled over many batches:
    ``1 - sum SSE(predicted) / sum SSE(baseline)``.

    The logged per-step figure is a ratio over one batch's few masked spans (with a volume batch of 2, a handful of
    slices), so a 10-step mean of it swings by +-0.2 on real data; to judge a finished model, pool the errors over
    a pass (or several) of its data instead. ``update`` takes what ``JointSSL.compute_losses`` returns in
    ``out["diagnostics"]["mask"]``: (predicted, target, mask, padding)."""

    def __init__(self) -> None:
        self.sse = {"predicted": 0.0, **{name: 0.0 for name in MASK_BASELINES}}
        self.masked = 0

    def update(self, predicted: Tensor, target: Tensor, mask: Tensor, padding: Tensor | None) -> None:
        self.sse["predicted"] += float(masked_sse(predicted, target, mask))
        for name, baseline in MASK_BASELINES.items():
            self.sse[name] += float(masked_sse(baseline(target, mask, padding), target, mask))
        self.masked += int(mask.sum())

    def r2(self) -> dict[str, float]:
        """``{"vs_mean": ..., "vs_neighbours": ...}``; NaN for a baseline without error (or nothing masked)."""
        return {f"vs_{name}": 1.0 - self.sse["predicted"] / self.sse[name] if self.sse[name] > 0 else math.nan
                for name in MASK_BASELINES}
