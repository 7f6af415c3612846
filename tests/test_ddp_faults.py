"""A failing rank ends the whole 2-process CPU DDP job with its error, promptly, and leaves no process behind:
a rank whose DataLoader worker raises, and a rank whose training step raises. Faults are injected by the test-only
classes of tests/fault_injection.py, named in the config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.fault_injection import INJECTED_DATA_FAULT, INJECTED_STEP_FAULT

pytestmark = pytest.mark.ddp

#: A failing job must be over (every rank gone) within this time from its start, start-up included (~8 s).
DEADLINE_S = 60.0
MODEL = {"backbone": "test_resnet", "d_model": 32, "projection_hidden_dim": 64, "projection_dim": 16,
         "num_prototypes": [10], "freeze_prototypes_steps": 0, "warmup_epochs": 0}


def ddp_config(tmp_path: Path, model: dict[str, Any], data: dict[str, Any]) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 6, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run")},
        "model": model,
        "data": {
            "class_path": data.get("class_path", "jointssl.data.JointDataModule"),
            "init_args": {
                "synthetic": {"root": str(tmp_path / "data"), "num_images": 64, "image_size": 40},
                "batch_size": 4, "num_workers": 0, "global_crop_size": 32, "local_crop_size": 16,
                **data.get("init_args", {}),
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_failing_job(config: Path) -> tuple[int, str, float]:
    """`jointssl fit` under 2-process DDP in a session of its own; returns exit code, output and the time until
    the launcher exited. Fails if any process of the job is still alive shortly after."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    start = time.monotonic()
    job = subprocess.Popen(
        [str(Path(sys.executable).parent / "jointssl"), "fit", "--config", str(config)],
        cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output, _ = job.communicate(timeout=DEADLINE_S + 60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        output, _ = job.communicate()
        pytest.fail(f"the job hung (killed after {DEADLINE_S + 60:.0f} s):\n{output[-4000:]}")
    elapsed = time.monotonic() - start
    assert _session_empty(job.pid, grace_s=5.0), "processes of the job (a rank or DataLoader worker) outlived it"
    return job.returncode, output, elapsed


def _session_empty(session: int, grace_s: float) -> bool:
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(session, 0)  # the job's process group: the launcher (rank 0) and everything it started
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(session, signal.SIGKILL)
    return False


def test_a_rank_whose_data_worker_raises_ends_the_job_with_that_error(tmp_path: Path):
    config = ddp_config(
        tmp_path,
        {"class_path": "jointssl.pretrain.JointSSL", "init_args": MODEL},
        {"class_path": "tests.fault_injection.DataFaultModule",
         "init_args": {"num_workers": 1, "fail_rank": 1, "fail_after": 8}},
    )
    code, output, elapsed = run_failing_job(config)
    assert code != 0, output[-4000:]
    assert INJECTED_DATA_FAULT in output, output[-4000:]
    assert "DataLoader worker" in output  # the error says where it happened
    assert elapsed < DEADLINE_S, f"took {elapsed:.1f} s"
    print(f"data-worker fault on rank 1: job ended with code {code} after {elapsed:.1f} s")


@pytest.mark.parametrize("fail_rank", [1, 0])
def test_a_rank_whose_training_step_raises_ends_the_job_with_that_error(tmp_path: Path, fail_rank: int):
    config = ddp_config(
        tmp_path,
        {"class_path": "tests.fault_injection.StepFaultSSL",
         "init_args": {**MODEL, "fail_rank": fail_rank, "fail_step": 2}},
        {},
    )
    code, output, elapsed = run_failing_job(config)
    assert code != 0, output[-4000:]
    assert f"{INJECTED_STEP_FAULT} on rank {fail_rank}" in output, output[-4000:]
    assert elapsed < DEADLINE_S, f"took {elapsed:.1f} s"
    print(f"training-step fault on rank {fail_rank}: job ended with code {code} after {elapsed:.1f} s")
