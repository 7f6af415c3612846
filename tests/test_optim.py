"""LARS (timm's Lars in jointssl's two decay groups) against hand-computed steps, and the warm-up + cosine schedule."""

from __future__ import annotations

import io
import itertools
import math
import pickle

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from jointssl.optim import WarmupCosine, decay_groups, lars, upgrade_single_group_lars, warmup_cosine_lambda


def _param(values: list[list[float]] | list[float]) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values, dtype=torch.float64))


def test_lars_two_steps_match_hand_computation() -> None:
    weight = _param([[3.0, 4.0]])  # ||p|| = 5
    lr, wd, eta, momentum, eps = 0.5, 0.1, 1e-3, 0.9, 1e-8
    optimizer = lars([weight], lr=lr, momentum=momentum, weight_decay=wd, trust_coefficient=eta)

    weight.grad = torch.tensor([[0.6, 0.8]], dtype=torch.float64)  # ||g|| = 1
    optimizer.step()
    trust1 = eta * 5.0 / (1.0 + wd * 5.0 + eps)
    d1 = [trust1 * (0.6 + wd * 3.0), trust1 * (0.8 + wd * 4.0)]
    p1 = [3.0 - lr * d1[0], 4.0 - lr * d1[1]]
    torch.testing.assert_close(weight.data, torch.tensor([p1], dtype=torch.float64), rtol=0, atol=1e-12)

    weight.grad = torch.tensor([[0.0, -2.0]], dtype=torch.float64)  # ||g|| = 2
    optimizer.step()
    p_norm = math.hypot(*p1)
    trust2 = eta * p_norm / (2.0 + wd * p_norm + eps)
    d2 = [trust2 * (0.0 + wd * p1[0]), trust2 * (-2.0 + wd * p1[1])]
    buf = [momentum * d1[0] + d2[0], momentum * d1[1] + d2[1]]
    p2 = [p1[0] - lr * buf[0], p1[1] - lr * buf[1]]
    torch.testing.assert_close(weight.data, torch.tensor([p2], dtype=torch.float64), rtol=0, atol=1e-12)


def test_one_dimensional_params_get_no_decay_and_no_adaptation() -> None:
    bias = _param([1.0, -2.0])
    optimizer = lars([bias], lr=0.5, momentum=0.9, weight_decay=0.5, trust_coefficient=1e-3)
    bias.grad = torch.tensor([0.2, 0.4], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(bias.data, torch.tensor([1.0 - 0.1, -2.0 - 0.2], dtype=torch.float64))



def test_bias_and_norm_params_follow_plain_sgd() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    reference = [p.detach().clone().requires_grad_(True) for p in model.parameters() if p.ndim == 1]
    optimizer = lars(model.parameters(), lr=0.3, momentum=0.9, weight_decay=0.1)
    sgd = torch.optim.SGD(reference, lr=0.3, momentum=0.9, weight_decay=0.0)
    one_d = [p for p in model.parameters() if p.ndim == 1]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in one_d]
        for p, r, g in zip(one_d, reference, grads):
            p.grad, r.grad = g.clone(), g.clone()
        model[0].weight.grad = torch.randn_like(model[0].weight)
        optimizer.step()
        sgd.step()
    for p, r in zip(one_d, reference):
        torch.testing.assert_close(p.data, r.data)


def test_zero_trust_coefficient_is_plain_sgd_with_weight_decay() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    reference = nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    optimizer = lars(model.parameters(), lr=0.3, momentum=0.9, weight_decay=0.1, trust_coefficient=0.0)
    sgd = torch.optim.SGD(
        [
            {"params": [reference.weight], "weight_decay": 0.1},
            {"params": [reference.bias], "weight_decay": 0.0},
        ],
        lr=0.3,
        momentum=0.9,
    )
    for _ in range(3):
        for p, r in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        optimizer.step()
        sgd.step()
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.data, r.data)


def test_params_without_grad_stay_put_and_a_zero_grad_gets_only_weight_decay() -> None:
    untouched = _param([[1.0, 2.0]])
    zero_grad = _param([[1.0, 2.0]])
    optimizer = lars([untouched, zero_grad], lr=1.0, weight_decay=0.5)
    zero_grad.grad = torch.zeros_like(zero_grad)
    optimizer.step()
    assert torch.equal(untouched.data, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    assert untouched not in optimizer.state
    # timm's Lars: trust 1 for a zero gradient, so d = weight_decay * p (SwAV's LARC skipped it; jointssl never
    # steps on zero gradients: frozen parts and skipped steps have grad None).
    torch.testing.assert_close(zero_grad.data, torch.tensor([[0.5, 1.0]], dtype=torch.float64))


def test_zero_weight_decay_is_still_lars() -> None:
    weight = _param([[3.0, 4.0]])
    optimizer = lars([weight], lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=0.1)
    weight.grad = torch.tensor([[0.6, 0.8]], dtype=torch.float64)  # ||g|| = 1, ||p|| = 5: trust 0.5
    optimizer.step()
    torch.testing.assert_close(weight.data, torch.tensor([[3.0 - 0.3, 4.0 - 0.4]], dtype=torch.float64))


def test_state_dict_round_trip_resumes_identically() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    optimizer = lars(model.parameters(), lr=0.2)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(2)]
    for p, g in zip(model.parameters(), grads[0]):
        p.grad = g
    optimizer.step()

    clone = nn.Linear(5, 3)
    clone.load_state_dict(model.state_dict())
    clone_optimizer = lars(clone.parameters(), lr=0.2)
    # Through a serialised checkpoint: a live state_dict shares its momentum buffers with the optimizer.
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    clone_optimizer.load_state_dict(torch.load(buffer, weights_only=True))
    for module, opt in [(model, optimizer), (clone, clone_optimizer)]:
        for p, g in zip(module.parameters(), grads[1]):
            p.grad = g.clone()
        opt.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def pre_lars_layout(optimizer_state: dict, scheduler_state: dict, parameters: list[nn.Parameter],
                    groups: list[list[nn.Parameter]]) -> dict:
    """What jointssl's own LARS class saved before timm's Lars (2026-12-02): one group with every trainable
    parameter in model order, its own keys, the state keyed by that order; a LambdaLR over that one group."""
    index_now = {id(p): i for i, p in enumerate(q for group in groups for q in group)}
    group = optimizer_state["param_groups"][0]
    old_group = {"lr": group["lr"], "momentum": group["momentum"], "weight_decay": group["weight_decay"],
                 "trust_coefficient": group["trust_coeff"], "clip": False, "exclude_bias_and_norm": True, "eps": 1e-8,
                 "initial_lr": group["initial_lr"], "params": list(range(len(parameters)))}
    state = {i: optimizer_state["state"][index_now[id(p)]] for i, p in enumerate(parameters)
             if index_now[id(p)] in optimizer_state["state"]}
    scheduler = {**scheduler_state, "base_lrs": scheduler_state["base_lrs"][:1],
                 "_last_lr": scheduler_state["_last_lr"][:1], "lr_lambdas": scheduler_state["lr_lambdas"][:1]}
    return {"optimizer_states": [{"state": state, "param_groups": [old_group]}], "lr_schedulers": [scheduler]}


