"""Volume and slice datasets: sample contract, caching (the decoder runs once), collation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from jointssl.data import volume_io
from jointssl.data.volume_datasets import CachedVolumes, SliceDataset, VolumeDataset, collate_volumes
from jointssl.data.volume_io import VolumeRecord, load_volume
from jointssl.data.volume_transforms import VolumeViews
from tests.test_volume_io import ct_like, write_nifti

LOAD_KWARGS = {"in_plane_size": 16}


@pytest.fixture
def records(tmp_path) -> list[VolumeRecord]:
    """Three small CT volumes with 8, 5 and 12 axial slices."""
    folder = tmp_path / "volumes"
    folder.mkdir()
    return [
        VolumeRecord(str(write_nifti(folder / f"v{i}.nii.gz", ct_like((20, 20, n), seed=i))), f"src{i}")
        for i, n in enumerate((8, 5, 12))
    ]


@pytest.fixture
def decode_calls(monkeypatch) -> list[str]:
    """Paths passed to the image decoder, in call order."""
    calls: list[str] = []
    original = volume_io._decode

    def counting_decode(path, *args, **kwargs):
        calls.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(volume_io, "_decode", counting_decode)
    return calls


def views(num_slices=8, size=16, seed=0) -> VolumeViews:
    return VolumeViews(num_slices=num_slices, size=size, seed=seed)


def test_volume_sample_contract(records):
    dataset = VolumeDataset(records, LOAD_KWARGS, views(), index_offset=100, cache="none")
    assert len(dataset) == 3
    sample = dataset[1]
    assert set(sample) == {"views", "padding_mask", "index", "source"}
    assert sample["views"].shape == (2, 8, 1, 16, 16)
    assert sample["padding_mask"].tolist() == [False] * 5 + [True] * 3  # volume 1 has 5 slices
    assert sample["index"] == 101 and sample["source"] == "src1"


def test_collate_volumes(records):
    dataset = VolumeDataset(records, LOAD_KWARGS, views(), cache="none")
    batch = collate_volumes([dataset[0], dataset[1]])
    assert batch["views"].shape == (2, 2, 8, 1, 16, 16)
    assert batch["padding_mask"].shape == (2, 8) and batch["padding_mask"][1, 5:].all()
    assert batch["index"].tolist() == [0, 1] and batch["source"] == ["src0", "src1"]
    # Ragged items (e.g. from differently configured views) are padded to the longest.
    short = {
        "views": torch.ones(2, 3, 1, 16, 16),
        "padding_mask": torch.zeros(3, dtype=torch.bool),
        "index": 9,
        "source": "x",
    }
    ragged = collate_volumes([dataset[0], short])
    assert ragged["views"].shape == (2, 2, 8, 1, 16, 16)
    assert ragged["padding_mask"][1].tolist() == [False] * 3 + [True] * 5
    assert torch.all(ragged["views"][1, :, 3:] == 0)


def test_memory_cache_decodes_once(records, decode_calls):
    dataset = VolumeDataset(records, LOAD_KWARGS, views(), cache="memory")
    assert sorted(decode_calls) == sorted(r.path for r in records)  # decoded while building
    first_epoch = [dataset[i]["views"] for i in range(3)]
    second_epoch = [dataset[i]["views"] for i in range(3)]
    assert len(decode_calls) == 3
    assert not any(torch.equal(a, b) for a, b in zip(first_epoch, second_epoch))  # augmentation is not cached


def test_disk_cache_survives_new_datasets_and_tracks_parameters_and_files(records, tmp_path, decode_calls):
    cache_dir = tmp_path / "cache"
    dataset = VolumeDataset(records, LOAD_KWARGS, views(), cache_dir=str(cache_dir))
    assert dataset.volumes.cache == "disk" and decode_calls == []  # decoded lazily
    for _ in range(2):  # two epochs
        for i in range(len(dataset)):
            dataset[i]
    assert len(decode_calls) == 3
    again = VolumeDataset(
        records, {"in_plane_size": 16, "modality": "auto"}, views(), cache_dir=str(cache_dir)
    )
    for i in range(len(again)):
        again[i]
    assert len(decode_calls) == 3, "a new run with the same parameters reads the cache, not the files"
    cached = again.volumes[0]["volume"]
    torch.testing.assert_close(cached, torch.from_numpy(load_volume(records[0].path, in_plane_size=16).array))
    decode_calls.clear()
    other = VolumeDataset(records, {"in_plane_size": 8}, views(size=8), cache_dir=str(cache_dir))
    other[0]
    assert decode_calls == [records[0].path], "other parameters have their own cache"
    assert len(list(cache_dir.iterdir())) == 2
    decode_calls.clear()
    write_nifti(records[1].path, ct_like((20, 20, 6), seed=9))
    os.utime(records[1].path, ns=(1, 1))  # a new modification time even on coarse-clock filesystems
    refreshed = VolumeDataset(records, LOAD_KWARGS, views(), cache_dir=str(cache_dir))
    assert refreshed[1]["padding_mask"].sum() == 2  # the new file has 6 slices
    assert decode_calls == [records[1].path]


def test_no_cache_decodes_every_time(records, decode_calls):
    dataset = VolumeDataset(records, LOAD_KWARGS, views(), cache="none")
    dataset[0]
    dataset[0]
    assert len(decode_calls) == 2


def test_record_modality_overrides_load_kwargs(records):
    mr_record = VolumeRecord(records[0].path, "src", "mr")
    volumes = CachedVolumes([records[0], mr_record], {"in_plane_size": 16, "modality": "ct"}, cache="none")
    assert volumes[0]["modality"] == "ct" and volumes[1]["modality"] == "mr"
    assert not torch.equal(volumes[0]["volume"], volumes[1]["volume"])


def test_bad_arguments(records):
    with pytest.raises(ValueError, match="unknown load_volume arguments"):
        CachedVolumes(records, {"size": 16})
    with pytest.raises(ValueError, match="cache_dir"):
        CachedVolumes(records, cache="disk")


def test_slice_dataset_enumerates_every_slice_densely(records, decode_calls):
    volume_dataset = VolumeDataset(records, LOAD_KWARGS, views(), cache="memory")
    slices = SliceDataset(volume_dataset.volumes, index_offset=1000)
    assert len(decode_calls) == 3, "the slice stream shares the volume stream's cache"
    assert len(slices) == 8 + 5 + 12
    samples = [slices[i] for i in range(len(slices))]
    assert [s["index"] for s in samples] == list(range(1000, 1025))
    assert [s["source"] for s in samples] == ["src0"] * 8 + ["src1"] * 5 + ["src2"] * 12
    assert all(s["image"].shape == (1, 16, 16) and s["image"].dtype == torch.float32 for s in samples)
    volume1 = volume_dataset.volumes[1]["volume"]
    torch.testing.assert_close(samples[8 + 4]["image"][0], volume1[4])
    samples[8]["image"].fill_(5.0)
    assert volume1.max() <= 1.0, "a slice sample is a copy, not a view into the cache"
    with pytest.raises(IndexError):
        slices[25]


def test_slice_dataset_from_records(records):
    slices = SliceDataset(records, LOAD_KWARGS, cache="memory")
    assert len(slices) == 25 and slices[24]["source"] == "src2"


def test_dataloader_with_workers_and_disk_cache(records, tmp_path):
    dataset = VolumeDataset(records, LOAD_KWARGS, views(), cache_dir=str(tmp_path / "cache"))
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_volumes)
    batch = next(iter(loader))
    assert batch["views"].shape == (3, 2, 8, 1, 16, 16)
    assert sorted(batch["index"].tolist()) == [0, 1, 2]
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 3


def test_real_volumes_through_the_dataset(tmp_path):
    from tests.conftest import shared_path

    folder = shared_path("volumes", "mr")
    records = [VolumeRecord(str(folder / "example_mr_sm.nii.gz"), "mr")]
    dataset = VolumeDataset(records, {"in_plane_size": 32}, views(num_slices=16, size=32), cache="memory")
    sample = dataset[0]
    assert sample["views"].shape == (2, 16, 1, 32, 32) and not sample["padding_mask"].any()  # 20 slices
    assert np.isfinite(sample["views"].numpy()).all()
