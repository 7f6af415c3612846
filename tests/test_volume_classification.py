"""Volume classification with f_intra + f_inter: world -> voxel placement of candidates, slab cutting, ragged
whole volumes, AUROC against a hand computation, and short runs on synthetic LUNA16-style candidates."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from jointssl.data import DataValidationError, load_volume
from jointssl.data.volume_io import read_volume
from jointssl.downstream.pretrained import load_pretrained
from jointssl.downstream.volume_classification import VolumeClassificationData, VolumeClassifier, read_candidates
from jointssl.downstream.volume_classification.data import collate_padded, cut_slab, world_to_layout_index
from tests.conftest import shared_path
from tests.downstream_fixtures import saved_figures

TINY = {
    "backbone": "test_resnet",
    "d_model": 32,
    "aggregator": {"num_layers": 1, "num_heads": 4, "ffn_dim": 32},
}
SHAPE = (24, 20, 12)  # file axes of the synthetic volumes
# Stored with file axes pointing to patient Left, Posterior, Superior (an LPS volume, like DICOM-derived NIfTI).
LPS_AFFINE = np.array(
    [[-0.8, 0.0, 0.0, 30.0], [0.0, -0.9, 0.0, 12.0], [0.0, 0.0, 2.5, -40.0], [0.0, 0.0, 0.0, 1.0]]
)
SPHERE_RADIUS = 2.5  # voxels


def affines() -> list[np.ndarray]:
    """RAS, LPS, and a volume whose file axes are (S, R, A) with a slightly oblique direction."""
    oblique = np.array(
        [[0.0, 1.1, 0.05, -20.0], [0.0, 0.02, 0.9, 5.0], [2.0, 0.0, 0.0, 60.0], [0.0, 0.0, 0.0, 1.0]]
    )
    return [np.diag([1.0, 1.2, 2.0, 1.0]), LPS_AFFINE, oblique]


def world_lps(affine: np.ndarray, voxel: tuple[int, int, int]) -> tuple[float, float, float]:
    """LPS world mm of a file voxel index (what a LUNA16 CSV would list)."""
    x, y, z = (affine @ np.array([*voxel, 1.0]))[:3]
    return (-x, -y, z)


@pytest.mark.parametrize("slice_axis", ["axial", "coronal", "sagittal"])
def test_world_position_lands_on_the_same_voxel_of_the_loaded_volume(tmp_path: Path, slice_axis: str) -> None:
    """A marked voxel's world position, mapped through the affine, is where load_volume puts the marker."""
    rng = np.random.default_rng(0)
    for number, affine in enumerate(affines()):
        array = rng.random(SHAPE).astype(np.float32)
        voxel = (17, 6, 9)
        array[voxel] = 10.0
        path = tmp_path / f"v{number}.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), path)
        loaded = read_volume(path, slice_axis=slice_axis).array
        marker = np.unravel_index(np.argmax(loaded), loaded.shape)
        for frame, world in (("lps", world_lps(affine, voxel)), ("ras", tuple((affine @ [*voxel, 1.0])[:3]))):
            index = world_to_layout_index(world, affine, SHAPE, slice_axis, world_frame=frame)
            np.testing.assert_allclose(index, marker, atol=1e-6, err_msg=f"affine {number}, {frame}")


def test_world_to_voxel_on_the_real_oblique_mr() -> None:
    """The tumour's centre of mass in world mm maps onto its centre of mass in the loaded (reoriented) mask."""
    label_path = shared_path("volumes", "labels", "PGBM-001_1991-11-19_FLAIR_tumor.nii.gz")
    header = nib.load(label_path)
    mask = np.asarray(header.dataobj) > 0
    world = (header.affine @ np.append(np.argwhere(mask).mean(axis=0), 1.0))[:3]
    loaded = read_volume(label_path, interpolation="nearest").array > 0
    index = world_to_layout_index(world, header.affine, header.shape, world_frame="ras")
    np.testing.assert_allclose(index, np.argwhere(loaded).mean(axis=0), atol=1e-6)


def test_cut_slab_is_centred_on_the_candidate() -> None:
    volume = torch.rand(12, 40, 30)
    slab = cut_slab(volume, (5.0, 20.0, 9.0), num_slices=5, patch_size=8)
    torch.testing.assert_close(slab, volume[3:8, 16:24, 5:13])  # integer centre, own voxels: exact copy
    # Near the border: the part outside the volume is 0 (up to float32 rounding of grid_sample's coordinates).
    border = cut_slab(volume, (0.0, 0.0, 0.0), num_slices=3, patch_size=4)
    assert border[0].abs().max() < 1e-5 and border[:, :2].abs().max() < 1e-5
    torch.testing.assert_close(border[1:, 2:, 2:], volume[:2, :2, :2])
    # Resampled to a coarser grid (2 mm where the volume has 1 mm): every other voxel.
    coarse = cut_slab(volume, (6.0, 20.0, 14.0), 3, 4, spacing=(1.0, 1.0, 1.0), voxel_spacing=(2.0, 2.0, 2.0))
    torch.testing.assert_close(coarse, volume[4:9:2, 16:23:2, 10:17:2])


