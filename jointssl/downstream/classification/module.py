"""2D image classification on the slice encoder f_intra: fine-tuning or a linear probe (:class:`ImageClassifier`).

Tasks and their outputs:

- ``binary``: two classes; class index 1 is the positive class. One logit per image; probability = sigmoid.
- ``multiclass``: one class per image; ``num_classes`` logits; probabilities = softmax.
- ``multilabel``: any subset of ``num_classes`` labels per image; one logit per label; probabilities = sigmoid.

Metrics (:mod:`jointssl.downstream.classification.metrics`, logged as ``val/auroc``, ``val/accuracy``,
``val/f1`` and ``test/...``) are computed once per epoch over every evaluated image, gathered from all ranks;
``val/loss`` is the mean of the batches' weighted training loss. At validation end the ROC curves are drawn
(``roc`` figure).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Literal

import torch
from torch import Tensor

from jointssl.callbacks.figures import roc_figure
from jointssl.downstream.base import DownstreamTask, Mode, check_mode
from jointssl.downstream.classification.metrics import (
    Task,
    balanced_class_weights,
    check_task,
    class_probabilities,
    classification_loss,
    gathered_metrics,
    logits_to_probabilities,
)
from jointssl.downstream.classification.network import classification_head

log = logging.getLogger("jointssl.downstream")


class ImageClassifier(DownstreamTask):
    """f_intra (the multi-scale slice encoder, ``d_model`` features per image) + a linear classification head.

    Args:
        num_classes: classes (``binary``: 2, class 1 is positive) or labels (``multilabel``).
        task: "binary", "multiclass" or "multilabel".
        pretrained: a jointssl pretraining checkpoint (``.ckpt``) or an export folder (``jointssl export``); its
            architecture replaces ``backbone`` / ``d_model``. None: random initialisation.
        backbone: timm model of f_intra when ``pretrained`` is None.
        d_model: width of the f_intra embedding when ``pretrained`` is None.
        mode: "finetune" (everything trains) or "linear" (the encoder is frozen and stays in eval mode, so its
            BatchNorm statistics do not move; only the head trains). In linear mode the head first standardises
            the frozen features (``linear_feature_norm``, see :func:`classification_head`).
        lr: peak AdamW learning rate (a linear probe of standardised features takes about 1e-3).
        weight_decay: AdamW weight decay; biases and norm parameters never decay.
        pretrained_lr_scale: f_intra trains at ``lr * pretrained_lr_scale`` (fine-tuning).
        warmup_epochs: linear warm-up (fractions allowed), then cosine decay to ``min_lr_ratio * lr`` at the last
            step (per step, over ``trainer.estimated_stepping_batches``).
        min_lr_ratio: final learning rate as a fraction of the peak.
        class_weights: loss weights per class (see :func:`classification_loss`; multilabel: positive weight per
            label), "balanced" (computed from the data module's training labels, see
            :func:`balanced_class_weights`), or None.
        linear_feature_norm: standardise the frozen features in linear mode (see ``mode``).
    """

    def __init__(
        self,
        num_classes: int,
        task: Task = "binary",
        pretrained: str | None = None,
        backbone: str = "resnet50",
        d_model: int = 640,
        mode: Mode = "finetune",
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        pretrained_lr_scale: float = 1.0,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.0,
        class_weights: list[float] | Literal["balanced"] | None = None,
        linear_feature_norm: bool = True,
    ) -> None:
        super().__init__()
        check_task(task)
        check_mode(mode)
        if task == "binary" and num_classes != 2:
            raise ValueError(f"task='binary' needs num_classes=2 (class 1 is the positive class), got {num_classes}")
        if num_classes < 2 and task != "multilabel":
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if isinstance(class_weights, str) and class_weights != "balanced":
            raise ValueError(f"class_weights must be a list, 'balanced' or None, got {class_weights!r}")
        if isinstance(class_weights, (list, tuple)) and (
            len(class_weights) != num_classes or min(class_weights) < 0 or sum(class_weights) <= 0
        ):
            raise ValueError(f"class_weights needs {num_classes} non-negative values (not all 0), got {class_weights}")
        self.save_hyperparameters()
        self.encoder, _ = self.build_pretrained(pretrained, backbone, d_model)
        outputs = 1 if task == "binary" else num_classes
        self.head = classification_head(self.encoder.d_model, outputs, mode == "linear" and linear_feature_norm)
        given = isinstance(class_weights, (list, tuple))
        initial = torch.tensor(class_weights, dtype=torch.float) if given else torch.ones(num_classes)
        # Persistent: a checkpoint evaluates with the weights it trained with, also without the data module.
        self.register_buffer("class_weight", initial.float())
        self.freeze_pretrained()

    @property
    def pretrained_parts(self) -> list[torch.nn.Module]:
        return [self.encoder]

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        if data is not None:
            for name in ("task", "num_classes"):
                value = getattr(data, name, None)
                if value is not None and value != self.hparams[name]:
                    raise ValueError(f"model {name}={self.hparams[name]!r} but the data module has {name}={value!r}")
        if stage == "fit" and self.hparams.class_weights == "balanced":
            targets = getattr(data, "train_targets", None)
            if targets is None:
                raise ValueError("class_weights='balanced' needs a data module with `train_targets`")
            weights = balanced_class_weights(self.hparams.task, targets, self.hparams.num_classes)
            self.class_weight.copy_(weights.to(self.class_weight))
            log.info("balanced class weights: %s", [round(w, 4) for w in weights.tolist()])

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> Tensor:
        """Logits: ``[B]`` (binary) or ``[B, num_classes]``."""
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            features = self.encoder(images)
        logits = self.head(features)
        return logits.squeeze(-1) if self.hparams.task == "binary" else logits

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        weight = self.class_weight.to(logits.dtype)
        return classification_loss(self.hparams.task, logits, targets, weight)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict[str, Any], prefix: str) -> None:
        logits = self(batch["image"])
        targets = batch["target"]
        self.log(f"{prefix}/loss", self.loss(logits, targets), sync_dist=True, batch_size=logits.shape[0])
        probabilities = logits_to_probabilities(self.hparams.task, logits.float())
        columns = [batch["index"][:, None], targets.reshape(len(targets), -1), probabilities.reshape(len(targets), -1)]
        self.record_rows(torch.cat([c.to(probabilities) for c in columns], dim=1))

    def _evaluation_end(self, prefix: str) -> None:
        task, num_classes = self.hparams.task, self.hparams.num_classes
        target_width = num_classes if task == "multilabel" else 1
        rows = self.gathered_rows(1 + target_width + (1 if task == "binary" else num_classes))
        targets, probabilities = rows[:, 1 : 1 + target_width].long(), rows[:, 1 + target_width :]
        if task != "multilabel":
            targets = targets[:, 0]
        if task == "binary":
            probabilities = probabilities[:, 0]
        # Every rank holds every result, so the values agree without sync_dist.
        for name, value in gathered_metrics(task, num_classes, probabilities, targets).items():
            self.log(f"{prefix}/{name}", value, prog_bar=name == "auroc", sync_dist=False)
        if prefix == "val":
            draw_roc(self, class_probabilities(task, probabilities), targets)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._evaluation_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._evaluation_end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """``paths`` of the images and their ``probabilities`` ``[B, C]`` (binary: both columns)."""
        probabilities = logits_to_probabilities(self.hparams.task, self(batch["image"]).float())
        return {"paths": list(batch["path"]), "probabilities": class_probabilities(self.hparams.task, probabilities)}


def draw_roc(task: DownstreamTask, probabilities: Tensor, targets: Tensor) -> None:
    """The ROC curves of gathered validation results (``roc`` figure): probabilities ``[M, C]``, targets ``[M]``
    (class indices) or ``[M, C]`` (multi-hot); the classes are named by the data module's ``classes`` when it has
    them."""
    if not len(targets):
        return
    classes = getattr(getattr(task.trainer, "datamodule", None), "classes", None)
    names = list(classes) if classes and len(classes) == probabilities.shape[1] else None
    names = names or [str(c) for c in range(probabilities.shape[1])]
    task.draw_figure("roc", lambda: roc_figure(probabilities.cpu().numpy(), targets.cpu().numpy(), names))
