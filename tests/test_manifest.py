"""The one CSV manifest reader (jointssl.data.manifest) and the manifests of every data module that use it."""

from __future__ import annotations

import codecs
import os
from pathlib import Path

import pytest

from jointssl.data.errors import DataValidationError
from jointssl.data.manifest import RowError, read_manifest, resolve_path


def write(path: Path, text: str, encoding: str = "utf-8", bom: bytes = b"") -> Path:
    path.write_bytes(bom + text.encode(encoding))
    return path


def errors_of(raised: pytest.ExceptionInfo) -> list[str]:
    return [error.reason for error in raised.value.errors]


def test_excel_bom_case_and_spaces_in_column_names(tmp_path: Path) -> None:
    manifest = write(tmp_path / "m.csv", " Path ,LABEL\r\na.png, x \r\n", bom=codecs.BOM_UTF8)
    table = read_manifest(manifest, required=["path"])
    assert table.columns == ("path", "label")
    assert [(row.line, row.cells) for row in table.rows] == [(2, {"path": "a.png", "label": "x"})]


def test_utf16_with_bom_and_semicolon_or_tab_delimiters(tmp_path: Path) -> None:
    utf16 = write(tmp_path / "u.csv", "path\tlabel\nb.png\ty\n", encoding="utf-16-le", bom=codecs.BOM_UTF16_LE)
    assert read_manifest(utf16, required=["path"]).rows[0].cells == {"path": "b.png", "label": "y"}
    semicolons = write(tmp_path / "s.csv", "path;label\nc.png;1,5\n")  # decimal comma, as European Excel writes
    assert read_manifest(semicolons).rows[0].cells == {"path": "c.png", "label": "1,5"}


def test_text_that_is_not_utf8_is_refused_with_the_offset(tmp_path: Path) -> None:
    manifest = write(tmp_path / "latin.csv", "path\nsch\xe4del.png\n", encoding="latin-1")
    with pytest.raises(DataValidationError) as raised:
        read_manifest(manifest)
    [reason] = errors_of(raised)
    assert "not UTF-8 text (byte 0xe4 at offset 8)" in reason and raised.value.errors[0].path == str(manifest)


def test_quoting_unicode_and_spaces_in_paths_and_relative_resolution(tmp_path: Path) -> None:
    folder = tmp_path / "data set"
    folder.mkdir()
    manifest = write(folder / "m.csv", 'path,label\n"scans/Grüße, 1.nii.gz",a\n"with ""quotes"".png",b\n'
                                       f"{tmp_path / 'abs.png'},c\n~/home.png,d\n")
    rows = read_manifest(manifest).rows
    paths = [row.path("path") for row in rows]
    assert paths == [
        str(folder / "scans" / "Grüße, 1.nii.gz"),
        str(folder / 'with "quotes".png'),
        str(tmp_path / "abs.png"),
        os.path.join(os.path.expanduser("~"), "home.png"),
    ]
    assert resolve_path(manifest, "../x.png") == str(tmp_path / "x.png")


def test_line_numbers_count_blank_rows_and_multi_line_cells(tmp_path: Path) -> None:
    manifest = write(tmp_path / "m.csv", 'path,note\na.png,"two\nlines"\n,,\n\nb.png,\n')
    assert [(row.line, row.cells["path"]) for row in read_manifest(manifest).rows] == [(2, "a.png"), (6, "b.png")]


def test_missing_and_repeated_columns_are_reported_together(tmp_path: Path) -> None:
    manifest = write(tmp_path / "m.csv", "image,image,note\na,b,c\n")
    with pytest.raises(DataValidationError) as raised:
        read_manifest(manifest, required=[("path", "file"), "label"], what="test manifest")
    assert errors_of(raised) == [
        "line 1: column(s) ['image'] appear more than once",
        "test manifest needs the column(s) 'path' or 'file', 'label'; its header has ['image', 'image', 'note']",
    ]


def test_duplicate_rows(tmp_path: Path) -> None:
    manifest = write(tmp_path / "m.csv", "path,label\na.png,x\nb.png,y\na.png,x\n./b.png,z\n")
    with pytest.raises(DataValidationError) as raised:
        read_manifest(manifest, path_key="path").parse_all(lambda row: row)
    # The exact repeat (line 4) is dropped; the same file with another label (line 5) is a conflict.
    assert errors_of(raised) == ["line 5: path './b.png' is listed again with other values (first at line 3)"]
    without_key = read_manifest(manifest)
    assert [row.line for row in without_key.rows] == [2, 3, 5]
    assert without_key.notes == [(4, "repeats line 2 exactly: ignored")]


def test_every_bad_row_in_one_error_with_its_line(tmp_path: Path) -> None:
    manifest = write(tmp_path / "m.csv", "path,x\na.png,1\n,2\nb.png,nan\nc.png,three\nd.png,4,extra\n")

    def parse(row):
        return row.path("path"), row.number("x")

    table = read_manifest(manifest)
    results, errors = table.parse(parse)
    assert results == [(str(tmp_path / "a.png"), 1.0)]
    assert [(e.path, e.reason) for e in errors] == [
        (str(table.path), "line 3: empty path"),
        (str(table.path), "line 4: x must be finite, got 'nan'"),
        (str(table.path), "line 5: x must be a number, got 'three'"),
        (str(table.path), "line 6: 3 cells but the header has 2 columns (a path with a comma must be quoted)"),
    ]
    with pytest.raises(DataValidationError, match="4 bad input"):
        table.parse_all(parse)


