"""Volume classification with f_intra + f_inter (:class:`VolumeClassifier`): whole-volume labels, or LUNA16-style
candidate slabs (:mod:`jointssl.downstream.volume_classification.data`).

The network embeds every real slice with the pretrained slice encoder f_intra, aggregates the slice embeddings
with the slice aggregator f_inter and pools them into the volume feature Z = L2norm(mean of the tokens) exactly as
in pretraining (:class:`jointssl.models.VolumeEncoder`), and classifies Z with a linear head. Validation metrics
(``val/loss``, ``val/accuracy``, ``val/auroc``, ``val/f1``) are computed over every validation sample, gathered
from all ranks, and the ROC curve is drawn (``roc`` figure).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jointssl.downstream.base import DownstreamTask, Mode, check_mode
from jointssl.downstream.classification.metrics import gathered_metrics
from jointssl.downstream.classification.module import draw_roc
from jointssl.downstream.volume_classification.network import VolumeClassificationNet
from jointssl.models import AggregatorConfig, SliceAggregator, SliceEncoder, VolumeEncoder

log = logging.getLogger("jointssl.downstream")


class VolumeClassifier(DownstreamTask):
    """f_intra + f_inter + pooling + a linear head, for volumes or candidate slabs.

    Args:
        num_classes: 2 for a binary task (AUROC of class 1's probability), more for multi-class (macro AUROC).
        pretrained: a jointssl pretraining checkpoint or export folder; None = random initialisation from
            ``backbone``, ``d_model`` and ``aggregator``.
        aggregator: f_inter's architecture for random initialisation (SliceAggregator's defaults when None).
        mode: "finetune" trains everything; "linear" freezes f_intra and f_inter (eval mode) and trains the head.
        lr, weight_decay, pretrained_lr_scale, warmup_epochs, min_lr_ratio: AdamW, warm-up then cosine (see
            :class:`~jointssl.downstream.base.DownstreamTask`); f_intra/f_inter train at ``lr * pretrained_lr_scale``.
        class_weights: cross-entropy weight per class (e.g. against LUNA16's ~1:500 imbalance); None = equal.
        slice_chunk_size, checkpoint_slices: slices per f_intra pass (0: all at once) and activation checkpointing
            per chunk (memory; see :class:`~jointssl.models.VolumeEncoder`).
    """

    #: Checkpoints of the module before VolumeEncoder (up to fb257d3) held encoder/aggregator/head at the top.
    moved_state_prefixes = {"encoder.": "net.volume_encoder.encoder.", "aggregator.": "net.volume_encoder.aggregator.",
                            "head.": "net.head."}

    def __init__(
        self,
        num_classes: int = 2,
        pretrained: str | None = None,
        backbone: str = "resnet50",
        d_model: int = 640,
        aggregator: AggregatorConfig | None = None,
        mode: Mode = "finetune",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        pretrained_lr_scale: float = 1.0,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        class_weights: list[float] | None = None,
        slice_chunk_size: int = 64,
        checkpoint_slices: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (2 = binary), got {num_classes}")
        check_mode(mode)
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"class_weights needs {num_classes} values, got {class_weights}")
        self.save_hyperparameters()
        encoder, slice_aggregator = self.build_pretrained(pretrained, backbone, d_model, aggregator, with_aggregator=True)
        self.net = VolumeClassificationNet(
            VolumeEncoder(encoder, slice_aggregator, slice_chunk_size, checkpoint_slices), num_classes
        )
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.freeze_pretrained()

    @property
    def encoder(self) -> SliceEncoder:
        return self.net.volume_encoder.encoder

    @property
    def aggregator(self) -> SliceAggregator:
        return self.net.volume_encoder.aggregator

    @property
    def head(self) -> nn.Linear:
        return self.net.head

    @property
    def pretrained_parts(self) -> list[nn.Module]:
        return [self.encoder, self.aggregator]

    def setup(self, stage: str) -> None:
        max_class = getattr(self.trainer.datamodule, "max_class_index", None)
        if max_class is not None and max_class >= self.hparams.num_classes:
            raise ValueError(f"the labels hold class {max_class} but num_classes is {self.hparams.num_classes}")

    def forward(self, volumes: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, num_classes]`` of normalised volumes ``[B, N, 1, H, W]`` (+ padding mask, True = pad)."""
        with torch.no_grad() if self.frozen else contextlib.nullcontext():  # the frozen encoders need no graph
            features = self.net.features(volumes, padding_mask)
        return self.net.head(features)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits = self(batch["volume"], batch.get("padding_mask"))
        loss = F.cross_entropy(logits.float(), batch["label"], weight=self.class_weights)
        self.log("train/loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        probabilities = self(batch["volume"], batch.get("padding_mask")).float().softmax(dim=1)
        self.record_rows(torch.cat(
            [batch["index"][:, None].to(probabilities), batch["label"][:, None].to(probabilities), probabilities],
            dim=1,
        ))

    def on_validation_epoch_end(self) -> None:
        rows = self.gathered_rows(2 + self.hparams.num_classes)
        probabilities, targets = rows[:, 2:], rows[:, 1].long()
        for name, value in self.evaluation_metrics(probabilities, targets).items():
            # Every rank holds every result, so the values agree without sync_dist.
            self.log(f"val/{name}", value, prog_bar=name == "auroc", sync_dist=False)
        draw_roc(self, probabilities, targets)

    def evaluation_metrics(self, probabilities: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """``loss`` (mean cross-entropy), ``accuracy``, ``auroc`` and ``f1`` of class probabilities ``[M, C]``
        against targets ``[M]`` (:func:`~jointssl.downstream.classification.metrics.gathered_metrics`; binary:
        of class 1's probability). AUROC is left out when the targets hold a single class (undefined)."""
        if targets.numel() == 0:
            return {}
        num_classes = self.hparams.num_classes
        binary = num_classes == 2
        metrics = {"loss": F.nll_loss(probabilities.clamp_min(1e-12).log(), targets)}
        metrics.update(gathered_metrics(
            "binary" if binary else "multiclass", num_classes, probabilities[:, 1] if binary else probabilities,
            targets,
        ))
        return metrics

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """``paths`` of the volumes and their class ``probabilities`` ``[B, num_classes]``; for candidates also
        their ``coordinates`` ``[B, 3]`` (world mm as the candidates CSV gives them), which tell the rows of one
        volume's candidates apart."""
        probabilities = self(batch["volume"], batch.get("padding_mask")).float().softmax(dim=1)
        prediction = {"paths": list(batch["path"]), "probabilities": probabilities}
        if "world" in batch:
            prediction["coordinates"] = batch["world"]
        return prediction
