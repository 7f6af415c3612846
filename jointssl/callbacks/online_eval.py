"""Online evaluation during pretraining: a weighted k-nearest-neighbour classifier (and optionally the linear
probe) on the slice encoder's embeddings of a small labelled image set (the monitor of InstDisc / DINO /
solo-learn). It answers, every few epochs and without a downstream run, whether the representation is getting more
useful — the SSL losses alone do not say so.

    trainer:
      callbacks:
        - class_path: jointssl.callbacks.online_eval.OnlineKNNEvaluation
          init_args:
            images: [/data/cxr_labelled]      # class = first sub-folder (ImageFolder layout), or a CSV with label
            every_n_epochs: 1
            probes: [knn, linear]

The probes, the label discovery and the preprocessing are those of `jointssl evaluate`
(:mod:`jointssl.evaluation.probes`, :mod:`jointssl.evaluation.inputs`), so online and offline numbers are computed
the same way (the online split is a fixed hash-based one, the offline one is grouped).

Under DDP each rank embeds its share of the images; the embeddings are gathered, so every rank computes the same
accuracy, equal to a single process's (the linear probe runs in float64 on CPU, deterministically).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from jointssl import distributed
from jointssl.evaluation import probes as probe_functions
from jointssl.data.prediction_inputs import preprocess_image
from jointssl.evaluation.inputs import labelled_records

log = logging.getLogger("jointssl")

__all__ = ["OnlineKNNEvaluation", "is_query", "labelled_records"]

Probe = Literal["knn", "linear"]


def is_query(path: str, query_fraction: float) -> bool:
    """A fixed, order-free split: the same image is always a query (or always in the kNN bank)."""
    digest = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big")
    return digest / 2**64 < query_fraction


class OnlineKNNEvaluation(Callback):
    """Weighted kNN accuracy of f_intra's embeddings on labelled 2D images, logged as ``online_eval/knn_top1``
    and ``online_eval/knn_balanced_accuracy`` (mean per-class recall: robust to class imbalance); with
    ``"linear"`` in ``probes`` also the linear probe's, as ``online_eval/linear_top1`` and
    ``online_eval/linear_balanced_accuracy``. The bank (training split of the probes) is the non-query images.

    Args:
        images: labelled 2D image sources: folders in ImageFolder layout (class = first sub-folder) or CSV
            manifests with ``path`` and ``label`` columns.
        every_n_epochs: evaluate after every this many training epochs (and never in between).
        image_size: images are resized to this square size (no crop, the whole image), normalised as in training.
        query_fraction: share of the images (a fixed, hash-based choice) classified against the others.
        k: neighbours per vote.
        temperature: vote weight exp(similarity / temperature).
        batch_size: images per encoder forward pass.
        max_images: at most this many images (a fixed, hash-based choice) are used; keeps the monitor cheap.
        probes: which probes to run: "knn" (:func:`jointssl.evaluation.probes.knn_probe`) and/or "linear"
            (:func:`jointssl.evaluation.probes.linear_probe`: standardised features, L2-regularised multinomial
            logistic regression by L-BFGS).
        probe_weight_decay: the linear probe's L2 penalty (weight_decay * sum of squared weights).
        probe_max_iter: the linear probe's L-BFGS iterations.
    """

    def __init__(
        self,
        images: list[str],
        every_n_epochs: int = 1,
        image_size: int = 64,
        query_fraction: float = 0.2,
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 64,
        max_images: int = 5000,
        probes: list[Probe] = ["knn"],  # a list default, so that --print_config shows it; never mutated
        probe_weight_decay: float = probe_functions.DEFAULT_WEIGHT_DECAY,
        probe_max_iter: int = probe_functions.DEFAULT_MAX_ITER,
    ) -> None:
        if not 0.0 < query_fraction < 1.0:
            raise ValueError(f"query_fraction must be in (0, 1), got {query_fraction}")
        if every_n_epochs < 1 or k < 1 or batch_size < 1 or max_images < 2:
            raise ValueError("every_n_epochs, k and batch_size must be >= 1 and max_images >= 2")
        unknown = sorted(set(probes) - {"knn", "linear"})
        if unknown or not probes:
            raise ValueError(f"probes must be a non-empty list of 'knn' and 'linear', got {list(probes)}")
        self.sources = list(images)
        self.every_n_epochs = every_n_epochs
        self.image_size = image_size
        self.query_fraction = query_fraction
        self.k = k
        self.temperature = temperature
        self.batch_size = batch_size
        self.max_images = max_images
        self.probes = list(dict.fromkeys(probes))
        self.probe_weight_decay = probe_weight_decay
        self.probe_max_iter = probe_max_iter
        self._images: Tensor | None = None  # this rank's share, preprocessed
        self._positions: Tensor | None = None  # their positions in the full list
        self._labels: Tensor | None = None  # class index of every image (all ranks)
        self._is_query: Tensor | None = None
        self.classes: list[str] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self._labels is not None:
            return
        records = labelled_records(self.sources)
        records.sort(key=lambda item: hashlib.sha256(item[0].path.encode()).digest())
        records = sorted(records[: self.max_images], key=lambda item: item[0].path)
        self.classes = sorted({label for _, label in records})
        if len(self.classes) < 2:
            raise ValueError(f"online kNN evaluation needs images of at least 2 classes in {self.sources}, "
                             f"found {self.classes or 'none'}")
        self._labels = torch.tensor([self.classes.index(label) for _, label in records])
        self._is_query = torch.tensor([is_query(record.path, self.query_fraction) for record, _ in records])
        if self._is_query.all() or not self._is_query.any():
            raise ValueError(f"online kNN evaluation: {len(records)} images are too few to split into a bank and "
                             f"queries at query_fraction={self.query_fraction}")
        # Each rank decodes only its share: the images are read once, before training.
        positions = list(range(distributed.rank(), len(records), distributed.world_size()))
        self._positions = torch.tensor(positions, dtype=torch.long)
        if positions:
            self._images = torch.stack([preprocess_image(records[i][0].path, self.image_size) for i in positions])
        else:
            self._images = torch.empty(0, 1, self.image_size, self.image_size)
        log.info("online kNN evaluation: %d labelled images (%d queries), classes %s",
                 len(records), int(self._is_query.sum()), ", ".join(self.classes))

    @torch.no_grad()
    def embed(self, encoder: torch.nn.Module, device: torch.device) -> Tensor:
        """Embeddings of all images [N, d] in list order, on every rank (each embeds its share)."""
        was_training = encoder.training
        encoder.eval()
        try:
            parts = [encoder(chunk.to(device)).float() for chunk in self._images.split(self.batch_size)]
        finally:
            encoder.train(was_training)
        local = torch.cat(parts) if parts else torch.empty(0, encoder.d_model, device=device)
        embeddings = distributed.all_gather_cat(local)
        positions = distributed.all_gather_cat(self._positions.to(device))
        ordered = torch.empty_like(embeddings)
        ordered[positions] = embeddings
        return ordered

    def evaluate(self, encoder: torch.nn.Module, device: torch.device) -> dict[str, float]:
        embeddings = self.embed(encoder, device)
        labels, query = self._labels.to(device), self._is_query.to(device)
        bank, bank_labels, queries, truth = embeddings[~query], labels[~query], embeddings[query], labels[query]
        metrics = {}
        if "knn" in self.probes:
            knn = probe_functions.knn_probe(bank, bank_labels, queries, len(self.classes), self.k, self.temperature)
            metrics["online_eval/knn_top1"] = probe_functions.accuracy(knn.predicted, truth)
            metrics["online_eval/knn_balanced_accuracy"] = probe_functions.balanced_accuracy(knn.predicted, truth)
        if "linear" in self.probes:
            linear = probe_functions.linear_probe(
                bank, bank_labels, queries, len(self.classes), self.probe_weight_decay, self.probe_max_iter
            )
            metrics["online_eval/linear_top1"] = probe_functions.accuracy(linear.predicted, truth)
            metrics["online_eval/linear_balanced_accuracy"] = probe_functions.balanced_accuracy(
                linear.predicted, truth
            )
        return metrics

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        # All ranks computed the same numbers from the same gathered embeddings: no reduction needed.
        for name, value in self.evaluate(pl_module.encoder, pl_module.device).items():
            pl_module.log(name, value, rank_zero_only=True)
