"""Hostile content (issue 14, classes 1 and 7): files that passed the checks and then broke training, and nonsense
that was accepted silently. Each case is generated here, small and deterministic, and goes through what a user
runs: ``jointssl check-data`` (its exit status and the line naming the file), ``JointDataModule.setup`` (one
DataValidationError naming the file) or the model itself; the message is the one docs/errors.md shows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from jointssl.check_data import EXIT_BAD_FILES, EXIT_CLEAN, run
from jointssl.data import DataValidationError, JointDataModule, load_volume
from jointssl.data.errors import BadFileError
from jointssl.data.intensity import percentiles_to_unit, window_to_unit
from jointssl.models.aggregator import SliceAggregator
from jointssl.models.deformable import DeformableSliceAttention, SliceDistanceBias, interpolate_along_slices
from tests.conftest import assert_documented

# Small settings of the data module (the defaults would decode to 256 x 256 and crop 224).
SMALL = {
    "batch_size": 2,
    "volume_batch_size": 1,
    "num_workers": 0,
    "global_crop_size": 16,
    "local_crop_size": 8,
    "num_slices": 4,
    "volume_size": 16,
    "volume_in_plane_size": 24,
    "validation_threads": 1,
}


def write_png(path: Path, pixels: np.ndarray | None = None, seed: int = 0) -> Path:
    """An 8-bit grey PNG (random 32 x 32 content unless ``pixels`` are given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def mr_like(shape: tuple[int, int, int] = (24, 24, 6), seed: int = 0) -> np.ndarray:
    """float32 MR-like values (X, Y, Z): a noisy bright block on a dark background, positive everywhere."""
    rng = np.random.default_rng(seed)
    volume = (rng.random(shape) * 20 + 10).astype(np.float32)
    block = volume[shape[0] // 6 : shape[0] - shape[0] // 6, shape[1] // 6 : shape[1] - shape[1] // 6]
    block += (rng.random(block.shape) * 400 + 200).astype(np.float32)
    return volume


def with_fill(volume: np.ndarray, fill: float) -> np.ndarray:
    """``volume`` with a "no data" band of -fill on one side and +fill on the other (as resampling tools write)."""
    filled = volume.copy()
    filled[:3] = -fill
    filled[-3:] = fill
    return filled


def check_data_cli(capsys, *arguments: str) -> tuple[int, list[str]]:
    """`jointssl check-data ARGUMENTS --quiet`: its exit status and its stdout lines."""
    code = run([*arguments, "--quiet", "--threads", "1"])
    return code, capsys.readouterr().out.splitlines()


def finding(lines: list[str], path: Path | str, severity: str, start: str = "") -> str:
    """The one message of ``severity`` (starting with ``start``) that check-data printed for ``path``."""
    prefix = f"{path}: {severity}: {start}"
    found = [line[len(prefix) - len(start):] for line in lines if line.startswith(prefix)]
    assert len(found) == 1, f"expected one {severity} for {path} in {lines}"
    return found[0]


def setup_errors(**data) -> dict[str, str]:
    """JointDataModule(**data).setup("fit") must fail with one DataValidationError: path -> reason."""
    with pytest.raises(DataValidationError) as raised:
        JointDataModule(**{**SMALL, **data}).setup("fit")
    return {error.path: error.reason for error in raised.value.errors}


# ------------------------------------------------------------------------------------------------------------
# Class 1: validated, then crashed
# ------------------------------------------------------------------------------------------------------------


def test_a_no_data_fill_near_the_float32_limit_is_reported_by_check_data_and_setup(tmp_path: Path, capsys) -> None:
    """The issue's volume: float32 MR, "no data" = +-3e38. It passed check-data, then MR normalisation overflowed
    float32 (x - low), NaNs reached the deformable attention and training died with an IndexError."""
    volumes = tmp_path / "volumes"
    fill = write_nifti(volumes / "fill.nii.gz", with_fill(mr_like(), 3e38))
    for seed in range(2):
        write_nifti(volumes / f"good{seed}.nii.gz", mr_like(seed=seed))
    for modality in ("auto", "mr"):
        config = tmp_path / f"{modality}.yaml"
        config.write_text(
            "data:\n  class_path: jointssl.data.JointDataModule\n  init_args:\n"
            f"    volumes: [{volumes}]\n    volume_modality: {modality}\n    num_slices: 4\n"
        )
        code, lines = check_data_cli(capsys, "--config", str(config))
        assert code == EXIT_BAD_FILES
        message = finding(lines, fill, "error")
        assert_documented("no-data-fill", f"{fill}: error: {message}")
        assert lines[-1].endswith("1 bad, 0 with warnings, 0 ignored")
    # Setup refuses it before training, and leaves nothing of it in the disk cache (the good volumes are cached).
    cache = tmp_path / "cache"
    reasons = setup_errors(volumes=[str(volumes)], volume_modality="mr", volume_cache="disk", cache_dir=str(cache))
    assert reasons == {str(fill): message}
    assert len(list(cache.glob("volumes-*/*.pt"))) == 2


@pytest.mark.parametrize("fill", [3e38, 3.4028235e38])
def test_intensity_normalisation_cannot_overflow_float32(fill: float) -> None:
    """Every normalisation computes in float64: the CT window and MR percentiles of values at the float32 limit
    (which the data checks refuse anyway) stay finite, and the result is float32."""
    values = with_fill(mr_like(), fill).astype(np.float32)
    for unit in (percentiles_to_unit(values, (0.5, 99.5)), percentiles_to_unit(values, (0.0, 100.0)),
                 window_to_unit(values, -fill, fill), window_to_unit(values, -1000.0, 1000.0)):
        assert unit.dtype == np.float32 and np.isfinite(unit).all()  # was: NaN for the percentiles and +-fill
        assert 0.0 <= unit.min() < 1e-6 and unit.max() == 1.0


def test_percentiles_are_numpys_for_ordinary_values() -> None:
    """The float64 percentile window is numpy's default ("linear") definition, to rounding."""
    from jointssl.data.intensity import percentile_window

    values = np.random.default_rng(3).normal(100.0, 30.0, size=(7, 11, 13)).astype(np.float32)
    for percentiles in ((0.5, 99.5), (1, 99), (0, 100), (37.2, 61.9)):
        expected = np.percentile(values.astype(np.float64), percentiles)
        np.testing.assert_allclose(percentile_window(values, percentiles), expected, rtol=1e-12)


def test_a_window_that_clips_every_voxel_is_refused(tmp_path: Path, capsys) -> None:
    """MR values listed as CT: the Hounsfield window clips every voxel to 1, and training would see one grey."""
    volume = write_nifti(tmp_path / "mr_as_ct.nii.gz", mr_like() + 2000.0)
    manifest = tmp_path / "volumes.csv"
    manifest.write_text("path,modality\nmr_as_ct.nii.gz,CT\n")
    code, lines = check_data_cli(capsys, "--volumes", str(manifest))
    assert code == EXIT_BAD_FILES
    message = finding(lines, volume, "error")
    assert_documented("window-clips-everything", f"{volume}: error: {message}")
    assert "every voxel is 1" in message and "hu_window -1000..1000" in message


def test_extreme_values_below_the_fill_limit_that_leave_no_contrast_are_refused(tmp_path: Path) -> None:
    """A +-1e29 fill is below the fill limit, but the MR percentiles then span it and every real voxel maps to the
    same grey: refused by the check of what training sees (after normalisation)."""
    path = write_nifti(tmp_path / "band.nii.gz", with_fill(mr_like(), 1e29))
    with pytest.raises(BadFileError) as raised:
        load_volume(path, modality="mr", in_plane_size=None)
    assert raised.value.path == str(path)
    assert_documented("no-contrast-left", str(raised.value))
    assert "every voxel is 0 or 0.5 or 1" in raised.value.reason


def test_non_finite_intensities_after_normalisation_are_refused() -> None:
    """The last line of defence for whatever else makes NaN (a resize overflow, a future transform): the check of
    the normalised values names the file."""
    from jointssl.data.intensity import check_unit_intensities

    unit = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    unit[1, 2, 3] = np.nan
    unit[2, 0, 0] = np.inf
    with pytest.raises(BadFileError) as raised:
        check_unit_intensities("/data/v.nii.gz", unit, "the MR normalisation (mr_percentiles 0.5..99.5)", unit)
    assert raised.value.path == "/data/v.nii.gz"
    assert_documented("non-finite-after-normalisation", str(raised.value))


def test_nan_in_the_deformable_attention_gives_nan_not_an_index_error() -> None:
    """A NaN activation made the sampled positions NaN, and floor().long() of NaN is -2**63: IndexError in gather.
    Now the output is NaN (the non-finite-step guard of the training step skips such a step) and finite rows stay
    finite."""
    torch.manual_seed(0)
    attention = DeformableSliceAttention(16, 2)
    x = torch.randn(2, 9, 16)
    x[0, 4, 3] = float("nan")
    out = attention(x)  # raised IndexError before
    assert out.shape == x.shape
    assert torch.isnan(out[0]).any()
    assert torch.isfinite(out[1]).all()  # the other volume of the batch is untouched
    out.sum().backward()  # and the backward pass does not raise either

    features = torch.randn(1, 1, 5, 3)
    for bad in (float("nan"), float("inf"), float("-inf")):
        positions = torch.tensor([[[1.5, bad]]])
        sampled = interpolate_along_slices(features, positions, torch.tensor([4]))
        assert torch.isfinite(sampled[..., 0, :]).all() and not torch.isfinite(sampled[..., 1, :]).all()
    bias = SliceDistanceBias(num_heads=1)(torch.tensor([[[[0.5, float("nan")]]]]))
    assert torch.isfinite(bias[..., 0]).all() and torch.isnan(bias[..., 1]).all()


def test_nan_tokens_through_the_aggregator_give_nan_not_an_exception() -> None:
    torch.manual_seed(0)
    aggregator = SliceAggregator(d_model=16, num_layers=2, num_heads=2, ffn_dim=24)
    tokens = torch.randn(2, 6, 16)
    tokens[1, 2] = float("nan")
    padding = torch.arange(6)[None, :] >= torch.tensor([6, 5])[:, None]
    out = aggregator.eval()(tokens, padding_mask=padding)
    assert torch.isnan(out[1]).any() and torch.isfinite(out[0]).all()
    # In training its batch norm spreads the NaN over the batch (the step is skipped whole): still no exception.
    assert torch.isnan(aggregator.train()(tokens, padding_mask=padding)).any()


# ------------------------------------------------------------------------------------------------------------
# Class 7: accepted, but nonsense
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [1, 2])
def test_tiny_slices_are_refused(tmp_path: Path, capsys, side: int) -> None:
    """1 x 1 or 2 x 2 slices would have been upsampled to volume_in_plane_size (256 by default)."""
    volume = write_nifti(tmp_path / "volumes" / "tiny.nii.gz", mr_like((side, side, 12)))
    # .npy is H x W x D with the slices last: saved as D x H x W, its slices are side x 24.
    transposed = tmp_path / "volumes" / "transposed.npy"
    np.save(transposed, mr_like((side, 24, 12)))
    code, lines = check_data_cli(capsys, "--volumes", str(tmp_path / "volumes"))
    assert code == EXIT_BAD_FILES
    message = finding(lines, volume, "error")
    assert_documented("tiny-slices", f"{volume}: error: {message}")
    assert message.startswith(f"slices are {side}x{side} pixels") and "upsampled to 256x256" in message
    assert finding(lines, transposed, "error").startswith(f"slices are {side}x24 pixels")


@pytest.mark.parametrize("side", [1, 2])
def test_tiny_images_are_refused(tmp_path: Path, capsys, side: int) -> None:
    image = write_png(tmp_path / "images" / "tiny.png", np.full((side, side), 128, dtype=np.uint8))
    write_png(tmp_path / "images" / "good.png")
    code, lines = check_data_cli(capsys, "--images", str(tmp_path / "images"))
    assert code == EXIT_BAD_FILES
    assert_documented("tiny-image", f"{image}: error: {finding(lines, image, 'error')}")


@pytest.mark.parametrize("value", [0, 255])
def test_constant_images_are_warned(tmp_path: Path, capsys, value: int) -> None:
    """A warning, not a refusal: slice exports hold blank slices (the reference BraTS slices do), and refusing them
    would stop a run on a sound dataset; a constant volume, by contrast, is refused."""
    image = write_png(tmp_path / "images" / "black.png", np.full((32, 32), value, dtype=np.uint8))
    for seed in range(2):
        write_png(tmp_path / "images" / f"good{seed}.png", seed=seed)
    code, lines = check_data_cli(capsys, "--images", str(tmp_path / "images"), "--config", str(small_config(tmp_path)))
    assert code == EXIT_CLEAN
    message = finding(lines, image, "warning")
    assert_documented("constant-image", f"{image}: warning: {message}")
    assert message.startswith(f"constant after decoding to [0, 1]: every pixel is {value / 255:g}")
    assert lines[-1].endswith("0 bad, 1 with warnings, 0 ignored")
    # Two grey levels are an image (a scan, a drawing): no warning.
    two_levels = np.zeros((32, 32), dtype=np.uint8)
    two_levels[8:24, 8:24] = 200
    write_png(image, two_levels)
    code, lines = check_data_cli(capsys, "--images", str(tmp_path / "images"), "--config", str(small_config(tmp_path)))
    assert code == EXIT_CLEAN and lines[-1].endswith("0 bad, 0 with warnings, 0 ignored")


def small_config(folder: Path) -> Path:
    """A data-only config with crops smaller than the test images (no "smaller than global_crop_size" warnings)."""
    config = folder / "small.yaml"
    config.write_text("data:\n  class_path: jointssl.data.JointDataModule\n  init_args:\n    global_crop_size: 16\n")
    return config


def test_empty_folders_and_header_only_manifests_are_refused(tmp_path: Path, capsys) -> None:
    good_images = tmp_path / "images"
    write_png(good_images / "a.png")
    write_png(good_images / "b.png", seed=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    hidden_only = tmp_path / "hidden_only"
    write_png(hidden_only / ".thumb.png")
    notes_only = tmp_path / "notes_only"
    notes_only.mkdir()
    (notes_only / "README.txt").write_text("exported later\n")
    image_manifest = tmp_path / "images.csv"
    image_manifest.write_text("path,label\n")
    volume_manifest = tmp_path / "volumes.csv"
    volume_manifest.write_text("image,modality\n\n,,\n")  # blank rows count as none
    code, lines = check_data_cli(
        capsys, "--images", str(good_images), str(empty), str(hidden_only), str(image_manifest),
        "--volumes", str(empty), str(notes_only), str(volume_manifest),
    )
    assert code == EXIT_BAD_FILES
    errors = [line for line in lines if ": error: " in line]
    assert errors == [
        f"{empty}: error: no usable 2D images: the folder holds no files (hidden files are skipped)",
        f"{hidden_only}: error: no usable 2D images: the folder holds no files (hidden files are skipped)",
        f"{image_manifest}: error: no usable 2D images: the manifest lists none (a header row only)",
        f"{empty}: error: no usable volumes: the folder holds no volume files or DICOM series",
        f"{notes_only}: error: no usable volumes: the folder holds no volume files or DICOM series "
        "(1 other file(s) ignored)",
        f"{volume_manifest}: error: no usable volumes: the manifest lists none (a header row only)",
    ]
    for source in (empty, hidden_only, notes_only):
        assert_documented("empty-folder-source", next(line for line in errors if line.startswith(f"{source}: ")))
    for source in (image_manifest, volume_manifest):
        assert_documented("header-only-manifest", next(line for line in errors if line.startswith(f"{source}: ")))
    # fit's setup refuses the same sources, naming each, before anything is decoded ...
    reasons = setup_errors(images=[str(good_images), str(empty), str(image_manifest)])
    assert set(reasons) == {str(empty), str(image_manifest)}
    # ... and skips them, with the reason, under on_bad_file: skip.
    datamodule = JointDataModule(**{**SMALL, "images": [str(good_images), str(empty)], "on_bad_file": "skip"})
    datamodule.setup("fit")
    assert len(datamodule.image_records) == 2


def test_duplicated_manifest_rows_and_files_listed_twice_are_warned_and_used_once(
    tmp_path: Path, capsys, caplog
) -> None:
    images = tmp_path / "images"
    for seed, name in enumerate("abc"):
        write_png(images / f"{name}.png", seed=seed)
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\nimages/a.png,x\nimages/b.png,y\nimages/a.png,x\n./images/b.png,y\n")
    other = tmp_path / "other.csv"
    other.write_text(f"path\n{images / 'c.png'}\n")
    code, lines = check_data_cli(capsys, "--images", str(manifest), str(other), str(images))
    assert code == EXIT_CLEAN
    exact = finding(lines, f"{manifest} line 4", "warning")
    assert exact == "repeats line 2 exactly: ignored"
    assert_documented("duplicate-manifest-row", f"{manifest} line 4: warning: {exact}")
    respelt = finding(lines, f"{manifest} line 5", "warning")
    assert respelt == "repeats line 3 (the same file, './images/b.png'): ignored"  # was: "listed again with other values"
    assert_documented("duplicate-manifest-row", f"{manifest} line 5: warning: {respelt}")
    # c.png: in other.csv and in the folder; a.png and b.png: in list.csv and in the folder.
    twice = {path: finding(lines, images / path, "warning", "listed by") for path in ("a.png", "c.png")}
    assert twice["a.png"] == f"listed by {manifest} and again by {images}: used once"
    assert twice["c.png"] == f"listed by {other} and again by {images}: used once"
    assert_documented("file-listed-twice", f"{images / 'a.png'}: warning: {twice['a.png']}")
    assert lines[-1].startswith("jointssl check-data: 3 files checked (3 images")
    # Training uses each file once and says so on the jointssl.data logger at WARNING, as check-data does.
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        datamodule = JointDataModule(**{**SMALL, "images": [str(manifest), str(other), str(images)]})
        datamodule.setup("fit")
    assert sorted(Path(r.path).name for r in datamodule.image_records) == ["a.png", "b.png", "c.png"]
    assert f"{manifest} line 4: repeats line 2 exactly: ignored" in caplog.messages
    assert f"{images / 'c.png'}: listed by {other} and again by {images}: used once" in caplog.messages
