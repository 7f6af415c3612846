"""What a run resumed from a checkpoint needs, beyond Lightning's own state, to continue exactly as the
uninterrupted run would have: :class:`ExactResume`.

Lightning checkpoints hold the weights, optimizer, schedulers, loop progress and (with stateful loaders, see
``jointssl.data.sampling``) the data position, but no random-number-generator state: a run resumed from step k
would continue with the generator state that seeding and start-up left, not the one the original run had at step k
(dropout, and anything else drawn from the global generators). And Lightning 2.6 skips the next epoch's
``on_train_epoch_start`` hooks when it resumes from a checkpoint written after the last batch of an epoch (e.g. by
``ModelCheckpoint(every_n_train_steps=...)`` when the epoch length is a multiple of it), which would skip
DeepCluster-v2's k-means for that epoch.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

from jointssl import distributed

log = logging.getLogger("jointssl")

#: Checkpoint key: a list with one RNG state per rank, in rank order.
RNG_STATES_KEY = "jointssl_rng_states"
RNG_STATE_VERSION = 1


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's torch (CPU, and CUDA on ``device`` when it is a CUDA device), numpy and Python RNG states,
    as tensors and plain values only (so that checkpoints load with ``weights_only=True``)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "version": RNG_STATE_VERSION,
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": _plain(random.getstate()),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Set this process's generators to a state from :func:`capture_rng_state`."""
    if state.get("version") != RNG_STATE_VERSION:
        raise ValueError(f"RNG state version {state.get('version')!r}, expected {RNG_STATE_VERSION}")
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _plain(python_state: tuple) -> list:
    """random.getstate() as lists of ints (a tuple of 625 ints is fine too, but lists read back the same)."""
    version, internal, gauss_next = python_state
    return [version, list(internal), gauss_next]


class ExactResume(Callback):
    """Per-rank RNG state in checkpoints, and the epoch-start hooks Lightning would skip on resume.

    RNG: ``on_save_checkpoint`` runs on every rank (Lightning builds the checkpoint on all ranks and rank 0 writes
    it): the torch (CPU and current CUDA device), numpy and Python generator states are all-gathered, so the file
    holds one per rank under ``"jointssl_rng_states"``. On resume each rank restores its own entry at
    ``on_train_start`` — after model set-up, seeding and checkpoint loading have consumed random numbers, right
    before the first resumed step. A checkpoint without states (or with fewer ranks than this run) leaves the
    generators as seeding set them, with a warning. Every rank must take part in every checkpoint save (as
    ``ModelCheckpoint`` and ``trainer.save_checkpoint`` do), since the states are gathered with a collective.

    Epoch start: resuming from a checkpoint taken after an epoch's last batch, Lightning 2.6 moves on to the next
    epoch but keeps treating it as "restarted mid-epoch", so that epoch's ``on_train_epoch_start`` hooks never run.
    ``on_train_start`` clears that restart stage (after Lightning has used it to finish the old epoch), so the new
    epoch starts with its hooks, as in the uninterrupted run.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        state = capture_rng_state(pl_module.device)
        if distributed.is_distributed():
            states: list[Any] = [None] * distributed.world_size()
            dist.all_gather_object(states, state)
            # all_gather_object hands CPU tensors back on the CPU (gloo) or on the current device (nccl).
            states = [_to_cpu(rank_state) for rank_state in states]
        else:
            states = [state]
        checkpoint[RNG_STATES_KEY] = states

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(RNG_STATES_KEY)
        rank = trainer.global_rank
        if not states or rank >= len(states):
            saved = len(states) if states else 0
            log.warning(
                "checkpoint holds RNG states of %d rank(s); rank %d continues with the seeded generators (the "
                "resumed run will not repeat the original's random draws)",
                saved, rank,
            )
            self._pending = None
            return
        if len(states) != trainer.world_size and rank == 0:
            log.warning("checkpoint holds RNG states of %d ranks, this run has %d", len(states), trainer.world_size)
        self._pending = states[rank]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending, pl_module.device)
            self._pending = None
        fit_loop = trainer.fit_loop
        epoch_loop = fit_loop.epoch_loop
        progress = fit_loop.epoch_progress.current
        # Lightning's own test (FitLoop.reset) for "saved on the last batch's end: that epoch is over", after which
        # it has counted the epoch as processed but keeps the mid-epoch stage that suppresses the next epoch start.
        if (
            fit_loop.restarted_mid_epoch
            and epoch_loop.restarted_on_train_batch_end
            and epoch_loop.batch_progress.is_last_batch
            and progress.processed == progress.started
        ):
            fit_loop.reset_restart_stage()


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_cpu(item) for item in value]
    return value
