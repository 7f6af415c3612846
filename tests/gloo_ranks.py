"""Run a computation in N gloo ranks (separate processes) and collect each rank's results, for the distributed
equivalence tests. A worker module defines `compute(rank: int, world_size: int) -> dict` and ends with
`if __name__ == "__main__": worker_main(compute)`; the test calls `run_ranks("tests.my_worker", tmp_dir)`."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from tests.conftest import REPO_ROOT


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(module: str, out_dir: Path, world_size: int = 2, timeout: float = 180) -> list[dict]:
    """Start `python -m module` once per rank, wait for all, fail with a rank's output if it failed."""
    port = free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", module, "--rank", str(rank), "--world-size", str(world_size),
             "--port", str(port), "--out", str(out_dir)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(world_size)
    ]
    try:
        logs = [worker.communicate(timeout=timeout)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, log in zip(workers, logs):
        assert worker.returncode == 0, f"rank failed:\n{log}"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def worker_main(compute: Callable[[int, int], dict]) -> None:
    """Entry point of a worker module: join the gloo group, compute, save this rank's results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world_size
    )
    try:
        torch.save(compute(args.rank, args.world_size), args.out / f"rank{args.rank}.pt")
    finally:
        dist.destroy_process_group()
