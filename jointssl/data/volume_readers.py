"""Volume readers: one per file format, behind one interface (:class:`VolumeReader`).

A reader checks a file from its header alone (:meth:`VolumeReader.read_header`: empty, truncated or corrupt files,
broken headers, 2D or 4D images, bad voxel sizes, a missing data file) and decodes it
(:meth:`VolumeReader.decode`) into a MONAI ``MetaTensor`` whose affine maps file voxel indices to RAS millimetres,
MONAI's and nibabel's convention (:mod:`jointssl.data.geometry`). :func:`jointssl.data.volume_io.read_volume`
reorients and lays out what they decode.

==========================  ===========================  ===============================================
format                      suffixes                     decoded by
==========================  ===========================  ===============================================
NIfTI-1 / NIfTI-2           .nii, .nii.gz                nibabel (MONAI ``NibabelReader``)
FreeSurfer MGH              .mgh, .mgz                   nibabel (MONAI ``NibabelReader``)
NRRD                        .nrrd, .nhdr (+ data file)   pynrrd (MONAI ``NrrdReader``)
MetaImage                   .mha, .mhd (+ .raw / .zraw)  SimpleITK, the optional extra ``jointssl[formats]``
NumPy                       .npy                         numpy (no affine: ``H x W x D`` as stored)
DICOM series                a folder of slices           pydicom (MONAI ``PydicomReader``)
==========================  ===========================  ===============================================

Library choices: MONAI's ITKReader would read MetaImage through ``itk`` (110 MB of wheels, 560 MB installed, 7 s
for the first read while ITK loads its modules, and MONAI then imports it with every ``monai.data``); SimpleITK is
one 53 MB wheel that reads a file in 0.07 s including its import. It stays optional so that the core formats need
no compiled ITK. MONAI has no SimpleITK reader, so :class:`_SimpleITKReader` adapts it (ITK's LPS geometry to
MONAI's RAS affine, as ITKReader does).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pydicom
import pydicom.misc
import torch
from monai.data import MetaTensor, NibabelReader, NrrdReader, PydicomReader
from monai.data.image_reader import ImageReader
from monai.transforms import LoadImage
from monai.utils import MetaKeys, SpaceKeys

from jointssl.data.errors import BadFileError
from jointssl.data.file_checks import check_decoded_size, describe_os_error, is_regular_file

Modality = Literal["ct", "mr"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MGH_SUFFIXES = (".mgh", ".mgz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
METAIMAGE_SUFFIXES = (".mha", ".mhd")
NUMPY_SUFFIX = ".npy"
# DICOM media index files hold no slice.
NON_SLICE_DICOM_NAMES = frozenset({"DICOMDIR"})
# No volume jointssl trains on comes near this; a header that declares more is broken (and decoding it would
# try to allocate that much memory).
MAX_VOXELS = 2**31
FORMATS_EXTRA_HINT = "pip install 'jointssl[formats]'"

_DICOM_HEADER_TAGS = [
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "NumberOfFrames",
    "Modality",
]
# Direction cosines of ImageOrientationPatient are stored as decimal strings of limited precision.
_ORIENTATION_TOLERANCE = 1e-2
# Two slices closer than this along the normal are the same slice stored twice.
_DUPLICATE_POSITION_MM = 1e-2
# Relative deviation from the median slice gap above which a series has gaps or irregular spacing.
_SLICE_GAP_TOLERANCE = 0.1
# Bytes per voxel of the MetaImage element types (MetaIO's names).
_METAIMAGE_ITEM_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
# A MetaImage header is a few hundred bytes of text; more than this without ElementDataFile is not one.
_METAIMAGE_HEADER_LIMIT = 65536
# NRRD spaces whose axes MONAI's NrrdReader maps correctly (LPS is turned into RAS, RAS is kept); it would keep
# the affine of any other named space unchanged, i.e. take it for RAS.
_NRRD_SPACES = ("left-posterior-superior", "right-anterior-superior")


class MissingReaderError(ImportError):
    """A volume's format needs an optional dependency that is not installed (the message names the file and the
    pip command): an installation problem, not a bad file, so it stops the run instead of being skipped."""


@dataclass(frozen=True)
class VolumeHeader:
    """What a volume's header says, checked: the array shape as stored, its voxel -> RAS mm affine, and notes;
    and what decoding it makes (:attr:`decoded_bytes`), known before anything is decoded."""

    shape: tuple[int, int, int]  # file axes (i, j, k); for a DICOM series (columns, rows, slices)
    affine: np.ndarray | None  # voxel -> RAS mm; None for .npy (no geometry) and DICOM (known after decoding)
    notes: tuple[str, ...] = ()  # repairs a researcher should know about (e.g. a singleton 4th axis dropped)
    dicom_modality: Modality | None = None  # from the DICOM Modality tag (CT / MR), else None
    stored_type: str = "float32"  # the voxel type as stored (numpy's name)
    #: Bytes per voxel of the widest array decoding makes: the stored type, or float32 (what training reads),
    #: or float64 where the reader scales (NIfTI scl_slope / scl_inter).
    decoded_item_size: int = 4

    @property
    def decoded_bytes(self) -> int:
        """What decoding the volume makes, from the header alone (:func:`check_decoded_size`)."""
        return int(np.prod(self.shape, dtype=np.float64)) * max(4, self.decoded_item_size)

    def check_decoded_size(self, path: str, max_decoded_bytes: int | None) -> None:
        """Refuse a volume whose header declares more than ``max_decoded_bytes`` of decoded voxels."""
        what = f"{' x '.join(map(str, self.shape))} voxels of {self.stored_type}"
        if self.stored_type != "float32":
            what += f" decoded as {'float64' if max(4, self.decoded_item_size) == 8 else 'float32'}"
        check_decoded_size(path, self.decoded_bytes, what, max_decoded_bytes)


class VolumeReader:
    """One file format: :meth:`read_header` checks a file from its header, :meth:`decode` reads its voxels."""

    kind: str = ""  # what volume_io.volume_kind returns for the format
    format_name: str = ""
    suffixes: tuple[str, ...] = ()
    #: False for formats without an affine (.npy): their axes are taken as stored.
    world_geometry: bool = True

    def read_header(self, path: str) -> VolumeHeader:
        """Check the file from its header alone; raise :class:`BadFileError` naming it and the reason."""
        raise NotImplementedError

    def decode(self, path: str, dtype: type = np.float32) -> MetaTensor:
        """The voxels as a 3D float32 MetaTensor (file axes, no channel axis; trailing axes of length 1, which the
        header check allowed, dropped) with its voxel -> RAS affine. ``dtype`` float64 keeps values beyond float32
        finite, so that a caller can tell them from infinities (:func:`jointssl.data.volume_io.read_volume`).
        Failures are left to the caller, which reports them as undecodable data."""
        loader = _load_image(self, np.dtype(dtype).name)
        # Named at call time, LoadImage uses only this reader: registered, it would try every MONAI reader in turn
        # after a failure and report all of their tracebacks.
        image = loader(path, reader=loader.readers[-1])
        return drop_trailing_singletons(image)

    def image_reader(self) -> ImageReader:
        """The MONAI reader that decodes this format (used by :meth:`decode`)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------
