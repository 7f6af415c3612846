"""Online evaluation during pretraining: a weighted k-nearest-neighbour classifier on the slice encoder's
embeddings of a small labelled image set (the monitor of InstDisc / DINO / solo-learn). It answers, every few
epochs and without a downstream run, whether the representation is getting more useful — the SSL losses alone do
not say so.

    trainer:
      callbacks:
        - class_path: jointssl.callbacks.online_eval.OnlineKNNEvaluation
          init_args:
            images: [/data/cxr_labelled]      # class = first sub-folder (ImageFolder layout), or a CSV with label
            every_n_epochs: 1

Under DDP each rank embeds its share of the images; the embeddings are gathered, so every rank computes the same
accuracy, equal to a single process's.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from jointssl import distributed
from jointssl.data.image_io import load_image_2d
from jointssl.data.sources import ImageRecord, discover_images
from jointssl.data.transforms import NORMALIZE_MEAN, NORMALIZE_STD

log = logging.getLogger("jointssl")


def labelled_records(sources: list[str]) -> list[tuple[ImageRecord, str]]:
    """Images with their class: a CSV manifest's ``label`` column, or for a folder the name of the sub-folder
    directly under it that holds the image (``root/<class>/.../image.png``). Unlabelled images are left out."""
    labelled = []
    for source in sources:
        root = Path(source)
        for record in discover_images([source]):
            label = record.label
            if label is None and root.is_dir():
                parts = Path(record.path).relative_to(root.resolve()).parts
                label = parts[0] if len(parts) > 1 else None
            if label not in (None, ""):
                labelled.append((record, str(label)))
    return labelled


def is_query(path: str, query_fraction: float) -> bool:
    """A fixed, order-free split: the same image is always a query (or always in the kNN bank)."""
    digest = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big")
    return digest / 2**64 < query_fraction


def weighted_knn_predict(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, k: int, temperature: float
) -> Tensor:
    """Class of each query by the temperature-weighted vote of its k most cosine-similar bank rows
    (weight exp(similarity / temperature), as in Wu et al. 2018). Returns [Q] class indices."""
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    similarity, neighbours = (queries @ bank.T).topk(min(k, bank.shape[0]), dim=1)
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
    votes.scatter_add_(1, bank_labels[neighbours], (similarity / temperature).exp())
    return votes.argmax(dim=1)


class OnlineKNNEvaluation(Callback):
    """Weighted kNN accuracy of f_intra's embeddings on labelled 2D images, logged as ``online_eval/knn_top1``
    and ``online_eval/knn_balanced_accuracy`` (mean per-class recall: robust to class imbalance).

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
    ) -> None:
        if not 0.0 < query_fraction < 1.0:
            raise ValueError(f"query_fraction must be in (0, 1), got {query_fraction}")
        if every_n_epochs < 1 or k < 1 or batch_size < 1 or max_images < 2:
            raise ValueError("every_n_epochs, k and batch_size must be >= 1 and max_images >= 2")
        self.sources = list(images)
        self.every_n_epochs = every_n_epochs
        self.image_size = image_size
        self.query_fraction = query_fraction
        self.k = k
        self.temperature = temperature
        self.batch_size = batch_size
        self.max_images = max_images
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
        self._images = torch.stack([self._preprocess(records[i][0].path) for i in positions]) if positions else \
            torch.empty(0, 1, self.image_size, self.image_size)
        log.info("online kNN evaluation: %d labelled images (%d queries), classes %s",
                 len(records), int(self._is_query.sum()), ", ".join(self.classes))

    def _preprocess(self, path: str) -> Tensor:
        image = torch.from_numpy(load_image_2d(path)).float()[None, None]
        image = F.interpolate(image, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return ((image[0].clamp(0, 1) - NORMALIZE_MEAN) / NORMALIZE_STD).contiguous()

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
        predicted = weighted_knn_predict(
            embeddings[~query], labels[~query], embeddings[query], len(self.classes), self.k, self.temperature
        )
        truth = labels[query]
        recalls = [(predicted[truth == c] == c).float().mean() for c in range(len(self.classes)) if (truth == c).any()]
        return {
            "online_eval/knn_top1": float((predicted == truth).float().mean()),
            "online_eval/knn_balanced_accuracy": float(torch.stack(recalls).mean()),
        }

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        # All ranks computed the same numbers from the same gathered embeddings: no reduction needed.
        for name, value in self.evaluate(pl_module.encoder, pl_module.device).items():
            pl_module.log(name, value, rank_zero_only=True)
