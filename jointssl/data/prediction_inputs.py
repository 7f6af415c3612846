"""What `jointssl predict` on a pretraining config embeds: every validated 2D image and every volume of the data
module, once each and without augmentation (JointDataModule.predict_dataloader; JointSSL.predict_step).

- an image: the whole image resized to ``global_crop_size`` (no crop), normalised as the training crops are
  (:func:`preprocess_image`, as `jointssl embed` and the online evaluation read images);
- a volume: all its slices as the training views are built from them (decoded and cached by
  :class:`~jointssl.data.volume_datasets.CachedVolumes`, resized in-plane to ``volume_size``, normalised), with no
  slab crop and no augmentation.

Items carry their ``path`` and ``kind`` (``image`` / ``volume``) for the prediction writer, and ``index``, their
position in the data module's image or volume records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

import torch.nn.functional as F
from torch import Tensor

from jointssl.data.discovery import ImageRecord
from jointssl.data.image_io import load_image_2d
from jointssl.data.intensity import to_encoder_input
from jointssl.data.volume_datasets import CachedVolumes
from jointssl.data.volume_io import resize_slices


def normalise(pixels: Tensor) -> Tensor:
    """Intensities in [0, 1] -> the encoder's input range: clamp to [0, 1], then (x - mean) / std with the
    training normalisation (:func:`jointssl.data.intensity.to_encoder_input`)."""
    return to_encoder_input(pixels.clamp(0, 1)).contiguous()


def preprocess_image(path: str, image_size: int) -> Tensor:
    """One 2D image as the encoder takes it: ``[1, image_size, image_size]`` float32, the whole image resized
    (antialiased bilinear, no crop) and normalised (:func:`normalise`)."""
    image = torch.from_numpy(load_image_2d(path)).float()[None, None]
    image = F.interpolate(image, size=(image_size, image_size), mode="bilinear", antialias=True)
    return normalise(image[0])


class PredictionImages(Dataset):
    """``{"kind": "image", "index", "path", "pixels": [1, S, S]}`` per image record."""

    def __init__(self, records: Sequence[ImageRecord], size: int) -> None:
        self.records = list(records)
        self.size = size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> dict[str, Any]:
        path = self.records[position].path
        return {"kind": "image", "index": position, "path": path, "pixels": preprocess_image(path, self.size)}


class PredictionVolumes(Dataset):
    """``{"kind": "volume", "index", "path", "slices": [N, 1, S, S]}`` per volume (every slice)."""

    def __init__(self, volumes: CachedVolumes, size: int) -> None:
        self.volumes = volumes
        self.size = size

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = self.volumes[position]
        slices = to_encoder_input(resize_slices(torch.as_tensor(item["volume"], dtype=torch.float32), self.size))
        return {"kind": "volume", "index": position, "path": item["path"], "slices": slices[:, None].contiguous()}


def collate_predictions(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch of one kind: ``pixels [B, 1, S, S]`` for images; for volumes ``slices [B, N, 1, S, S]`` padded with
    zero slices to the longest and ``padding_mask [B, N]`` (True = padding)."""
    batch: dict[str, Any] = {
        "kind": [s["kind"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "path": [s["path"] for s in samples],
    }
    if samples[0]["kind"] == "image":
        batch["pixels"] = torch.stack([s["pixels"] for s in samples])
        return batch
    longest = max(s["slices"].shape[0] for s in samples)
    batch["slices"] = torch.stack([
        torch.nn.functional.pad(s["slices"], (0, 0, 0, 0, 0, 0, 0, longest - s["slices"].shape[0])) for s in samples
    ])
    batch["padding_mask"] = torch.stack([
        torch.arange(longest) >= s["slices"].shape[0] for s in samples
    ])
    return batch
