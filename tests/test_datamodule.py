"""JointDataModule, ImageDataset, collate_multicrop and synthetic data generation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from PIL import Image

from jointssl.data import (
    BadFileError,
    DataValidationError,
    ImageDataset,
    JointDataModule,
    MultiCropTransform,
    SyntheticData,
    collate_multicrop,
    discover_images,
    generate_synthetic_images,
    load_image_2d,
)
from jointssl.data.synthetic import COMPLETE_MARKER, IMAGE_CLASSES

CROP_SETTINGS = {"global_crop_size": 32, "local_crop_size": 16, "num_local_crops": 2}


def make_datamodule(root: Path, num_images: int = 32, batch_size: int = 8, **kwargs) -> JointDataModule:
    return JointDataModule(
        synthetic=SyntheticData(root=str(root), num_images=num_images, image_size=32),
        batch_size=batch_size,
        **{"num_workers": 0, **CROP_SETTINGS, **kwargs},
    )


def write_png(path: Path, size: tuple[int, int] = (24, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------------------


def test_batches_have_the_documented_structure_and_cover_the_epoch(tmp_path):
    torch.manual_seed(0)
    datamodule = make_datamodule(tmp_path, num_images=36, batch_size=8)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.dataset_size == datamodule.num_samples == 36

    loader = datamodule.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    seen = []
    for batch, _, _ in loader:
        assert set(batch) == {"images"}
        images = batch["images"]
        assert set(images) == {"crops", "index", "keys", "source"}
        assert images["keys"] == images["index"].tolist()  # the same indices as host ints
        assert [tuple(c.shape) for c in images["crops"]] == [(8, 1, 32, 32)] * 2 + [(8, 1, 16, 16)] * 2
        assert all(c.dtype == torch.float32 for c in images["crops"])
        assert images["index"].dtype == torch.long and images["index"].shape == (8,)
        assert images["source"] == ["images"] * 8
        seen.extend(images["index"].tolist())
    assert len(seen) == 32  # drop_last: 4 full batches of 8 out of 36
    assert len(set(seen)) == len(seen)
    assert all(0 <= i < 36 for i in seen)


def test_indices_are_global_positions_plus_offset(tmp_path):
    folder = tmp_path / "imgs"
    for i in range(3):
        write_png(folder / f"{i}.png")
    records = discover_images([folder])
    dataset = ImageDataset(records, MultiCropTransform(global_crop_size=16), index_offset=100)
    samples = [dataset[i] for i in range(3)]
    assert [s["index"] for s in samples] == [100, 101, 102]
    assert all(s["source"] == "imgs" for s in samples)
    batch = collate_multicrop(samples)
    assert batch["index"].tolist() == [100, 101, 102]
    assert [tuple(c.shape) for c in batch["crops"]] == [(3, 1, 16, 16)] * 2
    assert batch["source"] == ["imgs"] * 3


def test_collate_rejects_mismatched_crop_counts():
    crop = torch.zeros(1, 8, 8)
    with pytest.raises(ValueError, match="same number of crops"):
        collate_multicrop(
            [{"crops": [crop], "index": 0, "source": "a"}, {"crops": [crop, crop], "index": 1, "source": "a"}]
        )


def test_images_and_synthetic_sources_combine(tmp_path):
    for i in range(4):
        write_png(tmp_path / "real" / f"{i}.png")
    datamodule = JointDataModule(
        images=[str(tmp_path / "real")],
        synthetic=SyntheticData(root=str(tmp_path / "syn"), num_images=8, image_size=32),
        batch_size=4,
        num_workers=0,
        **CROP_SETTINGS,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.dataset_size == 12
    assert [r.source for r in datamodule.image_records] == ["real"] * 4 + ["images"] * 8


def test_worker_processes_deliver_the_same_structure(tmp_path):
    datamodule = make_datamodule(
        tmp_path, num_images=16, batch_size=4, num_workers=1, persistent_workers=False
    )
    datamodule.setup("fit")
    batch, _, _ = next(iter(datamodule.train_dataloader()))
    assert [tuple(c.shape) for c in batch["images"]["crops"]] == [(4, 1, 32, 32)] * 2 + [(4, 1, 16, 16)] * 2


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


def make_bad_folder(root: Path) -> tuple[list[Path], dict[Path, str]]:
    """A folder of 4 good images and one of each kind of bad file, with the expected reason for each."""
    good = [write_png(root / "good" / f"{i}.png") for i in range(4)]
    png = (root / "good" / "0.png").read_bytes()
    buffer = root / "tmp.jpg"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8) + 90).save(buffer)
    jpeg = buffer.read_bytes()
    buffer.unlink()
    bad = {
        root / "bad" / "empty.png": (b"", "empty file"),
        root / "bad" / "truncated.png": (png[: len(png) // 2], "cannot decode PNG"),
        root / "bad" / "truncated.jpg": (jpeg[: len(jpeg) // 2], "cannot decode JPEG"),
        root / "bad" / "random.png": (np.random.default_rng(2).bytes(300), "not a PNG file"),
        root / "bad" / "notes.txt": (b"not an image", "unsupported file type"),
        root / "bad" / "scan.tif": (b"II*\x00" + bytes(64), "unsupported file type"),
    }
    for path, (content, _) in bad.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    tiny = write_png(root / "bad" / "tiny.png", size=(6, 6))
    reasons = {path: reason for path, (_, reason) in bad.items()} | {tiny: "6x6 pixels"}
    return good, reasons


def test_setup_lists_every_bad_file_before_training(tmp_path):
    _, reasons = make_bad_folder(tmp_path / "data")
    datamodule = JointDataModule(
        images=[str(tmp_path / "data")], batch_size=2, num_workers=0, **CROP_SETTINGS
    )
    with pytest.raises(DataValidationError) as raised:
        datamodule.setup("fit")
    found = {e.path: e.reason for e in raised.value.errors}
    assert set(found) == {str(p) for p in reasons}
    for path, reason in reasons.items():
        assert reason in found[str(path)]
        assert str(path) in str(raised.value)


def test_setup_skips_bad_files_and_logs_each(tmp_path, caplog):
    good, reasons = make_bad_folder(tmp_path / "data")
    datamodule = JointDataModule(
        images=[str(tmp_path / "data")], batch_size=2, num_workers=0, on_bad_file="skip", **CROP_SETTINGS
    )
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        datamodule.setup("fit")
    assert sorted(r.path for r in datamodule.image_records) == sorted(str(p) for p in good)
    assert datamodule.num_samples == 4
    skipped = [r for r in caplog.records if r.name == "jointssl.data" and r.levelno == logging.WARNING]
    for path, reason in reasons.items():
        assert any(str(path) in r.getMessage() and reason in r.getMessage() for r in skipped)


def test_file_broken_after_validation_raises_naming_the_file(tmp_path):
    datamodule = make_datamodule(tmp_path, num_images=8, batch_size=8)
    datamodule.setup("fit")
    victim = Path(datamodule.image_records[3].path)
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(BadFileError) as raised:
        datamodule.image_dataset[3]
    assert raised.value.path == str(victim)
    # From a worker process, PyTorch re-raises as RuntimeError when the exception type needs two arguments;
    # the message still names the file and the reason.
    datamodule.num_workers, datamodule.persistent_workers = 1, False
    with pytest.raises((BadFileError, RuntimeError), match="BadFileError") as raised:
        for _ in datamodule.train_dataloader():
            pass
    assert str(victim) in str(raised.value) and "cannot decode PNG" in str(raised.value)


def test_no_sources_too_few_images_and_not_set_up(tmp_path):
    with pytest.raises(ValueError, match="no data sources"):
        JointDataModule(num_workers=0).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable 2D images"):
        JointDataModule(images=[str(tmp_path / "empty")], num_workers=0).setup("fit")
    with pytest.raises(ValueError, match="fewer than batch_size"):
        make_datamodule(tmp_path / "few", num_images=6, batch_size=8).setup("fit")
    with pytest.raises(RuntimeError, match="setup"):
        _ = make_datamodule(tmp_path / "x").num_samples


def test_invalid_configuration_fails_at_construction():
    with pytest.raises(ValueError, match="on_bad_file"):
        JointDataModule(on_bad_file="ignore")
    with pytest.raises(ValueError, match="global_crop_scale"):
        JointDataModule(global_crop_scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="batch_size"):
        JointDataModule(batch_size=0)


# ------------------------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------------------------


def test_synthetic_generation_is_idempotent_and_loadable(tmp_path):
    spec = SyntheticData(root=str(tmp_path / "demo"), num_images=24, image_size=32, seed=5)
    images_dir = generate_synthetic_images(spec)
    files = sorted(images_dir.rglob("*.png"))
    assert len(files) == 24
    assert {f.parent.name for f in files} == set(IMAGE_CLASSES)
    modes = {Image.open(f).mode for f in files}
    assert "L" in modes and any(m.startswith("I") for m in modes)  # 8-bit and 16-bit files
    for f in files:
        image = load_image_2d(f)
        assert image.shape == (32, 32) and 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.2
    stamps = {f: f.stat().st_mtime_ns for f in files}
    contents = {f: f.read_bytes() for f in files}

    assert generate_synthetic_images(spec) == images_dir
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # not rewritten
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["images"]  # no staging folders left

    # Same spec elsewhere gives the same bytes; another spec replaces the old generation.
    other = generate_synthetic_images(
        SyntheticData(root=str(tmp_path / "again"), num_images=24, image_size=32, seed=5)
    )
    assert all((other / f.relative_to(images_dir)).read_bytes() == contents[f] for f in files)
    generate_synthetic_images(SyntheticData(root=str(tmp_path / "demo"), num_images=8, image_size=32, seed=5))
    assert len(list(images_dir.rglob("*.png"))) == 8


def test_synthetic_generation_never_overwrites_foreign_data(tmp_path):
    write_png(tmp_path / "demo" / "images" / "mine.png")
    with pytest.raises(FileExistsError, match=COMPLETE_MARKER):
        generate_synthetic_images(SyntheticData(root=str(tmp_path / "demo"), num_images=4, image_size=32))
    assert (tmp_path / "demo" / "images" / "mine.png").exists()


# ------------------------------------------------------------------------------------------------------------
# Two-rank DDP: Lightning shards the images disjointly and reshuffles every epoch
# ------------------------------------------------------------------------------------------------------------


class IndexRecorder(pl.LightningModule):
    """Trains a one-weight model and writes the global indices each rank saw per epoch to JSON files."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.extend(batch["images"]["index"].tolist())
        return (batch["images"]["crops"][0].mean() * self.weight).sum()

    def on_train_epoch_end(self):
        path = Path(self.out_dir) / f"rank{self.global_rank}_epoch{self.current_epoch}.json"
        path.write_text(json.dumps(self.seen))
        self.seen = []

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.ddp
def test_two_ranks_get_disjoint_shards_reshuffled_each_epoch(tmp_path):
    num_images, batch_size = 32, 4
    out_dir = tmp_path / "indices"
    out_dir.mkdir()
    # Two bad files that the ranks' validation shards find separately: both ranks must drop both.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a_empty.png").write_bytes(b"")
    (bad / "b_text.txt").write_text("not an image")
    datamodule = make_datamodule(
        tmp_path / "data",
        num_images=num_images,
        batch_size=batch_size,
        num_local_crops=0,
        images=[str(bad)],
        on_bad_file="skip",
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(IndexRecorder(str(out_dir)), datamodule=datamodule)

    seen = {
        (r, e): json.loads((out_dir / f"rank{r}_epoch{e}.json").read_text()) for r in (0, 1) for e in (0, 1)
    }
    for epoch in (0, 1):
        rank0, rank1 = seen[(0, epoch)], seen[(1, epoch)]
        assert len(rank0) == len(rank1) == num_images // 2  # each rank: its half, in full batches
        assert len(set(rank0)) == len(rank0) and len(set(rank1)) == len(rank1)
        assert not set(rank0) & set(rank1)  # disjoint shards
        assert set(rank0) | set(rank1) == set(range(num_images))
    for rank in (0, 1):
        assert set(seen[(rank, 0)]) != set(seen[(rank, 1)])  # set_epoch reshuffled the shards
