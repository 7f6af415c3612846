"""The volume classification network: the pretraining's volume feature (:class:`jointssl.models.VolumeEncoder`:
f_intra on every real slice, f_inter over the slices, Z = L2norm(mean of the real slices' tokens)) and a linear
head on Z."""

from __future__ import annotations

from torch import Tensor, nn

from jointssl.models import VolumeEncoder


class VolumeClassificationNet(nn.Module):
    """``[B, N, 1, H, W]`` normalised volumes (+ padding mask ``[B, N]``, True = padding) -> logits ``[B, C]``."""

    def __init__(self, volume_encoder: VolumeEncoder, num_classes: int) -> None:
        super().__init__()
        self.volume_encoder = volume_encoder
        self.head = nn.Linear(volume_encoder.encoder.d_model, num_classes)

    def forward(self, volumes: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return self.head(self.features(volumes, padding_mask))

    def features(self, volumes: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Z ``[B, d_model]``, the pooled volume feature of pretraining."""
        if volumes.ndim != 5 or volumes.shape[2] != 1:
            raise ValueError(f"expected volumes [batch, slices, 1, height, width], got {tuple(volumes.shape)}")
        return self.volume_encoder(volumes, padding_mask)
