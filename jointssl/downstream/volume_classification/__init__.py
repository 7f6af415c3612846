"""Volume classification with f_intra + f_inter: network (VolumeEncoder + head), module (:class:`VolumeClassifier`)
and data (:class:`VolumeClassificationData`: whole volumes or LUNA16-style candidate slabs)."""

from jointssl.downstream.volume_classification.data import (
    VolumeClassificationData,
    read_candidates,
    read_volume_labels,
)
from jointssl.downstream.volume_classification.module import VolumeClassifier

__all__ = ["VolumeClassificationData", "VolumeClassifier", "read_candidates", "read_volume_labels"]
