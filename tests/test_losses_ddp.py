"""Two gloo ranks, each holding half of a fixed batch / bank, agree with one process holding the union:
Sinkhorn codes, k-means, SwAV loss (with queue) and its gradients, DeepCluster-v2 labels, centroids and loss."""

from __future__ import annotations

import pytest
import torch

from tests.ddp_losses_worker import run_losses, union_data
from tests.gloo_ranks import run_ranks

WORLD_SIZE = 2
TIGHT = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    return run_ranks("tests.ddp_losses_worker", tmp_path_factory.mktemp("ddp_losses"), WORLD_SIZE)


@pytest.fixture(scope="module")
def union_results() -> dict[str, torch.Tensor]:
    return run_losses(union_data(), rank=None)


@pytest.mark.ddp
def test_sinkhorn_codes_equal_the_union(rank_results, union_results):
    for key in ("codes", "codes_bf16_large"):
        torch.testing.assert_close(torch.cat([r[key] for r in rank_results]), union_results[key], **TIGHT)


@pytest.mark.ddp
def test_kmeans_equals_the_union(rank_results, union_results):
    first, second = rank_results
    assert torch.equal(first["kmeans_centroids"], second["kmeans_centroids"])
    torch.testing.assert_close(first["kmeans_centroids"], union_results["kmeans_centroids"], **TIGHT)
    assignments = torch.cat([r["kmeans_assignments"] for r in rank_results])
    assert torch.equal(assignments, union_results["kmeans_assignments"])


@pytest.mark.ddp
def test_swav_loss_and_gradients_equal_the_union(rank_results, union_results):
    # Each rank's loss is a mean over its (equal-sized) batch and DDP averages gradients over ranks.
    mean_loss = torch.stack([r["swav_loss"] for r in rank_results]).mean()
    torch.testing.assert_close(mean_loss, union_results["swav_loss"], **TIGHT)
    assignments = torch.cat([r["swav_assignments"] for r in rank_results])
    assert torch.equal(assignments, union_results["swav_assignments"])
    mean_grad = torch.stack([r["swav_prototype_grad"] for r in rank_results]).mean(dim=0)
    torch.testing.assert_close(mean_grad, union_results["swav_prototype_grad"], **TIGHT)
    embedding_grads = torch.cat([r["swav_embedding_grads"] for r in rank_results], dim=1) / WORLD_SIZE
    torch.testing.assert_close(embedding_grads, union_results["swav_embedding_grads"], **TIGHT)


@pytest.mark.ddp
def test_deepcluster_memory_and_loss_equal_the_union(rank_results, union_results):
    first, second = rank_results
    assert torch.equal(first["memory_labels"], second["memory_labels"])
    assert torch.equal(first["memory_labels"], union_results["memory_labels"])
    assert (union_results["memory_labels"] >= 0).sum() > 0 and (union_results["memory_labels"] == -1).sum() > 0
    for head in range(2):
        key = f"memory_centroids_{head}"
        torch.testing.assert_close(first[key], union_results[key], **TIGHT)
    mean_loss = torch.stack([r["dc_loss"] for r in rank_results]).mean()
    torch.testing.assert_close(mean_loss, union_results["dc_loss"], **TIGHT)
