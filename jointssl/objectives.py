"""Clustering objectives: one contrastive-clustering task with its projection head, prototypes and state.

JointSSL has two, the 2D task (L_intra, on image crops and volume slices) and the 3D task (L_inter, on volume
features), each a :class:`SwAVObjective` or a :class:`DeepClusterObjective` behind one interface
(:class:`ClusteringObjective`). The losses they compute are jointssl.losses' (SwAVLoss, DeepClusterV2Loss); the
state that outlives a step (SwAV's queues, DeepCluster-v2's memory bank) is the objective's.

Two kinds of input:
- :meth:`ClusteringObjective.multicrop_loss`: samples with a fixed global index (2D images, volumes) and two or more
  views. DeepCluster-v2 takes its pseudo-labels from the memory bank (k-means of the previous epoch) by index.
- :meth:`ClusteringObjective.pair_loss`: two views of samples without a stable identity (slice i of two views of
  a random slab). SwAV uses its own queue; DeepCluster-v2 labels each view with the nearest current centroid of the
  *other* view (swapped, no memory-bank row: a slab's slices are not fixed samples).
"""

from __future__ import annotations

import abc
import logging
import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from jointssl.losses.deepcluster import DeepClusterMemory, DeepClusterV2Loss
from jointssl.losses.swav import SwAVLoss
from jointssl.models.heads import ProjectionHead, Prototypes

log = logging.getLogger("jointssl")

Method = Literal["swav", "deepcluster"]


class TaskOutput(NamedTuple):
    loss: Tensor
    #: head-0 prototype (SwAV code argmax or DeepCluster label) of each sample, for usage monitoring; -1 unknown
    assignments: Tensor
    #: head-0 prototype scores of the first view [B, K], detached (for the diagnostics: prediction entropy)
    scores: Tensor
    #: SwAV's Sinkhorn codes of the first view [B, K] (the soft targets); None for DeepCluster-v2 (hard labels)
    codes: Tensor | None = None


class ClusteringObjective(nn.Module, abc.ABC):
    """Projection head + prototypes; the subclasses add the loss and its state.

    Args:
        in_dim: width of the features that are projected (d_model).
        hidden_dim: hidden width of the projection MLP (0: one linear layer).
        out_dim: projection width (the space the prototypes live in).
        num_prototypes: prototypes per head.
        temperature: softmax temperature of the prototype scores.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_prototypes: list[int], temperature: float):
        super().__init__()
        self.out_dim = out_dim
        self.num_prototypes = list(num_prototypes)
        self.projection = ProjectionHead(in_dim, hidden_dim, out_dim)
        self.prototypes = Prototypes(out_dim, num_prototypes)

    def project(self, features: Tensor) -> Tensor:
        return self.projection(features)

    @torch.no_grad()
    def assign(self, features: Tensor) -> Tensor:
        """The head-0 prototype of each of ``features [B, in_dim]``: the best score of its projection (for SwAV
        the learnt prototypes, for DeepCluster-v2 the last k-means centroids they hold)."""
        return self.prototypes(self.project(features))[0].argmax(dim=1)

    @abc.abstractmethod
    def multicrop_loss(self, embeddings: list[Tensor], index: Tensor, use_queue: bool) -> TaskOutput:
        """`embeddings`: projected, L2-normalised [B, out_dim] per view (views 0 and 1 are the global ones)."""

    @abc.abstractmethod
    def pair_loss(self, view_s: Tensor, view_t: Tensor, use_queue: bool) -> TaskOutput:
        """Two projected views [B, out_dim] of samples without a stable identity."""

    def prepare(self, dataset_size: int, num_samples: int, world_size: int) -> None:
        """Size the state once the data is known: `dataset_size` is the size of the global sample-index space,
        `num_samples` the samples of this task over all ranks."""

    def needs_memory(self) -> bool:
        """True when :meth:`fill_memory` must see one pass of the data before the first epoch."""
        return False

    def fill_memory(self, index: Tensor, embeddings: list[Tensor]) -> None:
        """Store embeddings of the samples `index` without computing a loss (before the first epoch)."""

    def on_epoch_start(self, seed: int) -> None:
        """Called at every training epoch start (while the task is active)."""

    def before_step(self) -> None:
        """Called before every training step's forward pass."""

    def drop_prototype_grads(self) -> None:
        self.prototypes.drop_grads()

    def per_rank_modules(self) -> list[nn.Module]:
        """The submodules whose buffers differ between ranks by design (queues, memory banks)."""
        return []


