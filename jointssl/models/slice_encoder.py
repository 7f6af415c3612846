"""f_intra: the 2D slice encoder — a timm CNN whose per-stage pooled features form a multi-scale embedding.

Per image (a 2D sample or one slice of a volume) every backbone stage with reduction >= 4 is global-average-pooled
and L2-normalised; the normalised vectors are concatenated (ResNet-50: 256+512+1024+2048 = 3840) and mapped by one
Linear layer to ``d_model``. Normalising per stage keeps the deep, high-magnitude stages from drowning the shallow
ones in the concatenation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import checkpoint as torch_checkpoint

# Stages below this reduction (the stride-2 stem of ResNets / EfficientNets) are too low-level to describe a slice.
MIN_STAGE_REDUCTION = 4


class SliceEncoder(nn.Module):
    """Multi-scale timm encoder: ``[B, C, H, W] -> [B, d_model]``.

    ``pretrained=True`` makes timm download ImageNet weights; that needs internet access and is the user's
    responsibility (with ``in_chans=1`` timm sums the first convolution over its RGB input channels).

    GPU options (both off by default; neither changes the parameters, their names or the results beyond
    floating-point rounding, so checkpoints and exports load into an encoder built with or without them):

    - ``channels_last``: the backbone's 4-D weights and every input image are stored NHWC, the layout tensor-core
      convolutions (cuDNN under bf16/fp16) run in without transposing each layer's input and output.
    - ``compile_backbone``: the backbone's forward (the CNN only; pooling and projection stay eager) is compiled
      in place with ``nn.Module.compile``, which keeps the module, its parameters and its state_dict keys as they
      are, where ``torch.compile(module)`` would wrap it and prefix every key with ``_orig_mod.``. The first call
      per input shape compiles (seconds to minutes); ``compile_options`` are ``torch.compile``'s keyword
      arguments (e.g. ``{"backend": "aot_eager"}``, ``{"mode": "max-autotune"}``), default inductor.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        d_model: int = 640,
        in_chans: int = 1,
        pretrained: bool = False,
        drop_path_rate: float = 0.0,
        channels_last: bool = False,
        compile_backbone: bool = False,
        compile_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Only pass drop_path_rate when used: not every timm architecture accepts the keyword.
        extra_kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate > 0 else {}
        self.backbone = timm.create_model(
            backbone, features_only=True, in_chans=in_chans, pretrained=pretrained, **extra_kwargs
        )
        feature_info = self.backbone.feature_info
        reductions = feature_info.reduction()
        channels = feature_info.channels()
        # Positions in the backbone's output list (not timm stage indices) of the stages that are used.
        self.stage_positions: list[int] = [i for i, r in enumerate(reductions) if r >= MIN_STAGE_REDUCTION]
        if not self.stage_positions:
            raise ValueError(
                f"backbone {backbone!r} has no feature stage with reduction >= {MIN_STAGE_REDUCTION}"
            )
        self.feature_dims: list[int] = [channels[i] for i in self.stage_positions]
        self.d_model = d_model
        self.in_chans = in_chans
        self.backbone_name = backbone
        self.proj = nn.Linear(sum(self.feature_dims), d_model)
        self.channels_last = False
        if channels_last:
            self.enable_channels_last()
        self.compiled = False
        if compile_backbone:
            self.enable_compile(**(compile_options or {}))

    def enable_channels_last(self) -> None:
        """Store the backbone's 4-D weights, and from now on its inputs, NHWC (see the class docstring)."""
        # Module.to converts only the 4-D parameters and buffers; later .to(device) and load_state_dict (copy_
        # into the existing tensors) keep the layout.
        self.backbone.to(memory_format=torch.channels_last)
        self.channels_last = True

    def enable_compile(self, **options: Any) -> None:
        """Compile the backbone's forward in place (``nn.Module.compile``; see the class docstring); ``options``:
        ``torch.compile``'s keyword arguments. Done lazily: the first call per graph compiles."""
        # dynamic=True: one graph for every batch size and resolution. With torch's default (a static graph for
        # the first shape, a dynamic one from the second), the recomputation of a checkpointed chunk
        # (forward_chunked) can pick another graph than its forward did and fail ("A different number of tensors
        # was saved during the original forward and recomputation", pytorch issue 166926; seen here with inductor
        # and chunks of 3, 3, 2 images). Chunk sizes and real-slice counts vary from batch to batch anyway.
        self.backbone.compile(**{"dynamic": True, **options})
        self.compiled = True

    def _backbone_features(self, x: Tensor) -> list[Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def multiscale_features(self, x: Tensor) -> Tensor:
        """Concatenated per-stage pooled and L2-normalised features of images, ``[B, sum(feature_dims)]``."""
        return self.pool_feature_maps(self._backbone_features(x))

    def pool_feature_maps(self, feature_maps: Sequence[Tensor]) -> Tensor:
        """Concatenated per-stage pooled and L2-normalised features, ``[B, sum(feature_dims)]``, of the backbone's
        feature maps (all of its outputs, as ``self.backbone(x)`` returns them; the used stages are picked)."""
        pooled = []
        for position, dim in zip(self.stage_positions, self.feature_dims):
            feature_map = feature_maps[position]
            if feature_map.ndim != 4 or feature_map.shape[1] != dim:
                raise ValueError(
                    f"{self.backbone_name}: expected an NCHW feature map with {dim} channels at output "
                    f"{position}, got shape {tuple(feature_map.shape)}"
                )
            stage_vector = feature_map.mean(dim=(2, 3))
            # Normalise in float32: under fp16 autocast the squared norm of a 2048-d vector can overflow.
            pooled.append(F.normalize(stage_vector.float(), dim=1).to(stage_vector.dtype))
        return torch.cat(pooled, dim=1)

    def embed_features(self, feature_maps: Sequence[Tensor]) -> Tensor:
        """The slice embedding ``[B, d_model]`` from backbone feature maps that are already computed (e.g. by a
        U-Net sharing the backbone pass): the same computation as :meth:`forward` after the backbone."""
        return self.proj(self.pool_feature_maps(feature_maps))

    def forward(self, x: Tensor) -> Tensor:
        """Embed a batch of images ``[B, in_chans, H, W]`` into ``[B, d_model]``."""
        return self.embed_features(self._backbone_features(x))

    def forward_chunked(self, x: Tensor, chunk_size: int, checkpoint: bool = False) -> Tensor:
        """``forward`` over chunks of at most ``chunk_size`` images (e.g. the slices of 64-slice volumes).

        With ``checkpoint=True`` (and gradients enabled) each chunk's activations are discarded after the forward
        and recomputed during backward, bounding activation memory to about one chunk. Module state is not touched
        twice: see :class:`_RestoreBuffersOnRecompute`.

        In train mode BatchNorm normalises each chunk with that chunk's own batch statistics, so the result equals
        ``forward`` on the whole batch only in eval mode (or without BatchNorm).
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        use_checkpoint = checkpoint and torch.is_grad_enabled()
        outputs = []
        for chunk in x.split(chunk_size, dim=0):
            if use_checkpoint:
                outputs.append(
                    torch_checkpoint.checkpoint(
                        self.forward,
                        chunk,
                        use_reentrant=False,
                        context_fn=lambda: (contextlib.nullcontext(), _RestoreBuffersOnRecompute(self)),
                    )
                )
            else:
                outputs.append(self.forward(chunk))
        return torch.cat(outputs, dim=0)


class _RestoreBuffersOnRecompute:
    """Context manager for the *recomputation* pass of non-reentrant activation checkpointing.

    Checkpointing runs a chunk's forward twice: once normally, and again inside backward to rebuild the
    activations. In train mode BatchNorm updates ``running_mean``/``running_var``/``num_batches_tracked`` on every
    forward, so without care each checkpointed chunk would update the running statistics twice (verified with
    torch 2.x: ``num_batches_tracked`` goes 1 -> 2 after backward). The recomputation's output does not depend on
    the running statistics (train-mode BN normalises with batch statistics) and the RNG state is replayed by
    ``checkpoint``, so it is enough to snapshot every buffer when the recomputation starts and copy the snapshot
    back when it ends (also when torch stops the recomputation early by raising internally). The net effect on
    the buffers is then exactly that of the non-checkpointed forward.

    With SyncBatchNorm the recomputation also repeats the cross-rank reduction during backward; that works as
    long as every rank checkpoints the same number of chunks.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.snapshot: list[tuple[Tensor, Tensor]] = []

    def __enter__(self) -> None:
        with torch.no_grad():
            self.snapshot = [(buffer, buffer.detach().clone()) for buffer in self.module.buffers()]

    def __exit__(self, *exc_info: object) -> bool:
        with torch.no_grad():
            for buffer, saved in self.snapshot:
                buffer.copy_(saved)
        self.snapshot = []
        return False  # never swallow exceptions (including torch's early-stop signal)
