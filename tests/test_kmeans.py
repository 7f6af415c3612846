"""Spherical k-means: agreement with a plain reference, recovery, empty clusters, chunking, determinism."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from jointssl.losses import KMeansResult, spherical_kmeans
from jointssl.losses import kmeans
from jointssl.losses.kmeans import _NearestCentroids


def reference_kmeans(points: torch.Tensor, init: torch.Tensor, iterations: int):
    """Spherical k-means written plainly in float64: loop over clusters, mean of members, keep empty ones."""
    points = F.normalize(points.double(), dim=1)
    centroids = F.normalize(init.double(), dim=1)
    for _ in range(iterations):
        assignments = (points @ centroids.t()).argmax(dim=1)
        for k in range(centroids.shape[0]):
            members = points[assignments == k]
            if len(members) > 0:
                centroids[k] = F.normalize(members.mean(dim=0), dim=0)
    return centroids, (points @ centroids.t()).argmax(dim=1)


def blobs(num_blobs: int, per_blob: int, dim: int, noise: float, seed: int = 0):
    """Points around `num_blobs` random unit directions; returns (points, true labels, directions)."""
    generator = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(num_blobs, dim, generator=generator), dim=1)
    labels = torch.arange(num_blobs).repeat_interleave(per_blob)
    points = directions[labels] + noise * torch.randn(len(labels), dim, generator=generator)
    order = torch.randperm(len(labels), generator=generator)
    return F.normalize(points[order], dim=1), labels[order], directions


def test_matches_reference_from_the_same_start():
    points, _, _ = blobs(6, 30, 8, noise=0.6, seed=1)
    init = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(2))[:5]]
    result = spherical_kmeans(points, 5, iterations=4, init_centroids=init)
    ref_centroids, ref_assignments = reference_kmeans(points, init, 4)
    assert isinstance(result, KMeansResult)
    torch.testing.assert_close(result.centroids.double(), ref_centroids, rtol=1e-5, atol=1e-6)
    assert torch.equal(result.assignments, ref_assignments)


def test_recovers_well_separated_clusters():
    points, labels, directions = blobs(5, 40, 16, noise=0.05, seed=3)
    # One noisy sample of each blob as the start (a seeded random start may put two in one blob).
    init = torch.stack([points[labels == k][0] for k in range(5)]) + 0.1
    result = spherical_kmeans(points, 5, iterations=5, init_centroids=init)
    assert torch.equal(result.assignments, labels)
    assert ((result.centroids * directions).sum(dim=1) > 0.995).all()
    torch.testing.assert_close(result.centroids.norm(dim=1), torch.ones(5))


def test_seeded_start_uses_distinct_input_rows_and_is_deterministic():
    points, _, _ = blobs(4, 25, 8, noise=0.5, seed=4)
    start = spherical_kmeans(points, 10, iterations=0, seed=7).centroids
    matches = (start @ points.t()).isclose(torch.tensor(1.0), atol=1e-6)
    assert (matches.sum(dim=1) >= 1).all()
    assert len({int(row.nonzero()[0]) for row in matches}) == 10
    first = spherical_kmeans(points, 10, iterations=3, seed=7)
    again = spherical_kmeans(points, 10, iterations=3, seed=7)
    other = spherical_kmeans(points, 10, iterations=0, seed=8)
    assert torch.equal(first.centroids, again.centroids) and torch.equal(first.assignments, again.assignments)
    assert not torch.equal(start, other.centroids)


def test_empty_cluster_keeps_its_centroid():
    points = F.normalize(torch.rand(50, 6, generator=torch.Generator().manual_seed(5)) + 0.1, dim=1)
    # Data in the positive orthant; the last centroid points away from all of it and never wins a point.
    init = torch.cat([points[:3], -torch.ones(1, 6)])
    result = spherical_kmeans(points, 4, iterations=5, init_centroids=init)
    assert (result.assignments != 3).all()
    torch.testing.assert_close(result.centroids[3], F.normalize(-torch.ones(6), dim=0))
    assert torch.isfinite(result.centroids).all()


def test_cluster_whose_members_cancel_keeps_its_centroid():
    axis = torch.eye(3)
    points = torch.stack([axis[1], -axis[1]])  # both orthogonal to the only centroid, and opposite
    result = spherical_kmeans(points, 1, iterations=3, init_centroids=axis[:1])
    torch.testing.assert_close(result.centroids, axis[:1])


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_equals_unchunked(chunk_size):
    points, _, _ = blobs(8, 25, 12, noise=0.5, seed=6)
    whole = spherical_kmeans(points, 9, iterations=4, seed=1, chunk_size=len(points))
    chunked = spherical_kmeans(points, 9, iterations=4, seed=1, chunk_size=chunk_size)
    torch.testing.assert_close(chunked.centroids, whole.centroids)
    assert torch.equal(chunked.assignments, whole.assignments)


@pytest.mark.parametrize("num_clusters", [1, 7, 8, 13, 300])
def test_assignment_is_the_argmax_for_any_number_of_clusters(num_clusters):
    generator = torch.Generator().manual_seed(num_clusters)
    points = F.normalize(torch.randn(500, 16, generator=generator), dim=1)
    centroids = F.normalize(torch.randn(num_clusters, 16, generator=generator), dim=1)
    result = spherical_kmeans(points, num_clusters, iterations=0, init_centroids=centroids, chunk_size=37)
    assert torch.equal(result.assignments, (points @ centroids.t()).argmax(dim=1))


@pytest.mark.parametrize("num_clusters", [37, 300])
def test_grouped_argmax_equals_plain_argmax_path(num_clusters, monkeypatch):
    """The CPU grouped argmax (K >= 256 by default) and the plain torch.argmax give the same assignments."""
    generator = torch.Generator().manual_seed(11)
    points = F.normalize(torch.randn(300, 16, generator=generator), dim=1)
    centroids = F.normalize(torch.randn(num_clusters, 16, generator=generator), dim=1)
    grouped, plain = torch.empty(300, dtype=torch.long), torch.empty(300, dtype=torch.long)
    monkeypatch.setattr(kmeans, "_MIN_CLUSTERS_FOR_GROUPS", 1)
    search = _NearestCentroids(300, num_clusters, 64, like=points)
    assert search.use_groups
    search(points, centroids, out=grouped)
    monkeypatch.setattr(kmeans, "_MIN_CLUSTERS_FOR_GROUPS", 10**9)
    search = _NearestCentroids(300, num_clusters, 64, like=points)
    assert not search.use_groups
    search(points, centroids, out=plain)
    assert torch.equal(grouped, plain)


def test_default_argmax_path_follows_the_number_of_clusters():
    cpu = torch.device("cpu")
    assert not kmeans._uses_grouped_argmax(30, cpu) and kmeans._uses_grouped_argmax(3000, cpu)
    assert not kmeans._uses_grouped_argmax(3000, torch.device("meta"))


@pytest.mark.parametrize("num_clusters", [30, 3000])
def test_chunk_rows_fit_the_memory_budget(num_clusters):
    cpu = torch.device("cpu")
    per_row = kmeans.scratch_bytes_per_row(num_clusters, cpu)
    assert per_row >= 4 * num_clusters
    for budget in (per_row, 10 * per_row + 3, 1 << 20, kmeans.DEFAULT_MEMORY_BUDGET_BYTES):
        rows = kmeans.chunk_rows(num_clusters, cpu, budget)
        assert 1 <= rows and rows * per_row <= budget
    # The budget caps an explicit chunk_size too; below it the default (cache-sized) chunk is kept.
    assert kmeans.chunk_rows(num_clusters, cpu, 5 * per_row, chunk_size=100) == 5
    assert kmeans.chunk_rows(num_clusters, cpu, 1 << 40) == kmeans._default_chunk_size(num_clusters, cpu)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        kmeans.chunk_rows(num_clusters, cpu, per_row - 1)


def test_buffers_of_a_large_run_stay_within_the_budget_and_results_do_not_change(monkeypatch):
    """Every score/argmax buffer made during a run fits the budget, and a tiny budget gives the same result."""
    generator = torch.Generator().manual_seed(12)
    points = torch.randn(50_000, 8, generator=generator)
    budget = 64 << 10  # 64 KiB: 40 rows at K = 300 (an N x K float matrix would be 60 MB)
    made = []
    original_init = _NearestCentroids.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made.append(sum(t.numel() * t.element_size() for t in (self.scores, self.group_max, self.column,
                                                                 self.candidates)))

    monkeypatch.setattr(_NearestCentroids, "__init__", recording_init)
    small = spherical_kmeans(points, 300, iterations=2, seed=0, memory_budget_bytes=budget)
    assert made and max(made) <= budget
    default = spherical_kmeans(points, 300, iterations=2, seed=0)
    assert made[-1] > budget
    torch.testing.assert_close(small.centroids, default.centroids)
    assert torch.equal(small.assignments, default.assignments)


PEAK_SCRIPT = """
import ctypes, sys, torch
from jointssl.losses import spherical_kmeans
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: freed blocks leave the resident set
torch.set_num_threads(1)
points = torch.nn.functional.normalize(torch.randn(300_000, 16), dim=1)
spherical_kmeans(points[:1000], 1000, iterations=1, seed=0)  # first-use allocations of torch itself
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident set
base = status("VmRSS:")
# chunk_size asks for all rows at once: only the budget bounds the scores.
spherical_kmeans(points, 1000, iterations=1, seed=0, chunk_size=300_000, memory_budget_bytes=int(sys.argv[1]))
print(status("VmHWM:") - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_of_a_large_run_stays_within_the_budget():
    """Measured: the resident-set peak of k-means over 300k rows at K = 1000 (an N x K float matrix is 1.2 GB)
    stays within the points' copy, the assignments, [K, D] sums and the budget, plus slack for the allocator."""
    budget = 8 << 20
    peak = int(subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(budget)], capture_output=True, text=True,
                              check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()[-1])
    inputs = 300_000 * 16 * 4 + 300_000 * 8 * 2  # float32 copy, assignments and the bincount's input
    assert peak <= inputs + budget + (16 << 20), peak


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_degenerate_rows_and_no_nan(dtype):
    generator = torch.Generator().manual_seed(7)
    points = torch.randn(40, 8, generator=generator)
    points[5] = 0.0  # a zero embedding
    points[10:20] = points[9]  # duplicates
    points[30] = 6e4  # at the top of float16's range: squares overflow if normalised in low precision
    points[31] = 1e-7  # float16 subnormals
    result = spherical_kmeans(points.to(dtype), 40, iterations=3, seed=0)  # K = N: clusters of one or none
    assert result.centroids.dtype == torch.float32 and torch.isfinite(result.centroids).all()
    assert result.assignments.dtype == torch.long and result.assignments.shape == (40,)
    norms = result.centroids.norm(dim=1)
    assert ((norms - 1).abs() < 1e-5).logical_or(norms == 0).all()