# NIfTI and MGH (nibabel)


class NiftiReader(VolumeReader):
    kind = "nifti"
    format_name = "NIfTI"
    suffixes = NIFTI_SUFFIXES

    def read_header(self, path: str) -> VolumeHeader:
        """Reject from the header alone: empty/corrupt files, non-NIfTI content, broken headers, 2D or 4D images,
        bad voxel sizes, data shorter than the header declares (uncompressed files)."""
        _require_content(path)
        try:
            image = nib.load(path)
            header = image.header
            shape = tuple(int(d) for d in header.get_data_shape())
        except Exception as error:  # gzip, zlib, nibabel and OS errors all mean "not readable NIfTI"
            raise BadFileError(path, _unreadable_nifti_reason(path, error)) from error
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise BadFileError(path, f"not a NIfTI image (read as {type(image).__name__})")
        shape, notes = _checked_shape(path, shape, self.format_name)
        pixdim = _stored_pixdim(path, type(header))
        if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
            raise BadFileError(
                path,
                f"voxel sizes (pixdim) must be positive, got {pixdim.tolist()}: fix the header (nibabel: "
                "header.set_zooms)",
            )
        affine = _checked_affine(path, image.affine)
        dtype = header.get_data_dtype()
        _check_real_valued(path, dtype)
        if not path.lower().endswith(".gz"):
            # The proxy knows where the data starts (image.header was re-made on load: its offset reads 0).
            _check_data_size(path, path, int(image.dataobj.offset), shape, dtype.itemsize)
        # nibabel applies scl_slope / scl_inter in float64.
        scaled = any(value is not None for value in header.get_slope_inter())
        return VolumeHeader(shape, affine, notes, None, dtype.name, 8 if scaled else dtype.itemsize)

    def image_reader(self) -> ImageReader:
        # squeeze_non_spatial_dims turns (X, Y, Z, 1) into (X, Y, Z); true 4D files are rejected from the header.
        return NibabelReader(squeeze_non_spatial_dims=True)


