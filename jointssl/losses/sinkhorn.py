"""Distributed Sinkhorn-Knopp: equipartitioned soft cluster assignments (codes) for SwAV.

The SwAV reference (facebookresearch/swav, `distributed_sinkhorn`) computes Q = exp(scores / epsilon) and then
alternately normalises each prototype's total weight (summed over the samples of all ranks) and each sample's
total weight. Written as Q = diag(a) exp(S / epsilon) diag(b), the final, row-normalised result is

    codes[i, k] = softmax_k(S[i, k] / epsilon + log b[k])

where only the per-prototype weights b depend on the iterations (the per-sample weights a are erased by the
final row normalisation, and every global constant, such as the number of samples, cancels). This module
tracks log b instead of Q itself: the result is the reference's, but every exponential is taken of a
max-shifted argument, so scores up to 1 / epsilon (and adversarial ones: huge, -huge, constant, one-hot) stay
finite, every row sums to exactly 1, and ranks may hold different numbers of samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from jointssl.distributed import all_reduce_max, all_reduce_sum

# Logits beyond this magnitude are clamped: differences of two clamped logits stay finite in float32 (3.4e38),
# and no score a network produces comes anywhere near it.
_LOGIT_LIMIT = 1e30
# Lower bound on a prototype's total weight before taking its log: a prototype whose weight underflows to zero
# is boosted as strongly as float32 allows instead of producing -inf / NaN.
_TINY = torch.finfo(torch.float32).tiny


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Soft assignments of samples to prototypes with equal prototype usage over the global batch.

    Args:
        scores: [B, K] sample-by-prototype similarities of this rank (any float dtype; under autocast too), or
            [V, B, K]: V independent problems (e.g. the views of one batch) solved together, so that their
            all-reduces are shared (one per iteration for all V instead of one per iteration each).
            Ranks may hold different B; all ranks must call this together when torch.distributed is initialised.
        epsilon: entropic regularisation (the exponent is scores / epsilon).
        iterations: Sinkhorn iterations (each: normalise prototype totals over all ranks, then sample totals).

    Returns:
        codes shaped like ``scores``, float32, no gradient. Each row (a sample's soft assignment) sums to 1; each
        column sums to about B_global / K over the samples of all ranks (exactly so as the iterations converge).
    """
    if scores.ndim not in (2, 3):
        raise ValueError(f"scores must be [batch, prototypes] or [views, batch, prototypes], got shape "
                         f"{tuple(scores.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    # Mixed precision must not touch the exponentials: compute in float32 whatever the input / autocast.
    with torch.autocast(device_type=scores.device.type, enabled=False):
        logits = (scores.detach().float() / epsilon).clamp_(-_LOGIT_LIMIT, _LOGIT_LIMIT)
        num_samples = logits.shape[-2]

        # First prototype normalisation, of exp(logits) itself: a log-sum-exp over the samples of all ranks.
        # Subtracting each prototype's global maximum (a per-prototype constant, which this normalisation
        # erases exactly) keeps exp() <= 1 and gives every prototype at least one entry equal to 1.
        column_max = logits.new_full((*logits.shape[:-2], logits.shape[-1]), -_LOGIT_LIMIT)
        if num_samples > 0:
            torch.maximum(column_max, logits.amax(dim=-2), out=column_max)
        all_reduce_max(column_max)
        logits -= column_max.unsqueeze(-2)
        column_sums = all_reduce_sum(logits.exp().sum(dim=-2))
        log_prototype_weight = -column_sums.clamp_min(_TINY).log()

        # Later iterations: the sample normalisation makes each row a softmax; the prototype normalisation
        # divides each prototype by its total over all ranks.
        for _ in range(iterations - 1):
            codes = torch.softmax(logits + log_prototype_weight.unsqueeze(-2), dim=-1)
            column_sums = all_reduce_sum(codes.sum(dim=-2))
            log_prototype_weight -= column_sums.clamp_min(_TINY).log()

        return torch.softmax(logits + log_prototype_weight.unsqueeze(-2), dim=-1)