class SwAVObjective(ClusteringObjective):
    """SwAV (Sinkhorn swapped assignment), one prototype head; one queue for multi-crop samples (`swav`), one
    for slice pairs (`pair_swav`).

    Args:
        sinkhorn_epsilon, sinkhorn_iterations: Sinkhorn-Knopp settings.
        queue_length: queue rows over all ranks (each rank keeps queue_length / world_size, see :meth:`prepare`).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_prototypes: list[int], temperature: float,
        sinkhorn_epsilon: float, sinkhorn_iterations: int, queue_length: int,
    ) -> None:
        if len(num_prototypes) != 1:
            raise ValueError(f"SwAV uses one prototype head; got num_prototypes={num_prototypes}")
        super().__init__(in_dim, hidden_dim, out_dim, num_prototypes, temperature)
        swav = dict(
            temperature=temperature, epsilon=sinkhorn_epsilon, sinkhorn_iterations=sinkhorn_iterations,
            crops_for_assign=(0, 1), queue_length=queue_length, embedding_dim=out_dim,
        )
        self.swav = SwAVLoss(**swav)
        self.pair_swav = SwAVLoss(**swav)
        self.configured_queue_length = queue_length

    def prepare(self, dataset_size: int, num_samples: int, world_size: int) -> None:
        self.shard_queues(world_size)

    def shard_queues(self, world_size: int) -> int:
        """Each rank keeps 1/world_size of the configured queue length (as the reference), so the queues of all
        ranks together hold the configured number of rows. Returns the per-rank length."""
        if self.configured_queue_length == 0:
            return 0
        per_rank = self.configured_queue_length // world_size
        for loss in (self.swav, self.pair_swav):
            if loss.queue_length != per_rank:
                loss.resize_queue(per_rank)
        if per_rank * world_size != self.configured_queue_length:
            log.info("SwAV queue: %d rows per rank x %d ranks (of %d configured)", per_rank, world_size,
                     self.configured_queue_length)
        return per_rank

    def before_step(self) -> None:
        # SwAV keeps the prototypes on the unit sphere; done before the forward pass like the reference.
        self.prototypes.normalize_()

    def multicrop_loss(self, embeddings: list[Tensor], index: Tensor, use_queue: bool) -> TaskOutput:
        out = self.swav(embeddings, self.prototypes.heads[0].weight, use_queue=use_queue, index=index)
        return TaskOutput(out.loss, out.assignments, out.scores, out.codes)

    def pair_loss(self, view_s: Tensor, view_t: Tensor, use_queue: bool) -> TaskOutput:
        out = self.pair_swav([view_s, view_t], self.prototypes.heads[0].weight, use_queue=use_queue)
        return TaskOutput(out.loss, out.assignments, out.scores, out.codes)

    def per_rank_modules(self) -> list[nn.Module]:
        return [self.swav, self.pair_swav]


class DeepClusterObjective(ClusteringObjective):
    """DeepCluster-v2: k-means of a memory bank of the previous epoch's embeddings at every epoch start; the
    centroids are the prototypes (never trained by gradient).

    Args:
        kmeans_iterations: spherical k-means iterations per epoch.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_prototypes: list[int], temperature: float,
        kmeans_iterations: int,
    ) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_prototypes, temperature)
        self.kmeans_iterations = kmeans_iterations
        self.deepcluster = DeepClusterV2Loss(temperature=temperature)
        self.prototypes.freeze(True)
        self.memory: DeepClusterMemory | None = None

    def prepare(self, dataset_size: int, num_samples: int, world_size: int) -> None:
        # Each rank holds the embeddings of its shard of one epoch.
        self.attach_memory(dataset_size, bank_size=math.ceil(max(1, num_samples) / world_size))

    def attach_memory(self, dataset_size: int, bank_size: int) -> None:
        """Create the memory bank (once): `bank_size` rows, the samples one rank sees per epoch."""
        if self.memory is not None:
            return
        device = self.prototypes.heads[0].weight.device
        self.memory = DeepClusterMemory(
            bank_size=max(1, bank_size),
            embedding_dim=self.out_dim,
            num_crops=2,
            dataset_size=dataset_size,
            num_prototypes=self.num_prototypes,
            kmeans_iterations=self.kmeans_iterations,
        ).to(device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A checkpoint holds the memory bank, which `prepare` only creates once the data is known (in
        # `JointSSL.setup`). Loaded before that (e.g. `JointSSL.load_from_checkpoint` for analysis), the bank is
        # created here with the checkpoint's shapes, so its buffers load instead of being "unexpected".
        bank_key = f"{prefix}memory.embeddings"
        if self.memory is None and bank_key in state_dict:
            self.attach_memory(
                dataset_size=state_dict[f"{prefix}memory.labels"].shape[1], bank_size=state_dict[bank_key].shape[1]
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def multicrop_loss(self, embeddings: list[Tensor], index: Tensor, use_queue: bool) -> TaskOutput:
        assert self.memory is not None, "prepare() first"
        scores = [[head(e) for e in embeddings] for head in self.prototypes.heads]
        targets = self.memory.targets(index)
        loss = self.deepcluster(scores, targets)
        self.memory.update(index, [e.detach() for e in embeddings[:2]])
        return TaskOutput(loss, targets[0], scores[0][0].detach())

    def pair_loss(self, view_s: Tensor, view_t: Tensor, use_queue: bool) -> TaskOutput:
        scores = [[head(view_s), head(view_t)] for head in self.prototypes.heads]
        with torch.no_grad():
            # Swapped: view s is labelled by the centroid nearest to view t and vice versa; scores are cosine
            # similarities to the unit-norm centroids, so argmax is the nearest centroid.
            labels_s = torch.stack([h[1].argmax(dim=1) for h in scores])
            labels_t = torch.stack([h[0].argmax(dim=1) for h in scores])
        loss_s = self.deepcluster([[h[0]] for h in scores], labels_s)
        loss_t = self.deepcluster([[h[1]] for h in scores], labels_t)
        return TaskOutput((loss_s + loss_t) / 2, labels_t[0], scores[0][0].detach())

    def needs_memory(self) -> bool:
        return self.memory is not None and bool((self.memory.indices < 0).all())

    @torch.no_grad()
    def fill_memory(self, index: Tensor, embeddings: list[Tensor]) -> None:
        self.memory.update(index, embeddings[:2])

    def on_epoch_start(self, seed: int) -> None:
        """k-means over the memory bank; the centroids become the prototypes."""
        for head, centroids in enumerate(self.memory.cluster(seed=seed)):
            self.prototypes.set_weights(head, centroids)

    def per_rank_modules(self) -> list[nn.Module]:
        return [self.memory] if self.memory is not None else []


def build_objective(
    method: Method, in_dim: int, hidden_dim: int, out_dim: int, num_prototypes: list[int], temperature: float,
    sinkhorn_epsilon: float, sinkhorn_iterations: int, queue_length: int, kmeans_iterations: int,
) -> ClusteringObjective:
    """The objective of JointSSL's `method` (its other settings are ignored)."""
    heads = dict(in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim, num_prototypes=num_prototypes,
                 temperature=temperature)
    if method == "swav":
        return SwAVObjective(**heads, sinkhorn_epsilon=sinkhorn_epsilon, sinkhorn_iterations=sinkhorn_iterations,
                             queue_length=queue_length)
    if method == "deepcluster":
        return DeepClusterObjective(**heads, kmeans_iterations=kmeans_iterations)
    raise ValueError(f"method must be 'swav' or 'deepcluster', got {method!r}")
