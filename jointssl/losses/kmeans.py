"""Distributed spherical k-means (the clustering step of DeepCluster-v2).

Every rank holds a shard of the embeddings. The result is identical to one process holding the concatenation
of all shards in rank order: the initial centroids are rows chosen by global index with a seeded generator,
and each iteration all-reduces the per-cluster sums and counts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from jointssl.distributed import all_gather_cat, all_reduce_sum, rank

# Elements of one chunk of the [chunk, K] score matrix. On CPU the block (4 MiB: about 2 MiB per core with 2
# threads) stays in cache between the matmul that writes it and the argmax that reads it; chunks of half or
# four times the size measured slower in benchmarks/bench_kmeans.py. On an accelerator larger blocks mean
# fewer kernel launches while memory stays bounded (256 MiB).
_CPU_CHUNK_ELEMENTS = 1 << 20
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 26
# Column groups of the CPU argmax in _NearestCentroids._grouped_argmax (at K=3000, 16 took less time than 4, 8
# or 32 in the setting of benchmarks/bench_kmeans.py).
_ARGMAX_GROUPS = 16
# Below this K the plain torch.argmax is used on CPU too: at K = 30 and 100 its scalar loop over a short row
# cost less than the grouped argmax's four ops (measured 80 vs 145 ms and 80 vs 170 ms per 200k rows, one
# thread); from about K = 300 on the grouped one is as fast or faster.
_MIN_CLUSTERS_FOR_GROUPS = 256
# Default bound on the scratch memory of the assignment step (the [chunk, K] scores and the argmax buffers):
# the chunk never holds more rows than fit in it, so no N x K matrix is made whatever N is.
DEFAULT_MEMORY_BUDGET_BYTES = 256 << 20
# Rows whose norm is within this of 1 are taken as unit length (float32 rounding of a normalised row is ~1e-7).
_UNIT_NORM_TOLERANCE = 1e-5
# Below this norm per member a cluster's unit members are taken to cancel out (see _MemberSums.centroids).
_CANCELLED_NORM_PER_MEMBER = 1e-6


class KMeansResult(NamedTuple):
    """centroids: [K, D] L2-normalised float32; assignments: [N_local] nearest centroid of each local row."""

    centroids: Tensor
    assignments: Tensor


@torch.no_grad()
def spherical_kmeans(
    embeddings: Tensor,
    num_clusters: int,
    iterations: int = 10,
    seed: int = 0,
    init_centroids: Tensor | None = None,
    chunk_size: int | None = None,
    keys: Tensor | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> KMeansResult:
    """Spherical k-means (cosine similarity) over the embeddings of all ranks.

    Args:
        embeddings: [N_local, D] this rank's rows (normalised to unit length here; any float dtype). All ranks
            must call this together when torch.distributed is initialised; N_local may differ between ranks.
        num_clusters: K; the ranks together must hold at least K rows.
        iterations: assignment + update steps; the returned assignments are then recomputed against the final
            centroids (as in the DeepCluster-v2 reference).
        seed: seeds the choice of the K distinct global rows that initialise the centroids.
        keys: [N_local] distinct integer ids of the rows (global sample indices). With keys, the initial rows
            are chosen by (seed, key) alone, so the result does not depend on how the rows are split between
            ranks or ordered (two ranks with half the samples each cluster exactly as one process with all);
            without, by position in the rank-ordered concatenation.
        init_centroids: [K, D] starting centroids (same on every rank) instead of the seeded choice.
        chunk_size: rows scored against the centroids at once (bounds the [chunk, K] score matrix); by default
            chosen from K and the device (a cache-sized block on CPU). Capped by memory_budget_bytes.
        memory_budget_bytes: most bytes the assignment step's scratch buffers may take (scores and argmax
            buffers: about 4 * K bytes per chunk row); the chunk holds at most as many rows as fit. Beyond it
            k-means holds a float32 copy of the embeddings, the [N_local] assignments and [K, D] sums.

    Returns:
        KMeansResult. A cluster that receives no row keeps its previous centroid.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        points = _unit_rows(embeddings.detach().float())
        if init_centroids is None:
            centroids = _seeded_initial_centroids(points, num_clusters, seed, keys)
        else:
            if tuple(init_centroids.shape) != (num_clusters, points.shape[1]):
                raise ValueError(
                    f"init_centroids must be [{num_clusters}, {points.shape[1]}], "
                    f"got shape {tuple(init_centroids.shape)}"
                )
            centroids = F.normalize(init_centroids.detach().to(points.device, torch.float32), dim=1)

        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        rows_per_chunk = chunk_rows(num_clusters, points.device, memory_budget_bytes, chunk_size)
        nearest_centroids = _NearestCentroids(points.shape[0], num_clusters, rows_per_chunk, like=points)
        assignments = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
        previous = torch.empty_like(assignments)
        member_sums = _MemberSums(num_clusters, points.shape[1], like=points)

        for iteration in range(iterations):
            nearest_centroids(points, centroids, out=assignments)
            if iteration == 0:
                member_sums.recompute(points, assignments)
            else:
                member_sums.move_changed(points, previous, assignments)
            centroids = member_sums.centroids(centroids)
            previous.copy_(assignments)
        nearest_centroids(points, centroids, out=assignments)
    return KMeansResult(centroids=centroids, assignments=assignments)


