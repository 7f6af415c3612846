"""3D segmentation with the pretrained slice encoder: a 2D U-Net over slices, evaluated on whole volumes.

The network (:class:`SliceUNet`) is a U-Net whose encoder is f_intra's timm backbone (every feature stage is a
skip connection) and whose decoder and output head are MONAI's (``UNetDecoder`` + ``SegmentationHead`` from
``monai.networks.nets.flexible_unet``). It works on slabs of K consecutive slices laid out MONAI-style as
``[B, 1, K, H, W]`` and segments every slice; with ``context_2p5d`` the K slice embeddings of the slab also go
through the pretrained slice aggregator f_inter, and each slice's aggregated token is projected and added onto
the deepest feature map, so that each slice is segmented with the context of its neighbours (what joint
pretraining adds over a 2D encoder).

Training (:class:`SliceSegmenter`) uses slabs sampled by :class:`SegmentationData` (optionally oversampling slabs
that hold foreground) and MONAI's ``DiceCELoss``. Validation predicts WHOLE volumes: a window of K slices slides
over the slice axis (``monai.inferers.sliding_window_inference``; overlapping windows are blended), the per-slice
probabilities are resized back to the label's native in-plane grid, and MONAI's ``DiceMetric`` gives the 3D Dice
of every foreground class per volume. ``val/dice_<class>`` is the mean over validation volumes (a volume whose
label lacks the class is left out of that class's mean by default), ``val/dice`` the mean over classes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from jointssl.data.discovery import parse_modality
from jointssl.data.errors import BadFileError, DataValidationError
from jointssl.data.intensity import to_encoder_input
from jointssl.data.manifest import ManifestRow, read_manifest
from jointssl.data.validation import FileCheck, OnBadFile, apply_bad_file_policy, check_files

# layout_shape is the slice layout of load_volume; a constant label map must be given the same shape.
from jointssl.data.geometry import layout_shape
from jointssl.data.volume_io import (
    VOLUME_FILE_SUFFIXES,
    ModalityChoice,
    SliceAxis,
    load_volume,
    read_volume,
    read_volume_header,
    resize_slices,
    volume_reader,
)
from jointssl.downstream.common import (
    FrozenPartsMixin,
    Mode,
    adamw_with_cosine,
    build_slice_encoders,
    check_mode,
    gather_rows_once,
    self_contained_hparams,
    split_by_volume,
)
from jointssl.models import SliceAggregator, SliceEncoder

log = logging.getLogger("jointssl.downstream")

#: FlexibleUNet's default decoder widths, deepest first (one per encoder stage).
DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)


# ----------------------------------------------------------------------------------------------------
# Network


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
        self.encoder = encoder
        self.aggregator = aggregator
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

    def features(self, slices: Tensor, slab_size: int) -> tuple[list[Tensor], Tensor | None]:
        """Backbone feature maps of ``[B*K, 1, H, W]`` slices and, in 2.5D, f_inter's token per slice."""
        stage_maps = list(self.encoder.backbone(slices))
        if self.aggregator is None:
            return stage_maps, None
        # f_intra's slice embedding from the U-Net's backbone pass (no second backbone run).
        embeddings = self.encoder.embed_features(stage_maps)
        tokens = self.aggregator(embeddings.view(-1, slab_size, embeddings.shape[-1]))
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


# ----------------------------------------------------------------------------------------------------
# Metric


def dice_per_class(prediction: Tensor, label: Tensor, num_classes: int, ignore_empty: bool = True) -> Tensor:
    """3D Dice of every foreground class (MONAI ``DiceMetric``) for a batch of class-index volumes.

    Args:
        prediction, label: integer class indices ``[B, 1, D, H, W]`` (or ``[B, 1, H, W]``).
        num_classes: classes including background (class 0, not scored).
        ignore_empty: a class absent from a volume's label gives NaN (left out of means); False gives 1 when the
            prediction lacks it too and 0 when the prediction has it.

    Returns:
        ``[B, num_classes - 1]`` Dice values, class 1 first.
    """
    metric = DiceMetric(
        include_background=False, reduction="none", num_classes=num_classes, ignore_empty=ignore_empty
    )
    return metric(prediction, label)


