"""Projection head and prototypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jointssl.models import ProjectionHead, Prototypes


def test_projection_head_mlp_shape_and_norm() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(in_dim=24, hidden_dim=32, out_dim=8)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    z = head(torch.randn(5, 24) * 10)
    assert z.shape == (5, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))


def test_projection_head_single_linear() -> None:
    head = ProjectionHead(in_dim=24, hidden_dim=0, out_dim=8)
    assert isinstance(head.mlp, nn.Linear)
    x = torch.randn(3, 24)
    z = head(x)
    torch.testing.assert_close(z, torch.nn.functional.normalize(head.mlp(x), dim=1))


def test_prototypes_single_and_multi_head_scores() -> None:
    single = Prototypes(dim=8, num_prototypes=10)
    multi = Prototypes(dim=8, num_prototypes=[10, 7, 5])
    z = torch.randn(4, 8)
    single_scores = single(z)
    assert isinstance(single_scores, list) and [s.shape for s in single_scores] == [(4, 10)]
    assert [s.shape for s in multi(z)] == [(4, 10), (4, 7), (4, 5)]
    assert multi.num_prototypes == [10, 7, 5]
    assert all(head.bias is None for head in multi.heads)
    torch.testing.assert_close(multi(z)[1], z @ multi.heads[1].weight.T)


def test_prototypes_normalize_in_place_without_grad() -> None:
    prototypes = Prototypes(dim=8, num_prototypes=[6, 4])
    with torch.no_grad():
        for head in prototypes.heads:
            head.weight.mul_(5.0)
    weights_before = [head.weight for head in prototypes.heads]
    prototypes.normalize_()
    for head, before in zip(prototypes.heads, weights_before):
        assert head.weight is before  # same Parameter object: optimizer state keeps pointing at it
        assert head.weight.grad_fn is None and head.weight.requires_grad
        torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(head.weight.shape[0]))


def test_prototypes_set_weights_copies() -> None:
    prototypes = Prototypes(dim=4, num_prototypes=[3, 2])
    centroids = torch.randn(2, 4, dtype=torch.float64)
    prototypes.set_weights(1, centroids)
    torch.testing.assert_close(prototypes.heads[1].weight, centroids.float())
    assert prototypes.heads[1].weight.dtype == torch.float32
    centroids.add_(1.0)  # a copy, not an alias
    assert not torch.allclose(prototypes.heads[1].weight, centroids.float())
    with pytest.raises(ValueError, match="shape"):
        prototypes.set_weights(0, torch.randn(2, 4))


def test_prototypes_freeze_and_drop_grads() -> None:
    prototypes = Prototypes(dim=4, num_prototypes=3)
    z = torch.randn(2, 4, requires_grad=True)
    prototypes.freeze(True)
    prototypes(z)[0].sum().backward()
    assert prototypes.heads[0].weight.grad is None
    assert z.grad is not None  # gradients still reach the embeddings
    prototypes.freeze(False)
    prototypes(z)[0].sum().backward()
    assert prototypes.heads[0].weight.grad is not None
    prototypes.drop_grads()
    assert prototypes.heads[0].weight.grad is None


def test_prototypes_reject_bad_sizes() -> None:
    with pytest.raises(ValueError):
        Prototypes(dim=4, num_prototypes=[])
    with pytest.raises(ValueError):
        Prototypes(dim=4, num_prototypes=0)
