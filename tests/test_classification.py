"""ImageClassifier + ImageClassificationData: training on real chest X-rays and generated data, linear probing,
class weighting, metrics against hand computations, labels and the patient-grouped split."""

from __future__ import annotations

import itertools
import math
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from PIL import Image

from jointssl.cli import JointSSLCLI
from jointssl.data import DataValidationError
from jointssl.downstream import ImageClassificationData, ImageClassifier
from jointssl.downstream.classification.data import group_of, stratified_group_split
from jointssl.downstream.classification.metrics import classification_metrics
from tests.conftest import REPO_ROOT, shared_path
from tests.downstream_fixtures import saved_figures

KERMANY_PATIENT = r"^(person\d+|(?:NORMAL2-)?IM-\d+)"
TINY = {"backbone": "test_resnet", "d_model": 16}


def write_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def class_pattern(label: int, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """Noise plus a bright band whose position depends on the class: learnable in a few steps."""
    image = rng.uniform(0, 80, (size, size))
    band = slice(label * size // 4, label * size // 4 + size // 4)
    image[band, :] += 150
    return image


def make_class_folders(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for label, (name, count) in enumerate(counts.items()):
        for i in range(count):
            write_image(root / name / f"patient{label}{i // 2:03d}_{i % 2}.png", class_pattern(label, rng))
    return root


def fit(model: LightningModule, data: LightningDataModule, tmp_path: Path, **kwargs) -> Trainer:
    trainer = Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)
    trainer.fit(model, datamodule=data)
    return trainer


# ----------------------------------------------------------------------------------------------------------- training
@pytest.mark.shared_data
def test_binary_finetune_on_chest_xrays(pretrained_checkpoint: Path, tmp_path: Path) -> None:
    root = shared_path("cxr", "train")
    seed_everything(0)
    data = ImageClassificationData(train=str(root), task="binary", image_size=32, batch_size=16, num_workers=0,
                                   val_fraction=0.2, seed=0, group_regex=KERMANY_PATIENT, validation_threads=2)
    model = ImageClassifier(num_classes=2, task="binary", pretrained=str(pretrained_checkpoint), lr=1e-3,
                            class_weights="balanced", warmup_epochs=0)
    before = [p.detach().clone() for p in model.encoder.parameters()]
    trainer = fit(model, data, tmp_path, max_epochs=1, limit_train_batches=4)
    assert data.classes == ["NORMAL", "PNEUMONIA"]
    metrics = trainer.callback_metrics
    for name in ("train/loss", "val/loss", "val/auroc", "val/accuracy", "val/f1"):
        assert torch.isfinite(metrics[name]), name
    assert 0.0 <= float(metrics["val/auroc"]) <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.encoder.parameters()))  # fine-tuned
    # The fixed split: no patient on both sides, about 20% of each class held out, the same split on every call.
    train_groups = {group_of(p, re.compile(KERMANY_PATIENT)) for p in data.train_paths}
    val_groups = {group_of(p, re.compile(KERMANY_PATIENT)) for p in data.val_paths}
    assert not train_groups & val_groups
    assert all(not g.startswith("/") for g in train_groups | val_groups)  # every Kermany name matched
    val_classes = Counter(Path(p).parent.name for p in data.val_paths)
    assert abs(val_classes["NORMAL"] - 100) <= 5 and abs(val_classes["PNEUMONIA"] - 100) <= 5
    again = ImageClassificationData(train=str(root), image_size=32, num_workers=0, seed=0,
                                    group_regex=KERMANY_PATIENT, validation_threads=2)
    again.setup("fit")
    assert again.val_paths == data.val_paths


