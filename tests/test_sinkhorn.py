"""Sinkhorn-Knopp codes: marginals, numerical robustness, and agreement with the SwAV reference algorithm."""

from __future__ import annotations

import pytest
import torch

from jointssl.losses import sinkhorn_knopp


def reference_sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """The SwAV reference (single process), in float64: Q = exp(S / eps)^T, alternate normalisations."""
    q = torch.exp(scores.double() / epsilon).t()
    num_prototypes, num_samples = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= num_samples
    q *= num_samples
    return q.t()


def cosine_scores(num_samples: int, num_prototypes: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    samples = torch.nn.functional.normalize(torch.randn(num_samples, dim, generator=generator), dim=1)
    prototypes = torch.nn.functional.normalize(torch.randn(num_prototypes, dim, generator=generator), dim=1)
    return samples @ prototypes.t()


@pytest.mark.parametrize("iterations", [1, 3, 7])
def test_matches_float64_reference(iterations):
    scores = cosine_scores(96, 24)
    codes = sinkhorn_knopp(scores, epsilon=0.05, iterations=iterations)
    torch.testing.assert_close(codes.double(), reference_sinkhorn(scores, 0.05, iterations), rtol=1e-5, atol=1e-6)


def test_matches_reference_for_scores_up_to_one_over_epsilon():
    # exp(20 / 0.05) = exp(400) overflows float32; the float64 reference still represents it.
    scores = torch.rand(64, 16, generator=torch.Generator().manual_seed(1)) * 20
    codes = sinkhorn_knopp(scores)
    torch.testing.assert_close(codes.double(), reference_sinkhorn(scores), rtol=1e-4, atol=1e-6)


def test_marginals():
    num_samples, num_prototypes = 120, 30
    scores = cosine_scores(num_samples, num_prototypes, seed=2)
    codes = sinkhorn_knopp(scores)
    assert codes.shape == (num_samples, num_prototypes) and codes.dtype == torch.float32
    assert (codes >= 0).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(num_samples))
    # Each iteration brings the prototype totals closer to B/K; many bring them onto it.
    target = torch.full((num_prototypes,), num_samples / num_prototypes)

    def worst_relative_deviation(iterations: int) -> float:
        totals = sinkhorn_knopp(scores, iterations=iterations).sum(dim=0)
        return ((totals - target).abs() / target).max().item()

    deviations = [worst_relative_deviation(n) for n in (1, 3, 10, 200)]
    assert deviations == sorted(deviations, reverse=True)
    assert deviations[1] < 0.3 and deviations[-1] < 1e-3


def test_equipartition_counteracts_a_dominant_prototype():
    scores = cosine_scores(60, 6, seed=5)
    scores[:, 0] += 1.0  # every sample prefers prototype 0
    assert (scores.argmax(dim=1) == 0).all()
    codes = sinkhorn_knopp(scores, iterations=3)
    assert codes.argmax(dim=1).unique().numel() == 6
    assert codes.sum(dim=0)[0] < 2 * 60 / 6


def test_no_gradient_and_float32_under_autocast():
    scores = cosine_scores(32, 8).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = sinkhorn_knopp(scores * 1.0)
    assert codes.dtype == torch.float32 and not codes.requires_grad
    torch.testing.assert_close(codes.double(), reference_sinkhorn(scores.detach()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_finite_for_low_precision_scores_up_to_twenty(dtype):
    scores = (torch.rand(64, 32, generator=torch.Generator().manual_seed(3)) * 20).to(dtype)
    codes = sinkhorn_knopp(scores)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64))
    torch.testing.assert_close(codes.double(), reference_sinkhorn(scores.float()), rtol=1e-4, atol=1e-6)


def _adversarial_scores() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    one_hot = torch.zeros(16, 8)
    one_hot[torch.arange(16), torch.randint(0, 8, (16,), generator=generator)] = 1.0
    mixed = torch.randn(16, 8, generator=generator)
    mixed[0] = -1e6  # one sample far below every prototype's best score
    mixed[:, 3] = -1e6  # one prototype far below every sample's best score
    mixed[5, 5] = 1e6
    return {
        "huge": torch.full((16, 8), 1e30) * torch.rand(16, 8, generator=generator),
        "minus_huge": -torch.rand(16, 8, generator=generator) * 1e30,
        "infinite": torch.tensor([[float("inf"), 0.0], [float("-inf"), 1.0], [3.0, float("-inf")]]),
        "constant": torch.full((16, 8), 7.0),
        "one_hot": one_hot * 1e4,
        "mixed_extremes": mixed,
        "single_sample": torch.randn(1, 8, generator=generator),
    }


@pytest.mark.parametrize("name", list(_adversarial_scores()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adversarial_scores_give_valid_codes(name, dtype):
    scores = _adversarial_scores()[name].to(dtype)
    codes = sinkhorn_knopp(scores)
    assert torch.isfinite(codes).all()
    assert (codes >= 0).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(scores.shape[0]))


def test_constant_scores_give_uniform_codes():
    codes = sinkhorn_knopp(torch.full((10, 5), 3.0))
    torch.testing.assert_close(codes, torch.full((10, 5), 0.2))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(4))
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(4, 3), iterations=0)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(4, 3), epsilon=0.0)
