"""2D multi-crop augmentation (SwAV/DINO style) for single-channel float images."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from jointssl.data.intensity import NORMALIZE_MEAN, NORMALIZE_STD


def blur_kernel_size(crop_size: int) -> int:
    """Odd Gaussian kernel of about 10% of the crop side (as in SimCLR/SwAV), at least 3."""
    size = max(3, int(0.1 * crop_size))
    return size if size % 2 == 1 else size + 1


class MultiCropTransform:
    """Turn one image tensor ``[1, H, W]`` (float, values in [0, 1]) into a list of augmented crops.

    The list holds ``num_global_crops`` crops of ``global_crop_size`` first, then ``num_local_crops`` crops of
    ``local_crop_size``; each is ``[1, size, size]``, normalised as ``(x - mean) / std``. Every crop is drawn
    independently: random resized crop (area fraction in ``*_scale``, aspect ratio 3/4..4/3), horizontal flip with
    ``flip_p``, with probability ``jitter_p`` brightness and contrast jitter (factors in ``1 +- brightness`` /
    ``1 +- contrast``, values clamped to [0, 1]), and with probability ``blur_p`` a Gaussian blur (sigma in
    ``blur_sigma``). Randomness comes from torch's global RNG; the training loader seeds it per sample (see
    :class:`~jointssl.data.sampling.SeededDataset`), so a sample's crops depend only on (seed, epoch, pass, slot).
    """

    def __init__(
        self,
        global_crop_size: int = 224,
        num_global_crops: int = 2,
        global_scale: tuple[float, float] = (0.14, 1.0),
        local_crop_size: int = 96,
        num_local_crops: int = 0,
        local_scale: tuple[float, float] = (0.05, 0.14),
        flip_p: float = 0.5,
        brightness: float = 0.4,
        contrast: float = 0.4,
        jitter_p: float = 0.8,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        mean: float = NORMALIZE_MEAN,
        std: float = NORMALIZE_STD,
    ):
        if num_global_crops < 1:
            raise ValueError(f"num_global_crops must be >= 1, got {num_global_crops}")
        if num_local_crops < 0:
            raise ValueError(f"num_local_crops must be >= 0, got {num_local_crops}")
        for name, size in (("global_crop_size", global_crop_size), ("local_crop_size", local_crop_size)):
            if size < 1:
                raise ValueError(f"{name} must be positive, got {size}")
        for name, (low, high) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got ({low}, {high})")
        if std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.global_crop_size = global_crop_size
        self.local_crop_size = local_crop_size
        self.num_global_crops = num_global_crops
        self.num_local_crops = num_local_crops
        self.mean = mean
        self.std = std
        self.global_crop = self._crop_pipeline(
            global_crop_size, global_scale, flip_p, brightness, contrast, jitter_p, blur_p, blur_sigma
        )
        self.local_crop = self._crop_pipeline(
            local_crop_size, local_scale, flip_p, brightness, contrast, jitter_p, blur_p, blur_sigma
        )

    @staticmethod
    def _crop_pipeline(
        size: int,
        scale: tuple[float, float],
        flip_p: float,
        brightness: float,
        contrast: float,
        jitter_p: float,
        blur_p: float,
        blur_sigma: tuple[float, float],
    ) -> v2.Compose:
        # torchvision v2 on a plain [1, H, W] float tensor: the crop resizes with antialiased bilinear interpolation
        # (stays within [0, 1]); ColorJitter's brightness/contrast support one channel (contrast blends with the
        # image mean) and clamp floats to [0, 1]; saturation/hue would need RGB and are not used.
        steps: list[torch.nn.Module] = [
            v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
            v2.RandomHorizontalFlip(p=flip_p),
        ]
        if jitter_p > 0 and (brightness > 0 or contrast > 0):
            steps.append(
                v2.RandomApply([v2.ColorJitter(brightness=brightness, contrast=contrast)], p=jitter_p)
            )
        if blur_p > 0:
            steps.append(
                v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=tuple(blur_sigma))], p=blur_p)
            )
        return v2.Compose(steps)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        if image.ndim != 3 or image.shape[0] != 1:
            raise ValueError(f"expected a single-channel image [1, H, W], got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise TypeError(f"expected a float image in [0, 1], got dtype {image.dtype}")
        crops = [self.global_crop(image) for _ in range(self.num_global_crops)]
        crops += [self.local_crop(image) for _ in range(self.num_local_crops)]
        return [(crop - self.mean) / self.std for crop in crops]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global={self.num_global_crops}x{self.global_crop_size}px, "
            f"local={self.num_local_crops}x{self.local_crop_size}px, mean={self.mean}, std={self.std})"
        )
