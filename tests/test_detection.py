"""Nodule detection: synthetic chest CT -> boxes, the inflation rule, FROC against a hand computation, training and
validation end to end, and the pretrained encoder inflated into the 3D backbone."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from timm.layers import SEModule
from torch import nn

from jointssl.callbacks.prediction_writers import DetectionWriter, read_candidates_csv
from jointssl.data.errors import DataValidationError
from jointssl.downstream.detection.data import (
    DetectionDataset,
    NoduleDetectionDataModule,
    SyntheticNoduleCT,
    boxes_to_world,
    collect_scans,
    read_annotations,
    val_transform,
    write_synthetic_nodule_ct,
)
from jointssl.downstream.detection.metrics import evaluate_detections, froc_from_matches, match_detections
from jointssl.downstream.detection.module import NoduleDetector, ScanDetections, gather_scan_detections
from jointssl.downstream.inflate import InflationError, inflate_to_3d, reorient_kernel
from tests.downstream_fixtures import saved_figures

SHAPE, SPACING = (48, 48, 32), (1.5, 1.5, 2.0)
TINY_DETECTOR = {
    "backbone": "test_resnet",
    "fpn_channels": 8,
    "stem_depth_stride": 2,  # isotropic stem: a quarter of the default's work at full depth resolution
    "returned_layers": [1, 2],
    "base_anchor_shapes": [[6, 6, 4], [8, 8, 6]],
    "hard_negative_batch_size": 16,
    "warmup_epochs": 0,
    "val_patch_size": [32, 48, 32],  # smaller than the 48x48x32 volumes: validation runs the sliding-window path
}
# Normalised intensity ((HU window to [0, 1]) - 0.5) / 0.25 halfway between lung (-850 HU) and nodule (60 HU).
BRIGHT = ((-400 + 1000) / 2000 - 0.5) / 0.25


@pytest.fixture(scope="module")
def synthetic_ct(tmp_path_factory: pytest.TempPathFactory) -> SyntheticNoduleCT:
    return write_synthetic_nodule_ct(tmp_path_factory.mktemp("ct"), num_scans=4, num_empty_scans=1, shape=SHAPE,
                                     spacing=SPACING)


def tiny_data(ct: SyntheticNoduleCT, **overrides) -> NoduleDetectionDataModule:
    kwargs = {
        "annotations": str(ct.annotations), "volumes": [str(ct.volumes)], "val_fraction": 0.5, "target_spacing": None,
        "patch_size": (32, 32, 16), "crops_per_volume": 2, "num_workers": 0,
    }
    kwargs.update(overrides)
    return NoduleDetectionDataModule(**kwargs)


def tiny_trainer(tmp_path: Path, max_steps: int, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------------
# Data


@pytest.mark.parametrize(
    "frame, target_spacing", [("LPS", None), ("RAS", None), ("LPS", (1.0, 1.25, 1.5))], ids=["lps", "ras", "resampled"]
)
def test_boxes_land_on_the_synthetic_nodules(tmp_path: Path, frame: str, target_spacing) -> None:
    ct = write_synthetic_nodule_ct(tmp_path, num_scans=3, shape=SHAPE, spacing=SPACING, world_coordinates=frame)
    annotations = read_annotations(ct.annotations)
    scans = collect_scans([ct.volumes], annotations, frame)
    dataset = DetectionDataset(scans, val_transform(frame, target_spacing))
    voxel = np.asarray(target_spacing or SPACING)
    for position in range(len(dataset)):
        item = dataset[position]
        image, boxes = item["image"][0], item["box"].numpy()
        truth = ct.nodules[item["seriesuid"]]
        assert len(boxes) == len(truth) > 0
        for box, (stored_center, diameter) in zip(boxes, truth):
            center, size = (box[:3] + box[3:]) / 2, box[3:] - box[:3]
            np.testing.assert_allclose(size, diameter / voxel, rtol=1e-4)
            if target_spacing is None:
                # The file stores x and y decreasing (LPS-like affine); the RAS-oriented array flips them.
                expected = [SHAPE[0] - 1 - stored_center[0], SHAPE[1] - 1 - stored_center[1], stored_center[2]]
                np.testing.assert_allclose(center, expected, atol=1e-3)
            # Independently of the coordinate arithmetic: the box centre is on the bright nodule, and one voxel
            # beyond each face of the box lies dark lung.
            assert image[tuple(np.round(center).astype(int))] > BRIGHT
            for axis in range(3):
                for sign in (-1, 1):
                    outside = center.copy()
                    outside[axis] += sign * (size[axis] / 2 + 1)
                    assert image[tuple(np.round(outside).astype(int))] < BRIGHT, (axis, sign)
        # And back: the boxes map to the CSV's world centres and diameters (what predict_step reports).
        centres, diameters = boxes_to_world(boxes, item["world_affine"])
        nodules = annotations[item["seriesuid"]]
        np.testing.assert_allclose(centres, [n.center for n in nodules], atol=1e-3)
        np.testing.assert_allclose(diameters, [n.diameter_mm for n in nodules], rtol=1e-4)


def test_bad_inputs_are_reported_before_training(tmp_path: Path, synthetic_ct: SyntheticNoduleCT) -> None:
    missing_column = tmp_path / "no_diameter.csv"
    missing_column.write_text("seriesuid,coordX,coordY,coordZ\na,1,2,3\n")
    with pytest.raises(DataValidationError, match=r"no_diameter\.csv: annotations CSV needs the column\(s\) 'diameter_mm'"):
        tiny_data(synthetic_ct, annotations=str(missing_column)).setup()

    bad_value = tmp_path / "bad_value.csv"
    bad_value.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\na,1,2,3,4\nb,1,x,3,4\nc,1,2,3,-1\n")
    with pytest.raises(DataValidationError, match=r"2 bad input") as error:
        tiny_data(synthetic_ct, annotations=str(bad_value)).setup()
    assert "bad_value.csv: line 3: coordy must be a number, got 'x'" in str(error.value)
    assert "bad_value.csv: line 4: diameter_mm must be positive" in str(error.value)

    # RAS coordinates read as LPS: every annotated volume is named, with the likely cause.
    ras = write_synthetic_nodule_ct(tmp_path / "ras", num_scans=2, shape=SHAPE, spacing=SPACING, seed=1,
                                    world_coordinates="RAS")
    with pytest.raises(DataValidationError, match="2 bad input") as error:
        tiny_data(ras, world_coordinates="LPS").setup()
    assert str(error.value).count("lie outside the volume") == 2 and "world_coordinates='LPS'" in str(error.value)

    corrupt = ras.volumes / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"not a nifti header"))
    data = tiny_data(ras, world_coordinates="RAS", val_volumes=[str(ras.volumes)], volumes=[str(synthetic_ct.volumes)])
    with pytest.raises(DataValidationError, match=r"corrupt\.nii\.gz: not a readable NIfTI"):
        data.setup()
    skipping = tiny_data(ras, world_coordinates="RAS", val_volumes=[str(ras.volumes)],
                         volumes=[str(synthetic_ct.volumes)], annotations=str(ras.annotations), on_bad_file="skip")
    skipping.setup()
    assert [s.seriesuid for s in skipping.val_scans] == sorted(ras.nodules)


# ----------------------------------------------------------------------------------------------------
# Metric


def cube(low: float, high: float) -> list[float]:
    return [low, low, low, high, high, high]


def test_froc_matches_hand_computation() -> None:
    """Four scans, three nodules; the FROC curve worked out by hand.

    Detections by descending score (TP: IoU >= 0.1 with a not yet matched nodule):
        0.95 FP (scan C)   0.9 TP (A, nodule 1)   0.8 FP (A)   0.7 FP (B)   0.5 TP (B, nodule 3)
        0.4 FP (B: a second hit on nodule 3, already matched)   0.3 TP (A, nodule 2, IoU 0.512) and 0.3 FP (C)
    Operating points (FPs / 4 scans, TPs / 3 nodules), one per distinct score, after the origin:
        (0,0) (.25,0) (.25,1/3) (.5,1/3) (.75,1/3) (.75,2/3) (1,2/3) (1.25,1)
    Sensitivity at 1/8: between (0,0) and (.25,0) -> 0; at 1/4 -> 1/3 (the best point at that rate); at 1/2 -> 1/3;
    at 1 -> 2/3; at 2, 4, 8 -> 1 (beyond the last point). CPM = (0 + 1/3 + 1/3 + 2/3 + 1 + 1 + 1) / 7 = 13/21.
    At 1.125: halfway between (1, 2/3) and (1.25, 1) -> 5/6.
    """
    gt_boxes = [
        np.array([cube(0, 10), cube(20, 30)]),  # A
        np.array([cube(5, 15)]),  # B
        np.zeros((0, 6)),  # C: no nodule
        np.zeros((0, 6)),  # D: no nodule, no detection (still counts as a scan)
    ]
    pred_boxes = [
        np.array([cube(0, 10), cube(40, 44), cube(21, 29)]),
        np.array([cube(50, 55), cube(6, 14), cube(5, 14)]),
        np.array([cube(60, 64), cube(70, 72)]),
        np.zeros((0, 6)),
    ]
    pred_scores = [np.array([0.9, 0.8, 0.3]), np.array([0.7, 0.5, 0.4]), np.array([0.95, 0.3]), np.zeros(0)]
    metrics, _ = evaluate_detections(pred_boxes, pred_scores, gt_boxes, iou_threshold=0.1)
    expected = {0.125: 0.0, 0.25: 1 / 3, 0.5: 1 / 3, 1: 2 / 3, 2: 1.0, 4: 1.0, 8: 1.0}
    for rate, sensitivity in expected.items():
        assert metrics[f"sensitivity_fp{rate:g}"] == pytest.approx(sensitivity), rate
    assert metrics["froc_cpm"] == pytest.approx(13 / 21)
    assert metrics["AR_IoU_0.10_MaxDet_100"] == pytest.approx(1.0)  # every nodule is hit at some score

    matches = match_detections(pred_boxes, pred_scores, gt_boxes, iou_thresholds=[0.1])
    curve = froc_from_matches(matches, num_scans=4, fp_rates=[1.125])
    assert curve.sensitivity_at_rates[0] == pytest.approx(5 / 6)
    np.testing.assert_allclose(curve.fps_per_scan, [0, 0.25, 0.25, 0.5, 0.75, 0.75, 1.0, 1.25])
    np.testing.assert_allclose(curve.sensitivity, np.array([0, 0, 1, 1, 1, 2, 2, 3]) / 3)


# ----------------------------------------------------------------------------------------------------
# Inflation


def test_center_inflation_equals_the_2d_conv_on_every_axial_slice() -> None:
    """An axial plane of a RAS volume, shown in jointssl's radiological slice layout (rows anterior -> posterior,
    columns right -> left), through the 2D conv gives the inflated conv's output on that plane."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    conv3d = inflate_to_3d(conv, "center")
    volume = torch.randn(1, 2, 10, 12, 5)  # [B, C, x, y, z]
    with torch.no_grad():
        output3d = conv3d(volume)
        for z in range(volume.shape[-1]):
            slice_2d = volume[..., z].flip(-2, -1).transpose(-2, -1)  # [B, C, rows=Y, cols=X]
            output2d = conv(slice_2d).transpose(-2, -1).flip(-2, -1)  # back to [B, C, x, y]
            torch.testing.assert_close(output2d, output3d[..., z])


