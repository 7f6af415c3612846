"""Soak test (not part of CI): train the demo for a long time while it is repeatedly stopped with SIGTERM or
SIGKILL at random moments and restarted with `--ckpt_path last`, and check that it survives.

Checks, per segment (one process from start to signal):
- progress is monotone: each restart resumes from the global step of the newest `last.ckpt` (as printed by
  `jointssl fit`), and the step in `last.ckpt` never goes backwards;
- memory is bounded: the peak memory of each segment (PSS summed over the trainer and its DataLoader workers,
  sampled every 0.5 s, and the trainer's own peak RSS) stays within `--memory-margin` of the first segment's;
- nothing leaks: once the trainer process has exited, no process of its session (DataLoader workers) is left;
- a SIGTERM stops the run within `--stop-timeout` seconds.

The segments run in a work folder (default `runs/soak`) with a copy of the demo config in which only these
change: training outlives the soak (`max_epochs` 100000) and, if missing, the atomic checkpoint plugin and the
exact-resume callback are added. The demo's synthetic data is generated once before the first segment.

    .venv/bin/python benchmarks/soak.py                 # 30 minutes
    .venv/bin/python benchmarks/soak.py --minutes 5     # a short check

Exits with status 1 and the list of failed checks when one fails.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
JOINTSSL = Path(sys.executable).parent / "jointssl"
RESUMED = re.compile(r"jointssl: resuming from (\S+) at global step (\d+)")
ATOMIC_IO = "jointssl.checkpointing.AtomicCheckpointIO"
EXACT_RESUME = "jointssl.callbacks.resume.ExactResume"


@dataclass
class Segment:
    number: int
    signal_name: str
    seconds: float = 0.0
    resumed_from: int | None = None  # global step the run said it resumed from (None: started fresh)
    checkpoint_step: int | None = None  # global step in last.ckpt after the segment
    peak_pss_mb: float = 0.0  # sampled peak of PSS over the whole session (trainer + workers)
    trainer_peak_rss_mb: float = 0.0  # the trainer process's own peak RSS (VmHWM)
    max_processes: int = 0
    exit_code: int | None = None
    signalled: bool = False  # False: the trainer exited by itself before its signal was due
    stop_seconds: float | None = None  # signal to exit
    leaked: list[str] = field(default_factory=list)


def session_processes(session: int) -> list[int]:
    """PIDs of the processes whose session id is `session` (the trainer started with start_new_session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, session, ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (copy-on-write between the trainer and its forked workers) are split
    between the processes sharing them, so the sum over processes is the memory they use together."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return _status_kb(pid, "VmRSS")


def describe(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return str(pid)
    return f"{pid} {command[:120]}"


def checkpoint_step(path: Path) -> int | None:
    if not path.exists():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def prepare(workdir: Path, config_path: Path) -> Path:
    """The soak's copy of the config, and the demo's synthetic data generated once."""
    config = yaml.safe_load(config_path.read_text())
    trainer = config.setdefault("trainer", {})
    trainer["max_epochs"] = 100000  # outlive the soak; the same in every segment, so the schedule is unchanged
    trainer.pop("max_steps", None)
    trainer["enable_progress_bar"] = False
    plugins = trainer.get("plugins") or []
    plugins = plugins if isinstance(plugins, list) else [plugins]
    if not any(ATOMIC_IO in str(plugin) for plugin in plugins):
        trainer["plugins"] = plugins + [{"class_path": ATOMIC_IO}]
    callbacks = trainer.get("callbacks") or []
    if not any(EXACT_RESUME in str(callback) for callback in callbacks):
        trainer["callbacks"] = callbacks + [{"class_path": EXACT_RESUME}]
    workdir.mkdir(parents=True, exist_ok=True)
    soak_config = workdir / "soak.yaml"
    soak_config.write_text(yaml.safe_dump(config, sort_keys=False))
    synthetic = config.get("data", {}).get("init_args", {}).get("synthetic")
    if synthetic:
        from jointssl.data import SyntheticData, generate_synthetic_data

        cwd = os.getcwd()
        os.chdir(workdir)  # the config's relative paths are relative to the run's working directory
        try:
            generate_synthetic_data(SyntheticData(**synthetic))
        finally:
            os.chdir(cwd)
    return soak_config


def last_checkpoint(workdir: Path, config_path: Path) -> Path:
    config = yaml.safe_load(config_path.read_text())
    for callback in config["trainer"].get("callbacks") or []:
        dirpath = (callback.get("init_args") or {}).get("dirpath")
        if dirpath:
            return workdir / dirpath / "last.ckpt"
    return workdir / config["trainer"].get("default_root_dir", ".") / "checkpoints" / "last.ckpt"


def run_segment(
    number: int, workdir: Path, config: Path, run_seconds: float, signal_name: str, stop_timeout: float
) -> Segment:
    segment = Segment(number, signal_name)
    command = [str(JOINTSSL), "fit", "--config", str(config)] + (["--ckpt_path", "last"] if number > 0 else [])
    log_path = workdir / f"segment_{number:03d}.log"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.monotonic()
    with open(log_path, "w") as log:
        trainer = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        session = trainer.pid
        while time.monotonic() - start < run_seconds and trainer.poll() is None:
            pids = session_processes(session)
            segment.max_processes = max(segment.max_processes, len(pids))
            segment.peak_pss_mb = max(segment.peak_pss_mb, sum(pss_kb(pid) for pid in pids) / 1024)
            segment.trainer_peak_rss_mb = max(segment.trainer_peak_rss_mb, _status_kb(trainer.pid, "VmHWM") / 1024)
            time.sleep(0.5)
        if trainer.poll() is None:
            segment.signalled = True
            sent = time.monotonic()
            # The trainer process only, as a scheduler's preemption would: its workers must follow it out.
            trainer.send_signal(signal.SIGTERM if signal_name == "SIGTERM" else signal.SIGKILL)
            try:
                trainer.wait(timeout=stop_timeout)
                segment.stop_seconds = time.monotonic() - sent
            except subprocess.TimeoutExpired:
                trainer.kill()
                trainer.wait()
        segment.exit_code = trainer.returncode
    segment.seconds = time.monotonic() - start
    # DataLoader workers notice a dead parent within a few seconds (torch checks every 5 s).
    deadline = time.monotonic() + 15
    while session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.25)
    for pid in session_processes(session):
        segment.leaked.append(describe(pid))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    match = RESUMED.search(log_path.read_text(errors="replace"))
    segment.resumed_from = int(match.group(2)) if match else None
    return segment


def check(segments: list[Segment], margin: float, stop_timeout: float, last_step: int | None) -> list[str]:
    failures = []
    previous = None
    for segment in segments:
        name = f"segment {segment.number}"
        if segment.leaked:
            failures.append(f"{name}: processes left behind: {segment.leaked}")
        if not segment.signalled:
            failures.append(f"{name}: the trainer exited by itself (code {segment.exit_code}); see its log")
        elif segment.stop_seconds is None:
            failures.append(f"{name}: still running {stop_timeout:.0f} s after {segment.signal_name} (killed)")
        if segment.number > 0 and previous is not None and previous.checkpoint_step is not None:
            if segment.resumed_from != previous.checkpoint_step:
                failures.append(
                    f"{name}: resumed from step {segment.resumed_from}, the newest checkpoint was at "
                    f"{previous.checkpoint_step}"
                )
        if previous is not None and (segment.checkpoint_step or 0) < (previous.checkpoint_step or 0):
            failures.append(
                f"{name}: checkpoint step went back from {previous.checkpoint_step} to {segment.checkpoint_step}"
            )
        previous = segment
    first = segments[0]
    for segment in segments[1:]:
        for what, value, reference in (
            ("peak PSS", segment.peak_pss_mb, first.peak_pss_mb),
            ("trainer peak RSS", segment.trainer_peak_rss_mb, first.trainer_peak_rss_mb),
        ):
            if reference > 0 and value > reference * (1 + margin):
                failures.append(
                    f"segment {segment.number}: {what} {value:.0f} MB > first segment's {reference:.0f} MB "
                    f"+ {margin:.0%}"
                )
    if not last_step:
        failures.append("no training progress: no checkpoint with a positive global step")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="total soak duration")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "demo.yaml")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "runs" / "soak",
                        help="work folder (emptied of a previous soak's checkpoints)")
    parser.add_argument("--min-interval", type=float, default=45.0, help="shortest run before a signal, seconds")
    parser.add_argument("--max-interval", type=float, default=150.0, help="longest run before a signal, seconds")
    parser.add_argument("--signal", choices=["SIGTERM", "SIGKILL", "mixed"], default="mixed",
                        help="mixed: SIGTERM or SIGKILL, chosen at random for each segment")
    parser.add_argument("--memory-margin", type=float, default=0.25,
                        help="allowed growth of a segment's peak memory over the first segment's (fraction)")
    parser.add_argument("--stop-timeout", type=float, default=60.0, help="seconds a SIGTERM may take to stop it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the intervals and signals")
    args = parser.parse_args(argv)

    workdir = args.workdir.resolve()
    config = prepare(workdir, args.config.resolve())
    checkpoint = last_checkpoint(workdir, config)
    for stale in checkpoint.parent.glob("*.ckpt") if checkpoint.parent.exists() else []:
        stale.unlink()  # a fresh soak: the first segment starts from scratch
    chooser = random.Random(args.seed)
    deadline = time.monotonic() + 60 * args.minutes
    segments: list[Segment] = []
    print(f"soak: {args.minutes:g} min of {args.config} in {workdir}, signals {args.signal}", flush=True)
    while time.monotonic() < deadline - 5:
        remaining = deadline - time.monotonic()
        interval = min(chooser.uniform(args.min_interval, args.max_interval), remaining)
        signal_name = chooser.choice(["SIGTERM", "SIGKILL"]) if args.signal == "mixed" else args.signal
        segment = run_segment(len(segments), workdir, config, interval, signal_name, args.stop_timeout)
        segment.checkpoint_step = checkpoint_step(checkpoint)
        segments.append(segment)
        print(
            f"segment {segment.number}: {segment.seconds:5.0f} s, {signal_name}, resumed from "
            f"{segment.resumed_from}, checkpoint at step {segment.checkpoint_step}, peak PSS "
            f"{segment.peak_pss_mb:.0f} MB, trainer peak RSS {segment.trainer_peak_rss_mb:.0f} MB, "
            f"{segment.max_processes} processes, exit {segment.exit_code}, leaked {len(segment.leaked)}",
            flush=True,
        )

    last_step = segments[-1].checkpoint_step if segments else None
    failures = check(segments, args.memory_margin, args.stop_timeout, last_step)
    first = segments[0]
    drift_pss = max((s.peak_pss_mb / first.peak_pss_mb - 1 for s in segments), default=0.0)
    drift_rss = max((s.trainer_peak_rss_mb / first.trainer_peak_rss_mb - 1 for s in segments), default=0.0)
    stops = [s.stop_seconds for s in segments if s.signal_name == "SIGTERM" and s.stop_seconds is not None]
    print("\n| segment | seconds | signal | resumed from | checkpoint step | peak PSS MB | trainer peak RSS MB | "
          "processes | exit | leaked |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in segments:
        print(f"| {s.number} | {s.seconds:.0f} | {s.signal_name} | {s.resumed_from} | {s.checkpoint_step} | "
              f"{s.peak_pss_mb:.0f} | {s.trainer_peak_rss_mb:.0f} | {s.max_processes} | {s.exit_code} | "
              f"{len(s.leaked)} |")
    print(
        f"\nsoak summary: {sum(s.seconds for s in segments) / 60:.1f} min, {len(segments)} segments, "
        f"{len(segments) - 1} restarts (signals: {sum(s.signal_name == 'SIGTERM' for s in segments)} x SIGTERM, "
        f"{sum(s.signal_name == 'SIGKILL' for s in segments)} x SIGKILL), global step 0 -> {last_step}, "
        f"peak memory drift over the first segment: PSS {drift_pss:+.1%}, trainer RSS {drift_rss:+.1%} "
        f"(margin {args.memory_margin:.0%}), SIGTERM stop time max "
        f"{max(stops) if stops else float('nan'):.1f} s, leaked processes {sum(len(s.leaked) for s in segments)}"
    )
    if failures:
        print("\nFAILED:\n" + "\n".join(f"- {failure}" for failure in failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
