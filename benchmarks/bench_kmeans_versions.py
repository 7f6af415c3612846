"""spherical_kmeans of this checkout against the one of an earlier commit, side by side in one process.

Not a test. Loads ``jointssl/losses/kmeans.py`` as it was at ``--base`` (``git show BASE:...``) as a second module
and times both, alternating call by call (so that load from other processes hits both alike), on the same unit
float32 rows and initial centroids: the best of ``--rounds`` per version, the ratio new / old, and the share of
rows whose final assignment agrees.

Usage: .venv/bin/python benchmarks/bench_kmeans_versions.py --base b21b981 [--rows 200000 --clusters 30 100 300
       --iterations 10 --threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jointssl.losses.kmeans import spherical_kmeans  # noqa: E402


def module_at(revision: str):
    """jointssl/losses/kmeans.py at `revision`, imported under another name (its imports are the current ones)."""
    source = subprocess.run(["git", "show", f"{revision}:jointssl/losses/kmeans.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"kmeans_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision of the old kmeans.py")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, nargs="+", default=[30, 100, 300])
    parser.add_argument("--iterations", type=int, nargs="+", default=[10, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    old = module_at(args.base).spherical_kmeans
    torch.manual_seed(0)
    points = F.normalize(torch.randn(args.rows, args.dim), dim=1)
    print(f"torch {torch.__version__}; {args.rows} x {args.dim} unit rows; old = {args.base}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| K | iterations | threads | old s | new s | new / old | assignments equal |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for iterations in args.iterations:
            for clusters in args.clusters:
                init = points[torch.randperm(args.rows, generator=torch.Generator().manual_seed(1))[:clusters]]
                times: dict[str, list[float]] = {"old": [], "new": []}
                results = {}
                for _ in range(args.rounds):
                    for name, kmeans in (("old", old), ("new", spherical_kmeans)):
                        start = time.perf_counter()
                        results[name] = kmeans(points, clusters, iterations=iterations, init_centroids=init)
                        times[name].append(time.perf_counter() - start)
                agree = (results["old"].assignments == results["new"].assignments).float().mean().item()
                best_old, best_new = min(times["old"]), min(times["new"])
                print(f"| {clusters} | {iterations} | {threads} | {best_old:.3f} | {best_new:.3f} | "
                      f"{best_new / best_old:.2f} | {agree:.4f} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
