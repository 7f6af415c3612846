"""Every YAML under configs/ parses and instantiates (model, data module, trainer) through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from jointssl.cli import JointSSLCLI
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
