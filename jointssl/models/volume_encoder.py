"""The volume feature of the method, f_intra then f_inter then pooling, as one module.

``VolumeEncoder`` embeds the real slices of a batch of volumes with the slice encoder f_intra (padding slices never
reach the CNN), scatters them into ``[B, N, D]`` (zeros at padding), runs the slice aggregator f_inter and pools the
real slices' tokens into Z = L2norm(mean). Pretraining, volume classification, 2.5D segmentation and
``jointssl embed`` use it, so "the volume feature" is computed in one place.

``AggregatorConfig`` is f_inter's architecture (SliceAggregator's keyword arguments besides ``d_model``): the one
description that JointSSL's hyper-parameters, the downstream configs and exported weights map to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from jointssl.models.aggregator import SliceAggregator, pool_tokens
from jointssl.models.slice_encoder import SliceEncoder


@dataclass(frozen=True)
class AggregatorConfig:
    """f_inter's architecture; the defaults are SliceAggregator's (the paper's: 4 layers, 8 heads, 720 wide).

    Args:
        num_layers: transformer layers.
        num_heads: attention heads.
        ffn_dim: feed-forward width.
        dropout: dropout of attention, feed-forward and residual branches.
        downsample: one deformable reference point per this many slices.
        offset_scale: bound of the learned offsets, in reference spacings.
        input_norm: "volume" (per-volume standardised tokens + volume context) or "none" (raw slice embeddings).
        max_points: most deformable keys per query (None: ceil(N / downsample), quadratic in N); the default 64
            changes nothing up to 256 slices and keeps the cost linear beyond.
    """

    num_layers: int = 4
    num_heads: int = 8
    ffn_dim: int = 720
    dropout: float = 0.1
    downsample: int = 4
    offset_scale: float = 2.0
    input_norm: Literal["volume", "none"] = "volume"
    max_points: int | None = 64

    #: JointSSL hyper-parameter name of each field.
    PRETRAIN_HPARAMS = {
        "num_layers": "aggregator_layers",
        "num_heads": "aggregator_heads",
        "ffn_dim": "aggregator_ffn_dim",
        "dropout": "aggregator_dropout",
        "downsample": "deformable_downsample",
        "offset_scale": "deformable_offset_scale",
        "input_norm": "aggregator_input_norm",
        "max_points": "deformable_max_points",
    }
    #: Fields that came later, with the value that checkpoints and exports written before them imply.
    ADDED_LATER = {"input_norm": "none", "max_points": None}

    @classmethod
    def from_pretrain_hparams(cls, hparams: Mapping[str, Any]) -> AggregatorConfig:
        """The aggregator of JointSSL hyper-parameters (a checkpoint's ``hyper_parameters``). Raises KeyError
        naming the hyper-parameters that are missing (not a JointSSL checkpoint)."""
        values, missing = {}, []
        for field, name in cls.PRETRAIN_HPARAMS.items():
            if name in hparams:
                values[field] = hparams[name]
            elif field in cls.ADDED_LATER:
                values[field] = cls.ADDED_LATER[field]
            else:
                missing.append(name)
        if missing:
            raise KeyError(missing)
        return cls(**values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AggregatorConfig:
        """From :meth:`asdict`'s output, also one written before a field existed (see ``ADDED_LATER``)."""
        return cls(**{**cls.ADDED_LATER, **values})

    def asdict(self) -> dict[str, Any]:
        """The fields as SliceAggregator keyword arguments (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def build(self, d_model: int) -> SliceAggregator:
        """A randomly initialised SliceAggregator of this architecture."""
        return SliceAggregator(d_model=d_model, **self.asdict())


class VolumeEncoder(nn.Module):
    """f_intra + f_inter + pooling: volumes ``[B, N, 1, H, W]`` (+ ``padding_mask`` [B, N], True = padding) ->
    volume features ``[B, D]``.

    Args:
        encoder: f_intra.
        aggregator: f_inter; None for uses that need f_intra only (then only :meth:`encode`,
            :meth:`embed_slices` and :meth:`pool` are available).
        slice_chunk_size: run f_intra over at most this many slices/crops at a time (0: all at once).
        checkpoint_slices: recompute f_intra's activations in the backward pass, per chunk (see
            ``SliceEncoder.forward_chunked``).
    """

    def __init__(
        self,
        encoder: SliceEncoder,
        aggregator: SliceAggregator | None,
        slice_chunk_size: int = 0,
        checkpoint_slices: bool = False,
    ) -> None:
        super().__init__()
        if aggregator is not None and aggregator.d_model != encoder.d_model:
            raise ValueError(f"aggregator width {aggregator.d_model} != slice embedding width {encoder.d_model}")
        self.encoder = encoder
        self.aggregator = aggregator
        self.slice_chunk_size = slice_chunk_size
        self.checkpoint_slices = checkpoint_slices

    @classmethod
    def build(
        cls,
        backbone: str,
        d_model: int,
        aggregator: AggregatorConfig | None,
        channels_last: bool = False,
        compile_encoder: bool = False,
        compile_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> VolumeEncoder:
        """Randomly initialised (no download): f_intra from timm's ``backbone`` with 1 input channel, and f_inter
        of ``aggregator``'s architecture (None: no f_inter). ``channels_last``, ``compile_encoder`` (compile f_intra's
        CNN) and ``compile_options``: SliceEncoder's GPU options (``channels_last``, ``compile_backbone``,
        ``compile_options``); they leave the state_dict as it is. ``kwargs``: the chunking arguments."""
        encoder = SliceEncoder(
            backbone=backbone, d_model=d_model, in_chans=1, channels_last=channels_last,
            compile_backbone=compile_encoder, compile_options=compile_options,
        )
        return cls(encoder, aggregator.build(d_model) if aggregator is not None else None, **kwargs)

    @property
    def d_model(self) -> int:
        return self.encoder.d_model

    def encode(self, images: Sequence[Tensor]) -> list[Tensor]:
        """f_intra over several image batches ``[B_i, 1, h, w]``, one batched pass per resolution (chunked and
        checkpointed when configured): ``[B_i, D]`` per input. In train mode BatchNorm sees each resolution's
        images together, so batching decides the result: pretraining passes 2D crops and slices in one call."""
        outputs: list[Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
        for members in by_size.values():
            batch = torch.cat([images[i] for i in members])
            if 0 < self.slice_chunk_size < batch.shape[0]:
                features = self.encoder.forward_chunked(batch, self.slice_chunk_size, self.checkpoint_slices)
            else:
                features = self.encoder(batch)
            for i, part in zip(members, features.split([images[i].shape[0] for i in members])):
                outputs[i] = part
        return outputs  # type: ignore[return-value]

    @staticmethod
    def real_slices(volumes: Tensor, padding_mask: Tensor | None) -> Tensor:
        """The real slices ``[M, 1, H, W]`` of volumes ``[B, N, 1, H, W]``, volume by volume in slice order."""
        if volumes.dim() != 5:
            raise ValueError(f"expected volumes [batch, slices, 1, H, W], got {tuple(volumes.shape)}")
        if padding_mask is None:
            return volumes.flatten(0, 1)
        return volumes[~padding_mask]

    @staticmethod
    def scatter(slice_embeddings: Tensor, padding_mask: Tensor | None, shape: tuple[int, int]) -> Tensor:
        """Embeddings ``[M, D]`` of :meth:`real_slices` back into ``[B, N, D]`` (``shape`` = (B, N)), zeros at
        padding."""
        if padding_mask is None:
            return slice_embeddings.view(*shape, slice_embeddings.shape[-1])
        z = slice_embeddings.new_zeros(*shape, slice_embeddings.shape[-1])
        z[~padding_mask] = slice_embeddings
        return z

    def embed_slices(self, volumes: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """f_intra of every real slice: ``[B, N, 1, H, W]`` -> ``[B, N, D]``, zeros at padding (padding slices do
        not go through the CNN)."""
        (embeddings,) = self.encode([self.real_slices(volumes, padding_mask)])
        return self.scatter(embeddings, padding_mask, volumes.shape[:2])

    def aggregate(self, slice_embeddings: Tensor, padding_mask: Tensor | None, mask: Tensor | None = None) -> Tensor:
        """f_inter: slice embeddings ``[B, N, D]`` -> tokens ``[B, N, D]`` (``mask``: slices replaced by the mask
        token, for L_mask; see ``SliceAggregator.forward``)."""
        if self.aggregator is None:
            raise ValueError("this VolumeEncoder has no slice aggregator (f_inter)")
        return self.aggregator(slice_embeddings, padding_mask, mask)

    @staticmethod
    def pool(tokens: Tensor, padding_mask: Tensor | None) -> Tensor:
        """Z = L2norm(mean of the real slices' tokens): ``[B, N, D]`` -> ``[B, D]``."""
        return pool_tokens(tokens, padding_mask)

    def forward(self, volumes: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The volume feature ``[B, D]``: embed the real slices, aggregate, pool."""
        z = self.embed_slices(volumes, padding_mask)
        return self.pool(self.aggregate(z, padding_mask), padding_mask)
