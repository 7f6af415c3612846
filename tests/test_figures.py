"""jointssl.callbacks.figures: each picture renders to a PNG of the expected size with something drawn on it, a
perfect classifier's ROC says AUC 1, the FROC title carries the CPM, and save_figure puts the PNG beside the
checkpoints without W&B and hands it to the W&B logger when one is attached."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from jointssl.callbacks.figures import DPI, froc_figure, overlay_figure, roc_figure, save_figure
from jointssl.downstream.detection.metrics import FROC_FP_RATES, FROCCurve


def png_of(figure, path: Path) -> np.ndarray:
    figure.savefig(path, format="png", dpi=DPI)
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 1.0  # not a blank canvas
    return pixels


def legend_texts(figure) -> list[str]:
    [axes] = figure.axes
    return [text.get_text() for text in axes.get_legend().get_texts()]


def test_roc_of_a_perfect_binary_classifier_has_auc_one(tmp_path: Path) -> None:
    targets = np.array([0, 1, 0, 1, 1, 0])
    positive = np.array([0.1, 0.9, 0.3, 0.8, 0.7, 0.2])
    figure = roc_figure(np.stack([1 - positive, positive], axis=1), targets, ["normal", "pneumonia"])
    assert legend_texts(figure) == ["chance", "pneumonia (AUC 1.000)"]  # binary: the positive class's curve
    assert png_of(figure, tmp_path / "roc.png").shape == (5 * DPI, 5 * DPI)


def test_roc_draws_one_curve_per_class_for_multiclass_and_multilabel() -> None:
    rng = np.random.default_rng(0)
    targets = np.repeat([0, 1, 2], 10)
    probabilities = rng.dirichlet(np.ones(3), size=30)
    names = legend_texts(roc_figure(probabilities, targets, ["a", "b", "c"]))
    assert [n.split(" (")[0] for n in names] == ["chance", "a", "b", "c"]
    assert all(0.0 <= float(n.split("AUC ")[1].rstrip(")")) <= 1.0 for n in names[1:])
    multi_hot = (rng.random((30, 3)) > 0.5).astype(int)
    perfect = multi_hot * 0.8 + 0.1
    assert legend_texts(roc_figure(perfect, multi_hot, ["x", "y", "z"]))[1:] == [f"{c} (AUC 1.000)" for c in "xyz"]
    with pytest.raises(ValueError, match="2 class names for 3"):
        roc_figure(probabilities, targets, ["a", "b"])


def test_froc_has_the_cpm_in_its_title_and_a_log2_axis(tmp_path: Path) -> None:
    fps = np.array([0.0, 0.1, 0.3, 1.0, 3.0, 9.0])
    sensitivity = np.array([0.0, 0.5, 0.6, 0.7, 0.8, 0.9])
    at_rates = [0.5, 0.55, 0.63, 0.7, 0.75, 0.8, 0.81]
    figure = froc_figure(FROCCurve(fps, sensitivity, FROC_FP_RATES, np.array(at_rates)))
    [axes] = figure.axes
    assert axes.get_title() == f"FROC (CPM {np.mean(at_rates):.3f})"
    assert axes.get_xscale() == "log"
    assert [t.get_text() for t in axes.get_xticklabels()] == ["1/8", "1/4", "1/2", "1", "2", "4", "8"]
    assert png_of(figure, tmp_path / "froc.png").shape == (450, 600)
    # A curve of points alone: the sensitivities at the rates are read from it, as the detection metrics read them.
    from jointssl.downstream.detection.metrics import sensitivity_at

    expected = np.mean([sensitivity_at(r, fps, sensitivity) for r in (0.125, 0.25, 0.5, 1, 2, 4, 8)])
    assert froc_figure(FROCCurve.from_points(fps, sensitivity)).axes[0].get_title() == f"FROC (CPM {expected:.3f})"


def test_overlay_shows_each_slice_with_its_dice(tmp_path: Path) -> None:
    yy, xx = np.mgrid[:40, :40]
    label = np.stack([(yy - 20) ** 2 + (xx - 20) ** 2 < r * r for r in (6, 9)]).astype(np.int64)
    prediction = label.copy()
    prediction[1] = 0  # second slice missed entirely
    image = np.random.default_rng(0).random((2, 40, 40))
    figure = overlay_figure(image, label, prediction, titles=["slice 3", "slice 7"])
    assert [a.get_title() for a in figure.axes] == ["slice 3: Dice 1.000", "slice 7: Dice 0.000"]
    overall = 2 * label[0].sum() / (label.sum() + prediction.sum())
    assert f"1: {overall:.3f}" in figure.texts[0].get_text()  # the figure title: Dice over the shown slices
    assert png_of(figure, tmp_path / "overlay.png").shape == (340, 600)
    with pytest.raises(ValueError, match="alike"):
        overlay_figure(image, label[:1], prediction)
    # A class predicted everywhere (an untrained network) is still outlined: at the border of the slice.
    everywhere = overlay_figure(image, label, np.ones_like(label))
    assert all(axes.collections for axes in everywhere.axes)
    assert not overlay_figure(image, label, np.zeros_like(label)).axes[0].collections  # nothing predicted


def fake_trainer(root: Path, **overrides) -> SimpleNamespace:
    values = {"is_global_zero": True, "loggers": [], "checkpoint_callback": None, "default_root_dir": str(root),
              "current_epoch": 4, "global_step": 40}
    values.update(overrides)
    return SimpleNamespace(**values)


def test_save_figure_writes_a_png_beside_the_checkpoints(tmp_path: Path) -> None:
    figure = froc_figure(FROCCurve.from_points([0.0, 1.0], [0.0, 1.0]))
    path = save_figure(fake_trainer(tmp_path), "froc", figure)
    assert path == tmp_path / "checkpoints" / "figures" / "froc_epoch004.png"
    with Image.open(path) as image:
        assert image.size == (600, 450)
    assert not figure.axes  # cleared once saved
    assert [p.name for p in path.parent.iterdir()] == ["froc_epoch004.png"]  # no temporary left

    checkpoints = SimpleNamespace(dirpath=str(tmp_path / "elsewhere"))
    curve = FROCCurve.from_points([0, 1], [0, 1])
    path = save_figure(fake_trainer(tmp_path, checkpoint_callback=checkpoints), "froc", froc_figure(curve))
    assert path == tmp_path / "elsewhere" / "figures" / "froc_epoch004.png" and path.is_file()
    assert save_figure(fake_trainer(tmp_path / "r1", is_global_zero=False), "froc", froc_figure(curve)) is None
    assert not (tmp_path / "r1").exists()  # only rank 0 writes


def test_save_figure_logs_to_wandb_when_a_wandb_logger_is_attached(tmp_path: Path, monkeypatch) -> None:
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), mode="disabled")
    logged = []
    original = logger.log_image

    def record(key, images, step=None, **kwargs):
        logged.append((key, [np.asarray(i).shape for i in images], step))
        return original(key=key, images=images, step=step, **kwargs)

    monkeypatch.setattr(logger, "log_image", record)
    try:
        assert save_figure(fake_trainer(tmp_path, loggers=[logger]), "roc", roc_figure(
            np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]), ["a", "b"])) is None
    finally:
        # An unfinished run stays wandb.run for the whole process, and Lightning's WandbLogger adopts a run in
        # progress instead of starting its own: every later W&B test in this process would log into this one.
        logger.experiment.finish()
    assert logged == [("figures/roc", [(5 * DPI, 5 * DPI, 3)], 40)]
    assert not (tmp_path / "checkpoints").exists()  # W&B instead of the PNG
