"""The one intensity normalisation path (jointssl.data.intensity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jointssl.data.intensity import (
    NORMALIZE_MEAN,
    NORMALIZE_STD,
    percentile_window,
    percentiles_to_unit,
    to_encoder_input,
    window_to_unit,
)


def test_window_clips_and_maps_linearly_to_unit() -> None:
    values = np.array([-2000.0, -1000.0, 0.0, 500.0, 3000.0])
    np.testing.assert_allclose(window_to_unit(values, -1000.0, 1000.0), [0.0, 0.0, 0.5, 0.75, 1.0], atol=1e-7)
    assert window_to_unit(values, -1000.0, 1000.0).dtype == np.float32
    with pytest.raises(ValueError, match="high > low"):
        window_to_unit(values, 1.0, 1.0)


def test_percentile_window_falls_back_to_the_full_range() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=10_000)
    low, high = percentile_window(values, (1, 99))
    assert (low, high) == pytest.approx(tuple(np.percentile(values, [1, 99])))
    mostly_empty = np.zeros(1000)
    mostly_empty[:3] = 5.0  # the 1st and 99th percentiles are both 0
    assert percentile_window(mostly_empty, (1, 99)) == (0.0, 5.0)
    assert percentiles_to_unit(mostly_empty, (1, 99)).max() == 1.0
    np.testing.assert_array_equal(percentiles_to_unit(np.full((4, 4), 7.0), (1, 99)), np.zeros((4, 4)))


def test_encoder_input_scale() -> None:
    unit = torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(to_encoder_input(unit), (unit - NORMALIZE_MEAN) / NORMALIZE_STD)
    assert to_encoder_input(unit).tolist() == [-2.0, 0.0, 2.0]