class MghReader(VolumeReader):
    kind = "mgh"
    format_name = "MGH"
    suffixes = MGH_SUFFIXES

    def read_header(self, path: str) -> VolumeHeader:
        """Reject from the header alone: empty or corrupt files, broken headers, 2D or 4D images, non-positive voxel
        sizes, data shorter than the header declares (uncompressed .mgh)."""
        _require_content(path)
        try:
            image = nib.load(path)
            shape = tuple(int(d) for d in image.header.get_data_shape())
            zooms = np.asarray(image.header.get_zooms()[:3], dtype=np.float64)
            affine = image.affine
        except Exception as error:  # gzip, nibabel and OS errors all mean "not a readable MGH file"
            message = " ".join(str(error).split())
            raise BadFileError(path, f"not a readable MGH file ({type(error).__name__}: {message})") from error
        if not isinstance(image, nib.MGHImage):
            raise BadFileError(path, f"not an MGH image (read as {type(image).__name__})")
        shape, notes = _checked_shape(path, shape, self.format_name)
        if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
            raise BadFileError(path, f"broken MGH header: voxel sizes must be positive, got {zooms.tolist()}")
        affine = _checked_affine(path, affine)
        dtype = image.header.get_data_dtype()
        if not path.lower().endswith(".mgz"):
            _check_data_size(path, path, int(image.dataobj.offset), shape, dtype.itemsize)
        return VolumeHeader(shape, affine, notes, None, dtype.name, dtype.itemsize)

    def image_reader(self) -> ImageReader:
        return NibabelReader(squeeze_non_spatial_dims=True)


def _unreadable_nifti_reason(path: str, error: Exception) -> str:
    """Why nibabel could not read a NIfTI file: a broken header field when the header itself can be read
    (nibabel's own message then often names a consequence, e.g. "vox offset too low"), else nibabel's error."""
    fallback = f"not a readable NIfTI file ({type(error).__name__}: {' '.join(str(error).split())})"
    header_size = nib.Nifti1Header.template_dtype.itemsize  # 348
    try:
        with nib.openers.ImageOpener(path) as stream:
            block = stream.read(header_size)
    except EOFError:
        return "truncated: the compressed data ends inside the NIfTI header"
    except Exception:  # e.g. corrupt compressed data: nibabel's message says it best
        return fallback
    if len(block) < header_size:
        return f"not a readable NIfTI file: {len(block)} bytes of content, fewer than a {header_size}-byte header"
    # Byte order from sizeof_hdr, which must be 348: nibabel's guess uses dim[0], the very field that may be broken.
    sizes = {int.from_bytes(block[:4], "little"): "<", int.from_bytes(block[:4], "big"): ">"}
    if header_size not in sizes:
        # NIfTI-2 (540) headers nibabel reads itself; reaching here they are broken in ways it explains.
        return fallback if 540 in sizes else "not a readable NIfTI file: it does not start with a NIfTI header"
    raw = nib.Nifti1Header(binaryblock=block, endianness=sizes[header_size], check=False)
    if raw["magic"].item() not in (b"n+1", b"ni1"):
        return f"broken NIfTI header: magic is {raw['magic'].item()!r}, expected b'n+1' or b'ni1'"
    dims = int(raw["dim"][0])
    if not 1 <= dims <= 7:
        return f"broken NIfTI header: dim[0] (the number of dimensions) is {dims}, must be 1 to 7"
    code = int(raw["datatype"])
    if code not in nib.nifti1.data_type_codes.code:
        return f"broken NIfTI header: unknown datatype code {code}"
    if code == _NIFTI_DT_BINARY:
        return (
            "unsupported NIfTI data type: 1-bit voxels (DT_BINARY, datatype 1), which nibabel cannot read; "
            "save the volume as uint8"
        )
    message = " ".join(str(error).split())
    return f"truncated or corrupt NIfTI: the header is valid, the rest is not ({type(error).__name__}: {message})"


# NIfTI's DT_BINARY: 1 bit per voxel, in the standard's table of codes but read by no library jointssl uses.
_NIFTI_DT_BINARY = 1


def _stored_pixdim(path: str, header_class: type) -> np.ndarray:
    """The voxel sizes as stored: nib.load silently replaces zero pixdims by 1, hiding a broken header."""
    with nib.openers.ImageOpener(path) as stream:
        stored = header_class.from_fileobj(stream, check=False)
    return np.asarray(stored["pixdim"][1:4], dtype=np.float64)


# ----------------------------------------------------------------------------------------------------
# NRRD (pynrrd)


