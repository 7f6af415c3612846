"""Two gloo ranks, each holding half of a fixed joint batch, agree with one process holding all of it: L_intra,
L_inter, the 3D assignments (Sinkhorn codes / k-means labels and centroids) and the aggregator's gradients."""

from __future__ import annotations

import pytest
import torch

from tests.ddp_joint_worker import run
from tests.gloo_ranks import run_ranks

WORLD_SIZE = 2
TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return run_ranks("tests.ddp_joint_worker", tmp_path_factory.mktemp("ddp_joint"), WORLD_SIZE)


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["swav", "deepcluster"])
def test_joint_losses_equal_the_union(rank_results, method: str) -> None:
    union = run(method, rank=None, world_size=1)
    ranks = [r[method] for r in rank_results]
    for name in ("intra", "inter"):
        # Each rank's loss is a mean over its equal-sized half; DDP averages the gradients the same way.
        torch.testing.assert_close(torch.stack([r[name] for r in ranks]).mean(), union[name], **TOL)
    assignments = torch.cat([r["inter_assignments"] for r in ranks])
    assert torch.equal(assignments, union["inter_assignments"])
    grad = torch.stack([r["aggregator_grad"] for r in ranks]).mean(dim=0)
    torch.testing.assert_close(grad, union["aggregator_grad"], **TOL)
    if method == "deepcluster":
        for r in ranks:
            torch.testing.assert_close(r["inter_centroids"], union["inter_centroids"], **TOL)
            assert torch.equal(r["inter_labels"], union["inter_labels"])
