"""Hostile and unlucky input files of issue 14 (classes 2, 3, 6 and complex-valued volumes of 7), written
deterministically and small on disk: the memory bombs are streamed (zlib streams of zeros, sparse files), so that
writing one never holds what it decodes to.

Each writer takes a folder and returns the path of the file (or DICOM series folder) it wrote. Used by
tests/test_hostile_files.py; ``python -m tests.hostile_files FOLDER`` writes them all (for measuring by hand).
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage

from tests.bad_inputs import _dicom_dataset, ct_like, write_dicom_series, write_nifti

_ZEROS = bytes(1 << 20)


def _deflate_zeros(sink, count: int, compressor) -> None:
    """Feed ``count`` zero bytes through ``compressor`` into ``sink`` one MiB at a time."""
    while count > 0:
        chunk = _ZEROS[: min(count, len(_ZEROS))]
        sink.write(compressor.compress(chunk))
        count -= len(chunk)


# ------------------------------------------------------------------------------------------------------------
# 2. Memory bombs
# ------------------------------------------------------------------------------------------------------------


def png_bomb(folder: Path, side: int = 12000) -> Path:
    """A valid RGB PNG of side x side pixels, all black: 0.4 MB on disk, 432 MB of pixels, 1.7 GB as float32."""
    path = folder / "bomb.png"
    path.parent.mkdir(parents=True, exist_ok=True)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    with open(path, "wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n")
        file.write(chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)))
        data = io.BytesIO()
        compressor = zlib.compressobj(9)
        _deflate_zeros(data, side * (1 + 3 * side), compressor)  # each row: filter byte 0 + RGB zeros
        data.write(compressor.flush())
        file.write(chunk(b"IDAT", data.getvalue()))
        file.write(chunk(b"IEND", b""))
    return path


def dicom_deflated_bomb(folder: Path, side: int = 15000) -> Path:
    """A Deflated Explicit VR Little Endian secondary capture of side x side 16-bit pixels (zeros): 0.4 MB on disk,
    450 MB inflated. The dataset is written element by element and its pixel data streamed through zlib."""
    path = folder / "bomb.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _dicom_dataset(SecondaryCaptureImageStorage, side, side)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    pixel_bytes = side * side * 2
    with open(path, "wb") as file:
        file.write(b"\0" * 128 + b"DICM")
        meta = io.BytesIO()
        from pydicom.filebase import DicomFileLike

        meta_file = DicomFileLike(meta)
        meta_file.is_little_endian, meta_file.is_implicit_VR = True, False
        write_file_meta_info(meta_file, ds.file_meta, enforce_standard=True)
        file.write(meta.getvalue())
        body = io.BytesIO()
        body_file = DicomFileLike(body)
        body_file.is_little_endian, body_file.is_implicit_VR = True, False
        header_only = Dataset()
        header_only.update({element.tag: element for element in ds})
        write_dataset(body_file, header_only)
        # (7FE0,0010) OW, two reserved bytes, a 4-byte length, then the pixels.
        body.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        file.write(compressor.compress(body.getvalue()))
        _deflate_zeros(file, pixel_bytes, compressor)
        file.write(compressor.flush())
    return path


def nifti_header_bytes(shape: tuple[int, ...], dtype: str = "float32") -> bytes:
    """The 352 bytes (header + empty extension flag) that start a single-file NIfTI-1 of ``shape``."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.dtype(dtype))
    header.set_zooms((1.0,) * len(shape))
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4


def nifti_gz_bomb(folder: Path, shape: tuple[int, int, int] = (1024, 1024, 768)) -> Path:
    """A valid .nii.gz of float32 zeros, 3 GiB gunzipped (under the 2**31-voxel header limit), 3 MB on disk."""
    path = folder / "bomb.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as stream:
        stream.write(nifti_header_bytes(shape))
        remaining = int(np.prod(shape)) * 4
        while remaining > 0:
            stream.write(_ZEROS[: min(remaining, len(_ZEROS))])
            remaining -= len(_ZEROS)
    return path


def nifti_sparse_bomb(folder: Path, shape: tuple[int, int, int] = (1200, 1200, 1215)) -> Path:
    """An uncompressed .nii of float32 zeros, 7 GB long but sparse (a few KB of disk): the header and a hole."""
    path = folder / "sparse.nii"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.write(nifti_header_bytes(shape))
        file.truncate(352 + int(np.prod(shape)) * 4)
    return path


# ------------------------------------------------------------------------------------------------------------
# 6. Misleading reasons, 7. complex values
# ------------------------------------------------------------------------------------------------------------


