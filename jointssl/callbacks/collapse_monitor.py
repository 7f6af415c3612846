"""CollapseMonitor: how the clustering tasks use their prototypes over an epoch, with an alarm for collapse.

Per task ("intra", "inter") the module counts, in its per-rank buffers ``<task>_counts``, how often each head-0
prototype won an assignment in the current epoch (the module keeps them, so that they are saved per rank in
checkpoints with the rest of its rank state and never broadcast by DDP; this callback zeroes them at each epoch
start and adds each step's assignments). At epoch end the counts of all ranks are summed and logged as
``train/<task>_prototypes_used`` (fraction of prototypes that won at least once), ``train/<task>_assignment_entropy``
(normalised entropy of the histogram: 1 uniform, 0 one cluster) and ``train/<task>_largest_cluster_fraction``; a
warning is logged when the fraction used or the entropy falls below its threshold, or when the effective rank of
f_intra's embeddings last measured in the epoch (``train/intra_effective_rank``, a diagnostic of the module) does.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from jointssl import distributed

log = logging.getLogger("jointssl")

TASKS = ("intra", "inter")


class CollapseMonitor(Callback):
    """Prototype usage per epoch and a collapse alarm (module docstring). The module keeps the per-rank counts
    as ``<task>_counts`` buffers, and its ``training_step`` returns ``<task>_assignments`` beside the loss.

    Args:
        min_prototypes_used: alarm below this fraction of head-0 prototypes used in an epoch.
        min_entropy: alarm below this normalised entropy of the epoch's assignment histogram.
        min_effective_rank: alarm below this effective rank of a batch of f_intra's embeddings.
    """

    def __init__(self, min_prototypes_used: float = 0.1, min_entropy: float = 0.3,
                 min_effective_rank: float = 1.5) -> None:
        self.min_prototypes_used = min_prototypes_used
        self.min_entropy = min_entropy
        self.min_effective_rank = min_effective_rank

    @staticmethod
    def counts(pl_module: LightningModule, task: str) -> torch.Tensor:
        return getattr(pl_module, f"{task}_counts")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for task in TASKS:
            self.counts(pl_module, task).zero_()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # training_step returns the head-0 assignments of its tasks beside the loss; those of a step the numerics
        # guard skipped (non-finite) are void.
        guard = getattr(pl_module, "numerics_guard", None)
        if guard is not None and guard.skipped_last_step:
            return
        for task in TASKS:
            assignments = outputs.get(f"{task}_assignments") if isinstance(outputs, dict) else None
            if assignments is not None:
                counts = self.counts(pl_module, task)
                counts += torch.bincount(assignments[assignments >= 0], minlength=counts.numel())

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank = trainer.callback_metrics.get("train/intra_effective_rank")
        if rank is not None and float(rank) < self.min_effective_rank:
            log.warning(
                "collapse alarm (f_intra, epoch %d): effective rank of a batch of embeddings %.2f (alarm below %.2f): "
                "the embeddings lie close to one line", trainer.current_epoch, float(rank), self.min_effective_rank,
            )
        for task in TASKS:
            counts = distributed.all_reduce_sum(self.counts(pl_module, task).clone()).float()
            if counts.sum() == 0:
                continue
            probs = counts / counts.sum()
            nonzero = probs[probs > 0]
            entropy = -(nonzero * nonzero.log()).sum() / math.log(max(2, counts.numel()))
            used = (counts > 0).float().mean()
            # Computed from all-reduced counts: the same on every rank (sync_dist averages identical values).
            pl_module.log(f"train/{task}_prototypes_used", used, sync_dist=True)
            pl_module.log(f"train/{task}_assignment_entropy", entropy, sync_dist=True)
            # The largest cluster's share of the epoch's assignments: 1.0 means everything fell into one.
            pl_module.log(f"train/{task}_largest_cluster_fraction", probs.max(), sync_dist=True)
            if used < self.min_prototypes_used or entropy < self.min_entropy:
                log.warning(
                    "collapse alarm (%s, epoch %d): %.1f%% of %d prototypes used (alarm below %.1f%%), assignment "
                    "entropy %.3f (alarm below %.3f), largest cluster %.1f%% of assignments",
                    task, trainer.current_epoch, 100 * float(used), counts.numel(), 100 * self.min_prototypes_used,
                    float(entropy), self.min_entropy, 100 * float(probs.max()),
                )
