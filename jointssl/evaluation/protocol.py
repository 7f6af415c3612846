"""`jointssl evaluate`: the evaluation protocol on features saved by `jointssl embed` (:mod:`.features`).

1. Load one embedding folder (a train set, split here) or two (train and test from two sources, embedded with
   the same encoder).
2. Labels: those stored in ``items.csv``, or with ``label_regex`` the first capture group (the whole match for
   a pattern without groups) of ``re.search`` on the item's path. Items without a label (no match, or empty) are
   dropped and counted (``dropped_unlabelled``).
3. Split (one folder): with ``group_regex``, items are grouped by its first capture group (or whole match) on the
   path, e.g. a patient or scan id; an item whose path does not match is its own group. Whole groups go to the
   test split: the groups are shuffled with ``random.Random(seed)`` and taken in that order whenever a group
   brings the test size closer to ``test_fraction`` of the items (at least one group on each side). Without
   ``group_regex`` every item is its own group (split ``"items"``). With two folders there is no split
   (``"two_sources"``); groups (``group_regex``, else the path) are still compared across them.
4. Refused with a one-line ValueError: fewer than 2 classes in train, a test class missing from train, train and
   test sharing a group, features of different encoders.
5. Probes (:mod:`.probes`): weighted kNN (cosine, k, temperature) and the linear probe (standardised features,
   L2-regularised multinomial logistic regression, L-BFGS), both trained on the train split only; top-1 and
   balanced accuracy, AUROC of class 1 (the second class in sorted order) for binary tasks.

The report's fields are documented in docs/evaluation.md (:data:`REPORT_FIELDS` lists them in order).
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from jointssl.evaluation import probes
from jointssl.evaluation.features import EMBED_FORMAT, FEATURES_FILE, ITEMS_FILE, META_FILE

#: Every field of the report, in order (documented in docs/evaluation.md).
REPORT_FIELDS = (
    "task", "feature", "split", "n_train", "n_test", "n_groups_train", "n_groups_test", "classes",
    "class_counts_train", "class_counts_test", "knn_acc", "knn_balanced_acc", "linear_acc", "linear_balanced_acc",
    "auroc_knn", "auroc_linear", "k", "temperature", "probe_weight_decay", "probe_max_iter", "label_regex",
    "group_regex", "test_fraction", "dropped_unlabelled", "seed", "checkpoint", "checkpoint_sha256", "random_init",
    "embed_seed", "train", "test", "seconds", "jointssl_version",
)


@dataclass
class EmbeddedSet:
    """One embedding folder read back: its features, item paths and labels (None when unknown), and embed.json."""

    folder: Path
    features: dict[str, Tensor]
    paths: list[str]
    labels: list[str | None]
    meta: dict[str, Any]


def load_embedded(folder: str | Path) -> EmbeddedSet:
    """Read an embedding folder written by `jointssl embed`; ValueError for anything else or an incomplete one."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise ValueError(f"{folder}: not an embedding folder (no {META_FILE}; write one with `jointssl embed`)")
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != EMBED_FORMAT:
        raise ValueError(f"{folder / META_FILE}: format {meta.get('format')!r}, expected {EMBED_FORMAT!r}")
    features = load_file(str(folder / FEATURES_FILE))
    with open(folder / ITEMS_FILE, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    paths = [row["path"] for row in rows]
    labels = [row.get("label") or None for row in rows]
    for name, tensor in features.items():
        if tensor.shape[0] != len(rows):
            raise ValueError(f"{folder}: {FEATURES_FILE} holds {tensor.shape[0]} rows of {name!r} but {ITEMS_FILE} "
                             f"lists {len(rows)} items (an interrupted embed? run it again with --overwrite)")
    return EmbeddedSet(folder, features, paths, labels, meta)


def _first_group(match: re.Match) -> str:
    return match.group(1) if match.re.groups else match.group(0)


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{what} {pattern!r} is not a regular expression: {error}") from error


def regex_labels(paths: list[str], label_regex: str) -> list[str | None]:
    """The label of each path by ``label_regex`` (first capture group, or the whole match); None without a match.
    ValueError when it matches none of the paths."""
    pattern = _compile(label_regex, "label regex")
    labels = []
    for path in paths:
        match = pattern.search(path)
        labels.append(_first_group(match) or None if match else None)
    if paths and not any(labels):
        raise ValueError(f"label regex {label_regex!r} matches none of the {len(paths)} item paths (e.g. {paths[0]})")
    return labels


def item_groups(paths: list[str], group_regex: str | None) -> list[str]:
    """The group of each path: ``"group:<first capture group (or whole match) of group_regex>"``, or
    ``"path:<path>"`` when there is no regex or it does not match (the item is its own group)."""
    if group_regex is None:
        return ["path:" + path for path in paths]
    pattern = _compile(group_regex, "group regex")
    groups = []
    for path in paths:
        match = pattern.search(path)
        groups.append("group:" + _first_group(match) if match else "path:" + path)
    return groups


def grouped_split(groups: list[str], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and test positions such that every group lies wholly on one side (module docstring, step 3)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    sizes: dict[str, int] = {}
    for group in groups:
        sizes[group] = sizes.get(group, 0) + 1
    if len(sizes) < 2:
        raise ValueError(f"cannot split {len(groups)} items of a single group into train and test")
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    target = test_fraction * len(groups)
    test_groups: set[str] = set()
    count = 0
    for group in order[:-1]:  # the last group stays in train, so that train is never empty
        if not test_groups or abs(count + sizes[group] - target) < abs(count - target):
            test_groups.add(group)
            count += sizes[group]
    train = [i for i, g in enumerate(groups) if g not in test_groups]
    test = [i for i, g in enumerate(groups) if g in test_groups]
    return train, test


def _select(embedded: EmbeddedSet, feature: str) -> Tensor:
    if feature not in embedded.features:
        raise ValueError(f"{embedded.folder}: no feature {feature!r}; it holds {sorted(embedded.features)} "
                         "(choose one with --feature)")
    return embedded.features[feature].double()


def _labelled(embedded: EmbeddedSet, label_regex: str | None) -> tuple[list[int], list[str], int]:
    """Positions and labels of the labelled items, and how many were dropped."""
    labels = regex_labels(embedded.paths, label_regex) if label_regex else embedded.labels
    keep = [i for i, label in enumerate(labels) if label]
    if not keep:
        how = f"label regex {label_regex!r}" if label_regex else f"{ITEMS_FILE} (no label column values)"
        raise ValueError(f"{embedded.folder}: no item has a label from {how}")
    return keep, [labels[i] for i in keep], len(labels) - len(keep)


def evaluate(
    train: str | Path,
    test: str | Path | None = None,
    task: str | None = None,
    feature: str = "features",
    label_regex: str | None = None,
    group_regex: str | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    k: int = probes.DEFAULT_K,
    temperature: float = probes.DEFAULT_TEMPERATURE,
    probe_weight_decay: float = probes.DEFAULT_WEIGHT_DECAY,
    probe_max_iter: int = probes.DEFAULT_MAX_ITER,
) -> dict[str, Any]:
    """Run the protocol (module docstring) and return the report (:data:`REPORT_FIELDS`, docs/evaluation.md)."""
    started = time.perf_counter()
    train_set = load_embedded(train)
    train_features = _select(train_set, feature)
    keep, labels, dropped = _labelled(train_set, label_regex)
    paths = [train_set.paths[i] for i in keep]
    features = train_features[keep]
    groups = item_groups(paths, group_regex)

    if test is None:
        split = "grouped" if group_regex else "items"
        train_pos, test_pos = grouped_split(groups, test_fraction, seed)
        x_train, x_test = features[train_pos], features[test_pos]
        y_train, y_test = [labels[i] for i in train_pos], [labels[i] for i in test_pos]
        g_train, g_test = [groups[i] for i in train_pos], [groups[i] for i in test_pos]
    else:
        split = "two_sources"
        test_set = load_embedded(test)
        _check_same_encoder(train_set, test_set)
        test_keep, y_test, test_dropped = _labelled(test_set, label_regex)
        dropped += test_dropped
        x_train, y_train, g_train = features, labels, groups
        x_test = _select(test_set, feature)[test_keep]
        g_test = item_groups([test_set.paths[i] for i in test_keep], group_regex)
        if x_test.shape[1] != x_train.shape[1]:
            raise ValueError(f"feature {feature!r} has {x_train.shape[1]} dimensions in {train} but "
                             f"{x_test.shape[1]} in {test}")

    shared = sorted(set(g_train) & set(g_test))
    if shared:
        raise ValueError(f"train and test share {len(shared)} group(s), e.g. {shared[0].split(':', 1)[1]!r}: the "
                         "test items would not be unseen")
    classes = sorted(set(y_train))
    if len(classes) < 2:
        raise ValueError(f"the train split holds {len(classes)} class(es) {classes}: a probe needs at least 2")
    missing = sorted(set(y_test) - set(classes))
    if missing:
        raise ValueError(f"test class(es) {missing} have no train item (try another --seed or --test-fraction, "
                         "or more data)")
    if not y_test:
        raise ValueError("the test split is empty")

    index = {name: i for i, name in enumerate(classes)}
    t_train = torch.tensor([index[y] for y in y_train])
    t_test = torch.tensor([index[y] for y in y_test])
    knn = probes.knn_probe(x_train, t_train, x_test, len(classes), k=k, temperature=temperature)
    linear = probes.linear_probe(x_train, t_train, x_test, len(classes), weight_decay=probe_weight_decay,
                                 max_iter=probe_max_iter)
    binary = len(classes) == 2
    meta = train_set.meta
    return {
        "task": task or train_set.folder.resolve().name,
        "feature": feature,
        "split": split,
        "n_train": len(y_train),
        "n_test": len(y_test),
        "n_groups_train": len(set(g_train)),
        "n_groups_test": len(set(g_test)),
        "classes": classes,
        "class_counts_train": [y_train.count(c) for c in classes],
        "class_counts_test": [y_test.count(c) for c in classes],
        "knn_acc": probes.accuracy(knn.predicted, t_test),
        "knn_balanced_acc": probes.balanced_accuracy(knn.predicted, t_test),
        "linear_acc": probes.accuracy(linear.predicted, t_test),
        "linear_balanced_acc": probes.balanced_accuracy(linear.predicted, t_test),
        "auroc_knn": probes.binary_auroc(knn.scores[:, 1], t_test) if binary else None,
        "auroc_linear": probes.binary_auroc(linear.scores[:, 1], t_test) if binary else None,
        "k": k,
        "temperature": temperature,
        "probe_weight_decay": probe_weight_decay,
        "probe_max_iter": probe_max_iter,
        "label_regex": label_regex,
        "group_regex": group_regex,
        "test_fraction": test_fraction if test is None else None,
        "dropped_unlabelled": dropped,
        "seed": seed,
        "checkpoint": meta.get("checkpoint"),
        "checkpoint_sha256": meta.get("checkpoint_sha256"),
        "random_init": meta.get("random_init"),
        "embed_seed": meta.get("seed"),
        "train": str(train_set.folder),
        "test": None if test is None else str(test),
        "seconds": round(time.perf_counter() - started, 3),
        "jointssl_version": meta.get("jointssl_version"),
    }


def _check_same_encoder(train: EmbeddedSet, test: EmbeddedSet) -> None:
    """Features of two folders are comparable only when one encoder (same weights, same init) made them."""
    for key in ("kind", "checkpoint_sha256", "random_init", "seed"):
        if key == "seed" and not train.meta.get("random_init"):
            continue  # the seed only matters for random weights
        if train.meta.get(key) != test.meta.get(key):
            raise ValueError(f"{train.folder} and {test.folder} were embedded differently ({key}: "
                             f"{train.meta.get(key)!r} vs {test.meta.get(key)!r}): their features are not comparable")


def format_report(report: dict[str, Any]) -> str:
    """A small table of the main numbers of a report (what `jointssl evaluate` prints)."""
    def number(value: float | None) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    rows = [
        ("task", str(report["task"])),
        ("feature", report["feature"]),
        ("split", report["split"] + (f" by {report['group_regex']}" if report["group_regex"] else "")),
        ("n_train / n_test", f"{report['n_train']} / {report['n_test']}"),
        ("groups train / test", f"{report['n_groups_train']} / {report['n_groups_test']}"),
        ("classes", ", ".join(report["classes"])),
        ("kNN acc (balanced)", f"{number(report['knn_acc'])} ({number(report['knn_balanced_acc'])})"),
        ("linear acc (balanced)", f"{number(report['linear_acc'])} ({number(report['linear_balanced_acc'])})"),
        ("AUROC kNN / linear", f"{number(report['auroc_knn'])} / {number(report['auroc_linear'])}"),
        ("encoder", ("random init, seed " + str(report["embed_seed"])) if report["random_init"] else
         str(report["checkpoint"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
