"""DeformableSliceAttention: 1D deformable self-attention whose tokens are slices."""

from __future__ import annotations

import math

import pytest
import torch

from jointssl.models.deformable import (
    DeformableSliceAttention,
    interpolate_along_slices,
    lengths_from_padding_mask,
    num_reference_points,
    reference_positions,
)

D_MODEL, HEADS = 32, 4


def make_attention(seed: int = 0, **kwargs) -> DeformableSliceAttention:
    torch.manual_seed(seed)
    return DeformableSliceAttention(D_MODEL, HEADS, **kwargs)


@pytest.mark.parametrize("num_slices", [1, 2, 3, 5, 8, 13, 20])
def test_output_shape_for_any_number_of_slices(num_slices):
    attention = make_attention()
    x = torch.randn(3, num_slices, D_MODEL)
    out = attention(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_invalid_configuration_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        DeformableSliceAttention(30, 4)
    with pytest.raises(ValueError, match="odd"):
        DeformableSliceAttention(D_MODEL, HEADS, offset_kernel_size=4)
    with pytest.raises(ValueError, match="shape"):
        make_attention()(torch.randn(2, 5, D_MODEL + 1))


def test_reference_points_cover_each_real_extent_uniformly():
    lengths = torch.tensor([37, 8, 1, 2])
    num_points = math.ceil(37 / 4)
    positions, valid, spacing = reference_positions(lengths, num_points, downsample=4)
    assert valid.sum(dim=1).tolist() == [10, 2, 1, 1]
    for row, n in enumerate(lengths.tolist()):
        used = positions[row, valid[row]]
        assert used.min() >= 0 and used.max() <= n - 1
        # Cell centres: symmetric about the sequence's centre, evenly spaced.
        assert torch.allclose(used + used.flip(0), torch.full_like(used, n - 1.0))
        if used.numel() > 1:
            assert torch.allclose(used.diff(), spacing[row].expand(used.numel() - 1))
    assert positions[2, 0] == 0.0 and positions[3, 0] == 0.5


def test_max_points_bounds_the_keys_per_query_and_widens_the_cells():
    lengths = torch.tensor([37, 8, 1])
    num_points = num_reference_points(37, downsample=4, max_points=4)
    assert num_points == 4 and num_reference_points(37, 4, None) == 10 and num_reference_points(8, 4, 4) == 2
    positions, valid, spacing = reference_positions(lengths, num_points, downsample=4, max_points=4)
    assert valid.sum(dim=1).tolist() == [4, 2, 1]
    assert spacing.tolist() == [37 / 4, 4.0, 1.0]
    used = positions[0, valid[0]]
    assert torch.allclose(used + used.flip(0), torch.full_like(used, 36.0))


def test_max_points_changes_nothing_up_to_its_length_and_keeps_padding_invariance():
    unbounded, bounded = make_attention().eval(), make_attention(max_points=3).eval()
    x = torch.randn(2, 12, D_MODEL)
    with torch.no_grad():
        # 12 slices / downsample 4 = 3 points: the bound is not reached.
        torch.testing.assert_close(bounded(x), unbounded(x), rtol=0, atol=0)
        long = torch.randn(2, 40, D_MODEL)
        positions, valid = bounded.sample_positions(bounded._split_heads(bounded.query(long)), torch.tensor([40, 40]))
        assert positions.shape[-1] == 3 and bool(valid.all())
        # A shorter sequence padded into the batch gives what it gives alone, bound or not.
        padding_mask = torch.zeros(2, 40, dtype=torch.bool)
        padding_mask[0, 25:] = True
        together = bounded(long, padding_mask)
        alone = bounded(long[:1, :25])
    torch.testing.assert_close(together[0, :25], alone[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="max_points"):
        make_attention(max_points=0)


def test_interpolation_is_linear_and_never_reads_past_the_last_real_slice():
    num_slices = 6
    features = torch.arange(num_slices, dtype=torch.float32).view(1, 1, num_slices, 1).repeat(2, 1, 1, 1)
    features[1, 0, 4:] = float("nan")  # padding of a 4-slice sequence
    positions = torch.tensor([[[0.0, 1.25, 4.5, 5.0]], [[0.0, 0.5, 2.75, 3.0]]], requires_grad=True)
    last_index = torch.tensor([5, 3])
    out = interpolate_along_slices(features, positions, last_index).squeeze(-1)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, positions.detach())  # the value at position p of arange is p
    out.sum().backward()
    assert torch.isfinite(positions.grad).all() and positions.grad[0, 0, 1] == 1.0


def test_padding_mask_must_be_boolean_and_trailing():
    with pytest.raises(ValueError, match="trailing"):
        lengths_from_padding_mask(torch.tensor([[False, True, False]]), 1, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="boolean"):
        lengths_from_padding_mask(torch.tensor([[0, 0, 1]]), 1, 3, torch.device("cpu"))
    lengths = lengths_from_padding_mask(
        torch.tensor([[False, False, True], [False] * 3]), 2, 3, torch.device("cpu")
    )
    assert lengths.tolist() == [2, 3]


def test_attention_is_position_aware():
    """Permuting the slices must change the outputs beyond the same permutation (no bag-of-slices)."""
    attention = make_attention().eval()
    x = torch.randn(2, 12, D_MODEL)
    permutation = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = attention(x)
        out_of_permuted = attention(x[:, permutation])
    assert not torch.allclose(out_of_permuted, out[:, permutation], atol=1e-4)


def test_gradient_reaches_offset_network_and_position_bias():
    attention = make_attention()
    x = torch.randn(2, 13, D_MODEL)
    padding_mask = torch.zeros(2, 13, dtype=torch.bool)
    padding_mask[1, 9:] = True
    weights = torch.randn(2, 13, D_MODEL)
    (attention(x, padding_mask) * weights).sum().backward()
    for name, parameter in attention.named_parameters():
        if name.startswith(("offset_network.", "position_bias.")):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
            assert torch.isfinite(parameter.grad).all(), name


def test_offsets_move_the_sampled_positions_within_bounds():
    attention = make_attention(offset_scale=2.0)
    x = torch.randn(2, 17, D_MODEL)
    lengths = torch.tensor([17, 9])
    queries = attention._split_heads(attention.query(x))
    queries[1, :, 9:] = 0.0
    positions, valid = attention.sample_positions(queries, lengths)
    references, _, spacing = reference_positions(lengths, valid.shape[1], downsample=4)
    moved = (positions - references[:, None, :]).abs()
    assert moved[valid[:, None, :].expand_as(moved)].max() > 0
    assert (moved <= spacing.view(2, 1, 1) + 1e-5).all()  # offset_scale 2 -> at most one reference spacing
    assert (positions[1] <= 8).all() and (positions >= 0).all()
    zero_scale = make_attention(offset_scale=0.0)
    still, _ = zero_scale.sample_positions(queries, lengths)
    assert torch.allclose(still, references[:, None, :].expand_as(still))


def test_padded_slices_do_not_change_real_outputs():
    attention = make_attention().eval()
    short_length, padded_length = 13, 20
    short = torch.randn(1, short_length, D_MODEL)
    batch = 100.0 * torch.randn(2, padded_length, D_MODEL)  # garbage in the padding
    batch[0, :short_length] = short[0]
    batch[0, short_length + 2] = float("nan")
    padding_mask = torch.zeros(2, padded_length, dtype=torch.bool)
    padding_mask[0, short_length:] = True
    with torch.no_grad():
        alone = attention(short)
        together = attention(batch, padding_mask)
        full_alone = attention(batch[1:])
    assert torch.isfinite(together).all()
    torch.testing.assert_close(together[0, :short_length], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together[1], full_alone[0], rtol=1e-4, atol=1e-5)


def test_fully_padded_sequence_gives_finite_output():
    attention = make_attention()
    padding_mask = torch.zeros(2, 6, dtype=torch.bool)
    padding_mask[1] = True
    out = attention(torch.randn(2, 6, D_MODEL), padding_mask)
    assert torch.isfinite(out).all()


def test_finite_under_bfloat16_autocast():
    attention = make_attention()
    x = torch.randn(2, 19, D_MODEL)
    padding_mask = torch.zeros(2, 19, dtype=torch.bool)
    padding_mask[0, 11:] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(x, padding_mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in attention.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_runs_in_bfloat16_and_float64_parameters():
    for dtype in (torch.bfloat16, torch.float64):
        attention = make_attention().to(dtype)
        out = attention(torch.randn(2, 9, D_MODEL, dtype=dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
