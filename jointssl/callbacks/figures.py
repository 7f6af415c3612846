"""Pictures of validation results: ROC curves (classification), FROC curves (detection) and segmentation overlays.

The ``*_figure`` functions are pure: arrays (a ``FROCCurve`` for FROC) in, a matplotlib ``Figure`` out. They build ``Figure`` objects directly
(never through ``pyplot``), so no GUI backend is selected, no global figure registry fills up over a long run, and
rendering goes through Agg. :func:`save_figure` puts a figure where the run's user finds it: a W&B image when a
``WandbLogger`` is attached, otherwise a PNG beside the checkpoints
(``<checkpoint dirpath>/figures/<name>_epoch<NNN>.png``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from jointssl.downstream.detection.metrics import FROCCurve

log = logging.getLogger(__name__)

#: Pixels per inch of every saved or logged figure (the figure sizes below are in inches).
DPI = 100


def roc_figure(probabilities: np.ndarray, targets: np.ndarray, class_names: Sequence[str]) -> Figure:
    """ROC curves with the AUC of each in the legend and the chance diagonal (points and AUC: torchmetrics).

    Args:
        probabilities: ``[M, C]`` class probabilities (binary: both columns, C = 2).
        targets: ``[M]`` class indices (binary or multiclass: one-vs-rest curve per class; binary draws the positive
            class only, its negative mirror adds nothing) or ``[M, C]`` multi-hot (multilabel: one curve per label).
        class_names: ``C`` names for the legend.
    """
    from torchmetrics.functional.classification import (
        binary_auroc,
        binary_roc,
        multiclass_auroc,
        multiclass_roc,
        multilabel_auroc,
        multilabel_roc,
    )

    scores = torch.as_tensor(np.asarray(probabilities), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(targets)).long()
    num_classes = scores.shape[1]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} probability columns")
    if labels.ndim == 2:
        fpr, tpr, _ = multilabel_roc(scores, labels, num_labels=num_classes)
        aucs = multilabel_auroc(scores, labels, num_labels=num_classes, average=None)
        curves = list(zip(class_names, fpr, tpr, aucs))
    elif num_classes == 2:
        fpr, tpr, _ = binary_roc(scores[:, 1], labels)
        curves = [(class_names[1], fpr, tpr, binary_auroc(scores[:, 1], labels))]
    else:
        fpr, tpr, _ = multiclass_roc(scores, labels, num_classes=num_classes)
        aucs = multiclass_auroc(scores, labels, num_classes=num_classes, average=None)
        curves = list(zip(class_names, fpr, tpr, aucs))
    figure = Figure(figsize=(5, 5), dpi=DPI)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for name, false_positive, true_positive, auc in curves:
        axes.plot(false_positive.numpy(), true_positive.numpy(), linewidth=2, label=f"{name} (AUC {float(auc):.3f})")
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate",
             title=f"ROC ({len(labels)} validation samples)")
    axes.set_aspect("equal")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return figure


def froc_figure(curve: FROCCurve) -> Figure:
    """The FROC curve: sensitivity against false positives per scan on a log2 axis over the curve's rates (1/8 to 8
    for LUNA16), the sensitivities at those rates marked and the curve's CPM (the LUNA16 score) in the title, all
    as the detection metrics computed them (``jointssl.downstream.detection.metrics.FROCCurve``)."""
    fps, sensitivity = np.asarray(curve.fps_per_scan, np.float64), np.asarray(curve.sensitivity, np.float64)
    rates, at_rates = np.asarray(curve.fp_rates, np.float64), np.asarray(curve.sensitivity_at_rates, np.float64)
    figure = Figure(figsize=(6, 4.5), dpi=DPI)
    axes = figure.add_subplot()
    # The curve stays at its last sensitivity beyond its last operating point (as sensitivity_at reads it).
    low, high = rates.min() / 2, rates.max() * 2
    shown = fps > 0
    x = np.concatenate([[low], fps[shown], [max(high, fps.max())]])
    y = np.concatenate([[sensitivity[~shown].max() if (~shown).any() else 0.0], sensitivity[shown],
                        [sensitivity[-1]]])
    axes.plot(x, y, linewidth=2, label="FROC")
    axes.plot(rates, at_rates, "o", color="tab:red", label="at the CPM rates")
    for rate, value in zip(rates, at_rates):
        axes.annotate(f"{value:.2f}", (rate, value), textcoords="offset points", xytext=(0, 6), ha="center",
                      fontsize="x-small")
    axes.set_xscale("log", base=2)
    axes.set_xticks(rates, [f"{r:g}" if r >= 1 else f"1/{round(1 / r)}" for r in rates])
    axes.set(xlim=(low, high), ylim=(0, 1.05), xlabel="false positives per scan", ylabel="sensitivity",
             title=f"FROC (CPM {curve.cpm:.3f})")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return figure


def overlay_figure(
    image_slices: np.ndarray,
    label_slices: np.ndarray,
    predicted_slices: np.ndarray,
    titles: Sequence[str] | None = None,
) -> Figure:
    """A few slices side by side: the image in grey, the ground truth filled (translucent) and the prediction
    outlined, one colour per foreground class; each slice's foreground Dice in its title and the Dice of every
    class over the shown slices (MONAI ``DiceMetric``, ``dice_per_class``) in the figure title.

    Args:
        image_slices: ``[K, H, W]`` intensities (any range; each slice is shown min-max scaled).
        label_slices, predicted_slices: ``[K, H, W]`` class indices on the same grid (0 = background).
        titles: ``K`` captions (e.g. the slice indices); "slice <k>" when not given.
    """
    from jointssl.downstream.segmentation.metrics import dice_per_class

    image = np.asarray(image_slices, dtype=np.float32)
    label = np.asarray(label_slices).astype(np.int64)
    prediction = np.asarray(predicted_slices).astype(np.int64)
    if not image.shape == label.shape == prediction.shape or image.ndim != 3:
        raise ValueError(f"image, label and prediction slices must be [K, H, W] alike, got {image.shape}, "
                         f"{label.shape}, {prediction.shape}")
    count = len(image)
    titles = list(titles) if titles is not None else [f"slice {k}" for k in range(count)]
    num_classes = int(max(label.max(initial=0), prediction.max(initial=0))) + 1
    colours = [f"C{c % 10}" for c in range(num_classes)]
    figure = Figure(figsize=(3 * count, 3.4), dpi=DPI)
    for k in range(count):
        axes = figure.add_subplot(1, count, k + 1)
        axes.imshow(image[k], cmap="gray", interpolation="nearest")
        truth = np.zeros((*label[k].shape, 4))
        for c in range(1, num_classes):
            truth[label[k] == c] = to_rgba(colours[c], alpha=0.4)
            if (prediction[k] == c).any():
                # Padded with background, so that a class predicted up to the border (or everywhere) is outlined.
                padded = np.pad(prediction[k] == c, 1).astype(np.float32)
                rows, columns = np.arange(-1, padded.shape[0] - 1), np.arange(-1, padded.shape[1] - 1)
                axes.contour(columns, rows, padded, levels=[0.5], colors=colours[c], linewidths=1.2)
        axes.imshow(truth, interpolation="nearest")
        dice = foreground_dice(prediction[k] > 0, label[k] > 0)
        axes.set_title(f"{titles[k]}: Dice {dice}", fontsize="small")
        axes.set_axis_off()
    scores = dice_per_class(torch.as_tensor(prediction)[None, None], torch.as_tensor(label)[None, None],
                            max(num_classes, 2))[0]
    per_class = ", ".join(f"{c}: {float(d):.3f}" for c, d in enumerate(scores.tolist(), start=1) if not np.isnan(d))
    figure.suptitle(f"truth filled, prediction outlined; Dice over these slices {per_class or 'n/a (no label)'}",
                    fontsize="small")
    figure.tight_layout()
    return figure


def foreground_dice(prediction: np.ndarray, label: np.ndarray) -> str:
    """Dice of two boolean masks as text, "n/a" where the label has no foreground (Dice undefined)."""
    if not label.any():
        return "n/a"
    return f"{2 * np.logical_and(prediction, label).sum() / (prediction.sum() + label.sum()):.3f}"


def figure_pixels(figure: Figure) -> np.ndarray:
    """The figure rendered by Agg at :data:`DPI`: ``[H, W, 3]`` uint8 RGB."""
    figure.set_dpi(DPI)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def figure_folder(trainer) -> Path:
    """Where PNG figures go: ``figures/`` in the checkpoint callback's folder, or in
    ``<default_root_dir>/checkpoints`` when the run has no checkpoint callback (or it has no folder yet)."""
    callback = getattr(trainer, "checkpoint_callback", None)
    dirpath = getattr(callback, "dirpath", None)
    return Path(dirpath if dirpath else Path(trainer.default_root_dir) / "checkpoints") / "figures"


def save_figure(trainer, name: str, figure: Figure) -> Path | None:
    """Log ``figure`` to W&B (key ``figures/<name>`` at the global step) when a ``WandbLogger`` is attached,
    otherwise save it as ``<figure_folder>/<name>_epoch<NNN>.png`` (written atomically). Only global rank 0 acts;
    the figure is cleared afterwards either way (its drawing is not kept alive by a long run).

    Returns the PNG's path when one was written.
    """
    from lightning.pytorch.loggers import WandbLogger

    from jointssl.checkpointing import write_atomic

    try:
        if not trainer.is_global_zero:
            return None
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if wandb_loggers:
            pixels = figure_pixels(figure)
            for logger in wandb_loggers:
                logger.log_image(key=f"figures/{name}", images=[pixels], step=trainer.global_step)
            return None
        path = figure_folder(trainer) / f"{name}_epoch{trainer.current_epoch:03d}.png"
        FigureCanvasAgg(figure)
        try:
            write_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=DPI))
        except OSError as error:
            raise OSError(f"cannot write the {name} figure to {path}: {error}") from error
        log.info("%s figure saved to %s", name, path)
        return path
    finally:
        figure.clear()
