"""Downstream tasks on pretrained jointssl encoders: loading and exporting weights, and task modules."""

from jointssl.downstream.classification import ImageClassificationData, ImageClassifier
from jointssl.downstream.export import ExportError, export_pretrained
from jointssl.downstream.pretrained import PretrainedLoadError, PretrainedWeights, load_pretrained

__all__ = [
    "ExportError",
    "ImageClassificationData",
    "ImageClassifier",
    "PretrainedLoadError",
    "PretrainedWeights",
    "export_pretrained",
    "load_pretrained",
]
