"""Network parts: f_intra (slice encoder), f_inter (deformable slice aggregator), heads."""

from jointssl.models.aggregator import MaskDecoder, SliceAggregator
from jointssl.models.deformable import DeformableSliceAttention
from jointssl.models.heads import ProjectionHead, Prototypes
from jointssl.models.slice_encoder import SliceEncoder

__all__ = [
    "DeformableSliceAttention",
    "MaskDecoder",
    "ProjectionHead",
    "Prototypes",
    "SliceAggregator",
    "SliceEncoder",
]
