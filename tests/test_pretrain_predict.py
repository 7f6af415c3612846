"""`jointssl predict` on a pretraining config and checkpoint: one row per 2D image and per volume in
predictions/embeddings.safetensors and predictions/assignments.csv, equal to what the checkpoint's encoders
compute for the un-augmented inputs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning.pytorch import Trainer

from jointssl.cli import main
from jointssl.data import JointDataModule, SyntheticData
from jointssl.data.prediction_inputs import PredictionVolumes, collate_predictions
from jointssl.data.prediction_inputs import preprocess_image
from jointssl.pretrain import JointSSL
from tests.downstream_fixtures import TINY_PRETRAIN

DATA = {
    "synthetic": {"root": "data", "num_images": 12, "image_size": 40, "num_volumes": 4, "volume_shape": [40, 40, 7]},
    "batch_size": 5, "volume_batch_size": 2, "num_workers": 0, "global_crop_size": 32, "local_crop_size": 16,
    "num_slices": 6, "volume_size": 32, "volume_in_plane_size": 40,
}


@pytest.mark.parametrize("method", ["swav", "deepcluster"])
def test_predict_writes_one_embedding_and_assignment_per_image_and_volume(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": "exp", "max_steps": 1},
        "model": {"class_path": "jointssl.pretrain.JointSSL",
                  "init_args": {**TINY_PRETRAIN, "method": method, "warmup_epochs": 0}},
        "data": {"class_path": "jointssl.data.JointDataModule", "init_args": DATA},
    }
    Path("pretrain.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", "pretrain.yaml"])
    (checkpoint,) = Path("exp").rglob("*.ckpt")
    main(["predict", "--config", "pretrain.yaml", "--ckpt_path", str(checkpoint)])

    embeddings = load_file("exp/predictions/embeddings.safetensors")["embeddings"]
    with open("exp/predictions/assignments.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    data = JointDataModule(**{**DATA, "synthetic": SyntheticData(**DATA["synthetic"])})
    data.setup("predict")
    images, volumes = [r.path for r in data.image_records], [r.path for r in data.volume_records]
    assert [(r["path"], r["kind"]) for r in rows] == [(p, "image") for p in images] + [(p, "volume") for p in volumes]
    assert embeddings.shape == (len(images) + len(volumes), TINY_PRETRAIN["d_model"])

    model = JointSSL.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    with torch.no_grad():
        image_features = model.encoder(torch.stack([preprocess_image(p, DATA["global_crop_size"]) for p in images]))
        batch = collate_predictions([PredictionVolumes(data.volume_dataset.volumes, 32)[i] for i in range(4)])
        volume_features = model.volume_encoder(batch["slices"], batch["padding_mask"])
    torch.testing.assert_close(embeddings, torch.cat([image_features, volume_features]), rtol=1e-4, atol=1e-5)
    clusters = [int(r["cluster"]) for r in rows]
    assert clusters == model.intra.assign(image_features).tolist() + model.inter.assign(volume_features).tolist()
    assert all(0 <= c < TINY_PRETRAIN["num_prototypes"][0] for c in clusters[: len(images)])
    assert all(0 <= c < TINY_PRETRAIN["num_prototypes_3d"][0] for c in clusters[len(images):])


def test_two_ddp_ranks_predict_what_one_process_predicts(tmp_path: Path) -> None:
    """13 images over 2 ranks: the distributed sampler pads one rank's shard with a repeat, written once."""
    synthetic = SyntheticData(**{**DATA["synthetic"], "root": str(tmp_path / "data"), "num_images": 13})
    torch.manual_seed(0)
    model = JointSSL(**TINY_PRETRAIN, warmup_epochs=0)
    outputs = {}
    for devices in (1, 2):
        root = tmp_path / f"devices{devices}"
        trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices == 2 else "auto",
                          default_root_dir=root, logger=False, enable_progress_bar=False)
        trainer.predict(model, datamodule=JointDataModule(**{**DATA, "synthetic": synthetic}), return_predictions=False)
        with open(root / "predictions" / "assignments.csv", newline="") as handle:
            rows = [(r["path"], r["kind"], r["cluster"]) for r in csv.DictReader(handle)]
        outputs[devices] = rows, load_file(root / "predictions" / "embeddings.safetensors")["embeddings"]
    assert len(outputs[1][0]) == 13 + 4
    assert outputs[2][0] == outputs[1][0]
    torch.testing.assert_close(outputs[2][1], outputs[1][1], rtol=1e-4, atol=1e-5)
