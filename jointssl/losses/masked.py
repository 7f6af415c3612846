"""L_mask: masked slice-embedding prediction. Choose slices to mask, then score the predictions at them.

Usage, with z the slice embeddings [B, N, D] and f_inter a SliceAggregator::

    mask = random_slice_mask(padding_mask, N, B, ratio=0.3, span=4)
    tokens = f_inter(z, padding_mask, mask)
    target = standardise_slices(z, visible_slices(mask, padding_mask))   # jointssl.models.aggregator
    predicted = interpolate_masked_slices(target, mask, padding_mask) + decoder(tokens)
    loss = masked_embedding_loss(predicted, target, mask)

Why: neighbouring slices are nearly alike, so a masked slice is largely answered by interpolating the nearest
visible slices. On the demo data that trivial predictor beat the paper's formulation (a mask token decoded to the
raw embedding) 22-fold. So masks come in contiguous spans, and f_inter + decoder predict what interpolation misses:
L_mask is then the interpolation's error minus what the volume's context adds, and anything f_inter learns shows
as ``train/mask_r2_vs_neighbours`` > 0 (docs/results.md has the measurements).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def keyed_uniform(
    keys: Tensor | Sequence[int], num: int, salt: Sequence[int] = (), device: torch.device | str | None = None
) -> Tensor:
    """Uniform draws [len(keys), num] in [0, 1) where row i depends only on ``keys[i]`` and ``salt``.

    Random choices made per sample (which slices to mask, which to pair) must not depend on how a batch is split
    between ranks, or on the state of a global generator: then two processes with half a batch each make exactly
    the choices one process makes for the whole batch, and a resumed run makes the choices of an uninterrupted one.
    ``keys`` are the samples' global indices (a host list of ints avoids the device sync of reading a tensor);
    ``salt`` (e.g. a seed, the global step, a purpose tag) varies the draws between steps and uses. Returned on
    ``device`` (default: the device of ``keys``, the CPU for a list).
    """
    if isinstance(keys, Tensor):
        device = keys.device if device is None else device
        keys = keys.tolist()
    rows = []
    for key in keys:
        seed = np.random.SeedSequence([*(int(s) % 2**63 for s in salt), int(key) % 2**63]).generate_state(1)[0]
        rows.append(torch.rand(num, generator=torch.Generator().manual_seed(int(seed))))
    if not rows:
        return torch.empty(0, num, device=device)
    # non_blocking: a host-to-device copy that the step does not wait for.
    return torch.stack(rows).to(device, non_blocking=True)


def random_slice_mask(
    padding_mask: Tensor | None,
    num_slices: int,
    batch_size: int,
    ratio: float = 0.15,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    uniform: Tensor | None = None,
    span: int = 1,
) -> Tensor:
    """Choose ``round(ratio * n)`` random real slices per volume (n = its real slices), clamped to [1, n - 1],
    in contiguous spans of ``span`` slices.

    With ``span > 1`` the volume's slices are cut into consecutive blocks of ``span`` (the block grid starts at a
    random phase) and whole blocks are masked in random order; the last block chosen is masked from its start up
    to the count, so the count is exact. Chosen blocks may be adjacent (a longer span). ``span=1`` masks
    independent slices.

    Padded slices (``padding_mask`` True) are never chosen, and at least one real slice always stays visible,
    so a volume with a single real slice gets no masked slice. Returns a boolean mask [batch_size, num_slices]
    on ``device`` (default: the padding mask's device, else CPU). ``generator`` makes the choice reproducible;
    it is used on its own device and the result moved. ``uniform`` ([batch_size, num_slices] draws in [0, 1),
    e.g. from `keyed_uniform`) replaces the random draws altogether.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
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
    if span > 1:
        # Draw 0 sets the block grid's phase; block b ranks by draw (b + 1). Integer keys (block rank, then block
        # index to break ties, then position within the block) keep every chosen block's slices together.
        position = torch.arange(num_slices, device=device).unsqueeze(0)
        phase = (scores[:, :1] * span).long().clamp(max=span - 1)
        block = (position + phase) // span
        block_draw = scores.gather(1, (block + 1).clamp(max=num_slices - 1))
        block_rank = (block_draw.double() * 2**20).long()
        scores = (block_rank * (num_slices + 1) + block) * span + (position + phase) % span
        scores = scores.masked_fill(~real, torch.iinfo(torch.long).max)  # padded slices rank last
    else:
        scores = scores.masked_fill(~real, 2.0)  # above every uniform draw: padded slices rank last
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < counts.unsqueeze(1)


def visible_slices(mask: Tensor, padding_mask: Tensor | None) -> Tensor:
    """Real slices that are not masked: [B, N] bool."""
    real = torch.ones_like(mask) if padding_mask is None else ~padding_mask
    return real & ~mask


@torch.no_grad()
def interpolate_masked_slices(target: Tensor, mask: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """Every slice predicted by linear interpolation (in slice index) between the nearest visible slice on either
    side, or a copy of the one visible neighbour where there is only one side: [B, N, D] float32, no gradient.
    Visible slices come out unchanged."""
    visible = visible_slices(mask, padding_mask)
    t = target.detach().float()
    batch, num_slices, _ = t.shape
    position = torch.arange(num_slices, device=t.device).expand(batch, num_slices)
    # Index of the nearest visible slice at or before / at or after each position (-1 / N where there is none).
    before = torch.where(visible, position, torch.full_like(position, -1)).cummax(dim=1).values
    after_flipped = torch.where(visible, position, torch.full_like(position, num_slices)).flip(1)
    after = after_flipped.cummin(dim=1).values.flip(1)
    has_before, has_after = before >= 0, after < num_slices
    before_value = t.gather(1, before.clamp(min=0).unsqueeze(-1).expand_as(t))
    after_value = t.gather(1, after.clamp(max=num_slices - 1).unsqueeze(-1).expand_as(t))
    gap = (after - before).clamp(min=1).float()
    weight_after = ((position - before).float() / gap).unsqueeze(-1)
    both = before_value + weight_after * (after_value - before_value)
    only_before = (has_before & ~has_after).unsqueeze(-1)
    only_after = (~has_before & has_after).unsqueeze(-1)
    return torch.where(only_before, before_value, torch.where(only_after, after_value, both))


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
