"""2D image classification on f_intra: network (the head), module (:class:`ImageClassifier`), data
(:class:`ImageClassificationData`) and metrics."""

from jointssl.downstream.classification.data import ImageClassificationData
from jointssl.downstream.classification.metrics import classification_metrics
from jointssl.downstream.classification.module import ImageClassifier

__all__ = ["ImageClassificationData", "ImageClassifier", "classification_metrics"]
