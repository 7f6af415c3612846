"""Worker of tests/test_downstream_base.py: the downstream base's gathered evaluation in gloo ranks. Every rank
records the validation rows of its DistributedSampler shard (the sampler repeats a sample to even out the shards)
and gathers them with DownstreamTask.gathered_rows, then computes the metrics of the whole set."""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler

from jointssl.downstream import ImageClassifier
from jointssl.downstream.classification.metrics import gathered_metrics
from tests.gloo_ranks import worker_main

NUM_SAMPLES, NUM_CLASSES = 7, 3


def validation_set() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed probabilities [7, 3] and targets [7]: the same on every rank and in the test."""
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(NUM_SAMPLES, NUM_CLASSES, generator=generator).softmax(dim=1)
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    return probabilities, targets


def compute(rank: int, world_size: int) -> dict:
    probabilities, targets = validation_set()
    model = ImageClassifier(num_classes=NUM_CLASSES, task="multiclass", backbone="test_resnet", d_model=16)
    shard = list(DistributedSampler(range(NUM_SAMPLES), num_replicas=world_size, rank=rank, shuffle=False))
    for index in shard:
        model.record_rows(torch.cat([torch.tensor([index, int(targets[index])]).float(), probabilities[index]])[None])
    rows = model.gathered_rows(2 + NUM_CLASSES)
    metrics = gathered_metrics("multiclass", NUM_CLASSES, rows[:, 2:], rows[:, 1].long())
    return {"shard": torch.tensor(shard), "rows": rows, **metrics}


if __name__ == "__main__":
    worker_main(compute)
