"""Intensity normalisation, in two steps that every input of the encoder goes through, 2D images and volume slices
alike, in pretraining, downstream tasks and evaluation:

1. To [0, 1] per image or volume, when it is decoded: a fixed window (CT in Hounsfield units; DICOM images with
   their own window are windowed by their reader, per the DICOM standard) or a robust range between two
   percentiles of its values (MR, images without a window). Both are MONAI's ``ScaleIntensityRange`` (a window
   clipped and mapped linearly), so the data modules that compose MONAI dict transforms (``ScaleIntensityRanged``)
   and the loaders here compute the same thing.
2. To the encoder's input scale: ``(x - NORMALIZE_MEAN) / NORMALIZE_STD`` with fixed constants, not dataset
   statistics, so that 2D images and volume slices share one input distribution for the one shared encoder
   (``[0, 1]`` becomes ``[-2, 2]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import ScaleIntensityRange
from torch import Tensor

NORMALIZE_MEAN = 0.5
NORMALIZE_STD = 0.25


def window_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip ``values`` to the window [low, high] and map it linearly to [0, 1] (float32)."""
    if not high > low:
        raise ValueError(f"intensity window must have high > low, got ({low}, {high})")
    scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)
    return np.asarray(scale(np.asarray(values)), dtype=np.float32)


def percentile_window(values: np.ndarray, percentiles: Sequence[float]) -> tuple[float, float]:
    """The window between two percentiles of ``values``, or their full range when the percentiles coincide (a
    mostly empty image); ``(v, v)`` for a constant array."""
    low, high = (float(v) for v in np.percentile(values, list(percentiles)))
    if high > low:
        return low, high
    return float(np.min(values)), float(np.max(values))


def percentiles_to_unit(values: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """:func:`window_to_unit` with the :func:`percentile_window` of ``values``; a constant array maps to 0."""
    low, high = percentile_window(values, percentiles)
    if not high > low:
        return np.zeros(np.shape(values), dtype=np.float32)
    return window_to_unit(values, low, high)


def to_encoder_input(unit_intensities: Tensor) -> Tensor:
    """[0, 1] intensities -> the encoder's input scale (step 2 of the module docstring)."""
    return (unit_intensities - NORMALIZE_MEAN) / NORMALIZE_STD
