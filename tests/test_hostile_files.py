"""Issue 14, classes 2, 3 and 6 and complex-valued volumes (7): memory bombs refused from their headers with the
memory of validation bounded, a disk cache that a truncated entry cannot poison, and a clear reason for every
refused file. Each case asserts its message against docs/errors.md (tests.conftest.assert_documented).

The files are written by tests/hostile_files.py, small on disk (bombs are zlib streams of zeros or sparse files).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import jointssl.data.volume_datasets as volume_datasets
from jointssl.check_data import EXIT_BAD_FILES, EXIT_CLEAN, run
from jointssl.data import BadFileError
from jointssl.data.errors import DataValidationError, printable
from jointssl.data.file_checks import DEFAULT_MAX_DECODED_BYTES, validation_memory_budget
from jointssl.data.validation import OUT_OF_MEMORY_REASON, FileCheck, MemoryBudget, check_files, check_image
from jointssl.data.volume_datasets import CachedVolumes
from jointssl.data.volume_io import VolumeRecord, load_volume
from tests import hostile_files as hostile
from tests.bad_inputs import ct_like, encoded_image, write_dicom_series, write_nifti, write_png
from tests.conftest import assert_documented

REPO_ROOT = Path(__file__).resolve().parents[1]
# What check-data may use beyond its own start (imports: torch, MONAI) while it refuses every bomb.
BOMB_RSS_MARGIN_MB = 256
# Peak RSS of the whole check-data process on the bombs; before issue 14 they peaked at 2.7-7 GB (or hit
# MemoryError under an address-space cap).
BOMB_RSS_LIMIT_MB = 1536


def check_data_lines(capsys, *args: str) -> tuple[int, list[str]]:
    """`jointssl check-data ARGS` in this process: exit status and output lines (the summary last)."""
    code = run(["--quiet", "--threads", "2", *args])
    return code, capsys.readouterr().out.splitlines()


def finding(lines: list[str], path: str | Path, severity: str = "error") -> str:
    """The one finding line of ``path`` (printed as check-data prints names) with ``severity``."""
    prefix = f"{printable(str(path))}: {severity}: "
    matches = [line for line in lines if line.startswith(prefix)]
    assert len(matches) == 1, (prefix, lines)
    return matches[0]


def run_measured(args: list[str], env: dict[str, str] | None = None) -> tuple[int, int, str]:
    """`python -m jointssl.check_data ARGS` in a subprocess of a subprocess: its exit status, its own peak RSS
    in MB (ru_maxrss of RUSAGE_CHILDREN in the middle process holds that child's only) and its output."""
    measure = (
        "import json, resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True)\n"
        "print(json.dumps([done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,\n"
        "                  done.stdout.decode('utf-8', 'backslashreplace'), done.stderr.decode('utf-8', 'backslashreplace')]))\n"
    )
    command = [sys.executable, "-c", measure, sys.executable, "-m", "jointssl.check_data", "--quiet", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    code, rss_kb, out, err = json.loads(done.stdout.strip().splitlines()[-1])
    assert "Traceback" not in err, err[-3000:]
    return code, rss_kb // 1024, out


# ------------------------------------------------------------------------------------------------------------
# 2. Memory bombs
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bombs")
    return {
        "png": hostile.png_bomb(root / "images"),
        "dicom": hostile.dicom_deflated_bomb(root / "images"),
        "nifti_gz": hostile.nifti_gz_bomb(root / "volumes"),
        "nifti_sparse": hostile.nifti_sparse_bomb(root / "volumes"),
    }


def test_bombs_are_small_on_disk_and_declare_gigabytes(bombs):
    for path in bombs.values():
        assert os.stat(path).st_blocks * 512 < 20 * 2**20, path  # what they take on disk
    assert os.path.getsize(bombs["nifti_sparse"]) > 6 * 2**30  # what they claim


def test_bombs_are_refused_from_their_headers_with_bounded_memory(bombs, tmp_path):
    """Every bomb is named with its declared decoded size and refused before decoding; the peak RSS of the whole
    check-data process stays within a few hundred MB of the same command on one small good file."""
    images, volumes = bombs["png"].parent, bombs["nifti_gz"].parent
    baseline_code, baseline_mb, _ = run_measured(["--images", str(write_png(tmp_path / "good" / "ok.png").parent)])
    assert baseline_code == EXIT_CLEAN
    code, peak_mb, out = run_measured(["--threads", "8", "--images", str(images), "--volumes", str(volumes)])
    lines = out.splitlines()
    assert code == EXIT_BAD_FILES, out
    assert_documented("png-decoded-size", finding(lines, bombs["png"]))
    assert_documented("dicom-deflated-decoded-size", finding(lines, bombs["dicom"]))
    assert_documented("nifti-gz-decoded-size", finding(lines, bombs["nifti_gz"]))
    assert_documented("nifti-sparse-decoded-size", finding(lines, bombs["nifti_sparse"]))
    assert lines[-1].startswith("jointssl check-data: 4 files checked (2 images, 2 volumes)"), lines
    assert peak_mb < baseline_mb + BOMB_RSS_MARGIN_MB and peak_mb < BOMB_RSS_LIMIT_MB, (peak_mb, baseline_mb)


def test_the_bound_is_one_setting_a_config_or_the_command_line_raises(bombs, capsys, tmp_path):
    """--max-decoded-bytes replaces the data module's max_decoded_bytes; the data module passes its own to the
    volume loader and the image check (one value, two streams)."""
    from jointssl.data import JointDataModule

    small = tmp_path / "small.nii.gz"
    write_nifti(small, ct_like((64, 64, 16)))  # 256 KiB as float32
    code, lines = check_data_lines(capsys, "--max-decoded-bytes", "64KiB", "--volumes", str(small))
    assert code == EXIT_BAD_FILES and "more than max_decoded_bytes 64.0 KiB" in finding(lines, small)
    code, lines = check_data_lines(capsys, "--max-decoded-bytes", "1MiB", "--volumes", str(small))
    assert code == EXIT_CLEAN, lines
    module = JointDataModule(max_decoded_bytes=123)
    assert module.volume_load_kwargs["max_decoded_bytes"] == 123
    assert JointDataModule().max_decoded_bytes == DEFAULT_MAX_DECODED_BYTES
    with pytest.raises(ValueError, match=r"JointDataModule: max_decoded_bytes must be >= 1 \(or null: no bound\), got 0"):
        JointDataModule(max_decoded_bytes=0)


def _small_volume_files(folder: Path) -> dict[str, Path]:
    """One 64 x 64 x 16 volume (256 KiB as float32) in every volume format."""
    import nrrd

    folder.mkdir(parents=True, exist_ok=True)
    data = ct_like((64, 64, 16))
    files = {"nifti": write_nifti(folder / "v.nii.gz", data)}
    files["mgh"] = folder / "v.mgz"
    nib.save(nib.MGHImage(data.astype(np.int16), np.eye(4)), str(files["mgh"]))
    files["nrrd"] = folder / "v.nrrd"
    nrrd.write(str(files["nrrd"]), data, {"space": "left-posterior-superior", "space directions": np.eye(3),
                                          "space origin": np.zeros(3)})
    files["npy"] = folder / "v.npy"
    np.save(files["npy"], data.astype(np.float32))
    files["dicom"] = write_dicom_series(folder / "series", z_positions=tuple(range(0, 32, 2)), size=64)
    try:
        import SimpleITK as sitk
    except ImportError:
        pass
    else:
        files["metaimage"] = folder / "v.mha"
        sitk.WriteImage(sitk.GetImageFromArray(data.transpose(2, 1, 0)), str(files["metaimage"]))
    return files


def test_every_volume_format_is_bounded_from_its_header(tmp_path, monkeypatch):
    """The class, not the examples: each reader declares its decoded size, read_volume refuses it before the
    decoder runs (a decoder that would run fails the test)."""
    files = _small_volume_files(tmp_path)
    for kind, path in files.items():
        assert load_volume(path, max_decoded_bytes=1 << 20).array.shape[0] == 16, kind
    import jointssl.data.volume_io as volume_io

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a file its header bounds")

    monkeypatch.setattr(volume_io, "_decode", no_decoding)
    for kind, path in files.items():
        with pytest.raises(BadFileError, match=r"decodes to 256\.0 KiB \(.*\), more than max_decoded_bytes 64\.0 KiB"):
            load_volume(path, max_decoded_bytes=64 << 10)


def test_every_image_format_is_bounded_from_its_header(tmp_path, monkeypatch):
    png = write_png(tmp_path / "a.png", size=(64, 64))
    jpeg = tmp_path / "a.jpg"
    jpeg.write_bytes(encoded_image("JPEG", size=(64, 64)))
    dicom = write_dicom_series(tmp_path / "series", z_positions=(0.0,), size=64) / "slice000.dcm"
    for path in (png, jpeg, dicom):
        assert check_image(str(path), max_decoded_bytes=1 << 20).ok
    import jointssl.data.validation as validation

    monkeypatch.setattr(validation, "decode_image_2d", lambda *a: pytest.fail("decoded a file its header bounds"))
    for path, size in ((png, "16.0 KiB"), (jpeg, "16.0 KiB"), (dicom, "32.0 KiB")):
        with pytest.raises(BadFileError, match=f"decodes to {size} .*more than max_decoded_bytes 8.0 KiB"):
            check_image(str(path), max_decoded_bytes=8 << 10)


def test_validation_admits_files_by_declared_size_against_one_budget():
    """Threads check files at once only while their declared sizes fit the budget; a file larger than the whole
    budget still runs (alone)."""
    costs = {"a": 40, "b": 40, "c": 40, "d": 90, "e": 10, "f": 60, "g": 250}
    held, peak, lock = [0], [0], threading.Lock()

    def check_one(name: str) -> FileCheck:
        with lock:
            held[0] += costs[name]
            peak[0] = max(peak[0], held[0] if name != "g" else 0)
        time.sleep(0.05)
        with lock:
            held[0] -= costs[name]
        return FileCheck(name, None, (costs[name],))

    results = check_files(list(costs), check_one, num_threads=6, cost_of=costs.__getitem__, memory_budget=100)
    assert [r.shape[0] for r in results] == list(costs.values())
    assert 0 < peak[0] <= 100
    assert validation_memory_budget(DEFAULT_MAX_DECODED_BYTES) == 4 * DEFAULT_MAX_DECODED_BYTES
    budget = MemoryBudget(10)
    with budget.reserve(1000):  # larger than the budget: admitted when nothing else runs
        pass


def test_a_memory_error_is_the_files_finding_not_the_end_of_the_check(tmp_path, capsys, monkeypatch):
    """A MemoryError while decoding one file (the 15000^2 DICOM before issue 14: a traceback, no file reported)
    is reported for that file, and every other file is still checked and reported."""
    import jointssl.data.validation as validation

    good, doomed = write_png(tmp_path / "images" / "a.png"), write_png(tmp_path / "images" / "b.png")
    decode = validation.decode_image_2d

    def decode_or_exhaust(path):
        if Path(path).name == doomed.name:
            raise MemoryError("Unable to allocate 1.68 GiB for an array with shape (15000, 15000)")
        return decode(path)

    monkeypatch.setattr(validation, "decode_image_2d", decode_or_exhaust)
    code, lines = check_data_lines(capsys, "--images", str(tmp_path / "images"))
    assert code == EXIT_BAD_FILES
    assert_documented("out-of-memory-during-check", finding(lines, doomed))
    assert not [line for line in lines if line.startswith(f"{good}: error")], lines
    assert "2 files checked" in lines[-1]
    results = check_files(["x", "y"], lambda item: (_ for _ in ()).throw(MemoryError()) if item == "x" else
                          FileCheck(item), num_threads=2)
    assert results[0].error.reason == OUT_OF_MEMORY_REASON and results[1].ok


# ------------------------------------------------------------------------------------------------------------
# 3. The disk cache
# ------------------------------------------------------------------------------------------------------------


def _cached(volume: Path, cache: Path) -> CachedVolumes:
    return CachedVolumes([VolumeRecord(str(volume), "s")], {"in_plane_size": 24}, cache="disk", cache_dir=cache,
                         preload=False)


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("volumes-*/*"))


def test_a_truncated_cache_entry_is_reported_once_and_rebuilt(tmp_path, caplog):
    volume, cache = write_nifti(tmp_path / "ct.nii.gz", ct_like()), tmp_path / "cache"
    expected = _cached(volume, cache)[0]["volume"].clone()
    (entry,) = _entries(cache)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # what a full disk used to leave
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        checks = _cached(volume, cache).check()  # what fit's setup runs: it used to fail with OSError [Errno 22]
        again = _cached(volume, cache)[0]["volume"]
    warnings = [r.getMessage() for r in caplog.records if "cache entry" in r.getMessage()]
    assert checks[0].ok and torch.equal(again, expected)
    assert len(warnings) == 1, warnings
    assert str(entry) in warnings[0] and str(volume) in warnings[0]
    assert_documented("cache-entry-unreadable", warnings[0])
    assert _entries(cache) == [entry]


def test_a_cache_entry_holding_something_else_is_rebuilt(tmp_path, caplog):
    volume, cache = write_nifti(tmp_path / "ct.nii.gz", ct_like()), tmp_path / "cache"
    expected = _cached(volume, cache)[0]["volume"].clone()
    (entry,) = _entries(cache)
    torch.save({"volume": "not a tensor"}, entry)
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        assert torch.equal(_cached(volume, cache)[0]["volume"], expected)
    assert any("does not hold a decoded volume" in r.getMessage() for r in caplog.records)


def test_a_full_disk_while_caching_leaves_nothing_half_written(tmp_path, caplog, monkeypatch):
    """The entry is written beside its final name (not in $TMPDIR), and a write that fails midway leaves neither
    a truncated entry nor a temporary file; the volume is still returned, and cached by the next run."""
    volume, cache = write_nifti(tmp_path / "ct.nii.gz", ct_like()), tmp_path / "cache"
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)
    save, written = torch.save, []

    def save_until_the_disk_is_full(obj, file, *args, **kwargs):
        written.append(Path(file))
        Path(file).write_bytes(b"PK\x03\x04 half a zip archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(volume_datasets.torch, "save", save_until_the_disk_is_full)
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        item = _cached(volume, cache)[0]
    assert item["volume"].shape == (10, 24, 24)
    (temporary,) = written
    assert temporary.parent == next(cache.glob("volumes-*"))  # on the cache's own file system
    assert _entries(cache) == [] and list(next(cache.glob("volumes-*")).iterdir()) == []
    assert list(scratch.iterdir()) == []
    (warning,) = [r.getMessage() for r in caplog.records if "cache entry" in r.getMessage()]
    assert_documented("cache-entry-unwritable", warning)
    monkeypatch.setattr(volume_datasets.torch, "save", save)
    assert torch.equal(_cached(volume, cache)[0]["volume"], item["volume"])
    assert len(_entries(cache)) == 1


def test_changing_the_memory_bound_keeps_the_disk_cache(tmp_path):
    volume, cache = write_nifti(tmp_path / "ct.nii.gz", ct_like()), tmp_path / "cache"
    CachedVolumes([VolumeRecord(str(volume), "s")], {}, cache="disk", cache_dir=cache)[0]
    CachedVolumes([VolumeRecord(str(volume), "s")], {"max_decoded_bytes": 2 << 30}, cache="disk", cache_dir=cache)[0]
    assert len(list(cache.glob("volumes-*"))) == 1


# ------------------------------------------------------------------------------------------------------------
# 6. Reasons for refused files, 7. complex values
# ------------------------------------------------------------------------------------------------------------


def test_float64_beyond_float32_is_not_called_infinite(tmp_path, capsys):
    path = hostile.nifti_beyond_float32(tmp_path)
    code, lines = check_data_lines(capsys, "--volumes", str(path))
    assert code == EXIT_BAD_FILES
    line = finding(lines, path)
    assert "infinite voxel" not in line
    assert_documented("float64-beyond-float32", line)
    really_infinite = ct_like().astype(np.float64)
    really_infinite[2, 2, 2] = np.inf
    other = write_nifti(tmp_path / "inf.nii.gz", really_infinite)
    with pytest.raises(BadFileError, match="infinite"):
        load_volume(other)


def test_one_bit_nifti_is_an_unsupported_type_not_a_corrupt_file(tmp_path, capsys):
    path = hostile.nifti_one_bit(tmp_path)
    code, lines = check_data_lines(capsys, "--volumes", str(path))
    assert code == EXIT_BAD_FILES
    line = finding(lines, path)
    assert "corrupt" not in line
    assert_documented("nifti-1-bit", line)


def test_all_zero_orientation_is_an_invalid_orientation_naming_the_slice(tmp_path, capsys):
    series = hostile.dicom_zero_orientation(tmp_path)
    code, lines = check_data_lines(capsys, "--volumes", str(series))
    line = finding(lines, series)
    assert code == EXIT_BAD_FILES and "duplicated" not in line and "slice000.dcm" in line
    assert_documented("dicom-zero-orientation", line)
    # One slice with a zero orientation in an otherwise good series: named too, not "mixed orientations".
    orientations = [(1, 0, 0, 0, 1, 0)] * 5
    orientations[3] = (0, 0, 0, 0, 0, 0)
    one = write_dicom_series(tmp_path / "one_zero", orientations=orientations)
    with pytest.raises(BadFileError, match=r"1 slice\(s\) with an invalid ImageOrientationPatient, e\.g\. slice003"):
        load_volume(one)


def test_short_pixel_data_names_the_slice(tmp_path, capsys):
    series = hostile.dicom_short_pixel_data(tmp_path)
    code, lines = check_data_lines(capsys, "--volumes", str(series))
    assert code == EXIT_BAD_FILES
    assert_documented("dicom-short-pixel-data", finding(lines, series))


def test_a_compressed_slice_that_cannot_be_decoded_is_named(tmp_path, capsys):
    series = hostile.dicom_broken_compressed_slice(tmp_path)
    code, lines = check_data_lines(capsys, "--volumes", str(series))
    assert code == EXIT_BAD_FILES
    assert_documented("dicom-undecodable-slice", finding(lines, series))
    good = write_dicom_series(tmp_path / "good")  # the same series, every slice intact, compressed: decodes
    import pydicom
    from pydicom.uid import RLELossless
    for slice_path in sorted(good.iterdir()):
        ds = pydicom.dcmread(slice_path)
        ds.compress(RLELossless)
        ds.save_as(slice_path)
    assert load_volume(good).array.shape[0] == 5


@pytest.mark.parametrize("write", [hostile.nifti_trailing_singletons, hostile.npy_trailing_singletons])
def test_trailing_singleton_axes_are_repaired_alike(write, tmp_path, capsys):
    """(X, Y, Z, 1, 1) loads as (X, Y, Z, 1) does, with a note, in every format."""
    path = write(tmp_path)
    code, lines = check_data_lines(capsys, "--volumes", str(path))
    assert code == EXIT_CLEAN, lines
    repairs = [line for line in lines if line.startswith(f"{path}: warning: 5D")]
    assert len(repairs) == 1, lines
    assert_documented("trailing-singleton-axes", repairs[0])
    assert load_volume(path).array.shape == load_volume(write_nifti(tmp_path / "3d.nii.gz", ct_like())).array.shape


def test_a_named_pipe_in_a_manifest_is_called_a_pipe(tmp_path, capsys):
    manifest, pipe = hostile.fifo_manifest(tmp_path)
    code, lines = check_data_lines(capsys, "--images", str(manifest))
    assert code == EXIT_BAD_FILES
    line = finding(lines, manifest)
    assert "does not exist" not in line
    assert_documented("manifest-fifo", line)
    # A manifest that is itself a pipe (other data modules read manifests with the same reader).
    from jointssl.data.manifest import read_manifest

    with pytest.raises(DataValidationError, match=r"is a named pipe \(FIFO\), not a regular file"):
        read_manifest(pipe, required=["path"])


def test_a_newline_in_a_file_name_cannot_forge_a_finding(tmp_path, capsys):
    path = hostile.newline_named_png(tmp_path)
    code, lines = check_data_lines(capsys, "--images", str(tmp_path))
    assert code == EXIT_BAD_FILES
    assert not [line for line in lines if line.startswith("forged.png")], lines
    assert len(lines) == 2, lines  # the finding and the summary
    assert_documented("newline-in-file-name", finding(lines, path))
    assert "\n" not in str(BadFileError(path, "reason\nwith a newline"))


def test_a_file_name_that_is_not_utf8_prints_under_a_utf8_locale(tmp_path):
    """stdout strict UTF-8 (a UTF-8 locale): the name's undecodable byte is shown as \\xe9, no traceback."""
    path = hostile.non_utf8_named_png(tmp_path / "images")
    code, _, out = run_measured(["--images", str(path.parent)], env={"PYTHONIOENCODING": "utf-8:strict"})
    lines = out.splitlines()
    assert code == EXIT_BAD_FILES, out
    line = finding(lines, path)
    assert "caf\\xe9.png" in line
    assert_documented("non-utf8-file-name", line)


@pytest.mark.parametrize("write", [hostile.nifti_complex, hostile.npy_complex])
def test_complex_volumes_are_refused(write, tmp_path, capsys):
    path = write(tmp_path)
    code, lines = check_data_lines(capsys, "--volumes", str(path))
    assert code == EXIT_BAD_FILES
    assert_documented("complex-valued-volume", finding(lines, path))
