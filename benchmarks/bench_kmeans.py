"""Benchmark of jointssl.losses.spherical_kmeans (not a test; takes a few minutes on 2 CPU threads).

Measures, in the same run and interleaved round by round (so that load from other processes hits both alike):
  * ours:  spherical_kmeans, `iterations` iterations (plus the final assignment step it always does);
  * floor: the `iterations` embedding-by-centroid matmuls alone, with the same chunking and a reused output
           buffer (the least work any k-means of this kind must do);
  * loop:  k-means as in the DeepCluster-v2 authors' public code (facebookresearch/swav main_deepclusterv2.py):
           one unchunked matmul + max per assignment step, and a Python loop over the clusters (member indices
           from a scipy CSR matrix, as their get_indices_sparse) for the update. It is slow, so it runs only
           `--loop-iterations` iterations and is extrapolated to `iterations` (+ the final assignment), and its
           update step alone is also compared with ours (index_add_ + bincount).

Usage: .venv/bin/python benchmarks/bench_kmeans.py [--points 100000 --dim 128 --clusters 3000 --threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import csr_matrix

from jointssl.losses import spherical_kmeans
from jointssl.losses.kmeans import _default_chunk_size, _updated_centroids


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
    """The authors' get_indices_sparse: row indices of each cluster's members via a CSR matrix."""
    cols = np.arange(assignments.size)
    matrix = csr_matrix((cols, (assignments.ravel(), cols)), shape=(int(num_clusters), assignments.size))
    return [np.unravel_index(row.data, assignments.shape)[0] for row in matrix]


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    points = F.normalize(torch.randn(args.points, args.dim, generator=generator), dim=1)
    init = F.normalize(torch.randn(args.clusters, args.dim, generator=generator), dim=1)
    chunk = args.chunk or _default_chunk_size(args.clusters, points.device)
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
    ours_update_time = min(timed(lambda: _updated_centroids(points, assignments, centroids))[0] for _ in range(5))
    print(
        f"update step alone: per-cluster loop {loop_update_time * 1e3:.1f} ms, ours (index_add_ + bincount) "
        f"{ours_update_time * 1e3:.1f} ms = {loop_update_time / ours_update_time:.1f}x faster"
    )
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
