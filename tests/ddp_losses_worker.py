"""One rank of the distributed-equivalence check of jointssl.losses (see tests/test_losses_ddp.py).

The same fixed "union" data is split between the ranks; `run_losses` computes every loss component on the
rank's shard. The test runs it once per rank in a gloo process group and once in a single process on the
union, and compares.

Usage: python -m tests.ddp_losses_worker --rank R --world-size 2 --port P --out DIR
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jointssl.losses import DeepClusterMemory, DeepClusterV2Loss, SwAVLoss, sinkhorn_knopp, spherical_kmeans
from tests.gloo_ranks import worker_main

# Rows of each rank's shard; unequal where the component allows ranks of different sizes.
SINKHORN_ROWS = (7, 6)
KMEANS_ROWS = (30, 20)
SWAV_BATCH = 4  # per rank: each rank's loss is a mean over its batch
SWAV_QUEUE = 6  # per rank
BANK_ROWS = (10, 8)  # filled rows of each rank's memory bank (bank_size = 10)
DC_BATCH = 3
DIM, NUM_PROTOTYPES, NUM_CROPS, DATASET_SIZE = 8, 5, 3, 40
KMEANS_CLUSTERS, DC_HEADS = 6, (4, 3)


def union_data() -> dict:
    """The whole data set of the check, identical in every process."""
    generator = torch.Generator().manual_seed(1234)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=generator), dim=-1)

    bank_indices = torch.randperm(DATASET_SIZE, generator=generator)[: sum(BANK_ROWS)]
    bank_indices[BANK_ROWS[0] + 2] = bank_indices[3]  # one sample banked by both ranks
    return {
        "sinkhorn_scores": unit(sum(SINKHORN_ROWS), DIM) @ unit(NUM_PROTOTYPES, DIM).t(),
        "kmeans_points": unit(sum(KMEANS_ROWS), DIM),
        "swav_embeddings": [unit(2 * SWAV_BATCH, DIM) for _ in range(NUM_CROPS)],
        "swav_queues": unit(2, 2, SWAV_QUEUE, DIM),  # [rank, assigned crop, row, dim]
        "prototypes": unit(NUM_PROTOTYPES, DIM),
        "bank_indices": bank_indices,
        "bank_embeddings": unit(2, sum(BANK_ROWS), DIM),  # [crop, row, dim]
        "dc_scores": [[torch.randn(2 * DC_BATCH, k, generator=generator) for _ in range(2)] for k in DC_HEADS],
        "dc_targets": torch.stack([torch.randint(0, k, (2 * DC_BATCH,), generator=generator) for k in DC_HEADS]),
    }


def _rows(counts: tuple[int, ...], rank: int | None) -> slice:
    """This rank's rows of the union, or all of them when rank is None (the single process)."""
    if rank is None:
        return slice(0, sum(counts))
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def run_losses(data: dict, rank: int | None) -> dict[str, torch.Tensor]:
    """Every component on rank `rank`'s shard (None: one process holding the union)."""
    results: dict[str, torch.Tensor] = {}

    scores = data["sinkhorn_scores"][_rows(SINKHORN_ROWS, rank)]
    results["codes"] = sinkhorn_knopp(scores)
    results["codes_bf16_large"] = sinkhorn_knopp((scores * 20).bfloat16())

    points = data["kmeans_points"][_rows(KMEANS_ROWS, rank)]
    kmeans = spherical_kmeans(points, KMEANS_CLUSTERS, iterations=5, seed=3, chunk_size=7)
    results["kmeans_centroids"], results["kmeans_assignments"] = kmeans.centroids, kmeans.assignments

    batch = _rows((SWAV_BATCH, SWAV_BATCH), rank)
    embeddings = [crop[batch].clone().requires_grad_(True) for crop in data["swav_embeddings"]]
    prototypes = data["prototypes"].clone().requires_grad_(True)
    # The single process's queue is the ranks' queues one after the other (Sinkhorn ignores row order).
    queue = data["swav_queues"][rank] if rank is not None else torch.cat(list(data["swav_queues"]), dim=1)
    swav = SwAVLoss(crops_for_assign=(0, 1), queue_length=queue.shape[1], embedding_dim=DIM)
    swav.queue.copy_(queue)
    swav.queue_filled.fill_(queue.shape[1])
    out = swav(embeddings, prototypes, use_queue=True)
    out.loss.backward()
    results["swav_loss"], results["swav_assignments"] = out.loss.detach(), out.assignments
    results["swav_prototype_grad"] = prototypes.grad
    results["swav_embedding_grads"] = torch.stack([e.grad for e in embeddings])

    rows = _rows(BANK_ROWS, rank)
    memory = DeepClusterMemory(
        max(BANK_ROWS) if rank is not None else sum(BANK_ROWS),
        DIM,
        2,
        dataset_size=DATASET_SIZE,
        num_prototypes=DC_HEADS,
        kmeans_iterations=3,
    )
    indices, bank = data["bank_indices"][rows], data["bank_embeddings"][:, rows]
    # Two batches, so that the write position moves.
    memory.update(indices[:5], [crop[:5] for crop in bank])
    memory.update(indices[5:], [crop[5:] for crop in bank])
    centroids = memory.cluster(seed=5)
    results["memory_labels"] = memory.labels.clone()
    for head, head_centroids in enumerate(centroids):
        results[f"memory_centroids_{head}"] = head_centroids

    dc_rows = _rows((DC_BATCH, DC_BATCH), rank)
    dc_scores = [[crop[dc_rows] for crop in head] for head in data["dc_scores"]]
    results["dc_loss"] = DeepClusterV2Loss(0.1)(dc_scores, data["dc_targets"][:, dc_rows])
    return results


if __name__ == "__main__":
    worker_main(lambda rank, world_size: run_losses(union_data(), rank))
