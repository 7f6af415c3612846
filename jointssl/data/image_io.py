"""Decoding of one 2D image file (PNG, JPEG, DICOM) into a grayscale float32 array in [0, 1].

Contract of :func:`load_image_2d`: the array is ``[H, W]``; rows run from the top of the image to the bottom and
columns from left to right, i.e. the orientation of PIL's view of a PNG/JPEG and of a DICOM's Rows x Columns.
Every failure raises :class:`BadFileError` naming the file and the reason.

Why not MONAI's readers: ``monai.data.PILReader`` and ``PydicomReader`` both return ``[W, H]`` by default
(``reverse_indexing`` / ``swap_ij``), ``PydicomReader`` applies the rescale slope/intercept but neither the VOI
window nor the MONOCHROME1 inversion, and both add per-file metadata work (affines, warnings) that a 2D loader
called millions of times does not need. PIL and pydicom are what those readers call underneath; decoding with
them directly keeps the orientation obvious and the intensity handling in one place.

Intensity rules:

- 8-bit PNG/JPEG: value / 255. Colour (RGB, RGBA, palette, CMYK) becomes luma 0.299 R + 0.587 G + 0.114 B
  (ITU-R 601, what PIL's ``convert("L")`` uses, but without rounding); alpha is ignored (not composited: a
  transparent pixel keeps its colour's grey value).
- 16-bit grayscale PNG: value / (2**bits - 1), where ``bits`` is the PNG's declared significant bits (sBIT chunk)
  when present, otherwise the smallest of 8, 10, 12, 14, 16 bits that holds the image's maximum. Medical 16-bit
  PNGs usually carry 10-14 bit data; dividing by 65535 would make them nearly black, while per-image min-max
  would change the contrast between images of the same acquisition.
- DICOM: stored values -> modality LUT (RescaleSlope/RescaleIntercept or a Modality LUT Sequence) -> VOI: the
  first WindowCenter/WindowWidth pair (LINEAR, LINEAR_EXACT or SIGMOID per VOILUTFunction), else the first VOI LUT
  Sequence item, else a robust min-max between the 0.5th and 99.5th percentiles -> MONOCHROME1 is inverted
  (1 - x) so that bright always means high attenuation/signal, as in MONOCHROME2.

Conversions that lose information or rest on a guess are returned as notes by :func:`decode_image_2d` (and
printed as warnings by ``jointssl check-data``): colour that is not grey, a partly transparent alpha channel, a
16-bit PNG whose bit depth was inferred from its maximum, content that does not match the extension.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from jointssl.data.errors import BadFileError
from jointssl.data.file_checks import check_decoded_size, folder_problem, require_regular_file
from jointssl.data.intensity import percentiles_to_unit

PIL_FORMAT_BY_EXTENSION = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
SUPPORTED_DESCRIPTION = (
    "PNG (.png), JPEG (.jpg/.jpeg) or DICOM (.dcm/.dicom, or any file with the DICM preamble)"
)

# Images with a side below this cannot give meaningful crops; validation rejects them.
MIN_IMAGE_SIDE = 8

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
_DICM_OFFSET = 128
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_STANDARD_BIT_DEPTHS = (8, 10, 12, 14, 16)
# PIL modes decoded through an RGB float32 copy (_pil_to_gray): 3 float32 samples per pixel at the widest.
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})
# A DICOM header (everything before the pixel data) is a few KB; this much inflated dataset surely holds it.
_DICOM_HEADER_LIMIT = 1 << 20
_PIXEL_DATA_TAG = 0x7FE00010


def detect_format(path: str | Path) -> str:
    """Which decoder a file needs: ``"PNG"``, ``"JPEG"`` or ``"DICOM"``. Content (file signature) wins over the
    extension, so a JPEG saved as ``.png`` or an extensionless DICOM (``CT.1.2.840...``) still decodes.

    Raises :class:`BadFileError` for anything that is not a readable, non-empty regular file (folders, pipes,
    broken or looping links, unreadable files) and for unsupported content; never opens a non-regular file.
    """
    path = Path(path)
    if path.is_dir():
        problem = folder_problem(path)
        if problem is not None:
            raise BadFileError(path, f"not a regular file: a folder whose images cannot be listed ({problem})")
    size = require_regular_file(path, "an image file").st_size
    if size == 0:
        raise BadFileError(path, "empty file (0 bytes)")
    try:
        with open(path, "rb") as f:
            head = f.read(_DICM_OFFSET + 4)
    except OSError as error:
        raise BadFileError(path, f"cannot read the file ({type(error).__name__}: {error.strerror})") from None
    if head[_DICM_OFFSET : _DICM_OFFSET + 4] == b"DICM":
        return "DICOM"
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head.startswith(_JPEG_SOI):
        return "JPEG"
    extension = path.suffix.lower()
    if extension in DICOM_EXTENSIONS:
        return "DICOM"  # DICOM without the 128-byte preamble (old ACR-NEMA style); pydicom decides.
    if extension in PIL_FORMAT_BY_EXTENSION:
        expected = PIL_FORMAT_BY_EXTENSION[extension]
        raise BadFileError(
            path, f"not a {expected} file: the content does not start with the {expected} signature"
        )
    described = f"'{extension}'" if extension else "no extension"
    raise BadFileError(
        path, f"unsupported file type ({described}, no DICOM preamble); expected {SUPPORTED_DESCRIPTION}"
    )


@dataclass(frozen=True)
class DecodedImage:
    """A decoded 2D image and the notes on how it was converted (see :func:`decode_image_2d`)."""

    array: np.ndarray  # float32 [H, W] in [0, 1]
    file_format: str  # "PNG", "JPEG" or "DICOM", from the content
    notes: tuple[str, ...] = ()


def load_image_2d(path: str | Path) -> np.ndarray:
    """Decode one 2D image to float32 ``[H, W]`` in [0, 1] (rows top->bottom, columns left->right).

    Raises :class:`BadFileError` for empty, truncated, corrupt, non-image, multi-frame and unsupported files.
    """
    return decode_image_2d(path).array


def decode_image_2d(path: str | Path) -> DecodedImage:
    """:func:`load_image_2d` plus notes on conversions a researcher should know about: colour converted to grey,
    a partly transparent alpha channel ignored, a 16-bit PNG scaled by a bit depth inferred from its maximum, or
    content that does not match the extension (e.g. a JPEG named ``.png``). Clean grey images have no notes."""
    path = Path(path)
    file_format = detect_format(path)
    notes: list[str] = []
    expected = PIL_FORMAT_BY_EXTENSION.get(path.suffix.lower()) or (
        "DICOM" if path.suffix.lower() in DICOM_EXTENSIONS else None
    )
    if expected is not None and expected != file_format:
        notes.append(
            f"the content is {file_format} although the extension is '{path.suffix}': decoded as {file_format}"
        )
    image = _load_dicom(path, notes) if file_format == "DICOM" else _load_pil(path, file_format, notes)
    if image.ndim != 2 or min(image.shape) < 1:
        raise BadFileError(path, f"decoded to an array of shape {tuple(image.shape)}, expected [H, W]")
    if not np.isfinite(image).all():
        raise BadFileError(path, "decoded pixel values contain NaN or infinity")
    return DecodedImage(np.ascontiguousarray(image, dtype=np.float32), file_format, tuple(notes))


def declared_decoded_size(path: str | Path) -> tuple[int, str]:
    """What decoding an image makes, from its header alone: (bytes of the widest array :func:`decode_image_2d`
    makes of it, a description of the declared content). PNG / JPEG: PIL's header size and bands as float32 (an
    RGB copy for colour); DICOM: Rows x Columns x SamplesPerPixel x NumberOfFrames as float64 (the modality LUT
    and window run in float64), read without inflating the pixel data of a deflated file. Raises
    :class:`BadFileError` for what :func:`detect_format` refuses or a header that cannot be read."""
    path = Path(path)
    file_format = detect_format(path)
    if file_format == "DICOM":
        dataset = _dicom_header(path)
        try:
            rows, columns = int(dataset.Rows), int(dataset.Columns)
        except (AttributeError, TypeError, ValueError):
            return 0, "no Rows / Columns"  # decode_image_2d says what is wrong with it
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        bits = int(dataset.get("BitsAllocated", 16) or 16)
        per_pixel = 4 * samples if samples > 1 else 8
        frames_text = f" x {frames} frames" if frames > 1 else ""
        what = (
            f"{rows} x {columns} pixels{frames_text}, {samples} sample(s) of {bits} bits, decoded as "
            f"{'float32' if samples > 1 else 'float64'}"
        )
        return rows * columns * frames * per_pixel, what
    try:
        with warnings.catch_warnings():
            # PIL's own bomb warning (over 89 M pixels) names no file; the bound is max_decoded_bytes here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=[file_format])  # reads the header only
        with image:
            width, height = image.size
            mode = image.mode
            samples = 3 if mode in _COLOUR_MODES else len(image.getbands())
    except Exception as exc:  # noqa: BLE001 - decode_image_2d reports a header PIL cannot read
        raise BadFileError(path, f"cannot decode {file_format}: {type(exc).__name__}: {exc}") from exc
    return width * height * samples * 4, f"{width} x {height} {mode} pixels decoded as float32"


def check_image_header(path: str | Path, max_decoded_bytes: int | None) -> None:
    """Refuse an image whose header declares more than ``max_decoded_bytes`` decoded
    (:func:`~jointssl.data.file_checks.check_decoded_size`), before any pixel is decoded: a 0.4 MB PNG can declare
    12000 x 12000 RGB pixels (1.6 GiB as float32). A file whose header cannot be read is left to
    :func:`decode_image_2d`, which says what is wrong with it."""
    try:
        decoded, what = declared_decoded_size(path)
    except BadFileError:
        return
    check_decoded_size(path, decoded, what, max_decoded_bytes)


def check_image_size(path: str | Path, image: np.ndarray, min_side: int = MIN_IMAGE_SIDE) -> None:
    """Raise :class:`BadFileError` when a decoded image is too small to crop from."""
    height, width = image.shape
    if min(height, width) < min_side:
        raise BadFileError(path, f"image is {height}x{width} pixels (H x W); the minimum side is {min_side}")


# ----------------------------------------------------------------------------------------------------------
# PNG / JPEG
# ----------------------------------------------------------------------------------------------------------


def _load_pil(path: Path, file_format: str, notes: list[str]) -> np.ndarray:
    try:
        with Image.open(path, formats=[file_format]) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise BadFileError(path, f"multi-frame {file_format} ({frames} frames) is not supported")
            # load() decodes all pixel data; with PIL's default LOAD_TRUNCATED_IMAGES=False a truncated file raises
            # here instead of being silently padded with grey.
            image.load()
            return _pil_to_gray(image, path, notes)
    except (BadFileError, MemoryError):  # a MemoryError is the machine's, not the file's: validation reports it
        raise
    except Exception as exc:  # corrupt data surfaces as OSError, SyntaxError, zlib/struct errors...
        raise BadFileError(path, f"cannot decode {file_format}: {type(exc).__name__}: {exc}") from exc


def _pil_to_gray(image: Image.Image, path: Path, notes: list[str]) -> np.ndarray:
    mode = image.mode
    if mode == "L":
        return np.asarray(image, dtype=np.float32) / 255.0
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if mode == "LA":
        grey_alpha = np.asarray(image, dtype=np.float32)
        _note_alpha(grey_alpha[..., 1], mode, notes)
        return grey_alpha[..., 0] / 255.0
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_unit(np.asarray(image), path, notes)
    if mode in ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        if image.has_transparency_data:
            _note_alpha(np.asarray(image.convert("RGBA"))[..., 3], mode, notes)
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
        _note_colour(rgb, mode, notes)
        return (rgb @ _LUMA_WEIGHTS) / 255.0
    raise BadFileError(path, f"unsupported PIL image mode '{mode}'")


def _note_alpha(alpha: np.ndarray, mode: str, notes: list[str]) -> None:
    """Alpha is ignored; say so when it actually hides something (an opaque alpha channel changes nothing)."""
    transparent = float(np.mean(alpha < 255))
    if transparent > 0:
        notes.append(
            f"{mode} image with an alpha channel ({transparent:.0%} of pixels not opaque): alpha ignored, "
            "transparent pixels keep the grey value of their colour"
        )


def _note_colour(rgb: np.ndarray, mode: str, notes: list[str]) -> None:
    """Grey images saved as RGB convert without loss; real colour is reduced to luma, which is worth a note."""
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
        notes.append(f"{mode} colour image converted to grey (luma 0.299 R + 0.587 G + 0.114 B)")


def _sixteen_bit_to_unit(values: np.ndarray, path: Path, notes: list[str]) -> np.ndarray:
    values = values.astype(np.float32)
    if values.min() < 0:
        raise BadFileError(path, "16-bit image has negative values")
    declared = _png_significant_bits(path)
    bits = declared or _bits_holding(float(values.max()))
    if declared is None:
        # Two images of one acquisition with different maxima can get different scales: worth a warning.
        notes.append(
            f"16-bit grey PNG without an sBIT chunk: scaled to [0, 1] by 1/(2**{bits} - 1), {bits} bits inferred "
            f"from its maximum {values.max():g}"
        )
    return np.clip(values / float(2**bits - 1), 0.0, 1.0)


def _bits_holding(maximum: float) -> int:
    for bits in _STANDARD_BIT_DEPTHS:
        if maximum <= 2**bits - 1:
            return bits
    return _STANDARD_BIT_DEPTHS[-1]


def _png_significant_bits(path: Path) -> int | None:
    """The gray sample's significant bits from a PNG's sBIT chunk (PIL does not expose it), or None."""
    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            return None
        while True:
            header = f.read(8)
            if len(header) < 8:
                return None
            length, chunk_type = struct.unpack(">I4s", header)
            if chunk_type in (b"IDAT", b"IEND"):  # sBIT must precede the image data
                return None
            payload = f.read(length)
            f.seek(4, 1)  # CRC
            if chunk_type == b"sBIT" and payload and 1 <= payload[0] <= 16:
                return int(payload[0])


# ----------------------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------------------


def _load_dicom(path: Path, notes: list[str]) -> np.ndarray:
    # Imported lazily: pydicom is only needed when DICOM files are present.
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        # force=True also reads files without the 128-byte preamble; non-DICOM content then fails below.
        dataset = pydicom.dcmread(path, force=True)
    except MemoryError:
        raise
    except Exception as exc:  # pydicom raises many types for malformed files
        raise BadFileError(path, f"not a readable DICOM file: {type(exc).__name__}: {exc}") from exc
    if "PixelData" not in dataset:
        raise BadFileError(path, "DICOM file has no pixel data (not an image, or not a DICOM file)")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise BadFileError(path, f"multi-frame DICOM ({frames} frames) is not supported as a 2D image")
    transfer_syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    try:
        pixels = dataset.pixel_array  # YBR colour data is converted to RGB by pydicom
    except MemoryError:
        raise
    except Exception as exc:  # missing decoder, truncated or corrupt pixel data
        syntax = transfer_syntax.name if transfer_syntax is not None else "unknown transfer syntax"
        raise BadFileError(
            path, f"cannot decode DICOM pixel data ({syntax}): {type(exc).__name__}: {exc}"
        ) from exc

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"):
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise BadFileError(
                path, f"{photometric} DICOM decoded to shape {pixels.shape}, expected [H, W, 3]"
            )
        bits = int(dataset.get("BitsStored", 8) or 8)
        _note_colour(pixels.astype(np.float32), f"{photometric} DICOM", notes)
        return (pixels.astype(np.float32) @ _LUMA_WEIGHTS) / float(2**bits - 1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise BadFileError(path, f"unsupported DICOM PhotometricInterpretation '{photometric}'")
    if pixels.ndim != 2:
        raise BadFileError(path, f"monochrome DICOM decoded to shape {pixels.shape}, expected [H, W]")

    values = np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float64)
    image = _apply_voi(values, dataset)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return image.astype(np.float32)


def _dicom_header(path: Path):
    """A DICOM file's dataset up to its pixel data, reading a bounded amount: pydicom inflates the whole of a
    deflated dataset before parsing it (15000^2 16-bit zeros: 0.4 MB on disk, 450 MB inflated), so for that
    transfer syntax only the first :data:`_DICOM_HEADER_LIMIT` bytes are inflated and parsed here."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        with open(path, "rb") as file:
            read_preamble(file, force=True)
            meta = _read_file_meta_info(file)
            if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
                file.seek(0)
                return pydicom.dcmread(file, force=True, stop_before_pixels=True)
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            prefix = b""
            while len(prefix) < _DICOM_HEADER_LIMIT and not inflater.eof:
                chunk = file.read(1 << 16)
                if not chunk:
                    break
                prefix += inflater.decompress(chunk, _DICOM_HEADER_LIMIT - len(prefix))
        return read_dataset(
            DicomBytesIO(prefix), is_implicit_VR=False, is_little_endian=True,
            stop_when=lambda tag, vr, length: tag == _PIXEL_DATA_TAG,
        )
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for malformed files
        raise BadFileError(path, f"not a readable DICOM file: {type(exc).__name__}: {exc}") from exc


def _first_value(value) -> float:
    """WindowCenter/WindowWidth may hold several windows; the first is the primary one."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _apply_voi(values: np.ndarray, dataset) -> np.ndarray:
    """Map modality values to [0, 1] with the dataset's window, VOI LUT, or a robust min-max."""
    if "WindowCenter" in dataset and "WindowWidth" in dataset and dataset.WindowWidth is not None:
        center = _first_value(dataset.WindowCenter)
        width = _first_value(dataset.WindowWidth)
        function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        return window(values, center, width, function)
    if "VOILUTSequence" in dataset and len(dataset.VOILUTSequence) > 0:
        from pydicom.pixels import apply_voi_lut

        lut_bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
        mapped = np.asarray(apply_voi_lut(values, dataset, index=0, prefer_lut=True), dtype=np.float64)
        return np.clip(mapped / float(2**lut_bits - 1), 0.0, 1.0)
    return percentiles_to_unit(values, (0.5, 99.5))  # robust to burned-in markers and padding


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        low = center - width / 2.0
        return np.clip((values - low) / max(width, 1e-6), 0.0, 1.0)
    # LINEAR: the standard's half-pixel convention; a width of 1 is a threshold.
    if width <= 1.0:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)

