"""ClusteringTask: one contrastive-clustering objective (SwAV or DeepCluster-v2) with its own projection head,
prototypes and state (queues or memory bank). jointssl has two: the 2D task (L_intra) on image crops and volume
slices, and the 3D task (L_inter) on volume features."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from jointssl.losses.deepcluster import DeepClusterMemory, DeepClusterV2Loss
from jointssl.losses.swav import SwAVLoss
from jointssl.models.heads import ProjectionHead, Prototypes


class TaskOutput(NamedTuple):
    loss: Tensor
    #: head-0 prototype (SwAV code argmax or DeepCluster label) of each sample, for usage monitoring; -1 unknown
    assignments: Tensor
    #: head-0 prototype scores of the first view [B, K], detached (for the diagnostics: prediction entropy)
    scores: Tensor
    #: SwAV's Sinkhorn codes of the first view [B, K] (the soft targets); None for DeepCluster-v2 (hard labels)
    codes: Tensor | None = None


class ClusteringTask(nn.Module):
    """Projection head + prototypes + clustering loss.

    Two kinds of input:
    - `multicrop_loss`: samples with a fixed global index (2D images, volumes) and two or more views. DeepCluster-v2
      takes its pseudo-labels from the memory bank (k-means of the previous epoch) by index.
    - `pair_loss`: two views of samples without a stable identity (slice i of two views of a random slab). SwAV
      uses its own queue; DeepCluster-v2 labels each view with the nearest current centroid of the *other* view
      (swapped, no memory-bank row: a slab's slices are not fixed samples).
    """

    def __init__(
        self,
        method: Literal["swav", "deepcluster"],
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_prototypes: list[int],
        temperature: float,
        sinkhorn_epsilon: float,
        sinkhorn_iterations: int,
        queue_length: int,
        kmeans_iterations: int,
    ) -> None:
        super().__init__()
        if method == "swav" and len(num_prototypes) != 1:
            raise ValueError(f"SwAV uses one prototype head; got num_prototypes={num_prototypes}")
        self.method = method
        self.out_dim = out_dim
        self.num_prototypes = list(num_prototypes)
        self.kmeans_iterations = kmeans_iterations
        self.projection = ProjectionHead(in_dim, hidden_dim, out_dim)
        self.prototypes = Prototypes(out_dim, num_prototypes)
        if method == "swav":
            swav = dict(
                temperature=temperature, epsilon=sinkhorn_epsilon, sinkhorn_iterations=sinkhorn_iterations,
                crops_for_assign=(0, 1), queue_length=queue_length, embedding_dim=out_dim,
            )
            self.swav = SwAVLoss(**swav)
            self.pair_swav = SwAVLoss(**swav)
            self.configured_queue_length = queue_length
        else:
            self.deepcluster = DeepClusterV2Loss(temperature=temperature)
            # DeepCluster-v2's prototypes are the k-means centroids: never trained by gradient.
            self.prototypes.freeze(True)
            self.memory: DeepClusterMemory | None = None

    def attach_memory(self, dataset_size: int, bank_size: int) -> None:
        """DeepCluster-v2 only: create the memory bank once the data is known. `dataset_size` is the size of the
        global sample-index space, `bank_size` the rows one rank sees per epoch."""
        if self.method != "deepcluster" or self.memory is not None:
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
        # A DeepCluster-v2 checkpoint holds the memory bank, which `attach_memory` only creates once the data is
        # known (in `JointSSL.setup`). Loaded before that (e.g. `JointSSL.load_from_checkpoint` for analysis), the
        # bank is created here with the checkpoint's shapes, so its buffers load instead of being "unexpected".
        bank_key = f"{prefix}memory.embeddings"
        if self.method == "deepcluster" and self.memory is None and bank_key in state_dict:
            self.attach_memory(
                dataset_size=state_dict[f"{prefix}memory.labels"].shape[1],
                bank_size=state_dict[bank_key].shape[1],
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def shard_queues(self, world_size: int) -> int:
        """SwAV: each rank keeps 1/world_size of the configured queue length (as the reference), so the queues of
        all ranks together hold the configured number of rows. Returns the per-rank length."""
        if self.method != "swav" or self.swav.queue_length == 0:
            return 0
        per_rank = self.configured_queue_length // world_size
        for loss in (self.swav, self.pair_swav):
            if loss.queue_length != per_rank:
                loss.resize_queue(per_rank)
        return per_rank

    def project(self, features: Tensor) -> Tensor:
        return self.projection(features)

    def before_step(self) -> None:
        if self.method == "swav":
            # SwAV keeps the prototypes on the unit sphere; done before the forward pass like the reference.
            self.prototypes.normalize_()

    def multicrop_loss(self, embeddings: list[Tensor], index: Tensor, use_queue: bool) -> TaskOutput:
        """`embeddings`: projected, L2-normalised [B, out_dim] per view (views 0 and 1 are the global ones)."""
        if self.method == "swav":
            out = self.swav(embeddings, self.prototypes.heads[0].weight, use_queue=use_queue, index=index)
            return TaskOutput(out.loss, out.assignments, out.scores, out.codes)
        assert self.memory is not None, "attach_memory() first"
        scores = [[head(e) for e in embeddings] for head in self.prototypes.heads]
        targets = self.memory.targets(index)
        loss = self.deepcluster(scores, targets)
        self.memory.update(index, [e.detach() for e in embeddings[:2]])
        return TaskOutput(loss, targets[0], scores[0][0].detach())

    def pair_loss(self, view_s: Tensor, view_t: Tensor, use_queue: bool) -> TaskOutput:
        if self.method == "swav":
            out = self.pair_swav([view_s, view_t], self.prototypes.heads[0].weight, use_queue=use_queue)
            return TaskOutput(out.loss, out.assignments, out.scores, out.codes)
        scores = [[head(view_s), head(view_t)] for head in self.prototypes.heads]
        with torch.no_grad():
            # Swapped: view s is labelled by the centroid nearest to view t and vice versa; scores are cosine
            # similarities to the unit-norm centroids, so argmax is the nearest centroid.
            labels_s = torch.stack([h[1].argmax(dim=1) for h in scores])
            labels_t = torch.stack([h[0].argmax(dim=1) for h in scores])
        loss_s = self.deepcluster([[h[0]] for h in scores], labels_s)
        loss_t = self.deepcluster([[h[1]] for h in scores], labels_t)
        return TaskOutput((loss_s + loss_t) / 2, labels_t[0], scores[0][0].detach())

    @torch.no_grad()
    def fill_memory(self, index: Tensor, embeddings: list[Tensor]) -> None:
        if self.method == "deepcluster":
            self.memory.update(index, embeddings[:2])

    def memory_is_empty(self) -> bool:
        return self.method == "deepcluster" and bool((self.memory.indices < 0).all())

    def on_epoch_start(self, seed: int) -> None:
        """DeepCluster-v2: k-means over the memory bank; the centroids become the prototypes."""
        if self.method == "deepcluster":
            for head, centroids in enumerate(self.memory.cluster(seed=seed)):
                self.prototypes.set_weights(head, centroids)

    def drop_prototype_grads(self) -> None:
        self.prototypes.drop_grads()
