"""MultiCropTransform on single-channel float images."""

from __future__ import annotations

import pytest
import torch

from jointssl.data.intensity import NORMALIZE_MEAN, NORMALIZE_STD
from jointssl.data.transforms import MultiCropTransform, blur_kernel_size


def gradient_image(height: int = 40, width: int = 48) -> torch.Tensor:
    """[1, H, W] in [0, 1], brighter to the right and downwards."""
    rows = torch.linspace(0, 0.5, height)[:, None]
    cols = torch.linspace(0, 0.5, width)[None, :]
    return (rows + cols)[None]


def test_crop_count_shapes_and_normalised_range():
    torch.manual_seed(0)
    transform = MultiCropTransform(
        global_crop_size=32, num_global_crops=2, local_crop_size=16, num_local_crops=3
    )
    crops = transform(gradient_image())
    assert [tuple(c.shape) for c in crops] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 3
    low, high = (0 - NORMALIZE_MEAN) / NORMALIZE_STD, (1 - NORMALIZE_MEAN) / NORMALIZE_STD
    for crop in crops:
        assert crop.dtype == torch.float32
        assert low - 1e-5 <= crop.min() and crop.max() <= high + 1e-5
    assert not torch.equal(crops[0], crops[1])  # drawn independently


def test_no_augmentation_keeps_orientation_and_values():
    image = gradient_image(32, 32)
    transform = MultiCropTransform(
        global_crop_size=32, num_global_crops=1, global_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, blur_p=0.0
    )
    (crop,) = transform(image)
    # A full-area crop of a square image at its own size is the identity up to normalisation.
    assert torch.allclose(crop * NORMALIZE_STD + NORMALIZE_MEAN, image, atol=1e-5)


def test_flip_is_horizontal():
    image = gradient_image(32, 32)
    transform = MultiCropTransform(
        global_crop_size=32, num_global_crops=1, global_scale=(1.0, 1.0), flip_p=1.0, jitter_p=0.0, blur_p=0.0
    )
    (crop,) = transform(image)
    assert torch.allclose(crop * NORMALIZE_STD + NORMALIZE_MEAN, image.flip(-1), atol=1e-5)


def test_jitter_and_blur_change_intensities_within_range():
    torch.manual_seed(1)
    image = torch.zeros(1, 32, 32)
    image[:, 8:24, 8:24] = 0.8
    plain = MultiCropTransform(
        global_crop_size=32, num_global_crops=1, global_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, blur_p=0.0
    )
    jittered = MultiCropTransform(
        global_crop_size=32,
        num_global_crops=1,
        global_scale=(1.0, 1.0),
        flip_p=0.0,
        brightness=0.4,
        contrast=0.4,
        jitter_p=1.0,
        blur_p=0.0,
    )
    blurred = MultiCropTransform(
        global_crop_size=32,
        num_global_crops=1,
        global_scale=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        blur_p=1.0,
        blur_sigma=(1.5, 2.0),
    )
    reference = plain(image)[0]
    jitter_means = {round(float(jittered(image)[0].mean()), 4) for _ in range(5)}
    assert len(jitter_means) > 1
    blurred_crop = blurred(image)[0]
    assert blurred_crop.std() < reference.std()  # edges smoothed
    assert blurred_crop.mean() == pytest.approx(float(reference.mean()), abs=0.05)


def test_same_seed_same_crops():
    transform = MultiCropTransform(global_crop_size=24, local_crop_size=12, num_local_crops=2)
    torch.manual_seed(3)
    first = transform(gradient_image())
    torch.manual_seed(3)
    second = transform(gradient_image())
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_blur_kernel_is_odd_and_scales():
    assert blur_kernel_size(224) == 23
    assert blur_kernel_size(96) == 9
    assert blur_kernel_size(16) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_global_crops": 0},
        {"num_local_crops": -1},
        {"global_crop_size": 0},
        {"global_scale": (0.5, 0.2)},
        {"local_scale": (0.0, 0.1)},
        {"std": 0.0},
    ],
)
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ValueError):
        MultiCropTransform(**kwargs)


def test_rejects_non_single_channel_or_integer_input():
    transform = MultiCropTransform(global_crop_size=16)
    with pytest.raises(ValueError, match="single-channel"):
        transform(torch.rand(3, 20, 20))
    with pytest.raises(TypeError, match="float"):
        transform(torch.zeros(1, 20, 20, dtype=torch.uint8))
