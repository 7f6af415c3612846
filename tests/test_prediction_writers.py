"""jointssl.callbacks.prediction_writers with predictions in the contract's format: a real Trainer.predict writes
one classification row per input (in dataset order), detection candidates round-trip through the FROC code,
embeddings and cluster assignments line up, a segmentation mask reloads onto its source's grid (the real brain MR
tumour mask; oblique NIfTI, MetaImage and NRRD sources, whose world frame is checked against SimpleITK's and the
NRRD header's own geometry), and under 2 DDP ranks with a padding sampler every input is written exactly once.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader

from jointssl.callbacks.prediction_writers import (
    CANDIDATE_COLUMNS,
    ClassificationWriter,
    DetectionWriter,
    EmbeddingWriter,
    SegmentationWriter,
    read_candidates_csv,
)
from tests.conftest import shared_path

CLASSES = ["normal", "pneumonia", "other"]


def probabilities_of(index: int) -> torch.Tensor:
    """A fixed probability row per input (most probable class: index % 3)."""
    row = torch.full((3,), 0.1)
    row[index % 3] = 0.8
    return row


class ContractModule(LightningModule):
    """A predict_step that returns whatever the batch's ``prediction`` builder makes of the batch's indices."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def predict_step(self, batch, batch_idx):
        return self.make([int(i) for i in batch])


class IndexData(LightningDataModule):
    def __init__(self, count: int, batch_size: int, classes: list[str] | None = None) -> None:
        super().__init__()
        self.count, self.batch_size = count, batch_size
        if classes is not None:
            self.classes = classes

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(list(range(self.count)), batch_size=self.batch_size)


def predict(root: Path, writer, make, count: int, batch_size: int = 3, classes=None) -> None:
    trainer = Trainer(accelerator="cpu", devices=1, default_root_dir=root, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[writer])
    trainer.predict(ContractModule(make), datamodule=IndexData(count, batch_size, classes), return_predictions=False)


def classification_prediction(indices: list[int]) -> dict:
    return {"paths": [f"/data/image_{i:02d}.png" for i in indices],
            "probabilities": torch.stack([probabilities_of(i) for i in indices])}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_classification_csv_has_one_row_per_input_in_dataset_order(tmp_path: Path) -> None:
    predict(tmp_path, ClassificationWriter(), classification_prediction, count=7, classes=CLASSES)
    path = tmp_path / "predictions" / "classification.csv"
    with path.open(newline="") as handle:
        assert next(csv.reader(handle)) == ["path", "prob_normal", "prob_pneumonia", "prob_other", "predicted"]
    rows = read_csv(path)
    assert [r["path"] for r in rows] == [f"/data/image_{i:02d}.png" for i in range(7)]  # 3 batches: 3, 3, 1
    for i, row in enumerate(rows):
        assert [float(row[f"prob_{c}"]) for c in CLASSES] == pytest.approx(probabilities_of(i).tolist())
        assert row["predicted"] == CLASSES[i % 3]
    assert not list((tmp_path / "predictions").glob(".*"))  # no temporary file left


def one_volume_candidates(indices: list[int]) -> dict:
    """Candidates of a single volume: every input has the same path and its own world position."""
    return {"paths": ["/data/ct.mhd"] * len(indices), "probabilities": torch.stack([probabilities_of(i) for i in indices]),
            "coordinates": torch.tensor([[i + 0.1, -2.5 * i, 1e-3 * i] for i in indices], dtype=torch.float64)}


def test_candidates_of_one_volume_each_get_their_row_with_their_coordinates(tmp_path: Path) -> None:
    predict(tmp_path, ClassificationWriter(), one_volume_candidates, count=5, batch_size=2, classes=CLASSES)
    path = tmp_path / "predictions" / "classification.csv"
    with path.open(newline="") as handle:
        assert next(csv.reader(handle)) == ["path", "coordX", "coordY", "coordZ", "prob_normal", "prob_pneumonia",
                                            "prob_other", "predicted"]
    rows = read_csv(path)
    assert [r["path"] for r in rows] == ["/data/ct.mhd"] * 5
    # Written exactly (repr of the float64), so that they join onto the candidates CSV's numbers.
    assert [(float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])) for r in rows] == [
        (i + 0.1, -2.5 * i, 1e-3 * i) for i in range(5)]
    assert [r["predicted"] for r in rows] == [CLASSES[i % 3] for i in range(5)]


