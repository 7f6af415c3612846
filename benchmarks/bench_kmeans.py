"""Benchmark of jointssl.losses.spherical_kmeans (not a test; takes a few minutes on 2 CPU threads).

Measures, in the same run and interleaved round by round (so that load from other processes hits both alike):
  * ours:  spherical_kmeans, `iterations` iterations (plus the final assignment step it always does);
  * floor: the `iterations` embedding-by-centroid matmuls alone, with the same chunking and a reused output
           buffer (the least work any k-means of this kind must do);
  * loop:  k-means as in the DeepCluster-v2 authors' public code (facebookresearch/swav main_deepclusterv2.py):
           one unchunked matmul + max per assignment step, and a Python loop over the clusters (member indices
           grouped by cluster as their get_indices_sparse does; see member_indices) for the update. It is slow,
           so it runs only `--loop-iterations` iterations and is extrapolated to `iterations` (+ the final
           assignment), and its update step alone is also compared with ours (index_add_ + bincount).

With --curve, the scaling curve instead: N = 10k .. 1M rows x K = 30 .. 3000 (dim 128), each cell's time per
iteration over its floor for 1 and 2 threads (switched with torch.set_num_threads, the two thread counts and
floor / ours of each cell measured next to each other, cell after cell, round after round), and the resident-set
peak of one k-means call per cell (VmHWM reset through /proc/self/clear_refs; glibc's mmap threshold fixed so that
freed blocks leave the resident set). --quick runs a small grid as a sanity check. --json / --plot write the
results and a PNG.

Usage: .venv/bin/python benchmarks/bench_kmeans.py [--points 100000 --dim 128 --clusters 3000 --threads 2]
       .venv/bin/python benchmarks/bench_kmeans.py --curve [--quick] [--json F] [--plot benchmarks/plots/kmeans_scaling.png]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from jointssl.checkpointing import write_json
from jointssl.losses import spherical_kmeans
from jointssl.losses.kmeans import DEFAULT_MEMORY_BUDGET_BYTES, _MemberSums, chunk_rows, scratch_bytes_per_row


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def matmul_floor(points: torch.Tensor, centroids: torch.Tensor, iterations: int, chunk: int) -> None:
    """The embedding-by-centroid products of `iterations` assignment steps, nothing else."""
    buffer = points.new_empty((min(chunk, points.shape[0]), centroids.shape[0]))
    centroids_t = centroids.t()
    for _ in range(iterations):
        for start in range(0, points.shape[0], chunk):
            block = points[start : start + chunk]
            torch.mm(block, centroids_t, out=buffer[: block.shape[0]])


def member_indices(assignments: np.ndarray, num_clusters: int) -> list[np.ndarray]:
    """The authors' get_indices_sparse, in NumPy: the row indices of each cluster's members, ascending, one array
    per cluster. They build a scipy CSR matrix (a counting sort of the N assignments into K rows) and unravel
    each row; a stable argsort + split gives the same arrays with an O(N log N) sort in place of the counting
    sort (a few ms at N = 100k, against the ~100 ms the per-cluster Python loop that consumes them takes), and
    keeps the K per-cluster arrays their loop iterates over."""
    order = np.argsort(assignments.ravel(), kind="stable")
    counts = np.bincount(assignments.ravel(), minlength=int(num_clusters))
    return np.split(order, np.cumsum(counts)[:-1])


def loop_update(points: torch.Tensor, assignments: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The authors' update step: a Python loop over clusters summing their members."""
    num_clusters, dim = centroids.shape
    where = member_indices(assignments.numpy(), num_clusters)
    sums = torch.zeros(num_clusters, dim)
    counts = torch.zeros(num_clusters, dtype=torch.int)
    for k in range(len(where)):
        if len(where[k]) > 0:
            sums[k] = points[where[k]].sum(dim=0)
            counts[k] = len(where[k])
    mask = counts > 0
    centroids = centroids.clone()
    centroids[mask] = sums[mask] / counts[mask].unsqueeze(1)
    return F.normalize(centroids, dim=1)


def loop_kmeans(
    points: torch.Tensor, centroids: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
    """The authors' k-means loop (unchunked scores, per-cluster update), from given initial centroids.
    Returns centroids, assignments, and the seconds of each assignment step and of each update step."""
    assign_times, update_times = [], []
    for n_iter in range(iterations + 1):
        start = time.perf_counter()
        _, assignments = torch.mm(points, centroids.t()).max(dim=1)
        assign_times.append(time.perf_counter() - start)
        if n_iter == iterations:
            break
        start = time.perf_counter()
        centroids = loop_update(points, assignments, centroids)
        update_times.append(time.perf_counter() - start)
    return centroids, assignments, assign_times, update_times


CURVE_POINTS = (10_000, 30_000, 100_000, 300_000, 1_000_000)
CURVE_CLUSTERS = (30, 100, 300, 1000, 3000)
QUICK_POINTS = (10_000, 30_000)
QUICK_CLUSTERS = (30, 300)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))