def nifti_beyond_float32(folder: Path) -> Path:
    """float64 voxels, a few of them 1e300: finite, but beyond what float32 (training's type) holds."""
    data = ct_like().astype(np.float64)
    data[3, 3, 3] = 1e300
    data[4, 4, 4] = -1e300
    return write_nifti(folder / "huge_float64.nii.gz", data)


def nifti_one_bit(folder: Path) -> Path:
    """A NIfTI whose datatype is DT_BINARY (1 bit per voxel), which nibabel (and jointssl) cannot read."""
    path = write_nifti(folder / "one_bit.nii", ct_like().astype(np.uint8))
    raw = bytearray(path.read_bytes())
    raw[70:72] = struct.pack("<h", 1)  # datatype
    raw[72:74] = struct.pack("<h", 1)  # bitpix
    path.write_bytes(bytes(raw))
    return path


def dicom_zero_orientation(folder: Path) -> Path:
    """A 5-slice CT series whose ImageOrientationPatient is all zeros (in every slice, as a broken export writes
    it: the slice normal is zero, so every slice lies at 0 mm along it)."""
    return write_dicom_series(folder / "zero_orientation", orientations=[(0, 0, 0, 0, 0, 0)] * 5)


def dicom_short_pixel_data(folder: Path) -> Path:
    """A 5-slice CT series whose slice003.dcm holds half of its pixel data."""
    series = write_dicom_series(folder / "short_pixels")
    import pydicom

    slice_path = series / "slice003.dcm"
    ds = pydicom.dcmread(slice_path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(slice_path, enforce_file_format=True)
    return series


def dicom_broken_compressed_slice(folder: Path) -> Path:
    """A 5-slice RLE-compressed CT series (decoded by pydicom itself) whose slice002.dcm holds a third of its
    compressed stream: the headers are fine, only decoding that slice fails."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import RLELossless

    series = write_dicom_series(folder / "rle")
    for slice_path in sorted(series.iterdir()):
        ds = pydicom.dcmread(slice_path)
        ds.compress(RLELossless)
        if slice_path.name == "slice002.dcm":
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            ds.PixelData = encapsulate([frame[: len(frame) // 3]])
        ds.save_as(slice_path)
    return series


def nifti_trailing_singletons(folder: Path) -> Path:
    """(X, Y, Z, 1, 1): a 3D volume with two trailing singleton axes."""
    return write_nifti(folder / "singletons.nii.gz", ct_like()[..., None, None])


def npy_trailing_singletons(folder: Path) -> Path:
    path = folder / "singletons.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, ct_like().astype(np.float32)[..., None, None])
    return path


def nifti_complex(folder: Path) -> Path:
    data = ct_like().astype(np.complex64) + 1j * np.ones(ct_like().shape, dtype=np.complex64)
    return write_nifti(folder / "complex.nii.gz", data)


def npy_complex(folder: Path) -> Path:
    path = folder / "complex.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, ct_like().astype(np.complex128) * (1 + 1j))
    return path


def newline_named_png(folder: Path) -> Path:
    """A truncated PNG whose name holds a newline followed by a forged, clean-looking finding."""
    from tests.bad_inputs import encoded_image

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "x.png\nforged.png: error: forged finding\nz.png"
    path.write_bytes(encoded_image("PNG")[:60])
    return path


def non_utf8_named_png(folder: Path) -> Path:
    """A truncated PNG whose name is not UTF-8 (Latin-1 'é' as one byte)."""
    from tests.bad_inputs import encoded_image

    folder.mkdir(parents=True, exist_ok=True)
    path = Path(os.fsdecode(os.path.join(os.fsencode(folder), b"caf\xe9.png")))
    path.write_bytes(encoded_image("PNG")[:60])
    return path


def fifo_manifest(folder: Path) -> tuple[Path, Path]:
    """An image manifest listing a named pipe; returns (manifest, pipe)."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe = folder / "pipe.png"
    os.mkfifo(pipe)
    manifest = folder / "images.csv"
    manifest.write_text(f"path\n{pipe.name}\n")
    return manifest, pipe


WRITERS = (
    png_bomb, dicom_deflated_bomb, nifti_gz_bomb, nifti_sparse_bomb, nifti_beyond_float32, nifti_one_bit,
    dicom_zero_orientation, dicom_short_pixel_data, nifti_trailing_singletons, npy_trailing_singletons, nifti_complex,
    npy_complex, newline_named_png, non_utf8_named_png,
)

if __name__ == "__main__":
    root = Path(sys.argv[1])
    for write in WRITERS:
        print(write.__name__, write(root / write.__name__))
    print("fifo_manifest", fifo_manifest(root / "fifo_manifest"))
