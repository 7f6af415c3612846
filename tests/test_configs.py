"""Every YAML under configs/ parses and instantiates (model, data module, trainer) through the real CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from jointssl.cli import JointSSLCLI
from jointssl.cli import main as cli_main
from tests.conftest import REPO_ROOT

CONFIGS = sorted(p for p in (REPO_ROOT / "configs").rglob("*.yaml") if "trainer" not in p.parts and "logger" not in p.parts)


def instantiate(*args: str) -> JointSSLCLI:
    return JointSSLCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=list(args),
    )


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_config_instantiates(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # configs write runs/... relative to the working directory
    args = ["--config", str(config), "--trainer.logger=false"]
    if "init_from:" in config.read_text():
        args.append("--model.init_args.init_from=null")  # the previous stage's checkpoint does not exist here
    cli = instantiate(*args)
    assert isinstance(cli.model, LightningModule)
    assert isinstance(cli.datamodule, LightningDataModule)
    assert isinstance(cli.trainer, Trainer)


def test_command_line_overrides_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = instantiate(
        "--config", str(REPO_ROOT / "configs" / "demo.yaml"),
        "--model.init_args.temperature=0.2",
        "--data.init_args.batch_size=8",
    )
    assert cli.model.hparams.temperature == 0.2
    assert cli.datamodule.batch_size == 8


TRAINER_FRAGMENTS = sorted((REPO_ROOT / "configs" / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("fragment", TRAINER_FRAGMENTS, ids=lambda p: p.name)
def test_trainer_fragment_combines_with_a_pretraining_config(fragment: Path, tmp_path: Path, monkeypatch) -> None:
    """`--trainer configs/trainer/X.yaml` merges into a full config. GPU-only settings are overridden by the CPU
    values the fragment's own comments give, so every other key of the fragment is still instantiated here."""
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(REPO_ROOT / "configs" / "demo.yaml"), "--trainer", str(fragment), "--trainer.logger=false"]
    text = fragment.read_text()
    if "accelerator: gpu" in text:
        args += ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
                 "--trainer.sync_batchnorm=false"]
    if "SLURMEnvironment" in text:
        # What srun gives a one-task job step; outside such a step the environment plugin cannot start.
        for name, value in {"SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1",
                            "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "test",
                            "SLURM_NODELIST": "127.0.0.1"}.items():
            monkeypatch.setenv(name, value)
    cli = instantiate(*args)
    assert isinstance(cli.trainer, Trainer)
    assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    if "strategy: ddp" in text:
        assert cli.trainer.strategy.__class__.__name__ == "DDPStrategy"


DOWNSTREAM_CONFIGS = sorted((REPO_ROOT / "configs" / "downstream").glob("*.yaml"))
#: The prediction writer each downstream task's outputs need (contract: one writer per task).
DOWNSTREAM_WRITERS = {"ImageClassifier": "ClassificationWriter", "VolumeClassifier": "ClassificationWriter",
                      "SliceSegmenter": "SegmentationWriter", "NoduleDetector": "DetectionWriter"}


@pytest.mark.parametrize("config", DOWNSTREAM_CONFIGS, ids=lambda p: p.stem)
def test_downstream_configs_write_predictions_also_with_the_cpu_fragment(config: Path, tmp_path, monkeypatch) -> None:
    """Every downstream recipe lists its task's prediction writer, and `--trainer configs/trainer/cpu.yaml` (which
    sets trainer keys only) keeps it, next to the checkpoint callback."""
    from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint

    monkeypatch.chdir(tmp_path)
    cli = instantiate("--config", str(config), "--trainer", str(REPO_ROOT / "configs" / "trainer" / "cpu.yaml"),
                      "--trainer.logger=false")
    writers = [c for c in cli.trainer.callbacks if isinstance(c, BasePredictionWriter)]
    assert [type(w).__name__ for w in writers] == [DOWNSTREAM_WRITERS[type(cli.model).__name__]]
    assert any(isinstance(c, ModelCheckpoint) for c in cli.trainer.callbacks)
    assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"


def test_gpu_fragment_asks_for_what_the_issue_promises() -> None:
    import yaml

    gpu = yaml.safe_load((REPO_ROOT / "configs" / "trainer" / "gpu.yaml").read_text())
    assert gpu == {"accelerator": "gpu", "devices": -1, "strategy": "ddp", "sync_batchnorm": True,
                   "precision": "bf16-mixed"}


