"""f_inter: the slice aggregator, a pre-norm transformer encoder with deformable self-attention across slices.

Tokens are the N slice embeddings z_i = f_intra(x_i) of a volume, in slice order (any N; ragged batches carry
a trailing ``padding_mask``, True = padded). The volume feature is Z = L2norm(masked mean_i f_inter(z)_i). For
L_mask, ``apply_mask`` swaps chosen slice embeddings for a learned mask token and ``MaskDecoder`` maps the
aggregator's tokens back to slice-embedding space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jointssl.models.deformable import DeformableSliceAttention, lengths_from_padding_mask


class DeformableTransformerLayer(nn.Module):
    """Pre-norm encoder layer: x + Dropout(Attn(LN(x))), then x + Dropout(FFN(LN(x))) with a GELU FFN."""

    def __init__(
        self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, downsample: int, offset_scale: float
    ) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(d_model)
        self.attention = DeformableSliceAttention(
            d_model, num_heads, downsample=downsample, offset_scale=offset_scale, dropout=dropout
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


class SliceAggregator(nn.Module):
    """f_inter: ``num_layers`` deformable transformer layers over slice tokens, then a final LayerNorm.

    Args:
        d_model: slice-embedding width (640 in the paper).
        num_layers, num_heads, ffn_dim, dropout: transformer size (4, 8, 720, 0.1 in the paper).
        downsample, offset_scale: deformable attention settings (see ``DeformableSliceAttention``).
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
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(
            DeformableTransformerLayer(d_model, num_heads, ffn_dim, dropout, downsample, offset_scale)
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

    def forward(self, z: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Slice embeddings z [B, N, D] (+ trailing padding_mask [B, N], True = padded) -> tokens [B, N, D].

        Tokens of real slices do not depend on padded ones; tokens of padded slices are finite but
        meaningless.
        """
        self._check_tokens(z)
        lengths_from_padding_mask(padding_mask, z.shape[0], z.shape[1], z.device)  # fail before any layer
        if padding_mask is not None:
            z = z.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        for layer in self.layers:
            z = layer(z, padding_mask)
        return self.norm(z)

    def pool(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Volume feature Z = L2norm(mean of the real slices' tokens): [B, N, D] -> [B, D] (dtype of tokens).

        The mean and the norm are taken in float32; a sequence with no real slice gives the zero vector.
        """
        self._check_tokens(tokens)
        tokens32 = tokens.float()
        if padding_mask is None:
            mean = tokens32.mean(dim=1)
        else:
            real = (~padding_mask).unsqueeze(-1)
            # where() rather than a product: padded tokens may hold anything, even non-finite values.
            summed = torch.where(real, tokens32, torch.zeros_like(tokens32)).sum(dim=1)
            mean = summed / real.sum(dim=1).clamp(min=1).to(summed.dtype)
        return F.normalize(mean, dim=-1).to(tokens.dtype)

    def apply_mask(self, z: Tensor, mask: Tensor) -> Tensor:
        """Replace the slice embeddings where ``mask`` [B, N] (bool) is True by the learned mask token.

        Differentiable w.r.t. the unmasked embeddings and the mask token.
        """
        self._check_tokens(z)
        if mask.dtype != torch.bool or mask.shape != z.shape[:2]:
            raise ValueError(
                f"mask must be boolean {tuple(z.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
            )
        return torch.where(mask.unsqueeze(-1), self.mask_token.to(z.dtype), z)


class MaskDecoder(nn.Module):
    """Linear decoder from aggregator tokens to slice-embedding space, for masked embedding prediction.

    Args:
        d_model: token width.
        embedding_dim: width of the slice embeddings to predict (defaults to ``d_model``).
    """

    def __init__(self, d_model: int, embedding_dim: int | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(d_model, embedding_dim or d_model)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [B, N, d_model] -> predicted slice embeddings [B, N, embedding_dim]."""
        return self.linear(tokens)


def _init_linear(module: nn.Module) -> None:
    """ViT/DAT initialisation of the linear layers: truncated normal (std 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
