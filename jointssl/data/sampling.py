"""Resumable sampling of the training streams: which samples a rank reads, in which order, with which augmentation
seed — all functions of (seed, epoch, pass, rank), so that a run killed mid-epoch and resumed from a checkpoint
reads exactly the batches (and draws exactly the crops) that the uninterrupted run would have.

Pieces, from the inside out:

* :class:`ResumableSampler` — a :class:`~torch.utils.data.DistributedSampler` (Lightning leaves loaders that
  already have one alone under DDP) whose order is DistributedSampler's (permutation seeded by ``seed + epoch``,
  padded to a multiple of the world size, rank ``r`` takes every ``world``-th index from ``r``). It also gives
  every slot of a pass a seed for the sample's augmentation (:class:`SampleKey`).
* :class:`ResumableBatchSampler` — batches of :class:`SampleKey` of one *pass* (one iteration over the loader);
  a pass may start after its first ``skip`` batches, which are skipped by index arithmetic, never decoded.
* :class:`ResumableDataLoader` — a DataLoader with ``state_dict``/``load_state_dict``, so Lightning stores its
  position in the checkpoint (``CombinedLoader`` saves the state of every loader that has them) and restores it
  before the first batch of the resumed run (``JointDataModule`` also saves and restores the positions itself,
  for the case where Lightning does not: see ``JointDataModule.state_dict``).
* :class:`SeededDataset` — wraps a dataset so that the item for a :class:`SampleKey` is augmented with torch's
  global RNG seeded from the key (in a forked RNG state: the training process's own stream is not touched), plus
  any other random state registered with it (MONAI's, for volumes).

A *pass* is one iteration over a loader. In an epoch the longest stream makes one pass; a shorter stream of a
``CombinedLoader`` in ``max_size_cycle`` mode is iterated again each time it runs out, and every such pass gets its
own order and augmentation seeds. Pass 0 of an epoch is ordered exactly like DistributedSampler.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

logger = logging.getLogger("jointssl.data")

#: Version of the loader state stored in checkpoints.
LOADER_STATE_VERSION = 1
# Domains of the random streams derived from (seed, epoch, pass): sample order of passes after the first, and
# the per-slot augmentation seeds.
_ORDER, _AUGMENTATION = 0, 1


class SampleKey(NamedTuple):
    """What a :class:`ResumableBatchSampler` yields for one sample: the dataset position and the seed of its
    augmentation."""

    position: int
    seed: int


@dataclass(frozen=True)
class PassPlan:
    """One pass over a loader: its epoch, its number within the epoch, and how many leading batches to skip."""

    epoch: int
    pass_index: int
    skip: int = 0


class ResumableSampler(DistributedSampler):
    """DistributedSampler order (disjoint shards, reshuffled every epoch by ``set_epoch``), with a fresh order for
    every further pass of the same epoch and an augmentation seed for every sample slot.

    Works in one process too (``num_replicas=1, rank=0``). ``drop_last=False`` pads the permutation with its own
    first indices up to a multiple of ``num_replicas`` (every rank gets the same number of samples), as Lightning's
    DistributedSampler does.

    Args:
        dataset: the dataset (only its length is used).
        num_replicas: world size.
        rank: this process's global rank.
        seed: seed of the order and of the augmentation seeds; must be the same on every rank.
        shuffle: permute (True) or keep the dataset order (False).
        drop_last: drop the tail instead of padding (see DistributedSampler).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("cannot sample from an empty dataset")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def pass_positions(self, epoch: int, pass_index: int = 0) -> np.ndarray:
        """This rank's dataset positions (int64), in order, for one pass (pass 0 = DistributedSampler's order)."""
        size = len(self.dataset)  # type: ignore[arg-type]
        if not self.shuffle:
            order = torch.arange(size)
        else:
            generator = torch.Generator()
            if pass_index == 0:
                generator.manual_seed(self.seed + epoch)  # exactly DistributedSampler's permutation
            else:
                generator.manual_seed(_derived_seed(self.seed, epoch, pass_index, _ORDER))
            order = torch.randperm(size, generator=generator)
        return self._pad_and_shard(order.numpy())

    def pass_seeds(self, epoch: int, pass_index: int = 0) -> np.ndarray:
        """The augmentation seeds (int64, >= 0) of this rank's samples of one pass, aligned with
        :meth:`pass_positions`. A seed is drawn for its slot in the padded, unsharded order, so it is unique per
        (seed, epoch, pass, slot), whichever rank reads that slot."""
        seeds = np.random.default_rng([self.seed, epoch, pass_index, _AUGMENTATION]).integers(
            0, 2**63 - 1, size=self.total_size, dtype=np.int64
        )
        return seeds[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.pass_positions(self.epoch).tolist())

    def _pad_and_shard(self, order: np.ndarray) -> np.ndarray:
        # As DistributedSampler.__iter__: pad by repeating the order (or cut it), then take every world-th index.
        if not self.drop_last:
            padding = self.total_size - len(order)
            if padding > 0:
                order = np.concatenate([order, np.resize(order, padding)])
        else:
            order = order[: self.total_size]
        return order[self.rank : self.total_size : self.num_replicas]