def test_multiclass_trains_from_random_init_with_balanced_weights(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "images", {"a": 16, "b": 12, "c": 8})
    seed_everything(0)
    data = ImageClassificationData(train=str(root), task="multiclass", image_size=32, batch_size=8, num_workers=0,
                                   val_fraction=0.25, group_regex=r"^(patient\d+)_")
    model = ImageClassifier(num_classes=3, task="multiclass", **TINY, class_weights="balanced", lr=3e-3,
                            warmup_epochs=0)
    trainer = fit(model, data, tmp_path, max_epochs=3)
    counts = torch.bincount(data.train_targets, minlength=3).float()
    assert torch.allclose(model.class_weight, len(data.train_targets) / (3 * counts))
    for total, train_count in zip((16, 12, 8), counts.tolist()):  # ~25% of each class held out (pairs of images)
        assert abs((total - train_count) - total / 4) <= 1
    for name in ("val/auroc", "val/accuracy", "val/f1", "val/loss"):
        assert torch.isfinite(trainer.callback_metrics[name]), name
    assert [p.name for p in saved_figures(tmp_path, "roc")] == [f"roc_epoch{e:03d}.png" for e in range(3)]
    predictions = trainer.predict(model, datamodule=data)
    probabilities = torch.cat([batch["probabilities"] for batch in predictions])
    assert probabilities.shape == (len(data.val_paths), 3)
    assert [path for batch in predictions for path in batch["paths"]] == data.val_paths
    assert torch.allclose(probabilities.sum(1), torch.ones(len(probabilities)))


def test_multilabel_trains_from_a_manifest(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = ["path,label"]
    for i in range(24):
        labels = [name for bit, name in enumerate(["effusion", "nodule"]) if (i >> bit) & 1]
        pixels = rng.uniform(0, 60, (40, 40))
        for name in labels:
            pixels += class_pattern(1 if name == "effusion" else 3, rng) - 40
        write_image(tmp_path / "img" / f"{i}.png", pixels)
        # Names, integer indices and the empty label set all occur.
        label = "|".join(labels) if i % 3 else "|".join(str(["effusion", "nodule"].index(n)) for n in labels)
        rows.append(f"img/{i}.png,{label}")
    manifest = tmp_path / "labels.csv"
    manifest.write_text("\n".join(rows) + "\n")
    data = ImageClassificationData(train=str(manifest), task="multilabel", classes=["effusion", "nodule"],
                                   image_size=32, batch_size=8, num_workers=0, val_fraction=0.25)
    model = ImageClassifier(num_classes=2, task="multilabel", **TINY, class_weights=[1.0, 2.0], warmup_epochs=0)
    trainer = fit(model, data, tmp_path, max_epochs=2)
    data_targets = data.train_targets
    assert data_targets.shape[1] == 2 and set(data_targets.flatten().tolist()) <= {0.0, 1.0}
    for name in ("val/auroc", "val/accuracy", "val/f1"):
        assert torch.isfinite(trainer.callback_metrics[name]), name


def test_linear_probe_leaves_the_encoder_unchanged(pretrained_checkpoint: Path, tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "images", {"neg": 12, "pos": 12})
    data = ImageClassificationData(train=str(root), image_size=32, batch_size=8, num_workers=0, val_fraction=0.25)
    model = ImageClassifier(num_classes=2, pretrained=str(pretrained_checkpoint), mode="linear", warmup_epochs=0)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = [p.detach().clone() for p in model.head.parameters()]
    fit(model, data, tmp_path, max_epochs=2)
    for key, value in model.encoder.state_dict().items():  # weights and BatchNorm running statistics
        assert torch.equal(value, encoder_before[key]), key
    assert not model.encoder.training  # Lightning's train() calls leave the frozen encoder in eval mode
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters()))
    assert all(not p.requires_grad for p in model.encoder.parameters())