def peak_bytes(fn) -> int:
    """Resident-set high-water mark of fn() above the resident set before it."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    base = _status_bytes("VmRSS:")
    fn()
    return _status_bytes("VmHWM:") - base


def curve_iterations(points: int, clusters: int, dim: int, least: int) -> int:
    """Iterations per measurement: enough that the floor of a small cell takes about 0.1 s (timer and
    scheduler noise stay small), at least `least` (the update steps are part of what is measured)."""
    return max(least, min(20, math.ceil(1.5e10 / (2 * points * clusters * dim))))


def summarise(cells: dict, threads: tuple[int, ...], args) -> dict:
    done = []
    for cell in cells.values():
        if not cell["floor"][threads[0]]:
            continue
        out = {key: value for key, value in cell.items() if key not in ("floor", "ours")}
        out["floor"] = {str(t): cell["floor"][t] for t in threads}
        out["ours"] = {str(t): cell["ours"][t] for t in threads}
        for t in threads:
            ratios = [o / f for o, f in zip(cell["ours"][t], cell["floor"][t])]
            out[f"median_ratio_{t}"] = statistics.median(ratios)
            out[f"best_ratio_{t}"] = min(cell["ours"][t]) / min(cell["floor"][t])
        done.append(out)
    return {
        "torch": torch.__version__, "dim": args.dim, "threads": list(threads),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
        "memory_budget_bytes": DEFAULT_MEMORY_BUDGET_BYTES, "load_end": os.getloadavg()[0], "cells": done,
    }


def run_curve(args) -> dict:
    # Freed blocks above 64 KiB are returned to the kernel at once (glibc otherwise raises its mmap threshold
    # after the first large free and keeps later blocks in its heap), so the resident set follows live memory
    # and the peak of one call is measurable. Every variant runs under the same setting.
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    sizes = QUICK_POINTS if args.quick else CURVE_POINTS
    cluster_counts = QUICK_CLUSTERS if args.quick else CURVE_CLUSTERS
    threads = (1, 2)
    generator = torch.Generator().manual_seed(0)
    all_points = F.normalize(torch.randn(max(sizes), args.dim, generator=generator), dim=1)
    inits = {k: F.normalize(torch.randn(k, args.dim, generator=generator), dim=1) for k in cluster_counts}
    print(
        f"torch {torch.__version__}; curve N={list(sizes)} x K={list(cluster_counts)}, D={args.dim}, threads "
        f"{threads}; memory budget {DEFAULT_MEMORY_BUDGET_BYTES >> 20} MiB; load average at start "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    for t in threads:  # warm-up: MKL / OpenMP teams of both sizes, first-touch pages
        torch.set_num_threads(t)
        for k in cluster_counts:
            spherical_kmeans(all_points[:5000], k, iterations=1, init_centroids=inits[k])

    cells = {}
    for n in sizes:
        for k in cluster_counts:
            if 2 * n * k * args.dim > args.max_cell_gflop * 1e9:
                print(f"N={n} K={k}: not run (one matmul pass over {args.max_cell_gflop:g} GFLOP)")
                continue
            chunk = chunk_rows(k, all_points.device, DEFAULT_MEMORY_BUDGET_BYTES)
            least = args.iterations_1m if n >= 1_000_000 else args.min_iterations
            cells[(n, k)] = {
                "points": n, "clusters": k, "iterations": curve_iterations(n, k, args.dim, least), "chunk": chunk,
                "scratch_bytes": chunk * scratch_bytes_per_row(k, all_points.device), "n_by_k_bytes": 4 * n * k,
                "floor": {t: [] for t in threads}, "ours": {t: [] for t in threads}, "load": [],
            }
    rounds = 1 if args.quick else args.curve_rounds
    for round_index in range(rounds):
        for (n, k), cell in cells.items():
            if n >= args.one_round_from and round_index >= 1:
                continue  # fewer repeats at large N: one round of them costs most of the curve's time
            points, init, iterations = all_points[:n], inits[k], cell["iterations"]
            for t in threads:
                torch.set_num_threads(t)
                # The floor: the iterations + 1 matmuls k-means does (its iterations and the final assignment
                # against the final centroids), with its chunking; k-means adds the argmaxes and updates.
                floor_time, _ = timed(lambda: matmul_floor(points, init, iterations + 1, cell["chunk"]))
                ours_time, _ = timed(lambda: spherical_kmeans(points, k, iterations=iterations, init_centroids=init))
                cell["floor"][t].append(floor_time)
                cell["ours"][t].append(ours_time)
            cell["load"].append(os.getloadavg()[0])
            if "peak_bytes" not in cell:
                torch.set_num_threads(1)
                cell["peak_bytes"] = peak_bytes(
                    lambda: spherical_kmeans(points, k, iterations=1, init_centroids=init)
                )
            ratios = "  ".join(
                f"{t}T {cell['ours'][t][-1] / cell['floor'][t][-1]:.3f} "
                f"({cell['floor'][t][-1] / (iterations + 1) * 1e3:.1f} ms/matmul)"
                for t in threads
            )
            print(f"round {round_index + 1} N={n:>7} K={k:>4} i={iterations:>2}: {ratios}  "
                  f"peak {cell['peak_bytes'] / 2**20:.0f} MiB  load {cell['load'][-1]:.2f}", flush=True)
            if args.json:  # after every cell, so that an interrupted run leaves its measurements
                write_json(args.json, summarise(cells, threads, args), indent=1)
    result = summarise(cells, threads, args)
    print_curve_table(result)
    return result


def print_curve_table(result: dict) -> None:
    cells = {(c["points"], c["clusters"]): c for c in result["cells"]}
    sizes = sorted({n for n, _ in cells})
    cluster_counts = sorted({k for _, k in cells})
    print("\nours / floor per iteration, median of rounds, 1 thread / 2 threads; peak MiB above the input")
    print("| N \\ K | " + " | ".join(str(k) for k in cluster_counts) + " |")
    print("|---|" + "---|" * len(cluster_counts))
    for n in sizes:
        row = [
            f"{cells[(n, k)]['median_ratio_1']:.2f} / {cells[(n, k)]['median_ratio_2']:.2f}; "
            f"{cells[(n, k)]['peak_bytes'] / 2**20:.0f}" if (n, k) in cells else "not run"
            for k in cluster_counts
        ]
        print(f"| {n:,} | " + " | ".join(row) + " |")
    print(f"load average at end {result['load_end']:.2f}")


def plot_curve(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    cluster_counts = sorted({c["clusters"] for c in cells})
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for k in cluster_counts:
        row = sorted((c for c in cells if c["clusters"] == k), key=lambda c: c["points"])
        sizes = [c["points"] for c in row]
        for axis, t in zip(axes[:2], (1, 2)):
            axis.plot(sizes, [c[f"median_ratio_{t}"] for c in row], marker="o", label=f"K={k}")
        axes[2].plot(sizes, [c["peak_bytes"] / 2**20 for c in row], marker="o", label=f"K={k}")
    for axis, t in zip(axes[:2], (1, 2)):
        axis.axhline(1.2, color="grey", linestyle="--", label="target 1.2x")
        axis.set(xscale="log", xlabel="N embeddings (D=128)", ylabel="k-means time / matmul floor",
                 title=f"{t} thread{'s' if t > 1 else ''} (median of rounds)")
        axis.legend(fontsize=8)
    sizes = sorted({c["points"] for c in cells})
    axes[2].plot(sizes, [n * result["dim"] * 4 / 2**20 for n in sizes], color="black", linestyle=":",
                 label="float32 copy of the N x D input")
    axes[2].set(xscale="log", yscale="log", xlabel="N embeddings (D=128)", ylabel="MiB",
                title="resident peak of one call above its input")
    axes[2].legend(fontsize=8)
    figure.suptitle(f"spherical_kmeans vs its matmul floor, CPU, torch {result['torch']}, {result['date']}")
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=3000)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved (floor, ours) measurements")
    parser.add_argument("--loop-iterations", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=None, help="rows per chunk (default: the library's choice)")
    parser.add_argument("--curve", action="store_true", help="the N x K scaling curve instead of one point")
    parser.add_argument("--quick", action="store_true", help="with --curve: a small grid, one round")
    parser.add_argument("--curve-rounds", type=int, default=2, help="interleaved rounds of the curve")
    parser.add_argument("--one-round-from", type=int, default=300_000, help="N from which the curve runs one round")
    parser.add_argument("--max-cell-gflop", type=float, default=float("inf"),
                        help="skip curve cells whose one matmul pass (2 N K D) exceeds this (time on a busy machine)")
    parser.add_argument("--min-iterations", type=int, default=2, help="least k-means iterations per curve cell")
    parser.add_argument("--iterations-1m", type=int, default=1, help="k-means iterations per cell at N = 1M")
    parser.add_argument("--json", default=None, help="with --curve: write the results here")
    parser.add_argument("--plot", default=None, help="with --curve: write a PNG plot here")
    parser.add_argument("--replot", default=None, help="print the table (and --plot) of a --json file, no run")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:
            result = json.load(f)
        print_curve_table(result)
        if args.plot:
            plot_curve(result, args.plot)
        return
    if args.curve:
        result = run_curve(args)
        if args.plot:
            plot_curve(result, args.plot)
        return
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    points = F.normalize(torch.randn(args.points, args.dim, generator=generator), dim=1)
    init = F.normalize(torch.randn(args.clusters, args.dim, generator=generator), dim=1)
    chunk = chunk_rows(args.clusters, points.device, DEFAULT_MEMORY_BUDGET_BYTES, args.chunk)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; N={args.points} D={args.dim} "
        f"K={args.clusters}, {args.iterations} iterations, chunk={chunk} rows; "
        f"load average at start {os.getloadavg()[0]:.2f} (other processes on the machine skew wall times)"
    )

    # Warm-up (first-touch allocation, MKL initialisation).
    spherical_kmeans(points[:20_000], args.clusters, iterations=1, init_centroids=init, chunk_size=chunk)
    matmul_floor(points[:20_000], init, 1, chunk)

    floor_times, ours_times = [], []
    for _ in range(args.rounds):
        floor_time, _ = timed(lambda: matmul_floor(points, init, args.iterations, chunk))
        ours_time, result = timed(
            lambda: spherical_kmeans(
                points, args.clusters, iterations=args.iterations, init_centroids=init, chunk_size=chunk
            )
        )
        floor_times.append(floor_time)
        ours_times.append(ours_time)
        print(
            f"  round: floor {floor_time:6.2f} s   ours {ours_time:6.2f} s   ratio {ours_time / floor_time:.3f}"
            f"   (load average {os.getloadavg()[0]:.2f})"
        )
    floor_best, ours_best = min(floor_times), min(ours_times)
    ratios = [o / f for o, f in zip(ours_times, floor_times)]
    print(
        f"floor ({args.iterations} matmuls) best {floor_best:.2f} s; ours ({args.iterations} iterations) best "
        f"{ours_best:.2f} s\nours / floor: best/best {ours_best / floor_best:.3f}, median of rounds "
        f"{statistics.median(ratios):.3f}"
    )
    print(
        f"  (ours does {args.iterations + 1} assignment steps, {args.iterations} in the iterations and the final "
        f"one against the final centroids, and {args.iterations} updates; best ours / {args.iterations + 1} "
        f"matmuls: {ours_best / floor_best * args.iterations / (args.iterations + 1):.3f})"
    )

    # The authors' per-cluster loop, a few iterations, extrapolated.
    loop_centroids, loop_assignments, assign_times, update_times = loop_kmeans(points, init, args.loop_iterations)
    loop_extrapolated = (args.iterations + 1) * statistics.mean(assign_times) + args.iterations * statistics.mean(
        update_times
    )
    short = spherical_kmeans(
        points, args.clusters, iterations=args.loop_iterations, init_centroids=init, chunk_size=chunk
    )
    same = torch.allclose(short.centroids, loop_centroids, atol=1e-5) and torch.equal(
        short.assignments, loop_assignments
    )
    print(
        f"authors-style loop k-means, {args.loop_iterations} iterations measured (same result as ours: {same}): "
        f"assignment step {statistics.mean(assign_times):.2f} s, update step {statistics.mean(update_times):.2f} s"
    )
    print(
        f"  extrapolated to {args.iterations} iterations: {loop_extrapolated:.2f} s = "
        f"{loop_extrapolated / ours_best:.2f}x ours"
    )
    # The update steps alone, on the final assignments of ours.
    assignments, centroids = result.assignments, result.centroids
    loop_update_time = min(timed(lambda: loop_update(points, assignments, centroids))[0] for _ in range(2))

    def ours_full_update() -> torch.Tensor:
        # The first iteration's update, which sums every row (later ones move only the rows that changed).
        member_sums = _MemberSums(centroids.shape[0], centroids.shape[1], like=points)
        member_sums.recompute(points, assignments)
        return member_sums.centroids(centroids)

    ours_update_time = min(timed(ours_full_update)[0] for _ in range(5))
    print(
        f"update step alone: per-cluster loop {loop_update_time * 1e3:.1f} ms, ours (index_add_ + bincount, all rows) "
        f"{ours_update_time * 1e3:.1f} ms = {loop_update_time / ours_update_time:.1f}x faster"
    )
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
