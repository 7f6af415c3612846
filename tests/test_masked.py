"""L_mask pieces: random_slice_mask and masked_embedding_loss."""

from __future__ import annotations

import pytest
import torch

from jointssl.losses.masked import keyed_uniform, masked_embedding_loss, random_slice_mask


def trailing_padding(lengths: list[int], num_slices: int) -> torch.Tensor:
    return torch.arange(num_slices)[None, :] >= torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("ratio", [0.1, 0.15, 0.5])
def test_mask_counts_follow_the_ratio_and_skip_padding(ratio):
    lengths = [64, 37, 20, 13, 7, 3, 2, 1]
    padding_mask = trailing_padding(lengths, 64)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = random_slice_mask(padding_mask, 64, len(lengths), ratio=ratio, generator=generator)
        assert mask.dtype == torch.bool and mask.shape == (len(lengths), 64)
        assert not (mask & padding_mask).any()
        expected = [min(max(round(ratio * n), 1), n - 1) for n in lengths]
        assert mask.sum(dim=1).tolist() == expected


def test_mask_without_padding_and_reproducible_with_a_generator():
    first = random_slice_mask(None, 20, 4, ratio=0.15, generator=torch.Generator().manual_seed(3))
    second = random_slice_mask(None, 20, 4, ratio=0.15, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    assert first.sum(dim=1).tolist() == [3] * 4  # round(0.15 * 20)
    # Every real slice gets masked sometimes: the choice is random, not a fixed pattern.
    generator = torch.Generator().manual_seed(0)
    hits = sum(random_slice_mask(None, 20, 4, generator=generator).sum(0) for _ in range(50))
    assert (hits > 0).all()


def test_mask_argument_checks():
    with pytest.raises(ValueError, match="ratio"):
        random_slice_mask(None, 8, 2, ratio=0.0)
    with pytest.raises(ValueError, match="padding_mask"):
        random_slice_mask(trailing_padding([3, 4], 5), 6, 2)


def test_loss_is_mse_over_masked_positions_only():
    torch.manual_seed(0)
    predicted = torch.randn(2, 6, 4, requires_grad=True)
    target = torch.randn(2, 6, 4)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, [1, 4]] = True
    mask[1, 0] = True
    loss = masked_embedding_loss(predicted, target, mask)
    expected = (predicted[mask] - target[mask]).pow(2).mean()
    torch.testing.assert_close(loss, expected)
    # Unmasked positions may hold anything, even non-finite values.
    changed = predicted.detach().clone()
    changed[~mask] = float("nan")
    torch.testing.assert_close(masked_embedding_loss(changed, target, mask), expected.detach())
    loss.backward()
    assert (predicted.grad[~mask] == 0).all() and predicted.grad[mask].abs().sum() > 0


def test_loss_stops_the_gradient_to_targets():
    predicted = torch.randn(1, 5, 3, requires_grad=True)
    target = torch.randn(1, 5, 3, requires_grad=True)
    mask = torch.tensor([[True, False, True, False, False]])
    masked_embedding_loss(predicted, target, mask).backward()
    assert target.grad is None and predicted.grad is not None


def test_loss_of_empty_mask_is_zero_and_connected():
    predicted = torch.randn(2, 4, 3, requires_grad=True)
    loss = masked_embedding_loss(predicted, torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(predicted.grad, torch.zeros_like(predicted))


def test_loss_is_float32_for_bfloat16_inputs():
    predicted = torch.randn(2, 4, 8).bfloat16()
    target = torch.randn(2, 4, 8).bfloat16()
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    loss = masked_embedding_loss(predicted, target, mask)
    assert loss.dtype == torch.float32
    expected = (predicted.float()[mask] - target.float()[mask]).pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_keyed_uniform_rows_depend_only_on_their_key_and_salt() -> None:
    keys = torch.tensor([5, 9, 12, 40])
    whole = keyed_uniform(keys, 7, salt=(0, 3))
    halves = torch.cat([keyed_uniform(keys[:2], 7, salt=(0, 3)), keyed_uniform(keys[2:], 7, salt=(0, 3))])
    assert torch.equal(whole, halves)  # a batch split between ranks draws the same numbers
    assert torch.equal(keyed_uniform(keys.flip(0), 7, salt=(0, 3)), whole.flip(0))
    assert not torch.equal(keyed_uniform(keys, 7, salt=(0, 4)), whole)  # another step, other draws
    assert whole.shape == (4, 7) and 0 <= whole.min() and whole.max() < 1
    mask = random_slice_mask(None, 7, 4, ratio=0.3, uniform=whole)
    assert torch.equal(mask, random_slice_mask(None, 7, 4, ratio=0.3, uniform=halves))
    with pytest.raises(ValueError, match="uniform must be"):
        random_slice_mask(None, 8, 4, uniform=whole)


def test_span_mask_masks_contiguous_blocks_with_an_exact_count() -> None:
    padding = torch.zeros(64, 16, dtype=torch.bool)
    padding[::3, 11:] = True  # every third volume has 11 real slices
    generator = torch.Generator().manual_seed(0)
    mask = random_slice_mask(padding, 16, 64, ratio=0.3, span=4, generator=generator)
    lengths = (~padding).sum(1)
    assert torch.equal(mask.sum(1), torch.round(lengths.double() * 0.3).long())
    assert not (mask & padding).any()
    runs = (mask[:, 1:] & ~mask[:, :-1]).sum(1) + mask[:, 0]
    # 5 (or 3) masked slices in blocks of at most 4 (the grid's edge blocks can be shorter): at most 3 runs, and on
    # average long ones (independent slices would give runs of about 1.4).
    assert int(runs.max()) <= 3
    assert mask.sum() / runs.sum() > 2.5
    # Spans are not all at one place: every slice is masked in some volume.
    assert mask[1::3].any(0).all()


def test_span_mask_is_a_function_of_the_draws() -> None:
    uniform = torch.rand(4, 12, generator=torch.Generator().manual_seed(3))
    a = random_slice_mask(None, 12, 4, ratio=0.25, span=3, uniform=uniform)
    b = random_slice_mask(None, 12, 4, ratio=0.25, span=3, uniform=uniform.clone())
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="span"):
        random_slice_mask(None, 12, 4, span=0)
