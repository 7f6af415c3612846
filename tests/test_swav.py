"""SwAV loss: agreement with an independent float64 computation, gradients, and the queue."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from jointssl.losses import SwAVLoss, SwAVOutput
from tests.test_sinkhorn import reference_sinkhorn

TEMPERATURE = 0.1


def make_inputs(num_crops: int = 3, batch: int = 6, dim: int = 8, prototypes: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    embeddings = [F.normalize(torch.randn(batch, dim, generator=generator), dim=1) for _ in range(num_crops)]
    weight = F.normalize(torch.randn(prototypes, dim, generator=generator), dim=1)
    return embeddings, weight


def reference_swav_loss(embeddings, prototypes, crops_for_assign, queues=None):
    """Swapped prediction written out with loops in float64. `queues[i]` (rows) is prepended for assigned
    crop i before Sinkhorn. Returns (loss, codes of the first assigned crop)."""
    embeddings = [e.double() for e in embeddings]
    prototypes = prototypes.double()
    batch = embeddings[0].shape[0]
    per_crop = []
    first_codes = None
    for slot, crop in enumerate(crops_for_assign):
        assign_scores = embeddings[crop].detach() @ prototypes.detach().t()
        if queues is not None:
            assign_scores = torch.cat([queues[slot].double() @ prototypes.detach().t(), assign_scores])
        codes = reference_sinkhorn(assign_scores)[-batch:]
        if first_codes is None:
            first_codes = codes
        view_losses = []
        for view in range(len(embeddings)):
            if view == crop:
                continue
            scores = embeddings[view] @ prototypes.t() / TEMPERATURE
            total = 0.0
            for b in range(batch):
                log_norm = torch.logsumexp(scores[b], dim=0)
                total = total - sum(codes[b, k] * (scores[b, k] - log_norm) for k in range(scores.shape[1]))
            view_losses.append(total / batch)
        per_crop.append(sum(view_losses) / len(view_losses))
    return sum(per_crop) / len(per_crop), first_codes


@pytest.mark.parametrize("crops_for_assign", [(0, 1), (1,), (2, 0)])
def test_loss_and_gradients_match_reference(crops_for_assign):
    embeddings, weight = make_inputs()
    ours_embeddings = [e.clone().requires_grad_(True) for e in embeddings]
    ours_weight = weight.clone().requires_grad_(True)
    out = SwAVLoss(temperature=TEMPERATURE, crops_for_assign=crops_for_assign, embedding_dim=8)(
        ours_embeddings, ours_weight, use_queue=False
    )
    assert isinstance(out, SwAVOutput) and out.loss.ndim == 0 and out.loss.dtype == torch.float32
    out.loss.backward()

    ref_embeddings = [e.double().requires_grad_(True) for e in embeddings]
    ref_weight = weight.double().requires_grad_(True)
    ref_loss, ref_codes = reference_swav_loss(ref_embeddings, ref_weight, crops_for_assign)
    ref_loss.backward()

    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.assignments, ref_codes.argmax(dim=1))
    assert out.assignments.dtype == torch.long
    # Gradients reach the prototypes and every crop that predicts another crop's codes (codes carry none).
    torch.testing.assert_close(ours_weight.grad.double(), ref_weight.grad, rtol=1e-4, atol=1e-6)
    for crop, (ours, ref) in enumerate(zip(ours_embeddings, ref_embeddings)):
        if any(crop != assigned for assigned in crops_for_assign):
            assert ours.grad is not None and ours.grad.abs().sum() > 0
            torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-6)
        else:
            assert ours.grad is None and ref.grad is None


def test_queue_fills_newest_first_and_shifts():
    batch, queue_length = 3, 8
    loss_fn = SwAVLoss(crops_for_assign=(0, 1), queue_length=queue_length, embedding_dim=8)
    assert loss_fn.queue.shape == (2, queue_length, 8)
    batches = [make_inputs(batch=batch, seed=seed) for seed in range(4)]
    for step, (embeddings, weight) in enumerate(batches, start=1):
        loss_fn(embeddings, weight, use_queue=True)
        assert int(loss_fn.queue_filled) == min(step * batch, queue_length)
        # Expected queue: the assigned crops of the batches so far, newest first, truncated to the length.
        for slot, crop in enumerate((0, 1)):
            history = torch.cat([batches[s][0][crop] for s in reversed(range(step))])[:queue_length]
            assert torch.equal(loss_fn.queue[slot, : history.shape[0]], history)
            assert (loss_fn.queue[slot, history.shape[0] :] == 0).all()
    assert loss_fn.queue_is_full()


def test_batch_larger_than_queue_keeps_its_first_rows():
    loss_fn = SwAVLoss(crops_for_assign=(0,), queue_length=4, embedding_dim=8)
    embeddings, weight = make_inputs(batch=6)
    loss_fn(embeddings, weight)
    assert torch.equal(loss_fn.queue[0], embeddings[0][:4]) and loss_fn.queue_is_full()


def test_full_queue_is_used_only_when_asked_and_matches_reference():
    loss_fn = SwAVLoss(temperature=TEMPERATURE, crops_for_assign=(0, 1), queue_length=12, embedding_dim=8)
    for seed in range(3):  # 3 batches of 6 rows: one full queue of 12
        loss_fn(*make_inputs(batch=6, seed=10 + seed), use_queue=True)
    assert loss_fn.queue_is_full()
    embeddings, weight = make_inputs(batch=6, seed=99)
    queues_before = loss_fn.queue.clone()

    without = copy.deepcopy(loss_fn)(embeddings, weight, use_queue=False)
    with_queue = loss_fn(embeddings, weight, use_queue=True)

    ref_without, _ = reference_swav_loss(embeddings, weight, (0, 1))
    ref_with, ref_codes = reference_swav_loss(embeddings, weight, (0, 1), queues=queues_before)
    torch.testing.assert_close(without.loss.double(), ref_without, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_queue.loss.double(), ref_with, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(with_queue.loss, without.loss, rtol=1e-3)
    assert torch.equal(with_queue.assignments, ref_codes.argmax(dim=1))


def test_queue_not_yet_full_is_not_used():
    loss_fn = SwAVLoss(crops_for_assign=(0, 1), queue_length=100, embedding_dim=8)
    loss_fn(*make_inputs(seed=1), use_queue=True)
    embeddings, weight = make_inputs(seed=2)
    with_flag = copy.deepcopy(loss_fn)(embeddings, weight, use_queue=True)
    without_flag = loss_fn(embeddings, weight, use_queue=False)
    assert torch.equal(with_flag.loss, without_flag.loss)


def test_queue_is_checkpointed():
    loss_fn = SwAVLoss(crops_for_assign=(0, 1), queue_length=6, embedding_dim=8)
    loss_fn(*make_inputs(batch=4))
    restored = SwAVLoss(crops_for_assign=(0, 1), queue_length=6, embedding_dim=8)
    restored.load_state_dict(loss_fn.state_dict())
    assert torch.equal(restored.queue, loss_fn.queue) and int(restored.queue_filled) == 4


def test_float32_loss_under_bf16_autocast():
    embeddings, weight = make_inputs(num_crops=2, batch=16, dim=16, prototypes=10)
    reference = SwAVLoss(embedding_dim=16)(embeddings, weight).loss
    weight_bf16 = weight.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = SwAVLoss(embedding_dim=16)([e.bfloat16() for e in embeddings], weight_bf16)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert weight_bf16.grad is not None and torch.isfinite(weight_bf16.grad).all()
    torch.testing.assert_close(out.loss, reference, rtol=0.05, atol=0)


def test_rejects_inconsistent_inputs():
    embeddings, weight = make_inputs(num_crops=2)
    with pytest.raises(ValueError):
        SwAVLoss(crops_for_assign=(2,), embedding_dim=8)(embeddings, weight)
    with pytest.raises(ValueError):
        SwAVLoss(embedding_dim=8)(embeddings[:1], weight)
    with pytest.raises(ValueError):
        SwAVLoss(embedding_dim=8)(embeddings, weight[:, :4])
    with pytest.raises(ValueError):
        SwAVLoss(embedding_dim=8)([embeddings[0], embeddings[1][:3]], weight)


def test_queue_rows_of_the_current_samples_count_as_uniform_rows() -> None:
    """A queued copy of a sample being assigned must not take that sample's prototype: its row counts as uniform
    (the same codes as a zero row), while the rows of other samples shape the codes as before."""
    torch.manual_seed(0)
    prototypes = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    batch = [torch.nn.functional.normalize(torch.randn(2, 8), dim=1) for _ in range(2)]
    stale = [torch.nn.functional.normalize(torch.randn(2, 8), dim=1) for _ in range(2)]

    def codes_after_queueing(queued_index: list[int], queued: list[Tensor]) -> Tensor:
        loss = SwAVLoss(queue_length=2, embedding_dim=8)
        loss(queued, prototypes, index=torch.tensor(queued_index))  # fills the queue
        return loss(batch, prototypes, use_queue=True, index=torch.tensor([5, 6])).codes

    own = codes_after_queueing([5, 6], stale)  # stale copies of the very samples being assigned
    zeros = codes_after_queueing([-1, -1], [torch.zeros(2, 8), torch.zeros(2, 8)])
    others = codes_after_queueing([7, 8], stale)  # the same rows, belonging to other samples
    torch.testing.assert_close(own, zeros)
    assert not torch.allclose(own, others)
