"""The joint step on tiny models: finite L_intra, L_inter and L_mask, each sending gradients exactly to the parts
it should; frozen parts receive none."""

from __future__ import annotations

import pytest
import torch

from jointssl.pretrain import JointSSL

TINY = dict(
    backbone="test_resnet", d_model=32, projection_hidden_dim=32, projection_dim=16, num_prototypes=[12],
    num_prototypes_3d=[6], aggregator_layers=2, aggregator_heads=4, aggregator_ffn_dim=48, intra_slices_per_volume=3,
)


def make_batch(batch_images: int = 4, batch_volumes: int = 3, num_slices: int = 8, size: int = 32) -> dict:
    torch.manual_seed(0)
    padding = torch.zeros(batch_volumes, num_slices, dtype=torch.bool)
    padding[0, 5:] = True  # a short volume: 5 real slices, 3 padded
    views = torch.randn(batch_volumes, 2, num_slices, 1, size, size)
    views[padding.unsqueeze(1).expand(-1, 2, -1)] = 0.0
    return {
        "images": {
            "crops": [torch.randn(batch_images, 1, size, size), torch.randn(batch_images, 1, size, size),
                      torch.randn(batch_images, 1, 16, 16)],
            "index": torch.arange(batch_images),
            "source": ["a"] * batch_images,
        },
        "volumes": {
            "views": views, "padding_mask": padding, "index": torch.arange(100, 100 + batch_volumes),
            "source": ["v"] * batch_volumes,
        },
    }


def to_float64(batch: dict) -> dict:
    convert = lambda x: x.double() if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
    return {stream: {k: [convert(c) for c in v] if isinstance(v, list) else convert(v) for k, v in fields.items()}
            for stream, fields in batch.items()}


def grads_by_part(model: JointSSL) -> dict[str, bool]:
    parts = {}
    for name in ("encoder", "intra", "aggregator", "inter", "mask_decoder"):
        module = getattr(model, name)
        parts[name] = any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    parts["mask_token"] = model.aggregator.mask_token.grad is not None and bool(model.aggregator.mask_token.grad.abs().sum() > 0)
    return parts


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ((1, 0, 0), {"encoder", "intra"}),
        ((0, 1, 0), {"encoder", "aggregator", "inter"}),
        ((0, 0, 1), {"encoder", "aggregator", "mask_decoder", "mask_token"}),
        ((1, 1, 1), {"encoder", "intra", "aggregator", "inter", "mask_decoder", "mask_token"}),
    ],
    ids=["intra", "inter", "mask", "joint"],
)
def test_each_loss_reaches_its_parts(weights: tuple[int, int, int], expected: set[str]) -> None:
    intra, inter, mask = weights
    model = JointSSL(**TINY, intra_weight=intra, inter_weight=inter, mask_weight=mask)
    out = model.compute_losses(make_batch())
    for name, weight in zip(("intra", "inter", "mask"), weights):
        assert (name in out) == (weight > 0)
        if weight:
            assert torch.isfinite(out[name]), name
    out["loss"].backward()
    reached = {part for part, has_grad in grads_by_part(model).items() if has_grad}
    assert reached == expected


def test_frozen_encoder_receives_no_gradient_and_keeps_batchnorm_statistics() -> None:
    """Stage 2 of the staged recipe: f_intra frozen, L_mask only."""
    model = JointSSL(**TINY, intra_weight=0, inter_weight=0, mask_weight=1, freeze=["encoder"])
    model.train()
    bn = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    running_mean = bn.running_mean.clone()
    out = model.compute_losses(make_batch())
    out["loss"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert torch.equal(bn.running_mean, running_mean)
    assert grads_by_part(model)["mask_decoder"]


def test_padded_slices_do_not_enter_the_encoder() -> None:
    model = JointSSL(**TINY)
    seen = []
    model.encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    batch = make_batch()
    model.compute_losses(batch)
    real = int((~batch["volumes"]["padding_mask"]).sum())
    crops = sum(c.shape[0] for c in batch["images"]["crops"])
    # One pass per resolution: 32-px global crops + both volume views together, then 16-px local crops.
    assert sorted(seen) == sorted([2 * 4 + 2 * real, 4])
    assert sum(seen) == crops + 2 * real


def test_chunked_checkpointed_step_matches_plain_step() -> None:
    plain = JointSSL(**TINY, aggregator_dropout=0.0)
    chunked = JointSSL(**TINY, aggregator_dropout=0.0, slice_chunk_size=7, checkpoint_slices=True)
    chunked.load_state_dict(plain.state_dict())
    plain.eval(), chunked.eval()  # chunked BatchNorm would see other batch statistics in train mode
    # Float64: the per-volume standardisation of f_inter's tokens divides by the slices' small spread, which
    # magnifies float32 summation-order differences (chunks vs one pass) to ~2e-5 in the encoder's gradients.
    plain.double(), chunked.double()
    torch.manual_seed(1)
    a = plain.compute_losses(to_float64(make_batch()))
    torch.manual_seed(1)
    b = chunked.compute_losses(to_float64(make_batch()))
    for name in ("intra", "inter", "mask"):
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    a["loss"].backward(), b["loss"].backward()
    for (name, p), q in zip(plain.encoder.named_parameters(), chunked.encoder.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_deepcluster_joint_step_uses_memory_banks() -> None:
    model = JointSSL(**{**TINY, "num_prototypes": [5, 4]}, method="deepcluster")
    model.intra.attach_memory(dataset_size=200, bank_size=50)
    model.inter.attach_memory(dataset_size=200, bank_size=10)
    batch = make_batch()
    out = model.compute_losses(batch)
    assert all(torch.isfinite(out[n]) for n in ("intra", "inter", "mask"))
    assert (model.intra.memory.indices >= 0).sum() == 4
    assert set(model.inter.memory.indices[model.inter.memory.indices >= 0].tolist()) == {100, 101, 102}
    out["loss"].backward()
    assert not any(p.requires_grad for p in model.intra.prototypes.parameters())


def test_deepcluster_state_loads_into_a_module_without_data() -> None:
    """A DeepCluster-v2 state_dict (memory banks included) loads strictly into a fresh module, as
    `JointSSL.load_from_checkpoint` does before any data is attached."""
    model = JointSSL(**{**TINY, "num_prototypes": [5, 4]}, method="deepcluster")
    model.intra.attach_memory(dataset_size=200, bank_size=50)
    model.inter.attach_memory(dataset_size=200, bank_size=10)
    model.compute_losses(make_batch())
    fresh = JointSSL(**{**TINY, "num_prototypes": [5, 4]}, method="deepcluster")
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh.inter.memory.indices, model.inter.memory.indices)
    assert fresh.intra.memory.embeddings.shape == model.intra.memory.embeddings.shape
