"""JointSSL end to end on tiny models: the 2D SwAV / DeepCluster-v2 training loop, the demo CLI, and a short
run on the real slices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from jointssl.data import JointDataModule, SyntheticData
from jointssl.pretrain import JointSSL
from tests.conftest import REPO_ROOT, shared_path

TINY_MODEL = dict(backbone="test_resnet", d_model=32, projection_hidden_dim=64, projection_dim=16)


def tiny_data(root: Path, **overrides) -> JointDataModule:
    kwargs = dict(
        synthetic=SyntheticData(root=str(root), num_images=64, image_size=40),
        batch_size=8,
        num_workers=0,
        global_crop_size=32,
        local_crop_size=16,
        num_local_crops=2,
    )
    kwargs.update(overrides)
    return JointDataModule(**kwargs)


def fit(model: JointSSL, data: JointDataModule, tmp_path: Path, **trainer_kwargs) -> Trainer:
    # The losses are logged (and reach callback_metrics) on logging steps only: make every step one.
    trainer_kwargs.setdefault("log_every_n_steps", 1)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=data)
    return trainer


def test_swav_step_updates_weights_and_freezes_prototypes(tmp_path: Path) -> None:
    model = JointSSL(**TINY_MODEL, method="swav", num_prototypes=[10], freeze_prototypes_steps=2, warmup_epochs=0)
    prototypes_before = model.intra.prototypes.heads[0].weight.detach().clone()
    encoder_before = [p.detach().clone() for p in model.encoder.parameters()]
    trainer = fit(model, tiny_data(tmp_path), tmp_path, max_steps=2)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss_intra"])
    # Frozen for the first 2 steps: only renormalised, never moved by the optimizer.
    normalised = torch.nn.functional.normalize(prototypes_before, dim=1)
    assert torch.allclose(model.intra.prototypes.heads[0].weight, normalised, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(encoder_before, model.encoder.parameters()))


def test_deepcluster_fills_memory_before_first_epoch_and_clusters(tmp_path: Path) -> None:
    model = JointSSL(**TINY_MODEL, method="deepcluster", num_prototypes=[6, 5], warmup_epochs=0)
    trainer = fit(model, tiny_data(tmp_path), tmp_path, max_epochs=2)
    assert trainer.current_epoch == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss_intra"])
    # Every sample seen in an epoch has a pseudo-label from each head, within range.
    labels = model.intra.memory.labels
    seen = model.intra.memory.indices[model.intra.memory.indices >= 0]
    assert seen.numel() > 0
    assert (labels[0, seen] >= 0).all() and (labels[0, seen] < 6).all() and (labels[1, seen] < 5).all()
    # The prototypes are the (unit-norm) centroids, never trained.
    assert not any(p.requires_grad for p in model.intra.prototypes.parameters())
    norms = model.intra.prototypes.heads[0].weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_demo_config_runs_from_console_script(tmp_path: Path) -> None:
    """The README's demo command on a fresh directory: generates its data, trains, prints the checkpoint path."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    script = Path(sys.executable).parent / "jointssl"
    result = subprocess.run(
        [str(script), "fit", "--config", str(REPO_ROOT / "configs" / "demo.yaml"), "--trainer.max_steps=3",
         "--data.init_args.synthetic.num_images=128", "--data.init_args.num_workers=0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "jointssl: checkpoint written to" in result.stdout
    checkpoint = tmp_path / "runs" / "demo" / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert state["jointssl_format_version"] == 1


@pytest.mark.shared_data
def test_swav_on_real_slices_lowers_loss_without_collapse(tmp_path: Path) -> None:
    """A few hundred SwAV steps on the 400 real slices (4 datasets): the loss falls and the assignments spread
    over many prototypes instead of collapsing onto a handful."""
    slices = shared_path("slices2d")
    torch.manual_seed(0)
    num_prototypes = 30
    model = JointSSL(
        **TINY_MODEL, method="swav", num_prototypes=[num_prototypes], freeze_prototypes_steps=20,
        base_lr=0.3, lr_reference_batch_size=32, warmup_epochs=1, queue_length=0,
    )
    data = JointDataModule(
        images=[str(slices)], batch_size=32, num_workers=2, global_crop_size=32, local_crop_size=16,
        num_local_crops=2, persistent_workers=True,
    )
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=17, default_root_dir=tmp_path, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        logger=__import__("lightning.pytorch.loggers", fromlist=["CSVLogger"]).CSVLogger(tmp_path),
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 17 * (400 // 32)
    import csv

    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    losses = [float(r["train/loss_intra"]) for r in rows if r.get("train/loss_intra")]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first - 0.1, (first, last)
    used = [float(r["train/intra_prototypes_used"]) for r in rows if r.get("train/intra_prototypes_used")]
    assert used[-1] >= 0.5, used


def read_metrics(trainer: Trainer) -> list[dict[str, str]]:
    import csv

    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def window_means(rows: list[dict[str, str]], key: str, window: int) -> tuple[float, float]:
    values = [float(r[key]) for r in rows if r.get(key)]
    assert len(values) >= 2 * window, (key, len(values))
    return sum(values[:window]) / window, sum(values[-window:]) / window


@pytest.mark.shared_data
def test_joint_run_on_real_slices_and_volumes_lowers_each_loss(tmp_path: Path) -> None:
    """The joint objective on the real 2D slices plus the real CT and MR volumes: L_intra and L_inter fall over a
    short run, and L_mask beats the visible slices' mean without making neighbour interpolation worse."""
    slices, volumes = shared_path("slices2d"), shared_path("volumes")
    torch.manual_seed(0)
    model = JointSSL(
        **TINY_MODEL, method="swav", num_prototypes=[20], num_prototypes_3d=[4], queue_length_3d=16,
        queue_start_epoch=2, freeze_prototypes_steps=10, aggregator_layers=1, aggregator_heads=4,
        aggregator_ffn_dim=48, intra_slices_per_volume=4, base_lr=0.3, lr_reference_batch_size=32, warmup_epochs=1,
    )
    data = JointDataModule(
        images=[str(slices / "BraTS2018_Brain"), str(slices / "LiTS2017_Liver")], volumes=[str(volumes / "ct"), str(volumes / "mr")],
        batch_size=32, volume_batch_size=2, num_workers=1, global_crop_size=32, local_crop_size=16,
        num_local_crops=0, num_slices=8, volume_size=32, volume_in_plane_size=64, slice_stream=True, slice_stride=4,
        volume_cache="memory",
    )
    from lightning.pytorch.loggers import CSVLogger

    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=12, default_root_dir=tmp_path, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, logger=CSVLogger(tmp_path),
    )
    trainer.fit(model, datamodule=data)
    rows = read_metrics(trainer)
    for name in ("intra", "inter"):
        first, last = window_means(rows, f"train/loss_{name}", window=10)
        assert last < 0.9 * first, (name, first, last)
    # L_mask's prediction starts from interpolating the visible neighbours (losses/masked.py), so its loss starts
    # at that baseline's error and falling 10% would mean beating interpolation by 10%, which a 100-step run on
    # these 11 volumes does not (docs/results.md). What it must do: beat the visible slices' mean clearly, and not
    # make the interpolation worse. Judged on the finished model in eval mode, the errors pooled over 3 passes of
    # the data: the logged per-step R^2 (2 volumes, a few masked spans) swings by +-0.2 between 10-step means.
    r2 = pooled_mask_r2(model, data, passes=3)
    assert r2["vs_mean"] > 0.2 and r2["vs_neighbours"] > -0.05, r2


def pooled_mask_r2(model: JointSSL, data: JointDataModule, passes: int) -> dict[str, float]:
    """diagnostics.PooledMaskR2 of ``model`` (eval mode, no gradients) over ``passes`` of the training batches."""
    from jointssl.diagnostics import PooledMaskR2

    pooled, loader = PooledMaskR2(), data.train_dataloader()
    model.eval()
    with torch.no_grad():
        for _ in range(passes):
            for batch, _, _ in loader:
                pooled.update(*model.compute_losses(batch)["diagnostics"]["mask"])
    return pooled.r2()


@pytest.mark.ddp
def test_demo_runs_under_two_process_ddp(tmp_path: Path) -> None:
    """`strategy=ddp` on CPU (gloo) through the console script, as a user would start it: both ranks train the
    joint objective on the demo data and one checkpoint is written."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = Path(sys.executable).parent / "jointssl"
    result = subprocess.run(
        [str(script), "fit", "--config", str(REPO_ROOT / "configs" / "demo.yaml"), "--trainer.max_steps=2",
         "--trainer.devices=2", "--trainer.strategy=ddp", "--data.init_args.num_workers=0",
         "--data.init_args.synthetic.num_images=128", "--data.init_args.synthetic.num_volumes=16"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "jointssl: checkpoint written to" in result.stdout
    state = torch.load(tmp_path / "runs" / "demo" / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=True)
    assert state["global_step"] == 2
    assert "inter.swav.queue" in state["state_dict"]


def test_staged_recipe_hands_weights_from_stage_to_stage(tmp_path: Path) -> None:
    """Stage 1 (L_intra) -> stage 2 (frozen f_intra, L_mask): stage 2 starts from stage 1's encoder and leaves it
    untouched; queues and memory banks are not carried over."""
    def data() -> JointDataModule:
        synthetic = SyntheticData(root=str(tmp_path / "d"), num_images=32, image_size=40, num_volumes=8,
                                  volume_shape=(40, 40, 10))
        return tiny_data(tmp_path, synthetic=synthetic, num_slices=6, volume_size=32, volume_batch_size=2,
                         volume_in_plane_size=40)

    stage1 = JointSSL(**TINY_MODEL, num_prototypes=[8], num_prototypes_3d=[4], aggregator_layers=1,
                      aggregator_heads=4, aggregator_ffn_dim=32, inter_weight=0, mask_weight=0, warmup_epochs=0)
    trainer = fit(stage1, data(), tmp_path, max_steps=2)
    checkpoint = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(checkpoint)
    stage2 = JointSSL(**TINY_MODEL, num_prototypes=[8], num_prototypes_3d=[4], aggregator_layers=1,
                      aggregator_heads=4, aggregator_ffn_dim=32, intra_weight=0, inter_weight=0, mask_weight=1,
                      freeze=["encoder"], init_from=str(checkpoint), warmup_epochs=0)
    for a, b in zip(stage1.encoder.state_dict().values(), stage2.encoder.state_dict().values()):
        assert torch.equal(a, b)
    aggregator_before = [p.detach().clone() for p in stage2.aggregator.parameters()]
    encoder_before = {k: v.clone() for k, v in stage2.encoder.state_dict().items()}
    fit(stage2, data(), tmp_path, max_steps=2)
    for key, value in stage2.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key  # weights and BatchNorm statistics
    assert any(not torch.equal(a, b) for a, b in zip(aggregator_before, stage2.aggregator.parameters()))


def test_deepcluster_with_more_prototypes_than_samples_fails_before_training(tmp_path: Path) -> None:
    model = JointSSL(**TINY_MODEL, method="deepcluster", num_prototypes=[100])
    with pytest.raises(ValueError, match="at least as many 2D samples as prototypes per head: 64 < 100"):
        fit(model, tiny_data(tmp_path), tmp_path, max_steps=1)


def test_volume_batch_of_one_fails_before_training_with_a_clear_message(tmp_path: Path) -> None:
    synthetic = SyntheticData(root=str(tmp_path / "d"), num_images=32, image_size=40, num_volumes=4,
                              volume_shape=(40, 40, 10))
    data = tiny_data(tmp_path, synthetic=synthetic, num_slices=6, volume_size=32, volume_batch_size=1,
                     volume_in_plane_size=40)
    model = JointSSL(**TINY_MODEL, num_prototypes=[8], num_prototypes_3d=[2], aggregator_layers=1,
                     aggregator_heads=4, aggregator_ffn_dim=32)
    with pytest.raises(ValueError, match="volume_batch_size=1: the projection head's BatchNorm needs at least 2"):
        fit(model, data, tmp_path, max_steps=1)


def test_out_of_range_hyper_parameters_are_refused_naming_the_option() -> None:
    from jointssl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"JointSSL: mask_ratio must be in \[0, 1\], got 1.5"):
        JointSSL(**TINY_MODEL, mask_ratio=1.5)
    with pytest.raises(ConfigError, match=r"JointSSL: num_prototypes must be a non-empty list of values > 0, got \[0\]"):
        JointSSL(**{**TINY_MODEL, "num_prototypes": [0]})
