"""JointDataModule with 3D volumes: the two streams, the global index layout, synthetic volumes, real data, bad
volumes, caching and two-rank sharding."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pytest
import torch

from jointssl.data import (
    BadFileError,
    CachedVolumes,
    DataValidationError,
    JointDataModule,
    SliceDataset,
    SyntheticData,
    VolumeRecord,
    generate_synthetic_data,
    generate_synthetic_volumes,
    load_volume,
    volume_io,
)
from jointssl.data.synthetic import COMPLETE_MARKER, VOLUME_CLASSES
from jointssl.data.volume_io import read_volume
from tests.conftest import shared_path
from tests.test_volume_io import ct_like, write_nifti

VOLUME_SHAPE = (40, 40, 12)  # H, W, D: 12 axial slices of 40 x 40
SMALL = {
    "batch_size": 4,
    "volume_batch_size": 2,
    "num_workers": 0,
    "global_crop_size": 16,
    "num_local_crops": 0,
    "num_slices": 8,
    "volume_size": 16,
    "volume_in_plane_size": 20,
    "validation_threads": 2,
}


def synthetic(root: Path, num_images: int = 12, num_volumes: int = 4) -> SyntheticData:
    return SyntheticData(
        root=str(root),
        num_images=num_images,
        image_size=32,
        num_volumes=num_volumes,
        volume_shape=VOLUME_SHAPE,
    )


def make_datamodule(root: Path, num_images: int = 12, num_volumes: int = 4, **kwargs) -> JointDataModule:
    return JointDataModule(synthetic=synthetic(root, num_images, num_volumes), **{**SMALL, **kwargs})


@pytest.fixture
def decode_calls(monkeypatch) -> list[str]:
    """Paths passed to the volume decoder, in call order."""
    calls: list[str] = []
    original = volume_io._decode

    def counting_decode(path, *args, **kwargs):
        calls.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(volume_io, "_decode", counting_decode)
    return calls


def check_image_batch(images: dict, batch_size: int = 4, crop_size: int = 16) -> None:
    assert set(images) == {"crops", "index", "keys", "source"}
    assert images["keys"] == images["index"].tolist()  # the same indices as host ints
    assert [tuple(c.shape) for c in images["crops"]] == [(batch_size, 1, crop_size, crop_size)] * 2
    assert all(c.dtype == torch.float32 for c in images["crops"])
    assert images["index"].dtype == torch.long and images["index"].shape == (batch_size,)
    assert len(images["source"]) == batch_size


def check_volume_batch(volumes: dict, batch_size: int = 2, num_slices: int = 8, size: int = 16) -> None:
    assert set(volumes) == {"views", "padding_mask", "index", "keys", "source"}
    assert volumes["keys"] == volumes["index"].tolist()
    assert volumes["views"].shape == (batch_size, 2, num_slices, 1, size, size)
    assert volumes["views"].dtype == torch.float32 and torch.isfinite(volumes["views"]).all()
    assert volumes["padding_mask"].shape == (batch_size, num_slices)
    assert volumes["padding_mask"].dtype == torch.bool
    assert volumes["index"].dtype == torch.long and volumes["index"].shape == (batch_size,)
    assert len(volumes["source"]) == batch_size


# ------------------------------------------------------------------------------------------------------------
# Streams and the global index layout
# ------------------------------------------------------------------------------------------------------------


def test_both_streams_and_the_global_index_layout(tmp_path):
    torch.manual_seed(0)
    datamodule = make_datamodule(tmp_path, slice_stride=3)
    datamodule.prepare_data()
    datamodule.setup("fit")
    # 12 images; 4 volumes x ceil(12 / 3) = 16 slices; 4 volumes.
    assert datamodule.image_index_range == range(12)
    assert datamodule.slice_index_range == range(12, 28)
    assert datamodule.volume_index_range == range(28, 32)
    assert datamodule.num_samples == 32 and datamodule.num_volumes == 4 and datamodule.dataset_size == 12
    assert len(datamodule.volume_records) == 4

    image_indices: list[int] = []
    volume_indices: list[int] = []
    for batch, _, _ in datamodule.train_dataloader():
        assert set(batch) == {"images", "volumes"}
        check_image_batch(batch["images"])
        for index, source in zip(batch["images"]["index"].tolist(), batch["images"]["source"]):
            assert source == (
                "images" if index < 12 else "volumes"
            )  # the slice stream's source is the folder's
        image_indices.extend(batch["images"]["index"].tolist())
        check_volume_batch(batch["volumes"])
        assert not batch["volumes"]["padding_mask"].any()  # 12 slices >= N = 8
        assert batch["volumes"]["source"] == ["volumes"] * 2
        volume_indices.extend(batch["volumes"]["index"].tolist())
    # An epoch is one pass over the longer 2D stream (28 samples = 7 batches); the volume stream cycles.
    assert sorted(image_indices) == list(range(28))
    assert len(volume_indices) == 14 and set(volume_indices) == set(range(28, 32))
    assert sorted(volume_indices[:4]) == list(range(28, 32))  # each pass over the volumes is a permutation
    assert not set(image_indices) & set(volume_indices)


def test_slice_samples_have_the_image_format_and_show_the_chosen_slices(tmp_path):
    datamodule = make_datamodule(tmp_path, slice_stride=3)
    datamodule.setup("fit")
    image_sample, slice_sample = datamodule.image_stream[0], datamodule.image_stream[12]
    assert set(slice_sample) == set(image_sample) == {"crops", "index", "source"}
    assert [c.shape for c in slice_sample["crops"]] == [c.shape for c in image_sample["crops"]]
    assert slice_sample["index"] == 12 and slice_sample["source"] == "volumes"

    slices = datamodule.slice_dataset.base
    # Every 3rd of 12 slices, centred: 1, 4, 7, 10 of each volume, volume by volume.
    assert [slices.locate(p) for p in range(16)] == [(v, s) for v in range(4) for s in (1, 4, 7, 10)]
    cached = datamodule.volume_dataset.volumes
    for position in (0, 5, 15):
        volume_position, slice_index = slices.locate(position)
        torch.testing.assert_close(
            slices[position]["image"][0], cached[volume_position]["volume"][slice_index]
        )
        assert slices[position]["index"] == 12 + position


def test_stride_and_slice_stream_set_the_mix(tmp_path):
    every_slice = make_datamodule(tmp_path, slice_stride=1)
    every_slice.setup("fit")
    assert len(every_slice.slice_index_range) == 4 * 12
    no_slices = make_datamodule(tmp_path, slice_stream=False)
    no_slices.setup("fit")
    assert no_slices.slice_index_range == range(12, 12) and no_slices.volume_index_range == range(12, 16)
    assert no_slices.slice_dataset is None
    batch, _, _ = next(iter(no_slices.train_dataloader()))
    assert batch["images"]["source"] == ["images"] * 4


def test_volumes_only(tmp_path):
    with_slices = make_datamodule(tmp_path, num_images=0, slice_stride=2)
    with_slices.setup("fit")
    assert with_slices.image_index_range == range(0) and with_slices.image_records == []
    assert with_slices.slice_index_range == range(24) and with_slices.volume_index_range == range(24, 28)
    batch, _, _ = next(iter(with_slices.train_dataloader()))
    assert set(batch) == {"images", "volumes"} and batch["images"]["source"] == ["volumes"] * 4

    volumes_only = make_datamodule(tmp_path, num_images=0, slice_stream=False)
    volumes_only.setup("fit")
    assert volumes_only.num_samples == 4 and volumes_only.volume_index_range == range(4)
    batches = [batch for batch, _, _ in volumes_only.train_dataloader()]
    assert len(batches) == 2 and all(set(batch) == {"volumes"} for batch in batches)
    assert sorted(i for batch in batches for i in batch["volumes"]["index"].tolist()) == [0, 1, 2, 3]


def test_short_volumes_are_padded_at_the_end(tmp_path):
    datamodule = make_datamodule(tmp_path, num_images=0, slice_stream=False, num_slices=16)
    datamodule.setup("fit")
    sample = datamodule.volume_dataset[0]
    assert sample["padding_mask"].tolist() == [False] * 12 + [True] * 4
    assert torch.all(sample["views"][:, 12:] == 0)
    batch, _, _ = next(iter(datamodule.train_dataloader()))
    check_volume_batch(batch["volumes"], num_slices=16)
    assert (
        batch["volumes"]["padding_mask"][:, 12:].all() and not batch["volumes"]["padding_mask"][:, :12].any()
    )


def test_worker_processes_deliver_both_streams(tmp_path):
    datamodule = make_datamodule(tmp_path, num_workers=1, persistent_workers=False, slice_stride=4)
    datamodule.setup("fit")
    batch, _, _ = next(iter(datamodule.train_dataloader()))
    check_image_batch(batch["images"])
    check_volume_batch(batch["volumes"])


def test_manifest_modality_overrides_the_setting(tmp_path):
    generate_synthetic_volumes(synthetic(tmp_path / "syn", num_images=0, num_volumes=4))
    ct_file = next((tmp_path / "syn" / "volumes" / "ct_large_spheres").glob("*.nii.gz"))
    mr_file = next((tmp_path / "syn" / "volumes" / "mr_large_spheres").glob("*.nii.gz"))
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "modality"])
        writer.writerows([[str(ct_file), "MR"], [str(mr_file), ""]])
    datamodule = JointDataModule(
        volumes=[str(manifest)], volume_modality="ct", **{**SMALL, "volume_batch_size": 1}
    )
    datamodule.setup("fit")
    cached = datamodule.volume_dataset.volumes
    assert [cached[i]["modality"] for i in range(2)] == ["mr", "ct"]
    assert [r.source for r in datamodule.volume_records] == ["manifest", "manifest"]  # the manifest's stem


# ------------------------------------------------------------------------------------------------------------
# Caching: validation decodes each volume once, training reuses it
# ------------------------------------------------------------------------------------------------------------


def test_memory_cache_validation_decodes_each_volume_once(tmp_path, decode_calls):
    datamodule = make_datamodule(tmp_path, slice_stride=2)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert sorted(decode_calls) == sorted(r.path for r in datamodule.volume_records)
    for _ in datamodule.train_dataloader():
        pass
    assert len(decode_calls) == 4


def test_disk_cache_is_filled_by_validation_and_reused_by_later_runs(tmp_path, decode_calls):
    cache_dir = tmp_path / "cache"
    first = make_datamodule(tmp_path / "data", cache_dir=str(cache_dir), slice_stride=2)
    first.setup("fit")
    for _ in first.train_dataloader():
        pass
    assert len(decode_calls) == 4
    assert len(list(cache_dir.rglob("*.pt"))) == 4
    again = make_datamodule(tmp_path / "data", cache_dir=str(cache_dir), slice_stride=2)
    again.setup("fit")
    for _ in again.train_dataloader():
        pass
    assert len(decode_calls) == 4, "a later run validates and trains from the cache"


def test_disk_cache_without_cache_dir_lives_in_the_experiment_directory(tmp_path, decode_calls):
    # One experiment = one directory: `volume_cache: disk` alone caches under <default_root_dir>/volume_cache.
    from lightning.pytorch import Trainer

    datamodule = make_datamodule(tmp_path / "data", volume_cache="disk", slice_stride=2)
    with pytest.raises(ValueError, match="needs a Trainer"):  # no experiment directory to put it in
        datamodule.setup("fit")
    datamodule.trainer = Trainer(default_root_dir=tmp_path / "experiment", accelerator="cpu", logger=False)
    datamodule.setup("fit")
    assert len(list((tmp_path / "experiment" / "volume_cache").rglob("*.pt"))) == 4


def test_cached_volumes_check_and_subset_share_the_memory_cache(tmp_path, decode_calls):
    good, bad = make_bad_volumes(tmp_path / "volumes")
    records = [VolumeRecord(str(path), "v") for path in [good[0], *bad, good[1]]]
    with pytest.raises(DataValidationError) as raised:
        CachedVolumes(records, {"in_plane_size": 16}, cache="memory")  # preload: lists every bad file
    assert {e.path for e in raised.value.errors} == {str(p) for p in bad}
    decode_calls.clear()

    lazy = CachedVolumes(records, {"in_plane_size": 16}, cache="memory", preload=False)
    assert decode_calls == []
    results = lazy.check([0, 1, 6], num_threads=2)
    assert results[0].shape[0] == results[2].shape[0] == 8 and isinstance(results[1].error, BadFileError)
    assert results[1].error.path == str(bad_path := next(iter(bad))) and bad_path.name == "four_d.nii.gz"
    decoded = len(decode_calls)
    subset = lazy.subset([6, 0])
    assert [r.path for r in subset.records] == [str(good[1]), str(good[0])]
    assert [check.shape[0] for check in subset.check()] == [8, 8]
    assert len(decode_calls) == decoded, "the subset reuses the decoded volumes"
    with pytest.raises(BadFileError, match="constant volume"):  # the reason, not MONAI's wrapper
        lazy[3]


def test_slice_dataset_rejects_bad_stride_and_counts(tmp_path):
    good, _ = make_bad_volumes(tmp_path / "volumes")
    volumes = CachedVolumes([VolumeRecord(str(good[0]), "v")], {"in_plane_size": 16}, cache="memory")
    with pytest.raises(ValueError, match="stride"):
        SliceDataset(volumes, stride=0)
    with pytest.raises(ValueError, match="slice counts"):
        SliceDataset(volumes, slice_counts=[8, 8])
    assert len(SliceDataset(volumes, stride=3)) == 3 and len(SliceDataset(volumes, stride=8)) == 1


# ------------------------------------------------------------------------------------------------------------
# Synthetic volumes
# ------------------------------------------------------------------------------------------------------------


def test_synthetic_volumes_are_ct_and_mr_like_loadable_and_idempotent(tmp_path):
    spec = SyntheticData(
        root=str(tmp_path / "demo"), num_images=0, num_volumes=8, volume_shape=VOLUME_SHAPE, seed=3
    )
    folder = generate_synthetic_volumes(spec)
    files = sorted(folder.rglob("*.nii.gz"))
    assert len(files) == 8 and {f.parent.name for f in files} == set(VOLUME_CLASSES)
    for file in files:
        image = nib.load(file)
        assert image.shape == (40, 40, 12) and image.get_data_dtype() == np.int16
        spacing = image.header.get_zooms()
        assert min(spacing) > 0 and spacing[2] > spacing[0]  # thick slices, like clinical scans
        volume = load_volume(file)
        assert volume.array.shape == (12, 40, 40)
        assert 0.0 <= volume.array.min() and volume.array.max() <= 1.0 and volume.array.std() > 0.01
        raw = read_volume(file).array
        if file.parent.name.startswith("ct_"):
            assert volume.modality == "ct" and raw.min() <= -950 and raw.max() <= 400
        else:
            assert volume.modality == "mr" and raw.min() >= 0 and raw.max() > 300
    stamps = {f: f.stat().st_mtime_ns for f in files}

    assert generate_synthetic_volumes(spec) == folder
    generate_synthetic_data(SyntheticData(**{**vars(spec), "num_images": 4}))  # images added, volumes kept
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["images", "volumes"]  # no staging left
    assert (folder / COMPLETE_MARKER).is_file()

    # The same spec elsewhere gives the same bytes; another spec replaces the old generation.
    other = generate_synthetic_volumes(SyntheticData(**{**vars(spec), "root": str(tmp_path / "again")}))
    assert all((other / f.relative_to(folder)).read_bytes() == f.read_bytes() for f in files)
    generate_synthetic_volumes(SyntheticData(**{**vars(spec), "num_volumes": 4}))
    assert len(list(folder.rglob("*.nii.gz"))) == 4


def test_synthetic_volumes_never_overwrite_foreign_data_and_check_the_spec(tmp_path):
    foreign = write_nifti(_mkdir(tmp_path / "demo" / "volumes") / "mine.nii.gz", ct_like())
    with pytest.raises(FileExistsError, match=COMPLETE_MARKER):
        generate_synthetic_volumes(SyntheticData(root=str(tmp_path / "demo"), num_volumes=4))
    assert foreign.exists()
    with pytest.raises(ValueError, match="num_images >= 1 or num_volumes >= 1"):
        SyntheticData(num_images=0, num_volumes=0)
    with pytest.raises(ValueError, match="volume_shape"):
        SyntheticData(num_volumes=2, volume_shape=(4, 40, 12))
    with pytest.raises(ValueError, match="volume_shape"):
        SyntheticData(num_volumes=2, volume_shape=(40, 40, 2))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# ------------------------------------------------------------------------------------------------------------
# Real data
# ------------------------------------------------------------------------------------------------------------


def test_real_slices_ct_and_mr_volumes(tmp_path):
    slices2d = shared_path("slices2d")
    ct, mr = shared_path("volumes", "ct"), shared_path("volumes", "mr")
    datamodule = JointDataModule(
        images=[str(slices2d)],
        volumes=[str(ct), str(mr)],
        **{**SMALL, "volume_in_plane_size": 48, "volume_size": 32, "slice_stride": 8, "batch_size": 8},
    )
    datamodule.setup("fit")
    assert datamodule.dataset_size == 400 and datamodule.num_volumes == 11
    cached = [datamodule.volume_dataset.volumes[i] for i in range(11)]
    assert {(Path(item["path"]).parent.name, item["modality"]) for item in cached} == {
        ("ct", "ct"),
        ("mr", "mr"),
    }
    # Axial slices: CT 112 and 30 (RAS); brain MR 25, 25, 24, 24, 22, 22, 24, 24 and abdominal MR 20 (LPS).
    counts = [item["volume"].shape[0] for item in cached]
    assert sorted(counts) == [20, 22, 22, 24, 24, 24, 24, 25, 25, 30, 112]
    assert all(item["volume"].shape[1:] == (48, 48) for item in cached)
    n_slices = sum((n + 7) // 8 for n in counts)  # every 8th slice
    assert datamodule.slice_index_range == range(400, 400 + n_slices)
    assert datamodule.volume_index_range == range(400 + n_slices, 400 + n_slices + 11)
    assert datamodule.num_samples == 400 + n_slices + 11

    batch, _, _ = next(iter(datamodule.train_dataloader()))
    check_image_batch(batch["images"], batch_size=8)
    check_volume_batch(batch["volumes"], size=32)
    assert set(batch["volumes"]["source"]) <= {"ct", "mr"}


# ------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------


def make_bad_volumes(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    """4 good CT volumes and one of each kind of bad volume, with a phrase its error must contain."""
    folder.mkdir(parents=True)
    good = [write_nifti(folder / f"good_{i}.nii.gz", ct_like((20, 20, 8), seed=i)) for i in range(4)]
    with_nan = ct_like((20, 20, 8)).astype(np.float32)
    with_nan[5, 5, 5] = np.nan
    good_bytes = good[0].read_bytes()
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(good_bytes[: len(good_bytes) // 2])
    bad = {
        write_nifti(folder / "four_d.nii.gz", np.stack([ct_like()] * 3, axis=-1)): "4D image",
        write_nifti(folder / "nan.nii.gz", with_nan): "1 NaN",
        write_nifti(folder / "constant.nii.gz", np.full((20, 20, 8), 40, np.int16)): "constant volume",
        write_nifti(folder / "two_slices.nii.gz", ct_like((20, 20, 2))): "only 2 slice",
        truncated: "cannot decode",
    }
    return good, bad


def test_setup_lists_every_bad_volume_and_image_together(tmp_path):
    _, bad_volumes = make_bad_volumes(tmp_path / "volumes")
    empty_png = _mkdir(tmp_path / "bad_images") / "empty.png"
    empty_png.write_bytes(b"")
    datamodule = JointDataModule(
        images=[str(tmp_path / "bad_images")],
        volumes=[str(tmp_path / "volumes")],
        synthetic=SyntheticData(root=str(tmp_path / "syn"), num_images=8, image_size=32),
        **SMALL,
    )
    with pytest.raises(DataValidationError) as raised:
        datamodule.setup("fit")
    found = {e.path: e.reason for e in raised.value.errors}
    assert set(found) == {str(empty_png)} | {str(p) for p in bad_volumes}
    assert "empty file" in found[str(empty_png)]
    for path, phrase in bad_volumes.items():
        assert phrase in found[str(path)], (path.name, found[str(path)])
        assert str(path) in str(raised.value)


def test_setup_skips_bad_volumes_and_logs_each(tmp_path, caplog):
    good, bad_volumes = make_bad_volumes(tmp_path / "volumes")
    datamodule = JointDataModule(volumes=[str(tmp_path / "volumes")], on_bad_file="skip", **SMALL)
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        datamodule.setup("fit")
    assert sorted(r.path for r in datamodule.volume_records) == sorted(str(p) for p in good)
    assert datamodule.num_volumes == 4 and datamodule.slice_index_range == range(4 * 8)
    warnings = [
        r.getMessage() for r in caplog.records if r.name == "jointssl.data" and r.levelno == logging.WARNING
    ]
    for path, phrase in bad_volumes.items():
        assert any(str(path) in message and phrase in message for message in warnings), path.name
    batch, _, _ = next(iter(datamodule.train_dataloader()))
    check_volume_batch(batch["volumes"])


def test_volume_broken_after_validation_raises_naming_the_file(tmp_path):
    datamodule = make_datamodule(tmp_path, volume_cache="none", slice_stream=False)
    datamodule.setup("fit")
    victim = Path(datamodule.volume_records[1].path)
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(BadFileError) as raised:
        datamodule.volume_dataset[1]
    assert raised.value.path == str(victim)


def test_size_and_source_errors(tmp_path):
    with pytest.raises(ValueError, match="no data sources"):
        JointDataModule(**SMALL).setup("fit")
    with pytest.raises(ValueError, match="no usable volumes"):
        JointDataModule(volumes=[str(_mkdir(tmp_path / "empty"))], **SMALL).setup("fit")
    with pytest.raises(ValueError, match="fewer than volume_batch_size x world_size"):
        make_datamodule(tmp_path / "few", num_volumes=4, volume_batch_size=5).setup("fit")
    with pytest.raises(RuntimeError, match="setup"):
        _ = make_datamodule(tmp_path / "x").volume_index_range


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"slice_stride": 0}, "slice_stride"),
        ({"volume_batch_size": 0}, "volume_batch_size"),
        ({"volume_cache": "ram"}, "volume_cache"),
        ({"hu_window": (100, -100)}, "hu_window"),
        ({"mr_percentiles": (50, 10)}, "mr_percentiles"),
        ({"volume_in_plane_size": 0}, "volume_in_plane_size"),
        ({"volume_modality": "pet"}, "volume_modality"),
        ({"slice_axis": "oblique"}, "slice_axis"),
        ({"num_slices": 0}, "num_slices"),
    ],
)
def test_invalid_volume_configuration_fails_at_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        JointDataModule(**settings)


# ------------------------------------------------------------------------------------------------------------
# Two-rank DDP: the volume stream is sharded disjointly, bad volumes found on either rank are dropped by both
# ------------------------------------------------------------------------------------------------------------


class StreamIndexRecorder(pl.LightningModule):
    """Writes the global indices of both streams that each rank saw per epoch to JSON files."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[str, list[int]] = {"images": [], "volumes": []}

    def training_step(self, batch, batch_idx):
        for stream in self.seen:
            self.seen[stream].extend(batch[stream]["index"].tolist())
        signal = batch["images"]["crops"][0].mean() + batch["volumes"]["views"].mean()
        return (signal * self.weight).sum()

    def on_train_epoch_end(self):
        path = Path(self.out_dir) / f"rank{self.global_rank}_epoch{self.current_epoch}.json"
        path.write_text(json.dumps(self.seen))
        self.seen = {"images": [], "volumes": []}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.ddp
