"""Heads for contrastive clustering: the projection MLP and the prototype layer(s).

(The masked-embedding decoder of L_mask lives in its own module.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """SwAV / DeepCluster-v2 projection: Linear -> BatchNorm1d -> ReLU -> Linear, output L2-normalised.

    ``hidden_dim=0`` gives a single Linear layer (still L2-normalised).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        if hidden_dim < 0:
            raise ValueError(f"hidden_dim must be >= 0, got {hidden_dim}")
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.out_dim = out_dim
        if hidden_dim == 0:
            self.mlp: nn.Module = nn.Linear(in_dim, out_dim)
        else:
            self.mlp = nn.Sequential(
                nn.Linear(in_dim, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, out_dim),
            )

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_dim] -> [B, out_dim]`` with unit-norm rows."""
        z = self.mlp(x)
        # Normalise in float32: the clustering losses compare these against unit prototypes at temperature 0.1.
        return F.normalize(z.float(), dim=1).to(z.dtype)


class Prototypes(nn.Module):
    """One or several prototype sets, each a bias-free Linear ``dim -> K_h`` whose rows are the prototypes.

    SwAV uses one set (e.g. 3000); DeepCluster-v2 uses several heads (e.g. 3 x 3000) whose weights are overwritten
    by k-means centroids at every epoch start (:meth:`set_weights`).
    """

    def __init__(self, dim: int, num_prototypes: int | list[int]) -> None:
        super().__init__()
        sizes = [num_prototypes] if isinstance(num_prototypes, int) else list(num_prototypes)
        if not sizes or any(k <= 0 for k in sizes):
            raise ValueError(
                f"num_prototypes must be a positive int or a non-empty list of them, got {num_prototypes}"
            )
        self.dim = dim
        self.num_prototypes: list[int] = sizes
        self.heads = nn.ModuleList(nn.Linear(dim, k, bias=False) for k in sizes)

    def forward(self, z: Tensor) -> list[Tensor]:
        """Scores of ``z [B, dim]`` against every head: a list (one entry per head) of ``[B, K_h]``."""
        return [head(z) for head in self.heads]

    @torch.no_grad()
    def normalize_(self) -> None:
        """L2-normalise every prototype (weight row) in place, so scores are cosine similarities."""
        for head in self.heads:
            head.weight.copy_(F.normalize(head.weight, dim=1))

    @torch.no_grad()
    def set_weights(self, head: int, centroids: Tensor) -> None:
        """Copy ``centroids [K_h, dim]`` into the prototypes of ``head`` (device and dtype follow the layer)."""
        weight = self.heads[head].weight
        if tuple(centroids.shape) != tuple(weight.shape):
            raise ValueError(
                f"centroids for head {head} must have shape {tuple(weight.shape)}, got {tuple(centroids.shape)}"
            )
        weight.copy_(centroids.detach())

    def freeze(self, flag: bool = True) -> None:
        """Stop (``flag=True``) or resume (``False``) gradient flow into the prototypes via ``requires_grad``.

        Under DDP, toggling ``requires_grad`` after the model is wrapped desynchronises the gradient reducer
        unless ``find_unused_parameters=True``; there, keep ``requires_grad`` on and call :meth:`drop_grads`
        after backward instead (the SwAV recipe for its first iterations).
        """
        for parameter in self.parameters():
            parameter.requires_grad_(not flag)

    def drop_grads(self) -> None:
        """Set the prototypes' gradients to None so the optimizer step leaves them unchanged."""
        for parameter in self.parameters():
            parameter.grad = None