class NrrdFileReader(VolumeReader):
    kind = "nrrd"
    format_name = "NRRD"
    suffixes = NRRD_SUFFIXES

    def read_header(self, path: str) -> VolumeHeader:
        """Reject from the header alone: empty or non-NRRD files, broken headers, 2D or 4D images, no or degenerate
        space directions, spaces other than LPS / RAS, a missing detached data file (.nhdr)."""
        import nrrd  # pynrrd, a core dependency; imported here so that importing jointssl.data stays light

        _require_content(path)
        try:
            header = nrrd.read_header(path)
        except Exception as error:  # pynrrd raises NRRDError, and UnicodeDecodeError / OSError for binary junk
            message = " ".join(str(error).split())
            raise BadFileError(path, f"not a readable NRRD file ({type(error).__name__}: {message})") from error
        try:
            shape = tuple(int(s) for s in header["sizes"])
        except KeyError:
            raise BadFileError(path, "broken NRRD header: no 'sizes' field") from None
        shape, notes = _checked_shape(path, shape, self.format_name)
        space = header.get("space")
        if space is not None and space not in _NRRD_SPACES:
            raise BadFileError(
                path, f"NRRD space {space!r} is not read; expected {' or '.join(_NRRD_SPACES)} (or none, taken as LPS)"
            )
        if "space directions" not in header:
            raise BadFileError(path, "NRRD header has no 'space directions': voxel geometry unknown")
        directions = np.asarray(header["space directions"], dtype=np.float64)[:3, :3]
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)[:3]
        # As MONAI's NrrdReader: the rows of 'space directions' are the axes' steps; no space is taken as LPS.
        affine = np.eye(4)
        affine[:3, :3], affine[:3, 3] = directions.T, origin
        if space != "right-anterior-superior":
            affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        affine = _checked_affine(path, affine)
        data_file = header.get("data file") or header.get("datafile")
        if data_file is not None:
            data_path = os.path.join(os.path.dirname(path), str(data_file))
            if not os.path.isfile(data_path):
                raise BadFileError(path, f"data file {data_file} (named by the header's 'data file') does not exist")
        dtype = _nrrd_dtype(path, header)
        return VolumeHeader(shape, affine, notes, None, dtype.name, dtype.itemsize)

    def image_reader(self) -> ImageReader:
        return NrrdReader()


def _nrrd_dtype(path: str, header: dict) -> np.dtype:
    """The voxel type a NRRD header declares, as pynrrd decodes it."""
    from nrrd.reader import _determine_datatype  # pynrrd's own mapping of the 'type' field (no public one)

    try:
        return np.dtype(_determine_datatype(header))
    except Exception as error:  # noqa: BLE001 - pynrrd raises NRRDError / KeyError for an unknown or missing type
        raise BadFileError(path, f"broken NRRD header: voxel type {header.get('type')!r} ({error})") from None


# ----------------------------------------------------------------------------------------------------
# MetaImage (SimpleITK, optional)


class MetaImageReader(VolumeReader):
    kind = "metaimage"
    format_name = "MetaImage"
    suffixes = METAIMAGE_SUFFIXES

    def read_header(self, path: str) -> VolumeHeader:
        """Reject from the header alone: empty or non-MetaImage files, broken headers, 2D or 4D or multi-channel
        images, non-positive spacing, a missing or short data file (.raw next to a .mhd, or the data of a .mha).

        The header text is checked here because SimpleITK reports every failure to read (a missing or truncated
        .raw included) as "File cannot be read ... No such file or directory" and prints MetaIO's real reason
        to stderr only."""
        _require_content(path)
        fields, header_bytes = _metaimage_fields(path)
        missing = [key for key in ("NDims", "DimSize", "ElementType", "ElementDataFile") if key not in fields]
        if missing:
            raise BadFileError(path, f"broken MetaImage header: no {', '.join(missing)}")
        try:
            shape = tuple(int(v) for v in fields["DimSize"].split())
            ndims = int(fields["NDims"])
        except ValueError:
            raise BadFileError(path, f"broken MetaImage header: DimSize {fields['DimSize']!r} is not integers") from None
        if len(shape) != ndims:
            raise BadFileError(path, f"broken MetaImage header: NDims {ndims} but DimSize {fields['DimSize']!r}")
        shape, notes = _checked_shape(path, shape, self.format_name)
        element_type = fields["ElementType"].strip()
        if element_type not in _METAIMAGE_ITEM_SIZES:
            raise BadFileError(path, f"broken MetaImage header: unknown ElementType {element_type!r}")
        channels = _metaimage_number(path, fields, "ElementNumberOfChannels", "1")
        if channels != 1:
            raise BadFileError(path, f"{channels} channels per voxel; a single-channel volume is expected")
        spacing = fields.get("ElementSpacing", fields.get("ElementSize", "1 1 1")).split()
        if any(not _is_positive_number(v) for v in spacing):
            raise BadFileError(path, f"broken MetaImage header: ElementSpacing must be positive, got {spacing}")
        data_file = fields["ElementDataFile"].strip()
        compressed = fields.get("CompressedData", "False").strip().lower() == "true"
        item_size = _METAIMAGE_ITEM_SIZES[element_type]
        if data_file.upper() == "LOCAL":
            if not compressed:
                _check_data_size(path, path, header_bytes, shape, item_size)
        elif data_file.upper() != "LIST" and "%" not in data_file:  # one data file (LIST / patterns: several)
            data_path = os.path.join(os.path.dirname(path), data_file)
            if not os.path.isfile(data_path):
                raise BadFileError(path, f"data file {data_file} (named by ElementDataFile) does not exist")
            if not compressed:
                _check_data_size(path, data_path, max(0, _metaimage_number(path, fields, "HeaderSize", "0")), shape, item_size)
        sitk = _simpleitk(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise BadFileError(path, "broken MetaImage header (SimpleITK cannot read it)") from error
        affine = _checked_affine(path, _itk_ras_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin()))
        return VolumeHeader(shape, affine, notes, None, element_type, item_size)

    def decode(self, path: str, dtype: type = np.float32) -> MetaTensor:
        _simpleitk(path)  # the clear message when the extra is missing, not MONAI's "no suitable reader"
        return super().decode(path, dtype)

    def image_reader(self) -> ImageReader:
        return _SimpleITKReader()


