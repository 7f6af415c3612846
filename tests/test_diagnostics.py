"""Training diagnostics (jointssl.diagnostics and JointSSL.compute_diagnostics): each equals a hand computation on a
tiny batch, and computing them changes no gradient."""

from __future__ import annotations

import math

import pytest
import torch

from jointssl import diagnostics
from jointssl.losses import interpolate_masked_slices
from jointssl.pretrain import JointSSL
from tests.test_joint_step import TINY, make_batch


def test_loss_over_chance_and_entropy_by_hand() -> None:
    assert diagnostics.loss_over_chance(torch.tensor(math.log(8.0)), 8).item() == pytest.approx(1.0)
    uniform = torch.full((3, 4), 0.25)
    one_hot = torch.eye(4)[:3]
    assert diagnostics.normalised_entropy(uniform).item() == pytest.approx(1.0)
    assert diagnostics.normalised_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert diagnostics.normalised_entropy(half).item() == pytest.approx(math.log(2) / math.log(4))


def test_effective_rank_by_hand() -> None:
    # Singular values (3, 3, 0): p = (1/2, 1/2) -> entropy ln 2 -> rank 2.
    x = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    assert diagnostics.effective_rank(x).item() == pytest.approx(2.0, rel=1e-5)
    collapsed = torch.ones(5, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert diagnostics.effective_rank(collapsed).item() == pytest.approx(1.0, rel=1e-4)
    # Singular values (2, 1): p = (2/3, 1/3).
    p = torch.tensor([2 / 3, 1 / 3])
    expected = torch.exp(-(p * p.log()).sum()).item()
    assert diagnostics.effective_rank(torch.diag(torch.tensor([2.0, 1.0]))).item() == pytest.approx(expected)
    assert diagnostics.mean_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]])).item() == pytest.approx(3.0)


def test_mask_baselines_and_r2_by_hand() -> None:
    # One volume of 6 slices with scalar embeddings 0, 1, 4, 9, 16, 25 (slice 5 padded); slices 2 and 3 masked.
    target = torch.tensor([0.0, 1.0, 4.0, 9.0, 16.0, 25.0]).view(1, 6, 1)
    mask = torch.tensor([[False, False, True, True, False, False]])
    padding = torch.tensor([[False, False, False, False, False, True]])
    mean = diagnostics.visible_mean_baseline(target, mask, padding)
    assert torch.allclose(mean, torch.full((1, 6, 1), (0.0 + 1.0 + 16.0) / 3))
    neighbours = interpolate_masked_slices(target, mask, padding)
    # Between slice 1 (value 1) and slice 4 (value 16): 1 + 15 * 1/3 = 6 and 1 + 15 * 2/3 = 11.
    assert neighbours[0, 2, 0].item() == pytest.approx(6.0)
    assert neighbours[0, 3, 0].item() == pytest.approx(11.0)
    predicted = torch.tensor([0.0, 0.0, 5.0, 9.0, 0.0, 0.0]).view(1, 6, 1)
    # SSE(predicted) = 1 + 0 = 1; SSE(neighbours) = 4 + 4 = 8.
    assert diagnostics.r2_against(predicted, target, neighbours, mask).item() == pytest.approx(1 - 1 / 8)
    sse_mean = (4 - 17 / 3) ** 2 + (9 - 17 / 3) ** 2
    assert diagnostics.r2_against(predicted, target, mean, mask).item() == pytest.approx(1 - 1 / sse_mean)


