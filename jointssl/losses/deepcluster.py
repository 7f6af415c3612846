"""DeepCluster-v2: a memory bank of recent embeddings, k-means pseudo-labels, and the cross-entropy loss.

Reference: facebookresearch/swav main_deepclusterv2.py (init_memory / cluster_memory). Each rank keeps the
embeddings of the samples it saw last; at an epoch start the banks of all ranks are clustered together (one
k-means per head), every sample in any bank gets the label of its cluster, and the centroids become the
(frozen) prototypes against which the next epoch's scores are computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jointssl.distributed import all_gather_cat
from jointssl.losses.kmeans import spherical_kmeans

UNKNOWN_LABEL = -1


class DeepClusterV2Loss(nn.Module):
    """Cross-entropy of prototype scores / temperature against k-means pseudo-labels, averaged over heads and
    crops. Rows labelled -1 (sample not clustered yet) are ignored."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, scores: Sequence[Sequence[Tensor]], targets: Tensor) -> Tensor:
        """Args:
            scores: scores[h][c] is [B, K_h], the scores of crop c against the prototypes of head h.
            targets: [num_heads, B] long pseudo-labels (-1 = unknown).

        Returns:
            scalar float32 loss; 0 (still connected to `scores`) when every target is unknown.
        """
        if len(scores) != targets.shape[0]:
            raise ValueError(f"{len(scores)} heads of scores but {targets.shape[0]} rows of targets")
        head_losses, head_has_labels = [], []
        with torch.autocast(device_type=scores[0][0].device.type, enabled=False):
            for head_scores, head_targets in zip(scores, targets):
                logits = torch.cat([crop.float() for crop in head_scores]) / self.temperature
                # Every crop of a sample shares its label.
                crop_targets = head_targets.to(logits.device).repeat(len(head_scores))
                # A summed loss over the labelled rows divided by their count: equal to the mean cross-entropy,
                # but 0 (not NaN) when no row is labelled, and without a host sync to find that out.
                total = F.cross_entropy(logits, crop_targets, ignore_index=UNKNOWN_LABEL, reduction="sum")
                labelled = (crop_targets != UNKNOWN_LABEL).sum()
                head_losses.append(total / labelled.clamp_min(1))
                head_has_labels.append(labelled > 0)
            heads_with_labels = torch.stack(head_has_labels).sum().clamp_min(1)
            return torch.stack(head_losses).sum() / heads_with_labels


