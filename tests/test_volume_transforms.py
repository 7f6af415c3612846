"""Two-view 3D augmentation: shapes, padding, shared slab, in-plane-only geometry, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from jointssl.data.intensity import NORMALIZE_MEAN, NORMALIZE_STD
from jointssl.data.volume_transforms import VolumeViews

NO_AUGMENTATION = {
    "flip_p": 0.0,
    "affine_p": 0.0,
    "noise_p": 0.0,
    "smooth_p": 0.0,
    "bias_field_p": 0.0,
    "gamma_p": 0.0,
}
ALL_AUGMENTATIONS = {
    "flip_p": 0.5,
    "affine_p": 1.0,
    "noise_p": 1.0,
    "smooth_p": 1.0,
    "bias_field_p": 1.0,
    "gamma_p": 1.0,
}


def random_volume(slices=20, rows=40, cols=40, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((slices, rows, cols), dtype=np.float32)


def slice_valued_volume(slices: int, rows=24, cols=24) -> np.ndarray:
    """Slice k is constant (k + 1) / (slices + 1), so every slice can be recognised after any in-plane
    change."""
    values = (np.arange(slices, dtype=np.float32) + 1) / (slices + 1)
    return np.broadcast_to(values[:, None, None], (slices, rows, cols)).copy()


def unnormalise(views: torch.Tensor) -> torch.Tensor:
    return views * NORMALIZE_STD + NORMALIZE_MEAN


def test_shapes_dtypes_and_range():
    views, mask = VolumeViews(num_slices=8, size=16, seed=0, **ALL_AUGMENTATIONS)(random_volume())
    assert views.shape == (2, 8, 1, 16, 16) and views.dtype == torch.float32
    assert mask.shape == (8,) and mask.dtype == torch.bool and not mask.any()
    assert type(views) is torch.Tensor  # not a MONAI MetaTensor
    low, high = (0 - NORMALIZE_MEAN) / NORMALIZE_STD, (1 - NORMALIZE_MEAN) / NORMALIZE_STD
    assert views.min() >= low - 1e-6 and views.max() <= high + 1e-6


def test_short_volume_is_padded_at_the_end():
    volume = random_volume(slices=5)
    views, mask = VolumeViews(num_slices=8, size=16, seed=0, **ALL_AUGMENTATIONS)(volume)
    assert mask.tolist() == [False] * 5 + [True] * 3
    assert torch.all(views[:, 5:] == 0)
    assert all(views[v, k].abs().sum() > 0 for v in range(2) for k in range(5))


def test_both_views_cover_the_same_slab():
    volume = slice_valued_volume(slices=30)
    transform = VolumeViews(num_slices=8, size=12, seed=1, **NO_AUGMENTATION)
    starts = set()
    for _ in range(10):
        views, _ = transform(volume)
        assert torch.equal(views[0], views[1])  # no augmentation: the views differ only by augmentation
        per_slice = unnormalise(views[0, :, 0, 6, 6])
        first = round(float(per_slice[0]) * 31) - 1
        np.testing.assert_allclose(per_slice.numpy(), volume[first : first + 8, 0, 0], atol=1e-5)
        starts.add(first)
    assert len(starts) > 1, "the slab start is random"


def test_geometry_is_in_plane_only():
    """Flips, affine and smoothing never move content between slice indices (slice i of both views pairs
    up)."""
    volume = slice_valued_volume(slices=8)
    spatial_only = {**NO_AUGMENTATION, "flip_p": 0.5, "affine_p": 1.0, "smooth_p": 1.0}
    transform = VolumeViews(num_slices=8, size=24, seed=2, rotate_degrees=30, **spatial_only)
    for _ in range(3):
        views, _ = transform(volume)
        slice_max = unnormalise(views).amax(dim=(2, 3, 4))  # [2, 8]
        expected = torch.from_numpy(volume[:, 0, 0]).expand(2, 8)
        torch.testing.assert_close(slice_max, expected, atol=1e-4, rtol=0)


def test_non_square_slices_are_padded_not_stretched():
    volume = np.ones((4, 10, 20), dtype=np.float32)  # a 10 x 20 bright slab
    views, _ = VolumeViews(num_slices=4, size=20, seed=0, **NO_AUGMENTATION)(volume)
    image = unnormalise(views[0, 0, 0])
    assert torch.all(image[:5] == 0) and torch.all(image[-5:] == 0)  # 5 zero rows above and below
    assert torch.allclose(image[5:15], torch.ones(10, 20))


def test_seed_makes_views_repeatable_and_the_two_views_differ():
    volume = random_volume()
    first = VolumeViews(num_slices=8, size=16, seed=7, **ALL_AUGMENTATIONS)
    second = VolumeViews(num_slices=8, size=16, seed=7, **ALL_AUGMENTATIONS)
    views_a, _ = first(volume)
    views_b, _ = second(volume)
    assert torch.equal(views_a, views_b)
    assert not torch.equal(views_a[0], views_a[1])
    assert not torch.equal(first(volume)[0], views_a)  # the next call draws new augmentations
    first.set_random_state(7)
    assert torch.equal(first(volume)[0], views_a)


def test_default_seed_follows_torch_manual_seed():
    volume = random_volume()
    torch.manual_seed(3)
    views_a, _ = VolumeViews(num_slices=8, size=16, **ALL_AUGMENTATIONS)(volume)
    torch.manual_seed(3)
    views_b, _ = VolumeViews(num_slices=8, size=16, **ALL_AUGMENTATIONS)(volume)
    assert torch.equal(views_a, views_b)


class _SameVolume(Dataset):
    def __init__(self, transform: VolumeViews):
        self.transform = transform
        self.volume = random_volume(slices=6, rows=16, cols=16)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.volume)[0]


def test_dataloader_workers_draw_different_augmentations():
    transform = VolumeViews(num_slices=4, size=16, seed=0, **ALL_AUGMENTATIONS)
    loader = DataLoader(_SameVolume(transform), batch_size=None, num_workers=2)
    worker0_first, worker1_first = list(loader)  # item 0 from worker 0, item 1 from worker 1
    assert not torch.equal(worker0_first, worker1_first)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        VolumeViews(num_slices=0)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        VolumeViews(num_slices=4, size=8, seed=0)(np.zeros((4, 8), np.float32))
