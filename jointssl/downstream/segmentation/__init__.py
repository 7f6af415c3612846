"""3D segmentation with the pretrained slice encoder: network (:class:`SliceUNet`), metric (Dice per class),
module (:class:`SliceSegmenter`) and data (:class:`SegmentationData`: image/label pairs, slabs, whole volumes)."""

from jointssl.downstream.segmentation.data import (
    SegmentationData,
    SegmentationPair,
    SlabDataset,
    load_pair,
    pair_folders,
    read_pairs_manifest,
    to_source_order,
)
from jointssl.downstream.segmentation.metrics import dice_per_class
from jointssl.downstream.segmentation.module import SliceSegmenter
from jointssl.downstream.segmentation.network import SliceUNet

__all__ = [
    "SegmentationData",
    "SegmentationPair",
    "SlabDataset",
    "SliceSegmenter",
    "SliceUNet",
    "dice_per_class",
    "load_pair",
    "pair_folders",
    "read_pairs_manifest",
    "to_source_order",
]