def test_autocast_does_not_lower_precision():
    points, _, _ = blobs(4, 20, 8, noise=0.5, seed=8)
    plain = spherical_kmeans(points, 4, iterations=3, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = spherical_kmeans(points, 4, iterations=3, seed=2)
    assert torch.equal(plain.centroids, autocast.centroids) and autocast.centroids.dtype == torch.float32


def test_rejects_too_few_points_and_bad_arguments():
    with pytest.raises(ValueError, match="at least num_clusters"):
        spherical_kmeans(torch.randn(3, 4), 5)
    with pytest.raises(ValueError):
        spherical_kmeans(torch.randn(10, 4), 2, init_centroids=torch.randn(3, 4))
    with pytest.raises(ValueError):
        spherical_kmeans(torch.randn(10, 4), 2, chunk_size=0)


def test_keyed_initialisation_does_not_depend_on_row_order() -> None:
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(300, 8, generator=generator)
    keys = torch.arange(1000, 1300)
    order = torch.randperm(300, generator=generator)
    first = spherical_kmeans(points, 12, iterations=5, seed=3, keys=keys)
    shuffled = spherical_kmeans(points[order], 12, iterations=5, seed=3, keys=keys[order])
    torch.testing.assert_close(shuffled.centroids, first.centroids)
    assert torch.equal(shuffled.assignments, first.assignments[order])
    # Without keys the choice follows the positions, so a permutation starts k-means elsewhere.
    unkeyed = spherical_kmeans(points[order], 12, iterations=0, seed=3)
    assert not torch.allclose(unkeyed.centroids, spherical_kmeans(points, 12, iterations=0, seed=3).centroids)
    with pytest.raises(ValueError, match="keys must be"):
        spherical_kmeans(points, 12, keys=keys[:5])


def test_moving_changed_rows_keeps_the_sums_of_a_full_recount() -> None:
    generator = torch.Generator().manual_seed(3)
    points = F.normalize(torch.randn(500, 16, generator=generator), dim=1)
    before = torch.randint(0, 7, (500,), generator=generator)
    after = before.clone()
    after[::9] = torch.randint(0, 6, (after[::9].numel(),), generator=generator)
    after[before == 6] = 2  # cluster 6 is emptied by the moves
    moved = kmeans._MemberSums(7, 16, like=points)
    moved.recompute(points, before)
    moved.move_changed(points, before, after)
    recounted = kmeans._MemberSums(7, 16, like=points)
    recounted.recompute(points, after)
    assert torch.equal(moved.counts, recounted.counts) and int(moved.counts[6]) == 0
    torch.testing.assert_close(moved.sums, recounted.sums, rtol=0, atol=1e-5)
    previous = F.normalize(torch.randn(7, 16, generator=generator), dim=1)
    centroids = moved.centroids(previous)
    torch.testing.assert_close(centroids, recounted.centroids(previous), rtol=0, atol=1e-6)
    assert torch.equal(centroids[6], previous[6])  # emptied: keeps its centroid despite the float residue


def test_unit_rows_are_used_without_a_copy_and_others_are_normalised() -> None:
    unit = F.normalize(torch.randn(50, 8), dim=1)
    assert kmeans._unit_rows(unit) is unit
    raw = 3.0 * unit
    raw[4] = 0.0
    scaled = kmeans._unit_rows(raw)
    torch.testing.assert_close(scaled[:4], unit[:4])
    assert torch.equal(scaled[4], torch.zeros(8)) and raw[0].norm() > 2  # zero rows stay zero; input untouched
