"""Throughput of the volume stream: cached volumes vs decoding every .nii.gz each time, and with workers.

Generates CT-like .nii.gz volumes (int16 HU, a noisy body ellipse in air, default 20 of 256 x 256 x 64) in a
temporary folder, then measures volumes/s through VolumeDataset (decode + normalise + two augmented views):

1. in this process: no cache (decode every time) vs a warm disk cache vs a memory cache, at the same sizes;
   also the loading part alone (CachedVolumes, no augmentation), where the cache matters most;
2. through a DataLoader with ``--workers`` worker processes and a warm disk cache, at the demo's sizes.

Run: ``.venv/bin/python benchmarks/bench_volume_loader.py`` (about two minutes on two CPU cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader

from jointssl.data.volume_datasets import CachedVolumes, VolumeDataset, collate_volumes
from jointssl.data.volume_io import VolumeRecord
from jointssl.data.volume_transforms import VolumeViews


def write_volumes(folder: Path, count: int, shape: tuple[int, int, int], seed: int = 0) -> list[VolumeRecord]:
    """CT-like volumes: air (-1000 HU) around an elliptic body of smooth soft tissue with noise, 1x1x2.5
    mm."""
    rng = np.random.default_rng(seed)
    rows, cols, _ = shape
    y, x = np.mgrid[:rows, :cols]
    records = []
    for i in range(count):
        body = ((y - rows / 2) / (0.42 * rows)) ** 2 + ((x - cols / 2) / (0.48 * cols)) ** 2 < 1
        tissue = 40 + 30 * np.sin(x / 9.0 + i)[..., None] + rng.normal(0, 20, size=shape)
        volume = np.where(body[..., None], tissue, -1000).astype(np.int16)
        path = folder / f"volume_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.5, 1.0])), str(path))
        records.append(VolumeRecord(str(path), "bench"))
    return records


def volumes_per_second(get_item: Callable[[int], object], count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        get_item(i)
    return count / (time.perf_counter() - start)


def loader_volumes_per_second(dataset: VolumeDataset, workers: int, batch_size: int, epochs: int) -> float:
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_volumes,
        persistent_workers=workers > 0,
    )
    next(iter(loader))  # start the workers before timing
    start = time.perf_counter()
    seen = 0
    for _ in range(epochs):
        for batch in loader:
            seen += batch["views"].shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 64), metavar=("H", "W", "D"))
    parser.add_argument("--num-slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_kwargs = {"in_plane_size": args.size}

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "data").mkdir()
        records = write_volumes(tmp_path / "data", args.volumes, tuple(args.shape))
        n = len(records)
        print(
            f"{n} volumes of {args.shape[0]}x{args.shape[1]}x{args.shape[2]} int16 .nii.gz, "
            f"{sum(Path(r.path).stat().st_size for r in records) / 2**20:.1f} MB; views of "
            f"{args.num_slices} slices x {args.size}x{args.size}; {args.threads} torch thread(s)"
        )

        def views() -> VolumeViews:
            return VolumeViews(num_slices=args.num_slices, size=args.size, seed=0)

        print("\n1. in-process, one volume at a time (volumes/s)")
        plain = VolumeDataset(records, load_kwargs, views(), cache="none")
        disk = VolumeDataset(records, load_kwargs, views(), cache_dir=str(tmp_path / "cache"))
        first_epoch = volumes_per_second(disk.__getitem__, n)  # decodes and writes the cache
        decode_every_time = volumes_per_second(plain.__getitem__, n)
        warm_disk = volumes_per_second(disk.__getitem__, n)
        start = time.perf_counter()
        memory = VolumeDataset(records, load_kwargs, views(), cache="memory")
        memory_build = time.perf_counter() - start
        warm_memory = volumes_per_second(memory.__getitem__, n)
        print(f"   decode every time (cache='none')      {decode_every_time:7.2f}")
        print(f"   disk cache, first epoch (fills it)     {first_epoch:7.2f}")
        print(
            f"   disk cache, later epochs               {warm_disk:7.2f}   "
            f"x{warm_disk / decode_every_time:.2f} vs decoding"
        )
        print(
            f"   memory cache, epochs after building    {warm_memory:7.2f}   "
            f"x{warm_memory / decode_every_time:.2f} vs decoding (building took {memory_build:.1f} s)"
        )
        loading_plain = CachedVolumes(records, load_kwargs, cache="none")
        loading_disk = CachedVolumes(records, load_kwargs, cache_dir=str(tmp_path / "cache"))
        decode_only = volumes_per_second(loading_plain.__getitem__, n)
        cached_only = volumes_per_second(loading_disk.__getitem__, n)
        print(
            f"   loading only (no augmentation): decode {decode_only:.2f}, disk cache {cached_only:.2f}   "
            f"x{cached_only / decode_only:.1f}"
        )

        print(f"\n2. DataLoader, {args.workers} workers, batch 4, warm disk cache, 2 epochs (volumes/s)")
        for num_slices in (16, 64):
            for size in (64, 128):
                dataset = VolumeDataset(
                    records,
                    {"in_plane_size": size},
                    VolumeViews(num_slices=num_slices, size=size, seed=0),
                    cache_dir=str(tmp_path / "cache"),
                )
                for i in range(n):  # fill this size's cache outside the timing
                    dataset.volumes[i]
                rate = loader_volumes_per_second(dataset, args.workers, batch_size=4, epochs=2)
                print(f"   N={num_slices:3d} slices, {size:3d} px      {rate:7.2f}")


if __name__ == "__main__":
    main()
