"""f_intra: stage selection, per-stage normalisation, chunked and checkpointed forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from jointssl.models import SliceEncoder


def _seeded_encoder(backbone: str = "test_resnet", **kwargs) -> SliceEncoder:
    torch.manual_seed(0)
    return SliceEncoder(backbone, **kwargs)


@pytest.mark.parametrize(
    ("backbone", "expected_dims"),
    [
        ("test_resnet", [32, 48, 192, 96]),
        ("test_efficientnet", [24, 32, 48, 64]),
        ("resnet50", [256, 512, 1024, 2048]),
    ],
)
def test_output_shape_and_feature_dims(backbone: str, expected_dims: list[int]) -> None:
    encoder = _seeded_encoder(backbone, d_model=40).eval()
    assert encoder.feature_dims == expected_dims
    assert encoder.proj.in_features == sum(expected_dims)
    assert encoder.d_model == 40
    assert encoder.backbone_name == backbone
    with torch.no_grad():
        out = encoder(torch.randn(3, 1, 32, 32))
    assert out.shape == (3, 40)
    assert torch.isfinite(out).all()


def test_stem_is_excluded() -> None:
    encoder = _seeded_encoder()
    # timm's features_only ResNet also returns the stride-2 stem; f_intra uses only reductions >= 4.
    assert encoder.backbone.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert encoder.stage_positions == [1, 2, 3, 4]


def test_each_stage_is_pooled_and_l2_normalised() -> None:
    encoder = _seeded_encoder().eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        features = encoder.multiscale_features(x)
        stage_maps = encoder.backbone(x)
    assert features.shape == (4, sum(encoder.feature_dims))
    stage_vectors = features.split(encoder.feature_dims, dim=1)
    for vector, position in zip(stage_vectors, encoder.stage_positions):
        torch.testing.assert_close(vector.norm(dim=1), torch.ones(4))
        expected = F.normalize(stage_maps[position].mean(dim=(2, 3)), dim=1)
        torch.testing.assert_close(vector, expected)
    # The embedding is the Linear map of exactly these features.
    torch.testing.assert_close(encoder(x), encoder.proj(features))


def test_in_chans_and_drop_path_are_passed_to_timm() -> None:
    encoder = _seeded_encoder(in_chans=3, drop_path_rate=0.1)
    first_conv = next(m for m in encoder.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 3
    assert any(type(m).__name__ == "DropPath" for m in encoder.modules())
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 640)


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_chunked_equals_unchunked_in_eval_mode(use_checkpoint: bool) -> None:
    encoder = _seeded_encoder(d_model=16).eval()
    x = torch.randn(7, 1, 32, 32)
    whole = encoder(x)
    chunked = encoder.forward_chunked(x, chunk_size=3, checkpoint=use_checkpoint)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    # Gradients flow through the checkpointed path as through the plain one.
    chunked.sum().backward()
    assert encoder.proj.weight.grad is not None


def test_checkpoint_gives_same_grads_and_bn_stats_in_train_mode() -> None:
    # drop_path exercises the RNG replay of the recomputation as well.
    plain = _seeded_encoder(d_model=16, drop_path_rate=0.2).train()
    checkpointed = copy.deepcopy(plain)
    x = torch.randn(8, 1, 32, 32)
    weights = torch.randn(8, 16)

    backbone_calls = []
    checkpointed.backbone.register_forward_hook(lambda *_: backbone_calls.append(1))

    outputs = {}
    for name, model, use_checkpoint in [("plain", plain, False), ("ckpt", checkpointed, True)]:
        torch.manual_seed(123)
        out = model.forward_chunked(x, chunk_size=3, checkpoint=use_checkpoint)
        (out * weights).sum().backward()
        outputs[name] = out.detach()

    # 3 chunks forward + 3 recomputations in backward: checkpointing really happened.
    assert len(backbone_calls) == 6
    torch.testing.assert_close(outputs["ckpt"], outputs["plain"])
    for (name, p_plain), (_, p_ckpt) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(p_ckpt.grad, p_plain.grad, rtol=1e-5, atol=1e-6, msg=name)
    # Running statistics were updated once per chunk, exactly as without checkpointing.
    bn = checkpointed.backbone.bn1
    assert int(bn.num_batches_tracked) == 3
    for (name, b_plain), (_, b_ckpt) in zip(plain.named_buffers(), checkpointed.named_buffers()):
        assert torch.equal(b_ckpt, b_plain), name


def test_checkpoint_without_grad_is_plain_chunking() -> None:
    encoder = _seeded_encoder(d_model=16).train()
    x = torch.randn(5, 1, 64, 64)  # 64 px: the last chunk holds one image, train-mode BN needs 2x2 maps then
    with torch.no_grad():
        out = encoder.forward_chunked(x, chunk_size=2, checkpoint=True)
    assert out.shape == (5, 16)
    assert int(encoder.backbone.bn1.num_batches_tracked) == 3


def test_invalid_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        _seeded_encoder().forward_chunked(torch.randn(2, 1, 32, 32), chunk_size=0)
