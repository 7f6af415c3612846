"""Deformable self-attention across the slices of a volume: DAT (Xia et al., CVPR 2022) in one dimension.

The tokens are the N slice embeddings of a volume, in slice order. Every query attends to a small set of keys
and values that are *sampled* from the sequence rather than to all N slices:

1. Reference points. A sequence with ``n`` real slices gets ``M_n = min(ceil(n / downsample), max_points)``
   reference points at the centres of ``M_n`` equal cells covering its real extent:
   ``r_j = (j + 0.5) * n / M_n - 0.5`` (slice units, slice i sits at position i). A batch holds
   ``M = min(ceil(N / downsample), max_points)`` slots per sequence; the slots a shorter sequence does not use
   are masked out of the softmax, so a sequence gives the same result padded or alone. ``max_points`` makes the
   attention linear in N: without it every one of the N queries attends to N / downsample keys, O(N^2)
   (measured in benchmarks/bench_scaling.py: exponent 1.17 from 256 to 512 slices); beyond
   ``downsample * max_points`` slices the cells widen instead (DAT and Deformable DETR likewise keep a fixed
   number of sampled keys per query).
2. Offsets. Per head, the query features (the head's channel group) go through a depthwise Conv1d along the
   slice axis, LayerNorm, GELU and a pointwise projection to one offset logit per slice (the network is shared
   by the heads, as in DAT). The logit field is read at the reference points by linear interpolation (DAT
   evaluates a strided convolution there instead, which has no equivalent for a ragged batch). The offset is
   ``tanh(logit) * offset_scale / 2`` reference spacings, which is DAT's ``offset_range_factor`` convention:
   with the defaults (downsample 4, offset scale 2) a point moves at most one spacing (about 4 slices).
3. Sampling. Sampled position = reference + offset, clamped to ``[0, n - 1]`` of its own sequence, so padded
   slices are never read. Keys and values are the projected tokens linearly interpolated at these fractional
   positions (gather + lerp), so the gradient reaches the offsets through the interpolation weights.
4. Attention. softmax(q k^T / sqrt(d_head) + bias) over the sampled keys, in float32, where ``bias`` is a
   learned per-head relative-position bias over the continuous signed distance (query index - sampled
   position): a table on a log-spaced distance axis read by linear interpolation (DAT's continuous bias, made
   length independent), so it also passes gradient to the offsets.

Padding is trailing (real slices first; ``padding_mask`` True = padded, PyTorch's key_padding_mask
convention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def lengths_from_padding_mask(
    padding_mask: Tensor | None, batch_size: int, num_slices: int, device: torch.device
) -> Tensor:
    """Number of real slices per sequence, a long tensor [B].

    Raises ValueError unless the mask is boolean [B, N] with trailing padding (real slices first), the only
    layout in which a slice's index is its position in the volume.
    """
    if padding_mask is None:
        return torch.full((batch_size,), num_slices, dtype=torch.long, device=device)
    if padding_mask.dtype != torch.bool:
        raise ValueError(f"padding_mask must be boolean (True = padded slice), got {padding_mask.dtype}")
    if padding_mask.shape != (batch_size, num_slices):
        raise ValueError(
            f"padding_mask shape {tuple(padding_mask.shape)} != (batch, slices) {(batch_size, num_slices)}"
        )
    lengths = (~padding_mask).sum(dim=1)
    trailing = torch.arange(num_slices, device=padding_mask.device)[None, :] >= lengths[:, None]
    if not torch.equal(trailing, padding_mask):
        raise ValueError("padding_mask must mark trailing slices only (real slices first, then padding)")
    return lengths


def interpolate_along_slices(features: Tensor, positions: Tensor, last_index: Tensor) -> Tensor:
    """Linear interpolation of ``features`` [B, H, N, C] at fractional slice ``positions`` [B, H, M].

    ``positions`` must lie in ``[0, last_index[b]]`` (``last_index`` [B], long); neighbours are taken no
    further than ``last_index`` so that padded slices are never read. Differentiable w.r.t. features and
    positions. Returns [B, H, M, C] in the dtype of ``features``.
    """
    batch, _, _, channels = features.shape
    # The neighbours' indices come from positions made finite and in range first: a NaN position (from a NaN
    # activation) would otherwise become index -2**63 and an IndexError in gather. The weight below keeps the
    # NaN, so the output and the loss are NaN and the training step's non-finite guard skips the step.
    safe = torch.nan_to_num(positions.detach(), nan=0.0)
    lower_float = torch.minimum(safe.clamp(min=0.0), last_index.view(batch, 1, 1).to(safe.dtype)).floor()
    # The weight keeps the gradient to the positions; the integer neighbours carry none.
    upper_weight = (positions - lower_float).unsqueeze(-1)
    lower = lower_float.long()
    upper = torch.minimum(lower + 1, last_index.view(batch, 1, 1))
    lower_values = features.gather(2, lower.unsqueeze(-1).expand(-1, -1, -1, channels))
    upper_values = features.gather(2, upper.unsqueeze(-1).expand(-1, -1, -1, channels))
    interpolated = lower_values + upper_weight * (upper_values - lower_values)
    return interpolated.to(features.dtype)


def num_reference_points(num_slices: int, downsample: int, max_points: int | None) -> int:
    """Reference points of a sequence of ``num_slices`` slices: ``min(ceil(n / downsample), max_points)``."""
    points = math.ceil(num_slices / downsample)
    return points if max_points is None else min(points, max_points)


def reference_positions(
    lengths: Tensor,
    num_points: int,
    downsample: int,
    dtype: torch.dtype = torch.float32,
    max_points: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Uniform reference points over each sequence's real extent.

    Args:
        lengths: real slices per sequence [B] (long, >= 1).
        num_points: slots per sequence, ``num_reference_points(N, downsample, max_points)`` for the padded
            length N.
        downsample: slices per reference point.
        max_points: most reference points of a sequence (None: no bound).

    Returns:
        positions [B, M] (cell centres in slice units; unused slots hold 0), valid [B, M] (slot in use),
        spacing [B] (slices per reference cell, ``n / M_n``).
    """
    points_per_sequence = (lengths + downsample - 1) // downsample
    if max_points is not None:
        points_per_sequence = points_per_sequence.clamp(max=max_points)
    spacing = lengths.to(dtype) / points_per_sequence.to(dtype)
    slot = torch.arange(num_points, device=lengths.device)
    valid = slot[None, :] < points_per_sequence[:, None]
    positions = (slot.to(dtype)[None, :] + 0.5) * spacing[:, None] - 0.5
    return torch.where(valid, positions, torch.zeros_like(positions)), valid, spacing


