"""DeepCluster-v2: the pseudo-label loss against an independent computation, and the memory bank."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jointssl.losses import DeepClusterMemory, DeepClusterV2Loss, spherical_kmeans

TEMPERATURE = 0.1


def make_scores(head_sizes=(5, 7), num_crops=2, batch=6, seed=0, requires_grad=True):
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(batch, k, generator=generator).requires_grad_(requires_grad) for _ in range(num_crops)]
        for k in head_sizes
    ]


def reference_loss(scores, targets):
    """Loops in float64: per head, the mean over labelled (sample, crop) pairs of -log softmax(s / T)[label];
    then the mean over heads that have any labelled sample."""
    head_losses = []
    for head, head_scores in enumerate(scores):
        terms = []
        for crop_scores in head_scores:
            for b in range(crop_scores.shape[0]):
                label = int(targets[head, b])
                if label == -1:
                    continue
                logits = crop_scores[b].double() / TEMPERATURE
                terms.append(torch.logsumexp(logits, dim=0) - logits[label])
        if terms:
            head_losses.append(sum(terms) / len(terms))
    return sum(head_losses) / len(head_losses)


def test_loss_matches_reference_and_has_gradients():
    scores = make_scores()
    targets = torch.stack([torch.tensor([0, 4, 2, 2, 1, 3]), torch.tensor([6, 0, 1, 5, 5, 2])])
    loss = DeepClusterV2Loss(temperature=TEMPERATURE)(scores, targets)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference_loss(scores, targets).detach(), rtol=1e-6, atol=1e-6)
    loss.backward()
    for head_scores in scores:
        for crop_scores in head_scores:
            assert crop_scores.grad is not None and crop_scores.grad.abs().sum() > 0


def test_unlabelled_rows_are_ignored():
    scores = make_scores(seed=1)
    targets = torch.stack([torch.tensor([0, -1, 2, -1, 1, 3]), torch.tensor([6, -1, 1, -1, 5, 2])])
    loss = DeepClusterV2Loss(TEMPERATURE)(scores, targets)
    torch.testing.assert_close(loss.double(), reference_loss(scores, targets).detach(), rtol=1e-6, atol=1e-6)
    loss.backward()
    assert (scores[0][0].grad[[1, 3]] == 0).all() and (scores[0][0].grad[[0, 2]] != 0).any()


def test_all_unlabelled_gives_a_connected_zero():
    scores = make_scores(seed=2)
    loss = DeepClusterV2Loss(TEMPERATURE)(scores, torch.full((2, 6), -1))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert scores[1][1].grad is not None and (scores[1][1].grad == 0).all()


def test_loss_is_float32_under_bf16_autocast():
    scores = make_scores(seed=3, requires_grad=False)
    targets = torch.randint(0, 5, (2, 6), generator=torch.Generator().manual_seed(0))
    expected = DeepClusterV2Loss(TEMPERATURE)(scores, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DeepClusterV2Loss(TEMPERATURE)([[s.bfloat16() for s in head] for head in scores], targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0.02, atol=0)


def embeddings_for(indices: torch.Tensor, num_crops: int, dim: int) -> list[torch.Tensor]:
    """Deterministic per-sample embeddings (crop c of sample i), so bank contents can be checked exactly."""
    return [
        F.normalize(torch.sin(indices.double()[:, None] * (1 + torch.arange(dim)) + 0.7 * crop).float(), dim=1)
        for crop in range(num_crops)
    ]


def make_memory(bank_size=5, dim=4, num_crops=2, dataset_size=20, num_prototypes=(3, 2, 4)):
    return DeepClusterMemory(
        bank_size,
        dim,
        num_crops,
        dataset_size=dataset_size,
        num_prototypes=num_prototypes,
        kmeans_iterations=3,
    )


def test_update_writes_at_the_pointer_and_wraps():
    memory = make_memory()
    assert memory.embeddings.shape == (2, 5, 4) and (memory.indices == -1).all()
    assert memory.labels.shape == (3, 20) and (memory.labels == -1).all()
    first, second = torch.tensor([3, 8, 1]), torch.tensor([12, 7, 0])
    memory.update(first, embeddings_for(first, 2, 4))
    assert memory.indices.tolist() == [3, 8, 1, -1, -1] and int(memory.write_position) == 3
    memory.update(second, embeddings_for(second, 2, 4))
    # 12 and 7 fill the last two rows, 0 wraps around and replaces 3.
    assert memory.indices.tolist() == [0, 8, 1, 12, 7] and int(memory.write_position) == 1
    expected = embeddings_for(memory.indices, 2, 4)
    for crop in range(2):
        assert torch.equal(memory.embeddings[crop], expected[crop])


def test_batch_larger_than_the_bank_keeps_its_last_rows():
    memory = make_memory(bank_size=4)
    indices = torch.arange(10, 16)
    memory.update(indices, embeddings_for(indices, 2, 4))
    assert sorted(memory.indices.tolist()) == [12, 13, 14, 15]
    assert torch.equal(memory.embeddings[0], embeddings_for(memory.indices, 2, 4)[0])


def test_update_rejects_mismatched_embeddings():
    memory = make_memory()
    with pytest.raises(ValueError):
        memory.update(torch.arange(3), embeddings_for(torch.arange(3), 1, 4))
    with pytest.raises(ValueError):
        memory.update(torch.arange(3), embeddings_for(torch.arange(2), 2, 4))


def test_cluster_labels_the_banked_samples_and_only_them():
    memory = make_memory(bank_size=8)
    memory.labels.fill_(1)  # stale labels of an earlier epoch must not survive
    banked = torch.tensor([2, 17, 5, 9, 11, 0])  # 6 of 8 rows filled
    memory.update(banked, embeddings_for(banked, 2, 4))
    centroids = memory.cluster(seed=4)

    assert [tuple(c.shape) for c in centroids] == [(3, 4), (2, 4), (4, 4)]
    not_banked = torch.tensor([i for i in range(20) if i not in banked.tolist()])
    assert (memory.labels[:, not_banked] == -1).all()
    for head, num_clusters in enumerate((3, 2, 4)):
        # Head h clusters crop h % num_crops, seeded per head, initialised by sample index.
        expected = spherical_kmeans(
            embeddings_for(banked, 2, 4)[head % 2], num_clusters, iterations=3, seed=4 * 3 + head, keys=banked
        )
        torch.testing.assert_close(centroids[head], expected.centroids)
        assert torch.equal(memory.labels[head, banked], expected.assignments)
    assert torch.equal(memory.targets(torch.tensor([5, 3])), memory.labels[:, [5, 3]])
    assert memory.targets(torch.tensor([5, 3]))[:, 1].eq(-1).all()


def test_a_sample_banked_twice_takes_its_first_label():
    memory = make_memory(bank_size=6, num_prototypes=(2,))
    indices = torch.tensor([4, 4, 6, 7])
    embeddings = embeddings_for(torch.tensor([1, 9, 3, 8]), 2, 4)  # sample 4 seen twice, differently
    memory.update(indices, embeddings)
    memory.cluster(seed=0)
    expected = spherical_kmeans(embeddings[0], 2, iterations=3, seed=0, keys=indices).assignments
    assert int(memory.labels[0, 4]) == int(expected[0])


def test_memory_is_checkpointed():
    memory = make_memory()
    indices = torch.tensor([1, 2, 3, 4])
    memory.update(indices, embeddings_for(indices, 2, 4))
    memory.cluster(seed=0)
    restored = make_memory()
    restored.load_state_dict(memory.state_dict())
    for name in ("embeddings", "indices", "write_position", "labels"):
        assert torch.equal(getattr(restored, name), getattr(memory, name))


def test_cluster_needs_enough_banked_samples():
    memory = make_memory(num_prototypes=(6,))
    indices = torch.tensor([1, 2, 3])
    memory.update(indices, embeddings_for(indices, 2, 4))
    with pytest.raises(ValueError, match="at least num_clusters"):
        memory.cluster(seed=0)