class _SimpleITKReader(ImageReader):
    """A MONAI reader on SimpleITK (MONAI has none): the array in ITK index order (i, j, k) and the voxel -> RAS
    affine from ITK's LPS direction, spacing and origin, as MONAI's ITKReader gives them."""

    def verify_suffix(self, filename) -> bool:
        return str(filename).lower().endswith(METAIMAGE_SUFFIXES)

    def read(self, data, **kwargs):
        import SimpleITK as sitk

        return sitk.ReadImage(str(data[0] if isinstance(data, (list, tuple)) else data))

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        import SimpleITK as sitk

        while img.GetDimension() > 3:  # trailing axes of length 1 (checked in the header): the 3D volume they hold
            img = img[(slice(None),) * (img.GetDimension() - 1) + (0,)]
        array = np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0))  # [k, j, i] -> [i, j, k]
        affine = _itk_ras_affine(img.GetDirection(), img.GetSpacing(), img.GetOrigin())
        meta = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            MetaKeys.SPACE: SpaceKeys.RAS,
        }
        return array, meta


def _itk_ras_affine(direction: Sequence[float], spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """Voxel -> RAS mm from ITK's geometry (direction cosines row-major, columns = index axes; LPS mm)."""
    size = len(spacing)
    lps = np.eye(4)
    lps[:3, :3] = (np.asarray(direction, dtype=np.float64).reshape(size, size) @ np.diag(spacing))[:3, :3]
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)[:3]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _metaimage_fields(path: str) -> tuple[dict[str, str], int]:
    """The ``key = value`` fields of a MetaImage header up to ElementDataFile, and the header's length in bytes
    (where a .mha's LOCAL data starts)."""
    with open(path, "rb") as handle:
        block = handle.read(_METAIMAGE_HEADER_LIMIT)
    fields: dict[str, str] = {}
    position = 0
    for line in block.splitlines(keepends=True):
        position += len(line)
        key, separator, value = line.decode("latin-1").partition("=")
        if not separator:
            if line.strip():
                break
            continue
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields, position
    if not fields:
        raise BadFileError(path, "not a MetaImage file: it does not start with 'key = value' header lines")
    return fields, position


def _metaimage_number(path: str, fields: dict[str, str], key: str, default: str) -> int:
    try:
        return int(fields.get(key, default) or default)
    except ValueError:
        raise BadFileError(path, f"broken MetaImage header: {key} {fields[key]!r} is not an integer") from None


def _is_positive_number(text: str) -> bool:
    try:
        return bool(np.isfinite(float(text)) and float(text) > 0)
    except ValueError:
        return False


def _simpleitk(path: str):
    """The SimpleITK module, or :class:`MissingReaderError` naming the file and the extra to install."""
    try:
        import SimpleITK
    except ImportError:
        raise MissingReaderError(
            f"{path}: reading MetaImage (.mha/.mhd) needs SimpleITK, an optional dependency: {FORMATS_EXTRA_HINT}"
        ) from None
    return SimpleITK


# ----------------------------------------------------------------------------------------------------
# NumPy


class NumpyReader(VolumeReader):
    """A real-valued ``H x W x D`` (optionally ``H x W x D x 1``) array, the layout of the paper's code; no
    affine (``world_geometry`` False), no pickled objects."""

    kind = "npy"
    format_name = "NumPy"
    suffixes = (NUMPY_SUFFIX,)
    world_geometry = False

    def read_header(self, path: str) -> VolumeHeader:
        array = self._memory_map(path)
        _check_real_valued(path, array.dtype)
        if not np.issubdtype(array.dtype, np.number):
            raise BadFileError(path, f"array of dtype {array.dtype}; a real-valued numeric volume is expected")
        shape, notes = _checked_shape(path, tuple(int(s) for s in array.shape), self.format_name, note_4d=False)
        return VolumeHeader(shape, None, notes, None, array.dtype.name, array.dtype.itemsize)

    def decode(self, path: str, dtype: type = np.float32) -> MetaTensor:
        array = np.load(path, allow_pickle=False)
        return drop_trailing_singletons(MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))))

    @staticmethod
    def _memory_map(path: str) -> np.ndarray:
        _require_content(path)
        try:
            return np.load(path, allow_pickle=False, mmap_mode="r")  # the header, without reading the data
        except Exception:  # noqa: BLE001 - not mappable (object arrays, truncated): numpy's reason comes below
            pass
        try:
            return np.load(path, allow_pickle=False)
        except Exception as error:  # numpy raises ValueError/OSError/EOFError/UnpicklingError
            raise BadFileError(path, f"not a readable .npy array ({type(error).__name__}: {error})") from error


