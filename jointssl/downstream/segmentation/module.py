"""3D segmentation with the pretrained slice encoder (:class:`SliceSegmenter`): a 2D U-Net over slices
(:class:`~jointssl.downstream.segmentation.network.SliceUNet`), evaluated on whole volumes.

Training uses slabs sampled by :class:`~jointssl.downstream.segmentation.data.SegmentationData` (optionally
oversampling slabs that hold foreground) and MONAI's ``DiceCELoss``. Validation predicts WHOLE volumes: a window of
K slices slides over the slice axis (``monai.inferers.sliding_window_inference``; overlapping windows are blended),
the per-slice probabilities are resized back to the label's native in-plane grid, and MONAI's ``DiceMetric`` gives
the 3D Dice of every foreground class per volume. ``val/dice_<class>`` is the mean over validation volumes (a
volume whose label lacks the class is left out of that class's mean by default), ``val/dice`` the mean over
classes; the ``overlay`` figure shows a few slices of the first validation volume with its label and prediction.
Prediction gives each volume's label map in its source file's voxel order (written as NIfTI by the prediction
writer).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import Tensor, nn

from jointssl.callbacks.figures import overlay_figure
from jointssl.downstream.base import DownstreamTask, Mode, check_mode
from jointssl.downstream.segmentation.data import to_source_order
from jointssl.downstream.segmentation.metrics import dice_per_class
from jointssl.downstream.segmentation.network import SliceUNet
from jointssl.models import AggregatorConfig

log = logging.getLogger("jointssl.downstream")


class SliceSegmenter(DownstreamTask):
    """3D segmentation by a pretrained (or random) slice encoder in a 2D U-Net, optionally with 2.5D context.

    Args:
        num_classes: classes including background (a binary task has 2).
        pretrained: a jointssl pretraining checkpoint or export folder; None = random initialisation from
            ``backbone``, ``d_model`` and ``aggregator``. With a file, the architecture comes from it.
        backbone, d_model: f_intra's architecture for random initialisation.
        aggregator: f_inter's architecture for random initialisation in 2.5D mode (SliceAggregator's defaults when
            None).
        mode: "finetune" trains everything; "linear" freezes the pretrained parts (f_intra, and f_inter in 2.5D)
            in eval mode and trains the decoder (and the context projection) only.
        context_2p5d: add f_inter's cross-slice context (see the module docstring); needs ``slab_slices >= 2``.
        slab_slices: K, the slices per training slab and per inference window; must equal the data module's.
        class_names: names of the foreground classes 1..num_classes-1 for ``val/dice_<name>`` (default: numbers).
        decoder_channels: U-Net decoder widths, deepest first, one per backbone stage.
        lr, weight_decay, pretrained_lr_scale, warmup_epochs, min_lr_ratio: AdamW, warm-up then cosine (see
            :class:`~jointssl.downstream.base.DownstreamTask`); pretrained parts train at ``lr * pretrained_lr_scale``.
        dice_ignore_empty: see :func:`dice_per_class`.
        inference_overlap: overlap of neighbouring windows along the slice axis in whole-volume inference
            (2.5D only; windows of one slice never overlap).
        inference_batch_size: slices per forward pass in whole-volume inference.
        overlay_slices: slices of the first validation volume drawn in the ``overlay`` figure (image, label and
            prediction; the slices with the most labelled foreground), 0 = none.
    """

    #: Checkpoints of the network before VolumeEncoder (up to fb257d3) held f_intra and f_inter in net directly.
    moved_state_prefixes = {"net.encoder.": "net.volume_encoder.encoder.",
                            "net.aggregator.": "net.volume_encoder.aggregator."}

    def __init__(
        self,
        num_classes: int = 2,
        pretrained: str | None = None,
        backbone: str = "resnet50",
        d_model: int = 640,
        aggregator: AggregatorConfig | None = None,
        mode: Mode = "finetune",
        context_2p5d: bool = False,
        slab_slices: int = 1,
        class_names: list[str] | None = None,
        decoder_channels: list[int] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        pretrained_lr_scale: float = 1.0,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        dice_ignore_empty: bool = True,
        inference_overlap: float = 0.5,
        inference_batch_size: int = 32,
        overlay_slices: int = 3,
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
        encoder, slice_aggregator = self.build_pretrained(
            pretrained, backbone, d_model, aggregator, with_aggregator=context_2p5d
        )
        self.net = SliceUNet(encoder, num_classes, decoder_channels, slice_aggregator)
        self.class_names = list(class_names) if class_names else [str(c) for c in range(1, num_classes)]
        # Unused parameters must not require gradients (DDP would wait for them): the slice embedding only
        # feeds the context.
        if not context_2p5d:
            self.net.encoder.proj.requires_grad_(False)
        self.freeze_pretrained()
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        self._overlay: dict[str, np.ndarray] | None = None

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
        return self.net(slabs, frozen_encoder=self.frozen)

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

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        label = batch["label"].long()
        for i in range(label.shape[0]):
            prediction = self._predict_labels(batch["image"][i : i + 1], tuple(label.shape[-2:]))
            dice = dice_per_class(
                prediction, label[i : i + 1], self.hparams.num_classes, self.hparams.dice_ignore_empty
            )[0]
            index = batch["index"][i].to(dice)
            self.record_rows(torch.cat([index.view(1), dice.float()])[None])
            if int(index) == 0:
                self._overlay = overlay_slices(
                    batch["image"][i, 0], label[i, 0], prediction[0, 0], self.hparams.overlay_slices
                )

    def on_validation_epoch_end(self) -> None:
        # Every rank now holds every result (each volume once), so the logged values agree without sync_dist.
        dice = self.gathered_rows(self.hparams.num_classes)[:, 1:]  # volume index + one Dice per foreground class
        per_class = dice.nanmean(dim=0)
        for name, value in zip(self.class_names, per_class):
            if not torch.isnan(value):
                self.log(f"val/dice_{name}", value, sync_dist=False)
        scored = per_class[~torch.isnan(per_class)]
        if scored.numel():
            self.log("val/dice", scored.mean(), prog_bar=True, sync_dist=False)
        # The first validation volume is evaluated on rank 0 (samplers deal index 0 to rank 0).
        overlay, self._overlay = self._overlay, None
        if overlay is not None and len(overlay["slices"]):
            self.draw_figure("overlay", lambda: overlay_figure(
                overlay["image"], overlay["label"], overlay["prediction"],
                titles=[f"slice {s}" for s in overlay["slices"]],
            ))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per volume: ``path`` (the image file) and ``labels``, the predicted class indices on the image's native
        grid in the SOURCE FILE's voxel order (:func:`to_source_order`), so that they overlay the file exactly
        with its own affine."""
        outputs = []
        for i in range(batch["image"].shape[0]):
            grid = tuple(int(n) for n in batch["native_grid"][i])
            layout = self._predict_labels(batch["image"][i : i + 1], grid)[0, 0]
            labels = to_source_order(layout.to(torch.int16).cpu().numpy(), batch["path"][i], batch["slice_axis"][i])
            outputs.append({"path": batch["path"][i], "labels": labels})
        return outputs


def overlay_slices(image: Tensor, label: Tensor, prediction: Tensor, count: int) -> dict[str, np.ndarray]:
    """Up to ``count`` slices of one evaluated volume for the overlay picture: the slices with the most labelled
    foreground (the first slices when there is none), in slice order; the image ``[N, h, w]`` (network input) is
    resized to the label's grid ``[N, H, W]``."""
    foreground = (label > 0).flatten(1).sum(dim=1)
    chosen = torch.sort(torch.argsort(foreground, descending=True, stable=True)[:count]).values
    grid = tuple(label.shape[-2:])
    image_slices = F.interpolate(image[chosen][:, None].float(), size=grid, mode="bilinear", align_corners=False)
    return {
        "slices": chosen.cpu().numpy(),
        "image": image_slices[:, 0].cpu().numpy(),
        "label": label[chosen].cpu().numpy(),
        "prediction": prediction[chosen].cpu().numpy(),
    }

