"""The clustering objectives behind one interface: which class a method builds, and their checkpoint keys."""

from __future__ import annotations

import pytest
import torch

from jointssl.objectives import DeepClusterObjective, SwAVObjective, build_objective

SETTINGS = dict(in_dim=16, hidden_dim=0, out_dim=8, temperature=0.1, sinkhorn_epsilon=0.05, sinkhorn_iterations=3,
                queue_length=8, kmeans_iterations=2)


def test_each_method_builds_its_objective_with_the_checkpoint_keys_of_before() -> None:
    swav = build_objective("swav", num_prototypes=[5], **SETTINGS)
    assert isinstance(swav, SwAVObjective)
    keys = set(swav.state_dict())
    # The key names that checkpoints written by ClusteringTask hold.
    assert {"swav.queue", "swav.queue_index", "pair_swav.queue", "prototypes.heads.0.weight"} <= keys
    deepcluster = build_objective("deepcluster", num_prototypes=[3, 4], **SETTINGS)
    assert isinstance(deepcluster, DeepClusterObjective)
    deepcluster.prepare(dataset_size=20, num_samples=10, world_size=2)
    assert deepcluster.memory.embeddings.shape[1] == 5  # this rank's share of the 10 samples
    assert {"memory.embeddings", "memory.labels"} <= set(deepcluster.state_dict())
    assert deepcluster.needs_memory() and not swav.needs_memory()
    assert not any(p.requires_grad for p in deepcluster.prototypes.parameters())


def test_swav_queues_are_sharded_and_per_rank() -> None:
    swav = build_objective("swav", num_prototypes=[5], **SETTINGS)
    swav.prepare(dataset_size=20, num_samples=20, world_size=2)
    assert swav.swav.queue_length == swav.pair_swav.queue_length == 4
    assert swav.per_rank_modules() == [swav.swav, swav.pair_swav]


def test_swav_needs_one_head_and_unknown_methods_are_refused() -> None:
    with pytest.raises(ValueError, match="one prototype head"):
        build_objective("swav", num_prototypes=[5, 6], **SETTINGS)
    with pytest.raises(ValueError, match="method"):
        build_objective("byol", num_prototypes=[5], **SETTINGS)  # type: ignore[arg-type]


def test_a_deepcluster_bank_loads_before_the_data_is_known() -> None:
    saved = build_objective("deepcluster", num_prototypes=[3], **SETTINGS)
    saved.prepare(dataset_size=20, num_samples=6, world_size=1)
    saved.fill_memory(torch.tensor([1, 2]), [torch.randn(2, 8), torch.randn(2, 8)])
    fresh = build_objective("deepcluster", num_prototypes=[3], **SETTINGS)
    fresh.load_state_dict(saved.state_dict())
    assert torch.equal(fresh.memory.indices, saved.memory.indices)
