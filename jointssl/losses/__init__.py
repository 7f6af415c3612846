"""Losses of jointssl: Sinkhorn-Knopp, SwAV, distributed spherical k-means, DeepCluster-v2, masked slice-embedding
prediction (the objectives that use them, with their heads and state: jointssl.objectives)."""

from jointssl.losses.deepcluster import DeepClusterMemory, DeepClusterV2Loss
from jointssl.losses.kmeans import KMeansResult, spherical_kmeans
from jointssl.losses.masked import (
    interpolate_masked_slices,
    keyed_uniform,
    masked_embedding_loss,
    random_slice_mask,
    visible_slices,
)
from jointssl.losses.sinkhorn import sinkhorn_knopp
from jointssl.losses.swav import SwAVLoss, SwAVOutput

__all__ = [
    "DeepClusterMemory",
    "DeepClusterV2Loss",
    "KMeansResult",
    "SwAVLoss",
    "SwAVOutput",
    "interpolate_masked_slices",
    "keyed_uniform",
    "masked_embedding_loss",
    "random_slice_mask",
    "sinkhorn_knopp",
    "spherical_kmeans",
    "visible_slices",
]
