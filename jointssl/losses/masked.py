"""L_mask: masked slice-embedding prediction. Choose slices to mask, then score the predictions at them.

Usage, with z the slice embeddings [B, N, D] and f_inter a SliceAggregator::

    mask = random_slice_mask(padding_mask, N, B)
    tokens = f_inter(f_inter.apply_mask(z, mask), padding_mask)
    loss = masked_embedding_loss(decoder(tokens), z, mask)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def keyed_uniform(keys: Tensor, num: int, salt: Sequence[int] = ()) -> Tensor:
    """Uniform draws [len(keys), num] in [0, 1) where row i depends only on ``keys[i]`` and ``salt``.

    Random choices made per sample (which slices to mask, which to pair) must not depend on how a batch is split
    between ranks, or on the state of a global generator: then two processes with half a batch each make exactly
    the choices one process makes for the whole batch, and a resumed run makes the choices of an uninterrupted one.
    ``keys`` are the samples' global indices; ``salt`` (e.g. a seed, the global step, a purpose tag) varies the
    draws between steps and uses. Returned on ``keys``' device.
    """
    rows = []
    for key in keys.tolist():
        seed = np.random.SeedSequence([*(int(s) % 2**63 for s in salt), int(key) % 2**63]).generate_state(1)[0]
        rows.append(torch.rand(num, generator=torch.Generator().manual_seed(int(seed))))
    if not rows:
        return torch.empty(0, num, device=keys.device)
    return torch.stack(rows).to(keys.device)


def random_slice_mask(
    padding_mask: Tensor | None,
    num_slices: int,
    batch_size: int,
    ratio: float = 0.15,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    uniform: Tensor | None = None,
) -> Tensor:
    """Choose ``round(ratio * n)`` random real slices per volume (n = its real slices), clamped to [1, n - 1].

    Padded slices (``padding_mask`` True) are never chosen, and at least one real slice always stays visible,
    so a volume with a single real slice gets no masked slice. Returns a boolean mask [batch_size, num_slices]
    on ``device`` (default: the padding mask's device, else CPU). ``generator`` makes the choice reproducible;
    it is used on its own device and the result moved. ``uniform`` ([batch_size, num_slices] draws in [0, 1),
    e.g. from `keyed_uniform`) replaces the random draws altogether.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if device is None:
        device = padding_mask.device if padding_mask is not None else torch.device("cpu")
    if padding_mask is None:
        real = torch.ones(batch_size, num_slices, dtype=torch.bool, device=device)
    else:
        if padding_mask.dtype != torch.bool or padding_mask.shape != (batch_size, num_slices):
            raise ValueError(
                f"padding_mask must be boolean {(batch_size, num_slices)}, "
                f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        real = ~padding_mask.to(device)
    lengths = real.sum(dim=1)
    # Float64 and round-half-to-even: the same count as Python's round(ratio * n).
    counts = torch.round(lengths.double() * ratio).long().clamp(min=1)
    counts = torch.minimum(counts, (lengths - 1).clamp(min=0))

    if uniform is None:
        random_device = generator.device if generator is not None else device
        uniform = torch.rand(batch_size, num_slices, generator=generator, device=random_device)
    elif uniform.shape != (batch_size, num_slices):
        raise ValueError(f"uniform must be {(batch_size, num_slices)}, got {tuple(uniform.shape)}")
    scores = uniform.to(device)
    scores = scores.masked_fill(~real, 2.0)  # above every uniform draw: padded slices rank last
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < counts.unsqueeze(1)


def masked_embedding_loss(predicted: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the masked positions only (mean over their elements), in float32.

    Args:
        predicted: decoded embeddings [B, N, D].
        target: the original slice embeddings [B, N, D]; detached here (stop-gradient).
        mask: [B, N] bool, True where the slice was masked.

    Returns a float32 scalar; 0 (still connected to ``predicted``'s graph) when nothing is masked.
    """
    if predicted.shape != target.shape or predicted.dim() != 3:
        raise ValueError(
            f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} must match [B, N, D]"
        )
    if mask.dtype != torch.bool or mask.shape != predicted.shape[:2]:
        raise ValueError(
            f"mask must be boolean {tuple(predicted.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
        )
    error = predicted.float() - target.detach().float()
    # Select before squaring (where(), not a product): unmasked positions then contribute exactly nothing, to
    # the loss or its gradient, whatever they hold (padded slices may be non-finite).
    masked_error = torch.where(mask.unsqueeze(-1), error, torch.zeros_like(error))
    num_elements = mask.sum().to(error.dtype) * predicted.shape[-1]
    # Without a host sync: an empty mask gives 0 / 1 = 0, still a function of ``predicted``.
    return masked_error.pow(2).sum() / num_elements.clamp(min=1.0)
