"""Map-style datasets producing multi-crop samples (2D image files, or any dataset of single images such as the
slices of volumes), and their collate function."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from jointssl.data.image_io import load_image_2d
from jointssl.data.discovery import ImageRecord

Sample = dict[str, Any]


class ImageDataset(Dataset):
    """2D images as multi-crop samples ``{"crops": list[Tensor[1, h, w]], "index": int, "source": str}``.

    ``index`` is the sample's *global* index: its position in ``records`` plus ``index_offset``. Memory banks are
    indexed by it, so a second stream (volumes) offsets its own indices past the images'. A file that fails to
    decode at training time (changed after validation) raises :class:`~jointssl.data.errors.BadFileError`
    naming the file.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Callable[[torch.Tensor], list[torch.Tensor]],
        index_offset: int = 0,
    ):
        if index_offset < 0:
            raise ValueError(f"index_offset must be >= 0, got {index_offset}")
        self.records = list(records)
        self.transform = transform
        self.index_offset = index_offset

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> Sample:
        record = self.records[position]
        image = torch.from_numpy(load_image_2d(record.path)).unsqueeze(0)  # [1, H, W]
        return {
            "crops": self.transform(image),
            "index": self.index_offset + position,
            "source": record.source,
        }


class MultiCropDataset(Dataset):
    """Multi-crop samples of a dataset of unaugmented single images, in the format of :class:`ImageDataset`.

    Each item ``{"image": Tensor[1, H, W] in [0, 1], "index": int, "source": str}`` of ``base`` (e.g. a
    :class:`~jointssl.data.volume_datasets.SliceDataset`) becomes ``{"crops": transform(image), "index",
    "source"}``, so that the slices of volumes can join the 2D image stream with the same augmentation. The
    index is passed through: ``base`` already gives global indices.
    """

    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], list[torch.Tensor]]):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, position: int) -> Sample:
        item = self.base[position]
        return {"crops": self.transform(item["image"]), "index": item["index"], "source": item["source"]}


def collate_multicrop(samples: Sequence[Sample]) -> Sample:
    """Stack multi-crop samples: ``{"crops": list[Tensor[B, 1, h, w]] (one per crop), "index": LongTensor[B],
    "keys": list[int] (the same indices as host ints: per-sample random choices read them without a device
    sync), "source": list[str]}``."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    num_crops = len(samples[0]["crops"])
    if any(len(sample["crops"]) != num_crops for sample in samples):
        raise ValueError("all samples of a batch must have the same number of crops")
    return {
        "crops": [torch.stack([sample["crops"][k] for sample in samples]) for k in range(num_crops)],
        "index": torch.tensor([sample["index"] for sample in samples], dtype=torch.long),
        "keys": [int(sample["index"]) for sample in samples],
        "source": [sample["source"] for sample in samples],
    }