def _unit_rows(points: Tensor) -> Tensor:
    """The rows scaled to unit length; the input itself when they already are (within float32 rounding).

    Embeddings of a normalised projection head (DeepCluster-v2's memory bank) already are: then no copy is made.
    A fresh [N, D] tensor costs about one matmul pass at K = 100 (page faults on first touch: measured 121 ms
    for 300k x 128 rows with one thread, against 13 ms for the norms alone), which at 1-2 iterations is a third
    of k-means' time.
    """
    norms = torch.linalg.vector_norm(points, dim=1, keepdim=True)
    if points.numel() and bool(((norms - 1.0).abs() <= _UNIT_NORM_TOLERANCE).all()):
        return points
    return points / norms.clamp_min(1e-12)  # F.normalize's epsilon: zero rows stay zero


def _keyed_hash(keys: Tensor, seed: int) -> Tensor:
    """A well-mixed 62-bit hash of (seed, key) per key (splitmix64's finaliser, in wrapping int64 arithmetic)."""
    x = keys * -7046029254386353131 + (seed * 0x2545F491 + 0x632BE59B)  # golden-ratio multiply, seed offset
    x = (x ^ ((x >> 30) & 0x3FFFFFFFF)) * -4658895280553007687
    x = (x ^ ((x >> 27) & 0x1FFFFFFFFF)) * -7723592293110705685
    x = x ^ ((x >> 31) & 0x1FFFFFFFF)
    return x & 0x3FFFFFFFFFFFFFFF


