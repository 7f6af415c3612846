"""The segmentation network (:class:`SliceUNet`): a U-Net whose encoder is f_intra's timm backbone (every feature
stage is a skip connection) and whose decoder and output head are MONAI's (``UNetDecoder`` + ``SegmentationHead``
from ``monai.networks.nets.flexible_unet``). It works on slabs of K consecutive slices laid out MONAI-style as
``[B, 1, K, H, W]`` and segments every slice; with an aggregator the K slice embeddings of the slab also go through
the pretrained slice aggregator f_inter (:class:`jointssl.models.VolumeEncoder`'s ``aggregate``), and each slice's
aggregated token is projected and added onto the deepest feature map, so that each slice is segmented with the
context of its neighbours (what joint pretraining adds over a 2D encoder)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from torch import Tensor, nn

from jointssl.models import SliceAggregator, SliceEncoder, VolumeEncoder

#: FlexibleUNet's default decoder widths, deepest first (one per encoder stage).
DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)




class SliceUNet(nn.Module):
    """U-Net over slices: f_intra's timm backbone as encoder, MONAI's ``UNetDecoder`` + ``SegmentationHead``.

    Why not ``FlexibleUNet`` itself: it builds its encoder from a class registered in the global
    ``FLEXUNET_BACKBONE`` registry and constructed from ``(spatial_dims, in_channels, pretrained)``, whereas our
    encoder is an already-built module whose weights come from a checkpoint. Its decoder and head are the part
    worth reusing, and they take the encoder's feature maps directly: exactly FlexibleUNet's wiring (the input
    is feature 0, every backbone stage a skip, the last block upsamples to the input resolution).

    Args:
        encoder: f_intra; its backbone gives the multi-scale feature maps (``proj`` is used only for context).
        num_classes: output channels, background included.
        decoder_channels: decoder widths, deepest first, one per backbone stage (default: FlexibleUNet's).
        aggregator: f_inter for 2.5D context; None segments every slice on its own.
    """

    def __init__(
        self,
        encoder: SliceEncoder,
        num_classes: int,
        decoder_channels: Sequence[int] | None = None,
        aggregator: SliceAggregator | None = None,
    ) -> None:
        super().__init__()
        stage_channels = list(encoder.backbone.feature_info.channels())
        num_stages = len(stage_channels)
        if decoder_channels is None:
            if num_stages > len(DEFAULT_DECODER_CHANNELS):
                raise ValueError(f"give decoder_channels: the backbone has {num_stages} stages")
            decoder_channels = DEFAULT_DECODER_CHANNELS[:num_stages]
        if len(decoder_channels) != num_stages:
            raise ValueError(
                f"decoder_channels needs one width per backbone stage ({num_stages}), got {list(decoder_channels)}"
            )
        # f_intra and f_inter as in pretraining; the U-Net runs f_intra's backbone itself (every stage is a skip).
        self.volume_encoder = VolumeEncoder(encoder, aggregator)
        self.decoder = UNetDecoder(
            spatial_dims=2,
            encoder_channels=[encoder.in_chans, *stage_channels],
            decoder_channels=list(decoder_channels),
            act=("relu", {"inplace": True}),
            norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
            dropout=0.0,
            bias=False,
            upsample="nontrainable",
            pre_conv="default",
            interp_mode="nearest",
            align_corners=None,
            is_pad=True,
        )
        # MONAI's decoder pads an upsampled map only when it is one pixel short (floor-pooling encoders), but timm
        # backbones round sizes up; inputs are therefore padded to a multiple of the total stride (and cropped).
        self.total_stride = max(encoder.backbone.feature_info.reduction())
        self.head = SegmentationHead(
            spatial_dims=2, in_channels=decoder_channels[-1], out_channels=num_classes, kernel_size=3
        )
        # A 1x1 convolution of a token broadcast over the map is a Linear layer on the token.
        self.context_projection = nn.Linear(encoder.d_model, stage_channels[-1]) if aggregator is not None else None

    @property
    def encoder(self) -> SliceEncoder:
        return self.volume_encoder.encoder

    @property
    def aggregator(self) -> SliceAggregator | None:
        return self.volume_encoder.aggregator

    def features(self, slices: Tensor, slab_size: int) -> tuple[list[Tensor], Tensor | None]:
        """Backbone feature maps of ``[B*K, 1, H, W]`` slices and, in 2.5D, f_inter's token per slice."""
        stage_maps = list(self.encoder.backbone(slices))
        if self.aggregator is None:
            return stage_maps, None
        # f_intra's slice embedding from the U-Net's backbone pass (no second backbone run).
        embeddings = self.encoder.embed_features(stage_maps)
        tokens = self.volume_encoder.aggregate(embeddings.view(-1, slab_size, embeddings.shape[-1]), None)
        return stage_maps, tokens.flatten(0, 1)

    def add_context(self, stage_maps: list[Tensor], tokens: Tensor | None) -> list[Tensor]:
        """Each slice's projected token broadcast-added onto its deepest feature map."""
        if tokens is None:
            return stage_maps
        context = self.context_projection(tokens)[:, :, None, None]
        return [*stage_maps[:-1], stage_maps[-1] + context.to(stage_maps[-1].dtype)]

    def decode(self, slices: Tensor, stage_maps: list[Tensor]) -> Tensor:
        """Logits ``[B*K, C, H, W]`` from the slices and their (context-enriched) feature maps."""
        decoded = self.decoder([slices, *stage_maps], skip_connect=len(stage_maps) - 1)
        logits = self.head(decoded)
        if logits.shape[-2:] != slices.shape[-2:]:
            # Backbones whose first stage is already at stride 4 leave the decoder at half resolution.
            logits = F.interpolate(logits, size=slices.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def forward(self, slabs: Tensor, frozen_encoder: bool = False) -> Tensor:
        """Slabs ``[B, 1, K, H, W]`` -> logits ``[B, num_classes, K, H, W]``.

        ``frozen_encoder`` runs f_intra and f_inter without a graph (they are not trained: linear mode).
        """
        if slabs.ndim != 5 or slabs.shape[1] != 1:
            raise ValueError(f"expected slabs [batch, 1, slices, height, width], got {tuple(slabs.shape)}")
        batch, _, slab_size, height, width = slabs.shape
        slices = slabs.transpose(1, 2).reshape(batch * slab_size, 1, height, width)
        pad_rows, pad_columns = (-height) % self.total_stride, (-width) % self.total_stride
        if pad_rows or pad_columns:
            slices = F.pad(slices, (0, pad_columns, 0, pad_rows), mode="replicate")
        with torch.no_grad() if frozen_encoder else contextlib.nullcontext():
            stage_maps, tokens = self.features(slices, slab_size)
        logits = self.decode(slices, self.add_context(stage_maps, tokens))[..., :height, :width]
        return logits.reshape(batch, slab_size, -1, height, width).transpose(1, 2)

