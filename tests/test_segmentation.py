"""3D segmentation with the slice encoder: U-Net wiring, 2.5D context, data pairing and checks, whole-volume
evaluation with MONAI's DiceMetric against a numpy Dice, and short runs on the real brain-tumour and CT data."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from jointssl.data import BadFileError, DataValidationError
from jointssl.downstream.pretrained import load_pretrained
from jointssl.downstream.segmentation import (
    SegmentationData,
    SegmentationPair,
    SlabDataset,
    SliceSegmenter,
    SliceUNet,
    dice_per_class,
    load_pair,
    pair_folders,
    read_pairs_manifest,
    to_source_order,
)
from jointssl.models import SliceAggregator, SliceEncoder
from tests.conftest import shared_path
from tests.downstream_fixtures import saved_figures

TINY = {"backbone": "test_resnet", "d_model": 32, "decoder_channels": [32, 16, 16, 8, 8]}
TINY_AGGREGATOR = {"num_layers": 1, "num_heads": 4, "ffn_dim": 32}
# TotalSegmentator label values -> our classes: liver, spleen, both kidneys.
ORGANS = {5: 1, 1: 2, 2: 3, 3: 3}


def trainer(tmp_path: Path, max_steps: int, validate: bool = True) -> Trainer:
    """Validation (when asked) once, after the last step, on the whole validation volumes."""
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        limit_val_batches=None if validate else 0,
        val_check_interval=max_steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture(scope="module")
def brain_data() -> SegmentationData:
    """The four FLAIR volumes with their tumour masks, 32 px slices: 3 train, 1 validation (fixed split)."""
    pairs = shared_path("volumes", "pairs.csv")
    data = SegmentationData(
        manifest=str(pairs), include="PGBM-*_FLAIR*", in_plane_size=32, val_fraction=0.25, batch_size=4,
        num_workers=0,
    )
    data.setup("fit")
    return data


@pytest.fixture(scope="module")
def ct_data() -> SegmentationData:
    """The 30-slice CT with TotalSegmentator's map reduced to liver/spleen/kidneys, in 3-slice slabs (2.5D); the
    only labelled CT is used for training and validation alike."""
    pairs = shared_path("volumes", "pairs.csv")
    data = SegmentationData(
        manifest=str(pairs), val_manifest=str(pairs), include="example_ct_sm*", label_mapping=ORGANS,
        in_plane_size=32, slab_slices=3, batch_size=2, num_workers=0,
    )
    data.setup("fit")
    return data


# ----------------------------------------------------------------------------------------------------
# Network


def test_unet_segments_every_slice_of_a_slab_at_input_resolution() -> None:
    encoder = SliceEncoder("test_resnet", d_model=32)
    net = SliceUNet(encoder, num_classes=3, decoder_channels=[32, 16, 16, 8, 8]).eval()
    slabs = torch.randn(2, 1, 3, 40, 36)  # sides that are not multiples of the total stride 32
    logits = net(slabs)
    assert logits.shape == (2, 3, 3, 40, 36)
    # 2D mode: each slice is segmented on its own, whatever slab it sits in.
    alone = net(slabs[:, :, 1:2])
    torch.testing.assert_close(logits[:, :, 1:2], alone, rtol=1e-4, atol=1e-5)


def test_2p5d_context_reaches_each_slice_from_its_neighbours() -> None:
    encoder = SliceEncoder("test_resnet", d_model=32)
    # downsample=1: a key at every slice (with 4 slices and the default 4, one key sits between slices 1 and 2).
    net = SliceUNet(encoder, 2, [32, 16, 16, 8, 8], SliceAggregator(32, **TINY_AGGREGATOR, downsample=1)).eval()
    slab = torch.randn(1, 1, 4, 32, 32)
    changed = slab.clone()
    changed[:, :, 3] = torch.randn(32, 32)  # only the last slice differs

    def deepest_maps(slabs: torch.Tensor) -> torch.Tensor:
        slices = slabs.transpose(1, 2).flatten(0, 1)
        return net.add_context(*net.features(slices, slab_size=4))[-1]

    # Slice 0 is identical in both slabs; through f_inter its deepest feature map depends on slice 3 (the
    # logits do too, but an untrained decoder in eval mode shrinks that difference to float noise).
    assert (deepest_maps(slab)[0] - deepest_maps(changed)[0]).abs().max() > 1e-4
    net.train()
    net(slab).square().mean().backward()
    assert net.aggregator.layers[0].ffn[0].weight.grad.abs().sum() > 0
    assert net.context_projection.weight.grad.abs().sum() > 0


def test_slice_embeddings_from_feature_maps_equal_the_encoder() -> None:
    encoder = SliceEncoder("test_resnet", d_model=32).eval()
    images = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(encoder.embed_features(encoder.backbone(images)), encoder(images))


# ----------------------------------------------------------------------------------------------------
# Dice


def numpy_dice(prediction: np.ndarray, label: np.ndarray, cls: int) -> float:
    predicted, truth = prediction == cls, label == cls
    return 2.0 * np.logical_and(predicted, truth).sum() / (predicted.sum() + truth.sum())


def test_dice_per_class_equals_numpy_on_a_hand_made_volume() -> None:
    label = np.zeros((3, 4, 5), dtype=np.int64)
    label[0:2, 0:2, 0:3] = 1  # 12 voxels
    label[2, 2:4, 1:5] = 2  # 8 voxels; class 3 is absent from the label
    prediction = np.zeros_like(label)
    prediction[0:2, 0:2, 1:4] = 1  # 8 of its 12 voxels overlap class 1
    prediction[2, 3, 0:5] = 2  # 4 of 5 overlap class 2
    prediction[0, 3, 4] = 3  # a false positive of the absent class

    def as_tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array)[None, None]

    dice = dice_per_class(as_tensor(prediction), as_tensor(label), num_classes=4)[0]
    assert dice[0].item() == pytest.approx(numpy_dice(prediction, label, 1)) == pytest.approx(2 * 8 / 24)
    assert dice[1].item() == pytest.approx(numpy_dice(prediction, label, 2)) == pytest.approx(2 * 4 / 13)
    assert torch.isnan(dice[2])  # absent from the label: left out of the means
    strict = dice_per_class(as_tensor(prediction), as_tensor(label), num_classes=4, ignore_empty=False)[0]
    assert strict[2].item() == 0.0  # absent but predicted
    prediction[0, 3, 4] = 0
    strict = dice_per_class(as_tensor(prediction), as_tensor(label), num_classes=4, ignore_empty=False)[0]
    assert strict[2].item() == 1.0  # absent and not predicted


# ----------------------------------------------------------------------------------------------------
# Data


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine), path)
    return str(path)


def test_label_grid_must_match_its_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = write_nifti(tmp_path / "img.nii.gz", rng.normal(size=(16, 16, 6)).astype(np.float32))
    shifted = np.diag([1.0, 1.0, 2.0, 1.0])
    shifted[0, 3] = 5.0
    moved = write_nifti(tmp_path / "moved.nii.gz", np.ones((16, 16, 6), np.uint8), shifted)
    smaller = write_nifti(tmp_path / "small.nii.gz", np.ones((16, 12, 6), np.uint8))
    for label in (moved, smaller):
        with pytest.raises(BadFileError) as error:
            load_pair(SegmentationPair(image, label), in_plane_size=16)
        assert image in str(error.value) and label in str(error.value)


def test_labels_are_mapped_and_resized_with_nearest_neighbours(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = write_nifti(tmp_path / "img.nii.gz", rng.normal(size=(16, 16, 6)).astype(np.float32))
    values = np.zeros((16, 16, 6), np.uint8)
    values[2:10, 2:10, 1:4] = 5  # "liver"
    values[10:14, 10:14, 2:5] = 7  # not mapped: background
    values[0:2, 12:16, 0:2] = 2
    label = write_nifti(tmp_path / "lab.nii.gz", values)
    volume = load_pair(SegmentationPair(image, label), in_plane_size=8, label_mapping={5: 1, 2: 3})
    assert volume.image.shape == volume.label.shape == (6, 8, 8)
    assert volume.native_label.shape == (6, 16, 16)
    assert set(volume.native_label.unique().tolist()) == {0, 1, 3}
    assert set(volume.label.unique().tolist()) <= {0, 1, 3}  # nearest: no value between classes
    assert (volume.native_label == 1).sum() == 8 * 8 * 3
    # A volume without any annotation (a constant map) is valid: all background.
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros((16, 16, 6), np.uint8))
    assert load_pair(SegmentationPair(image, empty), in_plane_size=8).native_label.abs().sum() == 0
    fractional = write_nifti(tmp_path / "frac.nii.gz", rng.random((16, 16, 6)).astype(np.float32))
    with pytest.raises(BadFileError, match="non-integer"):
        load_pair(SegmentationPair(image, fractional), in_plane_size=8)


def oblique_affine() -> np.ndarray:
    """Voxel -> RAS with permuted and flipped axes, anisotropic voxels, a 20-degree tilt and an offset: no axis of
    the file is the layout's, so only an exact inverse of the slice layout puts labels back where they were."""
    angle = np.deg2rad(20.0)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    permute_flip = np.array([[0, -1, 0], [0, 0, 1], [-1, 0, 0]], dtype=float)  # file i, j, k -> -A, S, -R ...
    affine = np.eye(4)
    affine[:3, :3] = tilt @ permute_flip @ np.diag([0.8, 1.3, 2.5])
    affine[:3, 3] = [12.0, -30.0, 7.5]
    return affine