def test_classification_columns_are_indices_without_class_names_and_output_dir_is_used(tmp_path: Path) -> None:
    predict(tmp_path, ClassificationWriter(output_dir=str(tmp_path / "elsewhere"), filename="p.csv"),
            classification_prediction, count=2)
    rows = read_csv(tmp_path / "elsewhere" / "p.csv")
    assert list(rows[0]) == ["path", "prob_0", "prob_1", "prob_2", "predicted"]
    assert [r["predicted"] for r in rows] == ["0", "1"]
    assert not (tmp_path / "predictions").exists()


def test_an_unwritable_output_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where the folder should be")
    with pytest.raises(OSError, match=r"cannot write the predictions file .*blocked/classification.csv"):
        predict(tmp_path, ClassificationWriter(output_dir=str(tmp_path / "blocked")), classification_prediction, 2)


# Detection: four scans, nodules in world mm; the third scan has no candidates, the fourth no nodule.
SCAN_UIDS = ["1.3.6.1.4.1.14519.5.2.1.6279.6001.1", "scan-2", "scan-3", "scan-4"]
NODULES = {"1.3.6.1.4.1.14519.5.2.1.6279.6001.1": [(-60.25, 40.5, -120.125, 8.0)],
           "scan-2": [(10.0, -20.0, 30.0, 6.0), (55.5, 12.25, -8.0, 12.0)], "scan-3": [(0.0, 0.0, 0.0, 5.0)]}


def detection_prediction(indices: list[int]) -> list[dict]:
    rng = np.random.default_rng(sum(indices))
    scans = []
    for i in indices:
        uid = SCAN_UIDS[i]
        true = [(x + 0.7, y - 0.3, z + 0.2, d * 1.1) for x, y, z, d in NODULES.get(uid, [])] if i != 2 else []
        false = [tuple(rng.uniform(-100, 100, 3)) + (rng.uniform(4, 10),) for _ in range(3 if i != 2 else 0)]
        found = np.array(true[:1] + false, dtype=np.float64).reshape(-1, 4)
        scores = rng.uniform(0.05, 0.95, len(found))
        scans.append({"seriesuid": uid, "boxes": np.zeros((len(found), 6)), "scores": torch.as_tensor(scores),
                      "centers": torch.as_tensor(found[:, :3]), "diameters": found[:, 3]})
    return scans


def world_boxes(centers: np.ndarray, diameters: np.ndarray) -> np.ndarray:
    """Cubes around the centres (what FROC matches by IoU), in world mm."""
    from monai.data.box_utils import convert_box_mode

    boxes = np.concatenate([centers, np.repeat(np.asarray(diameters).reshape(-1, 1), 3, axis=1)], axis=1)
    return convert_box_mode(boxes.reshape(-1, 6), src_mode="cccwhd", dst_mode="xyzxyz")


def test_detection_csv_round_trips_through_the_froc(tmp_path: Path) -> None:
    from jointssl.downstream.detection.metrics import evaluate_detections

    predict(tmp_path, DetectionWriter(), detection_prediction, count=4, batch_size=2)
    path = tmp_path / "predictions" / "candidates.csv"
    with path.open(newline="") as handle:
        assert next(csv.reader(handle))[:5] == list(CANDIDATE_COLUMNS)  # the LUNA16 submission layout
    assert {r["seriesuid"] for r in read_csv(path)} == {SCAN_UIDS[0], SCAN_UIDS[1], SCAN_UIDS[3]}

    in_memory = detection_prediction([0, 1]) + detection_prediction([2, 3])
    read_back = read_candidates_csv(path, seriesuids=SCAN_UIDS)
    truth = [world_boxes(np.array([n[:3] for n in NODULES.get(u, [])]).reshape(-1, 3),
                         [n[3] for n in NODULES.get(u, [])]) for u in SCAN_UIDS]

    def froc(scans):
        return evaluate_detections([world_boxes(np.asarray(s["centers"]), s["diameters"]) for s in scans],
                                   [np.asarray(s["scores"]) for s in scans], truth)

    (expected, expected_curve), (metrics, curve) = froc(in_memory), froc(read_back)
    assert 0 < expected["froc_cpm"] < 1  # some nodules found, with false positives
    assert metrics == expected
    np.testing.assert_array_equal(curve.sensitivity, expected_curve.sensitivity)
    for scan, original in zip(read_back, in_memory):
        np.testing.assert_array_equal(scan["centers"], np.asarray(original["centers"]))  # repr: exact floats
    assert [len(s["scores"]) for s in read_back] == [4, 4, 0, 3]
    assert [s["seriesuid"] for s in read_candidates_csv(path)] == [SCAN_UIDS[0], SCAN_UIDS[1], SCAN_UIDS[3]]


