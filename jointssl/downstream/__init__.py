"""Downstream tasks on pretrained jointssl encoders: loading and exporting weights, the task base
(:class:`DownstreamTask`) and one package per task (network, module, data, metrics)."""

from jointssl.downstream.base import DownstreamTask
from jointssl.downstream.classification import ImageClassificationData, ImageClassifier
from jointssl.downstream.detection import (
    FROC_FP_RATES,
    NoduleDetectionDataModule,
    NoduleDetector,
    evaluate_detections,
    write_synthetic_nodule_ct,
)
from jointssl.downstream.export import ExportError, export_pretrained
from jointssl.downstream.inflate import InflationError, inflate_to_3d
from jointssl.downstream.pretrained import PretrainedLoadError, PretrainedWeights, load_pretrained
from jointssl.downstream.segmentation import SegmentationData, SliceSegmenter, SliceUNet, dice_per_class
from jointssl.downstream.volume_classification import VolumeClassificationData, VolumeClassifier

__all__ = [
    "FROC_FP_RATES",
    "DownstreamTask",
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
    "evaluate_detections",
    "dice_per_class",
    "export_pretrained",
    "inflate_to_3d",
    "load_pretrained",
    "write_synthetic_nodule_ct",
]