class ResumableBatchSampler(Sampler[list[SampleKey]]):
    """Full batches (the last partial one is dropped) of :class:`SampleKey` for the pass in ``plan``.

    ``plan`` is set by :class:`ResumableDataLoader` before each iteration. ``iter()`` reads it at once — not when
    the first batch is requested — so that a second iteration started meanwhile (another pass over the same
    loader) cannot change the order of one already started.
    """

    def __init__(self, sampler: ResumableSampler, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = True
        self.plan = PassPlan(epoch=sampler.epoch, pass_index=0)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[list[SampleKey]]:
        # The order and seeds are computed now (not lazily) so that they belong to the plan of this iteration.
        plan = self.plan
        positions = self.sampler.pass_positions(plan.epoch, plan.pass_index)
        seeds = self.sampler.pass_seeds(plan.epoch, plan.pass_index)
        return self._batches(positions, seeds, plan.skip)

    def _batches(self, positions: np.ndarray, seeds: np.ndarray, skip: int) -> Iterator[list[SampleKey]]:
        size = self.batch_size
        for start in range(skip * size, len(self) * size, size):
            yield [
                SampleKey(int(position), int(seed))
                for position, seed in zip(positions[start : start + size], seeds[start : start + size])
            ]


@dataclass(frozen=True)
class LoaderPosition:
    """Where a loader's most recently advanced iteration stands: batches delivered so far in that pass (counting
    skipped ones)."""

    epoch: int
    pass_index: int
    batches: int


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` that can be checkpointed mid-epoch and resumed at the same
    batch, with the same order and the same augmentation seeds.

    Each ``iter()`` is one pass: pass numbers count up within an epoch (the sampler's ``epoch``, set by Lightning
    through ``set_epoch``) and restart at 0 in the next one. The position is counted in the main process as
    batches are handed out (workers' prefetching does not count), and ``state_dict()`` reports the iteration that
    handed out a batch last — the training loop's, also when another pass (e.g. a memory-bank fill) ran in between.

    With persistent workers, a pass normally takes over the loader's worker processes (as DataLoader does), except
    from a pass that exists but has not handed out a batch yet: Lightning creates the training iterators before
    ``on_train_start``, and a pass run from there (JointSSL's DeepCluster-v2 memory-bank fill) must not reset them,
    so it runs on workers of its own, which stop when it is done.

    ``load_state_dict`` makes the next ``iter()`` continue that pass after its delivered batches. A state saved with
    a different world size, batch size or dataset size cannot be continued exactly: the pass then resumes after the
    same number of samples (all ranks together) and a warning says so.

    Args:
        dataset: a map-style dataset whose items are looked up by :class:`SampleKey` (see :class:`SeededDataset`).
        sampler: the sampler; ``sampler.epoch`` selects the epoch.
        batch_size: samples per batch (the last partial batch of a pass is dropped).
        **kwargs: other DataLoader arguments (not ``shuffle``, ``sampler``, ``batch_sampler``, ``drop_last``).
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, **kwargs: Any):
        super().__init__(dataset, batch_sampler=ResumableBatchSampler(sampler, batch_size), **kwargs)
        # Given a batch sampler, DataLoader sets `sampler` to a SequentialSampler it never uses; expose the real one
        # instead, so that Lightning sees a DistributedSampler (and injects none of its own under DDP) and calls
        # its set_epoch. DataLoader forbids assigning `sampler` after construction, hence object.__setattr__.
        object.__setattr__(self, "sampler", sampler)
        self._pass_epoch = sampler.epoch
        self._next_pass = 0
        self._position: LoaderPosition | None = None
        self._resume: PassPlan | None = None
        # The pass whose iterator holds the persistent workers (see the class docstring).
        self._workers_holder: weakref.ref[_PositionTracker] | None = None

    def __iter__(self) -> Iterator[Any]:
        return _PositionTracker(self._start_pass(), self)

    def _batches_of(self, plan: PassPlan, tracker: _PositionTracker) -> Iterator[Any]:
        """A DataLoader iterator over the pass in ``plan``, for ``tracker``."""
        self.batch_sampler.plan = plan
        if not (self.persistent_workers and self.num_workers > 0):
            return super().__iter__()
        holder = self._workers_holder() if self._workers_holder is not None else None
        if holder is not None and holder is not tracker and not holder.started:
            return self._get_iterator()  # workers of its own; shut down when the iterator is dropped
        self._workers_holder = weakref.ref(tracker)
        return super().__iter__()

    def _start_pass(self) -> PassPlan:
        epoch = self.sampler.epoch
        if self._resume is not None and self._resume.epoch == epoch:
            plan, self._resume = self._resume, None
            return plan
        if epoch != self._pass_epoch:
            self._pass_epoch, self._next_pass = epoch, 0
        plan = PassPlan(epoch, self._next_pass)
        self._next_pass += 1
        return plan

    def state_dict(self) -> dict[str, Any]:
        """The position of the pass that delivered a batch last (a fresh pass if none has yet) and the geometry
        it was counted in."""
        position = self._position or LoaderPosition(self.sampler.epoch, self._next_pass, 0)
        return {
            "version": LOADER_STATE_VERSION,
            "epoch": position.epoch,
            "pass_index": position.pass_index,
            "batches": position.batches,
            # Passes numbered after the reported one: the loader's count when it is in that epoch still.
            "next_pass": self._next_pass if position.epoch == self._pass_epoch else position.pass_index + 1,
            "world_size": self.sampler.num_replicas,
            "batch_size": self.batch_sampler.batch_size,
            "dataset_size": len(self.dataset),  # type: ignore[arg-type]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved pass at the next ``iter()``."""
        if state.get("version") != LOADER_STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {LOADER_STATE_VERSION}")
        batches = int(state["batches"])
        geometry = (state["world_size"], state["batch_size"], state["dataset_size"])
        size = len(self.dataset)  # type: ignore[arg-type]
        current = (self.sampler.num_replicas, self.batch_sampler.batch_size, size)
        if geometry != current:
            samples = batches * state["batch_size"] * state["world_size"]
            batches = min(len(self), samples // (self.batch_sampler.batch_size * self.sampler.num_replicas))
            logger.warning(
                "data loader state saved with world size, batch size, dataset size %s, now %s: the resumed epoch "
                "continues after %d batches per rank (not an exact resume)",
                geometry, current, batches,
            )
        epoch, pass_index = int(state["epoch"]), int(state["pass_index"])
        self.sampler.set_epoch(epoch)
        self._pass_epoch, self._next_pass = epoch, int(state["next_pass"])
        self._resume = PassPlan(epoch, pass_index, skip=min(batches, len(self)))
        self._position = LoaderPosition(epoch, pass_index, batches)


class _PositionTracker(Iterator[Any]):
    """Counts the batches one pass hands out and reports each to its loader.

    Until it has handed out a batch, the pass follows ``set_epoch``, as a lazily started DistributedSampler would:
    Lightning creates its iterators before it sets the epoch of the first epoch it runs and, when it resumes from a
    checkpoint taken at the end of an epoch, goes on to the next epoch with those iterators. Such a pass is
    replaced by the new epoch's first pass when its first batch is requested.
    """

    def __init__(self, plan: PassPlan, loader: ResumableDataLoader):
        self.started = False
        self._plan = plan
        self._loader = loader
        self._delivered = plan.skip
        self._batches = loader._batches_of(plan, self)

    def __next__(self) -> Any:
        if not self.started:
            self.started = True
            if self._loader.sampler.epoch != self._plan.epoch:
                self._plan = self._loader._start_pass()
                self._batches = self._loader._batches_of(self._plan, self)
                self._delivered = self._plan.skip
        batch = next(self._batches)
        self._delivered += 1
        self._loader._position = LoaderPosition(self._plan.epoch, self._plan.pass_index, self._delivered)
        return batch


class SeededDataset(Dataset):
    """A dataset whose random augmentation is a function of the :class:`SampleKey` seed alone.

    For a key, torch's global CPU generator (torchvision's transforms draw from it) is seeded with the key's seed and
    restored afterwards, so the caller's random stream is untouched (with ``num_workers=0`` data loading runs in the
    training process); each function in ``reseed`` is called with the seed too, for random states of their own
    (MONAI transforms). Plain integer positions are passed through unseeded.
    """

    def __init__(self, dataset: Dataset, reseed: Sequence[Callable[[int], None]] = ()):
        self.dataset = dataset
        self.reseed = list(reseed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | SampleKey) -> Any:
        if not isinstance(key, SampleKey):
            return self.dataset[key]
        # The CPU generator alone (augmentation runs on CPU tensors), saved and restored directly: fork_rng and
        # torch.manual_seed also visit every accelerator's generators, ~40x the cost.
        generator = torch.default_generator
        saved = generator.get_state()
        try:
            generator.manual_seed(key.seed)
            for reseed in self.reseed:
                reseed(key.seed)
            return self.dataset[key.position]
        finally:
            generator.set_state(saved)


def _derived_seed(*entropy: int) -> int:
    """A 63-bit seed mixed from non-negative integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0] % 2**63)
