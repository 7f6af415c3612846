"""Network parts: f_intra (slice encoder), f_inter (deformable slice aggregator), the volume encoder composing
them, heads."""

from jointssl.models.aggregator import MaskDecoder, SliceAggregator
from jointssl.models.deformable import DeformableSliceAttention
from jointssl.models.heads import ProjectionHead, Prototypes
from jointssl.models.slice_encoder import SliceEncoder
from jointssl.models.volume_encoder import AggregatorConfig, VolumeEncoder

__all__ = [
    "AggregatorConfig",
    "DeformableSliceAttention",
    "MaskDecoder",
    "ProjectionHead",
    "Prototypes",
    "SliceAggregator",
    "SliceEncoder",
    "VolumeEncoder",
]
