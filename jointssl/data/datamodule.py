"""JointDataModule: the training data of jointssl (2D images now; 3D volumes join under a second key later)."""

from __future__ import annotations

import logging
import os
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader

from jointssl import distributed
from jointssl.data.datasets import ImageDataset, collate_multicrop
from jointssl.data.errors import BadFileError
from jointssl.data.sources import ImageRecord, discover_images, drop_bad_files, find_bad_files
from jointssl.data.synthetic import SyntheticData, generate_synthetic_images
from jointssl.data.transforms import MultiCropTransform

logger = logging.getLogger("jointssl.data")


class JointDataModule(pl.LightningDataModule):
    """Training batches ``{"images": {"crops": list[Tensor[B, 1, h, w]], "index": LongTensor[B],
    "source": list[str]}}``.

    The constructor arguments are the data section of the config.

    Args:
        images: 2D image sources: folders (searched recursively; PNG, JPEG, DICOM) or CSV manifests with columns
            ``path`` (relative to the CSV's folder), optional ``label`` and ``source``.
        synthetic: when set, ``prepare_data`` generates synthetic demo images and their folder
            (``<root>/images``) is appended to ``images``.
        batch_size: 2D images per batch per device.
        num_workers: DataLoader worker processes per device.
        global_crop_size: side of the global crops in pixels.
        num_global_crops: global crops per image (>= 2 for swapped-prediction losses).
        local_crop_size: side of the local crops in pixels.
        num_local_crops: local (small) crops per image.
        global_crop_scale: range of the image-area fraction covered by a global crop.
        local_crop_scale: range of the image-area fraction covered by a local crop.
        on_bad_file: what to do with files that cannot be decoded or are too small: ``"error"`` stops in
            ``setup`` with a list of every bad file; ``"skip"`` logs each one and trains without it.
        validation_threads: threads used to decode every image once during ``setup``.
        pin_memory: pin batches in page-locked memory (only takes effect when CUDA is available).
        persistent_workers: keep DataLoader workers alive between epochs (only with ``num_workers > 0``).
        seed: seed of the shuffling (single process) and of the workers' augmentation RNG; under DDP the
            sampler's order comes from Lightning's ``DistributedSampler`` (seeded by ``seed_everything``).
    """

    def __init__(
        self,
        images: list[str] = [],  # noqa: B006 - copied below, never mutated; `[]` reads best in the config schema
        synthetic: SyntheticData | None = None,
        batch_size: int = 64,
        num_workers: int = 2,
        global_crop_size: int = 224,
        num_global_crops: int = 2,
        local_crop_size: int = 96,
        num_local_crops: int = 0,
        global_crop_scale: tuple[float, float] = (0.14, 1.0),
        local_crop_scale: tuple[float, float] = (0.05, 0.14),
        on_bad_file: Literal["error", "skip"] = "error",
        validation_threads: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
        self.images = list(images)
        self.synthetic = synthetic
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_bad_file = on_bad_file
        self.validation_threads = validation_threads
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.seed = seed
        # Built here so that invalid crop settings fail when the config is parsed, not after validation.
        self.transform = MultiCropTransform(
            global_crop_size=global_crop_size,
            num_global_crops=num_global_crops,
            global_scale=tuple(global_crop_scale),
            local_crop_size=local_crop_size,
            num_local_crops=num_local_crops,
            local_scale=tuple(local_crop_scale),
        )
        self.image_dataset: ImageDataset | None = None

    # ------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ------------------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Generate the synthetic data (once per node; a no-op when it is already complete)."""
        if self.synthetic is not None:
            generate_synthetic_images(self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        """Discover and validate every image (so that bad data fails now, not hours into training), then build
        the dataset. Validation is split across ranks and its findings are shared, so each file is decoded once
        in total and every rank keeps the same records."""
        if stage not in (None, "fit") or self.image_dataset is not None:
            return
        if self.synthetic is not None:
            # Idempotent: returns at once after prepare_data; generates when setup is called on its own.
            generate_synthetic_images(self.synthetic)
        sources = self.image_sources
        if not sources:
            raise ValueError(
                "no 2D image sources configured: set `images` (folders or CSV manifests) or `synthetic`"
            )
        records = discover_images(sources, on_missing=self.on_bad_file)
        records = self._validate(records)
        if not records:
            raise ValueError(f"no usable 2D images found in {sources}")
        world = self._world_size()
        if len(records) < self.batch_size * world:
            raise ValueError(
                f"only {len(records)} usable 2D images, fewer than batch_size x world_size = "
                f"{self.batch_size} x {world}: with drop_last no complete batch exists; lower batch_size or add data"
            )
        self.image_dataset = ImageDataset(records, self.transform, index_offset=0)
        logger.info("2D images: %d files from %d source(s)", len(records), len(sources))

    def train_dataloader(self) -> CombinedLoader:
        """A ``CombinedLoader({"images": DataLoader})`` (mode ``max_size_cycle``). The inner DataLoader shuffles and
        drops the last partial batch; under DDP Lightning swaps its sampler for a ``DistributedSampler`` (disjoint
        shards, reshuffled every epoch through ``set_epoch``)."""
        dataset = self._require_setup()
        use_workers = self.num_workers > 0
        # Offset by rank: ranks would otherwise draw identical augmentation streams for their different images.
        generator = torch.Generator().manual_seed(self.seed + distributed.rank())
        images = DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=collate_multicrop,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and use_workers,
            generator=generator,
        )
        return CombinedLoader({"images": images}, mode="max_size_cycle")

    # ------------------------------------------------------------------------------------------------------
    # Sizes
    # ------------------------------------------------------------------------------------------------------

    @property
    def image_sources(self) -> list[str]:
        """The configured image sources plus the synthetic images folder, if any."""
        sources = list(self.images)
        if self.synthetic is not None:
            sources.append(str(self.synthetic.images_dir))
        return sources

    @property
    def dataset_size(self) -> int:
        """Number of 2D images in the training set (after dropping skipped files)."""
        return len(self._require_setup())

    @property
    def num_samples(self) -> int:
        """Size of the global sample-index space (rows of a memory bank): indices run over ``[0, num_samples)``.
        Equal to ``dataset_size`` while only 2D images are used; volumes will be indexed after the images."""
        return len(self._require_setup())

    @property
    def image_records(self) -> list[ImageRecord]:
        """The validated 2D image records; a sample's global index is its position here."""
        return self._require_setup().records

    # ------------------------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------------------------

    def _require_setup(self) -> ImageDataset:
        if self.image_dataset is None:
            raise RuntimeError(
                "JointDataModule is not set up: call setup('fit') first (Lightning does in fit)"
            )
        return self.image_dataset

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else distributed.world_size()

    def _validate(self, records: list[ImageRecord]) -> list[ImageRecord]:
        """Decode this rank's share of the files; gather every rank's findings; apply the bad-file policy."""
        world, rank = distributed.world_size(), distributed.rank()
        threads = max(1, min(self.validation_threads, os.cpu_count() or 1))
        own_share = records[rank::world]
        problems = [(error.path, error.reason) for error in find_bad_files(own_share, num_threads=threads)]
        if distributed.is_distributed():
            # Plain (path, reason) tuples: exceptions with two-argument constructors do not unpickle.
            gathered: list[list[tuple[str, str]]] = [[] for _ in range(world)]
            dist.all_gather_object(gathered, problems)
            problems = [problem for rank_problems in gathered for problem in rank_problems]
        order = {record.path: i for i, record in enumerate(records)}
        bad = [BadFileError(path, reason) for path, reason in sorted(problems, key=lambda p: order[p[0]])]
        logger.info("validated %d 2D images: %d bad", len(records), len(bad))
        return drop_bad_files(records, bad, self.on_bad_file, log=rank == 0)
