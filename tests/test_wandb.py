"""W&B tracking on real offline runs: `jointssl fit` with configs/logger/{csv,wandb}.yaml, read back from the run
files with `wandb leet inspect --json` (never mocked, never online).

- every loss term, the learning rate, prototype usage and cluster statistics reach the run with the values the
  module computed; example images, the resolved config and the package versions are in the run;
- a resumed fit (`--ckpt_path last`) continues the same run id from the checkpoint's global step;
- secrets in the environment appear in no file of the experiment and in no console output;
- under 2-process DDP only rank 0 creates a run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from jointssl.callbacks.example_images import (
    ExampleImageLogger,
    cluster_grid,
    crops_montage,
    nearest_prototypes,
    volume_views_montage,
)
from jointssl.cli import main
from jointssl.pretrain import JointSSL
from jointssl.tracking import (
    REDACTED,
    RUN_ID_FILE,
    ExperimentCSVLogger,
    ExperimentWandbLogger,
    package_versions,
    redact_secrets,
    run_id_from_checkpoint,
)
from tests.conftest import REPO_ROOT

WANDB_CONFIG = REPO_ROOT / "configs" / "logger" / "wandb.yaml"
CSV_CONFIG = REPO_ROOT / "configs" / "logger" / "csv.yaml"
LOSS_TERMS = ("train/loss", "train/loss_intra", "train/loss_inter", "train/loss_mask")
EPOCH_METRICS = (
    "train/intra_prototypes_used", "train/inter_prototypes_used",
    "train/intra_assignment_entropy", "train/inter_assignment_entropy",
)

#: A joint (2D + 3D) pretraining run small enough for a few steps in about a second each.
TINY_CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": "exp/checkpoints", "save_last": True}},
        ],
        "default_root_dir": "exp",
    },
    "model": {
        "class_path": "jointssl.pretrain.JointSSL",
        "init_args": {
            "backbone": "test_resnet", "d_model": 32, "projection_hidden_dim": 32, "projection_dim": 16,
            "num_prototypes": [10], "num_prototypes_3d": [4], "aggregator_layers": 1, "aggregator_heads": 2,
            "aggregator_ffn_dim": 32, "intra_slices_per_volume": 2, "warmup_epochs": 0,
            "freeze_prototypes_steps": 1, "lr_reference_batch_size": 8, "base_lr": 0.1,
        },
    },
    "data": {
        "class_path": "jointssl.data.JointDataModule",
        "init_args": {
            "synthetic": {"root": "data", "num_images": 32, "image_size": 40, "num_volumes": 4,
                          "volume_shape": [32, 32, 8]},
            "batch_size": 8, "volume_batch_size": 2, "num_workers": 0, "global_crop_size": 32,
            "local_crop_size": 16, "num_local_crops": 1, "num_slices": 6, "volume_size": 32,
            "volume_in_plane_size": 32, "pin_memory": False, "persistent_workers": False,
        },
    },
}


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline W&B with every W&B folder inside tmp_path, no API key; the test runs in tmp_path."""
    home = tmp_path / "wandb_home"
    for variable, folder in (("WANDB_DIR", "dir"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                             ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        (home / folder).mkdir(parents=True)
        monkeypatch.setenv(variable, str(home / folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    return tmp_path


def fit(*args: str) -> None:
    """`jointssl fit --config tiny.yaml ARGS` in this process (the console script's `main`)."""
    main(["fit", "--config", "tiny.yaml", *args])


def run_dirs(experiment: Path) -> list[Path]:
    """The experiment's W&B run folders (one per segment of the run), oldest first."""
    return sorted((experiment / "wandb").glob("offline-run-*"))


def inspect_run(run_dir: Path, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The records of a finished offline run, read from its .wandb file by W&B's own reader.

    `run.finish()` returns once W&B's service has the exit record, which it may write to disk a moment later on a
    busy machine (seen once: a .wandb file holding only its header): wait for the exit record."""
    wandb_cli = Path(sys.executable).parent / "wandb"
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(
            [str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=60,
            check=True,
        )
        records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        if any(record["type"] == "exit" for record in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record["history"]["item"] for record in records if record["type"] == "history"]


def config_updates(records: list[dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for record in records:
        if record["type"] == "config":
            config.update(record["config"].get("update", {}))
    return config


class StepRecorder(Callback):
    """Writes what the module computed at every training step (its returned loss, the optimizer's learning rate
    during the step) to a JSON file, for comparison with the logged values."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.steps: dict[int, dict[str, float]] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.steps[trainer.global_step] = {"train/lr": trainer.optimizers[0].param_groups[0]["lr"]}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.steps[trainer.global_step - 1]["train/loss"] = float(outputs["loss"])

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        Path(self.path).write_text(json.dumps(self.steps))


# ---------------------------------------------------------------------------------------------------------- runs
def test_offline_run_holds_metrics_images_config_and_versions(offline_wandb: Path) -> None:
    fit(
        "--trainer.max_steps=3",
        "--trainer.logger", str(CSV_CONFIG), f"--trainer.logger+={WANDB_CONFIG}",
        "--trainer.callbacks+=jointssl.callbacks.example_images.ExampleImageLogger",
        "--trainer.callbacks.every_n_steps=2",
        "--trainer.callbacks+=tests.test_wandb.StepRecorder", "--trainer.callbacks.path=steps.json",
    )
    experiment = offline_wandb / "exp"
    run_id = (experiment / RUN_ID_FILE).read_text().strip()
    (run_dir,) = run_dirs(experiment)
    assert run_dir.name.endswith(f"-{run_id}")
    assert run_id_from_checkpoint(experiment / "checkpoints" / "last.ckpt") == run_id
    records = inspect_run(run_dir)
    rows = history(records)

    # Every loss term and the learning rate at every step, equal to what the module computed and to the CSV log.
    step_rows = {int(row["trainer/global_step"]): row for row in rows if "train/loss" in row}
    assert sorted(step_rows) == [0, 1, 2]
    for row in step_rows.values():
        assert set(LOSS_TERMS) | {"train/lr"} <= set(row)
        assert math.isclose(
            row["train/loss"], row["train/loss_intra"] + row["train/loss_inter"] + row["train/loss_mask"],
            rel_tol=1e-5,
        )
    computed = {int(step): values for step, values in json.loads(Path("steps.json").read_text()).items()}
    for step, values in computed.items():
        assert step_rows[step]["train/loss"] == pytest.approx(values["train/loss"], rel=1e-6)
        assert step_rows[step]["train/lr"] == pytest.approx(values["train/lr"], rel=1e-6)
    with open(experiment / "logs" / "version_0" / "metrics.csv") as file:
        csv_rows = list(csv.DictReader(file))
    csv_steps = {int(row["step"]): row for row in csv_rows if row.get("train/loss")}
    for step, row in step_rows.items():
        for name in (*LOSS_TERMS, "train/lr"):
            assert row[name] == pytest.approx(float(csv_steps[step][name]), rel=1e-6), (step, name)

    # Prototype usage / assignment entropy / cluster sizes, logged at the epoch end, match the CSV log too.
    epoch_row = next(row for row in rows if "train/intra_prototypes_used" in row)
    csv_epoch = next(row for row in csv_rows if row.get("train/intra_prototypes_used"))
    cluster_metrics = [name for name in epoch_row if name.startswith("train/") and "cluster" in name]
    for name in (*EPOCH_METRICS, *cluster_metrics):
        assert epoch_row[name] == pytest.approx(float(csv_epoch[name]), rel=1e-6), name
    assert 0 < epoch_row["train/intra_prototypes_used"] <= 1

    # Example images at steps 0 and 2, stored as media files of the run.
    for key in ("examples/crops", "examples/volume_views", "examples/clusters"):
        logged = [row for row in rows if f"{key}._type" in row]
        assert [int(row["trainer/global_step"]) for row in logged] == [0, 2], key
        for row in logged:
            for name in row[f"{key}.filenames"]:
                assert (run_dir / "files" / name).stat().st_size > 0
    assert not (experiment / "example_images").exists()  # W&B attached: no PNG copies

    # The resolved config (every default filled in) and the versions, in the run and in config.yaml.
    config = config_updates(records)
    resolved = config["config"]
    assert resolved["model"]["init_args"]["backbone"] == "test_resnet"
    assert resolved["model"]["init_args"]["temperature"] == 0.1  # a default the user did not type
    assert resolved["trainer"]["max_steps"] == 3
    assert config["versions"]["torch"] == torch.__version__
    assert {"python", "lightning", "timm", "monai", "jointssl", "cuda"} <= set(config["versions"])
    saved = yaml.safe_load((experiment / "config.yaml").read_text())
    assert saved["model"] == resolved["model"]
    # The CSV logger has the same record in hparams.yaml.
    hparams = yaml.safe_load((experiment / "logs" / "version_0" / "hparams.yaml").read_text())
    assert hparams["versions"]["torch"] == torch.__version__


def test_resumed_fit_continues_the_same_run(offline_wandb: Path) -> None:
    fit("--trainer.max_steps=2", "--trainer.logger", str(WANDB_CONFIG))
    experiment = offline_wandb / "exp"
    run_id = (experiment / RUN_ID_FILE).read_text().strip()
    fit("--trainer.max_steps=4", "--trainer.logger", str(WANDB_CONFIG), "--ckpt_path", "last")

    assert (experiment / RUN_ID_FILE).read_text().strip() == run_id
    segments = run_dirs(experiment)
    assert len(segments) == 2 and all(path.name.endswith(f"-{run_id}") for path in segments)
    assert run_id_from_checkpoint(experiment / "checkpoints" / "last.ckpt") == run_id
    steps = []
    for segment in segments:
        records = inspect_run(segment)
        assert next(r for r in records if r["type"] == "run")["run"]["run_id"] == run_id
        steps.append(sorted(int(row["trainer/global_step"]) for row in history(records) if "train/loss" in row))
    # The second segment starts where the checkpoint left off: the run's loss curve is 0, 1, 2, 3 exactly once.
    assert steps == [[0, 1], [2, 3]]


def test_secrets_in_the_environment_reach_no_file_and_no_output(
    offline_wandb: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    secret = f"SECRET{secrets.token_hex(12)}"
    for variable in ("WANDB_API_KEY", "HF_TOKEN", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD",
                     "MY_SERVICE_API_KEY"):
        monkeypatch.setenv(variable, f"{secret}{variable}")
    # Positive control: a string the user typed into the config does reach the files the grep reads.
    typed = f"TYPED{secrets.token_hex(8)}"
    logger_config = offline_wandb / "wandb_logger.yaml"
    logger_config.write_text(
        WANDB_CONFIG.read_text().replace("tags: [pretrain]", f"tags: [pretrain]\n  notes: {typed}")
    )
    fit(
        "--trainer.max_steps=2",
        "--trainer.logger", str(CSV_CONFIG), f"--trainer.logger+={logger_config}",
        "--trainer.callbacks+=jointssl.callbacks.example_images.ExampleImageLogger",
        "--trainer.callbacks.every_n_steps=1",
    )
    output = capfd.readouterr()
    experiment = offline_wandb / "exp"
    (run_dir,) = run_dirs(experiment)
    assert any(record["type"] == "exit" for record in inspect_run(run_dir))  # the run is complete on disk
    (run_file,) = run_dir.glob("run-*.wandb")
    assert typed.encode() in run_file.read_bytes()
    assert typed in (experiment / "config.yaml").read_text()
    written = [path for path in offline_wandb.rglob("*") if path.is_file() and path != logger_config]
    assert {path.suffix for path in written} >= {".yaml", ".csv", ".wandb", ".ckpt", ".log", ".png"}
    leaks = [str(path) for path in written if secret.encode() in path.read_bytes()]
    assert leaks == []
    assert secret not in output.out and secret not in output.err


@pytest.mark.ddp
@pytest.mark.slow  # two Python processes importing torch + lightning + wandb: 12 s idle, 35-40 s on a busy machine
def test_ddp_run_has_one_wandb_run_created_by_rank_zero(offline_wandb: Path) -> None:
    """Two CPU ranks through the console script (Lightning re-executes it for rank 1, as srun starts each rank):
    one run folder, one recorded id, the id in the checkpoint. (tests/test_slurm.py checks the same under Slurm.)"""
    script = Path(sys.executable).parent / "jointssl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(script), "fit", "--config", "tiny.yaml", "--trainer.max_steps=2", "--trainer.devices=2",
         "--trainer.strategy=ddp", "--trainer.logger", str(WANDB_CONFIG)],
        cwd=offline_wandb, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    experiment = offline_wandb / "exp"
    run_id = (experiment / RUN_ID_FILE).read_text().strip()
    (run_dir,) = run_dirs(experiment)
    assert run_dir.name.endswith(f"-{run_id}")
    rows = [row for row in history(inspect_run(run_dir)) if "train/loss" in row]
    assert sorted(int(row["trainer/global_step"]) for row in rows) == [0, 1]
    assert run_id_from_checkpoint(experiment / "checkpoints" / "last.ckpt") == run_id


# ---------------------------------------------------------------------------------------------------------- units
def test_run_id_file_is_read_written_and_validated(tmp_path: Path) -> None:
    logger = ExperimentWandbLogger(save_dir=str(tmp_path / "a"), offline=True)
    assert logger.read_run_id() is None
    run_id = logger._resolve_run_id()
    assert (tmp_path / "a" / RUN_ID_FILE).read_text().strip() == run_id
    assert not list((tmp_path / "a").glob(".*tmp"))  # the atomic write left no temporary file
    # A second logger of the same directory (a restarted job) gets the recorded id, not the requested one.
    restarted = ExperimentWandbLogger(save_dir=str(tmp_path / "a"), run_id="other1", offline=True)
    assert restarted._resolve_run_id() == run_id
    fresh = ExperimentWandbLogger(save_dir=str(tmp_path / "b"), run_id="given1", offline=True)
    assert fresh._resolve_run_id() == "given1"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / RUN_ID_FILE).write_text("not an id/../\n")
    with pytest.raises(ValueError, match="not a W&B run id"):
        ExperimentWandbLogger(save_dir=str(tmp_path / "c"), offline=True).read_run_id()
    with pytest.raises(ValueError, match="log_model needs online mode"):
        ExperimentWandbLogger(offline=True, log_model=True)


def test_unbound_loggers_create_nothing_and_refuse_to_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for logger in (ExperimentWandbLogger(offline=True), ExperimentCSVLogger()):
        assert logger.experiment is None and logger.experiment_dir is None
        with pytest.raises(RuntimeError, match="does not know its experiment directory"):
            logger.log_metrics({"x": 1.0}, step=0)
    csv_logger = ExperimentCSVLogger()
    csv_logger.use_experiment_dir(tmp_path / "exp")
    csv_logger.log_metrics({"x": 1.0}, step=0)
    csv_logger.save()
    assert (tmp_path / "exp" / "logs" / "version_0" / "metrics.csv").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "exp"]  # nothing was written in the working directory


def test_redaction_and_versions_carry_no_secret() -> None:
    config = {"model": {"token_file": "/x", "num_tokens": 3},
              "logger": [{"init_args": {"api_key": "k", "notes": "n", "Password": "p"}}]}
    assert redact_secrets(config) == {
        "model": {"token_file": REDACTED, "num_tokens": 3},
        "logger": [{"init_args": {"api_key": REDACTED, "notes": "n", "Password": REDACTED}}],
    }
    versions = package_versions()
    assert versions["torch"] == torch.__version__ and versions["python"]
    assert all(value is None or isinstance(value, str) for value in versions.values())


def tiny_module() -> JointSSL:
    torch.manual_seed(0)
    return JointSSL(
        backbone="test_resnet", d_model=16, projection_hidden_dim=16, projection_dim=8, num_prototypes=[5],
        num_prototypes_3d=[3], aggregator_layers=1, aggregator_heads=2, aggregator_ffn_dim=16,
    )


def test_nearest_prototypes_leave_the_model_untouched() -> None:
    module = tiny_module().train()
    module.aggregator.eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in module.named_modules()}
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    images = torch.randn(6, 1, 32, 32)
    rng = torch.get_rng_state()
    assignments = nearest_prototypes(module, images)
    assert assignments.shape == (6,) and assignments.dtype == torch.long
    assert ((assignments >= 0) & (assignments < 5)).all()
    assert modes == {name: m.training for name, m in module.named_modules()}
    assert all(torch.equal(buffers[name], b) for name, b in module.named_buffers())  # BatchNorm statistics too
    assert torch.equal(rng, torch.get_rng_state())  # no random numbers drawn: training is unchanged
    # bf16-true training keeps bf16 weights while the loader delivers float32 crops.
    assert nearest_prototypes(module.to(torch.bfloat16), images).shape == (6,)


def test_montages_lay_out_crops_views_and_clusters() -> None:
    crops = [torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16), torch.randn(3, 1, 8, 8)]
    montage = crops_montage(crops)
    assert montage.dtype == np.uint8 and montage.shape == (3 * 18 + 2, 3 * 18 + 2, 3)

    views = torch.randn(2, 6, 1, 8, 8)
    real = torch.tensor([True, True, True, True, False, False])
    montage = volume_views_montage(views, real, max_slices=16)
    block = 2 * 10 + 2  # 4 real slices: 2 x 2 tiles of 8 px + padding
    assert montage.shape == (block, 2 * block + 6, 3)
    # The padded slices are not shown: the left block is view s's slices 0..3 only.
    assert montage[:, block:block + 6].max() == 0

    images = torch.rand(7, 1, 8, 8) + 0.1
    assignments = torch.tensor([2, 2, 2, 0, 0, 4, 2])
    grid, caption = cluster_grid(images, assignments, num_clusters=2, max_members=3)
    assert caption == "prototype 2: 4; prototype 0: 2"
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)
    # Row 2 holds prototype 0's two members and one blank tile.
    assert grid[12:20, 22:30].max() == 0 and grid[12:20, 2:10].max() > 0


def test_example_images_become_pngs_without_wandb(tmp_path: Path) -> None:
    callback = ExampleImageLogger(every_n_steps=5, max_images=4)
    module = tiny_module()
    batch = {
        "images": {"crops": [torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)], "index": torch.arange(4)},
        "volumes": {"views": torch.randn(1, 2, 4, 1, 16, 16), "padding_mask": torch.zeros(1, 4, dtype=torch.bool),
                    "index": torch.arange(1), "source": ["ct"]},
    }
    trainer = SimpleNamespace(is_global_zero=True, global_step=10, loggers=[], default_root_dir=str(tmp_path))
    callback.on_train_batch_start(trainer, module, batch, 0)
    callback.on_train_batch_start(trainer, module, batch, 1)  # the same step again (accumulation): once only
    trainer.global_step = 11
    callback.on_train_batch_start(trainer, module, batch, 2)  # off the interval
    names = sorted(path.name for path in (tmp_path / "example_images").iterdir())
    assert names == ["clusters_step0000010.png", "crops_step0000010.png", "volume_views_step0000010.png"]
