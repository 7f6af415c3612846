"""2 processes x batch B == 1 process x batch 2B, through Lightning's own DDP (gloo on CPU): the joint objective
(L_intra + L_inter + L_mask) for 6 optimizer steps across an epoch boundary, SwAV (with queues in use) and
DeepCluster-v2 (memory banks filled, k-means at both epoch starts). The per-step losses and the final weights must
agree. This is what catches a per-rank state that DDP silently overwrites (its default buffer broadcast replaced
every rank's queues and banks with rank 0's: loss differences of 3e-3 (SwAV) and 1.3 (DeepCluster) by step 6)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

STEPS, BATCH = 6, 4


def run_worker(method: str, devices: int, out_dir, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tests.lightning_equivalence_worker", "--method", method,
               "--devices", str(devices), "--batch", str(BATCH * 2 // devices), "--steps", str(STEPS),
               "--out", str(out_dir), *extra]
    # `ddp` re-executes this command line for rank 1: run it in its own process, never inside pytest.
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)


def train(method: str, devices: int, out_dir, *extra: str) -> dict:
    result = run_worker(method, devices, out_dir, *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out_dir / f"{method}_{devices}.pt", weights_only=True)


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["swav", "deepcluster"])
def test_two_processes_with_half_batches_train_like_one_process(method: str, tmp_path) -> None:
    single = train(method, 1, tmp_path)
    double = train(method, 2, tmp_path)
    assert single["global_step"] == double["global_step"] == STEPS
    assert len(single["losses"]) == len(double["losses"]) == STEPS
    for step, (one, two) in enumerate(zip(single["losses"], double["losses"])):
        assert set(one) == {"train/loss", "train/loss_intra", "train/loss_inter", "train/loss_mask", "train/lr"}
        # The linear scaling rule follows the global batch (2 x 4 = 1 x 8 samples): base_lr 0.05 x 8 / 16, then
        # the cosine schedule (no warm-up).
        assert two["train/lr"] == pytest.approx(one["train/lr"]) and one["train/lr"] <= 0.025 + 1e-9
        if step == 0:
            assert one["train/lr"] == pytest.approx(0.025)
        for name in one:
            assert two[name] == pytest.approx(one[name], abs=1e-4), f"step {step}: {name}"
    # The losses moved: the comparison is not between two untrained models.
    assert single["losses"][-1]["train/loss"] != pytest.approx(single["losses"][0]["train/loss"], abs=0.1)
    for name, weight in single["state"].items():
        torch.testing.assert_close(double["state"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.ddp
def test_a_non_finite_loss_on_one_rank_is_skipped_by_every_rank(tmp_path) -> None:
    # Rank 1 alone sees NaN at step 2: both ranks must skip it together (a lone skip would hang DDP).
    result = train("swav", 2, tmp_path, "--poison", "1:2")
    assert result["global_step"] == STEPS and result["skipped_steps"] == 1
    assert all(torch.isfinite(w).all() for w in result["state"].values())


@pytest.mark.ddp
def test_the_bad_step_limit_ends_every_rank_with_the_error(tmp_path) -> None:
    result = run_worker("swav", 2, tmp_path, "--poison", "1:2", "--max-bad-steps", "1")
    assert result.returncode != 0
    assert "NonFiniteTrainingError" in result.stderr and "L_intra" in result.stderr
