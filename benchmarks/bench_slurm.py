"""Slurm and DDP timings: local cluster start, a 2-node job, a requeue round trip, and the DDP step overhead.

1. Cluster start: `scripts/slurm/local_cluster.sh start 2`, wall time until every node is idle, with the
   settings of .ci/run. Only with `--restart-cluster` when a cluster already runs (it is stopped and
   started again), or when none runs.
2. 2-node job: scripts/slurm/pretrain_cpu.sbatch (2 nodes x 1 task, the tiny joint pretraining of the Slurm
   tests), sbatch -> RUNNING -> COMPLETED.
3. Requeue round trip of the same template: `scancel --signal=USR1` once training runs -> "SIGUSR1 received"
   (the save step) -> "requeued" -> PENDING -> RUNNING again -> "resuming from ... at global step N" logged.
   The PENDING part is Slurm's: a requeued job is held cred_expire + 1 s (AuthInfo=cred_expire=10 here), then
   waits for the scheduler's next pass (sched_interval / bf_interval: 1 s with .ci/run's settings, Slurm's
   defaults are 60 s / 30 s).
4. DDP step overhead: the demo model (configs/demo.yaml: resnet10t, 2 x 48 px + 2 x 24 px crops of 32 images and
   4 volumes x 16 slices per process), 1 process vs 2 processes (strategy ddp, gloo) with the same per-process
   batch, one thread per process, DataLoader in the main process; the time from batch start to batch end
   (forward, backward with DDP's gradient all-reduce, the collectives of the losses, optimizer), excluding data
   loading, median over the measured steps.

    .venv/bin/python benchmarks/bench_slurm.py                   # all four (1. only when no cluster runs)
    .venv/bin/python benchmarks/bench_slurm.py --restart-cluster  # also restart a running local cluster
    .venv/bin/python benchmarks/bench_slurm.py --skip-slurm       # only the DDP step overhead
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from lightning.pytorch import Callback  # noqa: E402

from jointssl.checkpointing import write_json  # noqa: E402

LOCAL_CLUSTER = REPO_ROOT / "scripts" / "slurm" / "local_cluster.sh"
# The settings .ci/run starts the local cluster with: requeued jobs eligible after 11 s, pending jobs looked at
# every second.
CI_CLUSTER_ENV = {"JOINTSSL_SLURM_CRED_EXPIRE": "10",
                  "JOINTSSL_SLURM_SCHED_PARAMS": "batch_sched_delay=0,sched_interval=1,bf_interval=1"}


class StepTimer(Callback):
    """Records the wall time and this process's CPU time of every training batch (batch start -> batch end) and
    writes them to `$JOINTSSL_STEP_TIMES.rank<R>.json` at the end of fit."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._started = (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.wall.append(time.perf_counter() - self._started[0])
        self.cpu.append(time.process_time() - self._started[1])

    def on_fit_end(self, trainer, pl_module) -> None:
        path = Path(f"{os.environ['JOINTSSL_STEP_TIMES']}.rank{trainer.global_rank}.json")
        write_json(path, {"wall": self.wall, "cpu": self.cpu})


# ---------------------------------------------------------------------------------------------- cluster
def cluster_answers() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(["sinfo"], capture_output=True).returncode == 0