def test_missing_empty_and_header_only_manifests(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="nowhere.csv: manifest does not exist"):
        read_manifest(tmp_path / "nowhere.csv")
    with pytest.raises(DataValidationError, match="empty manifest: no header row"):
        read_manifest(write(tmp_path / "empty.csv", "\n"))
    assert read_manifest(write(tmp_path / "header.csv", "path\n"), required=["path"]).rows == []


def test_row_error_is_a_value_error() -> None:
    assert issubclass(RowError, ValueError)


# ---------------------------------------------------------------------------------------------------------
# Every manifest of the project goes through the reader: the same file is read the same way everywhere.


def excel_manifest(folder: Path, header: str, row: str) -> Path:
    """A manifest as Excel saves "CSV UTF-8": byte-order mark, CRLF line ends, capitalised column names."""
    return write(folder / "excel.csv", f"{header}\r\n{row}\r\n", bom=codecs.BOM_UTF8)


def test_every_manifest_reader_accepts_an_excel_manifest(tmp_path: Path) -> None:
    from jointssl.data.discovery import discover_images, discover_volumes
    from jointssl.downstream.detection.data import read_annotations
    from jointssl.downstream.segmentation import read_pairs_manifest
    from jointssl.downstream.volume_classification import read_candidates, read_volume_labels

    (tmp_path / "a.png").write_bytes(b"")  # discovery does not decode
    images = discover_images([excel_manifest(tmp_path, "Path,Label", "a.png,x")])
    assert [(Path(r.path).name, r.label) for r in images] == [("a.png", "x")]
    volumes = discover_volumes([excel_manifest(tmp_path, "Path,Modality", "v.nii.gz,CT")])
    assert [(Path(r.path).name, r.modality) for r in volumes] == [("v.nii.gz", "ct")]
    pairs = read_pairs_manifest(excel_manifest(tmp_path, "Image,Label", "v.nii.gz,seg.nii.gz"))
    assert [(Path(p.image).name, Path(p.label).name) for p in pairs] == [("v.nii.gz", "seg.nii.gz")]
    labelled = read_volume_labels(excel_manifest(tmp_path, "Path,Label", "v.nii.gz,1"))
    assert [(Path(v.path).name, v.label) for v in labelled] == [("v.nii.gz", 1)]
    candidates = read_candidates(excel_manifest(tmp_path, "path,coordX,coordY,coordZ,class", "v.nii.gz,1,2,3,0"))
    assert [(c.world, c.label) for c in candidates] == [((1.0, 2.0, 3.0), 0)]
    annotations = read_annotations(excel_manifest(tmp_path, "seriesuid,coordX,coordY,coordZ,diameter_mm",
                                                  "1.2.3,1,2,3,4"))
    assert annotations["1.2.3"][0].diameter_mm == 4.0


def test_every_manifest_reader_reports_all_bad_rows_with_lines(tmp_path: Path) -> None:
    from jointssl.data.discovery import discover_volumes
    from jointssl.downstream.detection.data import read_annotations
    from jointssl.downstream.segmentation import read_pairs_manifest
    from jointssl.downstream.volume_classification import read_candidates, read_volume_labels

    cases = [
        (discover_volumes, "path,modality\n,CT\nv.nii.gz,PET\n", ["line 2: empty path",
                                                                  "line 3: modality must be CT, MR or empty"]),
        (read_pairs_manifest, "image,label\n,s.nii.gz\nv.nii.gz,s.nii.gz\nw.nii.gz,t.nii.gz,extra\n",
         ["line 2: empty image", "line 4: 3 cells but the header has 2 columns"]),
        (read_volume_labels, "path,label\nv.nii.gz,-1\nw.nii.gz,x\n", ["line 2: label '-1' is not a class index",
                                                                        "line 3: label 'x' is not an integer"]),
        (read_candidates, "path,coordX,coordY,coordZ,class\nv.nii.gz,a,0,0,1\nv.nii.gz,0,0,0,1.5\n",
         ["line 2: coordx must be a number", "line 3: class '1.5' is not a class index"]),
        (read_annotations, "seriesuid,coordX,coordY,coordZ,diameter_mm\n,0,0,0,1\nu,0,0,0,0\n",
         ["line 2: empty seriesuid", "line 3: diameter_mm must be positive"]),
    ]
    for reader, text, expected in cases:
        manifest = write(tmp_path / f"{reader.__name__}.csv", text)
        with pytest.raises(DataValidationError) as raised:
            reader(manifest) if reader is not discover_volumes else reader([manifest])
        reasons = errors_of(raised)
        assert len(reasons) == len(expected), (reader.__name__, reasons)
        for reason, start in zip(reasons, expected):
            assert reason.startswith(start), (reader.__name__, reason)
        assert all(error.path == str(manifest) for error in raised.value.errors)
