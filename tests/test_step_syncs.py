"""What a pretraining step waits for, counted by jointssl.instrumentation.StepSyncCounter (host synchronisations
and torch.distributed collectives per step): the numerics guard's one host read per step, no collective of the
logging on steps where nothing is logged and one on those where it is, and SwAV's Sinkhorn solving the views of a
batch together (one all-reduce per iteration for both)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from jointssl.data import JointDataModule, SyntheticData
from jointssl.instrumentation import StepSyncCounter, read_counts
from jointssl.pretrain import JointSSL
from tests.downstream_fixtures import TINY_PRETRAIN

LOG_EVERY = 3
SINKHORN_ITERATIONS = 3
GUARD_READ = ("host", "jointssl/callbacks/numerics_guard.py")


def train(tmp_path: Path, method: str, devices: int) -> dict[int, collections.Counter]:
    seed_everything(0)
    # Queues from the first step: SwAV's "is the queue full?" is answered on the host after one first read.
    model = JointSSL(**{**TINY_PRETRAIN, "method": method}, warmup_epochs=0, freeze_prototypes_steps=0,
                     queue_length=16, queue_length_3d=4, queue_start_epoch=0, sinkhorn_iterations=SINKHORN_ITERATIONS)
    data = JointDataModule(
        synthetic=SyntheticData(root=str(tmp_path / "data"), num_images=96, image_size=40, num_volumes=12,
                                volume_shape=(40, 40, 8)),
        batch_size=4, volume_batch_size=2, num_workers=0, global_crop_size=32, local_crop_size=16, num_slices=6,
        volume_size=32, volume_in_plane_size=40,
    )
    output = str(tmp_path / "counts_{rank}.json")
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
                      max_steps=7, logger=CSVLogger(tmp_path), log_every_n_steps=LOG_EVERY, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[StepSyncCounter(output)])
    trainer.fit(model, datamodule=data)
    return read_counts(tmp_path / "counts_0.json")


def from_package(counts: collections.Counter, kind: str, package: str = "jointssl/") -> int:
    return sum(n for (k, where), n in counts.items() if k == kind and where.startswith(package))


def is_logging(step: int) -> bool:
    return (step + 1) % LOG_EVERY == 0


@pytest.mark.parametrize("method", ["swav", "deepcluster"])
def test_one_host_sync_per_step_the_guards(tmp_path: Path, method: str) -> None:
    steps = train(tmp_path, method, devices=1)
    assert len(steps) == 7
    # Step 0 reads the queue fill once; the last step (6) also ends the epoch (the collapse monitor's statistics).
    for step in range(1, 6):
        host = [(where, n) for (kind, where), n in steps[step].items() if kind == "host"]
        jointssl_reads = {where: n for where, n in host if where.startswith("jointssl/")}
        assert list(jointssl_reads.values()) == [1] and next(iter(jointssl_reads)).startswith(GUARD_READ[1]), (
            step, host)
        if not is_logging(step):
            assert len(host) == 1, (step, host)  # nothing else reads a device value on a step that logs nothing


@pytest.mark.parametrize("method", ["swav", "deepcluster"])
def test_collectives_per_step_under_two_ddp_ranks(tmp_path: Path, method: str) -> None:
    steps = train(tmp_path, method, devices=2)
    # The guard's one all-reduce of the loss flags; SwAV: three Sinkhorn problems per step (2D multi-crop, slice
    # pairs, volumes), each one max and SINKHORN_ITERATIONS sums for both views; the logged means on logging steps.
    sinkhorn = 3 * (1 + SINKHORN_ITERATIONS) if method == "swav" else 0
    for step in range(1, 6):
        ours = from_package(steps[step], "collective")
        assert ours == 1 + sinkhorn + is_logging(step), (step, steps[step])
        others = sum(n for (kind, where), n in steps[step].items()
                     if kind == "collective" and not where.startswith("jointssl/"))
        assert others <= 1, (step, steps[step])  # Lightning's own: its SIGTERM broadcast at every step
        host = from_package(steps[step], "host")
        assert host == 1, (step, steps[step])
