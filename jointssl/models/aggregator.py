"""f_inter: the slice aggregator, a pre-norm transformer encoder with deformable self-attention across slices.

Tokens are the N slice embeddings z_i = f_intra(x_i) of a volume, in slice order (any N; ragged batches carry
a trailing ``padding_mask``, True = padded). The volume feature is Z = L2norm(masked mean_i f_inter(z)_i). For
L_mask, ``forward(z, padding_mask, mask)`` swaps chosen slice embeddings for a learned mask token and
``MaskDecoder`` maps the aggregator's tokens back to slice-embedding space.

Input tokens (``input_norm="volume"``, the default). The slice embeddings of one volume share a large common part:
on the demo data (random init or trained) different volumes' mean embeddings have cosine similarity 0.994-0.998 and
a slice differs from its volume's mean by 4-8% of the embedding's size. Fed raw, attention sees almost identical
tokens, and the 3D clustering collapsed to one cluster from random init (see docs/results.md; these tokens alone
did not make L_mask beat its baselines, which is what its interpolation-based prediction in losses/masked.py is
for). Each token is therefore split into what a slice adds and what the volume shares:

    token_i = (z_i - mean) / scale  +  Linear(BatchNorm(mean))

with ``mean`` and ``scale`` (root-mean-square deviation) taken over the volume's *visible* slices (real and not
masked, so a masked slice's content cannot leak in through them), and the volume context centred across the batch
by a BatchNorm (a batch of one volume uses its running statistics). ``standardise_slices`` gives L_mask its
targets in the same per-volume units, in which "predict the visible mean" scores exactly 0.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jointssl.models.deformable import DeformableSliceAttention, lengths_from_padding_mask


class DeformableTransformerLayer(nn.Module):
    """Pre-norm encoder layer: x + Dropout(Attn(LN(x))), then x + Dropout(FFN(LN(x))) with a GELU FFN."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        downsample: int,
        offset_scale: float,
        max_points: int | None = None,
    ) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(d_model)
        self.attention = DeformableSliceAttention(
            d_model, num_heads, downsample=downsample, offset_scale=offset_scale, dropout=dropout,
            max_points=max_points,
        )
        self.attention_dropout = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model)
        )
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.attention_dropout(self.attention(self.attention_norm(x), padding_mask))
        return x + self.ffn_dropout(self.ffn(self.ffn_norm(x)))