class DeepClusterMemory(nn.Module):
    """Per-rank memory bank of embeddings, and the pseudo-labels of the whole dataset.

    Buffers (saved in checkpoints): `embeddings` [num_crops, bank_size, D], `indices` [bank_size] (global
    sample index of each bank row, -1 = empty), `write_position` (next row to write), and `labels`
    [num_heads, dataset_size] (-1 = unknown).
    """

    embeddings: Tensor
    indices: Tensor
    write_position: Tensor
    labels: Tensor

    def __init__(
        self,
        bank_size: int,
        embedding_dim: int,
        num_crops: int = 2,
        *,
        dataset_size: int,
        num_prototypes: Sequence[int] = (3000, 3000, 3000),
        kmeans_iterations: int = 10,
    ) -> None:
        super().__init__()
        if bank_size < 1 or embedding_dim < 1 or num_crops < 1 or dataset_size < 1:
            raise ValueError("bank_size, embedding_dim, num_crops and dataset_size must all be >= 1")
        if not num_prototypes:
            raise ValueError("num_prototypes must list at least one head")
        self.bank_size = bank_size
        self.embedding_dim = embedding_dim
        self.num_crops = num_crops
        self.dataset_size = dataset_size
        self.num_prototypes = tuple(int(k) for k in num_prototypes)
        self.kmeans_iterations = kmeans_iterations
        self.register_buffer("embeddings", torch.zeros(num_crops, bank_size, embedding_dim))
        self.register_buffer("indices", torch.full((bank_size,), -1, dtype=torch.long))
        self.register_buffer("write_position", torch.zeros((), dtype=torch.long))
        self.register_buffer("labels", torch.full((len(self.num_prototypes), dataset_size), -1, dtype=torch.long))

    @property
    def num_heads(self) -> int:
        return len(self.num_prototypes)

    @torch.no_grad()
    def update(self, indices: Tensor, embeddings: Sequence[Tensor]) -> None:
        """Write a batch at the write position, wrapping around (the bank keeps the latest samples).

        Args:
            indices: [B] global dataset indices of the batch.
            embeddings: one [B, D] embedding per crop (detached and stored in float32).
        """
        if len(embeddings) != self.num_crops:
            raise ValueError(f"expected {self.num_crops} crops of embeddings, got {len(embeddings)}")
        batch_size = indices.shape[0]
        for crop in embeddings:
            if tuple(crop.shape) != (batch_size, self.embedding_dim):
                raise ValueError(
                    f"each crop must be [{batch_size}, {self.embedding_dim}], got shape {tuple(crop.shape)}"
                )
        # A batch larger than the bank: only its last bank_size rows would survive the wrap-around.
        keep = min(batch_size, self.bank_size)
        new_indices = indices[batch_size - keep :]
        new_embeddings = torch.stack([crop.detach()[batch_size - keep :] for crop in embeddings])
        # Non-finite rows (a step the trainer will skip) are stored as zeros: k-means must stay finite.
        new_embeddings = new_embeddings.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        rows = (self.write_position + torch.arange(keep, device=self.indices.device)) % self.bank_size
        self.indices[rows] = new_indices.to(self.indices.device, torch.long)
        self.embeddings[:, rows] = new_embeddings.to(self.embeddings.device, self.embeddings.dtype)
        self.write_position.add_(keep).remainder_(self.bank_size)

    @torch.no_grad()
    def cluster(self, seed: int) -> list[Tensor]:
        """Cluster the banks of all ranks (one k-means per head) and relabel the dataset.

        Head h clusters crop h % num_crops. Every sample in some rank's bank gets its cluster as label; all
        other samples become -1. All ranks must call this together.

        Returns:
            per head, the [K_h, D] L2-normalised centroids (identical on every rank).
        """
        filled = self.indices >= 0
        bank_indices = self.indices[filled]
        all_indices = all_gather_cat(bank_indices)
        if all_indices.numel() and (int(all_indices.min()) < 0 or int(all_indices.max()) >= self.dataset_size):
            raise ValueError(f"memory bank holds sample indices outside [0, {self.dataset_size})")
        # A sample can sit in two banks (a distributed sampler pads its shards with repeats): its label comes
        # from its first occurrence in rank order, deterministically.
        unique_indices, first_occurrence = _first_occurrences(all_indices)

        self.labels.fill_(-1)
        all_centroids = []
        for head, num_clusters in enumerate(self.num_prototypes):
            bank = self.embeddings[head % self.num_crops][filled]
            # Distinct seeds per head and per call, so the heads start from different rows.
            # Keyed by sample index: the clusters do not depend on how samples are spread over ranks and banks.
            result = spherical_kmeans(
                bank, num_clusters, iterations=self.kmeans_iterations, seed=seed * self.num_heads + head,
                keys=bank_indices,
            )
            all_assignments = all_gather_cat(result.assignments)
            self.labels[head, unique_indices] = all_assignments[first_occurrence]
            all_centroids.append(result.centroids)
        return all_centroids

    def targets(self, indices: Tensor) -> Tensor:
        """[num_heads, B] pseudo-labels of the given global sample indices (-1 = unknown)."""
        return self.labels[:, indices.to(self.labels.device)]


def _first_occurrences(values: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct values and the position of each one's first occurrence in `values`."""
    unique, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(values.shape[0], device=values.device)
    first = torch.full_like(unique, values.shape[0]).scatter_reduce_(0, inverse, positions, "amin")
    return unique, first
