"""2D image classification on the slice encoder f_intra: fine-tuning or a linear probe (``ImageClassifier``), and
its data module (``ImageClassificationData``: class folders or CSV manifests, a fixed patient-grouped split).

Tasks and their outputs:

- ``binary``: two classes; class index 1 is the positive class. One logit per image; probability = sigmoid.
- ``multiclass``: one class per image; ``num_classes`` logits; probabilities = softmax.
- ``multilabel``: any subset of ``num_classes`` labels per image; one logit per label; probabilities = sigmoid.

Metrics (torchmetrics, logged as ``val/auroc``, ``val/accuracy``, ``val/f1`` and ``test/...``): AUROC (macro
one-vs-rest over classes / labels), accuracy as the fraction of correct decisions (micro: argmax for multiclass,
probability > 0.5 for binary and per label for multilabel), F1 of the positive class (binary) or macro F1
(multiclass, multilabel).
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
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
from torchvision.transforms import v2

from jointssl.data import BadFileError, DataValidationError, ImageRecord, discover_images, load_image_2d
from jointssl.data.validation import OnBadFile, validate_images
from jointssl.data.intensity import NORMALIZE_MEAN, NORMALIZE_STD
from jointssl.downstream.common import FrozenPartsMixin, Mode, build_slice_encoders, check_mode, self_contained_hparams
from jointssl.optim import decay_groups, warmup_cosine_scheduler

log = logging.getLogger("jointssl.downstream")

Task = Literal["binary", "multiclass", "multilabel"]
#: Optimiser defaults per mode: (learning rate, weight decay). Fine-tuning: AdamW; linear probe: SGD + momentum.
DEFAULT_OPTIMIZATION = {"finetune": (3e-4, 0.05), "linear": (0.1, 0.0)}


# ======================================================================================================================
# Model
# ======================================================================================================================


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


class ImageClassifier(FrozenPartsMixin, LightningModule):
    """f_intra (the multi-scale slice encoder, ``d_model`` features per image) + a linear classification head.

    Args:
        num_classes: classes (``binary``: 2, class 1 is positive) or labels (``multilabel``).
        task: "binary", "multiclass" or "multilabel".
        pretrained: a jointssl pretraining checkpoint (``.ckpt``) or an export folder (``jointssl export``); its
            architecture replaces ``backbone`` / ``d_model``. None: random initialisation.
        backbone: timm model of f_intra when ``pretrained`` is None.
        d_model: width of the f_intra embedding when ``pretrained`` is None.
        mode: "finetune" (everything trains; AdamW) or "linear" (the encoder is frozen and stays in eval mode, so
            its BatchNorm statistics do not move; only the head trains; SGD + momentum, the usual linear-probe
            protocol). In linear mode the head first standardises the frozen features with a BatchNorm without
            affine parameters (as in MAE's linear probe): one learning rate then suits encoders whose feature
            scales differ, and the head stays an affine map of the features.
        lr: peak learning rate; None: 3e-4 (finetune, AdamW) or 0.1 (linear, SGD).
        weight_decay: None: 0.05 (finetune) or 0 (linear). Biases and norm parameters never decay.
        momentum: SGD momentum (linear mode).
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
        lr: float | None = None,
        weight_decay: float | None = None,
        momentum: float = 0.9,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.0,
        class_weights: list[float] | Literal["balanced"] | None = None,
        linear_feature_norm: bool = True,
    ) -> None:
        super().__init__()
        if task not in ("binary", "multiclass", "multilabel"):
            raise ValueError(f"task must be 'binary', 'multiclass' or 'multilabel', got {task!r}")
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
        self.encoder, _, architecture = build_slice_encoders(pretrained, backbone, d_model, None, with_aggregator=False)
        # Record the architecture actually built, so that `load_from_checkpoint(path)` rebuilds it.
        self.hparams.update(self_contained_hparams(self.hparams, architecture))
        outputs = 1 if task == "binary" else num_classes
        linear = nn.Linear(self.encoder.d_model, outputs)
        if mode == "linear" and linear_feature_norm:
            self.head: nn.Module = nn.Sequential(nn.BatchNorm1d(self.encoder.d_model, affine=False), linear)
        else:
            self.head = linear
        given = isinstance(class_weights, (list, tuple))
        initial = torch.tensor(class_weights, dtype=torch.float) if given else torch.ones(num_classes)
        # Persistent: a checkpoint evaluates with the weights it trained with, also without the data module.
        self.register_buffer("class_weight", initial.float())
        self.frozen_parts: list[nn.Module] = []
        if mode == "linear":
            self.freeze_parts([self.encoder])
        self.val_metrics = classification_metrics(task, num_classes).clone(prefix="val/")
        self.test_metrics = classification_metrics(task, num_classes).clone(prefix="test/")

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        if data is not None:
            self._check_data(data)
        if stage == "fit" and self.hparams.class_weights == "balanced":
            targets = getattr(data, "train_targets", None)
            if targets is None:
                raise ValueError("class_weights='balanced' needs a data module with `train_targets`")
            weights = balanced_class_weights(self.hparams.task, targets, self.hparams.num_classes)
            self.class_weight.copy_(weights.to(self.class_weight))
            log.info("balanced class weights: %s", [round(w, 4) for w in weights.tolist()])

    def _check_data(self, data: LightningDataModule) -> None:
        for name in ("task", "num_classes"):
            value = getattr(data, name, None)
            if value is not None and value != self.hparams[name]:
                raise ValueError(f"model {name}={self.hparams[name]!r} but the data module has {name}={value!r}")

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> Tensor:
        """Logits: ``[B]`` (binary) or ``[B, num_classes]``."""
        if self.hparams.mode == "linear":
            with torch.no_grad():
                features = self.encoder(images)
        else:
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

    def _evaluate(self, batch: dict[str, Any], metrics: MetricCollection, prefix: str) -> None:
        logits = self(batch["image"])
        targets = batch["target"]
        self.log(f"{prefix}/loss", self.loss(logits, targets), sync_dist=True, batch_size=logits.shape[0])
        probabilities = logits_to_probabilities(self.hparams.task, logits.float())
        metrics.update(probabilities, targets.long())
        self.log_dict(metrics, batch_size=logits.shape[0])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Probabilities: ``[B]`` (binary: of class 1) or ``[B, num_classes]``."""
        return logits_to_probabilities(self.hparams.task, self(batch["image"]).float())

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        mode = self.hparams.mode
        default_lr, default_decay = DEFAULT_OPTIMIZATION[mode]
        lr = self.hparams.lr if self.hparams.lr is not None else default_lr
        decay = self.hparams.weight_decay if self.hparams.weight_decay is not None else default_decay
        if mode == "linear":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                decay_groups(self.head.parameters(), decay), lr=lr, momentum=self.hparams.momentum
            )
        else:
            optimizer = torch.optim.AdamW(decay_groups(self.parameters(), decay), lr=lr)
        scheduler = warmup_cosine_scheduler(optimizer, self.trainer, self.hparams.warmup_epochs, self.hparams.min_lr_ratio)
        log.info("%s: %s lr %.4g, weight decay %.3g, %d warm-up of %d steps", mode, type(optimizer).__name__, lr,
                 decay, scheduler.lr_lambdas[0].warmup_steps, scheduler.lr_lambdas[0].total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ======================================================================================================================
# Data
# ======================================================================================================================


class ClassificationDataset(Dataset):
    """Images with targets: ``{"image": Tensor[1, S, S] (normalised), "target": Tensor, "index": int}``."""

    def __init__(self, paths: Sequence[str], targets: Tensor, transform: v2.Transform) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = list(paths)
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = torch.from_numpy(load_image_2d(self.paths[index])).unsqueeze(0)
        return {"image": self.transform(image), "target": self.targets[index], "index": index}


def train_transform(image_size: int, crop_scale: tuple[float, float], flip_p: float) -> v2.Compose:
    """Random resized crop (area fraction in ``crop_scale``, aspect 3/4..4/3) + horizontal flip + normalisation."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True),
        v2.RandomHorizontalFlip(p=flip_p),
        v2.Normalize([NORMALIZE_MEAN], [NORMALIZE_STD]),
    ])