# ----------------------------------------------------------------------------------------------------
# DICOM series (pydicom)


class DicomSeriesReader(VolumeReader):
    kind = "dicom"
    format_name = "DICOM series"

    def read_header(self, path: str) -> VolumeHeader:
        """Check from the headers that a folder holds exactly one complete, regular series."""
        shape, modality, item_size = _check_dicom_series(path)
        return VolumeHeader(shape, None, (), modality, f"{8 * item_size}-bit pixels", item_size)

    def decode(self, path: str, dtype: type = np.float32) -> MetaTensor:
        try:
            return super().decode(path, dtype)
        except _SliceDecodeError as error:
            raise BadFileError(path, str(error)) from error.__cause__

    def image_reader(self) -> ImageReader:
        # fname_regex=None: only files that are DICOM (preamble + "DICM") belong to the series, not stray files.
        return _SliceNormalPydicomReader(fname_regex=None)


class _SliceDecodeError(Exception):
    """One slice of a series whose pixel data cannot be decoded (its file name and why)."""


class _SliceNormalPydicomReader(PydicomReader):
    """MONAI's PydicomReader, but stacking a series by position along the slice normal.

    MONAI stacks by InstanceNumber, which some scanners assign in acquisition order, and silently drops slices
    without one; the affine then assumes the stack is ordered along the normal. Renumbering the (freshly read,
    private) datasets by their position makes the stack and the affine agree.
    """

    def _combine_dicom_series(self, data, filenames):
        positions = [_position_along_normal(ds) for ds in data]
        for rank, index in enumerate(np.argsort(positions, kind="stable")):
            data[index].InstanceNumber = rank
        return super()._combine_dicom_series(data, filenames)

    def _get_array_data(self, img, filename):
        # MONAI decodes slice by slice and lets the codec's error through without the file: with hundreds of
        # slices, the one that fails (a broken JPEG stream, a codec pydicom lacks) must be named.
        try:
            return super()._get_array_data(img, filename)
        except Exception as error:  # pydicom's plugins raise several types
            syntax = getattr(getattr(img, "file_meta", None), "TransferSyntaxUID", None)
            encoding = f"{syntax.name} ({syntax})" if syntax is not None else "unknown transfer syntax"
            message = " ".join(str(error).split())
            raise _SliceDecodeError(
                f"{Path(filename).name}: cannot decode its pixel data, {encoding}: {type(error).__name__}: {message}"
            ) from error


