"""Data of 2D image classification (:class:`ImageClassificationData`): class folders or CSV manifests, labels
(binary, multiclass, multilabel), a fixed patient-grouped stratified split, and the image transforms."""

from __future__ import annotations

import logging
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from jointssl.data import BadFileError, DataValidationError, ImageRecord, discover_images, load_image_2d
from jointssl.data.intensity import NORMALIZE_MEAN, NORMALIZE_STD
from jointssl.data.validation import OnBadFile, validate_images
from jointssl.downstream.classification.metrics import Task, check_task

log = logging.getLogger("jointssl.downstream")


class ClassificationDataset(Dataset):
    """Images with targets: ``{"image": Tensor[1, S, S] (normalised), "target": Tensor, "index": int, "path": str}``."""

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
        return {"image": self.transform(image), "target": self.targets[index], "index": index, "path": self.paths[index]}


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
        check_task(task)
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
        """The test images when a ``test`` source is set, otherwise the validation images."""
        return self._loader("test" if "test" in self._datasets else "val", train=False)


def _as_list(sources: str | Sequence[str] | None) -> list[str]:
    if sources is None:
        return []
    return [str(sources)] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
