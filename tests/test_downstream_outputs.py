"""What `jointssl predict` leaves of each downstream task: every task's predict_step feeds its prediction writer
(jointssl.callbacks.prediction_writers) and the files are checked against the inputs: one classification row per
input, a segmentation mask that reloads onto its source image's grid (affine, orientation, voxels), detection
candidates that round-trip through the FROC code."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from lightning.pytorch import Trainer

from jointssl.callbacks.prediction_writers import (
    ClassificationWriter,
    DetectionWriter,
    SegmentationWriter,
    read_candidates_csv,
)
from jointssl.downstream import (
    ImageClassificationData,
    ImageClassifier,
    SegmentationData,
    SliceSegmenter,
    VolumeClassificationData,
    VolumeClassifier,
    evaluate_detections,
)
from tests.conftest import shared_path
from tests.test_classification import make_class_folders
from tests.test_detection import cube
from tests.test_segmentation import oblique_affine, write_nifti
from tests.test_volume_classification import candidates_csv  # noqa: F401 (a fixture)

TINY = {"backbone": "test_resnet", "d_model": 16}


def predictor(root: Path, writer) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, default_root_dir=root, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[writer])


def read_rows(folder: Path) -> list[dict[str, str]]:
    [table] = sorted(folder.glob("*.csv"))
    with table.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_classification_csv_has_one_row_per_input(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "images", {"neg": 5, "pos": 4})
    test = make_class_folders(tmp_path / "test", {"neg": 3, "pos": 4}, seed=1)
    data = ImageClassificationData(train=str(root), test=str(test), image_size=32, batch_size=3, num_workers=0,
                                   val_fraction=0.25)
    trainer = predictor(tmp_path / "run", ClassificationWriter())
    trainer.predict(ImageClassifier(num_classes=2, **TINY), datamodule=data)
    rows = read_rows(tmp_path / "run" / "predictions")
    inputs = sorted(str(p) for p in test.rglob("*.png"))
    assert sorted(row["path"] for row in rows) == inputs  # every test image once (3 batches of 3, 3, 1)
    for row in rows:
        probabilities = [float(row["prob_neg"]), float(row["prob_pos"])]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] == ("pos" if probabilities[1] > probabilities[0] else "neg")


def test_volume_classification_csv_has_one_row_per_volume(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for number in range(5):
        write_nifti(tmp_path / f"{number}.nii.gz", rng.random((12, 12, 4 + number)).astype(np.float32))
        rows.append(f"{number}.nii.gz,{number % 2}")
    (tmp_path / "volumes.csv").write_text("\n".join(rows) + "\n")
    data = VolumeClassificationData(manifest=str(tmp_path / "volumes.csv"), val_manifest=str(tmp_path / "volumes.csv"),
                                    in_plane_size=16, batch_size=2, num_workers=0)
    model = VolumeClassifier(num_classes=2, **TINY, aggregator={"num_layers": 1, "num_heads": 4, "ffn_dim": 16})
    predictor(tmp_path / "run", ClassificationWriter()).predict(model, datamodule=data)
    written = read_rows(tmp_path / "run" / "predictions")
    assert sorted(row["path"] for row in written) == sorted(str(tmp_path / f"{n}.nii.gz") for n in range(5))
    assert all(float(r["prob_0"]) + float(r["prob_1"]) == pytest.approx(1.0, abs=1e-5) for r in written)


def test_volume_classification_csv_has_one_row_per_candidate(candidates_csv: Path, tmp_path: Path) -> None:  # noqa: F811
    """LUNA16-style candidates: each candidate (two per volume here) is an input and gets its row, which joins back
    onto its line of candidates.csv by (volume, coordX, coordY, coordZ)."""
    data = VolumeClassificationData(candidates=str(candidates_csv), num_slices=5, patch_size=16, val_fraction=0.25,
                                    modality="mr", batch_size=3, num_workers=0)
    model = VolumeClassifier(num_classes=2, **TINY, aggregator={"num_layers": 1, "num_heads": 4, "ffn_dim": 16})
    predictor(tmp_path / "run", ClassificationWriter()).predict(model, datamodule=data)
    written = read_rows(tmp_path / "run" / "predictions")
    assert len(written) == len(data.val_dataloader().dataset) == 4  # 2 validation volumes x 2 candidates
    with candidates_csv.open(newline="") as handle:
        listed = {(row["seriesuid"], float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
                  for row in csv.DictReader(handle)}
    keys = [(Path(r["path"]).name.removesuffix(".nii.gz"), float(r["coordX"]), float(r["coordY"]),
             float(r["coordZ"])) for r in written]
    assert len(set(keys)) == 4 and set(keys) <= listed  # four distinct candidates, each a line of the CSV
    assert len({r["path"] for r in written}) == 2


def oracle_segmenter(data: SegmentationData, **kwargs) -> SliceSegmenter:
    """A segmenter whose whole-volume prediction is the validation volume's own label (native grid, slice layout):
    whatever it writes must be the label file, voxel for voxel, if predict_step and the writer keep the geometry."""
    model = SliceSegmenter(num_classes=int(data.max_class_index) + 1, **TINY, decoder_channels=[16, 8, 8, 8, 8],
                           **kwargs)
    [volume] = data.val_volumes
    model._predict_labels = lambda image, grid: volume.native_label.long()[None, None]  # type: ignore[method-assign]
    return model


def test_segmentation_mask_reloads_onto_an_oblique_source_grid(tmp_path: Path) -> None:
    shape, affine = (14, 11, 9), oblique_affine()
    values = np.zeros(shape, np.uint8)
    values[2:6, 1:4, 3:8] = 1
    values[9:13, 6:10, 0:2] = 2
    rng = np.random.default_rng(0)
    image = write_nifti(tmp_path / "case7.nii.gz", rng.normal(size=shape).astype(np.float32), affine)
    write_nifti(tmp_path / "case7_label.nii.gz", values, affine)
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("image,label\ncase7.nii.gz,case7_label.nii.gz\n")
    data = SegmentationData(manifest=str(manifest), val_manifest=str(manifest), in_plane_size=16,
                            slice_axis="coronal", num_workers=0)
    data.setup("predict")
    predictor(tmp_path / "run", SegmentationWriter()).predict(oracle_segmenter(data), datamodule=data)
    written = nib.load(tmp_path / "run" / "predictions" / "case7_seg.nii.gz")
    source = nib.load(image)
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), values)


@pytest.mark.shared_data
def test_segmentation_mask_lands_on_the_real_brain_tumour(tmp_path: Path) -> None:
    pairs = shared_path("volumes", "pairs.csv")
    data = SegmentationData(manifest=str(pairs), val_manifest=str(pairs), include="PGBM-001_1991*FLAIR*",
                            in_plane_size=32, num_workers=0)
    data.setup("predict")
    [volume] = data.val_volumes
    predictor(tmp_path / "run", SegmentationWriter()).predict(oracle_segmenter(data), datamodule=data)
    [written_path] = (tmp_path / "run" / "predictions").glob("*_seg.nii.gz")
    written, source = nib.load(written_path), nib.load(volume.path)
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
    label_file = next(p.label for p in data._split[1] if p.image == volume.path)
    mask = np.asarray(nib.load(label_file).dataobj) > 0
    assert mask.any()
    np.testing.assert_array_equal(np.asarray(written.dataobj) > 0, mask)  # tumour exactly where the mask has it


def test_detection_csv_round_trips_through_the_froc(tmp_path: Path) -> None:
    """The hand-computed FROC of tests/test_detection.py (CPM 13/21), its detections given as predict_step gives
    them (world-mm centres and diameters of cubic boxes, per scan, in two batches), written by DetectionWriter and
    read back: the boxes rebuilt from the CSV score exactly as the predictions themselves."""
    gt_boxes = [np.array([cube(0, 10), cube(20, 30)]), np.array([cube(5, 15)]), np.zeros((0, 6)), np.zeros((0, 6))]
    pred_boxes = [np.array([cube(0, 10), cube(40, 44), cube(21, 29)]),
                  np.array([cube(50, 55), cube(6, 14), cube(5, 14)]), np.array([cube(60, 64), cube(70, 72)]),
                  np.zeros((0, 6))]
    pred_scores = [np.array([0.9, 0.8, 0.3]), np.array([0.7, 0.5, 0.4]), np.array([0.95, 0.3]), np.zeros(0)]
    uids = ["1.3.6.1.4.A", "1.3.6.1.4.B", "1.3.6.1.4.C", "1.3.6.1.4.D"]
    scans = [{"seriesuid": uid, "boxes": boxes, "scores": scores, "centers": (boxes[:, :3] + boxes[:, 3:]) / 2,
              "diameters": (boxes[:, 3:] - boxes[:, :3]).mean(axis=1)}
             for uid, boxes, scores in zip(uids, pred_boxes, pred_scores)]
    writer, trainer = DetectionWriter(), SimpleNamespace(default_root_dir=tmp_path)
    writer.on_predict_epoch_start(trainer, None)
    for batch_idx, batch in enumerate([scans[:2], scans[2:]]):
        writer.write_on_batch_end(trainer, None, batch, None, None, batch_idx, 0)
    writer.on_predict_epoch_end(trainer, None)

    read = read_candidates_csv(tmp_path / "predictions" / "candidates.csv", seriesuids=uids)
    assert [scan["seriesuid"] for scan in read] == uids and len(read[3]["scores"]) == 0  # D: no row, still a scan
    boxes = [np.concatenate([s["centers"] - s["diameters"][:, None] / 2, s["centers"] + s["diameters"][:, None] / 2],
                            axis=1) for s in read]
    metrics, _ = evaluate_detections(boxes, [s["scores"] for s in read], gt_boxes, iou_threshold=0.1)
    assert metrics == evaluate_detections(pred_boxes, pred_scores, gt_boxes, iou_threshold=0.1)[0]
    assert metrics["froc_cpm"] == pytest.approx(13 / 21)


def test_jointssl_predict_with_a_downstream_config_writes_the_csv(tmp_path: Path, monkeypatch) -> None:
    """`jointssl fit` then `jointssl predict --ckpt_path` with a shipped config and the CPU trainer fragment: the
    config's own writer (on by default) writes the probabilities of the validation images."""
    from jointssl.cli import main as cli_main
    from tests.conftest import REPO_ROOT

    root = make_class_folders(tmp_path / "images", {"NORMAL": 10, "PNEUMONIA": 10})
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(REPO_ROOT / "configs" / "downstream" / "cxr_linear.yaml"),
              "--trainer", str(REPO_ROOT / "configs" / "trainer" / "cpu.yaml"), f"--data.init_args.train={root}",
              "--data.init_args.image_size=32", "--data.init_args.num_workers=0", "--data.init_args.batch_size=4",
              "--data.init_args.validation_threads=1", "--model.init_args.backbone=test_resnet",
              "--model.init_args.d_model=16", "--trainer.logger=false", "--trainer.default_root_dir=run",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    cli_main(["fit", *common, "--trainer.max_epochs=1"])
    cli_main(["predict", *common, "--ckpt_path=run/checkpoints/last.ckpt"])
    rows = read_rows(tmp_path / "run" / "predictions")
    assert len(rows) == 4 and all(row["predicted"] in ("NORMAL", "PNEUMONIA") for row in rows)  # 20% held out
