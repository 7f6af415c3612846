"""Metrics and loss of classification (2D images and volumes alike), on probabilities gathered from every rank.

Metrics (torchmetrics): AUROC (macro one-vs-rest over classes / labels; binary: of the positive class 1), accuracy
as the fraction of correct decisions (micro: argmax for multiclass, probability > 0.5 for binary and per label for
multilabel), F1 of the positive class (binary) or macro F1 (multiclass, multilabel).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
)

log = logging.getLogger("jointssl.downstream")

Task = Literal["binary", "multiclass", "multilabel"]


def check_task(task: str) -> None:
    """Raise ValueError unless ``task`` is "binary", "multiclass" or "multilabel"."""
    if task not in ("binary", "multiclass", "multilabel"):
        raise ValueError(f"task must be 'binary', 'multiclass' or 'multilabel', got {task!r}")


def classification_metrics(task: Task, num_classes: int) -> MetricCollection:
    """AUROC, accuracy and F1 for ``task`` (see the module docstring for their exact definitions). Inputs are
    probabilities ``[B]`` (binary) or ``[B, C]`` and targets ``[B]`` (class indices) or ``[B, C]`` (multi-hot)."""
    if task == "binary":
        metrics = {"auroc": BinaryAUROC(), "accuracy": BinaryAccuracy(), "f1": BinaryF1Score()}
    elif task == "multiclass":
        metrics = {
            "auroc": MulticlassAUROC(num_classes, average="macro"),
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
    elif task == "multilabel":
        metrics = {
            "auroc": MultilabelAUROC(num_classes, average="macro"),
            "accuracy": MultilabelAccuracy(num_classes, average="micro"),
            "f1": MultilabelF1Score(num_classes, average="macro"),
        }
    else:
        raise ValueError(f"task must be 'binary', 'multiclass' or 'multilabel', got {task!r}")
    return MetricCollection(metrics)


def balanced_class_weights(task: Task, targets: Tensor, num_classes: int) -> Tensor:
    """Class weights that balance the training labels.

    Single-label tasks: ``n / (num_classes * count_c)`` per class (scikit-learn's "balanced"). Multilabel: the
    positive weight ``negatives_c / positives_c`` per label (torch's ``pos_weight``).
    """
    if task == "multilabel":
        positives = targets.float().sum(dim=0)
        negatives = targets.shape[0] - positives
        absent = (positives == 0).nonzero().flatten().tolist()
        if absent:
            raise ValueError(f"class_weights='balanced': labels {absent} have no positive training example")
        return negatives / positives
    counts = torch.bincount(targets.long(), minlength=num_classes).float()
    absent = (counts == 0).nonzero().flatten().tolist()
    if absent:
        raise ValueError(f"class_weights='balanced': classes {absent} have no training example")
    return targets.numel() / (num_classes * counts)


def classification_loss(task: Task, logits: Tensor, targets: Tensor, class_weight: Tensor) -> Tensor:
    """The training loss, weighted by ``class_weight``.

    - binary: ``sum_i w[y_i] * BCE_i / sum_i w[y_i]`` with ``w`` of length 2 (the weighted mean that
      ``cross_entropy(weight=...)`` uses for multiclass);
    - multiclass: ``cross_entropy(logits, y, weight=w)``;
    - multilabel: ``binary_cross_entropy_with_logits(logits, y, pos_weight=w)`` (mean over images and labels).
    """
    if task == "binary":
        per_image = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")
        weights = class_weight[targets.long()]
        return (weights * per_image).sum() / weights.sum()
    if task == "multiclass":
        return F.cross_entropy(logits, targets.long(), weight=class_weight)
    return F.binary_cross_entropy_with_logits(logits, targets.float(), pos_weight=class_weight)


def logits_to_probabilities(task: Task, logits: Tensor) -> Tensor:
    return logits.softmax(dim=-1) if task == "multiclass" else logits.sigmoid()



def class_probabilities(task: Task, probabilities: Tensor) -> Tensor:
    """Probabilities ``[B, C]`` with one column per class: binary ``[B]`` (of class 1) becomes ``[1 - p, p]``."""
    return torch.stack([1.0 - probabilities, probabilities], dim=1) if task == "binary" else probabilities


def gathered_metrics(task: Task, num_classes: int, probabilities: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """AUROC, accuracy and F1 (:func:`classification_metrics`) of all evaluated samples: probabilities ``[M]``
    (binary, of class 1) or ``[M, C]``, targets ``[M]`` or ``[M, C]``. For single-label tasks AUROC is left out
    when the targets hold a single class (undefined)."""
    if targets.numel() == 0:
        return {}
    metrics = dict(classification_metrics(task, num_classes)(probabilities, targets))
    if task != "multilabel" and targets.unique().numel() < 2:
        log.warning("the evaluated targets hold a single class: AUROC is undefined and not logged")
        del metrics["auroc"]
    return metrics
