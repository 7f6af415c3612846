"""Volume loading: layout and orientation on the real data, normalisation, and every kind of bad input."""

from __future__ import annotations

import gzip
import logging
import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from jointssl.data.errors import BadFileError, DataValidationError
from jointssl.data.discovery import discover_volumes
from jointssl.data.volume_io import (
    VolumeRecord,
    infer_modality,
    load_volume,
    read_volume,
)
from jointssl.data.validation import validate_volumes
from tests.conftest import shared_path

# ----------------------------------------------------------------------------------------------------
# Generators of test inputs (also used by the dataset tests)


def write_nifti(
    path: Path, data: np.ndarray, spacing=(1.0, 1.0, 1.0), affine: np.ndarray | None = None
) -> Path:
    """Save ``data`` as NIfTI; default affine: RAS axes with the given voxel sizes."""
    if affine is None:
        affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def ct_like(shape=(16, 12, 8), seed=0) -> np.ndarray:
    """int16 'HU' volume: air around a soft-tissue block with some noise."""
    rng = np.random.default_rng(seed)
    volume = np.full(shape, -1000, dtype=np.int16)
    volume[2:-2, 2:-2, :] = rng.integers(-100, 200, size=(shape[0] - 4, shape[1] - 4, shape[2]))
    return volume


