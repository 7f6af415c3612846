"""Lung nodule detection: network (inflated ResNet + FPN), module (:class:`NoduleDetector`, MONAI RetinaNet), data
(:class:`NoduleDetectionDataModule`: LUNA16 annotations + CT volumes, synthetic CTs) and metrics (FROC, COCO)."""

from jointssl.downstream.detection.data import NoduleDetectionDataModule, write_synthetic_nodule_ct
from jointssl.downstream.detection.metrics import FROC_FP_RATES, evaluate_detections
from jointssl.downstream.detection.module import NoduleDetector

__all__ = ["FROC_FP_RATES", "NoduleDetectionDataModule", "NoduleDetector", "evaluate_detections",
           "write_synthetic_nodule_ct"]
