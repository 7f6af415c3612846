"""jointssl.data.validation: the one FileCheck, bad-file policy and runner, the validation cache, progress bars,
check-data's incremental report, and one bad file reported and skipped alike by every data module."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from lightning.pytorch import Trainer

from jointssl import check_data
from jointssl.data import JointDataModule, validation
from jointssl.data.errors import BadFileError, DataValidationError
from jointssl.data.validation import (
    FileCheck,
    ValidationCache,
    apply_bad_file_policy,
    check_files,
    check_images,
    file_stamp,
)
from jointssl.data.volume_datasets import CachedVolumes
from jointssl.downstream import (
    ImageClassificationData,
    NoduleDetectionDataModule,
    SegmentationData,
    VolumeClassificationData,
    write_synthetic_nodule_ct,
)
from tests.bad_inputs import SETTINGS, absolute, ct_like, write_nifti, write_png
from tests.gloo_ranks import run_ranks

EMPTY_FILE = "empty file (0 bytes)"


def bad(path: str, reason: str = "broken") -> FileCheck:
    return FileCheck.failed(BadFileError(path, reason))


@pytest.fixture
def decoded_images(monkeypatch) -> list[str]:
    """The paths the image check decodes, in order."""
    paths: list[str] = []
    decode = validation.decode_image_2d

    def counting(path):
        paths.append(str(path))
        return decode(path)

    monkeypatch.setattr(validation, "decode_image_2d", counting)
    return paths


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal, to see what a user at one would."""

    def isatty(self) -> bool:
        return True


# ----------------------------------------------------------------------------------------------------------
# FileCheck, the policy, the runner
# ----------------------------------------------------------------------------------------------------------


def test_the_error_policy_lists_every_bad_file_in_one_error() -> None:
    checks = [FileCheck("a.png", shape=(8, 8)), bad("b.png", "empty"), bad("c.png", "truncated")]
    with pytest.raises(DataValidationError) as raised:
        apply_bad_file_policy(checks, "error")
    assert [(e.path, e.reason) for e in raised.value.errors] == [("b.png", "empty"), ("c.png", "truncated")]
    assert apply_bad_file_policy(checks[:1], "error") == [0]
    with pytest.raises(ValueError, match="on_bad_file"):
        apply_bad_file_policy(checks, "ignore")  # type: ignore[arg-type]


def test_the_skip_policy_logs_each_bad_file_once_on_rank_0(caplog, monkeypatch) -> None:
    checks = [bad("a.png", "empty"), FileCheck("b.png"), bad("c.png", "truncated"), FileCheck("d.png")]
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        assert apply_bad_file_policy(checks, "skip", what="image") == [1, 3]
    assert [r.getMessage() for r in caplog.records] == [
        "skipping bad image a.png: empty",
        "skipping bad image c.png: truncated",
    ]
    caplog.clear()
    monkeypatch.setattr(validation.distributed, "rank", lambda: 1)  # under DDP rank 0 reports for every rank
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        assert apply_bad_file_policy(checks, "skip") == [1, 3]
    assert caplog.records == []


def test_a_file_check_travels_as_plain_data() -> None:
    for check in (FileCheck("v.nii", None, (3, 8, 8), ("a note",)), bad("x.png", "empty")):
        plain = json.loads(json.dumps(check.to_plain()))
        again = FileCheck.from_plain(plain)
        assert (again.path, again.shape, again.notes) == (check.path, check.shape, check.notes)
        assert (again.error is None) == (check.error is None)
        if check.error is not None:
            assert (again.error.path, again.error.reason) == (check.error.path, check.error.reason)


def test_check_files_returns_results_in_item_order_and_passes_each_on_in_order() -> None:
    # The first item finishes last: results and callbacks still come in item order.
    delays = {"a": 0.2, "b": 0.0, "c": 0.05, "d": 0.0}
    seen: list[str] = []

    def check(name: str) -> FileCheck:
        time.sleep(delays[name])
        if name == "c":
            raise BadFileError(name, "bad")
        return FileCheck(name, shape=(threading.get_ident(),))

    results = check_files(list(delays), check, num_threads=3, on_result=lambda c: seen.append(c.path))
    assert [c.path for c in results] == seen == ["a", "b", "c", "d"]
    assert [c.ok for c in results] == [True, True, False, True]
    assert results[2].error.reason == "bad"