@pytest.mark.parametrize("option", ["--optimizer=torch.optim.SGD", "--lr_scheduler=torch.optim.lr_scheduler.StepLR"])
def test_lightningclis_automatic_optimizers_are_refused(option: str, tmp_path: Path, monkeypatch, capsys) -> None:
    # They would silently replace LARS and the learning-rate scaling of the module's own configure_optimizers.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(REPO_ROOT / "configs" / "demo.yaml"), option])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """configs/demo.yaml for 2 steps on a small generated set, with the experiment directory moved elsewhere:
    (working directory, experiment directory)."""
    root = tmp_path_factory.mktemp("demo_run")
    workdir, experiment = root / "cwd", root / "elsewhere" / "exp"
    workdir.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        cli_main([
            "fit", "--config", str(REPO_ROOT / "configs" / "demo.yaml"), f"--trainer.default_root_dir={experiment}",
            "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--data.init_args.synthetic.num_images=32", "--data.init_args.synthetic.num_volumes=8",
            "--data.init_args.num_workers=0", "--model.init_args.queue_length_3d=0",
        ])
    return workdir, experiment


def test_demo_writes_every_file_under_default_root_dir(demo_run: tuple[Path, Path]) -> None:
    # One experiment = one directory: --trainer.default_root_dir moves config, logs and checkpoints together.
    workdir, experiment = demo_run
    assert sorted(p.name for p in workdir.iterdir()) == ["demo_data"]  # the generated data only, no runs/
    written = {str(p.relative_to(experiment)) for p in experiment.rglob("*") if p.is_file()}
    assert {"config.yaml", "checkpoints/last.ckpt", "logs/version_0/metrics.csv"} <= written, written


def test_readmes_timm_snippet_loads_a_fresh_demo_export(demo_run: tuple[Path, Path], tmp_path: Path) -> None:
    # The README's code, verbatim, against `jointssl export` of the demo (resnet10t, not the recipes' resnet50).
    _, experiment = demo_run
    cli_main(["export", "--checkpoint", str(experiment / "checkpoints" / "last.ckpt"),
              "--output", str(tmp_path / "exported")])
    readme = (REPO_ROOT / "README.md").read_text()
    snippets = [block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "timm.create_model" in block]
    assert len(snippets) == 1, "the README should hold one timm snippet"
    result = subprocess.run([sys.executable, "-c", snippets[0] + "\nprint(type(backbone).__name__)"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ResNet"


PRETRAIN_CONFIGS = sorted((REPO_ROOT / "configs" / "pretrain").glob("*.yaml"))


def one_step_overrides(config: Path, experiment: Path, data_root: Path) -> list[str]:
    """Shrink a shipped pretraining config to one CPU step on generated data, keeping its trainer, logger,
    callbacks and checkpoint settings (what decides where files go) as they are."""
    import yaml

    shipped = yaml.safe_load(config.read_text())
    model, data = shipped["model"]["init_args"], shipped["data"]["init_args"]
    heads, heads_3d = len(model.get("num_prototypes", [0])), len(model.get("num_prototypes_3d", [0]))
    with_volumes = bool(data.get("volumes"))
    return [
        f"--trainer.default_root_dir={experiment}", "--trainer.max_steps=1", "--trainer.precision=32-true",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--model.init_args.backbone=resnet10t", "--model.init_args.d_model=32", "--model.init_args.init_from=null",
        f"--model.init_args.num_prototypes=[{', '.join(['4'] * heads)}]",
        f"--model.init_args.num_prototypes_3d=[{', '.join(['2'] * heads_3d)}]",
        "--model.init_args.queue_length=0", "--model.init_args.queue_length_3d=0",
        "--model.init_args.checkpoint_slices=false",
        "--data.init_args.images=[]", "--data.init_args.volumes=[]",
        f"--data.init_args.synthetic.root={data_root}", "--data.init_args.synthetic.num_images=8",
        "--data.init_args.synthetic.image_size=32",
        f"--data.init_args.synthetic.num_volumes={2 if with_volumes else 0}",
        "--data.init_args.synthetic.volume_shape=[32, 32, 8]",
        "--data.init_args.batch_size=4", "--data.init_args.volume_batch_size=2", "--data.init_args.num_workers=0",
        "--data.init_args.global_crop_size=32", "--data.init_args.local_crop_size=16",
        "--data.init_args.num_local_crops=2", "--data.init_args.num_slices=8", "--data.init_args.volume_size=32",
        "--data.init_args.volume_in_plane_size=32",
    ]


@pytest.mark.parametrize("config", PRETRAIN_CONFIGS, ids=lambda p: p.stem)
def test_pretraining_config_writes_only_under_default_root_dir(config: Path, tmp_path: Path, monkeypatch) -> None:
    """One step of each shipped recipe with the experiment directory moved elsewhere: config, logs, checkpoints
    and the volume cache all land in it, and nothing in the working directory."""
    workdir, experiment, data_root = tmp_path / "cwd", tmp_path / "elsewhere" / "exp", tmp_path / "data"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    cli_main(["fit", "--config", str(config), *one_step_overrides(config, experiment, data_root)])
    assert list(workdir.iterdir()) == []
    written = {str(p.relative_to(experiment)) for p in experiment.rglob("*") if p.is_file()}
    assert {"config.yaml", "checkpoints/last.ckpt", "logs/version_0/metrics.csv"} <= written, written
    outside = {p for p in tmp_path.rglob("*") if p.is_file()} - {p for p in experiment.rglob("*")}
    assert all(data_root in p.parents for p in outside), sorted(outside)  # only the generated data


def test_staged_chains_hand_on_to_their_own_previous_stage() -> None:
    # Each stage starts from the last.ckpt of the previous stage of the same method, in its own directory.
    import yaml

    def load(name: str) -> dict:
        return yaml.safe_load((REPO_ROOT / "configs" / "pretrain" / f"{name}.yaml").read_text())

    for method in ("swav", "deepcluster"):
        chain = [load(f"stage1_2d_{method}"), load(f"stage2_mask_{method}"), load(f"stage3_inter_{method}")]
        for previous, stage in zip(chain, chain[1:]):
            expected = f"{previous['trainer']['default_root_dir']}/checkpoints/last.ckpt"
            assert stage["model"]["init_args"]["init_from"] == expected
        assert {stage["model"]["init_args"]["method"] for stage in chain} == {method}
    roots = [yaml.safe_load(p.read_text())["trainer"]["default_root_dir"] for p in PRETRAIN_CONFIGS]
    assert len(set(roots)) == len(roots), "two recipes share an experiment directory"
