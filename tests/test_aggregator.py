"""SliceAggregator (f_inter), its pooling and mask token, and the MaskDecoder."""

from __future__ import annotations

import pytest
import torch

from jointssl.models.aggregator import MaskDecoder, SliceAggregator

D_MODEL = 32


def make_aggregator(seed: int = 0, **kwargs) -> SliceAggregator:
    torch.manual_seed(seed)
    options = {"d_model": D_MODEL, "num_layers": 2, "num_heads": 4, "ffn_dim": 48}
    options.update(kwargs)
    return SliceAggregator(**options)


def trailing_padding(lengths: list[int], num_slices: int) -> torch.Tensor:
    return torch.arange(num_slices)[None, :] >= torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("num_slices", [1, 2, 7, 16])
def test_token_and_volume_feature_shapes(num_slices):
    aggregator = make_aggregator()
    tokens = aggregator(torch.randn(3, num_slices, D_MODEL))
    assert tokens.shape == (3, num_slices, D_MODEL)
    volume = aggregator.pool(tokens)
    assert volume.shape == (3, D_MODEL)
    torch.testing.assert_close(volume.norm(dim=-1), torch.ones(3))


def test_padded_slices_change_neither_tokens_nor_volume_feature():
    aggregator = make_aggregator().eval()
    lengths, num_slices = [11, 20, 5], 20
    padding_mask = trailing_padding(lengths, num_slices)
    batch = torch.where(
        padding_mask[..., None],
        50.0 * torch.randn(3, num_slices, D_MODEL),
        torch.randn(3, num_slices, D_MODEL),
    )
    with torch.no_grad():
        tokens = aggregator(batch, padding_mask)
        volumes = aggregator.pool(tokens, padding_mask)
        for row, length in enumerate(lengths):
            alone = aggregator(batch[row : row + 1, :length])
            torch.testing.assert_close(tokens[row, :length], alone[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(volumes[row], aggregator.pool(alone)[0], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(tokens).all()


def test_pool_is_the_normalised_mean_of_real_tokens_only():
    aggregator = make_aggregator()
    tokens = torch.randn(2, 6, D_MODEL)
    padding_mask = trailing_padding([4, 6], 6)
    tokens[0, 4:] = float("inf")
    volume = aggregator.pool(tokens, padding_mask)
    expected = torch.nn.functional.normalize(torch.stack([tokens[0, :4].mean(0), tokens[1].mean(0)]), dim=-1)
    torch.testing.assert_close(volume, expected)


def test_apply_mask_replaces_masked_slices_and_trains_the_mask_token():
    aggregator = make_aggregator()
    z = torch.randn(2, 8, D_MODEL, requires_grad=True)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [1, 5]] = True
    mask[1, 3] = True
    masked = aggregator.apply_mask(z, mask)
    assert torch.equal(masked[mask], aggregator.mask_token.detach().expand(3, D_MODEL))
    assert torch.equal(masked[~mask], z.detach()[~mask])
    aggregator(masked).sum().backward()
    assert aggregator.mask_token.grad is not None and aggregator.mask_token.grad.abs().sum() > 0
    assert (z.grad[mask] == 0).all() and z.grad[~mask].abs().sum() > 0
    with pytest.raises(ValueError, match="boolean"):
        aggregator.apply_mask(z, mask.float())


def test_gradient_reaches_every_parameter():
    aggregator = make_aggregator(dropout=0.0)
    z = torch.randn(2, 10, D_MODEL)
    padding_mask = trailing_padding([10, 7], 10)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 2] = True
    tokens = aggregator(aggregator.apply_mask(z, mask), padding_mask)
    (aggregator.pool(tokens, padding_mask) @ torch.randn(D_MODEL)).sum().backward()
    missing = [name for name, p in aggregator.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_mask_decoder_maps_tokens_to_embedding_space():
    assert MaskDecoder(D_MODEL)(torch.randn(2, 5, D_MODEL)).shape == (2, 5, D_MODEL)
    assert MaskDecoder(D_MODEL, embedding_dim=16)(torch.randn(2, 5, D_MODEL)).shape == (2, 5, 16)


def test_finite_under_bfloat16_autocast():
    aggregator = make_aggregator()
    z = torch.randn(2, 13, D_MODEL)
    padding_mask = trailing_padding([13, 6], 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = aggregator(z, padding_mask)
        volume = aggregator.pool(tokens, padding_mask)
    assert torch.isfinite(tokens).all() and torch.isfinite(volume).all()
    volume.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in aggregator.parameters() if p.grad is not None)


def test_dropout_only_in_training():
    aggregator = make_aggregator(dropout=0.5)
    z = torch.randn(2, 9, D_MODEL)
    aggregator.train()
    assert not torch.allclose(aggregator(z), aggregator(z))
    aggregator.eval()
    with torch.no_grad():
        assert torch.equal(aggregator(z), aggregator(z))


@pytest.mark.parametrize("num_slices", [64, 37])
def test_paper_size_default_runs(num_slices):
    torch.manual_seed(0)
    aggregator = SliceAggregator().eval()  # 640 wide, 4 layers, 8 heads, FFN 720
    assert len(aggregator.layers) == 4 and aggregator.mask_token.shape == (640,)
    padding_mask = trailing_padding([num_slices, num_slices - 9], num_slices)
    with torch.no_grad():
        tokens = aggregator(torch.randn(2, num_slices, 640), padding_mask)
        volume = aggregator.pool(tokens, padding_mask)
    assert tokens.shape == (2, num_slices, 640) and torch.isfinite(tokens).all()
    torch.testing.assert_close(volume.norm(dim=-1), torch.ones(2))
