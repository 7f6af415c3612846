"""The classification head on f_intra's image embedding (the network of :class:`ImageClassifier` is f_intra +
this head)."""

from __future__ import annotations

from torch import nn


def classification_head(d_model: int, outputs: int, standardise: bool) -> nn.Module:
    """A linear map of the ``d_model`` features to ``outputs`` logits; with ``standardise`` the features are first
    standardised by a BatchNorm without affine parameters (as in MAE's linear probe): one learning rate then suits
    frozen encoders whose feature scales differ, and the head stays an affine map of the features."""
    linear = nn.Linear(d_model, outputs)
    return nn.Sequential(nn.BatchNorm1d(d_model, affine=False), linear) if standardise else linear