def eval_transform(image_size: int) -> v2.Compose:
    """The whole image resized to ``image_size`` x ``image_size`` + normalisation."""
    return v2.Compose([
        v2.Resize((image_size, image_size), antialias=True),
        v2.Normalize([NORMALIZE_MEAN], [NORMALIZE_STD]),
    ])


def labelled_records(sources: Sequence[str | Path]) -> list[ImageRecord]:
    """Image records with their raw label: for a folder source, the name of the class subfolder an image is in
    (one level below the source; files directly in the source are errors); for a CSV manifest, its ``label``
    column (missing rows are errors; see :func:`jointssl.data.discover_images`)."""
    records: list[ImageRecord] = []
    problems: list[BadFileError] = []
    for source in sources:
        source_path = Path(source).expanduser()
        found = discover_images([source_path])
        if not source_path.is_dir():
            records.extend(found)
            continue
        root = os.path.abspath(source_path)
        for record in found:
            parts = Path(os.path.relpath(record.path, root)).parts
            if len(parts) < 2:
                problems.append(BadFileError(record.path, f"directly in {root}: put each image in a subfolder "
                                                          "named after its class"))
                continue
            records.append(ImageRecord(record.path, record.source, label=parts[0]))
    if problems:
        raise DataValidationError(problems)
    return records


