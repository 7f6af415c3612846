"""One training run for tests/test_lightning_ddp_equivalence.py: the joint objective (L_intra + L_inter + L_mask)
trained through Lightning for a few steps on fixed data, on 1 process with per-device batch 2B or on 2 gloo
processes (Lightning's `ddp` strategy) with per-device batch B. Rank r of W processes takes rows
[s*W*B + r*B, s*W*B + (r+1)*B) at step s, so the two ranks together see exactly the one process's batches.

The network is free of BatchNorm (a LayerNorm timm ConvNeXt, linear projection heads: SyncBatchNorm needs a GPU),
dropout is 0, and the data carries no random augmentation, so every remaining difference would come from the
distributed code paths: Sinkhorn sums, k-means, queues, memory banks, DDP's gradient averaging and buffer handling.

Usage: python -m tests.lightning_equivalence_worker --method swav --devices 2 --batch 4 --steps 6 --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Sampler

from jointssl.pretrain import JointSSL

IMAGES, VOLUMES, SLICES, SIZE = 32, 8, 6, 32


class FixedSamples(Dataset):
    """Deterministic samples: 2D items with two 32 px crops, or volumes with two views of SLICES slices."""

    def __init__(self, kind: str, count: int, first_index: int) -> None:
        self.kind, self.count, self.first_index = kind, count, first_index

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        generator = torch.Generator().manual_seed(1000 * (self.kind == "volumes") + i)
        index = self.first_index + i
        if self.kind == "images":
            crops = [torch.randn(1, SIZE, SIZE, generator=generator) for _ in range(2)]
            return {"crops": crops, "index": index, "source": "fixed-images"}
        views = torch.randn(2, SLICES, 1, SIZE, SIZE, generator=generator)
        return {"views": views, "padding_mask": torch.zeros(SLICES, dtype=torch.bool), "index": index,
                "source": "fixed-volumes"}


class ShardedBatches(Sampler[list[int]]):
    """Global batch s = rows [s*W*B, (s+1)*W*B); this rank's part of it, in order."""

    def __init__(self, count: int, batch: int, rank: int, world: int) -> None:
        self.count, self.batch, self.rank, self.world = count, batch, rank, world

    def __len__(self) -> int:
        return self.count // (self.batch * self.world)

    def __iter__(self):
        for step in range(len(self)):
            start = step * self.batch * self.world + self.rank * self.batch
            yield list(range(start, start + self.batch))


class FixedJointData(pl.LightningDataModule):
    """The attributes JointSSL reads from a data module (batch sizes, sample counts) and the two streams."""

    def __init__(self, batch_size: int, volume_batch_size: int) -> None:
        super().__init__()
        self.batch_size, self.volume_batch_size = batch_size, volume_batch_size
        self.num_volumes, self.num_samples = VOLUMES, IMAGES + VOLUMES

    def train_dataloader(self) -> CombinedLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        loaders = {
            "images": DataLoader(FixedSamples("images", IMAGES, 0),
                                 batch_sampler=ShardedBatches(IMAGES, self.batch_size, rank, world)),
            "volumes": DataLoader(FixedSamples("volumes", VOLUMES, IMAGES),
                                  batch_sampler=ShardedBatches(VOLUMES, self.volume_batch_size, rank, world)),
        }
        return CombinedLoader(loaders, mode="max_size_cycle")


class PoisonOneRank(pl.Callback):
    """NaN crops on one rank at one step: every rank must skip that step together (no hang, no divergence)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch["images"]["crops"][0][0] = float("nan")


class RecordLoss(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Logged with sync_dist=True: the mean over ranks, i.e. the loss of the whole global batch.
        self.losses.append({k: float(v) for k, v in trainer.callback_metrics.items()
                            if k.startswith("train/loss") or k == "train/lr"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["swav", "deepcluster"], required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True, help="2D samples per device")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--poison", default="", help="RANK:STEP whose 2D crops become NaN")
    parser.add_argument("--max-bad-steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    swav = args.method == "swav"
    model = JointSSL(
        # No BatchNorm anywhere (none in the projection heads or f_inter's input): without CUDA there is no
        # SyncBatchNorm, and per-device batch statistics differ between 2 x B and 1 x 2B by design.
        backbone="test_convnext", d_model=32, method=args.method, projection_hidden_dim=0, projection_dim=16,
        aggregator_input_norm="none",
        num_prototypes=[6] if swav else [5, 4], num_prototypes_3d=[3] if swav else [3, 2],
        # Queues of 2 global batches, used from the first step (SwAV); ignored by DeepCluster-v2.
        queue_length=2 * 2 * args.batch * args.devices if swav else 0, queue_length_3d=0, queue_start_epoch=0,
        freeze_prototypes_steps=2, kmeans_iterations=3, intra_slices_per_volume=2, mask_ratio=0.34,
        aggregator_layers=1, aggregator_heads=4, aggregator_ffn_dim=48, aggregator_dropout=0.0,
        deformable_downsample=2, max_consecutive_bad_steps=args.max_bad_steps, base_lr=0.05, lr_reference_batch_size=16, warmup_epochs=0.0, momentum=0.9,
        # Plain SGD: LARS moves a weight by ~lr x 1e-3 of its norm per step, too little in 6 steps for the losses
        # to move measurably, and the comparison must not be between two untrained models.
        lars_trust_coefficient=0.0,
    )
    # Volumes per device: 2 in the 2-process run, 4 in the 1-process run (the same global batch).
    data = FixedJointData(batch_size=args.batch, volume_batch_size=2 * args.batch // 4)
    recorder = RecordLoss()
    callbacks = [recorder]
    if args.poison:
        rank, step = (int(x) for x in args.poison.split(":"))
        callbacks.append(PoisonOneRank(rank, step))
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=callbacks, log_every_n_steps=1,
    )
    trainer.fit(model, datamodule=data)
    if trainer.is_global_zero:
        # Parameters only: queues and memory banks are per rank by design (their checkpointing is tested in tests/test_rank_state.py).
        state = {k: v.detach().cpu().clone() for k, v in model.named_parameters()}
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save({"losses": recorder.losses, "state": state, "global_step": trainer.global_step,
                    "skipped_steps": model.numerics_guard.skipped_steps},
                   args.out / f"{args.method}_{args.devices}.pt")


if __name__ == "__main__":
    main()