def start_cluster(restart: bool) -> tuple[float | None, bool]:
    """(seconds to start 2 nodes or None when not measured, whether this run started the cluster)."""
    running = cluster_answers()
    if running and not restart:
        print("cluster start: not measured (a cluster is running; --restart-cluster restarts it)")
        return None, False
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        print(f"cluster start: not measured (needs root and Slurm: `{LOCAL_CLUSTER.relative_to(REPO_ROOT)} install`)")
        return None, False
    # As .ci/run starts it (override through the environment).
    env = {**CI_CLUSTER_ENV, **os.environ, "JOINTSSL_SLURM_HOSTS": "1"}
    if running:
        subprocess.run(["bash", str(LOCAL_CLUSTER), "stop"], env=env, check=True, capture_output=True)
    started = time.perf_counter()
    result = subprocess.run(["bash", str(LOCAL_CLUSTER), "start", "2"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"local_cluster.sh start failed:\n{result.stderr}")
    own = re.search(r"cluster up in ([\d.]+) s", result.stderr)
    print(f"cluster start (local_cluster.sh start 2, until both nodes idle): {seconds:.2f} s"
          + (f" (the script's own count, from after argument parsing: {own.group(1)} s)" if own else ""))
    return seconds, not running


# ---------------------------------------------------------------------------------------------- Slurm jobs
def slurm_jobs(workdir: Path) -> None:
    from tests.slurm_jobs import (
        CPU_TEMPLATE, generate_tiny_data, job_fields, submit, tiny_joint_config, wait_for, wait_for_log,
        wait_for_state,
    )

    data = workdir / "data"
    generate_tiny_data(data)
    env = {"RUNS": str(workdir / "runs"), "VENV": str(Path(sys.executable).parent.parent), "OMP_NUM_THREADS": "1"}

    # 2-node job
    max_steps = 12
    config = workdir / "two_nodes.yaml"
    config.write_text(tiny_joint_config(data, max_steps))
    job = submit(CPU_TEMPLATE, workdir, {**env, "CONFIG": str(config), "EXPERIMENT": "two_nodes"}, [], [],
                 job_name="bench-two-nodes")
    running = wait_for_state(job, {"RUNNING", "COMPLETED", "FAILED"}, timeout=120)
    t_running = time.monotonic()
    done = wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    t_done = time.monotonic()
    if done["JobState"] != "COMPLETED":
        raise RuntimeError(f"2-node job {job.job_id} ended {done['JobState']}:\n{job.text()[-3000:]}")
    print(f"2-node job ({done['NodeList']}, 2 x 1 task, {max_steps} steps of the tiny joint model): "
          f"sbatch -> COMPLETED {t_done - job.submitted_at:.1f} s (sbatch -> RUNNING "
          f"{t_running - job.submitted_at:.1f} s, state {running['JobState']} seen first)")

    # Requeue round trip
    max_steps = 25
    config = workdir / "requeue.yaml"
    config.write_text(tiny_joint_config(data, max_steps).replace(
        "        save_last: true\n", "        save_last: true\n        every_n_train_steps: 5\n"))
    job = submit(CPU_TEMPLATE, workdir, {**env, "CONFIG": str(config), "EXPERIMENT": "requeue"}, [], [],
                 job_name="bench-requeue")
    last = workdir / "runs" / "requeue" / "checkpoints" / "last.ckpt"
    wait_for(last.exists, timeout=300, what="the first last.ckpt")
    t_signal = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", job.job_id], check=True)
    saved = wait_for_log(job, r"SIGUSR1 received at step (\d+)", timeout=120)
    t_saved = time.monotonic()
    wait_for_log(job, r"jointssl: requeued Slurm job", timeout=60)
    t_requeued = time.monotonic()
    wait_for(lambda: job_fields(job.job_id).get("JobState") == "PENDING", timeout=60, what="PENDING", poll=0.05)
    t_pending = time.monotonic()
    eligible = job_fields(job.job_id).get("EligibleTime")
    wait_for(lambda: job_fields(job.job_id).get("JobState") == "RUNNING", timeout=300, what="RUNNING again",
             poll=0.05)
    t_running_again = time.monotonic()
    resumed = wait_for_log(job, r"resuming from \S+ at global step (\d+)", timeout=120)
    t_resumed = time.monotonic()
    done = wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    t_done = time.monotonic()
    print(f"requeue round trip (signal sent once last.ckpt of step 5 existed; saved at step {saved.group(1)}, "
          f"resumed at global step {resumed.group(1)}; job {done['JobState']} with Restarts={done['Restarts']}):")
    for label, at in [("checkpoint saved, 'SIGUSR1 received' logged", t_saved),
                      ("'requeued' logged (loggers closed, scontrol requeue done)", t_requeued),
                      (f"PENDING (EligibleTime {eligible})", t_pending),
                      ("RUNNING again", t_running_again),
                      ("'resuming from ... at global step N' logged", t_resumed),
                      (f"COMPLETED ({max_steps} steps)", t_done)]:
        print(f"  signal -> {label}: {at - t_signal:.1f} s")


# ---------------------------------------------------------------------------------------------- DDP overhead
def ddp_step_times(workdir: Path, steps: int, warmup: int) -> None:
    from jointssl.data.synthetic import SyntheticData, generate_synthetic_data

    data = workdir / "demo_data"
    started = time.perf_counter()
    # The demo's synthetic dataset (configs/demo.yaml), generated once.
    generate_synthetic_data(SyntheticData(root=str(data), num_images=384, image_size=64, num_volumes=32,
                                          volume_shape=(64, 64, 24)))
    print(f"(demo data generated in {time.perf_counter() - started:.0f} s)")
    results = {}
    for processes in (1, 2):
        times_prefix = workdir / f"steps_{processes}"
        command = [
            sys.executable, "-m", "jointssl.cli", "fit", "--config", str(REPO_ROOT / "configs" / "demo.yaml"),
            f"--data.init_args.synthetic.root={data}", "--data.init_args.num_workers=0",
            "--data.init_args.persistent_workers=false", "--data.init_args.pin_memory=false",
            f"--trainer.devices={processes}", "--trainer.strategy=" + ("ddp" if processes > 1 else "auto"),
            f"--trainer.max_steps={steps + warmup}", "--trainer.max_epochs=-1", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={workdir / f'run_{processes}'}",
            "--trainer.callbacks+=benchmarks.bench_slurm.StepTimer",
        ]
        env = {**os.environ, "JOINTSSL_STEP_TIMES": str(times_prefix), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"{processes}-process run failed:\n{result.stderr[-3000:]}")
        per_rank = [json.loads(Path(f"{times_prefix}.rank{r}.json").read_text()) for r in range(processes)]
        # A step ends when the slowest rank ends it; CPU time: the mean over ranks (the work of one process).
        results[processes] = {
            "wall": [max(step) for step in zip(*(r["wall"][warmup:] for r in per_rank))],
            "cpu": [statistics.mean(step) for step in zip(*(r["cpu"][warmup:] for r in per_rank))],
        }
    print(f"DDP step of the demo model (per-process batch 32 images + 4 volumes, {steps} steps after {warmup} "
          f"warm-up; batch start -> batch end, wall time of the slowest rank and CPU time of one process):")
    print("  processes  wall median s  wall min s  CPU median s  samples/s (wall median)")
    for processes in (1, 2):
        wall, cpu = results[processes]["wall"], results[processes]["cpu"]
        print(f"  {processes:>9}  {statistics.median(wall):>13.3f}  {min(wall):>10.3f}  {statistics.median(cpu):>12.3f}"
              f"  {32 * processes / statistics.median(wall):>23.1f}")
    for kind in ("wall", "cpu"):
        ratio = statistics.median(results[2][kind]) / statistics.median(results[1][kind])
        print(f"  2-process / 1-process {kind} median: {ratio:.2f}x ({100 * (ratio - 1):+.0f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restart-cluster", action="store_true", help="stop and start a running local cluster")
    parser.add_argument("--skip-slurm", action="store_true", help="only the DDP step overhead")
    parser.add_argument("--skip-ddp", action="store_true", help="only the Slurm timings")
    parser.add_argument("--steps", type=int, default=10, help="measured DDP steps")
    parser.add_argument("--warmup-steps", type=int, default=3)
    options = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench_slurm_") as tmp:
        workdir = Path(tmp)
        started_here = False
        try:
            if not options.skip_slurm:
                _, started_here = start_cluster(options.restart_cluster)
                if cluster_answers():
                    slurm_jobs(workdir)
                else:
                    print("Slurm timings skipped: no cluster answers")
            if not options.skip_ddp:
                ddp_step_times(workdir, options.steps, options.warmup_steps)
        finally:
            if started_here:
                subprocess.run(["bash", str(LOCAL_CLUSTER), "stop"], capture_output=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