def split_labels(label: str | None, task: Task, separator: str) -> list[str]:
    """The label names of one raw label: exactly one for single-label tasks, zero or more for multilabel."""
    if label is None or not label.strip():
        return []
    if task != "multilabel":
        return [label.strip()]
    return [part.strip() for part in label.split(separator) if part.strip()]


def infer_classes(names: Sequence[str]) -> list[str]:
    """Class names in index order: ``0..max`` when every label is an integer, otherwise the sorted names."""
    unique = set(names)
    if unique and all(name.isdigit() for name in unique):
        return [str(i) for i in range(max(int(name) for name in unique) + 1)]
    if any(name.isdigit() for name in unique):
        raise ValueError(
            f"labels mix class indices and class names ({sorted(unique)[:10]}): set `classes` to give the order"
        )
    return sorted(unique)


def encode_targets(
    records: Sequence[ImageRecord], classes: Sequence[str], task: Task, separator: str
) -> Tensor:
    """Targets of ``records``: class indices ``[N]`` (long) or multi-hot ``[N, C]`` (float). A label may be a class
    name or an integer index into ``classes``. Raises :class:`DataValidationError` listing every bad label."""
    index = {name: i for i, name in enumerate(classes)}
    problems: list[BadFileError] = []
    rows: list[list[int]] = []
    for record in records:
        names = split_labels(record.label, task, separator)
        if task != "multilabel" and not names:
            problems.append(BadFileError(record.path, "has no label"))
            continue
        indices = []
        for name in names:
            if name in index:
                indices.append(index[name])
            elif name.isdigit() and int(name) < len(classes):
                indices.append(int(name))
            else:
                problems.append(BadFileError(record.path, f"label {name!r} is not one of the classes {list(classes)}"))
        rows.append(indices)
    if problems:
        raise DataValidationError(problems)
    if task != "multilabel":
        return torch.tensor([row[0] for row in rows], dtype=torch.long)
    targets = torch.zeros(len(rows), len(classes))
    for i, row in enumerate(rows):
        targets[i, row] = 1.0
    return targets


def group_of(path: str, pattern: re.Pattern[str] | None) -> str:
    """The group (e.g. patient) of a file: the first capture group of ``pattern`` searched in the file name (the
    whole match when the pattern has no group); without a pattern or a match, the file is its own group."""
    name = os.path.basename(path)
    match = pattern.search(name) if pattern is not None else None
    if match is None:
        return path
    return match.group(1) if match.re.groups else match.group(0)


