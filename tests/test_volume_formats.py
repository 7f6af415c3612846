"""MetaImage, NRRD and MGH volumes: orientation on faithfully written files, the same volume in every format loads
alike, header geometry, bad files, discovery, and LUNA16-style data (.mhd + .raw) in the downstream modules."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from jointssl.data import JointDataModule
from jointssl.data.discovery import scan_volume_sources
from jointssl.data.errors import BadFileError
from jointssl.data.geometry import world_to_layout_index
from jointssl.data.volume_io import read_volume, read_volume_header, volume_reader
from jointssl.data.volume_readers import MissingReaderError
from jointssl.downstream.detection.data import DetectionDataset, collect_scans, read_annotations, val_transform
from jointssl.downstream.volume_classification import VolumeClassificationData
from tests.conftest import shared_path

# LUNA16's usual geometry: identity direction cosines, this kind of offset and spacing.
SPACING = (0.7, 0.8, 2.5)
OFFSET = (-195.0, -190.0, -378.0)
SHAPE = (10, 9, 6)  # x (i), y (j), z (k) as in DimSize
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_metaimage(
    path: Path,
    array: np.ndarray,
    spacing=SPACING,
    offset=OFFSET,
    matrix=(1, 0, 0, 0, 1, 0, 0, 0, 1),
    data_name: str | None = None,
) -> Path:
    """A MetaImage header as ITK / LUNA16 write it; ``array`` is indexed [i, j, k] (DimSize order), the .raw
    holds it with i fastest. ``matrix``: TransformMatrix, row n = the LPS direction of index axis n."""
    data_name = data_name or path.with_suffix(".raw").name
    header = "\n".join(
        [
            "ObjectType = Image",
            "NDims = 3",
            "BinaryData = True",
            "BinaryDataByteOrderMSB = False",
            "CompressedData = False",
            f"TransformMatrix = {' '.join(str(v) for v in matrix)}",
            f"Offset = {' '.join(str(v) for v in offset)}",
            "CenterOfRotation = 0 0 0",
            "AnatomicalOrientation = RAI",
            f"ElementSpacing = {' '.join(str(v) for v in spacing)}",
            f"DimSize = {' '.join(str(v) for v in array.shape)}",
            "ElementType = MET_SHORT",
            f"ElementDataFile = {data_name}",
            "",
        ]
    )
    path.write_text(header)
    np.asarray(array, dtype="<i2").transpose(2, 1, 0).tofile(path.parent / data_name)
    return path


def lps_affine(spacing=SPACING, offset=OFFSET, matrix=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> np.ndarray:
    """Voxel -> LPS mm of a MetaImage, from the MetaImage definition: world = Offset + sum_n index_n * spacing_n *
    (row n of TransformMatrix)."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(matrix, dtype=float).reshape(3, 3).T * np.asarray(spacing)
    affine[:3, 3] = offset
    return affine


def ct_volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 400, size=SHAPE).astype(np.int16)


# ----------------------------------------------------------------------------------------------------
# Orientation


def test_luna16_metaimage_marker_lands_on_the_documented_side(tmp_path: Path) -> None:
    """ITK's index axes with identity direction point to patient Left, Posterior, Superior: a marker at the largest
    i, smallest j and largest k is the patient's left, anterior, superior corner, which the axial layout shows on
    the last slice, top row, right-most column (patient right on the image's left)."""
    array = np.full(SHAPE, -1000, np.int16)
    array[SHAPE[0] - 1, 0, SHAPE[2] - 1] = 1000
    raw = read_volume(write_metaimage(tmp_path / "1.3.6.1.mhd", array))
    assert raw.array.shape == (6, 9, 10)
    assert raw.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert np.argwhere(raw.array == 1000).tolist() == [[5, 0, 9]]


