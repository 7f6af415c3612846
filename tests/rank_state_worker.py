"""One rank of tests/test_rank_state.py: each rank fills its SwAV queues / DeepCluster banks / usage counts with
rank-specific values, writes a checkpoint dict through JointSSL.on_save_checkpoint (collective), and a fresh model
restores it through on_load_checkpoint + load_state_dict, as Lightning does on resume.

Usage: python -m tests.rank_state_worker --rank R --world-size 2 --port P --out DIR
"""

from __future__ import annotations

import torch

from jointssl.pretrain import RANK_STATE_KEY, JointSSL
from tests.gloo_ranks import worker_main

TINY = dict(backbone="test_resnet", d_model=16, projection_hidden_dim=0, projection_dim=8, aggregator_layers=1,
            aggregator_heads=2, aggregator_ffn_dim=16)


def make(method: str) -> JointSSL:
    if method == "swav":
        return JointSSL(**TINY, method="swav", num_prototypes=[4], num_prototypes_3d=[3], queue_length=6,
                        queue_length_3d=4)
    model = JointSSL(**TINY, method="deepcluster", num_prototypes=[3], num_prototypes_3d=[2])
    model.intra.attach_memory(dataset_size=40, bank_size=5)
    model.inter.attach_memory(dataset_size=40, bank_size=2)
    return model


def compute(rank: int, world_size: int) -> dict:
    result = {}
    for method in ("swav", "deepcluster"):
        model = make(method)
        names = model.per_rank_buffer_names()
        buffers = dict(model.named_buffers())
        for i, name in enumerate(names):
            buffers[name].copy_(torch.full_like(buffers[name], 10 * rank + i))
        checkpoint = {"state_dict": model.state_dict()}
        model.on_save_checkpoint(checkpoint)
        restored = make(method)
        restored.on_load_checkpoint(checkpoint)
        restored.load_state_dict(checkpoint["state_dict"])
        restored_buffers = dict(restored.named_buffers())
        result[method] = {
            "names": names,
            "entries": len(checkpoint[RANK_STATE_KEY]),
            "restored": {name: restored_buffers[name].clone() for name in names},
            "expected": {name: buffers[name].clone() for name in names},
        }
    return result


if __name__ == "__main__":
    worker_main(compute)
