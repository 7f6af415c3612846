"""Downstream tasks on pretrained jointssl encoders: loading and exporting weights, and task modules."""

from jointssl.downstream.classification import ImageClassificationData, ImageClassifier
from jointssl.downstream.detection import NoduleDetector
from jointssl.downstream.detection_data import NoduleDetectionDataModule, write_synthetic_nodule_ct
from jointssl.downstream.detection_metrics import FROC_FP_RATES, detection_metrics
from jointssl.downstream.export import ExportError, export_pretrained
from jointssl.downstream.inflate import InflationError, inflate_to_3d
from jointssl.downstream.pretrained import PretrainedLoadError, PretrainedWeights, load_pretrained
from jointssl.downstream.segmentation import SegmentationData, SliceSegmenter, SliceUNet, dice_per_class
from jointssl.downstream.volume_classification import VolumeClassificationData, VolumeClassifier

__all__ = [
    "FROC_FP_RATES",
    "ExportError",
    "ImageClassificationData",
    "ImageClassifier",
    "InflationError",
    "NoduleDetectionDataModule",
    "NoduleDetector",
    "PretrainedLoadError",
    "PretrainedWeights",
    "SegmentationData",
    "SliceSegmenter",
    "SliceUNet",
    "VolumeClassificationData",
    "VolumeClassifier",
    "detection_metrics",
    "dice_per_class",
    "export_pretrained",
    "inflate_to_3d",
    "load_pretrained",
    "write_synthetic_nodule_ct",
]