def stratified_group_split(
    strata: Sequence[str], groups: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split items into (train, val) positions: every group wholly on one side; per stratum (the majority stratum
    of a group's items) about ``val_fraction`` of the items in val. Groups are visited in a seeded shuffle of their
    sorted ids and taken while they bring the stratum's val count closer to its target, so the split depends only on
    the data, the fraction and the seed."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    members: dict[str, list[int]] = defaultdict(list)
    for position, group in enumerate(groups):
        members[group].append(position)
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for group, positions in members.items():
        counts = Counter(strata[p] for p in positions)
        majority = min(counts, key=lambda s: (-counts[s], s))
        by_stratum[majority].append(group)
    rng = random.Random(seed)
    val: list[int] = []
    for stratum in sorted(by_stratum):
        stratum_groups = sorted(by_stratum[stratum])
        rng.shuffle(stratum_groups)
        target = val_fraction * sum(len(members[g]) for g in stratum_groups)
        taken = 0
        for group in stratum_groups:
            # Take a group when it brings the stratum's val count strictly closer to the target; smaller groups
            # later in the order can still fill a gap that a large one would overshoot.
            size = len(members[group])
            if abs(taken + size - target) < abs(taken - target):
                val.extend(members[group])
                taken += size
    val_set = set(val)
    return [p for p in range(len(groups)) if p not in val_set], sorted(val)


class ImageClassificationData(LightningDataModule):
    """Labelled 2D images for :class:`ImageClassifier`.

    Args:
        train: training source(s): folders with one subfolder per class (``NORMAL/``, ``PNEUMONIA/``) or CSV
            manifests with the columns ``path,label`` (label: a class name, an integer class index, or for
            multilabel a ``label_separator``-separated list of names; empty = no label set).
        val: validation source(s); None: a fixed split of ``train`` (``val_fraction``, ``seed``, ``group_regex``).
        test: test source(s) for ``jointssl test`` (optional).
        task: "binary", "multiclass" or "multilabel" (must match the model's).
        classes: class names in index order; None: the sorted names found in ``train`` (or ``0..max`` when all
            labels are integers). Binary: ``[negative, positive]``.
        val_fraction: fraction of the training images held out when ``val`` is None, stratified by label.
        seed: seed of that split.
        group_regex: keeps the images of one group (patient) on one side of the split: searched in each file name,
            the first capture group (or the whole match) names the group. Kermany chest X-rays:
            ``^(person\\d+|(?:NORMAL2-)?IM-\\d+)``. None, or no match: every image is its own group.
        image_size: side of the square network input.
        crop_scale: area fraction range of the training random resized crop.
        flip_p: probability of a horizontal flip in training.
        batch_size: training batch size (per device); evaluation uses ``eval_batch_size`` (None: the same).
        num_workers: DataLoader worker processes.
        on_bad_file: "error" (raise, listing every bad file) or "skip" (log and drop) for files that do not decode.
        validation_threads: threads decoding the images once before training.
        label_separator: separator of the label names in a multilabel manifest.
    """

    def __init__(
        self,
        train: str | list[str] = "data/cxr/train",
        val: str | list[str] | None = None,
        test: str | list[str] | None = None,
        task: Task = "binary",
        classes: list[str] | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        group_regex: str | None = None,
        image_size: int = 224,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        flip_p: float = 0.5,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        on_bad_file: OnBadFile = "error",
        validation_threads: int = 8,
        label_separator: str = "|",
    ) -> None:
        super().__init__()
        if task not in ("binary", "multiclass", "multilabel"):
            raise ValueError(f"task must be 'binary', 'multiclass' or 'multilabel', got {task!r}")
        if val is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"without a `val` source val_fraction must be in (0, 1), got {val_fraction}")
        if task == "binary" and classes is not None and len(classes) != 2:
            raise ValueError(f"task='binary' needs exactly 2 classes [negative, positive], got {classes}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.save_hyperparameters()
        self.train_sources = _as_list(train)
        self.val_sources = _as_list(val)
        self.test_sources = _as_list(test)
        self.task = task
        self.group_pattern = re.compile(group_regex) if group_regex else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self._classes: list[str] | None = list(classes) if classes is not None else None
        self._datasets: dict[str, ClassificationDataset] = {}

    # ------------------------------------------------------------------ properties
    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            raise RuntimeError("classes are known after setup() (or pass `classes`)")
        return self._classes

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None while unknown (before setup without `classes`)."""
        return len(self._classes) if self._classes is not None else None

    @property
    def train_targets(self) -> Tensor:
        return self._require("train").targets

    @property
    def train_paths(self) -> list[str]:
        return self._require("train").paths

    @property
    def val_paths(self) -> list[str]:
        return self._require("val").paths

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str | None = None) -> None:
        """Discover, label and decode-check every image (bad files fail now, naming each), then split."""
        hp = self.hparams
        if stage in (None, "fit", "validate", "predict") and "train" not in self._datasets:
            train_records = self._valid(labelled_records(self.train_sources))
            if self._classes is None:
                self._classes = self._infer_classes(train_records)
            train_targets = self._encode(train_records)
            if self.val_sources:
                val_records = self._valid(labelled_records(self.val_sources))
                val_targets = self._encode(val_records)
            else:
                train_records, train_targets, val_records, val_targets = self._split(train_records, train_targets)
            self._datasets["train"] = ClassificationDataset(
                [r.path for r in train_records], train_targets, train_transform(hp.image_size, hp.crop_scale, hp.flip_p)
            )
            self._datasets["val"] = ClassificationDataset(
                [r.path for r in val_records], val_targets, eval_transform(hp.image_size)
            )
            self._log_sizes()
        if stage in (None, "test", "predict") and self.test_sources and "test" not in self._datasets:
            if self._classes is None:
                # The class order is the training data's: read its labels (no decoding needed for that).
                self._classes = self._infer_classes(labelled_records(self.train_sources))
            test_records = self._valid(labelled_records(self.test_sources))
            self._datasets["test"] = ClassificationDataset(
                [r.path for r in test_records], self._encode(test_records), eval_transform(hp.image_size)
            )

    def _infer_classes(self, records: list[ImageRecord]) -> list[str]:
        names = [n for r in records for n in split_labels(r.label, self.task, self.hparams.label_separator)]
        classes = infer_classes(names)
        if self.task == "binary" and len(classes) != 2:
            raise ValueError(f"task='binary' needs 2 classes, found {classes} in {self.train_sources}")
        return classes

    def _valid(self, records: list[ImageRecord]) -> list[ImageRecord]:
        threads = max(1, min(self.hparams.validation_threads, os.cpu_count() or 1))
        records = validate_images(
            records, on_bad_file=self.hparams.on_bad_file, num_threads=threads, progress="checking images"
        )
        if not records:
            raise ValueError("no usable images")
        return records

    def _encode(self, records: list[ImageRecord]) -> Tensor:
        return encode_targets(records, self.classes, self.task, self.hparams.label_separator)

    def _split(
        self, records: list[ImageRecord], targets: Tensor
    ) -> tuple[list[ImageRecord], Tensor, list[ImageRecord], Tensor]:
        strata = [",".join(map(str, row.nonzero().flatten().tolist())) if targets.ndim == 2 else str(int(row))
                  for row in targets]
        groups = [group_of(r.path, self.group_pattern) for r in records]
        if self.group_pattern is not None:
            unmatched = sum(1 for r, g in zip(records, groups) if g == r.path)
            if unmatched:
                log.warning("group_regex matched no group in %d of %d file names: each is its own group",
                            unmatched, len(records))
        train, val = stratified_group_split(strata, groups, self.hparams.val_fraction, self.hparams.seed)
        if not train or not val:
            raise ValueError(
                f"val_fraction={self.hparams.val_fraction} leaves {len(train)} training and {len(val)} validation "
                "images: both need at least one"
            )
        return ([records[i] for i in train], targets[train], [records[i] for i in val], targets[val])

    def _log_sizes(self) -> None:
        for split in ("train", "val"):
            targets = self._datasets[split].targets
            counts = targets.sum(0) if targets.ndim == 2 else torch.bincount(targets, minlength=len(self.classes))
            per_class = ", ".join(f"{name}: {int(c)}" for name, c in zip(self.classes, counts.tolist()))
            log.info("%s: %d images (%s)", split, len(targets), per_class)

    def _require(self, split: str) -> ClassificationDataset:
        if split not in self._datasets:
            raise RuntimeError(f"no {split} data: call setup() first" + (" and set `test`" if split == "test" else ""))
        return self._datasets[split]

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self._require(split)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            # A last batch of one image would break BatchNorm in training.
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self._datasets else "val", train=False)


def _as_list(sources: str | Sequence[str] | None) -> list[str]:
    if sources is None:
        return []
    return [str(sources)] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
