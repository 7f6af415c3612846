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


# The layout of fb257d3's checkpoints (read off real ones written by that commit's modules): the volume classifier
# held f_intra, f_inter and the head at the top, the 2.5D segmenter held f_intra and f_inter in net directly.
OLD_LAYOUT = {
    VolumeClassifier: {"net.volume_encoder.encoder.": "encoder.", "net.volume_encoder.aggregator.": "aggregator.",
                       "net.head.": "head."},
    SliceSegmenter: {"net.volume_encoder.encoder.": "net.encoder.", "net.volume_encoder.aggregator.": "net.aggregator."},
}


@pytest.mark.parametrize("task", [VolumeClassifier, SliceSegmenter])
def test_a_checkpoint_of_the_old_layout_loads_and_predicts_the_same(task: type, tmp_path: Path) -> None:
    import lightning

    torch.manual_seed(0)
    # fb257d3 wrote the aggregator as given (a missing key meant SliceAggregator's default) and pretrained_source
    # among the hyper-parameters.
    aggregator = {"num_layers": 1, "num_heads": 4, "ffn_dim": 16}
    if task is VolumeClassifier:
        model = task(num_classes=2, **TINY, aggregator=aggregator)
        inputs = (torch.randn(2, 6, 1, 32, 32), torch.tensor([[False] * 6, [False] * 4 + [True] * 2]))
        old_hparams = {"num_classes": 2, **TINY, "aggregator": aggregator, "mode": "finetune", "lr": 1e-3,
                       "pretrained_lr_scale": 1.0, "weight_decay": 1e-4, "class_weights": None,
                       "slice_chunk_size": 64, "checkpoint_slices": False, "pretrained": None,
                       "pretrained_source": "runs/old/last.ckpt"}
    else:
        model = task(num_classes=3, **TINY, aggregator=aggregator, context_2p5d=True, slab_slices=3,
                     decoder_channels=[16, 8, 8, 8, 8])
        inputs = (torch.randn(2, 1, 3, 32, 32),)
        old_hparams = {"num_classes": 3, **TINY, "aggregator": aggregator, "mode": "finetune", "context_2p5d": True,
                       "slab_slices": 3, "class_names": None, "decoder_channels": [16, 8, 8, 8, 8], "lr": 1e-3,
                       "pretrained_lr_scale": 1.0, "weight_decay": 1e-4, "dice_ignore_empty": True,
                       "inference_overlap": 0.5, "inference_batch_size": 32, "pretrained": None,
                       "pretrained_source": "runs/old/last.ckpt"}
    for name, buffer in model.named_buffers():  # trained-looking statistics: a buffer left behind would show
        if name.endswith("running_mean"):
            buffer.normal_()
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 2.0)
    model.eval()
    network = model if task is VolumeClassifier else model.net
    with torch.no_grad():
        expected = network(*inputs)
    old_state = {}
    for key, value in model.state_dict().items():
        new_prefix = next(p for p in (*OLD_LAYOUT[task], "") if key.startswith(p))
        old_state[OLD_LAYOUT[task].get(new_prefix, "") + key[len(new_prefix):]] = value
    old_prefix = "" if task is VolumeClassifier else "net."
    assert {f"{old_prefix}encoder.proj.weight", f"{old_prefix}aggregator.context_norm.running_mean"} <= set(old_state)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old_state, "hyper_parameters": old_hparams, "hparams_name": "kwargs",
                "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0}, path)
    reloaded = task.load_from_checkpoint(path).eval()  # strict: every tensor found its place
    assert reloaded.pretrained_source == "runs/old/last.ckpt"
    with torch.no_grad():
        torch.testing.assert_close((reloaded if task is VolumeClassifier else reloaded.net)(*inputs), expected,
                                   rtol=0, atol=0)