# ----------------------------------------------------------------------------------------------------
# LightningModule


class SliceSegmenter(FrozenPartsMixin, LightningModule):
    """3D segmentation by a pretrained (or random) slice encoder in a 2D U-Net, optionally with 2.5D context.

    Args:
        num_classes: classes including background (a binary task has 2).
        pretrained: a jointssl pretraining checkpoint or export folder; None = random initialisation from
            ``backbone``, ``d_model`` and ``aggregator``. With a file, the architecture comes from it.
        backbone, d_model: f_intra's architecture for random initialisation.
        aggregator: SliceAggregator keyword arguments (besides d_model) for random initialisation in 2.5D mode.
        mode: "finetune" trains everything; "linear" freezes the pretrained parts (f_intra, and f_inter in 2.5D)
            in eval mode and trains the decoder (and the context projection) only.
        context_2p5d: add f_inter's cross-slice context (see the module docstring); needs ``slab_slices >= 2``.
        slab_slices: K, the slices per training slab and per inference window; must equal the data module's.
        class_names: names of the foreground classes 1..num_classes-1 for ``val/dice_<name>`` (default: numbers).
        decoder_channels: U-Net decoder widths, deepest first, one per backbone stage.
        lr, pretrained_lr_scale, weight_decay: AdamW with cosine decay; pretrained parts train at
            ``lr * pretrained_lr_scale``.
        dice_ignore_empty: see :func:`dice_per_class`.
        inference_overlap: overlap of neighbouring windows along the slice axis in whole-volume inference
            (2.5D only; windows of one slice never overlap).
        inference_batch_size: slices per forward pass in whole-volume inference.
    """

    def __init__(
        self,
        num_classes: int = 2,
        pretrained: str | None = None,
        backbone: str = "resnet50",
        d_model: int = 640,
        aggregator: dict[str, Any] | None = None,
        mode: Mode = "finetune",
        context_2p5d: bool = False,
        slab_slices: int = 1,
        class_names: list[str] | None = None,
        decoder_channels: list[int] | None = None,
        lr: float = 1e-3,
        pretrained_lr_scale: float = 1.0,
        weight_decay: float = 1e-4,
        dice_ignore_empty: bool = True,
        inference_overlap: float = 0.5,
        inference_batch_size: int = 32,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
        check_mode(mode)
        if slab_slices < 1:
            raise ValueError(f"slab_slices must be >= 1, got {slab_slices}")
        if context_2p5d and slab_slices < 2:
            raise ValueError("context_2p5d aggregates the slices of a slab: set slab_slices >= 2")
        if class_names is not None and len(class_names) != num_classes - 1:
            raise ValueError(
                f"class_names names the {num_classes - 1} foreground classes, got {len(class_names)}: {class_names}"
            )
        if not 0.0 <= inference_overlap < 1.0:
            raise ValueError(f"inference_overlap must be in [0, 1), got {inference_overlap}")
        self.save_hyperparameters()
        encoder, slice_aggregator, self.architecture = build_slice_encoders(
            pretrained, backbone, d_model, aggregator, with_aggregator=context_2p5d
        )
        self.hparams.update(self_contained_hparams(self.hparams, self.architecture))
        self.net = SliceUNet(encoder, num_classes, decoder_channels, slice_aggregator)
        self.class_names = list(class_names) if class_names else [str(c) for c in range(1, num_classes)]
        # Unused parameters must not require gradients (DDP would wait for them): the slice embedding only
        # feeds the context, and the aggregator's mask token only serves masked pretraining.
        if not context_2p5d:
            self.net.encoder.proj.requires_grad_(False)
        else:
            self.net.aggregator.mask_token.requires_grad_(False)
        self.frozen_parts: list[nn.Module] = []
        if mode == "linear":
            self.freeze_parts(self.pretrained_parts)
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        self._val_results: list[Tensor] = []

    @property
    def pretrained_parts(self) -> list[nn.Module]:
        return [m for m in (self.net.encoder, self.net.aggregator) if m is not None]

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        data_slab = getattr(data, "slab_slices", None)
        if data_slab is not None and data_slab != self.hparams.slab_slices:
            raise ValueError(
                f"the data module cuts slabs of {data_slab} slices but the model's slab_slices is "
                f"{self.hparams.slab_slices}; set both to the same value"
            )
        max_class = getattr(data, "max_class_index", None)
        if max_class is not None and max_class >= self.hparams.num_classes:
            raise ValueError(
                f"the labels hold class index {max_class} but num_classes is {self.hparams.num_classes}; "
                "raise num_classes or map the label values with label_mapping"
            )

    def forward(self, slabs: Tensor) -> Tensor:
        """Slabs ``[B, 1, K, H, W]`` (normalised) -> logits ``[B, num_classes, K, H, W]``."""
        return self.net(slabs, frozen_encoder=self.hparams.mode == "linear")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        loss = self.loss(logits.float(), batch["label"])  # softmax and Dice sums in float32 under mixed precision
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    @torch.no_grad()
    def predict_volume(self, image: Tensor) -> Tensor:
        """Class probabilities ``[1, C, N, H, W]`` of a whole volume ``[1, 1, N, H, W]``.

        A window of ``slab_slices`` slices slides along the slice axis; overlapping windows (2.5D) are blended
        with Gaussian weights, so a slice counts most in the windows where it sits near the centre.
        """
        slab = self.hparams.slab_slices
        height, width = image.shape[-2:]
        overlap = self.hparams.inference_overlap if slab > 1 else 0.0
        return sliding_window_inference(
            image,
            roi_size=(slab, height, width),
            sw_batch_size=max(1, self.hparams.inference_batch_size // slab),
            predictor=lambda window: self(window).float().softmax(dim=1),
            overlap=(overlap, 0.0, 0.0),
            mode="gaussian",
        )

    def _predict_labels(self, image: Tensor, grid: tuple[int, int]) -> Tensor:
        """Class indices ``[1, 1, N, *grid]``: probabilities resized in-plane to ``grid`` (the label's), argmax."""
        probabilities = self.predict_volume(image)[0]  # [C, N, h, w]
        if tuple(probabilities.shape[-2:]) != tuple(grid):
            # Slices act as the batch: each is resized on its own, never mixed with its neighbours.
            probabilities = F.interpolate(
                probabilities.transpose(0, 1), size=grid, mode="bilinear", align_corners=False
            ).transpose(0, 1)
        return probabilities.argmax(dim=0)[None, None]

    def on_validation_epoch_start(self) -> None:
        self._val_results = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        label = batch["label"].long()
        for i in range(label.shape[0]):
            prediction = self._predict_labels(batch["image"][i : i + 1], tuple(label.shape[-2:]))
            dice = dice_per_class(
                prediction, label[i : i + 1], self.hparams.num_classes, self.hparams.dice_ignore_empty
            )[0]
            index = batch["index"][i].to(dice)
            self._val_results.append(torch.cat([index.view(1), dice.float()]))

    def on_validation_epoch_end(self) -> None:
        width = self.hparams.num_classes  # volume index + one Dice per foreground class
        local = torch.stack(self._val_results) if self._val_results else torch.zeros(0, width, device=self.device)
        # Every rank now holds every result (each volume once), so the logged values agree without sync_dist.
        dice = gather_rows_once(local)[:, 1:]
        per_class = dice.nanmean(dim=0)
        for name, value in zip(self.class_names, per_class):
            if not torch.isnan(value):
                self.log(f"val/dice_{name}", value, sync_dist=False)
        scored = per_class[~torch.isnan(per_class)]
        if scored.numel():
            self.log("val/dice", scored.mean(), prog_bar=True, sync_dist=False)
        self._val_results = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per volume: its path and the predicted class indices ``[N, H, W]`` on the label's (native) grid."""
        outputs = []
        for i in range(batch["image"].shape[0]):
            grid = tuple(batch["label"].shape[-2:]) if "label" in batch else tuple(batch["image"].shape[-2:])
            prediction = self._predict_labels(batch["image"][i : i + 1], grid)[0, 0]
            outputs.append({"path": batch["path"][i], "prediction": prediction.to(torch.int16).cpu()})
        return outputs

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_cosine(
            self,
            self.pretrained_parts,
            self.hparams.lr,
            self.hparams.pretrained_lr_scale,
            self.hparams.weight_decay,
            int(self.trainer.estimated_stepping_batches),
        )


# ----------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class SegmentationPair:
    """An image volume and its label map (same grid)."""

    image: str
    label: str
    modality: Literal["ct", "mr"] | None = None  # None: the data module's setting


@dataclass(frozen=True)
class SegmentationVolume:
    """A loaded pair: the image resized to the working in-plane size, the label at that size and native."""

    image: Tensor  # float32 [N, S, S] in [0, 1]
    label: Tensor  # int16 [N, S, S] class indices (nearest-neighbour resized)
    native_label: Tensor  # int16 [N, H, W] class indices on the label file's own grid (for evaluation)
    path: str


def read_pairs_manifest(manifest: str | os.PathLike, include: str | None = None) -> list[SegmentationPair]:
    """Pairs from a CSV manifest (:mod:`jointssl.data.manifest`) with ``image`` and ``label`` columns (optional
    ``modality``: CT/MR/empty).

    Relative paths are taken relative to the manifest's folder. Rows with an empty label are not pairs and are
    skipped (a study's manifest often lists its unlabelled volumes too). ``include`` keeps only images whose file
    name matches the glob (e.g. ``"PGBM-*_FLAIR*"``). Every bad row is reported in one DataValidationError.
    """
    table = read_manifest(manifest, required=["image", "label"], path_key="image", what="segmentation manifest")

    def parse(row: ManifestRow) -> SegmentationPair | None:
        image = row.path("image")
        if not row.text("label"):
            log.info("%s line %d: %s has no label; not used for segmentation", table.path, row.line, image)
            return None
        if include is not None and not fnmatch.fnmatch(Path(image).name, include):
            return None
        return SegmentationPair(image, row.path("label"), parse_modality(row.text("modality")))

    return table.parse_all(parse)


def pair_folders(
    image_dir: str | os.PathLike, label_dir: str | os.PathLike, label_suffix: str = "", include: str | None = None
) -> list[SegmentationPair]:
    """Pair every volume file (NIfTI, MGH, NRRD, MetaImage, .npy) in ``image_dir`` with ``label_dir/<image stem><label_suffix><same extension>``.

    Raises one DataValidationError listing every image without its label.
    """
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise BadFileError(folder, "folder does not exist")
    pairs, missing = [], []
    for image in sorted(image_dir.iterdir()):
        extension = _volume_extension(image.name)
        if extension is None or (include is not None and not fnmatch.fnmatch(image.name, include)):
            continue
        label = label_dir / f"{image.name[: -len(extension)]}{label_suffix}{extension}"
        if label.is_file():
            pairs.append(SegmentationPair(str(image), str(label)))
        else:
            missing.append(BadFileError(image, f"no label map {label}"))
    if missing:
        raise DataValidationError(missing)
    return pairs


def check_same_grid(image_path: str, label_path: str) -> None:
    """Raise BadFileError (naming both files) unless two volume files share shape and affine (read from their
    headers by their readers, so that any two formats with world geometry compare).

    The tolerance on the affine is 1% of the smallest voxel size (float32 headers round). Files without an affine
    in their header (.npy, DICOM series) are checked by their shapes after loading (:func:`load_pair`).
    """
    try:
        image, label = read_volume_header(image_path), read_volume_header(label_path)
    except BadFileError as error:  # the loaders below report the broken file
        log.debug("grid check skipped for %s / %s: %s", image_path, label_path, error)
        return
    if image.affine is None or label.affine is None:
        return
    if image.shape != label.shape:
        raise BadFileError(
            label_path, f"label grid {label.shape} differs from its image {image_path} grid {image.shape}"
        )
    voxel = float(np.min(np.linalg.norm(image.affine[:3, :3], axis=0)))
    difference = float(np.max(np.abs(image.affine - label.affine)))
    if difference > 0.01 * voxel:
        raise BadFileError(
            label_path,
            f"label affine differs from its image {image_path} by up to {difference:.4g} mm (same shape "
            f"{image.shape}, but not the same voxel positions):\nimage affine\n{np.round(image.affine, 4)}\n"
            f"label affine\n{np.round(label.affine, 4)}",
        )


def map_labels(values: np.ndarray, label_mapping: Mapping[int, int] | None, path: str) -> np.ndarray:
    """Label map values -> class indices (int64). Without a mapping, values are class indices already; with one,
    unmapped values become background (0). Non-integer or negative values are a bad file."""
    rounded = np.rint(values)
    if not np.allclose(values, rounded, atol=1e-3):
        bad = values[np.abs(values - rounded) > 1e-3][0]
        raise BadFileError(path, f"label map holds non-integer values (e.g. {bad:g}); is it an image?")
    classes = rounded.astype(np.int64)
    if classes.min() < 0:
        raise BadFileError(path, f"label map holds negative values (min {classes.min()})")
    if label_mapping is None:
        return classes
    mapped = np.zeros_like(classes)
    for source, target in label_mapping.items():
        mapped[classes == int(source)] = int(target)
    return mapped


def load_pair(
    pair: SegmentationPair,
    in_plane_size: int,
    label_mapping: Mapping[int, int] | None = None,
    modality: ModalityChoice = "auto",
    slice_axis: SliceAxis = "axial",
    min_slices: int = 1,
) -> SegmentationVolume:
    """Load an image (normalised) and its label map (nearest) in the same slice layout; check the grids match."""
    check_same_grid(pair.image, pair.label)
    image = load_volume(pair.image, modality=pair.modality or modality, slice_axis=slice_axis, min_slices=1)
    raw_label = _read_label_map(pair.label, slice_axis)
    if raw_label.shape != image.array.shape:
        raise BadFileError(
            pair.label,
            f"label of {raw_label.shape[0]} slices x {raw_label.shape[1:]} does not match its image {pair.image} "
            f"({image.array.shape[0]} slices x {image.array.shape[1:]})",
        )
    if image.array.shape[0] < min_slices:
        raise BadFileError(
            pair.image, f"{image.array.shape[0]} slices; a slab needs at least {min_slices}"
        )
    classes = torch.from_numpy(map_labels(raw_label, label_mapping, pair.label))
    resized_image = resize_slices(torch.from_numpy(image.array), in_plane_size, "linear")
    resized_label = resize_slices(classes.float(), in_plane_size, "nearest").round()
    return SegmentationVolume(
        image=resized_image.float().contiguous(),
        label=resized_label.to(torch.int16).contiguous(),
        native_label=classes.to(torch.int16),
        path=pair.image,
    )


def _read_label_map(path: str, slice_axis: SliceAxis) -> np.ndarray:
    """A label map in the slice layout, original values. A constant map (a volume without any annotated
    structure) is legitimate here although ``read_volume`` rejects constant volumes: being constant, it needs no
    reorientation, only the layout shape."""
    try:
        return read_volume(path, slice_axis=slice_axis, interpolation="nearest", min_slices=1).array
    except BadFileError as error:
        # volume_io's reason for a constant volume (tests/test_segmentation.py covers this path).
        if not error.reason.startswith("constant volume"):
            raise
    header = read_volume_header(path)
    if header.affine is None:
        raise BadFileError(path, "constant label map; only label maps with an affine in their header may be constant")
    value = float(np.asarray(volume_reader(path).decode(path)).flat[0])
    return np.full(layout_shape(header.affine, header.shape, slice_axis), value, dtype=np.float32)


def _volume_extension(name: str) -> str | None:
    lower = name.lower()
    for extension in sorted(VOLUME_FILE_SUFFIXES, key=len, reverse=True):  # ".nii.gz" before ".nii"
        if lower.endswith(extension):
            return name[-len(extension):]
    return None


class SlabDataset(Dataset):
    """Training slabs: ``slab_slices`` consecutive slices of one volume with their labels.

    Items: ``image`` ``[1, K, S, S]`` (normalised), ``label`` ``[1, K, S, S]`` int64. With ``augment``, random
    flips of rows and columns (same for image and label) and a random intensity scale and shift (+-10%).
    """

    def __init__(self, volumes: Sequence[SegmentationVolume], slab_slices: int, augment: bool = True) -> None:
        self.volumes = list(volumes)
        self.slab_slices = slab_slices
        self.augment = augment
        self.slabs = [
            (v, start)
            for v, volume in enumerate(self.volumes)
            for start in range(volume.image.shape[0] - slab_slices + 1)
        ]
        self.has_foreground = torch.tensor(
            [bool((self.volumes[v].label[s : s + slab_slices] > 0).any()) for v, s in self.slabs], dtype=torch.bool
        )

    def __len__(self) -> int:
        return len(self.slabs)

    def __getitem__(self, position: int) -> dict[str, Tensor]:
        v, start = self.slabs[position]
        image = self.volumes[v].image[start : start + self.slab_slices]
        label = self.volumes[v].label[start : start + self.slab_slices].long()
        if self.augment:
            for axis in (1, 2):
                if torch.rand(()) < 0.5:
                    image, label = image.flip(axis), label.flip(axis)
            scale = 1.0 + 0.2 * (torch.rand(()) - 0.5)
            shift = 0.2 * (torch.rand(()) - 0.5)
            image = image * scale + shift
        return {"image": to_encoder_input(image)[None].contiguous(), "label": label[None].contiguous()}

    def sampling_weights(self, foreground_fraction: float | None) -> Tensor:
        """Per-slab weights so that a draw holds foreground with probability ``foreground_fraction`` (when
        both kinds of slab exist); None = uniform."""
        weights = torch.ones(len(self.slabs), dtype=torch.double)
        num_foreground = int(self.has_foreground.sum())
        if foreground_fraction is None or num_foreground in (0, len(self.slabs)):
            return weights
        weights[self.has_foreground] = foreground_fraction / num_foreground
        weights[~self.has_foreground] = (1.0 - foreground_fraction) / (len(self.slabs) - num_foreground)
        return weights


class WholeVolumeDataset(Dataset):
    """Validation volumes: ``image`` ``[1, N, S, S]`` (normalised), ``label`` ``[1, N, H, W]`` int64 (native
    grid, or the working grid), ``path`` and ``index`` (the volume's position, to count each volume once)."""

    def __init__(self, volumes: Sequence[SegmentationVolume], native_labels: bool = True) -> None:
        self.volumes = list(volumes)
        self.native_labels = native_labels

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        volume = self.volumes[index]
        label = volume.native_label if self.native_labels else volume.label
        return {
            "image": to_encoder_input(volume.image)[None],
            "label": label.long()[None],
            "path": volume.path,
            "index": index,
        }


class SegmentationData(LightningDataModule):
    """Image/label-map pairs for :class:`SliceSegmenter`: training slabs and whole validation volumes.

    Sources: a CSV ``manifest`` (``image``, ``label`` columns, optional ``modality``; see
    :func:`read_pairs_manifest`) or ``image_dir`` + ``label_dir`` (see :func:`pair_folders`). Validation volumes
    come from ``val_manifest`` or a fixed random split by volume (``val_fraction``, ``split_seed``).

    Every pair is loaded and checked in ``setup`` (grids must match, labels must be integer maps); bad pairs are
    reported together (``on_bad_file="error"``) or logged and left out ("skip").

    Args:
        label_mapping: label value -> class index (unmapped values -> background 0); None uses the values as
            class indices. E.g. TotalSegmentator liver/spleen/kidneys: ``{5: 1, 1: 2, 2: 3, 3: 3}``.
        include: keep only images whose file name matches this glob.
        modality: "ct", "mr" or "auto" intensity normalisation (a manifest's modality column wins).
        slice_axis: the axis the slices are taken along.
        in_plane_size: every slice is resized to this square size for the network.
        slab_slices: K consecutive slices per training sample (1 = 2D); must equal the model's.
        foreground_fraction: probability that a training slab holds foreground (oversampling); None = uniform.
        samples_per_epoch: slabs drawn per epoch (with replacement); None = the number of slabs.
        augment: random flips and intensity jitter for training slabs.
        evaluate_at_native_resolution: validation labels on their own grid (predictions are resized to it);
            False compares at the working in-plane size.
    """

    def __init__(
        self,
        manifest: str | None = None,
        image_dir: str | None = None,
        label_dir: str | None = None,
        label_suffix: str = "",
        include: str | None = None,
        val_manifest: str | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        label_mapping: dict[int, int] | None = None,
        modality: ModalityChoice = "auto",
        slice_axis: SliceAxis = "axial",
        in_plane_size: int = 128,
        slab_slices: int = 1,
        foreground_fraction: float | None = 0.5,
        samples_per_epoch: int | None = None,
        augment: bool = True,
        evaluate_at_native_resolution: bool = True,
        batch_size: int = 16,
        num_workers: int = 4,
        on_bad_file: OnBadFile = "error",
    ) -> None:
        super().__init__()
        if (manifest is None) == (image_dir is None):
            raise ValueError("give either manifest or image_dir (+ label_dir)")
        if image_dir is not None and label_dir is None:
            raise ValueError("image_dir needs label_dir")
        if foreground_fraction is not None and not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1] or None, got {foreground_fraction}")
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
        if label_mapping is not None:
            negative = {k: v for k, v in label_mapping.items() if int(k) < 0 or int(v) < 0}
            if negative:
                raise ValueError(f"label_mapping values and classes must be >= 0, got {negative}")
        self.save_hyperparameters()
        self.slab_slices = slab_slices
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.label_mapping = {int(k): int(v) for k, v in label_mapping.items()} if label_mapping else None
        self.train_volumes: list[SegmentationVolume] = []
        self.val_volumes: list[SegmentationVolume] = []
        self.max_class_index: int | None = None
        self._split: tuple[list[SegmentationPair], list[SegmentationPair]] | None = None

    def _pairs(self) -> tuple[list[SegmentationPair], list[SegmentationPair]]:
        hp = self.hparams
        if hp.manifest is not None:
            pairs = read_pairs_manifest(hp.manifest, hp.include)
        else:
            pairs = pair_folders(hp.image_dir, hp.label_dir, hp.label_suffix, hp.include)
        if not pairs:
            raise BadFileError(hp.manifest or hp.image_dir, "no image/label pairs found")
        if hp.val_manifest is not None:
            return pairs, read_pairs_manifest(hp.val_manifest, hp.include)
        return split_by_volume(pairs, hp.val_fraction, hp.split_seed)

    def _load(self, pairs: Sequence[SegmentationPair]) -> list[SegmentationVolume]:
        """Load every pair (one at a time: each holds a whole volume) and apply ``on_bad_file``."""
        hp = self.hparams

        def load(pair: SegmentationPair) -> FileCheck:
            volume = load_pair(pair, hp.in_plane_size, self.label_mapping, hp.modality, hp.slice_axis, hp.slab_slices)
            return FileCheck(pair.image, loaded=volume)

        checks = check_files(pairs, load, progress="loading volumes", path_of=lambda pair: pair.image)
        usable = apply_bad_file_policy(checks, hp.on_bad_file, what="segmentation pair")
        return [checks[position].loaded for position in usable]

    def setup(self, stage: str) -> None:
        # Loaded once: fit followed by validate (or a second fit) reuses the volumes.
        if self._split is None:
            self._split = self._pairs()
        train_pairs, val_pairs = self._split
        if stage == "fit" and not self.train_volumes:
            self.train_volumes = self._load(train_pairs)
            if not self.train_volumes:
                raise ValueError("no usable training volume")
        if val_pairs and not self.val_volumes:
            self.val_volumes = self._load(val_pairs)
        all_volumes = self.train_volumes + self.val_volumes
        self.max_class_index = max(int(v.native_label.max()) for v in all_volumes) if all_volumes else None
        log.info(
            "segmentation data: %d training volumes, %d validation volumes, classes 0..%s",
            len(self.train_volumes), len(self.val_volumes), self.max_class_index,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = SlabDataset(self.train_volumes, self.slab_slices, augment=self.hparams.augment)
        sampler = WeightedRandomSampler(
            dataset.sampling_weights(self.hparams.foreground_fraction),
            num_samples=self.hparams.samples_per_epoch or len(dataset),
            replacement=True,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=len(dataset) > self.batch_size,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        # One whole volume per batch: volumes differ in size.
        dataset = WholeVolumeDataset(self.val_volumes, self.hparams.evaluate_at_native_resolution)
        return DataLoader(dataset, batch_size=1, num_workers=0)

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