def test_mean_inflation_on_a_depth_constant_volume_equals_the_2d_conv() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
    conv3d = inflate_to_3d(conv, "mean")
    plane = torch.randn(1, 1, 9, 7)  # [B, C, x, y]
    volume = plane[..., None].expand(-1, -1, -1, -1, 6)
    with torch.no_grad():
        expected = conv(plane.flip(-2, -1).transpose(-2, -1)).transpose(-2, -1).flip(-2, -1)
        output3d = conv3d(volume)
    for z in range(1, 5):  # interior slices: the depth padding does not reach them
        torch.testing.assert_close(output3d[..., z], expected)


def test_unsupported_modules_are_refused_by_name() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Sequential(nn.ReLU(), SEModule(8)))
    with pytest.raises(InflationError, match=r"1\.1: cannot inflate .*SEModule"):
        inflate_to_3d(model)


@pytest.mark.parametrize("inflation", ["mean", "center"])
def test_pretrained_backbone_is_the_inflated_checkpoint(pretrained_checkpoint: Path, inflation: str) -> None:
    model = NoduleDetector(pretrained=str(pretrained_checkpoint), inflation=inflation,
                           **{**TINY_DETECTOR, "backbone": "resnet18"})  # the checkpoint's architecture wins
    assert model.hparams.backbone == "test_resnet" and model.hparams.pretrained is None
    state_2d = torch.load(pretrained_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    inflated = model.backbone.state_dict()
    # returned_layers [1, 2]: the stem, layer1 and layer2 are kept, layer3/4 are not needed by the FPN.
    expected_keys = {k[len("encoder.backbone."):] for k in state_2d
                     if k.startswith("encoder.backbone.") and not k.startswith(("encoder.backbone.layer3",
                                                                                "encoder.backbone.layer4"))}
    assert set(inflated) == expected_keys
    kernels = 0
    for key, tensor_3d in inflated.items():
        tensor_2d = state_2d[f"encoder.backbone.{key}"]
        if tensor_3d.ndim == 5:  # a convolution kernel [O, I, x, y, z]
            kernels += 1
            reoriented = reorient_kernel(tensor_2d)
            depth = tensor_3d.shape[-1]
            assert depth == tensor_2d.shape[-2]
            torch.testing.assert_close(tensor_3d.sum(-1), reoriented)  # both rules: the depth sum is the 2D kernel
            if inflation == "mean":
                torch.testing.assert_close(tensor_3d, reoriented[..., None].expand_as(tensor_3d) / depth)
            else:
                torch.testing.assert_close(tensor_3d[..., depth // 2], reoriented)
                off_centre = torch.cat([tensor_3d[..., : depth // 2], tensor_3d[..., depth // 2 + 1:]], dim=-1)
                assert not off_centre.any()
        else:  # BatchNorm weights, biases and running statistics are copied unchanged
            assert torch.equal(tensor_3d, tensor_2d), key
    assert kernels == 3 + 2 + 3  # deep stem (3 convs), layer1 (2), layer2 (2 + downsample conv)


# ----------------------------------------------------------------------------------------------------
# Training and validation


def test_fit_and_validate_on_synthetic_ct(tmp_path: Path, synthetic_ct: SyntheticNoduleCT) -> None:
    """Two training steps (= one epoch: two training scans, one of them without nodules), then validation on the
    two other scans, whole volumes through the sliding-window inferer."""
    seed_everything(0)
    model = NoduleDetector(pretrained=None, **TINY_DETECTOR)
    heads_before = [p.detach().clone() for p in model.detector.network.classification_head.parameters()]
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(model, datamodule=tiny_data(synthetic_ct))
    assert trainer.global_step == 2
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    for name in ("train/loss", "train/loss_cls", "train/loss_box_reg"):
        assert math.isfinite(metrics[name]), name
    heads_after = model.detector.network.classification_head.parameters()
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, heads_after))

    rates = ("0.125", "0.25", "0.5", "1", "2", "4", "8")
    for key in ["val/froc_cpm", *(f"val/sensitivity_fp{r}" for r in rates), "val/AP_IoU_0.10_MaxDet_100"]:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["val/froc_cpm"] == pytest.approx(np.mean([metrics[f"val/sensitivity_fp{r}"] for r in rates]))
    assert [p.name for p in saved_figures(tmp_path, "froc")] == ["froc_epoch000.png"]  # the validation's FROC curve


def test_duplicated_validation_scans_count_once() -> None:
    """A DistributedSampler pads shards by repeating scans; each scan must enter the FROC once."""
    scan = ScanDetections(3, np.array([[1.0, 1, 1, 5, 5, 5]]), np.array([0.5]), np.array([[1.0, 1, 1, 5, 5, 5]]))
    other = ScanDetections(1, np.zeros((0, 6)), np.zeros(0), np.array([[2.0, 2, 2, 6, 6, 6]]))
    gathered = gather_scan_detections([scan, other, scan], torch.device("cpu"))
    assert [g.index for g in gathered] == [1, 3]
    for expected, actual in zip((other, scan), gathered):
        for name in ("boxes", "scores", "gt_boxes"):
            np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name))


def test_linear_mode_trains_heads_on_the_frozen_pretrained_backbone(
    tmp_path: Path, synthetic_ct: SyntheticNoduleCT, pretrained_checkpoint: Path
) -> None:
    seed_everything(0)
    model = NoduleDetector(pretrained=str(pretrained_checkpoint), mode="linear", **{**TINY_DETECTOR,
                                                                                     "stem_depth_stride": 1})
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    fpn_before = [p.detach().clone() for p in model.detector.network.feature_extractor.fpn.parameters()]
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=tiny_data(synthetic_ct, augment=False))
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key  # weights and BatchNorm statistics
    fpn_after = model.detector.network.feature_extractor.fpn.parameters()
    assert any(not torch.equal(a, b) for a, b in zip(fpn_before, fpn_after))

    # Prediction reports detections in world millimetres, written as a LUNA16 submission.
    data = tiny_data(synthetic_ct, predict_volumes=[str(synthetic_ct.volumes)])
    trainer = tiny_trainer(tmp_path, max_steps=1, limit_predict_batches=1, callbacks=[DetectionWriter()])
    predictions = trainer.predict(model, datamodule=data)
    scan = predictions[0][0]
    assert scan["seriesuid"] == min(synthetic_ct.nodules)
    assert scan["centers"].shape == (len(scan["scores"]), 3) and np.isfinite(scan["centers"]).all()
    candidates = tmp_path / "predictions" / "candidates.csv"
    assert candidates.read_text().splitlines()[0].startswith("seriesuid,coordX,coordY,coordZ,probability")
    [written] = read_candidates_csv(candidates, seriesuids=[scan["seriesuid"]])
    np.testing.assert_allclose(written["centers"], scan["centers"])
    np.testing.assert_allclose(written["scores"], scan["scores"])

    # The detector's own checkpoint rebuilds without the pretraining file.
    path = tmp_path / "detector.ckpt"
    trainer.save_checkpoint(path)
    restored = NoduleDetector.load_from_checkpoint(path)
    assert restored.hparams.pretrained is None and restored.hparams.backbone == "test_resnet"
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