def write_dicom_series(
    folder: Path,
    z_positions=(0.0, 2.0, 4.0, 6.0, 8.0),
    size: int = 6,
    series_uid: str | None = None,
    orientations: list[tuple[float, ...]] | None = None,
    instance_numbers: list[int] | None = None,
    name_prefix: str = "slice",
) -> Path:
    """A CT series, one uncompressed file per slice; slice k stores HU = 100 * k + pixel index (k by z
    order)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    order = np.argsort(z_positions)
    rank_of = {int(i): rank for rank, i in enumerate(order)}
    for i, z in enumerate(z_positions):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = "1.2.3"
        ds.Modality = "CT"
        ds.ImageOrientationPatient = list(orientations[i] if orientations else (1, 0, 0, 0, 1, 0))
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.PixelSpacing = [0.5, 0.5]
        ds.Rows = ds.Columns = size
        ds.InstanceNumber = instance_numbers[i] if instance_numbers else i + 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = 1
        ds.RescaleIntercept = -1024
        hu = 100 * rank_of[i] + np.arange(size * size).reshape(size, size) - 1000
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"{name_prefix}{i:03d}.dcm", enforce_file_format=True)
    return folder


def centroid(mask: np.ndarray) -> np.ndarray:
    """(slice, row, col) centre of a boolean mask."""
    assert mask.any()
    return np.argwhere(mask).mean(axis=0)


# ----------------------------------------------------------------------------------------------------
# Real data: shapes, spacings, orientation


def _check_abdominal_anatomy(labels: np.ndarray, liver, spleen, vertebrae, aorta, lung, kidneys) -> None:
    """Axial layout: patient's right (liver) on the image's left, spine behind the aorta, lungs above
    kidneys."""
    liver_c, spleen_c = centroid(np.isin(labels, liver)), centroid(np.isin(labels, spleen))
    assert liver_c[2] < spleen_c[2], (
        "liver (patient right) must be on the image's left: columns go right -> left"
    )
    spine_c, aorta_c = centroid(np.isin(labels, vertebrae)), centroid(np.isin(labels, aorta))
    assert spine_c[1] > aorta_c[1], "vertebrae are posterior to the aorta: rows go anterior -> posterior"
    lung_c, kidney_c = centroid(np.isin(labels, lung)), centroid(np.isin(labels, kidneys))
    assert lung_c[0] > kidney_c[0], "lungs are superior to the kidneys: slices go inferior -> superior"


def test_real_ct_nifti_ras_layout_and_anatomy():
    folder = shared_path("volumes")
    volume = load_volume(folder / "ct/example_ct_sm.nii.gz")
    assert volume.array.shape == (30, 101, 122) and volume.array.dtype == np.float32
    assert volume.spacing == (3.0, 3.0, 3.0)
    assert volume.modality == "ct"
    assert 0.0 <= volume.array.min() and volume.array.max() <= 1.0
    labels = read_volume(folder / "labels/example_seg.nii.gz", interpolation="nearest").array
    assert labels.shape == volume.array.shape
    _check_abdominal_anatomy(
        labels,
        liver=[5],
        spleen=[1],
        vertebrae=[30, 31, 32, 33],
        aorta=[52],
        lung=[10, 11, 13, 14],
        kidneys=[2, 3],
    )
    # Image and labels share the layout: bone is bright, liver is soft tissue.
    assert volume.array[np.isin(labels, [30, 31, 32, 33])].mean() > volume.array[labels == 5].mean() + 0.05


def test_real_mr_nifti_lps_is_reoriented_like_ct():
    folder = shared_path("volumes")
    volume = load_volume(folder / "mr/example_mr_sm.nii.gz")  # stored LPS
    assert volume.array.shape == (20, 91, 117)
    assert volume.spacing == (3.0, 3.0, 3.0)
    assert volume.modality == "mr"
    labels = read_volume(folder / "labels/example_seg_mr.nii.gz", interpolation="nearest").array
    _check_abdominal_anatomy(
        labels, liver=[5], spleen=[1], vertebrae=[19], aorta=[23], lung=[11], kidneys=[2, 3]
    )


def test_real_oblique_brain_mr():
    volume = load_volume(shared_path("volumes", "mr", "PGBM-001_1991-11-19_T1post.nii.gz"))
    assert volume.array.shape == (25, 256, 208)  # stored 208 x 256 x 25 LPS
    assert volume.spacing == pytest.approx((6.5, 0.859375, 0.859375), abs=1e-4)
    assert volume.modality == "mr"
    head = volume.array > 0.1
    middle = head[12]
    rows, cols = np.flatnonzero(middle.any(1)), np.flatnonzero(middle.any(0))
    assert rows[-1] - rows[0] > cols[-1] - cols[0], (
        "a head is longer front-to-back: rows are anterior-posterior"
    )
    assert head[-1].mean() < head[12].mean(), (
        "the last slice is near the vertex (superior), where the head is small"
    )


def test_real_dicom_series_jpeg2000():
    folder = shared_path("dicom", "ct_series")
    raw = read_volume(folder)
    assert raw.array.shape == (20, 512, 512)
    assert raw.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert raw.dicom_modality == "ct"
    # ImageOrientationPatient is the identity (rows -> patient left, columns -> posterior), so every stored
    # slice is already in radiological layout; slices go inferior -> superior (increasing z).
    files = sorted(
        folder.iterdir(),
        key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    for k in (0, 19):
        ds = pydicom.dcmread(files[k])
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(raw.array[k], hu)
    assert infer_modality(raw) == "ct"


def test_slice_axes_are_views_of_one_volume():
    path = shared_path("volumes", "mr", "example_mr_sm.nii.gz")
    axial = read_volume(path, "axial")
    coronal = read_volume(path, "coronal")
    sagittal = read_volume(path, "sagittal")
    assert coronal.array.shape == (91, 20, 117) and sagittal.array.shape == (117, 20, 91)
    # axial[k, r, c] = coronal[Y-1-r, Z-1-k, c] = sagittal[X-1-c, Z-1-k, r] (see the layout table)
    np.testing.assert_array_equal(axial.array, coronal.array.transpose(1, 0, 2)[::-1, ::-1])
    np.testing.assert_array_equal(axial.array, sagittal.array.transpose(1, 2, 0)[::-1, :, ::-1])


# ----------------------------------------------------------------------------------------------------
# Generated inputs: layout, resampling, normalisation


def test_npy_is_height_width_depth(tmp_path):
    data = np.arange(12 * 10 * 5, dtype=np.float32).reshape(12, 10, 5)
    np.save(tmp_path / "v.npy", data)
    np.save(tmp_path / "v4.npy", data[..., None])
    for name in ("v.npy", "v4.npy"):
        raw = read_volume(tmp_path / name, slice_axis="coronal")  # no affine: axes taken as given
        assert raw.array.shape == (5, 12, 10) and raw.spacing == (1.0, 1.0, 1.0)
        for k in range(5):
            np.testing.assert_array_equal(raw.array[k], data[:, :, k])
    loaded = load_volume(tmp_path / "v.npy", modality="mr", mr_percentiles=(0.0, 100.0))
    np.testing.assert_allclose(loaded.array[2], data[:, :, 2] / data.max(), atol=1e-6)


def test_nifti_axes_follow_the_affine(tmp_path):
    data = np.zeros((4, 5, 6), dtype=np.float32)
    data[3, 0, 5] = 1.0  # right-most, posterior-most, superior-most voxel in RAS
    raw = read_volume(write_nifti(tmp_path / "ras.nii.gz", data))
    assert raw.array.shape == (6, 5, 4)
    assert np.argwhere(raw.array == 1.0).tolist() == [[5, 4, 0]]  # last slice, bottom row, left column
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])  # same voxels, axes pointing left and posterior
    raw = read_volume(write_nifti(tmp_path / "lps.nii.gz", data, affine=lps))
    assert np.argwhere(raw.array == 1.0).tolist() == [[5, 0, 3]]  # now patient-left, anterior-most


def test_resampling_and_in_plane_size(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", ct_like((32, 24, 16)), spacing=(1.0, 1.0, 2.0))
    assert load_volume(path).spacing == (2.0, 1.0, 1.0)
    resampled = load_volume(path, target_spacing=(4.0, 2.0, 2.0))
    assert resampled.array.shape == (8, 12, 16) and resampled.spacing == (4.0, 2.0, 2.0)
    resized = load_volume(path, in_plane_size=8)
    assert resized.array.shape == (16, 8, 8)
    assert resized.spacing == pytest.approx((2.0, 3.0, 4.0))  # 24 rows and 32 columns now 8 each
    assert 0.0 <= resized.array.min() and resized.array.max() <= 1.0


def test_ct_window_and_mr_percentiles(tmp_path):
    hu = np.array([-2000, -1000, 0, 500, 1000, 3000], dtype=np.int16).repeat(4).reshape(2, 3, 4)
    ct = load_volume(write_nifti(tmp_path / "ct.nii.gz", hu), modality="ct")
    values = sorted(set(np.round(ct.array.ravel(), 4).tolist()))
    assert values == [0.0, 0.5, 0.75, 1.0]  # -1000 -> 0, 0 -> 0.5, 500 -> 0.75, clipped at both ends
    assert load_volume(tmp_path / "ct.nii.gz", modality="auto").modality == "ct"  # air present
    mr_values = np.random.default_rng(0).gamma(2.0, 100.0, size=(20, 20, 10)).astype(np.float32)
    mr = load_volume(write_nifti(tmp_path / "mr.nii.gz", mr_values), modality="auto")
    assert mr.modality == "mr"
    low, high = np.percentile(mr_values, (0.5, 99.5))
    expected = np.clip((mr_values - low) / (high - low), 0, 1)
    np.testing.assert_allclose(np.sort(mr.array.ravel()), np.sort(expected.ravel()), atol=1e-5)


def test_dicom_series_is_stacked_along_the_normal_not_by_instance_number(tmp_path):
    z = [4.0, 0.0, 8.0, 2.0, 6.0]
    folder = write_dicom_series(tmp_path / "series", z_positions=z, instance_numbers=[5, 1, 3, 2, 4])
    (folder / "notes.txt").write_text("not a DICOM file")
    raw = read_volume(folder)
    assert raw.array.shape == (5, 6, 6) and raw.spacing == pytest.approx((2.0, 0.5, 0.5))
    assert raw.array[:, 0, 0].tolist() == [-1000, -900, -800, -700, -600]  # by z: 100 HU more per slice
    assert raw.array[0, 0, 1] == -999  # rows and columns as stored (identity orientation)


# ----------------------------------------------------------------------------------------------------
# Bad inputs


def _bad_nifti_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a phrase the error must contain)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = write_nifti(folder / "good.nii.gz", ct_like())
    good_bytes = good.read_bytes()
    files = {
        "4d": (write_nifti(folder / "4d.nii.gz", np.stack([ct_like()] * 3, axis=-1)), "4D image"),
        "2d": (write_nifti(folder / "2d.nii.gz", ct_like()[:, :, 0]), "2D image"),
        "two_slices": (write_nifti(folder / "two.nii.gz", ct_like()[:, :, :2]), "only 2 slice"),
        "constant": (
            write_nifti(folder / "constant.nii.gz", np.full((6, 6, 6), 7, np.int16)),
            "constant volume",
        ),
    }
    with_nan = ct_like().astype(np.float32)
    with_nan[3, 3, 3] = np.nan
    with_nan[4, 4, 4] = np.inf
    files["nan"] = (write_nifti(folder / "nan.nii.gz", with_nan), "1 NaN and 1 infinite")
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(good_bytes[: len(good_bytes) // 2])
    files["truncated"] = (truncated, "cannot decode")
    garbage = folder / "garbage.nii.gz"
    garbage.write_bytes(random.Random(0).randbytes(2000))
    files["garbage"] = (garbage, "not a readable NIfTI")
    not_nifti = folder / "text.nii.gz"
    not_nifti.write_bytes(gzip.compress(b"just some text, not an image header " * 20))
    files["gzip_text"] = (not_nifti, "not a readable NIfTI")
    empty = folder / "empty.nii.gz"
    empty.write_bytes(b"")
    files["empty"] = (empty, "empty file")
    for name, value in (("zero_pixdim", 0.0), ("negative_pixdim", -1.0)):
        # nibabel repairs pixdim when saving, so patch the header bytes: pixdim is float32[8] at byte 76.
        path = write_nifti(folder / f"{name}.nii", ct_like())
        raw = bytearray(path.read_bytes())
        raw[76 + 4 * 2 : 76 + 4 * 3] = np.float32(value).tobytes()
        path.write_bytes(bytes(raw))
        files[name] = (path, "pixdim")
    return files


def test_each_bad_nifti_raises_a_clear_error(tmp_path):
    for name, (path, phrase) in _bad_nifti_files(tmp_path).items():
        with pytest.raises(BadFileError) as caught:
            load_volume(path)
        assert caught.value.path == str(path), name
        assert phrase in caught.value.reason, (name, caught.value.reason)


def test_singleton_fourth_dimension_is_accepted(tmp_path):
    volume = load_volume(write_nifti(tmp_path / "v.nii.gz", ct_like()[..., None]))
    assert volume.array.shape == (8, 12, 16)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(BadFileError, match="does not exist"):
        load_volume(tmp_path / "absent.nii.gz")
    (tmp_path / "image.png").write_bytes(b"png")
    with pytest.raises(BadFileError, match="unsupported volume format"):
        load_volume(tmp_path / "image.png")
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(BadFileError, match="empty file"):
        load_volume(tmp_path / "empty.npy")
    np.save(tmp_path / "flat.npy", np.ones((4, 4)))
    with pytest.raises(BadFileError, match="2D image"):
        load_volume(tmp_path / "flat.npy")


def _bad_dicom_series(folder: Path) -> dict[str, tuple[Path, str]]:
    two_series = write_dicom_series(folder / "two_series", z_positions=(0, 2, 4))
    write_dicom_series(two_series, z_positions=(0, 2, 4), name_prefix="other")
    tilted = (1, 0, 0, 0, 0.98, 0.199)
    mixed = write_dicom_series(folder / "mixed", orientations=[(1, 0, 0, 0, 1, 0)] * 4 + [tilted])
    duplicated = write_dicom_series(folder / "duplicated")
    shutil.copy(duplicated / "slice002.dcm", duplicated / "slice002_copy.dcm")
    missing = write_dicom_series(folder / "missing", z_positions=(0, 2, 4, 8, 10))
    return {
        "two_series": (two_series, "2 different series"),
        "mixed": (mixed, "mixed slice orientations"),
        "duplicated": (duplicated, "duplicated slice position"),
        "missing": (missing, "missing slice(s): a gap of 4.00 mm"),
        "two_slices": (write_dicom_series(folder / "short", z_positions=(0, 2)), "only 2 slice"),
        "empty": (_mkdir(folder / "no_dicom"), "no DICOM files"),
    }


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_each_bad_dicom_series_raises_a_clear_error(tmp_path):
    for name, (path, phrase) in _bad_dicom_series(tmp_path).items():
        with pytest.raises(BadFileError) as caught:
            load_volume(path)
        assert caught.value.path == str(path), name
        assert phrase in caught.value.reason, (name, caught.value.reason)


def test_validate_volumes_reports_every_bad_file_or_skips_with_a_log(tmp_path, caplog):
    bad = {**_bad_nifti_files(tmp_path / "nifti"), **_bad_dicom_series(tmp_path / "dicom")}
    good = [str(tmp_path / "nifti" / "good.nii.gz"), str(write_dicom_series(tmp_path / "dicom" / "good"))]
    paths = [good[0], *(str(p) for p, _ in bad.values()), good[1]]
    with pytest.raises(DataValidationError) as caught:
        validate_volumes(paths)
    assert sorted(e.path for e in caught.value.errors) == sorted(str(p) for p, _ in bad.values())
    message = str(caught.value)
    assert all(str(p) in message for p, _ in bad.values())
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        kept = validate_volumes(paths, on_bad_file="skip")
    assert kept == good
    skipped = [r for r in caplog.records if r.name == "jointssl.data"]
    assert len(skipped) == len(bad)
    assert all(any(str(p) in r.getMessage() for r in skipped) for p, _ in bad.values())


def test_validate_volumes_keeps_records_and_uses_their_modality(tmp_path):
    path = str(write_nifti(tmp_path / "v.nii.gz", ct_like()))
    records = [VolumeRecord(path, "src", "mr"), VolumeRecord(str(tmp_path / "absent.nii"), "src")]
    assert validate_volumes(records, on_bad_file="skip") == records[:1]


# ----------------------------------------------------------------------------------------------------
# Discovery


def test_discover_folders_recursively(tmp_path):
    root = tmp_path / "data"
    write_nifti(_mkdir(root / "a") / "x.nii.gz", ct_like())
    write_nifti(root / "a" / "y.nii", ct_like())
    np.save(_mkdir(root / "b") / "z.npy", np.zeros((4, 4, 4)))
    write_dicom_series(root / "b" / "series1")
    (root / "b" / "readme.txt").write_text("ignored")
    records = discover_volumes([root])
    assert [Path(r.path).relative_to(root).as_posix() for r in records] == [
        "a/x.nii.gz",
        "a/y.nii",
        "b/z.npy",
        "b/series1",
    ]
    assert {r.source for r in records} == {"data"} and all(r.modality is None for r in records)


def test_discover_manifest(tmp_path):
    write_nifti(tmp_path / "x.nii.gz", ct_like())
    manifest = tmp_path / "list.csv"
    write_nifti(tmp_path / "y.nii.gz", ct_like())
    manifest.write_text(f"path,modality,source\nx.nii.gz,CT,hospital\n{tmp_path / 'y.nii.gz'},,\n")
    records = discover_volumes([manifest])
    assert records == [
        VolumeRecord(str(tmp_path / "x.nii.gz"), "hospital", "ct"),
        VolumeRecord(str(tmp_path / "y.nii.gz"), "list", None),
    ]
    # One volume listed twice with other values is a mistake in the manifest (see tests/test_manifest.py).
    manifest.write_text(f"path,modality,source\nx.nii.gz,CT,hospital\n{tmp_path / 'x.nii.gz'},,\n")
    with pytest.raises(DataValidationError, match="line 3: path .* is listed again with other values"):
        discover_volumes([manifest])
    manifest.write_text("path,modality\nx.nii.gz,PET\n")
    with pytest.raises(DataValidationError, match="line 2: modality"):
        discover_volumes([manifest])
    with pytest.raises(BadFileError, match="does not exist"):
        discover_volumes([tmp_path / "nowhere"])


def test_discover_real_pairs_manifest():
    records = discover_volumes([shared_path("volumes", "pairs.csv")])
    assert len(records) == 11
    assert [r.modality for r in records].count("ct") == 2 and all(Path(r.path).is_file() for r in records)
