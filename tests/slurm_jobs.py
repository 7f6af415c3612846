"""Submitting the project's own sbatch templates to a Slurm cluster and watching them: shared by tests/test_slurm.py
and benchmarks/bench_slurm.py.

Jobs run a tiny joint pretraining (synthetic 2D images + 3D volumes, `test_resnet`, 32 px crops) through
scripts/slurm/pretrain_cpu.sbatch, so what runs is the same `srun jointssl fit --config ... --ckpt_path last`
launch that the GPU templates use.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT

CPU_TEMPLATE = REPO_ROOT / "scripts" / "slurm" / "pretrain_cpu.sbatch"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


def cluster_problem() -> str | None:
    """Why Slurm tests cannot run here (None when a cluster with idle nodes answers)."""
    for tool in ("sbatch", "sinfo", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} not on PATH"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%D %t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"sinfo failed: {error}"
    if result.returncode != 0:
        return f"no Slurm cluster answers: {result.stderr.strip() or result.stdout.strip()}"
    return None


def idle_nodes() -> int:
    result = subprocess.run(["sinfo", "-h", "-t", "idle", "-o", "%D"], capture_output=True, text=True, timeout=10)
    return sum(int(n) for n in result.stdout.split()) if result.returncode == 0 else 0


def tiny_joint_config(data_root: Path, max_steps: int, logger_yaml: str = "false") -> str:
    """YAML of a tiny joint SwAV pretraining (a step takes ~0.1-0.3 s on one CPU); `logger_yaml` is the value of
    `trainer.logger` (inline YAML)."""
    return f"""\
seed_everything: 0
trainer:
  max_steps: {max_steps}
  log_every_n_steps: 1
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger: {logger_yaml}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        save_last: true
model:
  class_path: jointssl.pretrain.JointSSL
  init_args:
    backbone: test_resnet
    d_model: 32
    projection_hidden_dim: 32
    projection_dim: 16
    num_prototypes: [8]
    num_prototypes_3d: [4]
    queue_length_3d: 0
    freeze_prototypes_steps: 2
    aggregator_layers: 1
    aggregator_heads: 4
    aggregator_ffn_dim: 48
    intra_slices_per_volume: 4
    warmup_epochs: 0
data:
  class_path: jointssl.data.JointDataModule
  init_args:
    synthetic:
      root: {data_root}
      num_images: 64
      image_size: 40
      num_volumes: 8
      volume_shape: [40, 40, 12]
    batch_size: 4
    volume_batch_size: 2
    num_workers: 0
    persistent_workers: false
    pin_memory: false
    global_crop_size: 32
    num_global_crops: 2
    local_crop_size: 16
    num_local_crops: 0
    num_slices: 6
    volume_size: 32
    volume_in_plane_size: 40
    validation_threads: 1
"""


def generate_tiny_data(data_root: Path) -> None:
    """The synthetic data of `tiny_joint_config`, made before submitting so that the ranks only read it."""
    from jointssl.data.synthetic import SyntheticData, generate_synthetic_data

    generate_synthetic_data(SyntheticData(root=str(data_root), num_images=64, image_size=40, num_volumes=8,
                                          volume_shape=(40, 40, 12)))


@dataclass
class Job:
    job_id: str
    log: Path
    submitted_at: float

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def submit(template: Path, workdir: Path, env: dict[str, str], sbatch_options: list[str], extra_args: list[str],
           job_name: str = "jointssl-test") -> Job:
    """`sbatch [options] TEMPLATE [extra jointssl args]` from the repository root; the log goes to workdir."""
    log = workdir / f"{job_name}.out"
    command = ["sbatch", "--parsable", f"--job-name={job_name}", f"--output={log}", *sbatch_options, str(template),
               *extra_args]
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
    return Job(job_id=result.stdout.strip().split(";")[0], log=log, submitted_at=started)


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, NodeList, ExitCode, ...); {} once Slurm forgot the job."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout))


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    """Poll `predicate()` until it returns something truthy; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def wait_for_state(job: Job, states: set[str], timeout: float) -> dict[str, str]:
    def reached() -> dict[str, str] | None:
        fields = job_fields(job.job_id)
        return fields if fields.get("JobState") in states else None

    try:
        return wait_for(reached, timeout, f"job {job.job_id} to reach {sorted(states)}")
    except TimeoutError as error:
        raise TimeoutError(f"{error}; now {job_fields(job.job_id).get('JobState')}; log:\n{job.text()[-3000:]}")


def wait_for_log(job: Job, pattern: str, timeout: float, after: int = 0) -> re.Match:
    """The first match of `pattern` in the job's log past character `after`; fails early if the job ended."""
    compiled = re.compile(pattern, re.MULTILINE)

    def found() -> re.Match | None:
        match = compiled.search(job.text(), after)
        if match is None and job_fields(job.job_id).get("JobState") in TERMINAL_STATES:
            match = compiled.search(job.text(), after)  # written just before the job ended
            if match is None:
                raise RuntimeError(f"job {job.job_id} ended without logging {pattern!r}; log:\n{job.text()[-3000:]}")
        return match

    try:
        return wait_for(found, timeout, f"{pattern!r} in the log of job {job.job_id}")
    except TimeoutError as error:
        raise TimeoutError(f"{error}; log:\n{job.text()[-3000:]}")


def cancel(job: Job) -> None:
    subprocess.run(["scancel", job.job_id], capture_output=True, timeout=10)