class SliceOffsetNetwork(nn.Module):
    """Offset logits from query features: depthwise Conv1d over slices, LayerNorm, GELU, pointwise to 1."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"offset_kernel_size must be odd and positive (same-length output), got {kernel_size}"
            )
        self.depthwise = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.activation = nn.GELU()
        self.pointwise = nn.Linear(channels, 1, bias=False)  # no bias: no preferred direction of motion

    def forward(self, queries: Tensor) -> Tensor:
        """queries [B, H, N, C] (padded slices zeroed by the caller) -> offset logits [B, H, N]."""
        batch, heads, num_slices, channels = queries.shape
        per_head = queries.reshape(batch * heads, num_slices, channels).transpose(1, 2)
        hidden = self.depthwise(per_head).transpose(1, 2)
        logits = self.pointwise(self.activation(self.norm(hidden)))
        return logits.reshape(batch, heads, num_slices)


class SliceDistanceBias(nn.Module):
    """Learned per-head bias over the continuous signed slice distance (query index - sampled key position).

    The distance is mapped to a log-spaced axis, ``asinh(d) / ln 2 * bins_per_octave`` (linear near 0, one bin
    per 1/bins_per_octave octave far away), and a table on that axis is read by linear interpolation. This
    works for any number of slices; distances beyond about ``2 ** (max_octaves - 1)`` slices share the end
    entries.
    """

    def __init__(self, num_heads: int, bins_per_octave: int = 4, max_octaves: int = 11) -> None:
        super().__init__()
        self.bins_per_octave = bins_per_octave
        self.half_width = bins_per_octave * max_octaves
        self.table = nn.Parameter(torch.zeros(num_heads, 2 * self.half_width + 1))
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, distance: Tensor) -> Tensor:
        """distance [B, H, N, M] -> bias [B, H, N, M] (float32 or wider)."""
        batch, heads = distance.shape[:2]
        distance = distance.float() if distance.dtype != torch.float64 else distance
        coordinate = torch.asinh(distance) * (self.bins_per_octave / math.log(2.0))
        coordinate = coordinate.clamp(-self.half_width, self.half_width) + self.half_width
        # NaN survives the clamp above; as an index it would be -2**63 (see interpolate_along_slices).
        safe = torch.nan_to_num(coordinate.detach(), nan=0.0)
        lower = safe.floor().clamp(min=0, max=2 * self.half_width - 1)
        upper_weight = coordinate - lower
        lower_index = lower.long().reshape(batch, heads, -1)
        table = self.table.to(distance.dtype).unsqueeze(0).expand(batch, -1, -1)
        lower_values = table.gather(2, lower_index).view_as(distance)
        upper_values = table.gather(2, lower_index + 1).view_as(distance)
        return lower_values + upper_weight * (upper_values - lower_values)


class DeformableSliceAttention(nn.Module):
    """Multi-head deformable self-attention whose tokens are the slices of a volume (see module docstring).

    Args:
        d_model: token width; divisible by ``num_heads``.
        num_heads: attention heads; each samples its own key positions.
        downsample: slices per reference point (``ceil(n / downsample)`` keys per query).
        max_points: most keys per query (None: no bound, the cost is then quadratic in the slices); longer
            sequences get wider reference cells.
        offset_scale: DAT's offset range factor; offsets are bounded by ``offset_scale / 2`` reference
            spacings.
        dropout: dropout on the attention weights (the residual dropout belongs to the transformer layer).
        offset_kernel_size: odd kernel of the depthwise convolution of the offset network.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        downsample: int = 4,
        offset_scale: float = 2.0,
        dropout: float = 0.0,
        offset_kernel_size: int = 5,
        max_points: int | None = None,
    ) -> None:
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        if max_points is not None and max_points < 1:
            raise ValueError(f"max_points must be >= 1 or None, got {max_points}")
        if offset_scale < 0:
            raise ValueError(f"offset_scale must be >= 0, got {offset_scale}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.downsample = downsample
        self.max_points = max_points
        self.offset_scale = offset_scale
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.output = nn.Linear(d_model, d_model)
        self.offset_network = SliceOffsetNetwork(self.head_dim, offset_kernel_size)
        self.position_bias = SliceDistanceBias(num_heads)
        self.attention_dropout = nn.Dropout(dropout)

    def _split_heads(self, tokens: Tensor) -> Tensor:
        batch, num_slices, _ = tokens.shape
        return tokens.view(batch, num_slices, self.num_heads, self.head_dim).transpose(1, 2)

    def sample_positions(self, queries: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Sampled key positions [B, H, M] (slice units, within each sequence's real extent) and the slot mask
        [B, M], from the head-split queries [B, H, N, C] whose padded slices are zero."""
        batch, heads, num_slices, _ = queries.shape
        position_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
        num_points = num_reference_points(num_slices, self.downsample, self.max_points)
        last_index = lengths - 1
        references, valid, spacing = reference_positions(
            lengths, num_points, self.downsample, position_dtype, self.max_points
        )
        references = references[:, None, :].expand(batch, heads, num_points)
        # Positions stay in float32: in bfloat16, slice indices above 32 are quantised to a quarter slice.
        offset_field = self.offset_network(queries).to(position_dtype).unsqueeze(-1)
        offset_logits = interpolate_along_slices(offset_field, references, last_index).squeeze(-1)
        offsets = torch.tanh(offset_logits) * (0.5 * self.offset_scale) * spacing.view(batch, 1, 1)
        upper_bound = last_index.to(position_dtype).view(batch, 1, 1)
        positions = torch.minimum((references + offsets).clamp(min=0.0), upper_bound)
        return positions, valid

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """x [B, N, D], padding_mask [B, N] bool (True = padded, trailing) -> [B, N, D].

        Outputs at real slices do not depend on padded slices; outputs at padded slices are finite but
        meaningless.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected x of shape [batch, slices, {self.d_model}], got {tuple(x.shape)}")
        batch, num_slices, _ = x.shape
        lengths = lengths_from_padding_mask(padding_mask, batch, num_slices, x.device)
        if padding_mask is not None:
            # Garbage (even NaN) in padded slices must not reach the projections of real ones.
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        # A fully padded sequence samples its (zeroed) first slice: finite output, no real slices to protect.
        lengths = lengths.clamp(min=1)

        queries = self._split_heads(self.query(x))
        keys = self._split_heads(self.key(x))
        values = self._split_heads(self.value(x))
        offset_input = queries
        if padding_mask is not None:
            # Zeroed padded queries act like the convolution's own zero padding at the sequence end.
            offset_input = queries.masked_fill(padding_mask[:, None, :, None], 0.0)
        positions, valid = self.sample_positions(offset_input, lengths)

        last_index = lengths - 1
        sampled_keys = interpolate_along_slices(keys, positions, last_index)
        sampled_values = interpolate_along_slices(values, positions, last_index)

        # Softmax in float32 (float64 for float64 input) also under mixed precision.
        scores = torch.matmul(queries * self.head_dim**-0.5, sampled_keys.transpose(-1, -2))
        scores = scores.to(positions.dtype)
        query_index = torch.arange(num_slices, device=x.device, dtype=positions.dtype)
        distance = query_index.view(1, 1, num_slices, 1) - positions.unsqueeze(2)
        scores = scores + self.position_bias(distance)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        weights = self.attention_dropout(F.softmax(scores, dim=-1))
        attended = torch.matmul(weights.to(sampled_values.dtype), sampled_values)
        return self.output(attended.transpose(1, 2).reshape(batch, num_slices, self.d_model))
