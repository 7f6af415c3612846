"""JointDataModule: the training data of jointssl — a 2D stream (images and volume slices) and a volume stream."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from jointssl import distributed
from jointssl.data.datasets import ImageDataset, MultiCropDataset, collate_multicrop
from jointssl.data.file_checks import DEFAULT_MAX_DECODED_BYTES
from jointssl.data.image_io import MIN_IMAGE_SIDE
from jointssl.data.prediction_inputs import PredictionImages, PredictionVolumes, collate_predictions
from jointssl.data.sampling import ResumableDataLoader, ResumableSampler, SeededDataset
from jointssl.data.discovery import ImageRecord, discover_images, discover_volumes
from jointssl.data.synthetic import SyntheticData, generate_synthetic_data
from jointssl.data.transforms import MultiCropTransform
from jointssl.data.validation import FileCheck, ValidationCache, apply_bad_file_policy, check_images
from jointssl.data.volume_datasets import CachedVolumes, SliceDataset, VolumeDataset, collate_volumes
from jointssl.data.volume_io import VolumeRecord
from jointssl.data.volume_transforms import VolumeViews
from jointssl.errors import ConfigError, require

logger = logging.getLogger("jointssl.data")

# Independent random streams derived from `seed`: the sample order and augmentation seeds of each loader (the same
# on every rank), the DataLoader generator of each loader and the default volume augmentation (per rank).
_IMAGES_LOADER_STREAM, _VOLUMES_LOADER_STREAM, _VOLUME_VIEWS_STREAM = 0, 1, 2


class JointDataModule(pl.LightningDataModule):
    """The training data: 2D images and 3D volumes, as two streams of one ``CombinedLoader``.

    Training batches (``train_dataloader``, mode ``max_size_cycle``: an epoch is one pass over the longer stream
    while the shorter one cycles)::

        {"images":  {"crops":  list[FloatTensor[B, 1, h, w]],   # num_global_crops global, then local crops
                     "index":  LongTensor[B],
                     "source": list[str]},
         "volumes": {"views":        FloatTensor[B_v, 2, N, 1, S, S],  # two augmented views of one slab
                     "padding_mask": BoolTensor[B_v, N],               # True = padded slice (trailing only)
                     "index":        LongTensor[B_v],
                     "source":       list[str]}}

    with B = ``batch_size``, B_v = ``volume_batch_size``, N = ``num_slices``, S = ``volume_size``. The "images"
    key is the 2D stream: the 2D image files followed by (when ``slice_stream``) every ``slice_stride``-th slice
    of every volume, all through the same multi-crop augmentation; it is absent when that stream is empty. The
    "volumes" key is present only when there are volumes. Both streams are normalised alike,
    ``(x - 0.5) / 0.25`` of intensities in [0, 1].

    Every sample has a *global* index, unique across streams and ranks (memory banks are indexed by it):
    2D images ``[0, n_images)``, then slice-stream slices ``[n_images, n_images + n_slices)``, then volumes up
    to ``num_samples`` (see ``image_index_range``, ``slice_index_range``, ``volume_index_range``).

    ``setup("fit")`` decodes every image and every volume once before training (split across ranks under DDP)
    and reports every bad file at once. Both loaders shuffle and drop the last partial batch. Their samplers are
    :class:`~jointssl.data.sampling.ResumableSampler` s, DistributedSamplers sharded by the trainer's rank and
    world size (Lightning adds none of its own): disjoint shards, reshuffled every epoch; when a stream's size is
    not a multiple of the world size, up to world_size - 1 samples are repeated per epoch. The shorter stream,
    cycled within an epoch, is reshuffled for every pass.

    Resuming: the loaders are stateful (:class:`~jointssl.data.sampling.ResumableDataLoader`): Lightning stores
    their position in checkpoints and a resumed run continues mid-epoch at the next batch, in the same order.
    Every sample's augmentation is seeded from (``seed``, epoch, pass, slot in the order), not from worker
    processes, so the resumed run also draws the same crops and views.

    The constructor arguments are the data section of the config.

    Args:
        images: 2D image sources: folders (searched recursively; PNG, JPEG, DICOM) or CSV manifests with columns
            ``path`` (relative to the CSV's folder), optional ``label`` and ``source``.
        volumes: 3D volume sources: folders (searched recursively for NIfTI ``.nii``/``.nii.gz`` and NumPy
            ``.npy`` volumes stored H x W x D; every folder directly holding DICOM files is one series), CSV
            manifests (``path`` or ``image`` column, optional ``modality`` CT/MR and ``source``), or single files.
        synthetic: when set, ``prepare_data`` generates synthetic demo data; its ``<root>/images`` folder (when
            ``num_images > 0``) is appended to ``images`` and its ``<root>/volumes`` folder (when
            ``num_volumes > 0``) to ``volumes``.
        batch_size: 2D samples (images and volume slices) per batch per device.
        volume_batch_size: volumes per batch per device.
        num_workers: DataLoader worker processes per device *for each stream* (2 x num_workers with volumes).
        global_crop_size: side of the global crops in pixels.
        num_global_crops: global crops per 2D sample (>= 2 for swapped-prediction losses).
        local_crop_size: side of the local crops in pixels.
        num_local_crops: local (small) crops per 2D sample.
        global_crop_scale: range of the image-area fraction covered by a global crop.
        local_crop_scale: range of the image-area fraction covered by a local crop.
        volume_modality: intensity normalisation of volumes: "ct" (clip ``hu_window``), "mr" (clip
            ``mr_percentiles``) or "auto" (DICOM Modality tag, else CT when the 1st percentile is air in HU); a
            manifest's ``modality`` column overrides it per file.
        slice_axis: anatomical axis the slices are taken along ("axial", "coronal", "sagittal"; ``.npy``
            volumes always use their last axis).
        hu_window: Hounsfield window mapped to [0, 1] for CT.
        mr_percentiles: lower and upper intensity percentiles mapped to [0, 1] for MR.
        volume_in_plane_size: resample every slice to this square size when loading (and caching) a volume;
            keeps the cache small. None keeps the native size.
        num_slices: N, the slab of consecutive slices per volume view (longer volumes: a random slab; shorter:
            padded at the end and masked).
        volume_size: S, the in-plane size of the volume views.
        slice_stream: add the slices of the volumes to the 2D stream (same multi-crop augmentation as images).
        slice_stride: use every k-th slice of each volume in the slice stream; sets the mix of 2D images and
            volume slices in the 2D stream (each volume contributes ceil(n_slices / k) samples).
        volume_cache: where decoded volumes are kept: "memory" (every rank holds all of them in RAM: about
            n_volumes x slices x volume_in_plane_size^2 x 4 bytes), "disk" (under ``cache_dir``, reused by later
            epochs and runs), "none" (decode on every access: slow, above all for the slice stream) or "auto"
            ("disk" when ``cache_dir`` is set, else "memory").
        cache_dir: folder of the disk cache of decoded volumes. None with ``volume_cache: disk``: the experiment's
            own ``<trainer.default_root_dir>/volume_cache`` (so that a run writes nothing outside its directory);
            give one folder to several experiments to decode the same volumes only once.
        on_bad_file: what to do with files that cannot be decoded or are unusable (too small images; 4D, NaN,
            constant or too thin volumes): ``"error"`` stops in ``setup`` with one list of every bad file;
            ``"skip"`` logs each one and trains without it.
        validation_threads: threads used to decode every image and volume once during ``setup``.
        max_decoded_bytes: a file whose header declares more than this many bytes decoded is a bad file, refused
            before it is decoded; validation holds at most 4x this at once over all its threads (docs/data.md, "Bad
            input"). null: no bound.
        validation_cache: keep each file's check result (keyed by path, size and modification time, and the
            settings that decide it) in ``<cache_dir>/validation``, or without a ``cache_dir`` in
            ``<trainer.default_root_dir>/validation_cache``, so that a restart decodes only new or changed files.
        pin_memory: pin batches in page-locked memory (only takes effect when CUDA is available).
        persistent_workers: keep DataLoader workers alive between epochs (only with ``num_workers > 0``).
        seed: seed of the sample order and of the augmentation (the same on every rank: ranks read disjoint
            shards of one permutation, and each slot of it has its own augmentation seed).
    """

    def __init__(
        self,
        images: list[str] = [],  # noqa: B006 - copied below, never mutated; `[]` reads best in the config schema
        volumes: list[str] = [],  # noqa: B006 - as above
        synthetic: SyntheticData | None = None,
        batch_size: int = 64,
        volume_batch_size: int = 2,
        num_workers: int = 2,
        global_crop_size: int = 224,
        num_global_crops: int = 2,
        local_crop_size: int = 96,
        num_local_crops: int = 0,
        global_crop_scale: tuple[float, float] = (0.14, 1.0),
        local_crop_scale: tuple[float, float] = (0.05, 0.14),
        volume_modality: Literal["auto", "ct", "mr"] = "auto",
        slice_axis: Literal["axial", "coronal", "sagittal"] = "axial",
        hu_window: tuple[float, float] = (-1000, 1000),
        mr_percentiles: tuple[float, float] = (0.5, 99.5),
        volume_in_plane_size: int | None = 256,
        num_slices: int = 64,
        volume_size: int = 128,
        slice_stream: bool = True,
        slice_stride: int = 1,
        volume_cache: Literal["auto", "none", "memory", "disk"] = "auto",
        cache_dir: str | None = None,
        on_bad_file: Literal["error", "skip"] = "error",
        validation_threads: int = 8,
        max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
        validation_cache: bool = True,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        _check_configuration(
            batch_size=batch_size,
            volume_batch_size=volume_batch_size,
            num_workers=num_workers,
            on_bad_file=on_bad_file,
            volume_modality=volume_modality,
            slice_axis=slice_axis,
            hu_window=hu_window,
            mr_percentiles=mr_percentiles,
            volume_in_plane_size=volume_in_plane_size,
            slice_stride=slice_stride,
            volume_cache=volume_cache,
            global_crop_size=global_crop_size,
            num_global_crops=num_global_crops,
            local_crop_size=local_crop_size,
            num_local_crops=num_local_crops,
            global_crop_scale=global_crop_scale,
            local_crop_scale=local_crop_scale,
            num_slices=num_slices,
            volume_size=volume_size,
            validation_threads=validation_threads,
        )
        self.images = list(images)
        self.volumes = list(volumes)
        self.synthetic = synthetic
        self.batch_size = batch_size
        self.volume_batch_size = volume_batch_size
        self.num_workers = num_workers
        self.volume_modality = volume_modality
        self.slice_axis = slice_axis
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.mr_percentiles = (float(mr_percentiles[0]), float(mr_percentiles[1]))
        self.volume_in_plane_size = volume_in_plane_size
        self.slice_stream = slice_stream
        self.slice_stride = slice_stride
        self.volume_cache = volume_cache
        self.cache_dir = cache_dir
        self.on_bad_file = on_bad_file
        self.validation_threads = validation_threads
        require(max_decoded_bytes is None or max_decoded_bytes >= 1, "JointDataModule", "max_decoded_bytes",
                ">= 1 (or null: no bound)", max_decoded_bytes)
        self.max_decoded_bytes = max_decoded_bytes
        self.validation_cache = validation_cache
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.seed = seed
        # Built here so that invalid crop and view settings fail when the config is parsed, not after validation.
        self.transform = MultiCropTransform(
            global_crop_size=global_crop_size,
            num_global_crops=num_global_crops,
            global_scale=tuple(global_crop_scale),
            local_crop_size=local_crop_size,
            num_local_crops=num_local_crops,
            local_scale=tuple(local_crop_scale),
        )
        # Seeded per rank in setup; a fixed seed here so that construction does not consume torch's global RNG.
        self.volume_views = VolumeViews(num_slices=num_slices, size=volume_size, seed=0)
        if (
            slice_stream and volume_in_plane_size is not None and global_crop_size > volume_in_plane_size
            and (self.volumes or (synthetic is not None and synthetic.num_volumes > 0))
        ):
            # Known before any file is decoded: every slice of the slice stream is volume_in_plane_size wide.
            logger.warning(
                "global_crop_size %d is above volume_in_plane_size %d: the global crops of every volume slice are "
                "upsampled (at least %.1fx); lower global_crop_size or raise volume_in_plane_size",
                global_crop_size, volume_in_plane_size, global_crop_size / volume_in_plane_size,
            )
        # Built by setup("fit"):
        self.image_dataset: ImageDataset | None = None  # the 2D image files
        self.slice_dataset: MultiCropDataset | None = None  # multi-crop slices of the volumes
        # What the "images" loader reads: the two above, concatenated.
        self.image_stream: Dataset | None = None
        self.volume_dataset: VolumeDataset | None = None  # what the "volumes" loader reads
        self._image_records: list[ImageRecord] = []
        self._ranges: dict[str, range] | None = None
        # The loaders of the last train_dataloader() call, and loader states from a checkpoint not yet applied.
        self._train_loaders: dict[str, ResumableDataLoader] = {}
        self._pending_loader_states: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ------------------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Generate the synthetic data (once per node; a no-op when it is already complete)."""
        if self.synthetic is not None:
            generate_synthetic_data(self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        """Discover and validate every image and volume (so that bad data fails now, not hours into training),
        then build both streams. Validation is split across ranks and its findings are shared, so each file is
        decoded once in total for validation and every rank keeps the same records; volumes are validated
        through their cache, so a validated volume is not decoded again for training."""
        if stage not in (None, "fit", "predict") or self._ranges is not None:
            return
        if self.synthetic is not None:
            # Idempotent: returns at once after prepare_data; generates when setup is called on its own.
            generate_synthetic_data(self.synthetic)
        image_sources, volume_sources = self.image_sources, self.volume_sources
        if not image_sources and not volume_sources:
            raise ConfigError(
                "no data sources configured: set `images` (2D image folders or CSV manifests), `volumes` "
                "(3D volume folders, CSV manifests or files) or `synthetic`"
            )
        threads = max(1, min(self.validation_threads, os.cpu_count() or 1))
        image_records = discover_images(image_sources, on_missing=self.on_bad_file) if image_sources else []
        volume_records = discover_volumes(volume_sources) if volume_sources else []
        image_checks = self._check_shard(
            "images",
            image_records,
            lambda share, cache: check_images(
                share, num_threads=threads, progress=self._progress("validating images"), cache=cache,
                max_decoded_bytes=self.max_decoded_bytes,
            ),
            self._validation_cache(
                "images",
                {"sources": image_sources, "min_side": MIN_IMAGE_SIDE, "max_decoded_bytes": self.max_decoded_bytes},
            ),
        )
        candidates = CachedVolumes(
            volume_records, self.volume_load_kwargs, self.volume_cache, self._volume_cache_dir(), preload=False
        )
        volume_checks = self._check_shard(
            "volumes",
            list(range(len(candidates))),
            lambda share, cache: candidates.check(
                share, num_threads=threads, progress=self._progress("validating volumes"), cache=cache
            ),
            self._validation_cache("volumes", {"sources": volume_sources, "load": self.volume_load_kwargs}),
        )
        # One policy over both kinds: with on_bad_file "error" one DataValidationError lists every bad file.
        usable = apply_bad_file_policy(image_checks + volume_checks, self.on_bad_file)
        image_records = [image_records[position] for position in usable if position < len(image_checks)]
        self._warn_small_images([image_checks[position] for position in usable if position < len(image_checks)])
        good = [position - len(image_checks) for position in usable if position >= len(image_checks)]
        if image_sources and not image_records:
            raise ValueError(f"no usable 2D images found in {image_sources}")
        if volume_sources and not good:
            raise ValueError(f"no usable volumes found in {volume_sources}")
        slice_counts = [volume_checks[position].shape[0] for position in good]  # type: ignore[index]
        self._build_streams(image_records, candidates.subset(good), slice_counts, training=stage != "predict")
        logger.info(
            "2D stream: %d images from %d source(s) + %d volume slices; volume stream: %d volumes from %d "
            "source(s); %d global sample indices",
            len(self.image_index_range),
            len(image_sources),
            len(self.slice_index_range),
            self.num_volumes,
            len(volume_sources),
            self.num_samples,
        )

    def train_dataloader(self) -> CombinedLoader:
        """``CombinedLoader({"images": DataLoader, "volumes": DataLoader}, mode="max_size_cycle")``, each key only
        when its stream is non-empty. Each is a :class:`~jointssl.data.sampling.ResumableDataLoader` over this
        rank's shard (the trainer's global rank and world size; Lightning calls ``set_epoch`` to reshuffle every
        epoch), dropping the last partial batch."""
        self._require_setup()
        loaders: dict[str, DataLoader] = {}
        if self.image_stream is not None:
            loaders["images"] = self._loader(
                SeededDataset(self.image_stream), self.batch_size, collate_multicrop, _IMAGES_LOADER_STREAM
            )
        if self.volume_dataset is not None:
            # The volume augmentation draws from MONAI's random states, not torch's: seed them per sample too.
            volumes = SeededDataset(self.volume_dataset, reseed=[self.volume_dataset.views.reseed])
            loaders["volumes"] = self._loader(volumes, self.volume_batch_size, collate_volumes, _VOLUMES_LOADER_STREAM)
        self._train_loaders = loaders
        self._apply_loader_states()
        return CombinedLoader(loaders, mode="max_size_cycle")

    def predict_dataloader(self) -> list[DataLoader]:
        """For `jointssl predict` (JointSSL.predict_step): one loader over the 2D images, then one over the
        volumes (each only when there are any), every input once, in record order, without augmentation
        (jointssl.data.prediction_inputs). Lightning shards them under DDP with its distributed sampler."""
        self._require_setup()
        datasets: list[tuple[Dataset, int]] = []
        if self._image_records:
            datasets.append((PredictionImages(self._image_records, self.transform.global_crop_size), self.batch_size))
        if self.volume_dataset is not None:
            datasets.append((PredictionVolumes(self.volume_dataset.volumes, self.volume_size), self.volume_batch_size))
        return [
            DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                       collate_fn=collate_predictions, pin_memory=self.pin_memory and torch.cuda.is_available())
            for dataset, batch_size in datasets
        ]

    def state_dict(self) -> dict[str, Any]:
        """The position of the training loaders (saved in checkpoints by Lightning). Lightning also stores the
        state of stateful loaders in its fit loop, but does not restore it when ``configure_optimizers`` has read
        ``trainer.estimated_stepping_batches`` (as JointSSL's scheduler does), since that builds the loaders
        before the checkpoint's loop state is loaded (Lightning-AI/pytorch-lightning#20550). This copy is restored
        with the data module, before the loaders are built."""
        if not self._train_loaders:
            return {}
        return {"loaders": {name: loader.state_dict() for name, loader in self._train_loaders.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training loaders at the saved position (applied to the loaders when they are built, or at
        once to those already built)."""
        self._pending_loader_states = dict(state_dict.get("loaders", {}))
        self._apply_loader_states()

    # ------------------------------------------------------------------------------------------------------
    # Sources, sizes and index layout
    # ------------------------------------------------------------------------------------------------------

    @property
    def image_sources(self) -> list[str]:
        """The configured image sources plus the synthetic images folder, if any."""
        sources = list(self.images)
        if self.synthetic is not None and self.synthetic.num_images > 0:
            sources.append(str(self.synthetic.images_dir))
        return sources

    @property
    def volume_sources(self) -> list[str]:
        """The configured volume sources plus the synthetic volumes folder, if any."""
        sources = list(self.volumes)
        if self.synthetic is not None and self.synthetic.num_volumes > 0:
            sources.append(str(self.synthetic.volumes_dir))
        return sources

    @property
    def volume_load_kwargs(self) -> dict[str, Any]:
        """Arguments of :func:`~jointssl.data.volume_io.load_volume` (the deterministic, cached part)."""
        return {
            "modality": self.volume_modality,
            "slice_axis": self.slice_axis,
            "in_plane_size": self.volume_in_plane_size,
            "hu_window": self.hu_window,
            "mr_percentiles": self.mr_percentiles,
            "max_decoded_bytes": self.max_decoded_bytes,
            # Slices under the 2D images' minimum side would be upsampled to volume_in_plane_size (issue 14).
            "min_in_plane": MIN_IMAGE_SIDE,
        }

    @property
    def num_slices(self) -> int:
        """N: slices per volume view."""
        return self.volume_views.num_slices

    @property
    def volume_size(self) -> int:
        """S: in-plane size of the volume views."""
        return self.volume_views.size

    @property
    def dataset_size(self) -> int:
        """Number of 2D image files in the training set (after dropping skipped files)."""
        return len(self.image_index_range)

    @property
    def num_volumes(self) -> int:
        """Number of volumes in the training set (after dropping skipped files)."""
        return len(self.volume_index_range)

    @property
    def num_samples(self) -> int:
        """Size of the global sample-index space (rows of a memory bank): indices of all streams run over
        ``[0, num_samples)``."""
        return self.volume_index_range.stop

    @property
    def image_index_range(self) -> range:
        """Global indices of the 2D image files: ``[0, n_images)``."""
        return self._require_setup()["images"]

    @property
    def slice_index_range(self) -> range:
        """Global indices of the volume slices in the 2D stream: ``[n_images, n_images + n_slices)`` (empty
        without ``slice_stream``)."""
        return self._require_setup()["slices"]

    @property
    def volume_index_range(self) -> range:
        """Global indices of the volumes: ``[n_images + n_slices, num_samples)``."""
        return self._require_setup()["volumes"]

    @property
    def image_records(self) -> list[ImageRecord]:
        """The validated 2D image records; an image's global index is its position here."""
        self._require_setup()
        return list(self._image_records)

    @property
    def volume_records(self) -> list[VolumeRecord]:
        """The validated volume records; volume ``i`` has the global index ``volume_index_range[i]``."""
        self._require_setup()
        return list(self.volume_dataset.volumes.records) if self.volume_dataset is not None else []

    def describe_sample(self, index: int) -> str:
        """The file behind a global sample index, for messages: an image path, ``<volume path> slice <k>`` for a
        slice of the slice stream, or a volume path."""
        ranges = self._require_setup()
        if index in ranges["images"]:
            return self._image_records[index].path
        if index in ranges["slices"] and self.slice_dataset is not None:
            volume, slice_index = self.slice_dataset.base.locate(index - ranges["slices"].start)
            return f"{self.volume_records[volume].path} slice {slice_index}"
        if index in ranges["volumes"]:
            return self.volume_records[index - ranges["volumes"].start].path
        return f"sample {index} (not in this data module)"

    # ------------------------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------------------------

    def _build_streams(
        self, image_records: list[ImageRecord], volumes: CachedVolumes, slice_counts: list[int], training: bool = True
    ) -> None:
        """Check the stream sizes against the batch sizes (for training: prediction has no drop_last), fill the
        volume cache, build the datasets and the global index layout."""
        n_images, n_volumes = len(image_records), len(volumes)
        stride = self.slice_stride
        n_slices = sum((count + stride - 1) // stride for count in slice_counts) if self.slice_stream else 0
        world = self._world_size()
        n_2d = n_images + n_slices
        if training and n_2d and n_2d < self.batch_size * world:
            raise ConfigError(
                f"only {n_2d} usable 2D samples ({n_images} images + {n_slices} volume slices), fewer than "
                f"batch_size x world_size = {self.batch_size} x {world}: with drop_last no complete batch "
                "exists; lower batch_size or add data"
            )
        if training and n_volumes and n_volumes < self.volume_batch_size * world:
            raise ConfigError(
                f"only {n_volumes} usable volumes, fewer than volume_batch_size x world_size = "
                f"{self.volume_batch_size} x {world}: with drop_last no complete volume batch exists; lower "
                "volume_batch_size or add volumes"
            )
        if volumes.cache == "memory":
            # Under DDP this rank validated only its share: decode the rest now, in the main process, so that
            # DataLoader workers inherit a full cache instead of each decoding (and holding) its own copy.
            threads = max(1, min(self.validation_threads, os.cpu_count() or 1))
            # A volume that fails now changed since validation: an error whatever on_bad_file says.
            apply_bad_file_policy(volumes.check(num_threads=threads, progress=self._progress("caching volumes")), "error")

        self._image_records = list(image_records)
        self.image_dataset = ImageDataset(image_records, self.transform, index_offset=0) if n_images else None
        self.slice_dataset = None
        if n_slices:
            slices = SliceDataset(volumes, index_offset=n_images, stride=stride, slice_counts=slice_counts)
            self.slice_dataset = MultiCropDataset(slices, self.transform)
        parts = [part for part in (self.image_dataset, self.slice_dataset) if part is not None]
        self.image_stream = ConcatDataset(parts) if parts else None
        self.volume_views.set_random_state(seed=self._rank_seed(_VOLUME_VIEWS_STREAM) % (2**31 - 1))
        self.volume_dataset = (
            VolumeDataset(volumes=volumes, views=self.volume_views, index_offset=n_2d) if n_volumes else None
        )
        self._ranges = {
            "images": range(n_images),
            "slices": range(n_images, n_2d),
            "volumes": range(n_2d, n_2d + n_volumes),
        }

    def _warn_small_images(self, checks: list[FileCheck]) -> None:
        """One warning for the usable 2D images smaller than ``global_crop_size`` (whose crops are upsampled
        blurs), in the words of ``jointssl check-data``'s finding for each (:func:`small_image_note`), which
        lists them all."""
        crop = self.transform.global_crop_size
        small = [(check.path, note) for check in checks if (note := small_image_note(check.shape, crop))]
        if not small or self._rank() != 0:
            return
        path, note = small[0]
        logger.warning(
            "%d of %d 2D images are smaller than global_crop_size %d (jointssl check-data lists them), e.g. %s: "
            "%s; lower global_crop_size", len(small), len(checks), crop, path, note,
        )

    def _apply_loader_states(self) -> None:
        if not self._pending_loader_states or not self._train_loaders:
            return
        if set(self._pending_loader_states) != set(self._train_loaders):
            logger.warning(
                "checkpoint holds loader states for the streams %s, this run has %s: the epoch restarts",
                sorted(self._pending_loader_states), sorted(self._train_loaders),
            )
        else:
            for name, loader in self._train_loaders.items():
                loader.load_state_dict(self._pending_loader_states[name])
        self._pending_loader_states = {}

    def _loader(self, dataset: Dataset, batch_size: int, collate_fn, stream: int) -> ResumableDataLoader:
        use_workers = self.num_workers > 0
        sampler = ResumableSampler(
            dataset, num_replicas=self._world_size(), rank=self._rank(), seed=self._stream_seed(stream), shuffle=True
        )
        return ResumableDataLoader(
            dataset,
            sampler=sampler,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and use_workers,
            # Only seeds the workers (augmentation is seeded per sample); an own generator keeps each iter() from
            # drawing that seed from the training process's global RNG.
            generator=torch.Generator().manual_seed(self._rank_seed(stream)),
        )

    def _stream_seed(self, stream: int) -> int:
        """The seed of one loader's order and augmentation, derived from ``seed``: the same on every rank."""
        entropy = [self.seed % 2**64, stream]
        return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] % 2**62)

    def _rank_seed(self, stream: int) -> int:
        """A seed for one random stream of this rank, derived from ``seed``."""
        entropy = [self.seed % 2**64, self._rank(), stream]
        return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] % 2**63)

    def _require_setup(self) -> dict[str, range]:
        if self._ranges is None:
            raise RuntimeError(
                "JointDataModule is not set up: call setup('fit') first (Lightning does in fit)"
            )
        return self._ranges

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else distributed.world_size()

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.global_rank if trainer is not None else distributed.rank()

    def _volume_cache_dir(self) -> str | None:
        """``cache_dir``, or for ``volume_cache: disk`` without one the experiment's ``volume_cache`` folder."""
        if self.cache_dir is not None or self.volume_cache != "disk":
            return self.cache_dir
        trainer = self.trainer
        if trainer is None:
            raise ValueError('volume_cache="disk" without a cache_dir needs a Trainer (its default_root_dir)')
        return str(Path(trainer.default_root_dir) / "volume_cache")

    def _validation_cache(self, kind: str, settings: dict[str, Any]) -> ValidationCache | None:
        """The cache of check results of one kind of file, beside the volume cache: ``<cache_dir>/validation`` or
        the experiment's ``<trainer.default_root_dir>/validation_cache``; None when ``validation_cache`` is off or
        there is neither (a data module used without a Trainer writes nothing)."""
        if not self.validation_cache:
            return None
        if self.cache_dir is not None:
            folder = Path(self.cache_dir) / "validation"
        elif self.trainer is not None:
            folder = Path(self.trainer.default_root_dir) / "validation_cache"
        else:
            return None
        return ValidationCache(folder, kind, settings)

    def _progress(self, label: str) -> str | None:
        """``label`` for a progress bar of rank 0, or None: the other ranks draw none, and neither does a Trainer
        whose progress bar is off."""
        trainer = self.trainer
        if self._rank() != 0 or (trainer is not None and trainer.progress_bar_callback is None):
            return None
        return label

    def _check_shard(
        self,
        kind: str,
        items: list[Any],
        check: Callable[[list[Any], ValidationCache | None], list[FileCheck]],
        cache: ValidationCache | None,
    ) -> list[FileCheck]:
        """Check this rank's share of ``items`` (every world_size-th one) with ``check(share, cache)`` and return
        the results of every rank, in item order. Rank 0 alone writes the validation cache, with every rank's
        results, so that no two processes write one file."""
        world, rank = distributed.world_size(), distributed.rank()
        checks = check(items[rank::world], cache)
        if distributed.is_distributed():
            # Plain data: exceptions with two-argument constructors do not unpickle.
            share = ([c.to_plain() for c in checks], cache.entries() if cache is not None else None)
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, share)
            merged: list[Any] = [None] * len(items)
            for other, (plain, entries) in enumerate(gathered):
                merged[other::world] = [FileCheck.from_plain(p) for p in plain]
                if cache is not None and other != rank:
                    cache.merge(*entries)
            checks = merged
        if cache is not None and rank == 0:
            cache.save()
        if items:
            bad = sum(not c.ok for c in checks)
            logger.info("validated %d %s: %d bad", len(items), kind, bad)
        return checks