def _default_chunk_size(num_clusters: int, device: torch.device) -> int:
    elements = _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS
    return max(1, elements // num_clusters)


def _uses_grouped_argmax(num_clusters: int, device: torch.device) -> bool:
    return device.type == "cpu" and num_clusters >= _MIN_CLUSTERS_FOR_GROUPS


def scratch_bytes_per_row(num_clusters: int, device: torch.device) -> int:
    """Bytes of _NearestCentroids' buffers per chunk row: the padded float32 scores, and with the grouped
    argmax its group maxima, column index and candidates."""
    if not _uses_grouped_argmax(num_clusters, device):
        return 4 * num_clusters
    width = -(-num_clusters // _ARGMAX_GROUPS)
    return 4 * _ARGMAX_GROUPS * width + 4 * width + 8 + 4 * _ARGMAX_GROUPS


def chunk_rows(
    num_clusters: int, device: torch.device, memory_budget_bytes: int, chunk_size: int | None = None
) -> int:
    """Rows per chunk: chunk_size or the device default, capped so that the scratch fits the budget."""
    per_row = scratch_bytes_per_row(num_clusters, device)
    if memory_budget_bytes < per_row:
        raise ValueError(
            f"memory_budget_bytes={memory_budget_bytes} is below one row of scores at K={num_clusters} "
            f"({per_row} bytes)"
        )
    return min(chunk_size or _default_chunk_size(num_clusters, device), memory_budget_bytes // per_row)


def _seeded_initial_centroids(points: Tensor, num_clusters: int, seed: int, keys: Tensor | None = None) -> Tensor:
    """K distinct rows of the global (rank-ordered) concatenation, the same on every rank: a seeded random
    choice by position, or with `keys` the K rows of lowest seeded hash of their key (in that order)."""
    local_count = torch.tensor([points.shape[0]], dtype=torch.long, device=points.device)
    counts_per_rank = all_gather_cat(local_count).tolist()
    total = sum(counts_per_rank)
    if total < num_clusters:
        raise ValueError(f"k-means needs at least num_clusters={num_clusters} embeddings, got {total} in all")
    offset = sum(counts_per_rank[: rank()])
    if keys is None:
        # A CPU generator: the same permutation on every rank whatever its device.
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(total, generator=generator)[:num_clusters].to(points.device)
    else:
        if keys.shape != (points.shape[0],):
            raise ValueError(f"keys must be [{points.shape[0]}], got shape {tuple(keys.shape)}")
        priorities = all_gather_cat(_keyed_hash(keys.to(points.device, torch.long), seed))
        chosen = priorities.argsort(stable=True)[:num_clusters]
    local_rows = chosen - offset
    owned = (local_rows >= 0) & (local_rows < points.shape[0])
    centroids = points.new_zeros((num_clusters, points.shape[1]))
    centroids[owned] = points[local_rows[owned]]
    # Each chosen row is owned by exactly one rank: the sum is that row.
    return all_reduce_sum(centroids)


class _ChunkViews(NamedTuple):
    """Views of the reused buffers for one chunk size, made once (each view op costs Python and dispatch time,
    a few percent of the matmul per chunk)."""

    mm_out: Tensor  # [rows, K] scores written by the matmul
    grouped: Tensor  # [rows, G, W] view of the padded scores
    group_max: Tensor  # [rows, W] maximum over the G groups
    column: Tensor  # [rows] argmax of group_max
    column_index: Tensor  # [rows, G, 1] view of `column`, expanded over the groups (gather's index)
    candidates: Tensor  # [rows, G, 1] scores at (g, column) of each group g


class _NearestCentroids:
    """Assigns rows to their most similar centroid, scoring a chunk of rows at a time into reused buffers (no
    allocation, and on CPU no fresh pages to fault in, inside the k-means loop)."""

    def __init__(self, num_rows: int, num_clusters: int, rows_per_chunk: int, like: Tensor) -> None:
        self.num_clusters = num_clusters
        self.rows_per_chunk = rows_per_chunk
        buffer_rows = min(rows_per_chunk, num_rows)
        # On CPU a row-wise argmax over K columns is a scalar loop (measured: a quarter of the matmul's time at
        # K=3000), while a maximum over column groups is vectorised: see _grouped_argmax. Elsewhere, and on
        # CPU for small K, torch.argmax is the cheaper one.
        self.use_groups = _uses_grouped_argmax(num_clusters, like.device)
        groups = _ARGMAX_GROUPS if self.use_groups else 1
        # K padded to a multiple of the number of groups; the padding columns hold -inf and are never written.
        group_width = -(-num_clusters // groups)
        self.scores = like.new_full((buffer_rows, groups, group_width), float("-inf"))
        used_rows = buffer_rows if self.use_groups else 0
        self.group_max = like.new_empty((used_rows, group_width))
        self.column = torch.empty(used_rows, dtype=torch.long, device=like.device)
        self.candidates = like.new_empty((used_rows, groups, 1))
        self._views: dict[int, _ChunkViews] = {}

    def __call__(self, points: Tensor, centroids: Tensor, out: Tensor) -> None:
        """out[i] = argmax_k <points[i], centroids[k]> (ties broken deterministically)."""
        centroids_t = centroids.t()
        for block, block_out in zip(points.split(self.rows_per_chunk), out.split(self.rows_per_chunk)):
            views = self._chunk_views(block.shape[0])
            torch.mm(block, centroids_t, out=views.mm_out)
            if self.use_groups:
                self._grouped_argmax(views, out=block_out)
            else:
                torch.argmax(views.mm_out, dim=1, out=block_out)

    def _chunk_views(self, rows: int) -> _ChunkViews:
        if rows not in self._views:
            grouped = self.scores[:rows]
            groups = grouped.shape[1]
            column = self.column[:rows]
            self._views[rows] = _ChunkViews(
                mm_out=grouped.view(rows, -1)[:, : self.num_clusters],
                grouped=grouped,
                group_max=self.group_max[:rows],
                column=column,
                column_index=column.view(-1, 1, 1).expand(-1, groups, 1),
                candidates=self.candidates[:rows],
            )
        return self._views[rows]

    @staticmethod
    def _grouped_argmax(views: _ChunkViews, out: Tensor) -> None:
        """Row-wise argmax of scores seen as G groups of W columns, without a K-wide scalar argmax.

        One vectorised maximum over the groups leaves, for every column c < W, the maximum over columns
        c, W + c, ..., (G - 1) * W + c. The argmax over those W maxima is the column c of the row's maximum
        within its group; the argmax over the G candidates g * W + c is its group g. (A tree of pairwise
        maxima did as well on an idle machine but worse on a busy one: each op is one more parallel region
        that waits for a descheduled thread.)
        """
        torch.amax(views.grouped, dim=1, out=views.group_max)
        torch.argmax(views.group_max, dim=1, out=views.column)
        torch.gather(views.grouped, 2, views.column_index, out=views.candidates)
        group = views.candidates.argmax(dim=1).squeeze(1)
        torch.add(views.column, group, alpha=views.grouped.shape[2], out=out)


class _MemberSums:
    """This rank's per-cluster sums and counts of its rows, kept from one iteration to the next.

    After the first iteration only the rows whose cluster changed are moved (subtracted from the old cluster,
    added to the new): a few percent of the rows after the first iterations (measured 4-16% per iteration on
    random unit vectors at K = 30-300), where summing every row again is a serial index_add_ pass over all of
    them that costs about 0.6 of a matmul pass at K = 30 (benchmarks/README.md). The sums are float64 so that
    the moves do not accumulate float32 rounding; they are all-reduced in float64 too.
    """

    def __init__(self, num_clusters: int, dim: int, like: Tensor) -> None:
        self.sums = like.new_zeros((num_clusters, dim), dtype=torch.float64)
        self.counts = like.new_zeros(num_clusters, dtype=torch.long)

    def recompute(self, points: Tensor, assignments: Tensor) -> None:
        # index_add_ into a contiguous float32 tensor (into a column slice of a wider one it is several times
        # slower; from a float64 copy of every row 370 vs 47 ms at 300k x 128, K = 100, one thread), then widened
        # once.
        num_clusters, dim = self.sums.shape
        self.sums.copy_(points.new_zeros((num_clusters, dim)).index_add_(0, assignments, points))
        self.counts.copy_(torch.bincount(assignments, minlength=num_clusters))

    def move_changed(self, points: Tensor, before: Tensor, after: Tensor) -> None:
        changed = (before != after).nonzero().squeeze(1)
        rows = points.index_select(0, changed).double()
        old, new = before.index_select(0, changed), after.index_select(0, changed)
        self.sums.index_add_(0, old, rows, alpha=-1).index_add_(0, new, rows)
        ones = torch.ones_like(changed)
        self.counts.index_add_(0, old, ones, alpha=-1).index_add_(0, new, ones)

    def centroids(self, previous: Tensor) -> Tensor:
        """Normalised member sums over all ranks; clusters without members keep their previous centroid."""
        sums = all_reduce_sum(self.sums.clone())
        counts = all_reduce_sum(self.counts.clone())
        norms = sums.norm(dim=1, keepdim=True)
        # A cluster whose members cancel out has no direction either: it keeps its centroid too. "Cancel" is
        # within the float32 rounding of the first sums (about 6e-8 per unit member), not an exact 0, which the
        # moves' float64 residue would hide.
        cancelled = norms <= counts.unsqueeze(1) * _CANCELLED_NORM_PER_MEMBER
        keep_previous = (counts == 0).unsqueeze(1) | cancelled
        centroids = (sums / norms.clamp_min(torch.finfo(torch.float64).tiny)).float()
        return torch.where(keep_previous, previous, centroids)