@pytest.mark.parametrize("slice_axis", ["axial", "coronal", "sagittal"])
def test_labels_map_back_to_the_source_voxel_order(tmp_path: Path, slice_axis: str) -> None:
    rng = np.random.default_rng(3)
    shape = (14, 11, 9)
    affine = oblique_affine()
    values = np.zeros(shape, np.uint8)
    values[2:6, 1:4, 3:8] = 1
    values[9:13, 6:10, 0:2] = 2  # asymmetric blocks: any wrong flip or permutation moves them
    image = write_nifti(tmp_path / "img.nii.gz", rng.normal(size=shape).astype(np.float32), affine)
    label = write_nifti(tmp_path / "lab.nii.gz", values, affine)
    volume = load_pair(SegmentationPair(image, label), in_plane_size=8, slice_axis=slice_axis)
    assert volume.native_label.shape != shape  # the layout is not the file's order here
    source = to_source_order(volume.native_label.numpy(), image, slice_axis)
    np.testing.assert_array_equal(source, values)
    npy = tmp_path / "img.npy"
    np.save(npy, values)  # .npy: H x W x D, slices along the last axis
    np.testing.assert_array_equal(to_source_order(np.moveaxis(values, 2, 0), str(npy), slice_axis), values)


def test_pairs_from_folders_and_manifest(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("a", "b"):
        write_nifti(tmp_path / "images" / f"{name}.nii.gz", np.zeros((4, 4, 3), np.float32))
        write_nifti(tmp_path / "labels" / f"{name}_seg.nii.gz", np.zeros((4, 4, 3), np.uint8))
    pairs = pair_folders(tmp_path / "images", tmp_path / "labels", label_suffix="_seg")
    assert [Path(p.label).name for p in pairs] == ["a_seg.nii.gz", "b_seg.nii.gz"]
    with pytest.raises(DataValidationError, match="no label map"):
        pair_folders(tmp_path / "images", tmp_path / "labels")
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("image,label,modality\nimages/a.nii.gz,labels/a_seg.nii.gz,CT\nimages/b.nii.gz,,MR\n")
    [pair] = read_pairs_manifest(manifest)  # the unlabelled row is not a pair
    assert pair == SegmentationPair(str(tmp_path / "images/a.nii.gz"), str(tmp_path / "labels/a_seg.nii.gz"), "ct")


def test_real_manifest_pairs(brain_data: SegmentationData) -> None:
    pairs = read_pairs_manifest(shared_path("volumes", "pairs.csv"))
    assert len(pairs) == 10  # the unlabelled example_ct is left out
    assert all(Path(p.image).exists() and Path(p.label).exists() for p in pairs)
    # Split by volume: 3 + 1 distinct FLAIR volumes, labels binary.
    train = {v.path for v in brain_data.train_volumes}
    val = {v.path for v in brain_data.val_volumes}
    assert len(train) == 3 and len(val) == 1 and not train & val
    assert brain_data.max_class_index == 1


def test_foreground_oversampling_weights(brain_data: SegmentationData) -> None:
    dataset = SlabDataset(brain_data.train_volumes, slab_slices=1, augment=False)
    assert 0 < int(dataset.has_foreground.sum()) < len(dataset)  # tumour on some slices only
    weights = dataset.sampling_weights(0.5)
    assert weights[dataset.has_foreground].sum() / weights.sum() == pytest.approx(0.5)
    item = dataset[int(torch.nonzero(dataset.has_foreground)[0])]
    assert item["image"].shape == item["label"].shape == (1, 1, 32, 32)
    assert item["label"].max() == 1


# ----------------------------------------------------------------------------------------------------
# Training and whole-volume evaluation on the real data


def test_brain_tumour_trains_and_is_evaluated_on_whole_volumes(brain_data: SegmentationData, tmp_path: Path) -> None:
    seed_everything(0)
    model = SliceSegmenter(num_classes=2, class_names=["tumour"], **TINY)
    before = [p.detach().clone() for p in model.net.encoder.backbone.parameters()]
    fit = trainer(tmp_path, max_steps=3)
    fit.fit(model, datamodule=brain_data)
    metrics = fit.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0.0 <= metrics["val/dice_tumour"] <= 1.0
    assert metrics["val/dice"] == metrics["val/dice_tumour"]
    assert len(saved_figures(tmp_path, "overlay")) == 1  # slices of the validation volume, label and prediction
    assert any(not torch.equal(a, b) for a, b in zip(before, model.net.encoder.backbone.parameters()))
    # Whole-volume prediction on the label's native grid, in the source file's voxel order, reproducing the Dice.
    [outputs] = fit.predict(model, datamodule=brain_data)
    val_volume = brain_data.val_volumes[0]
    assert outputs[0]["path"] == val_volume.path
    labels = torch.as_tensor(outputs[0]["labels"])
    label_file = next(p.label for p in read_pairs_manifest(shared_path("volumes", "pairs.csv")) if p.image == val_volume.path)
    label_array = np.asarray(nib.load(label_file).dataobj)
    assert labels.shape == label_array.shape  # the file's own grid and axis order
    expected = dice_per_class(labels[None, None].long(), torch.from_numpy(label_array > 0)[None, None].long(), 2)
    assert metrics["val/dice"].item() == pytest.approx(expected.item(), abs=1e-6)


def test_ct_organs_2p5d_from_pretrained(
    ct_data: SegmentationData, pretrained_checkpoint: Path, tmp_path: Path
) -> None:
    seed_everything(0)
    model = SliceSegmenter(
        num_classes=4, pretrained=str(pretrained_checkpoint), context_2p5d=True, slab_slices=3,
        class_names=["liver", "spleen", "kidneys"], decoder_channels=[32, 16, 16, 8, 8],
    )
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(model, datamodule=ct_data)
    for name in ("liver", "spleen", "kidneys"):
        assert 0.0 <= fit.callback_metrics[f"val/dice_{name}"] <= 1.0
    # The checkpoint is self-contained: it reloads without the pretraining file and with the same weights.
    path = tmp_path / "seg.ckpt"
    fit.save_checkpoint(path)
    reloaded = SliceSegmenter.load_from_checkpoint(path)
    assert reloaded.hparams.pretrained is None and reloaded.hparams.context_2p5d
    assert reloaded.pretrained_source == str(pretrained_checkpoint)  # the record of where the encoders came from
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


def test_pretrained_weights_are_loaded_tensor_by_tensor(pretrained_checkpoint: Path) -> None:
    weights = load_pretrained(pretrained_checkpoint)
    model = SliceSegmenter(num_classes=2, pretrained=str(pretrained_checkpoint), context_2p5d=True, slab_slices=3)
    encoder_state = model.net.encoder.state_dict()
    assert encoder_state.keys() == weights.encoder.keys()
    for key, value in weights.encoder.items():
        assert torch.equal(encoder_state[key], value), key
    aggregator_state = model.net.aggregator.state_dict()
    assert aggregator_state.keys() == weights.aggregator.keys()
    for key, value in weights.aggregator.items():
        assert torch.equal(aggregator_state[key], value), key
    assert model.net.encoder.backbone_name == "test_resnet"  # the architecture came from the checkpoint


def test_linear_mode_leaves_the_pretrained_parts_untouched(
    ct_data: SegmentationData, pretrained_checkpoint: Path, tmp_path: Path
) -> None:
    model = SliceSegmenter(
        num_classes=4, pretrained=str(pretrained_checkpoint), mode="linear", context_2p5d=True, slab_slices=3,
        decoder_channels=[32, 16, 16, 8, 8],
    )
    frozen_before = {k: v.clone() for k, v in model.net.encoder.state_dict().items()}
    frozen_before.update({f"agg.{k}": v.clone() for k, v in model.net.aggregator.state_dict().items()})
    decoder_before = [p.detach().clone() for p in model.net.decoder.parameters()]
    trainer(tmp_path, max_steps=2, validate=False).fit(model, datamodule=ct_data)
    after = dict(model.net.encoder.state_dict())
    after.update({f"agg.{k}": v for k, v in model.net.aggregator.state_dict().items()})
    for key, value in frozen_before.items():
        assert torch.equal(after[key], value), key  # weights and BatchNorm statistics
    assert any(not torch.equal(a, b) for a, b in zip(decoder_before, model.net.decoder.parameters()))


def test_model_and_data_must_agree(ct_data: SegmentationData, tmp_path: Path) -> None:
    too_few = SliceSegmenter(num_classes=3, slab_slices=3, **TINY)  # the mapping yields class 3
    with pytest.raises(ValueError, match="class index 3 but num_classes is 3"):
        trainer(tmp_path, max_steps=1).fit(too_few, datamodule=ct_data)
    other_slab = SliceSegmenter(num_classes=4, slab_slices=1, **TINY)
    with pytest.raises(ValueError, match="slabs of 3 slices"):
        trainer(tmp_path, max_steps=1).fit(other_slab, datamodule=ct_data)
    with pytest.raises(ValueError, match="slab_slices >= 2"):
        SliceSegmenter(context_2p5d=True, slab_slices=1, **TINY)