def small_image_note(shape: tuple[int, ...] | None, global_crop_size: int) -> str | None:
    """Why an image of ``shape`` (H, W) trains poorly at ``global_crop_size``, or None: smaller than the crop,
    every crop of it is an upsampled blur. The one wording of fit's warning and check-data's finding."""
    if shape is None or len(shape) < 2 or min(shape[:2]) >= global_crop_size:
        return None
    height, width = shape[:2]
    return (
        f"image is {height}x{width} pixels, smaller than global_crop_size {global_crop_size}: its crops are "
        f"upsampled (at least {global_crop_size / min(height, width):.1f}x)"
    )


def _check_configuration(
    *,
    batch_size: int,
    volume_batch_size: int,
    num_workers: int,
    on_bad_file: str,
    volume_modality: str,
    slice_axis: str,
    hu_window: tuple[float, float],
    mr_percentiles: tuple[float, float],
    volume_in_plane_size: int | None,
    slice_stride: int,
    volume_cache: str,
    global_crop_size: int,
    num_global_crops: int,
    local_crop_size: int,
    num_local_crops: int,
    global_crop_scale: tuple[float, float],
    local_crop_scale: tuple[float, float],
    num_slices: int,
    volume_size: int,
    validation_threads: int,
) -> None:
    """Reject invalid settings when the config is parsed, before any file is decoded, naming the option
    (:class:`~jointssl.errors.ConfigError`: a user error, reported by the command line as one line)."""
    owner = "JointDataModule"
    for name, value in (("batch_size", batch_size), ("volume_batch_size", volume_batch_size),
                        ("global_crop_size", global_crop_size), ("local_crop_size", local_crop_size),
                        ("num_slices", num_slices), ("volume_size", volume_size), ("slice_stride", slice_stride),
                        ("validation_threads", validation_threads)):
        require(value >= 1, owner, name, ">= 1", value)
    require(num_workers >= 0, owner, "num_workers", ">= 0", num_workers)
    require(num_local_crops >= 0, owner, "num_local_crops", ">= 0", num_local_crops)
    # Both objectives of JointSSL predict one global crop's assignment from the other's (swapped prediction):
    # with one crop, training would fail at its first step, after every file was decoded.
    require(num_global_crops >= 2, owner, "num_global_crops", ">= 2 (the 2D objectives compare two global crops)",
            num_global_crops)
    for name, (low, high) in (("global_crop_scale", global_crop_scale), ("local_crop_scale", local_crop_scale)):
        require(0.0 < low <= high <= 1.0, owner, name, "(low, high) with 0 < low <= high <= 1", (low, high))
    require(on_bad_file in ("error", "skip"), owner, "on_bad_file", "'error' or 'skip'", on_bad_file)
    require(volume_modality in ("auto", "ct", "mr"), owner, "volume_modality", "'auto', 'ct' or 'mr'", volume_modality)
    require(slice_axis in ("axial", "coronal", "sagittal"), owner, "slice_axis", "'axial', 'coronal' or 'sagittal'",
            slice_axis)
    require(len(hu_window) == 2 and hu_window[0] < hu_window[1], owner, "hu_window", "(low, high) with low < high",
            hu_window)
    require(len(mr_percentiles) == 2 and 0 <= mr_percentiles[0] < mr_percentiles[1] <= 100, owner, "mr_percentiles",
            "(low, high) with 0 <= low < high <= 100", mr_percentiles)
    require(volume_in_plane_size is None or volume_in_plane_size >= 1, owner, "volume_in_plane_size",
            ">= 1 or null", volume_in_plane_size)
    require(volume_cache in ("auto", "none", "memory", "disk"), owner, "volume_cache",
            "'auto', 'none', 'memory' or 'disk'", volume_cache)
