"""discover_images (folders, CSV manifests) and validate_images."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jointssl.data.errors import DataValidationError
from jointssl.data.discovery import ImageRecord, discover_images
from jointssl.data.validation import validate_images


def write_png(path: Path, size: tuple[int, int] = (16, 16), value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)
    return path


def test_folder_is_searched_recursively_and_sorted(tmp_path):
    root = tmp_path / "brain"
    for relative in ("b.png", "a/z.png", "a/deeper/y.png", "c/x.png"):
        write_png(root / relative)
    write_png(root / ".hidden.png")
    write_png(root / ".cache" / "thumb.png")
    records = discover_images([str(root)])
    expected = sorted(os.path.abspath(root / r) for r in ("b.png", "a/z.png", "a/deeper/y.png", "c/x.png"))
    assert [r.path for r in records] == expected
    assert {r.source for r in records} == {"brain"}
    assert all(r.label is None for r in records)
    # Same result on a second call: deterministic order.
    assert discover_images([root]) == records


def test_sources_keep_their_order_and_names(tmp_path):
    write_png(tmp_path / "lung" / "1.png")
    write_png(tmp_path / "heart" / "1.png")
    records = discover_images([tmp_path / "lung", tmp_path / "heart"])
    assert [r.source for r in records] == ["lung", "heart"]


def test_csv_manifest_with_relative_paths_labels_and_sources(tmp_path):
    data = tmp_path / "data"
    write_png(data / "img" / "one.png")
    write_png(data / "img" / "two.png")
    absolute = write_png(tmp_path / "elsewhere" / "three.png")
    manifest = data / "train.csv"
    manifest.write_text(
        f"path,label,source\nimg/one.png,normal,siteA\nimg/two.png,,\n{absolute},pneumonia,siteB\n"
    )
    records = discover_images([manifest])
    assert records == [
        ImageRecord(os.path.abspath(data / "img" / "one.png"), "siteA", "normal"),
        ImageRecord(os.path.abspath(data / "img" / "two.png"), "train", None),  # defaults: CSV stem, no label
        ImageRecord(os.path.abspath(absolute), "siteB", "pneumonia"),
    ]


def test_csv_manifest_with_only_a_path_column(tmp_path):
    write_png(tmp_path / "a.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\na.png\n")
    assert discover_images([manifest]) == [ImageRecord(os.path.abspath(tmp_path / "a.png"), "list", None)]


def test_csv_missing_paths_name_the_csv_and_rows(tmp_path):
    write_png(tmp_path / "ok.png")
    (tmp_path / "a_folder").mkdir()
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nok.png,x\nmissing1.png,y\n,z\na_folder,w\nmissing2.png,v\n")
    with pytest.raises(DataValidationError) as raised:
        discover_images([manifest])
    errors = raised.value.errors
    assert [e.path for e in errors] == [str(manifest)] * 4
    reasons = [e.reason for e in errors]
    assert reasons[0].startswith("line 3: 'missing1.png' does not exist")
    assert reasons[1].startswith("line 4: empty path")
    assert reasons[2].startswith("line 5: 'a_folder' is a folder")
    assert reasons[3].startswith("line 6: 'missing2.png' does not exist")
    assert "m.csv" in str(raised.value) and "line 6" in str(raised.value)


def test_csv_missing_paths_can_be_skipped(tmp_path, caplog):
    write_png(tmp_path / "ok.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\nok.png\nmissing.png\n")
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        records = discover_images([manifest], on_missing="skip")
    assert [Path(r.path).name for r in records] == ["ok.png"]
    assert "missing.png" in caplog.text and "line 3" in caplog.text


def test_csv_without_path_column(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,label\na.png,x\n")
    with pytest.raises(DataValidationError, match="needs the column\\(s\\) 'path'"):
        discover_images([manifest])


def test_bad_source_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_images([tmp_path / "nowhere"])
    write_png(tmp_path / "single.png")
    with pytest.raises(ValueError, match="folder or a .csv manifest"):
        discover_images([tmp_path / "single.png"])


def test_validate_images_reports_every_bad_file(tmp_path, caplog):
    good = [write_png(tmp_path / f"good{i}.png") for i in range(3)]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    tiny = write_png(tmp_path / "tiny.png", size=(4, 20))
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    records = discover_images([tmp_path])
    assert len(records) == 6

    with pytest.raises(DataValidationError) as raised:
        validate_images(records, on_bad_file="error", num_threads=2)
    reasons = {e.path: e.reason for e in raised.value.errors}
    assert set(reasons) == {str(empty), str(tiny), str(text)}
    assert "empty file" in reasons[str(empty)]
    assert "4x20 pixels" in reasons[str(tiny)]
    assert "unsupported file type" in reasons[str(text)]

    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        kept = validate_images(records, on_bad_file="skip", num_threads=2)
    assert sorted(r.path for r in kept) == sorted(str(p) for p in good)
    for path in (empty, tiny, text):
        assert str(path) in caplog.text