def _check_dicom_series(folder: str) -> tuple[tuple[int, int, int], Modality | None, int]:
    """Check from the headers that a folder holds exactly one complete, regular series; return its shape
    (columns, rows, slices), modality and bytes per stored sample (BitsAllocated / 8).

    MONAI stacks whatever files a folder holds (it only warns about mismatched sizes), so a folder with two
    series, mixed orientations, or a missing or duplicated slice would otherwise load as a wrong volume.
    """
    files = dicom_files(folder)
    if not files:
        raise BadFileError(folder, "folder holds no DICOM files")
    headers = []
    for file in files:
        try:
            # PixelData is read as a deferred element: its presence is known without loading the pixels.
            headers.append(
                pydicom.dcmread(file, specific_tags=[*_DICOM_HEADER_TAGS, "PixelData"], defer_size=256)
            )
        except Exception as error:  # pydicom raises several types for broken files
            message = " ".join(str(error).split())
            raise BadFileError(folder, f"{file.name}: unreadable DICOM header ({message})") from error
    without_pixels = [f.name for f, ds in zip(files, headers) if "PixelData" not in ds]
    if without_pixels:
        raise BadFileError(
            folder,
            f"{len(without_pixels)} DICOM file(s) without pixel data (not an image slice), e.g. "
            f"{without_pixels[0]}: remove them from the series folder",
        )
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in headers})
    if len(series) > 1:
        raise BadFileError(
            folder, f"{len(series)} different series (SeriesInstanceUID) in one folder; one series per folder"
        )
    lacking = [f.name for f, ds in zip(files, headers) if not _has_geometry(ds)]
    if lacking:
        raise BadFileError(
            folder,
            f"{len(lacking)} slice(s) lack ImagePositionPatient/ImageOrientationPatient, e.g. {lacking[0]}",
        )
    orientations = [_orientation(ds) for ds in headers]
    invalid = [(f.name, o) for f, o in zip(files, orientations) if not _is_valid_orientation(o)]
    if invalid:
        name, values = invalid[0]
        raise BadFileError(
            folder,
            f"{len(invalid)} slice(s) with an invalid ImageOrientationPatient, e.g. {name}: "
            f"{[round(float(v), 6) for v in values]}; its row and column directions must be unit vectors at right "
            "angles (the slice positions along the normal cannot be known)",
        )
    orientations = np.array(orientations)
    if not np.allclose(orientations, orientations[0], atol=1e-4):
        distinct = len({tuple(np.round(o, 4)) for o in orientations})
        raise BadFileError(folder, f"mixed slice orientations ({distinct} different ImageOrientationPatient)")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in headers}
    if len(sizes) > 1:
        raise BadFileError(folder, f"slices of different sizes {sorted(sizes)}")
    for file, ds in zip(files, headers):
        shortfall = _pixel_data_shortfall(ds)
        if shortfall is not None:
            raise BadFileError(
                folder,
                f"{file.name}: truncated pixel data: {shortfall[0]} bytes where Rows x Columns x SamplesPerPixel x "
                f"BitsAllocated / 8 needs {shortfall[1]}",
            )
    positions = np.array([_position_along_normal(ds) for ds in headers])
    order = np.argsort(positions, kind="stable")
    gaps = np.diff(positions[order])
    duplicates = np.flatnonzero(gaps < _DUPLICATE_POSITION_MM)
    if duplicates.size:
        first = duplicates[0]
        names = (files[order[first]].name, files[order[first + 1]].name)
        raise BadFileError(
            folder,
            f"{duplicates.size} duplicated slice position(s), e.g. {names[0]} and {names[1]} both at "
            f"{positions[order[first]]:.2f} mm along the slice normal",
        )
    step = float(np.median(gaps)) if gaps.size else 0.0  # one slice: read_volume's min_slices refuses it
    irregular = np.flatnonzero(np.abs(gaps - step) > _SLICE_GAP_TOLERANCE * step)
    if irregular.size:
        worst = float(gaps[irregular[np.argmax(np.abs(gaps[irregular] - step))]])
        what = "missing slice(s)" if worst > step else "irregular slice spacing"
        raise BadFileError(
            folder, f"{what}: a gap of {worst:.2f} mm between slices where the spacing is {step:.2f} mm"
        )
    rows, columns = sizes.pop()
    modality = str(headers[0].get("Modality", "")).upper()
    samples = max(int(ds.get("SamplesPerPixel", 1) or 1) for ds in headers)
    item_size = max(-(-int(ds.get("BitsAllocated", 16) or 16) // 8) for ds in headers)
    shape = (columns, rows, len(headers))
    return shape, {"CT": "ct", "MR": "mr"}.get(modality), samples * item_size  # type: ignore[return-value]


def _has_geometry(ds: pydicom.Dataset) -> bool:
    return "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds


def _orientation(ds: pydicom.Dataset) -> np.ndarray:
    return np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)


def _is_valid_orientation(orientation: np.ndarray) -> bool:
    """Six direction cosines: two unit vectors at right angles (all zeros, a common export bug, is not)."""
    if orientation.shape != (6,) or not np.all(np.isfinite(orientation)):
        return False
    row, column = orientation[:3], orientation[3:]
    return bool(
        abs(np.linalg.norm(row) - 1) < _ORIENTATION_TOLERANCE
        and abs(np.linalg.norm(column) - 1) < _ORIENTATION_TOLERANCE
        and abs(np.dot(row, column)) < _ORIENTATION_TOLERANCE
    )


def _pixel_data_shortfall(ds: pydicom.Dataset) -> tuple[int, int] | None:
    """(bytes held, bytes needed) of a slice whose native (uncompressed) pixel data is shorter than its image
    attributes need; None otherwise (encapsulated data is checked by its decoder)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    element = ds.get_item("PixelData")
    if element is None or (syntax is not None and syntax.is_compressed):
        return None
    held = int(getattr(element, "length", None) or len(element.value or b""))
    if held == 0xFFFFFFFF:  # undefined length: encapsulated
        return None
    try:
        bits = int(ds.BitsAllocated)
        needed = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
        needed *= int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None  # missing attributes: the decoder says what is wrong
    needed = (needed * bits + 7) // 8
    return (held, needed) if held < needed else None


def _position_along_normal(ds: pydicom.Dataset) -> float:
    """Position of a slice along the normal of its plane (row direction x column direction), in mm."""
    orientation = _orientation(ds)
    normal = np.cross(orientation[:3], orientation[3:])
    return float(np.dot([float(v) for v in ds.ImagePositionPatient], normal))


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files directly inside a folder (not its subfolders, not a DICOMDIR index), sorted by name.

    Raises :class:`BadFileError` naming the folder when it, or a file in it, cannot be read: a slice that
    cannot be read cannot be known not to belong to the series.
    """
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError as error:
        raise BadFileError(folder, f"cannot list the folder: {describe_os_error(folder, error)}") from None
    files = []
    for entry in entries:
        if entry.name in NON_SLICE_DICOM_NAMES or not is_regular_file(entry):
            continue
        try:
            if pydicom.misc.is_dicom(entry):
                files.append(entry)
        except OSError as error:
            raise BadFileError(folder, f"{entry.name}: {describe_os_error(entry, error)}") from None
    return files


# ----------------------------------------------------------------------------------------------------
# The readers, and checks they share

NIFTI = NiftiReader()
MGH = MghReader()
NRRD = NrrdFileReader()
METAIMAGE = MetaImageReader()
NUMPY = NumpyReader()
DICOM_SERIES = DicomSeriesReader()
#: The readers of volume files, by suffix (DICOM series are folders).
FILE_READERS: tuple[VolumeReader, ...] = (NIFTI, MGH, NRRD, METAIMAGE, NUMPY)


def reader_for_suffix(path: str) -> VolumeReader | None:
    """The reader of a volume file's suffix (any case), or None."""
    lower = path.lower()
    return next((reader for reader in FILE_READERS if lower.endswith(reader.suffixes)), None)


@functools.cache
def _load_image(reader: VolumeReader, dtype: str) -> LoadImage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LoadImage registers optional GPU readers and warns they are missing
        # An explicit dtype also converts big-endian data (MGH, some NIfTI) to native order, which MONAI needs.
        return LoadImage(reader=reader.image_reader(), image_only=True, dtype=np.dtype(dtype).type)


def _require_content(path: str) -> None:
    if os.path.getsize(path) == 0:
        raise BadFileError(path, "empty file (0 bytes)")


def _checked_shape(
    path: str, shape: tuple[int, ...], format_name: str, note_4d: bool = True
) -> tuple[tuple[int, int, int], tuple[str, ...]]:
    """The 3D shape a header declares (trailing axes of length 1 dropped, with a note), or BadFileError for
    non-positive sizes, more than MAX_VOXELS voxels, 2D and 4D images. Every format drops any number of trailing
    singleton axes alike: (X, Y, Z, 1, 1) holds one 3D volume as surely as (X, Y, Z, 1) does. ``note_4d`` False:
    a single 4th axis of length 1 is the format's documented layout (.npy ``H x W x D x 1``), not a repair."""
    if shape and min(shape) < 1:
        raise BadFileError(path, f"broken {format_name} header: dimension sizes must be positive, got {shape}")
    voxels = int(np.prod(shape, dtype=np.float64))
    if voxels > MAX_VOXELS:
        raise BadFileError(
            path, f"broken {format_name} header? it declares {' x '.join(map(str, shape))} voxels, more than 2**31"
        )
    notes: tuple[str, ...] = ()
    if len(shape) > 3 and all(size == 1 for size in shape[3:]):
        axes = "a 4th axis" if len(shape) == 4 else f"axes 4 to {len(shape)}"
        if len(shape) > 4 or note_4d:
            notes = (f"{len(shape)}D {format_name} with {axes} of length 1: read as the 3D volume it holds",)
        shape = shape[:3]
    _check_dimensionality(path, shape)
    return shape, notes  # type: ignore[return-value]


def drop_trailing_singletons(image: MetaTensor) -> MetaTensor:
    """A decoded volume without the trailing axes of length 1 its header check allowed (:func:`_checked_shape`);
    indexing keeps the MetaTensor's affine."""
    if image.ndim > 3 and all(size == 1 for size in image.shape[3:]):
        return image[(...,) + (0,) * (image.ndim - 3)]
    return image


def _check_real_valued(path: str, dtype: np.dtype) -> None:
    """Refuse complex voxels: converting them to the float32 training reads would silently drop the imaginary
    part (MR raw data, phase images)."""
    if np.dtype(dtype).kind == "c":
        raise BadFileError(
            path,
            f"complex-valued voxels ({np.dtype(dtype).name}): training reads real values and would drop the "
            "imaginary part; save a real-valued volume (e.g. the magnitude, numpy.abs)",
        )


def _check_dimensionality(path: str, shape: tuple[int, ...]) -> None:
    if len(shape) < 3:
        raise BadFileError(path, f"{len(shape)}D image of shape {shape}; a 3D volume is expected")
    if len(shape) > 3:
        raise BadFileError(
            path,
            f"{len(shape)}D image of shape {shape}; one 3D volume per file is expected (split time series)",
        )
    if min(shape) < 1:
        raise BadFileError(path, f"empty image of shape {shape}")


def _checked_affine(path: str, affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BadFileError(path, "degenerate affine (zero determinant): voxel geometry unknown")
    return affine


def _check_data_size(path: str, data_path: str, offset: int, shape: Sequence[int], item_size: int) -> None:
    """Uncompressed data: the file size tells whether all of it is there, without decoding it."""
    expected = offset + int(np.prod(shape, dtype=np.int64)) * item_size
    actual = os.path.getsize(data_path)
    if actual < expected:
        where = "the file has" if data_path == path else f"its data file {os.path.basename(data_path)} has"
        raise BadFileError(path, f"truncated: the header declares {expected} bytes (offset + data), {where} {actual}")