def test_two_ranks_get_disjoint_volume_shards(tmp_path):
    out_dir = _mkdir(tmp_path / "indices")
    # Two bad volumes first, so that rank 0 validates one and rank 1 the other: both ranks must drop both.
    bad = _mkdir(tmp_path / "bad")
    write_nifti(bad / "a_constant.nii.gz", np.full((20, 20, 8), 3, np.int16))
    write_nifti(bad / "b_two_slices.nii.gz", ct_like((20, 20, 2)))
    cache_dir = tmp_path / "cache"
    datamodule = make_datamodule(
        tmp_path / "data",
        num_images=8,
        num_volumes=8,
        volumes=[str(bad)],
        on_bad_file="skip",
        slice_stream=False,
        cache_dir=str(cache_dir),
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
    trainer.fit(StreamIndexRecorder(str(out_dir)), datamodule=datamodule)

    seen = {
        (r, e): json.loads((out_dir / f"rank{r}_epoch{e}.json").read_text()) for r in (0, 1) for e in (0, 1)
    }
    volume_range = set(range(8, 16))  # 8 images, no slices, then the 8 good volumes
    for epoch in (0, 1):
        rank0, rank1 = seen[(0, epoch)]["volumes"], seen[(1, epoch)]["volumes"]
        assert len(rank0) == len(rank1) == 4  # 8 volumes / 2 ranks, 2 batches of 2 each
        assert len(set(rank0)) == 4 and len(set(rank1)) == 4
        assert not set(rank0) & set(rank1)
        assert set(rank0) | set(rank1) == volume_range
        for rank in (0, 1):
            assert set(seen[(rank, epoch)]["images"]) <= set(range(8))
    assert any(set(seen[(rank, 0)]["volumes"]) != set(seen[(rank, 1)]["volumes"]) for rank in (0, 1))
    # Each good volume was decoded and cached once across both ranks; the bad ones never.
    assert len(list(cache_dir.rglob("*.pt"))) == 8