def test_a_luna16_submission_without_diameters_reads_and_bad_rows_are_named(tmp_path: Path) -> None:
    from jointssl.data.errors import DataValidationError

    submission = tmp_path / "submission.csv"
    submission.write_text("seriesuid,coordX,coordY,coordZ,probability\nA,1.5,2,3,0.9\nA,4,5,6,0.1\n")
    [scan] = read_candidates_csv(submission)
    assert scan["seriesuid"] == "A" and scan["centers"].tolist() == [[1.5, 2, 3], [4, 5, 6]]
    assert np.isnan(scan["diameters"]).all()
    submission.write_text("seriesuid,coordX,coordY,coordZ,probability\nA,1,2,x,0.9\n")
    with pytest.raises(DataValidationError, match="line 2: coordz must be a number"):
        read_candidates_csv(submission)


def embedding_prediction(indices: list[int]) -> dict:
    return {"paths": [f"/data/{i}.{'png' if i % 2 else 'nii.gz'}" for i in indices],
            "kind": ["image" if i % 2 else "volume" for i in indices],
            "embeddings": torch.stack([torch.arange(4, dtype=torch.float32) + 10 * i for i in indices]),
            "assignments": torch.tensor([i % 5 for i in indices])}


def test_embeddings_and_assignments_line_up(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    predict(tmp_path, EmbeddingWriter(), embedding_prediction, count=5, batch_size=2)
    embeddings = load_file(tmp_path / "predictions" / "embeddings.safetensors")["embeddings"]
    rows = read_csv(tmp_path / "predictions" / "assignments.csv")
    assert list(rows[0]) == ["path", "kind", "cluster"] and len(rows) == len(embeddings) == 5
    for i, (row, embedding) in enumerate(zip(rows, embeddings)):
        assert row == {"path": f"/data/{i}.{'png' if i % 2 else 'nii.gz'}", "kind": "image" if i % 2 else "volume",
                       "cluster": str(i % 5)}
        assert embedding.tolist() == [10 * i + k for k in range(4)]


def predict_masks(root: Path, volumes: list[tuple[str, np.ndarray]]) -> Path:
    """SegmentationWriter through Trainer.predict, one volume per batch; returns the predictions folder."""
    predict(root, SegmentationWriter(), lambda indices: [{"path": volumes[i][0], "labels": volumes[i][1]}
                                                          for i in indices], count=len(volumes), batch_size=1)
    return root / "predictions"


@pytest.mark.shared_data
def test_the_real_brain_tumour_mask_reloads_onto_the_mr_image(tmp_path: Path) -> None:
    image = shared_path("volumes", "mr", "PGBM-001_1991-11-19_FLAIR.nii.gz")
    label = shared_path("volumes", "labels", "PGBM-001_1991-11-19_FLAIR_tumor.nii.gz")
    mask = np.asarray(nib.load(label).dataobj).astype(np.int16)  # the image file's voxel order (same grid)
    assert mask.any()
    folder = predict_masks(tmp_path, [(str(image), mask)])
    written, source = nib.load(folder / "PGBM-001_1991-11-19_FLAIR_seg.nii.gz"), nib.load(image)
    assert written.shape == source.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)  # the tumour where the mask has it


