"""SwAV swapped-prediction loss with an optional queue of past embeddings (Caron et al., 2020).

For each crop used for assignment, Sinkhorn-Knopp turns that crop's prototype scores into codes q (no
gradient); every other crop must predict q through softmax(scores / temperature). The queue holds the most
recent embeddings of the assigned crops so that small batches still give Sinkhorn enough samples to spread
over all prototypes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jointssl.losses.sinkhorn import sinkhorn_knopp


class SwAVOutput(NamedTuple):
    """loss: scalar; assignments: [B] argmax of the codes of the first assigned crop (prototype usage); codes:
    those codes [B, K]; scores: that crop's prototype scores [B, K], detached (both for the diagnostics)."""

    loss: Tensor
    assignments: Tensor
    codes: Tensor
    scores: Tensor


class SwAVLoss(nn.Module):
    """Swapped prediction between crops, as in the SwAV reference (facebookresearch/swav main_swav.py).

    Buffers (saved in checkpoints): `queue` [len(crops_for_assign), queue_length, embedding_dim], newest rows
    first, `queue_index` [queue_length], the sample index of each row (-1: unknown), and `queue_filled`, the number
    of valid rows. Each rank keeps its own queue (codes are computed over the queues and batches of all ranks
    together).

    Rows of the current batch's own samples (same index) count as uniform rows in Sinkhorn. Where the data set is
    not much larger than the queue (a few hundred volumes, a queue of several batches), the queue holds stale copies
    of the very samples being assigned; under the equipartition constraint they take their sample's prototype
    first and push the current codes elsewhere, away from the predictions. On the demo this drove L_inter above
    ln K once the queue was switched on (docs/results.md). On large data sets no row matches and nothing changes.
    """

    queue: Tensor
    queue_index: Tensor
    queue_filled: Tensor

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        crops_for_assign: Sequence[int] = (0, 1),
        queue_length: int = 0,
        embedding_dim: int = 128,
    ) -> None:
        super().__init__()
        if not crops_for_assign:
            raise ValueError("crops_for_assign must name at least one crop")
        if queue_length < 0:
            raise ValueError(f"queue_length must be >= 0, got {queue_length}")
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.crops_for_assign = tuple(int(c) for c in crops_for_assign)
        self.queue_length = queue_length
        self.embedding_dim = embedding_dim
        self.register_buffer("queue", torch.zeros(len(self.crops_for_assign), queue_length, embedding_dim))
        self.register_buffer("queue_index", torch.full((queue_length,), -1, dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        # queue_filled as a host int, so that the per-step "is the queue full?" needs no device sync: read from the
        # buffer once (None: not yet, or the buffer was loaded from a checkpoint since), then kept in step with it.
        self._filled_on_host: int | None = None

    def resize_queue(self, queue_length: int) -> None:
        """Empty the queue and give it `queue_length` rows (e.g. this rank's share of a global queue length)."""
        if queue_length < 0:
            raise ValueError(f"queue_length must be >= 0, got {queue_length}")
        self.queue_length = queue_length
        self.queue = self.queue.new_zeros(len(self.crops_for_assign), queue_length, self.embedding_dim)
        self.queue_index = self.queue_index.new_full((queue_length,), -1)
        self.queue_filled.zero_()
        self._filled_on_host = 0

    def queue_is_full(self) -> bool:
        """True once every queue row holds an embedding (the buffer is read once after construction or loading;
        a device sync on GPU then only)."""
        if self.queue_length == 0:
            return False
        if self._filled_on_host is None:
            self._filled_on_host = int(self.queue_filled)
        return self._filled_on_host >= self.queue_length

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        queue = state_dict.get(prefix + "queue")
        if queue is not None and queue.shape[1] != self.queue_length:
            # The queue is each rank's share of the global length (resize_queue in setup): a state written by a
            # process with another share (a rank of a DDP run, read back by Lightning's spawn launcher into the main
            # process; or before setup) brings its own length.
            self.resize_queue(queue.shape[1])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._filled_on_host = None  # the loaded buffer is the truth: read it again when next asked

    def forward(
        self, embeddings: Sequence[Tensor], prototypes: Tensor, use_queue: bool = False, index: Tensor | None = None
    ) -> SwAVOutput:
        """Swapped-prediction loss.

        Args:
            embeddings: one [B, D] L2-normalised embedding per crop (crop 0..n-1), same B for every crop.
            prototypes: [K, D] prototype weight; gradients flow into it and into the embeddings.
            use_queue: prepend the queue's scores before Sinkhorn (only once the queue is full). The queue is
                updated with this batch either way.
            index: the samples' global indices [B] (None: samples without a stable identity, e.g. slice pairs).
                Queue rows of these samples count as uniform rows (class docstring).
        """
        self._check_inputs(embeddings, prototypes)
        batch_size = embeddings[0].shape[0]
        prepend_queue = use_queue and self.queue_is_full()
        own_rows = None
        if prepend_queue and index is not None:
            own_rows = torch.isin(self.queue_index, index.to(self.queue_index.device)).unsqueeze(1)
        # Scores, softmax and log in float32 whatever the autocast: scores / 0.1 and / 0.05 amplify bf16 errors.
        with torch.autocast(device_type=prototypes.device.type, enabled=False):
            prototypes32 = prototypes.float()
            scores = [crop.float() @ prototypes32.t() for crop in embeddings]
            log_probs = [F.log_softmax(crop_scores / self.temperature, dim=1) for crop_scores in scores]

            with torch.no_grad():
                assign_scores = []
                for slot, crop in enumerate(self.crops_for_assign):
                    crop_scores = scores[crop].detach()
                    if prepend_queue:
                        queue_scores = self.queue[slot].float() @ prototypes32.detach().t()
                        if own_rows is not None:
                            queue_scores = queue_scores.masked_fill(own_rows, 0.0)
                        crop_scores = torch.cat([queue_scores, crop_scores])
                    assign_scores.append(crop_scores)
                # The crops' Sinkhorn problems are independent: solved together, they share each all-reduce.
                all_codes = sinkhorn_knopp(torch.stack(assign_scores), self.epsilon, self.sinkhorn_iterations)
                all_codes = all_codes[:, -batch_size:]  # the queue rows only shape the equipartition
                for slot, crop in enumerate(self.crops_for_assign):
                    self._push_to_queue(slot, embeddings[crop])
            crop_losses = []
            for slot, crop in enumerate(self.crops_for_assign):
                codes = all_codes[slot]
                predictions = [
                    -(codes * log_probs[view]).sum(dim=1).mean() for view in range(len(embeddings)) if view != crop
                ]
                crop_losses.append(torch.stack(predictions).mean())
            loss = torch.stack(crop_losses).mean()
            first_codes = all_codes[0]
            assignments = first_codes.argmax(dim=1)

        if self.queue_length > 0:
            self.queue_filled.add_(batch_size).clamp_(max=self.queue_length)
            if self._filled_on_host is not None:
                self._filled_on_host = min(self._filled_on_host + batch_size, self.queue_length)
            with torch.no_grad():
                rows = torch.full((batch_size,), -1, dtype=torch.long, device=self.queue_index.device)
                if index is not None:
                    rows = index.to(self.queue_index.device, torch.long)
                self.queue_index.copy_(torch.cat([rows, self.queue_index])[: self.queue_length])
        first = self.crops_for_assign[0]
        return SwAVOutput(loss=loss, assignments=assignments, codes=first_codes, scores=scores[first].detach())

    @torch.no_grad()
    def _push_to_queue(self, slot: int, crop_embeddings: Tensor) -> None:
        """Newest rows first: the batch goes to the front, older rows shift back, the oldest drop out."""
        if self.queue_length == 0:
            return
        queue = self.queue[slot]
        # Non-finite rows (a step the trainer will skip) enter as zeros (uniform scores), or one bad batch would
        # poison the codes of every later step through the queue.
        rows = crop_embeddings.detach().to(queue.dtype).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        shifted = torch.cat([rows, queue])[: self.queue_length]
        queue.copy_(shifted)

    def _check_inputs(self, embeddings: Sequence[Tensor], prototypes: Tensor) -> None:
        if len(embeddings) < 2:
            raise ValueError(f"swapped prediction needs at least 2 crops, got {len(embeddings)}")
        if max(self.crops_for_assign) >= len(embeddings) or min(self.crops_for_assign) < 0:
            raise ValueError(f"crops_for_assign {self.crops_for_assign} out of range for {len(embeddings)} crops")
        shapes = {tuple(crop.shape) for crop in embeddings}
        if len(shapes) != 1 or embeddings[0].ndim != 2:
            raise ValueError(f"every crop must be a [B, D] tensor of the same shape, got {sorted(shapes)}")
        if prototypes.ndim != 2 or prototypes.shape[1] != embeddings[0].shape[1]:
            raise ValueError(f"prototypes must be [K, {embeddings[0].shape[1]}], got shape {tuple(prototypes.shape)}")
        if self.queue_length > 0 and self.embedding_dim != embeddings[0].shape[1]:
            raise ValueError(f"queue holds {self.embedding_dim}-d embeddings, got {embeddings[0].shape[1]}-d")