# ----------------------------------------------------------------------------------------------------------
# The validation cache
# ----------------------------------------------------------------------------------------------------------


def write_images(folder: Path, count: int) -> list[str]:
    return [absolute(write_png(folder / f"img{i}.png", size=(16, 16), seed=i)) for i in range(count)]


def cached_check(folder: Path, paths: list[str], settings: dict | None = None) -> list[FileCheck]:
    """One start: read the cache, check the images through it, write it."""
    cache = ValidationCache(folder, "images", settings or {"min_side": 8})
    checks = check_images(paths, num_threads=2, cache=cache)
    cache.save()
    return checks


def test_a_restart_decodes_only_new_and_changed_files(tmp_path: Path, decoded_images: list[str]) -> None:
    paths = write_images(tmp_path / "images", 5)
    empty = tmp_path / "images" / "empty.png"
    empty.write_bytes(b"")
    paths.append(absolute(empty))
    first = cached_check(tmp_path / "cache", paths)
    assert sorted(decoded_images) == sorted(paths)
    decoded_images.clear()

    again = cached_check(tmp_path / "cache", paths)
    assert decoded_images == [], "an unchanged file is not decoded again"
    assert [c.to_plain() for c in again] == [c.to_plain() for c in first]
    assert again[-1].error.reason == EMPTY_FILE, "bad files are remembered with their reason"

    changed, deleted = paths[1], paths[2]
    stat = os.stat(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, newer modification time
    os.remove(deleted)
    new = absolute(write_png(tmp_path / "images" / "new.png", size=(16, 16), seed=9))
    current = [p for p in paths if p != deleted] + [new]
    cached_check(tmp_path / "cache", current)
    assert sorted(decoded_images) == sorted([changed, new])
    (stored,) = (tmp_path / "cache").glob("images-*.json")
    assert sorted(json.loads(stored.read_text())["entries"]) == sorted(current), "the deleted file dropped out"


def test_other_settings_use_another_cache_file(tmp_path: Path, decoded_images: list[str]) -> None:
    paths = write_images(tmp_path / "images", 2)
    cached_check(tmp_path / "cache", paths, {"min_side": 8})
    decoded_images.clear()
    cached_check(tmp_path / "cache", paths, {"min_side": 20})
    assert sorted(decoded_images) == sorted(paths)
    assert len(list((tmp_path / "cache").glob("images-*.json"))) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_a_cache", "bad_entries"])
def test_a_damaged_cache_file_is_ignored_with_a_warning(
    tmp_path: Path, decoded_images: list[str], caplog, damage: str
) -> None:
    paths = write_images(tmp_path / "images", 3)
    cached_check(tmp_path / "cache", paths)
    (stored,) = (tmp_path / "cache").glob("images-*.json")
    text = stored.read_text()
    document = json.loads(text)
    stored.write_text(
        {
            "garbage": "\x00\xff not json",
            "truncated": text[: len(text) // 2],
            "not_a_cache": json.dumps([1, 2, 3]),
            "bad_entries": json.dumps(
                {
                    **document,
                    "results": [["not", "a", "check", "result", "at all"]],
                    "entries": {p: f"{file_stamp(p)} {i}" for p, i in zip(paths, ["99", "x", "0"])},
                }
            ),
        }[damage]
    )
    decoded_images.clear()
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        checks = cached_check(tmp_path / "cache", paths)
    assert sorted(decoded_images) == sorted(paths) and all(c.ok for c in checks)
    if damage != "bad_entries":  # a damaged entry alone is just checked again
        assert any(str(stored) in r.getMessage() for r in caplog.records)
    decoded_images.clear()
    cached_check(tmp_path / "cache", paths)
    assert decoded_images == [], "the cache was written anew"


def test_an_unwritable_cache_is_a_warning(tmp_path: Path, caplog) -> None:
    paths = write_images(tmp_path / "images", 1)
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        assert cached_check(tmp_path / "cache", paths)[0].ok
    assert any("could not write the validation cache" in r.getMessage() for r in caplog.records)


def image_datamodule(images: Path, **overrides) -> JointDataModule:
    kwargs = {"batch_size": 2, "num_workers": 0, "persistent_workers": False, **SETTINGS}
    return JointDataModule(images=[str(images)], **{**kwargs, **overrides})


def test_joint_data_module_restarts_without_decoding_and_writes_only_under_its_root(
    tmp_path: Path, decoded_images: list[str], monkeypatch
) -> None:
    write_images(tmp_path / "data" / "images", 4)
    volumes = [str(write_nifti(tmp_path / "data" / "volumes" / f"v{i}.nii.gz", ct_like(seed=i))) for i in range(2)]
    loads: list[int] = []
    getitem = CachedVolumes.__getitem__
    monkeypatch.setattr(CachedVolumes, "__getitem__", lambda self, p: loads.append(p) or getitem(self, p))

    def start() -> JointDataModule:
        datamodule = image_datamodule(
            tmp_path / "data" / "images", volumes=[str(tmp_path / "data" / "volumes")], volume_cache="disk",
            volume_batch_size=2,
        )
        datamodule.trainer = Trainer(default_root_dir=tmp_path / "run", accelerator="cpu", logger=False)
        datamodule.setup("fit")
        return datamodule

    first = start()
    assert len(decoded_images) == 4 and loads
    decoded_images.clear()
    loads.clear()
    second = start()
    assert decoded_images == [] and loads == [], "a restart neither decodes an image nor reads a volume"
    assert second.image_records == first.image_records and [r.path for r in second.volume_records] == volumes
    assert len(second.slice_dataset) == len(first.slice_dataset), "slice counts come from the cache"
    assert sorted(p.name for p in (tmp_path / "run" / "validation_cache").iterdir()) == sorted(
        p.name for p in (tmp_path / "run" / "validation_cache").glob("*-*.json")
    )
    assert {p.name.split("-")[0] for p in (tmp_path / "run" / "validation_cache").iterdir()} == {"images", "volumes"}
    # Without a Trainer (and without a cache_dir) nothing is written; validation_cache=False turns it off.
    decoded_images.clear()
    image_datamodule(tmp_path / "data" / "images").setup("fit")
    assert len(decoded_images) == 4
    off = image_datamodule(tmp_path / "data" / "images", validation_cache=False, cache_dir=str(tmp_path / "shared"))
    off.setup("fit")
    assert not (tmp_path / "shared" / "validation").exists()


def test_two_ddp_ranks_write_one_cache_that_a_restart_reads(tmp_path: Path) -> None:
    write_images(tmp_path / "images", 9)
    results = run_ranks("tests.validation_cache_worker", tmp_path)
    assert [r["first"] for r in results] in ([5, 4], [4, 5]), "each rank decodes its own shard"
    assert [r["second"] for r in results] == [0, 0], "the restart decodes nothing on any rank"
    assert all(r["records"] == 9 for r in results)
    (stored,) = (tmp_path / "cache" / "validation").glob("images-*.json")
    assert len(json.loads(stored.read_text())["entries"]) == 9
    assert list((tmp_path / "cache" / "validation").iterdir()) == [stored], "no temporary file left behind"


# ----------------------------------------------------------------------------------------------------------
# Progress bars and check-data's incremental report
# ----------------------------------------------------------------------------------------------------------


def test_progress_bars_only_on_a_terminal(tmp_path: Path, monkeypatch, capsys) -> None:
    paths = write_images(tmp_path / "images", 3)
    check_images(paths, num_threads=1, progress="validating images")
    assert capsys.readouterr().err == "", "stderr is not a terminal here (as in a Slurm log)"
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    check_images(paths, num_threads=1, progress="validating images")
    assert "validating images" in terminal.getvalue()
    terminal.truncate(0)
    check_images(paths, num_threads=1, progress=None)
    assert terminal.getvalue() == ""


def test_check_data_quiet_draws_no_progress_bar(tmp_path: Path, monkeypatch, capsys) -> None:
    write_images(tmp_path / "images", 2)
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert check_data.run(["--images", str(tmp_path / "images"), "--quiet"]) == 0
    assert terminal.getvalue() == ""
    assert check_data.run(["--images", str(tmp_path / "images")]) == 0
    assert "checking images" in terminal.getvalue()
    assert "2 files checked" in capsys.readouterr().out


def test_check_data_prints_each_finding_as_soon_as_it_is_found(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a_empty.png").write_bytes(b"")
    write_images(tmp_path / "images", 3)
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    printed_before: dict[str, str] = {}
    decode = validation.decode_image_2d

    def watching(path):
        printed_before[Path(path).name] = out.getvalue()
        return decode(path)

    monkeypatch.setattr(validation, "decode_image_2d", watching)
    assert check_data.run(["--images", str(tmp_path / "images"), "--threads", "1"]) == 1
    line = f"{absolute(tmp_path / 'images' / 'a_empty.png')}: error: {EMPTY_FILE}"
    assert line in printed_before["img2.png"], "the finding was printed before the last image was decoded"
    assert out.getvalue().splitlines()[0] == line


# ----------------------------------------------------------------------------------------------------------
# One bad file, every data module
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ModuleCase:
    """A data module with good data and one empty file of the right extension (``bad``). ``run(on_bad_file)``
    sets it up and returns the files it kept."""

    bad: str
    run: Callable[[str], list[str]]


def joint_images_case(root: Path) -> ModuleCase:
    good = write_images(root / "images", 3)
    empty = root / "images" / "empty.png"
    empty.write_bytes(b"")

    def run(on_bad_file: str) -> list[str]:
        datamodule = image_datamodule(root / "images", on_bad_file=on_bad_file)
        datamodule.setup("fit")
        assert sorted(r.path for r in datamodule.image_records) == sorted(good)
        return [r.path for r in datamodule.image_records]

    return ModuleCase(absolute(empty), run)


def write_volumes(folder: Path, count: int) -> list[str]:
    return [str(write_nifti(folder / f"vol{i}.nii.gz", ct_like(seed=i))) for i in range(count)]


def empty_volume(folder: Path, name: str = "empty.nii.gz") -> str:
    path = folder / name
    path.write_bytes(b"")
    return str(path)


def joint_volumes_case(root: Path) -> ModuleCase:
    write_volumes(root / "volumes", 2)
    empty = empty_volume(root / "volumes")

    def run(on_bad_file: str) -> list[str]:
        datamodule = JointDataModule(
            volumes=[str(root / "volumes")], batch_size=2, volume_batch_size=2, num_workers=0,
            persistent_workers=False, on_bad_file=on_bad_file, **SETTINGS,
        )
        datamodule.setup("fit")
        return [r.path for r in datamodule.volume_records]

    return ModuleCase(empty, run)


def image_classification_case(root: Path) -> ModuleCase:
    for label in ("NORMAL", "PNEUMONIA"):
        for i in range(3):
            write_png(root / "train" / label / f"{label}{i}.png", size=(16, 16), seed=i)
    empty = root / "train" / "NORMAL" / "empty.png"
    empty.write_bytes(b"")

    def run(on_bad_file: str) -> list[str]:
        data = ImageClassificationData(
            train=str(root / "train"), image_size=16, num_workers=0, on_bad_file=on_bad_file, validation_threads=1
        )
        data.setup("fit")
        return data.train_paths + data.val_paths

    return ModuleCase(absolute(empty), run)


def segmentation_case(root: Path) -> ModuleCase:
    images = write_volumes(root / "images", 2)
    images.append(empty_volume(root / "images"))
    rows = ["image,label"]
    for number, image in enumerate(images):
        label = write_nifti(root / "labels" / f"label{number}.nii.gz", (ct_like(seed=number) > 0).astype("int16"))
        rows.append(f"{image},{label}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")

    def run(on_bad_file: str) -> list[str]:
        data = SegmentationData(
            manifest=str(root / "pairs.csv"), val_fraction=0.0, in_plane_size=16, num_workers=0,
            on_bad_file=on_bad_file,
        )
        data.setup("fit")
        return [volume.path for volume in data.train_volumes + data.val_volumes]

    return ModuleCase(images[-1], run)


def volume_classification_case(root: Path) -> ModuleCase:
    volumes = write_volumes(root, 2) + [empty_volume(root)]
    (root / "volumes.csv").write_text("path,label\n" + "".join(f"{v},{i % 2}\n" for i, v in enumerate(volumes)))

    def run(on_bad_file: str) -> list[str]:
        data = VolumeClassificationData(
            manifest=str(root / "volumes.csv"), val_fraction=0.0, in_plane_size=16, max_slices=8, num_workers=0,
            on_bad_file=on_bad_file,
        )
        data.setup("fit")
        # Samples carry no path: the kept volumes are those whose labels remain, in order.
        assert data.train_set.labels == [0, 1]
        return volumes[:2]

    return ModuleCase(volumes[-1], run)


def detection_case(root: Path) -> ModuleCase:
    ct = write_synthetic_nodule_ct(root, num_scans=3, shape=(48, 48, 32), spacing=(1.5, 1.5, 2.0))
    empty = empty_volume(Path(ct.volumes), "empty_scan.nii.gz")

    def run(on_bad_file: str) -> list[str]:
        data = NoduleDetectionDataModule(
            annotations=str(ct.annotations), volumes=[str(ct.volumes)], val_fraction=0.34, target_spacing=None,
            patch_size=(16, 16, 8), num_workers=0, on_bad_file=on_bad_file,
        )
        data.setup("fit")
        return [scan.path for scan in data.train_scans + data.val_scans]

    return ModuleCase(empty, run)


def check_data_case(root: Path, stream: str) -> ModuleCase:
    if stream == "images":
        write_images(root / "data", 2)
        empty = absolute(root / "data" / "empty.png")
    else:
        write_volumes(root / "data", 2)
        empty = str(root / "data" / "empty.nii.gz")
    Path(empty).write_bytes(b"")

    def run(on_bad_file: str) -> list[str]:
        # check-data applies no policy: it reports the bad file as training's "error" would, and checks the rest.
        settings = check_data.settings_from_datamodule(JointDataModule(**SETTINGS), threads=1)
        sources = {"images": [], "volumes": [], stream: [str(root / "data")]}
        report = check_data.check_data(sources["images"], sources["volumes"], settings, progress=False)
        if on_bad_file == "error" and report.errors:
            raise DataValidationError([BadFileError(f.path, f.message) for f in report.errors])
        return [f.path for f in report.findings if f.severity != "error"]

    return ModuleCase(empty, run)


MODULE_CASES: dict[str, Callable[[Path], ModuleCase]] = {
    "JointDataModule-images": joint_images_case,
    "JointDataModule-volumes": joint_volumes_case,
    "ImageClassificationData": image_classification_case,
    "SegmentationData": segmentation_case,
    "VolumeClassificationData": volume_classification_case,
    "NoduleDetectionDataModule": detection_case,
    "check-data-images": lambda root: check_data_case(root, "images"),
    "check-data-volumes": lambda root: check_data_case(root, "volumes"),
}


@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_every_data_module_reports_and_skips_one_bad_file_alike(tmp_path: Path, caplog, name: str) -> None:
    case = MODULE_CASES[name](tmp_path)
    with pytest.raises(DataValidationError) as raised:
        case.run("error")
    assert [(e.path, e.reason) for e in raised.value.errors] == [(case.bad, EMPTY_FILE)]
    if name.startswith("check-data"):
        return  # it has no skip: every file is reported
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        kept = case.run("skip")
    assert kept and case.bad not in kept
    skipped = [r.getMessage() for r in caplog.records if r.name == "jointssl.data" and "skipping bad" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].endswith(f" {case.bad}: {EMPTY_FILE}")
