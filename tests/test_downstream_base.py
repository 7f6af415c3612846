"""The downstream base (jointssl.downstream.base.DownstreamTask) that every task module shares: the one optimiser
recipe with pretrained_lr_scale, freezing in linear mode, self-contained hyper-parameters, and the evaluation
gathered across ranks (each sample once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from jointssl.downstream import DownstreamTask, ImageClassificationData, ImageClassifier, NoduleDetector
from jointssl.downstream import SliceSegmenter, VolumeClassifier
from jointssl.downstream.classification.metrics import gathered_metrics
from tests.downstream_ddp_worker import NUM_CLASSES, validation_set
from tests.gloo_ranks import run_ranks
from tests.test_classification import make_class_folders

TINY = {"backbone": "test_resnet", "d_model": 16}


def optimizer_groups(model: ImageClassifier, tmp_path: Path) -> list[dict]:
    """The optimizer's param groups at the start of training (one step on 8 tiny images)."""
    root = make_class_folders(tmp_path / "images", {"a": 6, "b": 6})
    data = ImageClassificationData(train=str(root), image_size=32, batch_size=4, num_workers=0, val_fraction=0.25)
    groups: list[dict] = []

    class Record(Callback):
        def on_train_start(self, trainer: Trainer, module: ImageClassifier) -> None:
            groups.extend(dict(g) for g in trainer.optimizers[0].param_groups)

    Trainer(accelerator="cpu", devices=1, max_steps=1, limit_val_batches=0, default_root_dir=tmp_path, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[Record()]).fit(model, datamodule=data)
    return groups


def test_one_recipe_adamw_with_the_pretrained_parts_at_their_own_rate(tmp_path: Path) -> None:
    model = ImageClassifier(num_classes=2, **TINY, lr=0.5, weight_decay=0.1, pretrained_lr_scale=0.1,
                            warmup_epochs=0)
    groups = optimizer_groups(model, tmp_path)
    encoder = {id(p) for p in model.encoder.parameters()}
    head = {id(p) for p in model.head.parameters()}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= encoder or ids <= head  # a group is wholly pretrained or wholly new
        assert group["lr"] == pytest.approx(0.05 if ids <= encoder else 0.5)
        assert group["weight_decay"] == (0.1 if all(p.ndim > 1 for p in group["params"]) else 0.0)
    assert {id(p) for g in groups for p in g["params"]} == encoder | head  # every parameter, once


def test_linear_mode_optimises_only_the_new_layers(tmp_path: Path) -> None:
    model = ImageClassifier(num_classes=2, **TINY, mode="linear", warmup_epochs=0)
    groups = optimizer_groups(model, tmp_path)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.head.parameters()}
    assert not model.encoder.training and all(not p.requires_grad for p in model.encoder.parameters())


@pytest.mark.parametrize("task", [ImageClassifier, VolumeClassifier, SliceSegmenter, NoduleDetector])
def test_every_task_is_a_downstream_task_with_self_contained_hparams(task: type, pretrained_checkpoint: Path) -> None:
    kwargs = {"num_classes": 2} if task is not NoduleDetector else {"fpn_channels": 16, "returned_layers": [1],
                                                                    "val_patch_size": None}
    model = task(pretrained=str(pretrained_checkpoint), mode="linear", **kwargs)
    assert isinstance(model, DownstreamTask)
    assert model.hparams.pretrained is None and model.pretrained_source == str(pretrained_checkpoint)
    assert model.hparams.backbone == "test_resnet"  # the checkpoint's architecture, not the default resnet50
    model.train()
    for part in model.pretrained_parts:
        assert not part.training and all(not p.requires_grad for p in part.parameters())


def test_gathered_evaluation_counts_each_sample_once_across_ranks(tmp_path: Path) -> None:
    ranks = run_ranks("tests.downstream_ddp_worker", tmp_path)
    probabilities, targets = validation_set()
    assert sorted(ranks[0]["shard"].tolist() + ranks[1]["shard"].tolist()) == [0, 0, 1, 2, 3, 4, 5, 6]  # padded
    expected = gathered_metrics("multiclass", NUM_CLASSES, probabilities, targets)
    for result in ranks:
        assert result["rows"][:, 0].tolist() == list(range(7))
        torch.testing.assert_close(result["rows"][:, 2:], probabilities)
        for name, value in expected.items():
            torch.testing.assert_close(result[name], value)
