"""Network parts: f_intra (slice encoder), heads (projection, prototypes)."""

from jointssl.models.heads import ProjectionHead, Prototypes
from jointssl.models.slice_encoder import SliceEncoder

__all__ = ["ProjectionHead", "Prototypes", "SliceEncoder"]