def test_a_checkpoint_of_the_one_group_lars_resumes_as_the_two_group_one() -> None:
    torch.manual_seed(0)
    # Weights and biases interleaved, so the old order (model order) and the new (weights, then biases) differ.
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    frozen = model[1].weight
    frozen.requires_grad_(False)  # not trainable: in neither layout
    trainable = [p for p in model.parameters() if p.requires_grad]

    def build(module):
        opt = lars(module.parameters(), lr=0.3, weight_decay=1e-2)
        return opt, LambdaLR(opt, warmup_cosine_lambda(1, 6, 0.1))

    optimizer, scheduler = build(model)
    grads = [[torch.randn_like(p) for p in trainable] for _ in range(4)]

    def step(module, opt, sched, grad_list):
        for p, g in zip([q for q in module.parameters() if q.requires_grad], grad_list):
            p.grad = g.clone()
        opt.step()
        sched.step()

    for g in grads[:2]:
        step(model, optimizer, scheduler, g)
    checkpoint = pre_lars_layout(optimizer.state_dict(), scheduler.state_dict(), trainable,
                                 [group["params"] for group in optimizer.param_groups])
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)  # serialised: a live state_dict shares its buffers with the optimizer
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    clone = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    clone.load_state_dict(model.state_dict())
    clone[1].weight.requires_grad_(False)
    assert upgrade_single_group_lars(checkpoint, clone.parameters())
    assert not upgrade_single_group_lars(checkpoint, clone.parameters())  # already the current layout
    clone_optimizer, clone_scheduler = build(clone)
    clone_optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    clone_scheduler.load_state_dict(checkpoint["lr_schedulers"][0])
    for g in grads[2:]:
        step(model, optimizer, scheduler, g)
        step(clone, clone_optimizer, clone_scheduler, g)
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert [g["lr"] for g in clone_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    # Another number of trainable parameters: left alone, for torch to report.
    other = pre_lars_layout(optimizer.state_dict(), scheduler.state_dict(), trainable,
                            [group["params"] for group in optimizer.param_groups])
    assert not upgrade_single_group_lars(other, nn.Linear(2, 2).parameters())


def test_decay_groups() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    decayed, not_decayed = decay_groups(model.parameters(), weight_decay=0.05)
    assert decayed["weight_decay"] == 0.05 and not_decayed["weight_decay"] == 0.0
    assert [p.shape for p in decayed["params"]] == [(3, 4)]
    assert len(not_decayed["params"]) == 3


def test_warmup_cosine_schedule_values() -> None:
    parameter = nn.Parameter(torch.zeros(2, 2))
    optimizer = lars([parameter], lr=2.0)
    scheduler = LambdaLR(optimizer, warmup_cosine_lambda(warmup_steps=10, total_steps=110, min_lr_ratio=0.1))
    lrs = []
    for _ in range(120):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(2.0 / 10)  # ~0 at the first step
    assert lrs[4] == pytest.approx(2.0 * 5 / 10)
    assert lrs[9] == pytest.approx(2.0)  # end of warm-up
    assert lrs[10] == pytest.approx(2.0)  # cosine starts at the peak
    assert lrs[60] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half-way through the cosine
    assert lrs[110] == pytest.approx(2.0 * 0.1)  # end
    assert lrs[119] == pytest.approx(2.0 * 0.1)  # stays at the floor
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_schedule_without_warmup_and_pickling() -> None:
    schedule = WarmupCosine(warmup_steps=0, total_steps=4)
    assert [schedule(s) for s in range(5)] == pytest.approx(
        [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4), 0.0]
    )
    restored = pickle.loads(pickle.dumps(schedule))
    assert restored(2) == schedule(2)
    with pytest.raises(ValueError):
        WarmupCosine(warmup_steps=5, total_steps=4)


def test_scheduler_state_restores() -> None:
    optimizer = lars([nn.Parameter(torch.zeros(2, 2))], lr=1.0)
    scheduler = LambdaLR(optimizer, warmup_cosine_lambda(3, 20))
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_optimizer = lars([nn.Parameter(torch.zeros(2, 2))], lr=1.0)
    fresh = LambdaLR(fresh_optimizer, warmup_cosine_lambda(3, 20))
    fresh.load_state_dict(state)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    assert fresh.last_epoch == 7
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
