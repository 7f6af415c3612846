"""jointssl.data.geometry: one world frame (any case accepted), voxel <-> world, the layout shape."""

from __future__ import annotations

import numpy as np
import pytest

from jointssl.data.geometry import layout_shape, parse_world_frame, voxel_to_world, world_to_voxel

AFFINE = np.array([[0.0, 0.0, -2.5, 40.0], [0.7, 0.0, 0.0, -12.0], [0.0, -0.8, 0.0, 7.0], [0.0, 0.0, 0.0, 1.0]])


def test_world_frame_spellings() -> None:
    assert [parse_world_frame(v) for v in ("lps", "LPS", "ras", "RAS")] == ["lps", "lps", "ras", "ras"]
    with pytest.raises(ValueError, match="'lps' or 'ras'"):
        parse_world_frame("xyz")


def test_voxel_world_round_trip_in_both_frames() -> None:
    voxel = np.array([[3.0, 4.5, 1.0]])
    ras = (AFFINE @ [*voxel[0], 1.0])[:3]
    np.testing.assert_allclose(voxel_to_world(AFFINE, "RAS"), AFFINE)
    np.testing.assert_allclose((voxel_to_world(AFFINE, "lps") @ [*voxel[0], 1.0])[:3], ras * [-1, -1, 1])
    np.testing.assert_allclose(world_to_voxel(AFFINE, ras * [-1, -1, 1], "lps"), voxel, atol=1e-12)
    np.testing.assert_allclose(world_to_voxel(AFFINE, ras, "ras"), voxel, atol=1e-12)


def test_layout_shape_follows_the_affine() -> None:
    # File axes run along A (axis 0), I (axis 1), L (axis 2): a (5, 6, 7) array is (7, 5, 6) in RAS order.
    assert layout_shape(AFFINE, (5, 6, 7), "axial") == (6, 5, 7)
    assert layout_shape(AFFINE, (5, 6, 7), "sagittal") == (7, 6, 5)
