"""Preemption, requeue and resumption.

Without Slurm: `SlurmRequeue` in one process, and in 2 DDP ranks (a subprocess) where only one rank gets the signal
and `scontrol` is a fake that behaves like Slurm (records the call, SIGTERMs the job's processes); the
experiment-directory rules of `JointSSLCLI` (`--ckpt_path last`, checkpoint folder, configs/trainer/slurm.yaml).

With a Slurm cluster (`slurm` marker; skipped when none answers; `.ci/run` starts a local one): the project's own
CPU template, scripts/slurm/pretrain_cpu.sbatch, runs a tiny joint pretraining over 2 nodes x 1 task; a job sent
SIGUSR1 mid-run saves, requeues itself and finishes from the step where it stopped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from jointssl.callbacks.requeue import SlurmRequeue, parse_signal
from jointssl.cli import JointSSLCLI, main
from tests.conftest import REPO_ROOT
from tests.slurm_jobs import (
    CPU_TEMPLATE,
    cluster_problem,
    generate_tiny_data,
    idle_nodes,
    submit,
    tiny_joint_config,
    wait_for,
    wait_for_log,
    wait_for_state,
)

BORING = ["--model", "lightning.pytorch.demos.boring_classes.BoringModel",
          "--data", "lightning.pytorch.demos.boring_classes.BoringDataModule"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
         "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu"]


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def run_worker(out: Path, *args: str, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """tests/slurm_requeue_worker.py in its own session (its signals and SIGTERM stay away from pytest)."""
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "tests.slurm_requeue_worker", "--out", str(out), *args],
        cwd=REPO_ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
        start_new_session=True,
    )


def reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


# ---------------------------------------------------------------------------------------------- SlurmRequeue
def test_parse_signal() -> None:
    assert parse_signal("SIGUSR1") is parse_signal("usr1") is parse_signal(int(signal.SIGUSR1)) is signal.SIGUSR1
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signal("SIGNOPE")
    with pytest.raises(ValueError, match="check_every_n_steps"):
        SlurmRequeue(check_every_n_steps=0)


class SignalAtStep(Callback):
    """Sends `signum` to this process when optimizer step `step` (0-based) starts."""

    def __init__(self, step: int, signum: signal.Signals) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer: Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_signal_saves_at_the_next_step_and_stops(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # even when the tests themselves run inside a Slurm job
    requeue = SlurmRequeue()
    handler_before = signal.getsignal(signal.SIGUSR1)
    trainer = Trainer(
        accelerator="cpu", max_steps=20, limit_val_batches=0, default_root_dir=tmp_path, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True), requeue,
                   SignalAtStep(3, signal.SIGUSR1)],
    )
    trainer.fit(BoringModel())
    # Sent while optimizer step 3 (0-based) runs: saved when it ends, at global step 4, and nothing trained after.
    assert trainer.global_step == 4 and trainer.should_stop
    out = capsys.readouterr().out
    assert "jointssl: SIGUSR1 received at step 4" in out and "stopping (not a Slurm job: no requeue)" in out
    checkpoint_dir = tmp_path / "checkpoints"
    assert requeue.saved_checkpoint == str(checkpoint_dir / "last.ckpt")
    # ModelCheckpoint does not save the stopped, mid-epoch state again as an "epoch end" (last-v1.ckpt, epoch=...).
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["last.ckpt"]
    checkpoint = load_checkpoint(checkpoint_dir / "last.ckpt")
    assert checkpoint["global_step"] == 4
    [state] = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert state["last_model_path"] == str(checkpoint_dir / "last.ckpt")
    assert signal.getsignal(signal.SIGUSR1) == handler_before  # the handler lives only as long as the fit


FAKE_SCONTROL = """#!/bin/bash
# Stands in for Slurm's `scontrol requeue`: records the call, then, like Slurm requeueing a running job, sends
# SIGTERM to every process of the job (here: the worker's process group).
trap '' TERM
echo "$@" >> "{log}"
read -r _ _ _ _ pgid _ < /proc/$$/stat
kill -TERM -- "-$pgid"
"""


@pytest.mark.ddp
def test_ddp_ranks_agree_save_and_rank_zero_requeues_then_all_exit_cleanly(tmp_path: Path) -> None:
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(FAKE_SCONTROL.format(log=calls))
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    out = tmp_path / "run"
    # Only rank 1 gets the signal: the max all-reduce at the step boundary makes both ranks save together and stop
    # at the same step (a deadlock would show as the subprocess timing out). strategy ddp: the worker process is
    # rank 0 and the other rank its child, all in one process group, as the tasks of an srun step.
    result = run_worker(out, "--devices", "2", "--strategy", "ddp", "--signal-at-step", "2", "--signal-rank", "1",
                        env=env)
    # Exit status 0 although SIGTERM reached both ranks right after the requeue: the work was done, they finished.
    assert result.returncode == 0, result.stderr[-3000:]
    assert "saving" in result.stdout and "and requeueing job 4242" in result.stdout
    assert "jointssl: requeued Slurm job 4242" in result.stdout
    assert calls.read_text().split("\n") == ["requeue 4242", ""]  # once, by rank 0
    assert [(r["global_step"], r["world_size"], r["should_stop"]) for r in reports(out)] == [(3, 2, True)] * 2
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 3


# ---------------------------------------------------------------------------------------------- JointSSLCLI
def test_ckpt_path_last_starts_fresh_then_resumes_in_the_experiment_dir(tmp_path: Path, capsys) -> None:
    experiment = tmp_path / "exp"
    common = [*BORING, *QUIET, f"--trainer.default_root_dir={experiment}", "--ckpt_path=last",
              "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true"]
    main(["fit", *common, "--trainer.max_steps=3"])
    out = capsys.readouterr().out
    assert f"jointssl: no checkpoint in {experiment / 'checkpoints'}, starting fresh" in out
    # A ModelCheckpoint without dirpath writes into the experiment directory, not into a logger's version_N.
    last = experiment / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 3

    main(["fit", *common, "--trainer.max_steps=5"])
    out = capsys.readouterr().out
    assert f"jointssl: resuming from {last} at global step 3" in out
    assert load_checkpoint(last)["global_step"] == 5
    assert not (experiment / "checkpoints" / "last-v1.ckpt").exists()


def instantiate(*args: str) -> JointSSLCLI:
    from lightning.pytorch import LightningDataModule, LightningModule

    return JointSSLCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=list(args))


def test_hpc_checkpoint_lightning_would_pick_silently_is_announced(tmp_path: Path, monkeypatch, capsys) -> None:
    experiment = tmp_path / "exp"
    main(["fit", *BORING, *QUIET, f"--trainer.default_root_dir={experiment}", "--trainer.max_steps=2"])
    capsys.readouterr()
    hpc = experiment / "hpc_ckpt_1.ckpt"
    [saved] = (experiment / "checkpoints").glob("*.ckpt")
    saved.rename(hpc)
    cli = instantiate(*BORING, *QUIET, f"--trainer.default_root_dir={experiment}")
    assert cli._resolve_ckpt_path(None) is None  # not under Slurm: Lightning ignores hpc_ckpt_* too
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "pretrain", "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(name, value)
    assert cli._resolve_ckpt_path(None) == str(hpc)
    assert f"under Slurm Lightning resumes from {hpc}" in capsys.readouterr().out
    assert cli._resolve_ckpt_path("last") == str(hpc)  # the only candidate, so `last` picks it too


def test_slurm_trainer_file_keeps_the_config_callbacks_and_adds_requeue(tmp_path: Path, monkeypatch) -> None:
    # What the sbatch templates run, minus srun: the trainer file on top of a full config.
    for name, value in {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                        "SLURM_JOB_NAME": "pretrain", "SLURM_JOB_ID": "7", "SLURM_NTASKS_PER_NODE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    slurm_yaml = REPO_ROOT / "configs" / "trainer" / "slurm.yaml"
    cli = instantiate("--config", str(REPO_ROOT / "configs" / "demo.yaml"), "--trainer", str(slurm_yaml),
                      "--trainer.accelerator=cpu", "--trainer.precision=32", "--trainer.sync_batchnorm=false",
                      "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.logger=false")
    trainer_config = cli.config["trainer"]
    assert trainer_config["strategy"] == "ddp" and trainer_config["plugins"][0]["init_args"]["auto_requeue"] is False
    kinds = [type(c).__name__ for c in cli.trainer.callbacks]
    requeue = [c for c in cli.trainer.callbacks if isinstance(c, SlurmRequeue)]
    assert len(requeue) == 1 and requeue[0].requeue_signal is signal.SIGUSR1
    checkpoint = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoint and checkpoint[0].dirpath.endswith("runs/demo/checkpoints")  # demo.yaml's, not replaced
    assert kinds.index("SlurmRequeue") < kinds.index("ModelCheckpoint")
    # Unmodified, the file asks for the GPU recipe.
    raw = yaml.safe_load(slurm_yaml.read_text())
    assert (raw["accelerator"], raw["precision"], raw["sync_batchnorm"]) == ("gpu", "bf16-mixed", True)


# ---------------------------------------------------------------------------------------------- real Slurm
@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Path:
    """A Slurm cluster with 2 idle nodes, and the tiny synthetic data the jobs train on."""
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)
    try:
        wait_for(lambda: idle_nodes() >= 2, timeout=60, what="2 idle Slurm nodes")
    except TimeoutError:
        pytest.skip("the Slurm cluster does not have 2 idle nodes")
    data = tmp_path_factory.mktemp("slurm_data")
    generate_tiny_data(data)
    return data


def job_env(workdir: Path, config: Path, experiment: str) -> dict[str, str]:
    venv = Path(sys.executable).parent.parent  # the environment running the tests has jointssl installed
    return {"CONFIG": str(config), "EXPERIMENT": experiment, "RUNS": str(workdir / "runs"), "VENV": str(venv),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slurm
@pytest.mark.ddp
def test_two_node_pretraining_completes_with_both_ranks(cluster: Path, tmp_path: Path) -> None:
    max_steps = 12
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_joint_config(cluster, max_steps))
    job = submit(CPU_TEMPLATE, tmp_path, job_env(tmp_path, config, "two_nodes"), [], [])
    fields = wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=240)
    log = job.text()
    assert fields["JobState"] == "COMPLETED", log[-4000:]
    assert fields["NumNodes"] == "2" and fields["Restarts"] == "0"
    # Each task on its own node, both ranks in one process group, the global batch over both.
    nodes = dict(re.findall(r"^(\d): task \d of 2 on (\S+)", log, re.MULTILINE))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], log[-4000:]
    assert "1: Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert "Starting with 2 processes" in log
    assert re.search(r"^0: INFO jointssl: learning rate .* global batch 8 /", log, re.MULTILINE)
    assert "jointssl: no checkpoint in" in log
    last = tmp_path / "runs" / "two_nodes" / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == max_steps
    assert len(checkpoint["jointssl_rank_state"]) == 2  # state gathered from both ranks


def wandb_history(run_dir: Path) -> list[dict]:
    """History rows of one offline W&B run segment, read back with `wandb leet inspect --json`."""
    wandb = Path(sys.executable).parent / "wandb"
    result = subprocess.run([str(wandb), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


@pytest.mark.slurm
@pytest.mark.ddp
def test_signalled_job_saves_requeues_and_resumes_where_it_stopped(cluster: Path, tmp_path: Path) -> None:
    max_steps = 25  # a multiple of every_n_train_steps: ModelCheckpoint writes last.ckpt only when it saves
    config = tmp_path / "tiny.yaml"
    # A last.ckpt every 5 steps: its appearance shows that training is under way (no sleeping on a guess).
    config.write_text(tiny_joint_config(cluster, max_steps).replace(
        "        save_last: true\n", "        save_last: true\n        every_n_train_steps: 5\n"))
    wandb_config = REPO_ROOT / "configs" / "logger" / "wandb.yaml"
    use_wandb = wandb_config.exists()
    extra = ["--trainer.logger", str(wandb_config)] if use_wandb else []
    experiment_dir = tmp_path / "runs" / "requeue"
    job = submit(CPU_TEMPLATE, tmp_path, job_env(tmp_path, config, "requeue"), [], extra)

    last = experiment_dir / "checkpoints" / "last.ckpt"
    wait_for(last.exists, timeout=240, what="the first last.ckpt")
    run_id_before = (experiment_dir / "wandb_run_id").read_text() if use_wandb else None
    subprocess.run(["scancel", "--signal=USR1", job.job_id], check=True, timeout=10)

    saved = wait_for_log(job, r"^0: jointssl: SIGUSR1 received at step (\d+), saving (\S+) and requeueing job (\d+)",
                         timeout=120)
    stopped_at = int(saved.group(1))
    assert stopped_at >= 5 and saved.group(2) == str(last) and saved.group(3) == job.job_id
    wait_for_log(job, rf"^0: jointssl: requeued Slurm job {job.job_id}$", timeout=60)
    resumed = wait_for_log(job, r"^0: jointssl: resuming from (\S+) at global step (\d+)$", timeout=180)
    assert (resumed.group(1), int(resumed.group(2))) == (str(last), stopped_at)

    fields = wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=240)
    log = job.text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-4000:]
    assert "restart 1 on" in log
    assert "Exited with exit code" not in log  # no task of the preempted segment failed
    assert load_checkpoint(last)["global_step"] == max_steps

    if use_wandb:
        # One W&B run across the requeue: the id file is unchanged, both segments carry it, and the logged steps
        # continue where the first segment stopped.
        run_id = (experiment_dir / "wandb_run_id").read_text()
        assert run_id == run_id_before
        segments = sorted((experiment_dir / "wandb").glob("offline-run-*"))
        assert len(segments) == 2 and all(s.name.endswith(f"-{run_id.strip()}") for s in segments)
        steps = [sorted({int(r["trainer/global_step"]) for r in wandb_history(s) if "train/loss" in r})
                 for s in segments]
        assert steps[0] == list(range(stopped_at)) and steps[1] == list(range(stopped_at, max_steps))
