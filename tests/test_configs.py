"""Every YAML under configs/ parses and instantiates (model, data module, trainer) through the real CLI."""

from __future__ import annotations

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
