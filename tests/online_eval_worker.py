"""One rank of tests/test_online_eval.py's distributed check: the same encoder and labelled images, evaluated
with the images split between ranks. Usage: python -m tests.online_eval_worker --rank R --world-size 2 --port P
--out DIR (the images are in DIR/images, written by the test)."""

from __future__ import annotations

import sys

import torch

from jointssl.callbacks.online_eval import OnlineKNNEvaluation
from jointssl.models import SliceEncoder
from tests.gloo_ranks import worker_main


def evaluate(image_root: str) -> dict:
    torch.manual_seed(0)
    encoder = SliceEncoder("test_resnet", d_model=16)
    callback = OnlineKNNEvaluation(
        images=[image_root], image_size=32, k=5, query_fraction=0.3, probes=["knn", "linear"]
    )
    callback.setup(None, None, "fit")
    return callback.evaluate(encoder, torch.device("cpu"))


def compute(rank: int, world_size: int) -> dict:
    out_dir = sys.argv[sys.argv.index("--out") + 1]
    return {k: torch.tensor(v) for k, v in evaluate(f"{out_dir}/images").items()}


if __name__ == "__main__":
    worker_main(compute)
