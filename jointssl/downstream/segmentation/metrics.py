"""The segmentation metric: 3D Dice per foreground class of whole volumes (MONAI ``DiceMetric``)."""

from __future__ import annotations

from monai.metrics import DiceMetric
from torch import Tensor


def dice_per_class(prediction: Tensor, label: Tensor, num_classes: int, ignore_empty: bool = True) -> Tensor:
    """3D Dice of every foreground class (MONAI ``DiceMetric``) for a batch of class-index volumes.

    Args:
        prediction, label: integer class indices ``[B, 1, D, H, W]`` (or ``[B, 1, H, W]``).
        num_classes: classes including background (class 0, not scored).
        ignore_empty: a class absent from a volume's label gives NaN (left out of means); False gives 1 when the
            prediction lacks it too and 0 when the prediction has it.

    Returns:
        ``[B, num_classes - 1]`` Dice values, class 1 first.
    """
    metric = DiceMetric(
        include_background=False, reduction="none", num_classes=num_classes, ignore_empty=ignore_empty
    )
    return metric(prediction, label)