def test_permuted_and_flipped_transform_matrix_gives_the_same_volume(tmp_path: Path) -> None:
    """The same anatomy stored with other index axes (file axis 0 = inferior, 1 = left, 2 = posterior) loads to the
    identical array; and a marker's LPS world position maps to the voxel where the loaded marker is."""
    array = ct_volume()
    array[7, 2, 4] = 3000
    plain = read_volume(write_metaimage(tmp_path / "plain.mhd", array))
    # B[a, b, c] = A[b, c, nz - 1 - a]: axis a runs along -z, b along x, c along y.
    permuted = np.ascontiguousarray(array[:, :, ::-1].transpose(2, 0, 1))
    offset = np.asarray(OFFSET) + np.array([0.0, 0.0, (SHAPE[2] - 1) * SPACING[2]])
    matrix = (0, 0, -1, 1, 0, 0, 0, 1, 0)
    spacing = (SPACING[2], SPACING[0], SPACING[1])
    path = write_metaimage(tmp_path / "permuted.mhd", permuted, spacing, tuple(offset), matrix)
    moved = read_volume(path)
    np.testing.assert_array_equal(moved.array, plain.array)
    assert moved.spacing == pytest.approx(plain.spacing)
    for file_path, affine, marker in (
        (tmp_path / "plain.mhd", lps_affine(), (7, 2, 4)),
        (path, lps_affine(spacing, offset, matrix), (SHAPE[2] - 1 - 4, 7, 2)),
    ):
        header = read_volume_header(file_path)
        np.testing.assert_allclose(header.affine, LPS_TO_RAS @ affine, atol=1e-9)
        world = (affine @ [*marker, 1.0])[:3]
        index = world_to_layout_index(world, header.affine, header.shape, "axial", world_frame="lps")
        np.testing.assert_allclose(index, np.argwhere(moved.array == 3000)[0], atol=1e-6)


@pytest.mark.parametrize("slice_axis", ["axial", "coronal", "sagittal"])
def test_one_volume_in_every_format_loads_alike(tmp_path: Path, slice_axis: str) -> None:
    """NIfTI (RAS affine), MetaImage, NRRD in LPS and in RAS space, detached NRRD, MGZ: one array, one spacing, and
    the header's affine is the one the decoder gives."""
    array = ct_volume(1)
    affine_lps = lps_affine()
    affine_ras = LPS_TO_RAS @ affine_lps
    nib.save(nib.Nifti1Image(array, affine_ras), tmp_path / "v.nii.gz")
    write_metaimage(tmp_path / "v.mhd", array)
    directions = affine_lps[:3, :3].T  # pynrrd: one row per index axis
    nrrd.write(str(tmp_path / "lps.nrrd"), array, {"space": "left-posterior-superior",
               "space directions": directions, "space origin": affine_lps[:3, 3]})
    nrrd.write(str(tmp_path / "ras.nrrd"), array, {"space": "right-anterior-superior",
               "space directions": affine_ras[:3, :3].T, "space origin": affine_ras[:3, 3]})
    nrrd.write(str(tmp_path / "detached.nhdr"), array, {"space": "left-posterior-superior",
               "space directions": directions, "space origin": affine_lps[:3, 3]}, detached_header=True)
    nib.save(nib.MGHImage(array.astype(np.float32), affine_ras), tmp_path / "v.mgz")
    reference = read_volume(tmp_path / "v.nii.gz", slice_axis=slice_axis)
    for name in ("v.mhd", "lps.nrrd", "ras.nrrd", "detached.nhdr", "v.mgz"):
        path = str(tmp_path / name)
        loaded = read_volume(path, slice_axis=slice_axis)
        np.testing.assert_array_equal(loaded.array, reference.array, err_msg=name)
        assert loaded.spacing == pytest.approx(reference.spacing, abs=1e-5), name
        header = read_volume_header(path)
        assert header.shape == SHAPE, name
        np.testing.assert_allclose(header.affine, affine_ras, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(volume_reader(path).decode(path).affine.numpy(), header.affine, atol=1e-4)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["ct/example_ct_sm.nii.gz", "mr/example_mr_sm.nii.gz"])
def test_real_volume_converted_by_simpleitk_loads_like_the_nifti(tmp_path: Path, name: str) -> None:
    """A real CT (RAS-stored) and MR (LPS-stored) NIfTI written as MetaImage, NRRD and MGZ by another library
    (SimpleITK, i.e. ITK's reading of the NIfTI geometry; nibabel for MGZ) load to the same slices and spacing as
    the NIfTI itself, and so keep its anatomy (tests/test_volume_io.py checks that on the NIfTI)."""
    import SimpleITK as sitk

    source = shared_path("volumes", name)
    image = sitk.ReadImage(str(source))
    sitk.WriteImage(image, str(tmp_path / "v.mhd"))
    sitk.WriteImage(image, str(tmp_path / "v.nrrd"))
    nifti = nib.load(source)
    nib.save(nib.MGHImage(np.asarray(nifti.dataobj, dtype=np.float32), nifti.affine), tmp_path / "v.mgz")
    assert (tmp_path / "v.raw").is_file()  # the header and its data file, as LUNA16 ships them
    reference = read_volume(source)
    for converted in ("v.mhd", "v.nrrd", "v.mgz"):
        loaded = read_volume(tmp_path / converted)
        np.testing.assert_allclose(loaded.array, reference.array, atol=1e-3, err_msg=converted)
        assert loaded.spacing == pytest.approx(reference.spacing, abs=1e-4), converted


