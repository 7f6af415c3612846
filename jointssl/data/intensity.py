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

Step 1 is computed in float64 and only its result is cast to float32: a float32 volume may hold values near the
float32 limit (a "no data" fill of -3.4e38), and ``x - low`` or a percentile interpolated between two such values
overflows float32 to inf (and then NaN). Volumes with such values are refused anyway
(:func:`check_raw_intensities`), and :func:`check_unit_intensities` checks the result, what the encoder will be
given, once for every decoded image and volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import ScaleIntensityRange
from torch import Tensor

from jointssl.data.errors import BadFileError

NORMALIZE_MEAN = 0.5
NORMALIZE_STD = 0.25
# Values are converted to float64 this many at a time: the float64 copy of a whole 256 x 256 x 1000 volume would
# add 0.5 GB to the peak memory of loading it.
_FLOAT64_CHUNK = 1 << 22


def window_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip ``values`` to the window [low, high] and map it linearly to [0, 1] (float32; computed in float64, so
    that no float32 input overflows)."""
    if not high > low:
        raise ValueError(f"intensity window must have high > low, got ({low}, {high})")
    scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float64)
    values = np.asarray(values)
    unit = np.empty(values.shape, dtype=np.float32)
    flat_values, flat_unit = values.reshape(-1), unit.reshape(-1)  # reshape(-1) of `unit` is a view
    for start in range(0, flat_values.size, _FLOAT64_CHUNK):
        chunk = flat_values[start : start + _FLOAT64_CHUNK].astype(np.float64)
        flat_unit[start : start + _FLOAT64_CHUNK] = np.asarray(scale(chunk))
    return unit


def percentile_window(values: np.ndarray, percentiles: Sequence[float]) -> tuple[float, float]:
    """The window between two percentiles of ``values`` (numpy's default "linear" definition), or their full
    range when the percentiles coincide (a mostly empty image); ``(v, v)`` for a constant array.

    The order statistics are found in the input's own dtype (exact, no arithmetic) and interpolated in float64:
    ``np.percentile`` interpolates in float32 for float32 input, which overflows between -3e38 and 3e38."""
    flat = np.asarray(values).reshape(-1)
    if flat.size == 0:
        raise ValueError("percentile_window of an empty array")
    positions = np.asarray(percentiles, dtype=np.float64) / 100.0 * (flat.size - 1)
    lower = np.floor(positions).astype(np.int64)
    upper = np.minimum(lower + 1, flat.size - 1)
    ordered = np.partition(flat, np.unique(np.concatenate([lower, upper])))
    below, above = ordered[lower].astype(np.float64), ordered[upper].astype(np.float64)
    low, high = (float(v) for v in below + (above - below) * (positions - lower))
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


def check_unit_intensities(
    path: str, unit: np.ndarray, normalisation: str, raw: np.ndarray | None = None
) -> str | None:
    """Check an image's or volume's [0, 1] intensities (after normalisation and resizing: what the encoder will be
    given). Non-finite values are refused. For a volume (``raw`` given: the values it was normalised from, whose
    range the reason quotes) so are a constant result and no contrast left: every voxel at an end of the window,
    or all those strictly inside it equal (a window that clips everything, such as the CT window on MR values).
    A constant 2D image (an all-black slice) returns a note instead: slice exports such as BraTS's hold blank
    slices, and refusing them would stop a run on a sound dataset. Two grey levels are a 2D image, not nonsense.

    ``normalisation`` says how ``unit`` was made (e.g. "the MR normalisation (mr_percentiles 0.5..99.5)").
    Raises :class:`~jointssl.data.errors.BadFileError` naming ``path``; returns the note or None.
    """
    what = "voxel" if raw is not None else "pixel"
    finite = np.isfinite(unit)
    if not finite.all():
        count = int(unit.size - np.count_nonzero(finite))
        raise BadFileError(
            path, f"{count} NaN or infinite {what}(s) after {normalisation} and resizing{_raw_range(raw)}"
        )
    low, high = float(unit.min()), float(unit.max())
    if low == high and raw is None:
        return f"constant after {normalisation}: every {what} is {low:g} (a blank image: it trains, but shows nothing)"
    if low == high:
        raise BadFileError(path, f"constant after {normalisation}: every {what} is {low:g}{_raw_range(raw)}")
    if raw is None:
        return None
    inside = unit[(unit > 0.0) & (unit < 1.0)]
    if inside.size == 0 or float(inside.min()) == float(inside.max()):
        levels = sorted({low, high, *([float(inside.min())] if inside.size else [])})
        raise BadFileError(
            path,
            f"no contrast left after {normalisation}: every {what} is {' or '.join(f'{v:g}' for v in levels)}"
            f"{_raw_range(raw)}",
        )
    return None


def check_raw_intensities(path: str, values: np.ndarray) -> None:
    """Refuse values of magnitude :data:`FILL_MAGNITUDE` or more, before any arithmetic touches them: no scanner
    measures anything near 1e30, such values are a "no data" fill (often -3.4e38, the float32 limit), and below
    1e30 a sum of up to 10**8 values (an area-averaging resize) cannot overflow float32. Raises
    :class:`~jointssl.data.errors.BadFileError` naming ``path``."""
    low, high = float(np.min(values)), float(np.max(values))  # no full-size temporary for the usual volume
    if max(-low, high) >= FILL_MAGNITUDE:
        count = int(np.count_nonzero(np.abs(values) >= FILL_MAGNITUDE))
        raise BadFileError(
            path,
            f"{count} voxel(s) of magnitude 1e30 or more (values from {low:.6g} to {high:.6g}): a 'no data' fill, "
            "not intensities; set them to the background value (e.g. the minimum of the other voxels) or crop them",
        )


def _raw_range(raw: np.ndarray | None) -> str:
    """" (its values span <min>..<max>)" of the values an image or volume was normalised from."""
    if raw is None or raw.size == 0:
        return ""
    finite = raw if np.isfinite(raw).all() else raw[np.isfinite(raw)]
    if finite.size == 0:
        return ""
    return f" (its values span {float(finite.min()):.6g}..{float(finite.max()):.6g})"


#: Magnitudes from which a value is taken for a "no data" fill (:func:`check_raw_intensities`).
FILL_MAGNITUDE = 1e30
