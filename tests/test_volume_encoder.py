"""VolumeEncoder (f_intra + f_inter + pooling) and AggregatorConfig."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from jointssl.models import AggregatorConfig, SliceAggregator, SliceEncoder, VolumeEncoder

D_MODEL = 16


def _volume_encoder(**kwargs) -> VolumeEncoder:
    torch.manual_seed(0)
    config = AggregatorConfig(num_layers=1, num_heads=2, ffn_dim=32, dropout=0.0, downsample=2)
    return VolumeEncoder.build("test_resnet", D_MODEL, config, **kwargs).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    volumes = torch.randn(3, 6, 1, 32, 32)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    padding[2, 1:] = True
    # Padding slices hold values no real slice has: if one reached the CNN its embedding would show it.
    volumes[padding] = float("nan")
    return volumes, padding


class _CountingEncoder(nn.Module):
    """Wraps f_intra and records the images it is given."""

    def __init__(self, encoder: SliceEncoder) -> None:
        super().__init__()
        self.inner = encoder
        self.d_model = encoder.d_model
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return self.inner(x)


def test_padding_slices_never_reach_the_cnn_and_embed_to_zeros() -> None:
    model = _volume_encoder()
    counting = _CountingEncoder(model.encoder)
    model.encoder = counting
    volumes, padding = _batch()
    with torch.no_grad():
        z = model.embed_slices(volumes, padding)
    assert z.shape == (3, 6, D_MODEL)
    (seen,) = counting.seen
    assert seen.shape[0] == int((~padding).sum())
    assert torch.isfinite(seen).all()
    assert torch.equal(z[padding], torch.zeros_like(z[padding]))
    assert torch.isfinite(z).all()
    # Each real slice embeds as it does on its own.
    with torch.no_grad():
        alone = counting.inner(volumes[1, 2:3])
    torch.testing.assert_close(z[1, 2:3], alone, rtol=1e-5, atol=1e-6)


def test_forward_is_embed_then_aggregate_then_pool() -> None:
    model = _volume_encoder()
    volumes, padding = _batch()
    with torch.no_grad():
        z = model.embed_slices(volumes, padding)
        expected = model.pool(model.aggregate(z, padding), padding)
        assert torch.equal(model(volumes, padding), expected)
        # The pooling is f_inter's own.
        assert torch.equal(expected, model.aggregator.pool(model.aggregator(z, padding), padding))
    assert expected.shape == (3, D_MODEL)
    torch.testing.assert_close(expected.norm(dim=1), torch.ones(3))
    # Without padding every slice is real.
    full = torch.randn(2, 4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(full), model(full, torch.zeros(2, 4, dtype=torch.bool)))


def test_chunked_encoding_matches_in_eval_mode() -> None:
    volumes, padding = _batch()
    with torch.no_grad():
        whole = _volume_encoder()(volumes, padding)
        chunked = _volume_encoder(slice_chunk_size=2)(volumes, padding)
    # Only float summation order differs (chunked convolutions), amplified a little by f_inter.
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)


def test_encode_batches_each_resolution_once_and_keeps_input_order() -> None:
    model = _volume_encoder()
    counting = _CountingEncoder(model.encoder)
    model.encoder = counting
    images = [torch.randn(2, 1, 32, 32), torch.randn(3, 1, 64, 64), torch.randn(1, 1, 32, 32)]
    with torch.no_grad():
        out = model.encode(images)
    assert [o.shape[0] for o in out] == [2, 3, 1]
    assert sorted(seen.shape[0] for seen in counting.seen) == [3, 3]
    with torch.no_grad():
        torch.testing.assert_close(out[2], counting.inner(images[2]), rtol=1e-5, atol=1e-6)


def test_without_aggregator_only_f_intra_is_available() -> None:
    torch.manual_seed(0)
    model = VolumeEncoder.build("test_resnet", D_MODEL, None).eval()
    assert model.aggregator is None
    volumes, padding = _batch()
    with torch.no_grad():
        z = model.embed_slices(volumes, padding)
    with pytest.raises(ValueError, match="no slice aggregator"):
        model.aggregate(z, padding)


def test_mismatched_widths_are_refused() -> None:
    encoder = SliceEncoder("test_resnet", d_model=D_MODEL)
    with pytest.raises(ValueError, match="width"):
        VolumeEncoder(encoder, SliceAggregator(d_model=D_MODEL * 2, num_heads=2))


def test_aggregator_config_defaults_are_slice_aggregators() -> None:
    signature = inspect.signature(SliceAggregator)
    expected = {name: p.default for name, p in signature.parameters.items() if name != "d_model"}
    assert AggregatorConfig().asdict() == expected


def test_aggregator_config_from_pretrain_hparams() -> None:
    hparams = {
        "aggregator_layers": 2, "aggregator_heads": 4, "aggregator_ffn_dim": 64, "aggregator_dropout": 0.2,
        "deformable_downsample": 3, "deformable_offset_scale": 1.5, "aggregator_input_norm": "volume",
        "deformable_max_points": 16, "backbone": "test_resnet",
    }
    config = AggregatorConfig.from_pretrain_hparams(hparams)
    assert config == AggregatorConfig(2, 4, 64, 0.2, 3, 1.5, "volume", 16)
    # Checkpoints written before input_norm existed were made with raw slice embeddings, and those written
    # before max_points with ceil(N / downsample) keys per query.
    old = {k: v for k, v in hparams.items() if k not in ("aggregator_input_norm", "deformable_max_points")}
    assert AggregatorConfig.from_pretrain_hparams(old).input_norm == "none"
    assert AggregatorConfig.from_pretrain_hparams(old).max_points is None
    with pytest.raises(KeyError, match="aggregator_heads"):  # the missing names are the error's argument
        AggregatorConfig.from_pretrain_hparams({k: v for k, v in hparams.items() if k != "aggregator_heads"})
    # Round trip through the exported form, also from an export written before input_norm.
    assert AggregatorConfig.from_dict(config.asdict()) == config
    legacy = {k: v for k, v in config.asdict().items() if k not in ("input_norm", "max_points")}
    assert AggregatorConfig.from_dict(legacy).input_norm == "none"
    assert AggregatorConfig.from_dict(legacy).max_points is None
    aggregator = config.build(D_MODEL)
    assert len(aggregator.layers) == 2 and aggregator.input_norm == "volume"
    assert all(layer.attention.max_points == 16 for layer in aggregator.layers)


def test_jointssl_defaults_describe_the_default_aggregator() -> None:
    from jointssl.pretrain import JointSSL

    defaults = {name: p.default for name, p in inspect.signature(JointSSL).parameters.items()}
    assert AggregatorConfig.from_pretrain_hparams(defaults) == AggregatorConfig()