def slice_statistics(z: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
    """Per-volume mean [B, 1, D] and root-mean-square deviation [B, 1, 1] of the slice embeddings ``z`` [B, N, D]
    over the slices where ``visible`` [B, N] is True, in float32 (a volume without visible slices: mean 0)."""
    weight = visible.unsqueeze(-1).float()
    z32 = torch.where(visible.unsqueeze(-1), z.float(), torch.zeros((), device=z.device))
    count = weight.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = z32.sum(dim=1, keepdim=True) / count
    deviation = torch.where(visible.unsqueeze(-1), z32 - mean, torch.zeros((), device=z.device))
    variance = deviation.pow(2).sum(dim=(1, 2), keepdim=True) / (count * z.shape[-1])
    # The floor keeps a volume whose visible slices are identical finite (its deviations are then 0 anyway).
    return mean, variance.sqrt().clamp(min=1e-6)


def standardise_slices(z: Tensor, visible: Tensor) -> Tensor:
    """``(z - mean) / scale`` with the statistics of the visible slices (see ``slice_statistics``), float32."""
    mean, scale = slice_statistics(z, visible)
    return (z.float() - mean) / scale


def pool_tokens(tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """Z = L2norm(mean of the real slices' tokens): [B, N, D] -> [B, D] (dtype of tokens).

    The mean and the norm are taken in float32; a sequence with no real slice gives the zero vector.
    """
    tokens32 = tokens.float()
    if padding_mask is None:
        mean = tokens32.mean(dim=1)
    else:
        real = (~padding_mask).unsqueeze(-1)
        # where() rather than a product: padded tokens may hold anything, even non-finite values.
        summed = torch.where(real, tokens32, torch.zeros_like(tokens32)).sum(dim=1)
        mean = summed / real.sum(dim=1).clamp(min=1).to(summed.dtype)
    return F.normalize(mean, dim=-1).to(tokens.dtype)


class _VolumeContextNorm(nn.BatchNorm1d):
    """BatchNorm over the volumes of a batch; a training batch of a single volume uses the running statistics
    (BatchNorm cannot normalise one sample, and downstream fine-tuning often runs one volume per device)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class SliceAggregator(nn.Module):
    """f_inter: ``num_layers`` deformable transformer layers over slice tokens, then a final LayerNorm.

    Args:
        d_model: slice-embedding width (640 in the paper).
        num_layers, num_heads, ffn_dim, dropout: transformer size (4, 8, 720, 0.1 in the paper).
        downsample, offset_scale, max_points: deformable attention settings (see ``DeformableSliceAttention``).
        input_norm: "volume": tokens are per-volume standardised slice embeddings plus a batch-normalised volume
            context (module docstring); "none": the slice embeddings as they are (the paper's aggregator, and what
            checkpoints written before this option hold).
    """

    def __init__(
        self,
        d_model: int = 640,
        num_layers: int = 4,
        num_heads: int = 8,
        ffn_dim: int = 720,
        dropout: float = 0.1,
        downsample: int = 4,
        offset_scale: float = 2.0,
        input_norm: Literal["volume", "none"] = "volume",
        max_points: int | None = 64,
    ) -> None:
        super().__init__()
        if input_norm not in ("volume", "none"):
            raise ValueError(f"input_norm must be 'volume' or 'none', got {input_norm!r}")
        self.d_model = d_model
        self.input_norm = input_norm
        if input_norm == "volume":
            self.context_norm = _VolumeContextNorm(d_model)
            self.context = nn.Linear(d_model, d_model)
        self.layers = nn.ModuleList(
            DeformableTransformerLayer(d_model, num_heads, ffn_dim, dropout, downsample, offset_scale, max_points)
            for _ in range(num_layers)
        )
        # Pre-norm layers leave an un-normalised residual stream; normalise it once for pooling and decoding.
        self.norm = nn.LayerNorm(d_model)
        self.mask_token = nn.Parameter(torch.zeros(d_model))
        self.apply(_init_linear)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def _check_tokens(self, z: Tensor) -> None:
        if z.dim() != 3 or z.shape[-1] != self.d_model:
            raise ValueError(
                f"expected slice embeddings [batch, slices, {self.d_model}], got {tuple(z.shape)}"
            )

    def forward(self, z: Tensor, padding_mask: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Slice embeddings z [B, N, D] (+ trailing padding_mask [B, N], True = padded) -> tokens [B, N, D].

        ``mask`` [B, N] (bool): slices replaced by the mask token (for L_mask); they take no part in the volume
        statistics of ``input_norm="volume"``. Tokens of real slices do not depend on padded ones; tokens of padded
        slices are finite but meaningless.
        """
        self._check_tokens(z)
        lengths_from_padding_mask(padding_mask, z.shape[0], z.shape[1], z.device)  # fail before any layer
        if padding_mask is not None:
            z = z.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        if self.input_norm == "volume":
            visible = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
            if padding_mask is not None:
                visible = ~padding_mask
            if mask is not None:
                self._check_mask(z, mask)
                visible = visible & ~mask
            z = self.volume_tokens(z, visible)
        if mask is not None:
            z = self.apply_mask(z, mask)
        for layer in self.layers:
            z = layer(z, padding_mask)
        return self.norm(z)

    def pool(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Volume feature Z = L2norm(mean of the real slices' tokens): [B, N, D] -> [B, D] (see ``pool_tokens``)."""
        self._check_tokens(tokens)
        return pool_tokens(tokens, padding_mask)

    def volume_tokens(self, z: Tensor, visible: Tensor) -> Tensor:
        """``input_norm="volume"`` tokens (module docstring) from slice embeddings [B, N, D], in z's dtype."""
        mean, scale = slice_statistics(z, visible)
        context = self.context(self.context_norm(mean.squeeze(1).to(self.context.weight.dtype)))
        return ((z.float() - mean) / scale + context.float().unsqueeze(1)).to(z.dtype)

    def apply_mask(self, z: Tensor, mask: Tensor) -> Tensor:
        """Replace the tokens where ``mask`` [B, N] (bool) is True by the learned mask token.

        Differentiable w.r.t. the unmasked tokens and the mask token. ``forward(z, padding_mask, mask)`` calls it
        after the input normalisation; called before ``forward`` it suits ``input_norm="none"`` only.
        """
        self._check_tokens(z)
        self._check_mask(z, mask)
        return torch.where(mask.unsqueeze(-1), self.mask_token.to(z.dtype), z)

    @staticmethod
    def _check_mask(z: Tensor, mask: Tensor) -> None:
        if mask.dtype != torch.bool or mask.shape != z.shape[:2]:
            raise ValueError(
                f"mask must be boolean {tuple(z.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
            )


class MaskDecoder(nn.Module):
    """Linear decoder from aggregator tokens to slice-embedding space, for masked embedding prediction.

    Args:
        d_model: token width.
        embedding_dim: width of the slice embeddings to predict (defaults to ``d_model``).
    """

    def __init__(self, d_model: int, embedding_dim: int | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(d_model, embedding_dim or d_model)
        # L_mask adds this output to an interpolation of the visible slices: start near "no correction".
        _init_linear(self.linear)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [B, N, d_model] -> predicted slice embeddings [B, N, embedding_dim]."""
        return self.linear(tokens)


def _init_linear(module: nn.Module) -> None:
    """ViT/DAT initialisation of the linear layers: truncated normal (std 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