def oblique_lps_geometry() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Direction (columns: the axes), spacing and origin of an oblique LPS grid."""
    angle = np.deg2rad(20)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1.0]])
    return direction, np.array([0.8, 1.1, 2.5]), np.array([-90.0, 110.0, 35.0])


def assert_mask_on_world_grid(written: Path, labels: np.ndarray, voxel_to_lps: np.ndarray) -> None:
    image = nib.load(written)
    np.testing.assert_array_equal(np.asarray(image.dataobj), labels)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ voxel_to_lps  # NIfTI's world frame is RAS
    np.testing.assert_allclose(image.affine, ras, atol=1e-5)


def test_mask_of_an_oblique_nifti_keeps_its_affine(tmp_path: Path) -> None:
    direction, spacing, origin = oblique_lps_geometry()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    ras[:3, :3] = ras[:3, :3] @ direction @ np.diag(spacing)
    ras[:3, 3] = [-origin[0], -origin[1], origin[2]]
    shape, labels = (9, 8, 6), np.zeros((9, 8, 6), np.int16)
    labels[1:4, 2:5, 0:3], labels[6, 7, 5] = 2, 300  # 300: stored as int16
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), ras), tmp_path / "oblique.nii")
    folder = predict_masks(tmp_path, [(str(tmp_path / "oblique.nii"), labels)])
    image = nib.load(folder / "oblique_seg.nii.gz")
    assert image.get_data_dtype() == np.int16
    np.testing.assert_allclose(image.affine, ras, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(image.dataobj), labels)


def test_masks_of_metaimage_and_nrrd_sources_are_in_their_world_frame(tmp_path: Path) -> None:
    import nrrd
    import SimpleITK as sitk

    direction, spacing, origin = oblique_lps_geometry()
    shape = (7, 6, 5)  # file axes i, j, k
    labels = np.zeros(shape, np.uint8)
    labels[1:3, 2:5, 1:4], labels[6, 0, 4] = 1, 3  # a corner voxel: a flipped or transposed axis would move it

    meta = sitk.GetImageFromArray(np.zeros(shape[::-1], np.float32))  # SimpleITK arrays are k, j, i
    meta.SetSpacing(spacing.tolist())
    meta.SetOrigin(origin.tolist())
    meta.SetDirection(direction.flatten().tolist())
    sitk.WriteImage(meta, str(tmp_path / "scan.mha"))
    # ITK's own voxel -> LPS mapping of the grid, point by point
    corners = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
    points = np.array([meta.TransformIndexToPhysicalPoint(c) for c in corners])
    itk_lps = np.eye(4)
    itk_lps[:3, 3] = points[0]
    itk_lps[:3, :3] = (points[1:] - points[0]).T

    steps = (direction @ np.diag(spacing)).T  # NRRD 'space directions': one row per axis
    nrrd.write(str(tmp_path / "scan.nrrd"), np.zeros(shape, np.float32),
               {"space": "left-posterior-superior", "space directions": steps, "space origin": origin})
    nrrd_lps = np.eye(4)
    nrrd_lps[:3, :3], nrrd_lps[:3, 3] = steps.T, origin

    folder = predict_masks(tmp_path / "mha", [(str(tmp_path / "scan.mha"), labels)])
    assert_mask_on_world_grid(folder / "scan_seg.nii.gz", labels, itk_lps)
    folder = predict_masks(tmp_path / "nrrd", [(str(tmp_path / "scan.nrrd"), labels)])
    assert_mask_on_world_grid(folder / "scan_seg.nii.gz", labels, nrrd_lps)


def test_segmentation_writer_refuses_labels_off_the_source_grid_and_clashing_names(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), tmp_path / folder / "case.nii.gz")
    writer = SegmentationWriter()
    with pytest.raises(ValueError, match=r"shape \(3, 4, 4\), but the file's voxel array is \(4, 4, 3\)"):
        writer.write_mask(tmp_path / "out", str(tmp_path / "a" / "case.nii.gz"), np.zeros((3, 4, 4), np.uint8))
    writer.write_mask(tmp_path / "out", str(tmp_path / "a" / "case.nii.gz"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="would both be written as"):
        writer.write_mask(tmp_path / "out", str(tmp_path / "b" / "case.nii.gz"), np.zeros((4, 4, 3), np.uint8))


# ------------------------------------------------------------------------------------------------------------
# Two DDP ranks (gloo, forked): a DistributedSampler that pads 5 inputs to 3 per rank deals input 0 to both ranks.

DDP_INPUTS = 5


class PaddedShards(IndexData):
    def predict_dataloader(self) -> DataLoader:
        from torch.utils.data import DistributedSampler

        inputs = list(range(self.count))
        return DataLoader(inputs, batch_size=self.batch_size, sampler=DistributedSampler(inputs, shuffle=False))


class RecordingModule(ContractModule):
    """Also notes which inputs this rank predicted (rank<r>.txt), to show that the sampler repeated one."""

    def __init__(self, make, folder: str) -> None:
        super().__init__(make)
        self.folder = folder

    def predict_step(self, batch, batch_idx):
        with open(Path(self.folder) / f"rank{self.global_rank}.txt", "a") as handle:
            handle.write("".join(f"{int(i)}\n" for i in batch))
        return super().predict_step(batch, batch_idx)


@pytest.mark.parametrize("writer", ["classification", "embedding", "candidates"])
def test_two_ddp_ranks_write_every_input_exactly_once(tmp_path: Path, writer: str) -> None:
    """Repeats are told by dataset index: the padding's repeat is dropped, candidates sharing a path are kept."""
    callback, make = {"classification": (ClassificationWriter(), classification_prediction),
                      "embedding": (EmbeddingWriter(), embedding_prediction),
                      "candidates": (ClassificationWriter(), one_volume_candidates)}[writer]
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", default_root_dir=tmp_path, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False, callbacks=[callback])
    trainer.predict(RecordingModule(make, str(tmp_path)), datamodule=PaddedShards(DDP_INPUTS, 2, CLASSES),
                    return_predictions=False)
    dealt = [int(line) for r in (0, 1) for line in (tmp_path / f"rank{r}.txt").read_text().split()]
    assert sorted(dealt) == [0, 0, 1, 2, 3, 4]  # the padding repeated input 0 on rank 1
    if writer == "classification":
        rows = read_csv(tmp_path / "predictions" / "classification.csv")
        assert [r["path"] for r in rows] == [f"/data/image_{i:02d}.png" for i in range(DDP_INPUTS)]
        assert [r["predicted"] for r in rows] == [CLASSES[i % 3] for i in range(DDP_INPUTS)]
    elif writer == "candidates":
        rows = read_csv(tmp_path / "predictions" / "classification.csv")
        assert [float(r["coordX"]) for r in rows] == [i + 0.1 for i in range(DDP_INPUTS)]
        assert [r["predicted"] for r in rows] == [CLASSES[i % 3] for i in range(DDP_INPUTS)]
    else:
        from safetensors.torch import load_file

        embeddings = load_file(tmp_path / "predictions" / "embeddings.safetensors")["embeddings"]
        assert embeddings[:, 0].tolist() == [10.0 * i for i in range(DDP_INPUTS)]
        assert len(read_csv(tmp_path / "predictions" / "assignments.csv")) == DDP_INPUTS


def test_two_ddp_ranks_write_each_mask_once(tmp_path: Path) -> None:
    """Masks are written by the rank that predicted them; the volume both ranks were dealt is one file."""
    volumes = []
    for i in range(3):
        path = tmp_path / f"case{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((5, 4, 3), np.float32), np.diag([1.0, 2.0, 3.0, 1.0])), path)
        labels = np.zeros((5, 4, 3), np.uint8)
        labels[i, :, :] = i + 1
        volumes.append((str(path), labels))
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", default_root_dir=tmp_path, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False, callbacks=[SegmentationWriter()])
    make = lambda indices: [{"path": volumes[i][0], "labels": volumes[i][1]} for i in indices]  # noqa: E731
    trainer.predict(RecordingModule(make, str(tmp_path)), datamodule=PaddedShards(3, 1), return_predictions=False)
    dealt = [int(line) for r in (0, 1) for line in (tmp_path / f"rank{r}.txt").read_text().split()]
    assert sorted(dealt) == [0, 0, 1, 2]
    written = sorted((tmp_path / "predictions").iterdir())
    assert [p.name for p in written] == [f"case{i}_seg.nii.gz" for i in range(3)]  # no temporary left
    for path, (_, labels) in zip(written, volumes):
        np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), labels)