def test_separate_val_and_test_sources_and_checkpoint_reload(
    pretrained_checkpoint: Path, tmp_path: Path
) -> None:
    train = make_class_folders(tmp_path / "train", {"neg": 8, "pos": 8}, seed=0)
    val = make_class_folders(tmp_path / "val", {"neg": 4, "pos": 4}, seed=1)
    test = make_class_folders(tmp_path / "test", {"neg": 4, "pos": 4}, seed=2)
    data = ImageClassificationData(train=str(train), val=str(val), test=str(test), image_size=32, batch_size=8,
                                   num_workers=0)
    model = ImageClassifier(num_classes=2, pretrained=str(pretrained_checkpoint), warmup_epochs=0)
    trainer = Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, max_epochs=1,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    assert len(data.train_paths) == 16 and all("/val/" in p for p in data.val_paths)
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    assert set(results) >= {"test/auroc", "test/accuracy", "test/f1", "test/loss"}
    trainer.save_checkpoint(tmp_path / "classifier.ckpt")
    # The checkpoint records the architecture it was built with: it reloads without the pretraining file.
    reloaded = ImageClassifier.load_from_checkpoint(tmp_path / "classifier.ckpt", pretrained=None)
    assert (reloaded.hparams.backbone, reloaded.hparams.d_model) == ("test_resnet", 32)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    images = next(iter(data.test_dataloader()))["image"]
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(images), reloaded(images))


@pytest.mark.parametrize("limits", [{"max_epochs": 2}, {"max_epochs": -1, "max_steps": 12}])
def test_learning_rate_warms_up_for_one_epoch_then_decays(limits: dict, tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "images", {"a": 16, "b": 16})  # 24 training images: 6 batches of 4
    data = ImageClassificationData(train=str(root), image_size=32, batch_size=4, num_workers=0, val_fraction=0.25)
    model = ImageClassifier(num_classes=2, **TINY, lr=1.0, warmup_epochs=1.0, min_lr_ratio=0.0)
    rates: list[float] = []

    class RecordLearningRate(Callback):
        def on_train_batch_start(self, trainer: Trainer, *args) -> None:
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    fit(model, data, tmp_path, callbacks=[RecordLearningRate()], limit_val_batches=0, **limits)
    # 12 steps: linear warm-up over the first epoch (6 steps), then cosine from 1 to 0 over the remaining 6.
    expected = [(s + 1) / 6 for s in range(6)] + [0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)]
    assert rates == pytest.approx(expected)


def test_downstream_configs_run_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_class_folders(tmp_path / "images", {"NORMAL": 10, "PNEUMONIA": 10})
    monkeypatch.chdir(tmp_path)
    for config in ("cxr_linear.yaml", "cxr_finetune.yaml"):
        cli = JointSSLCLI(
            LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=["fit", "--config", str(REPO_ROOT / "configs" / "downstream" / config),
                  f"--data.init_args.train={root}", "--data.init_args.image_size=32", "--data.init_args.num_workers=0",
                  "--data.init_args.batch_size=4", "--model.init_args.backbone=test_resnet",
                  "--model.init_args.d_model=16", "--trainer.fast_dev_run=2", "--trainer.logger=false"],
        )
        assert isinstance(cli.model, ImageClassifier)
        assert torch.isfinite(cli.trainer.callback_metrics["val/auroc"])