# ----------------------------------------------------------------------------------------------------
# Synthetic LUNA16-style candidates


def sphere(shape: tuple[int, ...], centre: tuple[int, ...], radius: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius**2


@pytest.fixture(scope="module")
def candidates_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 LPS-stored NIfTI volumes (series uid = file name); per volume one positive candidate (a bright sphere
    there) and one negative (plain noise there); coordinates in LPS world mm as LUNA16 lists them."""
    folder = tmp_path_factory.mktemp("luna")
    rng = np.random.default_rng(0)
    rows = ["seriesuid,coordX,coordY,coordZ,class"]
    for number in range(8):
        array = rng.normal(100.0, 10.0, SHAPE).astype(np.float32)
        positive = tuple(int(v) for v in rng.integers([5, 5, 3], [SHAPE[0] - 5, SHAPE[1] - 5, SHAPE[2] - 3]))
        negative = tuple((p + s // 2) % s for p, s in zip(positive, SHAPE))
        array[sphere(SHAPE, positive, SPHERE_RADIUS)] += 300.0
        uid = f"1.3.6.{number}"
        nib.save(nib.Nifti1Image(array, LPS_AFFINE), folder / f"{uid}.nii.gz")
        for voxel, label in ((positive, 1), (negative, 0)):
            rows.append(f"{uid},{','.join(f'{v:.3f}' for v in world_lps(LPS_AFFINE, voxel))},{label}")
    (folder / "candidates.csv").write_text("\n".join(rows) + "\n")
    return folder / "candidates.csv"


@pytest.fixture(scope="module")
def candidate_data(candidates_csv: Path) -> VolumeClassificationData:
    data = VolumeClassificationData(
        candidates=str(candidates_csv), num_slices=5, patch_size=16, val_fraction=0.25, modality="mr",
        batch_size=4, num_workers=0,
    )
    data.setup("fit")
    return data


def test_candidate_slabs_hold_the_sphere_at_their_centre(candidate_data: VolumeClassificationData) -> None:
    for dataset in (candidate_data.train_set, candidate_data.val_set):
        for slab, label in zip(dataset.samples, dataset.labels):
            assert slab.shape == (5, 16, 16)
            centre = slab[2, 8, 8]
            if label == 1:
                assert centre > 0.5  # the sphere's centre voxel is output voxel (N//2, S//2, S//2) ...
                # ... and the sphere lies symmetrically around it
                bright = (slab > 0.5).nonzero().double().mean(dim=0)
                torch.testing.assert_close(bright, torch.tensor([2.0, 8.0, 8.0], dtype=torch.float64))
            else:
                assert slab.max() < 0.5  # plain noise: no sphere anywhere near


def test_split_keeps_each_volume_on_one_side(candidate_data: VolumeClassificationData, candidates_csv: Path) -> None:
    items = read_candidates(candidates_csv)
    assert len(items) == 16
    assert len(candidate_data.train_set) == 12 and len(candidate_data.val_set) == 4
    assert sorted(candidate_data.val_set.labels) == [0, 0, 1, 1]  # both candidates of 2 volumes


def test_candidate_errors_name_the_file(tmp_path: Path, candidates_csv: Path) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_text(f"path,coordX,coordY,coordZ,class\n{candidates_csv.parent}/1.3.6.0.nii.gz,500,0,0,1\n")
    data = VolumeClassificationData(candidates=str(outside), val_fraction=0.0, num_workers=0)
    with pytest.raises(DataValidationError, match="1.3.6.0.nii.gz: candidate at .* outside the volume"):
        data.setup("fit")
    missing = tmp_path / "missing.csv"
    missing.write_text("seriesuid,coordX,coordY,coordZ,class\n9.9.9,0,0,0,1\n")
    with pytest.raises(DataValidationError, match="missing.csv: line 2: no volume '9.9.9'"):
        read_candidates(missing, volume_dir=candidates_csv.parent)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("seriesuid,x,y,z,class\n1,0,0,0,1\n")
    with pytest.raises(DataValidationError, match="'coordx'"):
        read_candidates(wrong)


def fit(
    model: VolumeClassifier, data: VolumeClassificationData, tmp_path: Path, max_steps: int, validate: bool = True
) -> Trainer:
    """Validation (when asked) once, after the last step."""
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=max_steps,
        limit_val_batches=None if validate else 0,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    return trainer


def test_classifier_trains_on_candidates(candidate_data: VolumeClassificationData, tmp_path: Path) -> None:
    seed_everything(0)
    model = VolumeClassifier(num_classes=2, **TINY)
    before = [p.detach().clone() for p in model.encoder.parameters()]
    trainer = fit(model, candidate_data, tmp_path, max_steps=3)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0.0 <= metrics["val/auroc"] <= 1.0 and 0.0 <= metrics["val/accuracy"] <= 1.0
    assert torch.isfinite(metrics["val/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.encoder.parameters()))
    assert len(saved_figures(tmp_path, "roc")) == 1


def hand_auroc(scores: list[float], labels: list[int]) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    positives = [s for s, y in zip(scores, labels) if y == 1]
    negatives = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positives, negatives))
    return wins / (len(positives) * len(negatives))


def test_auroc_equals_a_hand_computation() -> None:
    model = VolumeClassifier(num_classes=2, **TINY)
    scores = [0.9, 0.8, 0.7, 0.7, 0.4, 0.3, 0.2]
    labels = [1, 0, 1, 0, 1, 0, 0]  # one tie between a positive and a negative
    probabilities = torch.tensor([[1 - s, s] for s in scores])
    metrics = model.evaluation_metrics(probabilities, torch.tensor(labels))
    assert hand_auroc(scores, labels) == pytest.approx(8.5 / 12)
    assert metrics["auroc"].item() == pytest.approx(8.5 / 12)
    assert metrics["accuracy"].item() == pytest.approx(4 / 7)  # argmax: 0.9, 0.8, 0.7, 0.7 say class 1
    expected_loss = -np.mean([np.log(s if y else 1 - s) for s, y in zip(scores, labels)])
    assert metrics["loss"].item() == pytest.approx(expected_loss, rel=1e-5)
    assert "auroc" not in model.evaluation_metrics(probabilities[:2], torch.tensor([1, 1]))  # undefined


def test_pretrained_encoders_are_loaded_and_linear_mode_trains_only_the_head(
    candidate_data: VolumeClassificationData, pretrained_checkpoint: Path, tmp_path: Path
) -> None:
    weights = load_pretrained(pretrained_checkpoint)
    model = VolumeClassifier(num_classes=2, pretrained=str(pretrained_checkpoint), mode="linear")
    for module, state in ((model.encoder, weights.encoder), (model.aggregator, weights.aggregator)):
        assert module.state_dict().keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(module.state_dict()[key], value), key
    head_before = model.head.weight.detach().clone()
    fit(model, candidate_data, tmp_path, max_steps=2, validate=False)
    for module, state in ((model.encoder, weights.encoder), (model.aggregator, weights.aggregator)):
        for key, value in state.items():
            assert torch.equal(module.state_dict()[key], value), key  # weights and BatchNorm statistics
    assert not torch.equal(model.head.weight, head_before)


# ----------------------------------------------------------------------------------------------------
# Whole volumes


def test_ragged_whole_volumes_match_one_by_one(tmp_path: Path) -> None:
    """Padding never changes a volume's prediction: a batch of 7- and 11-slice volumes equals each alone."""
    rng = np.random.default_rng(1)
    rows = ["path,label"]
    for number, slices in enumerate((7, 11, 30)):
        nib.save(
            nib.Nifti1Image(rng.random((20, 20, slices)).astype(np.float32), np.eye(4)), tmp_path / f"{number}.nii.gz"
        )
        rows.append(f"{number}.nii.gz,{number % 2}")
    (tmp_path / "volumes.csv").write_text("\n".join(rows) + "\n")
    data = VolumeClassificationData(
        manifest=str(tmp_path / "volumes.csv"), val_fraction=0.0, in_plane_size=16, max_slices=12, num_workers=0
    )
    data.setup("fit")
    assert [s.shape[0] for s in data.train_set.samples] == [7, 11, 12]  # 30 slices resampled to 12
    expected = load_volume(tmp_path / "0.nii.gz", in_plane_size=16).array
    torch.testing.assert_close(data.train_set.samples[0], torch.from_numpy(expected))
    model = VolumeClassifier(num_classes=2, **TINY).eval()
    # Fetched once: training samples are augmented afresh at every access.
    items = [data.train_set[0], data.train_set[1]]
    batch = collate_padded(items)
    assert batch["padding_mask"].tolist()[0] == [False] * 7 + [True] * 4
    together = model(batch["volume"], batch["padding_mask"])
    for row in range(2):
        alone = model(items[row]["volume"][None])
        torch.testing.assert_close(together[row : row + 1], alone, rtol=1e-4, atol=1e-5)