def test_pooled_mask_r2_sums_the_errors_of_every_batch_before_the_ratio() -> None:
    # Batch 1: the hand example above (SSE predicted 1, neighbours 8, mean (4 - 17/3)^2 + (9 - 17/3)^2).
    target = torch.tensor([0.0, 1.0, 4.0, 9.0, 16.0, 25.0]).view(1, 6, 1)
    mask = torch.tensor([[False, False, True, True, False, False]])
    padding = torch.tensor([[False, False, False, False, False, True]])
    pooled = diagnostics.PooledMaskR2()
    pooled.update(torch.tensor([0.0, 0.0, 5.0, 9.0, 0.0, 0.0]).view(1, 6, 1), target, mask, padding)
    # Batch 2: slices 0, 2, 4 visible (values 0, 2, 4), slice 1 masked (value 3), predicted 3 (exact), no padding.
    target2 = torch.tensor([0.0, 3.0, 2.0, 1.0, 4.0]).view(1, 5, 1)
    mask2 = torch.tensor([[False, True, False, True, False]])
    # Slice 3 (value 1) masked too, predicted 1.5: SSE predicted 0.25. Neighbours: slice 1 -> 1, slice 3 -> 3:
    # SSE 4 + 4 = 8. Visible mean 2: SSE 1 + 1 = 2.
    pooled.update(torch.tensor([0.0, 3.0, 0.0, 1.5, 0.0]).view(1, 5, 1), target2, mask2, None)
    sse_mean = (4 - 17 / 3) ** 2 + (9 - 17 / 3) ** 2 + 2
    assert pooled.r2()["vs_neighbours"] == pytest.approx(1 - 1.25 / 16)
    assert pooled.r2()["vs_mean"] == pytest.approx(1 - 1.25 / sse_mean)
    assert pooled.masked == 4
    assert math.isnan(diagnostics.PooledMaskR2().r2()["vs_mean"])


def test_neighbour_baseline_copies_the_one_side_at_the_ends() -> None:
    target = torch.arange(5.0).view(1, 5, 1)
    mask = torch.tensor([[True, True, False, False, True]])
    baseline = interpolate_masked_slices(target, mask, None)
    assert baseline.flatten().tolist() == [2.0, 2.0, 2.0, 3.0, 3.0]


def tiny_model() -> JointSSL:
    torch.manual_seed(0)
    return JointSSL(**TINY, aggregator_dropout=0.0)


def test_joint_diagnostics_equal_hand_computations() -> None:
    model = tiny_model()
    out = model.compute_losses(make_batch())
    values = model.compute_diagnostics(out)
    expected_keys = {
        f"{task}_{name}" for task in ("intra", "inter")
        for name in ("loss_over_chance", "prediction_entropy", "code_entropy", "effective_rank")
    } | {"intra_embedding_norm", "mask_r2_vs_mean", "mask_r2_vs_neighbours"}
    assert set(values) == expected_keys
    assert values["intra_loss_over_chance"].item() == pytest.approx(out["intra"].item() / math.log(12), rel=1e-6)
    assert values["inter_loss_over_chance"].item() == pytest.approx(out["inter"].item() / math.log(6), rel=1e-6)
    inputs = out["diagnostics"]
    probabilities = torch.softmax(inputs["inter"].scores / model.hparams.temperature, dim=1)
    entropy = -(probabilities * probabilities.log()).sum(1).mean() / math.log(6)
    assert values["inter_prediction_entropy"].item() == pytest.approx(entropy.item(), rel=1e-5)
    predicted, target, mask, padding = inputs["mask"]
    # Standardised targets: the visible slices' mean is 0, so R^2 against it is 1 - SSE / sum of squares.
    sse = ((predicted - target)[mask] ** 2).sum()
    assert values["mask_r2_vs_mean"].item() == pytest.approx(1 - (sse / (target[mask] ** 2).sum()).item(), rel=1e-4)
    assert all(torch.isfinite(v) for v in values.values())


def test_diagnostics_change_no_gradient() -> None:
    grads = []
    for with_diagnostics in (False, True):
        model = tiny_model()
        torch.manual_seed(1)
        out = model.compute_losses(make_batch())
        if with_diagnostics:
            model.compute_diagnostics(out)
        out["loss"].backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_effective_rank_of_non_finite_embeddings_is_nan_not_an_error() -> None:
    # A step the numerics guard will skip still computes its diagnostics on a logging step: NaN, not an SVD failure.
    x = torch.randn(8, 4)
    x[3, 1] = float("nan")
    assert torch.isnan(diagnostics.effective_rank(x))
    assert 1.0 <= float(diagnostics.effective_rank(torch.randn(8, 4))) <= 4.0
