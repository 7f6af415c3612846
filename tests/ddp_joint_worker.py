"""One rank of the distributed-equivalence check of the joint step (see tests/test_joint_ddp.py): L_intra (2D crops
+ paired volume slices) and L_inter (volume features against the 3D prototypes), SwAV and DeepCluster-v2, on a
fixed batch split between ranks, against one process holding the whole batch.

Usage: python -m tests.ddp_joint_worker --rank R --world-size 2 --port P --out DIR
"""

from __future__ import annotations

import torch

from jointssl.pretrain import JointSSL
from tests.gloo_ranks import worker_main

IMAGES, VOLUMES, SLICES, SIZE = 4, 4, 6, 32  # whole batch; each of 2 ranks holds half
TINY = dict(
    backbone="test_resnet", d_model=32, projection_hidden_dim=32, projection_dim=16,
    aggregator_layers=1, aggregator_heads=4, aggregator_ffn_dim=48, intra_slices_per_volume=SLICES,
    mask_weight=0.0,  # the random slice mask differs between one and two processes
)


def union_batch() -> dict:
    generator = torch.Generator().manual_seed(7)
    padding = torch.zeros(VOLUMES, SLICES, dtype=torch.bool)
    padding[[0, 2], 4:] = True  # one short volume in each rank's half
    return {
        "images": {
            "crops": [torch.randn(IMAGES, 1, SIZE, SIZE, generator=generator) for _ in range(2)],
            "index": torch.arange(IMAGES),
        },
        "volumes": {
            "views": torch.randn(VOLUMES, 2, SLICES, 1, SIZE, SIZE, generator=generator),
            "padding_mask": padding,
            "index": torch.arange(100, 100 + VOLUMES),
        },
    }


def shard(batch: dict, rank: int | None, world_size: int) -> dict:
    if rank is None:
        return batch
    out = {}
    for stream, fields in batch.items():
        n = fields["index"].shape[0] // world_size
        part = slice(rank * n, (rank + 1) * n)
        out[stream] = {k: ([c[part] for c in v] if isinstance(v, list) else v[part]) for k, v in fields.items()}
    return out


def run(method: str, rank: int | None, world_size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    prototypes = [5] if method == "swav" else [3, 2]
    model = JointSSL(**TINY, method=method, num_prototypes=prototypes, num_prototypes_3d=[3] * len(prototypes))
    model.eval()  # BatchNorm on running statistics and no dropout: the split cannot change the network's output
    batch = shard(union_batch(), rank, world_size)
    result = {}
    if method == "deepcluster":
        model.intra.attach_memory(dataset_size=200, bank_size=IMAGES)
        model.inter.attach_memory(dataset_size=200, bank_size=VOLUMES)
        model.compute_losses(batch)  # fills both memory banks
        model.intra.on_epoch_start(seed=0)
        model.inter.on_epoch_start(seed=0)
        result["inter_centroids"] = model.inter.prototypes.heads[0].weight.detach().clone()
        result["inter_labels"] = model.inter.memory.labels.clone()
    out = model.compute_losses(batch)
    out["loss"].backward()
    result.update(intra=out["intra"].detach(), inter=out["inter"].detach(),
                  inter_assignments=out["inter_assignments"])
    result["aggregator_grad"] = torch.cat([p.grad.flatten() for p in model.aggregator.parameters() if p.grad is not None])
    return result


def compute(rank: int, world_size: int) -> dict:
    return {method: run(method, rank, world_size) for method in ("swav", "deepcluster")}


if __name__ == "__main__":
    worker_main(compute)