# ------------------------------------------------------------------------------------------------------- loss weights
def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_class_weights_change_the_loss_as_computed_by_hand() -> None:
    logits = torch.tensor([1.5, -0.5, 0.2, -2.0])
    targets = torch.tensor([1, 0, 0, 1])
    weights = [0.25, 3.0]
    model = ImageClassifier(num_classes=2, **TINY, class_weights=weights)
    terms = [-(math.log(sigmoid(z)) if y else math.log(1 - sigmoid(z))) for z, y in zip(logits.tolist(), targets)]
    expected = sum(weights[y] * t for y, t in zip(targets.tolist(), terms)) / sum(weights[y] for y in targets.tolist())
    assert math.isclose(float(model.loss(logits, targets)), expected, rel_tol=1e-6)
    unweighted = ImageClassifier(num_classes=2, **TINY).loss(logits, targets)
    assert math.isclose(float(unweighted), sum(terms) / 4, rel_tol=1e-6)
    assert not math.isclose(float(unweighted), expected, rel_tol=1e-3)

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3], [0.4, -0.2, 1.1]])
    targets = torch.tensor([0, 2, 2])
    weights = [1.0, 2.0, 0.5]
    model = ImageClassifier(num_classes=3, task="multiclass", **TINY, class_weights=weights)
    nll = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits.tolist(), targets.tolist())]
    expected = sum(weights[y] * n for y, n in zip(targets.tolist(), nll)) / sum(weights[y] for y in targets.tolist())
    assert math.isclose(float(model.loss(logits, targets)), expected, rel_tol=1e-6)

    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weights = [4.0, 0.5]  # positive weight per label
    model = ImageClassifier(num_classes=2, task="multilabel", **TINY, class_weights=weights)
    terms = [-(weights[c] * math.log(sigmoid(z)) if y else math.log(1 - sigmoid(z)))
             for row_z, row_y in zip(logits.tolist(), targets.tolist())
             for c, (z, y) in enumerate(zip(row_z, row_y))]
    assert math.isclose(float(model.loss(logits, targets)), sum(terms) / 4, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------------------ metrics
def pairwise_auroc(scores: list[float], positive: list[bool]) -> float:
    """AUROC by counting concordant (positive scored above negative) pairs; ties count one half."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def f1(predicted: list[bool], actual: list[bool]) -> float:
    tp = sum(p and a for p, a in zip(predicted, actual))
    fp = sum(p and not a for p, a in zip(predicted, actual))
    fn = sum(a and not p for p, a in zip(predicted, actual))
    return 2 * tp / (2 * tp + fp + fn)


def computed(task: str, num_classes: int, probabilities: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    metrics = classification_metrics(task, num_classes)
    # Two updates, as over two validation batches.
    metrics.update(probabilities[:3], targets[:3])
    metrics.update(probabilities[3:], targets[3:])
    return {k: float(v) for k, v in metrics.compute().items()}


def test_binary_metrics_match_a_hand_computation() -> None:
    p = [0.9, 0.8, 0.3, 0.6, 0.2, 0.55, 0.3, 0.45]
    y = [1, 1, 0, 0, 0, 1, 1, 0]
    values = computed("binary", 2, torch.tensor(p), torch.tensor(y))
    predicted = [v > 0.5 for v in p]
    assert math.isclose(values["auroc"], pairwise_auroc(p, [bool(v) for v in y]), rel_tol=1e-6)  # 13.5 / 16
    assert math.isclose(values["accuracy"], sum(a == bool(b) for a, b in zip(predicted, y)) / len(y), rel_tol=1e-6)
    assert math.isclose(values["f1"], f1(predicted, [bool(v) for v in y]), rel_tol=1e-6)


def test_multiclass_metrics_match_a_hand_computation() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.4, 0.4, 0.2],
                      [0.3, 0.3, 0.4], [0.5, 0.1, 0.4], [0.2, 0.6, 0.2]])
    y = [0, 1, 2, 1, 0, 2, 1]
    values = computed("multiclass", 3, p, torch.tensor(y))
    rows = p.tolist()
    auroc = sum(pairwise_auroc([r[c] for r in rows], [t == c for t in y]) for c in range(3)) / 3
    predicted = [max(range(3), key=lambda c: (r[c], -c)) for r in rows]  # argmax, first on ties
    macro_f1 = sum(f1([q == c for q in predicted], [t == c for t in y]) for c in range(3)) / 3
    assert math.isclose(values["auroc"], auroc, rel_tol=1e-6)
    assert math.isclose(values["accuracy"], sum(q == t for q, t in zip(predicted, y)) / len(y), rel_tol=1e-6)
    assert math.isclose(values["f1"], macro_f1, rel_tol=1e-6)


def test_multilabel_metrics_match_a_hand_computation() -> None:
    p = torch.tensor([[0.9, 0.1], [0.6, 0.7], [0.2, 0.8], [0.4, 0.3], [0.7, 0.6], [0.1, 0.2]])
    y = torch.tensor([[1, 0], [0, 1], [0, 1], [1, 0], [1, 1], [0, 1]])
    values = computed("multilabel", 2, p, y)
    rows, labels = p.tolist(), y.tolist()
    auroc = sum(pairwise_auroc([r[c] for r in rows], [bool(t[c]) for t in labels]) for c in range(2)) / 2
    decisions = [(r[c] > 0.5) == bool(t[c]) for r, t in zip(rows, labels) for c in range(2)]
    macro_f1 = sum(f1([r[c] > 0.5 for r in rows], [bool(t[c]) for t in labels]) for c in range(2)) / 2
    assert math.isclose(values["auroc"], auroc, rel_tol=1e-6)
    assert math.isclose(values["accuracy"], sum(decisions) / len(decisions), rel_tol=1e-6)
    assert math.isclose(values["f1"], macro_f1, rel_tol=1e-6)


# --------------------------------------------------------------------------------------------------------------- data
def test_grouped_split_keeps_groups_whole_and_stratifies() -> None:
    strata = ["0"] * 60 + ["1"] * 40
    groups = [f"p{i // 3}" for i in range(60)] + [f"q{i // 2}" for i in range(40)]
    train, val = stratified_group_split(strata, groups, 0.25, seed=3)
    assert sorted(train + val) == list(range(100))
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    assert Counter(strata[i] for i in val) == {"0": 15, "1": 10}
    assert stratified_group_split(strata, groups, 0.25, seed=3) == (train, val)
    assert stratified_group_split(strata, groups, 0.25, seed=4) != (train, val)
    assert group_of("/x/IM-0429-0001-0002.jpeg", re.compile(KERMANY_PATIENT)) == "IM-0429"
    assert group_of("/x/person12_virus_44.jpeg", re.compile(KERMANY_PATIENT)) == "person12"
    assert group_of("/x/other.png", re.compile(KERMANY_PATIENT)) == "/x/other.png"


def test_bad_inputs_are_reported_naming_the_file(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "images", {"neg": 4, "pos": 4})
    (root / "pos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataValidationError, match="broken.png"):
        ImageClassificationData(train=str(root), num_workers=0).setup("fit")
    os.remove(root / "pos" / "broken.png")

    write_image(root / "stray.png", np.zeros((40, 40)))
    with pytest.raises(DataValidationError, match="stray.png.*subfolder"):
        ImageClassificationData(train=str(root), num_workers=0).setup("fit")
    os.remove(root / "stray.png")

    write_image(root / "third" / "x.png", np.zeros((40, 40)))
    with pytest.raises(ValueError, match="binary.*2 classes"):
        ImageClassificationData(train=str(root), num_workers=0).setup("fit")

    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"path,label\n{root / 'neg' / 'patient0000_0.png'},neg\n{root / 'pos' / 'patient1000_0.png'},\n"
                        f"{root / 'pos' / 'patient1000_1.png'},cat\n")
    with pytest.raises(DataValidationError, match="patient1000_0.png: has no label") as error:
        ImageClassificationData(train=str(manifest), classes=["neg", "pos"], num_workers=0).setup("fit")
    assert "patient1000_1.png: label 'cat' is not one of the classes" in str(error.value)


def test_model_and_data_must_agree(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "images", {"a": 6, "b": 6, "c": 6})
    data = ImageClassificationData(train=str(root), task="multiclass", image_size=32, num_workers=0)
    model = ImageClassifier(num_classes=4, task="multiclass", **TINY)
    with pytest.raises(ValueError, match="num_classes=4 but the data module has num_classes=3"):
        fit(model, data, tmp_path, max_steps=1)