# ----------------------------------------------------------------------------------------------------
# Bad files


def test_bad_metaimage_nrrd_and_mgh_files_name_the_reason(tmp_path: Path) -> None:
    array = ct_volume()
    cases: dict[Path, str] = {}
    truncated = write_metaimage(tmp_path / "truncated.mhd", array)
    raw = truncated.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:300])
    cases[truncated] = "truncated: the header declares 1080 bytes (offset + data), its data file truncated.raw has 300"
    cases[write_metaimage(tmp_path / "missing.mhd", array, data_name="elsewhere.raw")] = (
        "data file elsewhere.raw (named by ElementDataFile) does not exist"
    )
    (tmp_path / "elsewhere.raw").unlink()
    broken = tmp_path / "broken.mha"
    broken.write_text("ObjectType = Image\nNDims = 3\n")
    cases[broken] = "broken MetaImage header: no DimSize, ElementType, ElementDataFile"
    unknown_type = write_metaimage(tmp_path / "type.mhd", array)
    unknown_type.write_text(unknown_type.read_text().replace("MET_SHORT", "MET_COMPLEX"))
    cases[unknown_type] = "unknown ElementType 'MET_COMPLEX'"
    bad_spacing = write_metaimage(tmp_path / "spacing.mhd", array, spacing=(0.7, 0.0, 2.5))
    cases[bad_spacing] = "ElementSpacing must be positive"
    local = tmp_path / "local.mha"  # one file, header then data, cut short
    local.write_bytes(write_metaimage(tmp_path / "x.mhd", array).read_text().replace("x.raw", "LOCAL").encode()
                      + b"\0" * 100)
    cases[local] = "truncated: the header declares"
    empty = tmp_path / "empty.mha"
    empty.write_bytes(b"")
    cases[empty] = "empty file (0 bytes)"
    flat = write_metaimage(tmp_path / "flat.mhd", array[:, :, :1])
    cases[flat] = "only 1 slice(s) along the slice axis"
    header = {"space": "left-posterior-superior", "space directions": np.diag(SPACING), "space origin": np.zeros(3),
              "encoding": "raw"}
    nrrd.write(str(tmp_path / "cut.nrrd"), array, header)
    content = (tmp_path / "cut.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(content[:-50])
    cases[tmp_path / "cut.nrrd"] = "Size of the data does not equal the product of all the dimensions"
    nrrd.write(str(tmp_path / "las.nrrd"), array, {**header, "space": "left-anterior-superior"})
    cases[tmp_path / "las.nrrd"] = "NRRD space 'left-anterior-superior' is not read"
    nrrd.write(str(tmp_path / "nogeometry.nrrd"), array, {"encoding": "raw"})
    cases[tmp_path / "nogeometry.nrrd"] = "no 'space directions': voxel geometry unknown"
    (tmp_path / "junk.nrrd").write_text("hello\n")
    cases[tmp_path / "junk.nrrd"] = "not a readable NRRD file"
    nib.save(nib.MGHImage(array.astype(np.float32), np.eye(4)), tmp_path / "v.mgh")
    content = (tmp_path / "v.mgh").read_bytes()
    (tmp_path / "cut.mgh").write_bytes(content[: len(content) // 2])
    cases[tmp_path / "cut.mgh"] = "truncated: the header declares"
    for path, reason in cases.items():
        with pytest.raises(BadFileError) as error:
            read_volume(path)
        assert error.value.path == str(path) and reason in error.value.reason, (path.name, error.value.reason)


def test_metaimage_without_simpleitk_names_the_file_and_the_extra(tmp_path: Path, monkeypatch) -> None:
    path = write_metaimage(tmp_path / "1.2.3.mhd", ct_volume())
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import SimpleITK now raises ImportError
    with pytest.raises(MissingReaderError, match=r"1\.2\.3\.mhd: reading MetaImage .* pip install 'jointssl\[formats\]'"):
        read_volume(path)
    nrrd.write(str(tmp_path / "v.nrrd"), ct_volume(), {"space": "left-posterior-superior",
               "space directions": np.diag(SPACING), "space origin": np.zeros(3)})
    assert read_volume(tmp_path / "v.nrrd").array.shape == (6, 9, 10)  # the core formats need no extra


def test_discovery_lists_each_volume_once_and_not_its_data_file(tmp_path: Path) -> None:
    subset = tmp_path / "subset0"
    subset.mkdir()
    write_metaimage(subset / "1.2.3.mhd", ct_volume())
    nrrd.write(str(subset / "b.nrrd"), ct_volume(), {"space": "left-posterior-superior",
               "space directions": np.diag(SPACING), "space origin": np.zeros(3)})
    nib.save(nib.MGHImage(ct_volume().astype(np.float32), np.eye(4)), subset / "c.mgz")
    (subset / "notes.txt").write_text("scanner notes")
    scan = scan_volume_sources([tmp_path])
    assert sorted(Path(r.path).name for r in scan.records) == ["1.2.3.mhd", "b.nrrd", "c.mgz"]
    assert [Path(p).name for p in scan.ignored] == ["notes.txt"]  # 1.2.3.raw belongs to 1.2.3.mhd


# ----------------------------------------------------------------------------------------------------
# LUNA16-style data without conversion


def test_pretraining_reads_a_luna16_folder(tmp_path: Path) -> None:
    """JointDataModule on a folder of <seriesuid>.mhd + .raw (and one .nrrd): each a volume, in the slice stream and
    the volume stream."""
    for number in range(3):
        write_metaimage(tmp_path / f"1.3.6.{number}.mhd", ct_volume(number))
    nrrd.write(str(tmp_path / "other.nrrd"), ct_volume(9), {"space": "left-posterior-superior",
               "space directions": np.diag(SPACING), "space origin": np.zeros(3)})
    data = JointDataModule(
        volumes=[str(tmp_path)], batch_size=4, volume_batch_size=2, num_workers=0, global_crop_size=8,
        num_local_crops=0, num_slices=4, volume_size=8, volume_in_plane_size=8, validation_threads=1,
        volume_cache="memory",
    )
    data.setup("fit")
    assert sorted(Path(r.path).name for r in data.volume_records) == [
        "1.3.6.0.mhd", "1.3.6.1.mhd", "1.3.6.2.mhd", "other.nrrd"
    ]
    assert data.volume_index_range == range(24, 28)  # 4 volumes x 6 slices in the slice stream first
    batch, _, _ = next(iter(data.train_dataloader()))
    assert batch["volumes"]["views"].shape == (2, 2, 4, 1, 8, 8)


def sphere(shape, centre, radius) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius**2


def test_candidates_and_annotations_on_mhd_volumes(tmp_path: Path) -> None:
    """candidates.csv / annotations.csv in LPS world mm, volumes <seriesuid>.mhd + .raw in subset folders: the
    candidate slab is centred on the bright sphere, and the detection box too."""
    shape = (40, 36, 20)
    rows, boxes = [], []
    for number in range(4):
        uid = f"1.3.6.1.4.{number}"
        array = np.full(shape, -800, np.int16)
        centre = (12 + number, 20, 9)
        array[sphere(shape, centre, 3.0)] = 100
        folder = tmp_path / f"subset{number % 2}"
        folder.mkdir(exist_ok=True)
        offset = (-100.0 - 7 * number, 20.0, -300.0)
        spacing = (0.7, 0.7, 2.5)
        write_metaimage(folder / f"{uid}.mhd", array, spacing, offset)
        x, y, z = (lps_affine(spacing, offset) @ [*centre, 1.0])[:3]
        far = (lps_affine(spacing, offset) @ [30, 6, 15, 1.0])[:3]
        rows += [f"{uid},{x},{y},{z},1", f"{uid},{far[0]},{far[1]},{far[2]},0"]
        boxes.append(f"{uid},{x},{y},{z},4.2")
    candidates = tmp_path / "candidates.csv"
    candidates.write_text("seriesuid,coordX,coordY,coordZ,class\n" + "\n".join(rows) + "\n")
    data = VolumeClassificationData(
        candidates=str(candidates), volume_dir=str(tmp_path), num_slices=3, patch_size=8, val_fraction=0.25,
        modality="ct", batch_size=2, num_workers=0,
    )
    data.setup("fit")
    slabs = list(zip(data.train_set.samples, data.train_set.labels)) + list(zip(data.val_set.samples, data.val_set.labels))
    assert len(slabs) == 8
    for slab, label in slabs:
        assert (slab[1, 4, 4] > 0.5) == (label == 1)

    annotations = tmp_path / "annotations.csv"
    annotations.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n" + "\n".join(boxes) + "\n")
    scans = collect_scans([tmp_path / "subset0", tmp_path / "subset1"], read_annotations(annotations), "LPS")
    assert len(scans) == 4
    for item in DetectionDataset(scans, val_transform("LPS")):
        (box,) = item["box"].numpy()
        centre = np.round((box[:3] + box[3:]) / 2).astype(int)
        # On the sphere: 100 HU is 0.55 in the -1000..1000 window, 0.2 after (x - 0.5) / 0.25; the lung is -1.6.
        assert item["image"][0][tuple(centre)] > 0.0
