"""load_image_2d: orientation, intensity range and bad-file errors for PNG, JPEG and DICOM."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from jointssl.data.errors import BadFileError
from jointssl.data.image_io import check_image_size, load_image_2d, window
from tests.conftest import shared_path

# Non-square so that a transposed [W, H] result cannot pass: 24 rows x 40 columns.
HEIGHT, WIDTH = 24, 40


def quadrant_pattern(bright: int, dark: int, dtype=np.uint8) -> np.ndarray:
    """Bright top-left quadrant, dark elsewhere, and a mid-grey bottom-right quadrant."""
    pixels = np.full((HEIGHT, WIDTH), dark, dtype=dtype)
    pixels[: HEIGHT // 2, : WIDTH // 2] = bright
    pixels[HEIGHT // 2 :, WIDTH // 2 :] = (int(bright) + int(dark)) // 2
    return pixels


def assert_quadrants(image: np.ndarray, top_left: float, other: float, atol: float = 1e-6) -> None:
    assert image.dtype == np.float32
    assert image.shape == (HEIGHT, WIDTH)
    assert image.min() >= 0.0 and image.max() <= 1.0
    # Quadrant interiors (JPEG ringing stays near the edges).
    assert image[2 : HEIGHT // 2 - 2, 2 : WIDTH // 2 - 2] == pytest.approx(top_left, abs=atol)
    assert image[2 : HEIGHT // 2 - 2, WIDTH // 2 + 2 : -2] == pytest.approx(other, abs=atol)  # top-right
    assert image[HEIGHT // 2 + 2 : -2, 2 : WIDTH // 2 - 2] == pytest.approx(other, abs=atol)  # bottom-left


# ------------------------------------------------------------------------------------------------------------
# DICOM writers
# ------------------------------------------------------------------------------------------------------------


def _dicom_dataset(rows: int, columns: int, transfer_syntax: str, photometric: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    return ds


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    frames: int = 1,
    **tags,
) -> Path:
    """Uncompressed 16-bit DICOM of [H, W] (or [frames, H, W]) pixels; signed when any value is negative."""
    pixels = np.asarray(pixels)
    ds = _dicom_dataset(*pixels.shape[-2:], ExplicitVRLittleEndian, photometric)
    signed = bool(pixels.min() < 0)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_compressed_dicom(path: Path, pixels: np.ndarray, codec: str) -> Path:
    """8-bit MONOCHROME2 DICOM holding a Pillow-made JPEG baseline or lossless JPEG 2000 codestream."""
    buffer = io.BytesIO()
    if codec == "jpeg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=98)
        syntax = JPEGBaseline8Bit
    else:
        Image.fromarray(pixels).save(buffer, format="JPEG2000", no_jp2=True, irreversible=False)
        syntax = JPEG2000Lossless
    ds = _dicom_dataset(*pixels.shape, syntax, "MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def add_png_sbit(path: Path, significant_bits: int) -> None:
    """Insert an sBIT chunk after IHDR (Pillow cannot write one)."""
    data = path.read_bytes()
    ihdr_end = 8 + 8 + 13 + 4
    chunk = b"sBIT" + bytes([significant_bits])
    sbit = struct.pack(">I", 1) + chunk + struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(data[:ihdr_end] + sbit + data[ihdr_end:])


# ------------------------------------------------------------------------------------------------------------
# PNG / JPEG
# ------------------------------------------------------------------------------------------------------------


def test_png_8bit_gray_orientation_and_range(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(quadrant_pattern(200, 10)).save(path)
    image = load_image_2d(path)
    assert_quadrants(image, 200 / 255, 10 / 255)
    assert image[-1, -1] == pytest.approx(105 / 255)


def test_png_16bit_gray_scaled_by_bits_used(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(quadrant_pattern(3000, 100, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    # Maximum 3000 -> 12-bit data -> divided by 4095.
    assert_quadrants(load_image_2d(path), 3000 / 4095, 100 / 4095)


def test_png_16bit_uses_declared_significant_bits(tmp_path):
    path = tmp_path / "gray16_sbit.png"
    Image.fromarray(quadrant_pattern(200, 0, dtype=np.uint16)).save(path)
    add_png_sbit(path, 12)  # without it the maximum 200 would be read as 8-bit data
    assert_quadrants(load_image_2d(path), 200 / 4095, 0.0)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_png_colour_becomes_luma(tmp_path, mode):
    pixels = np.zeros((HEIGHT, WIDTH, len(mode)), dtype=np.uint8)
    pixels[: HEIGHT // 2, : WIDTH // 2, 0] = 255  # red top-left
    pixels[HEIGHT // 2 :, WIDTH // 2 :, 1] = 255  # green bottom-right
    if mode == "RGBA":
        pixels[..., 3] = 0  # fully transparent: alpha must not change the gray value
    path = tmp_path / f"colour_{mode}.png"
    Image.fromarray(pixels, mode=mode).save(path)
    image = load_image_2d(path)
    assert_quadrants(image, 0.299, 0.0)
    assert image[-1, -1] == pytest.approx(0.587)


def test_jpeg_gray_and_rgb(tmp_path):
    gray = quadrant_pattern(220, 20)
    Image.fromarray(gray).save(tmp_path / "gray.jpg", quality=95)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "rgb.jpeg", quality=95)
    for name in ("gray.jpg", "rgb.jpeg"):
        assert_quadrants(load_image_2d(tmp_path / name), 220 / 255, 20 / 255, atol=4 / 255)


def test_decoder_follows_content_not_extension(tmp_path):
    path = tmp_path / "actually_a_jpeg.png"
    Image.fromarray(quadrant_pattern(220, 20)).save(path, format="JPEG", quality=95)
    assert_quadrants(load_image_2d(path), 220 / 255, 20 / 255, atol=4 / 255)


# ------------------------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------------------------


def test_dicom_monochrome2_without_window_is_min_max_scaled(tmp_path):
    path = write_dicom(tmp_path / "m2.dcm", quadrant_pattern(1000, 0, dtype=np.uint16))
    assert_quadrants(load_image_2d(path), 1.0, 0.0)


def test_dicom_monochrome1_is_inverted(tmp_path):
    path = write_dicom(
        tmp_path / "m1.dcm", quadrant_pattern(1000, 0, dtype=np.uint16), photometric="MONOCHROME1"
    )
    assert_quadrants(load_image_2d(path), 0.0, 1.0)


def test_dicom_rescale_and_window(tmp_path):
    # HU = 2 * stored - 1024; window 40/400 spans HU -160..240.
    hu = np.full((HEIGHT, WIDTH), -1000.0)
    hu[: HEIGHT // 2, : WIDTH // 2] = 1000.0  # above the window -> 1
    hu[HEIGHT // 2 :, WIDTH // 2 :] = 40.0  # window centre -> ~0.5
    stored = ((hu + 1024) / 2).astype(np.uint16)
    path = write_dicom(
        tmp_path / "ct.dcm", stored, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400
    )
    image = load_image_2d(path)
    assert_quadrants(image, 1.0, 0.0)
    assert image[-1, -1] == pytest.approx(window(np.array(40.0), 40, 400), abs=1e-6)
    assert image[-1, -1] == pytest.approx(0.5, abs=0.01)


def test_dicom_signed_pixels_and_multiple_windows(tmp_path):
    hu = quadrant_pattern(500, -1000, dtype=np.int16)  # bottom-right: -250
    path = write_dicom(tmp_path / "signed.dcm", hu, WindowCenter=[0, 40], WindowWidth=[1000, 400])
    image = load_image_2d(path)  # first window: -500..500
    assert_quadrants(image, 1.0, 0.0)
    assert image[-1, -1] == pytest.approx(0.25, abs=0.01)


def test_dicom_monochrome1_with_window_inverts_after_windowing(tmp_path):
    stored = quadrant_pattern(3000, 1000, dtype=np.uint16)  # bottom-right 2000 = window centre
    path = write_dicom(
        tmp_path / "m1w.dcm", stored, photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=1000
    )
    image = load_image_2d(path)
    assert_quadrants(image, 0.0, 1.0)
    assert image[-1, -1] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("codec", ["jpeg", "jpeg2000"])
def test_compressed_dicom_decodes(tmp_path, codec):
    path = write_compressed_dicom(tmp_path / f"compressed_{codec}.dcm", quadrant_pattern(250, 50), codec)
    atol = 4 / 200 if codec == "jpeg" else 1e-6
    assert_quadrants(load_image_2d(path), 1.0, 0.0, atol=atol)  # min-max 50..250 -> 0..1


def test_extensionless_dicom_is_detected_by_preamble(tmp_path):
    path = write_dicom(tmp_path / "CT.1.2.840.10008.99", quadrant_pattern(1000, 0, dtype=np.uint16))
    assert_quadrants(load_image_2d(path), 1.0, 0.0)


def test_multiframe_dicom_is_rejected(tmp_path):
    frames = np.stack([quadrant_pattern(1000, 0, dtype=np.uint16)] * 3)
    path = write_dicom(tmp_path / "multi.dcm", frames, frames=3)
    with pytest.raises(BadFileError, match="multi-frame"):
        load_image_2d(path)


def test_dicom_without_pixel_data_is_rejected(tmp_path):
    ds = _dicom_dataset(4, 4, ExplicitVRLittleEndian, "MONOCHROME2")
    path = tmp_path / "no_pixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(BadFileError, match="no pixel data"):
        load_image_2d(path)


# ------------------------------------------------------------------------------------------------------------
# Bad files
# ------------------------------------------------------------------------------------------------------------


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


BAD_FILES = {
    "empty.png": (lambda: b"", "empty file"),
    "truncated.png": (lambda: _png_bytes()[: len(_png_bytes()) // 2], "cannot decode PNG"),
    "truncated.jpg": (lambda: _jpeg_bytes()[: len(_jpeg_bytes()) // 2], "cannot decode JPEG"),
    "random.png": (lambda: np.random.default_rng(1).bytes(500), "not a PNG file"),
    "notes.txt": (lambda: b"this is not an image\n", "unsupported file type ('.txt'"),
    "scan.bmp": (lambda: b"BM" + bytes(100), "unsupported file type ('.bmp'"),
    "garbage.dcm": (lambda: b"hello world, not dicom" * 10, "DICOM"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_raise_with_path_and_reason(tmp_path, name):
    make_bytes, reason = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(make_bytes())
    with pytest.raises(BadFileError) as raised:
        load_image_2d(path)
    assert raised.value.path == str(path)
    assert reason in raised.value.reason


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(BadFileError, match="file not found"):
        load_image_2d(tmp_path / "nope.png")
    with pytest.raises(BadFileError, match="not a regular file"):
        load_image_2d(tmp_path)


def test_multiframe_png_is_rejected(tmp_path):
    frames = [Image.fromarray(quadrant_pattern(v, 0)) for v in (100, 200)]
    path = tmp_path / "animated.png"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(BadFileError, match="multi-frame"):
        load_image_2d(path)


def test_tiny_image_fails_size_check(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((5, 30), dtype=np.uint8)).save(path)
    image = load_image_2d(path)
    with pytest.raises(BadFileError, match="5x30 pixels"):
        check_image_size(path, image, min_side=8)
    check_image_size(path, image, min_side=5)


# ------------------------------------------------------------------------------------------------------------
# Real reference data (skipped when ../shared/data is absent)
# ------------------------------------------------------------------------------------------------------------


def test_real_cxr_jpeg():
    folder = shared_path("cxr", "train", "NORMAL")
    for path in sorted(folder.iterdir())[:3]:
        image = load_image_2d(path)
        assert image.shape == (224, 224)
        assert 0.0 <= image.min() < 0.2 and 0.8 < image.max() <= 1.0


def _lungs_and_mediastinum(image: np.ndarray) -> tuple[float, float]:
    """Mean of the two lung fields and of the central column, in the band from 30% to 60% of the height."""
    height, width = image.shape
    band = image[int(0.3 * height) : int(0.6 * height)]
    lungs = np.concatenate(
        [band[:, int(0.2 * width) : int(0.35 * width)], band[:, int(0.65 * width) : int(0.8 * width)]]
    )
    return float(lungs.mean()), float(band[:, int(0.45 * width) : int(0.55 * width)].mean())


def test_real_dicom_cxr_monochrome2_jpeg_baseline():
    path = shared_path("dicom", "cxr", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    image = load_image_2d(path)
    assert image.shape == (1024, 1024)
    assert image.min() >= 0.0 and image.max() <= 1.0
    lungs, mediastinum = _lungs_and_mediastinum(image)
    assert lungs < mediastinum - 0.15  # air is dark, the mediastinum bright


def test_real_dicom_cxr_monochrome1_is_inverted():
    path = shared_path("dicom", "cxr", "RG1_UNCI.dcm")
    image = load_image_2d(path)
    assert image.shape == (1955, 1841)  # Rows x Columns
    assert image.min() >= 0.0 and image.max() <= 1.0
    lungs, mediastinum = _lungs_and_mediastinum(image)
    assert lungs < mediastinum - 0.1
    # The stored values run the other way (MONOCHROME1: low = white), so the inversion is what made this hold.
    raw_lungs, raw_mediastinum = _lungs_and_mediastinum(pydicom.dcmread(path).pixel_array.astype(np.float32))
    assert raw_lungs > raw_mediastinum


def test_real_ct_series_jpeg2000_slices_load_as_2d():
    folder = shared_path("dicom", "ct_series")
    paths = sorted(folder.iterdir())
    assert len(paths) == 20
    for path in paths:
        image = load_image_2d(path)  # extensionless, JPEG 2000 lossless, window 40/300 HU
        assert image.shape == (512, 512)
        assert image.min() == 0.0 and image.max() <= 1.0
        assert image[:16, :16].max() == 0.0  # air outside the body is below the window
        assert image[192:320, 192:320].mean() > 0.3  # soft tissue in the middle of the body


def test_real_png_slice():
    path = min(shared_path("slices2d", "MSD_Heart").glob("*.png"))
    image = load_image_2d(path)
    assert image.shape == Image.open(path).size[::-1]
    assert np.allclose(image * 255, np.asarray(Image.open(path)), atol=1e-3)
