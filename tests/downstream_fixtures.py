"""Shared fixtures and helpers of the downstream tests: a tiny JointSSL pretraining checkpoint, built once per
session, and the check that a validation run left its pictures.

Registered in tests/conftest.py (`pytest_plugins`): a test takes ``pretrained_checkpoint: Path`` as an argument.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch import Trainer, seed_everything
from PIL import Image

from jointssl.data import JointDataModule, SyntheticData
from jointssl.pretrain import JointSSL

#: Architecture of the tiny pretraining model (f_intra: timm `test_resnet`, f_inter: one layer).
TINY_PRETRAIN = {
    "backbone": "test_resnet",
    "d_model": 32,
    "projection_hidden_dim": 32,
    "projection_dim": 16,
    "num_prototypes": [8],
    "num_prototypes_3d": [4],
    "aggregator_layers": 1,
    "aggregator_heads": 4,
    "aggregator_ffn_dim": 32,
}


def make_pretrained_checkpoint(folder: Path) -> Path:
    """Pretrain the tiny joint model for one step on synthetic 2D + 3D data; return the saved ``.ckpt``.

    One optimizer step moves the weights and the BatchNorm statistics away from their initial values, so a test
    that compares loaded tensors with the checkpoint's cannot pass by loading nothing.
    """
    seed_everything(0, workers=True)
    model = JointSSL(**TINY_PRETRAIN, warmup_epochs=0)
    data = JointDataModule(
        synthetic=SyntheticData(
            root=str(folder / "data"), num_images=32, image_size=40, num_volumes=8, volume_shape=(40, 40, 10)
        ),
        batch_size=8,
        num_workers=0,
        global_crop_size=32,
        local_crop_size=16,
        num_slices=6,
        volume_size=32,
        volume_batch_size=2,
        volume_in_plane_size=40,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        default_root_dir=folder,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    path = folder / "pretrain.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def pretrained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny JointSSL checkpoint (``encoder.*``, ``aggregator.*``, hyper-parameters, format version)."""
    return make_pretrained_checkpoint(tmp_path_factory.mktemp("pretrained"))



def saved_figures(root: Path, name: str) -> list[Path]:
    """The PNG files of figure ``name`` that a run with ``default_root_dir=root`` and no W&B logger saved
    (``<root>/checkpoints/figures/<name>_epoch<NNN>.png``), each checked to be an image with something drawn on
    it (not a single colour)."""
    files = sorted((root / "checkpoints" / "figures").glob(f"{name}_epoch*.png"))
    for path in files:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32)
        assert min(pixels.shape) >= 100 and pixels.std() > 1.0, path
    return files
