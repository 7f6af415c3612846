"""Exact resume: resumable sampling and loaders (jointssl.data.sampling), per-sample augmentation seeds, RNG state
in checkpoints (jointssl.callbacks.resume), and `jointssl fit` runs killed with SIGKILL mid-epoch and resumed with
`--ckpt_path last` that end bitwise identical to an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import Dataset, DistributedSampler

from jointssl.callbacks.resume import RNG_STATES_KEY, capture_rng_state, restore_rng_state
from jointssl.data.sampling import ResumableDataLoader, ResumableSampler, SampleKey, SeededDataset
from jointssl.data.transforms import MultiCropTransform
from jointssl.data.volume_transforms import VolumeViews
from tests.conftest import REPO_ROOT

JOINTSSL = Path(sys.executable).parent / "jointssl"


# ------------------------------------------------------------------------------------------------------------
# Sampling and loaders (in process)
# ------------------------------------------------------------------------------------------------------------


class Positions(Dataset):
    """Items are (position, seed) pairs; counts the lookups (made in this process with num_workers=0)."""

    def __init__(self, size: int):
        self.size = size
        self.lookups = 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: SampleKey) -> tuple[int, int]:
        self.lookups += 1
        return key.position, key.seed


def collate_keys(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return list(items)


def make_loader(size: int = 37, batch_size: int = 4, world: int = 1, rank: int = 0, **kwargs: Any):
    dataset = Positions(size)
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=11)
    return ResumableDataLoader(dataset, sampler=sampler, batch_size=batch_size, collate_fn=collate_keys, **kwargs)


def test_sampler_orders_like_distributed_sampler_and_reshuffles_further_passes():
    dataset = list(range(37))
    for world in (1, 2, 3):
        shards = []
        for rank in range(world):
            ours = ResumableSampler(dataset, world, rank, seed=5)
            reference = DistributedSampler(dataset, world, rank, seed=5)
            for epoch in (0, 3):
                ours.set_epoch(epoch)
                reference.set_epoch(epoch)
                assert list(ours) == list(reference)
            shards.append(ours.pass_positions(epoch=3, pass_index=0).tolist())
            assert ours.pass_positions(3, 1).tolist() != shards[-1]  # a further pass of the epoch: a new order
        # Disjoint shards covering the dataset (padding repeats at most world - 1 samples).
        flat = [i for shard in shards for i in shard]
        assert set(flat) == set(dataset) and len(flat) - len(set(flat)) < world
        seeds = np.concatenate([ResumableSampler(dataset, world, r, seed=5).pass_seeds(3, 0) for r in range(world)])
        assert len(set(seeds.tolist())) == len(seeds)  # one augmentation seed per slot, none shared


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_resumes_mid_pass_with_the_same_batches(num_workers: int):
    kwargs = dict(num_workers=num_workers, persistent_workers=num_workers > 0)
    reference = make_loader(**kwargs)
    reference.sampler.set_epoch(2)
    expected = [batch for batch in reference]
    assert len(expected) == 37 // 4

    interrupted = make_loader(**kwargs)
    interrupted.sampler.set_epoch(2)
    iterator = iter(interrupted)
    consumed = [next(iterator) for _ in range(3)]
    state = interrupted.state_dict()
    assert (state["epoch"], state["pass_index"], state["batches"]) == (2, 0, 3)  # workers' prefetch not counted

    resumed = make_loader(**kwargs)  # a new process: fresh objects, epoch 0 until the state says otherwise
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert consumed + rest == expected
    if num_workers == 0:
        assert resumed.dataset.lookups == (len(expected) - 3) * 4  # skipped batches were never looked up
    assert resumed.state_dict()["batches"] == len(expected)


def test_resume_state_from_a_finished_epoch_starts_the_next_epoch_fresh():
    """Lightning creates its iterator before it sets the next epoch when it resumes from a checkpoint taken after
    an epoch's last batch: the pass follows set_epoch until its first batch."""
    loader = make_loader()
    loader.sampler.set_epoch(0)
    list(loader)
    state = loader.state_dict()
    resumed = make_loader()
    resumed.load_state_dict(state)
    iterator = iter(resumed)  # created for the finished epoch 0 ...
    resumed.sampler.set_epoch(1)  # ... then Lightning moves on
    fresh = make_loader()
    fresh.sampler.set_epoch(1)
    assert list(iterator) == list(fresh)


def test_a_pass_run_before_training_starts_leaves_the_training_pass_and_its_workers_alone():
    """JointSSL's DeepCluster-v2 memory fill iterates the training loaders after Lightning created its iterators;
    with persistent workers that used to reset the training iterator (an empty first epoch)."""
    loader = make_loader(num_workers=1, persistent_workers=True)
    training = iter(loader)
    fill = list(loader)  # a whole pass in between (its own workers)
    assert len(fill) == len(loader)
    batches = list(training)
    assert len(batches) == len(loader) and batches != fill  # pass 0, then pass 1 had a fresh order
    assert loader.state_dict()["pass_index"] == 0  # the position is the training pass's


def test_augmentation_is_a_function_of_the_sample_key_only():
    image = torch.rand(1, 40, 40)
    crops = SeededDataset(_ConstantImage(image, MultiCropTransform(global_crop_size=24, local_crop_size=12,
                                                                   num_local_crops=1)))
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = crops[SampleKey(0, 123)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    torch.manual_seed(99)
    again = crops[SampleKey(0, 123)]
    other = crops[SampleKey(0, 124)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))

    views = VolumeViews(num_slices=4, size=16, seed=0)
    volumes = SeededDataset(_ConstantImage(torch.rand(6, 20, 20), views), reseed=[views.reseed])
    a, b = volumes[SampleKey(0, 7)], volumes[SampleKey(0, 7)]
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], volumes[SampleKey(0, 8)][0])


class _ConstantImage(Dataset):
    def __init__(self, image: torch.Tensor, transform):
        self.image, self.transform = image, transform

    def __len__(self) -> int:
        return 1

    def __getitem__(self, position: int):
        return self.transform(self.image)


def test_rng_state_round_trips_through_a_tensors_only_checkpoint(tmp_path: Path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.normal()  # leaves a cached Gaussian in numpy's legacy state
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    torch.save({RNG_STATES_KEY: [state]}, tmp_path / "rng.ckpt")
    loaded = torch.load(tmp_path / "rng.ckpt", weights_only=True)[RNG_STATES_KEY][0]
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    restore_rng_state(loaded)
    again = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


# ------------------------------------------------------------------------------------------------------------
# SIGKILL mid-epoch and resume through the console script
# ------------------------------------------------------------------------------------------------------------

MAX_STEPS = 12  # 2D stream: 24 images + 40 slices = 8 batches of 8 per epoch; volumes: 4 batches of 2 (cycled)


def run_config(
    data_root: Path, run_dir: Path, method: str, num_workers: int, devices: int = 1, **model: Any
) -> dict[str, Any]:
    """A tiny joint run: 12 steps over 1.5 epochs (3 epochs with 2 ranks), a checkpoint every 2 steps,
    deterministic on CPU."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            **({"strategy": "ddp"} if devices > 1 else {}),
            "max_steps": MAX_STEPS,
            "deterministic": True,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run_dir),
            "plugins": [{"class_path": "jointssl.checkpointing.AtomicCheckpointIO"}],
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(run_dir / "checkpoints"), "save_last": True, "every_n_train_steps": 2}},
                {"class_path": "jointssl.callbacks.resume.ExactResume"},
            ],
        },
        "model": {
            "class_path": "jointssl.pretrain.JointSSL",
            "init_args": {
                "backbone": "test_resnet", "d_model": 32, "projection_hidden_dim": 64, "projection_dim": 16,
                "method": method, "num_prototypes": [10], "num_prototypes_3d": [4], "queue_length": 0,
                "queue_length_3d": 0, "freeze_prototypes_steps": 3, "aggregator_layers": 1, "aggregator_heads": 4,
                "aggregator_ffn_dim": 32, "aggregator_dropout": 0.1, "intra_slices_per_volume": 2,
                "warmup_epochs": 0.5, **model,
            },
        },
        "data": {
            "class_path": "jointssl.data.JointDataModule",
            "init_args": {
                "synthetic": {"root": str(data_root), "num_images": 24, "image_size": 40, "num_volumes": 8,
                              "volume_shape": [40, 40, 10]},
                "batch_size": 8, "volume_batch_size": 2, "num_workers": num_workers, "global_crop_size": 32,
                "local_crop_size": 16, "num_local_crops": 1, "num_slices": 6, "volume_size": 32,
                "volume_in_plane_size": 40, "slice_stride": 2,
            },
        },
    }


def start_fit(config: dict[str, Any], path: Path, resume: bool) -> subprocess.Popen:
    path.write_text(yaml.safe_dump(config))
    command = [str(JOINTSSL), "fit", "--config", str(path)] + (["--ckpt_path", "last"] if resume else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    # A session of its own: the kill must reach every process of the run (DataLoader workers too).
    return subprocess.Popen(command, cwd=path.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def kill_after_checkpoint(config: dict[str, Any], path: Path, step: int, resume: bool) -> None:
    """Run until the checkpoint of `step` is written and the next batch is about to start, then SIGKILL the whole
    run mid-epoch and check that last.ckpt is that checkpoint."""
    marker = path.with_suffix(".paused")
    paused = dict(config, trainer=dict(config["trainer"]))
    paused["trainer"]["callbacks"] = config["trainer"]["callbacks"] + [
        {"class_path": "tests.fault_injection.PauseAtStep", "init_args": {"step": step, "marker": str(marker)}}
    ]
    process = start_fit(paused, path, resume)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"run ended before step {step}:\n{process.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, "run did not reach the kill point"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    checkpoint = torch.load(Path(config["trainer"]["default_root_dir"]) / "checkpoints" / "last.ckpt",
                            map_location="cpu", weights_only=True, mmap=True)
    assert checkpoint["global_step"] == step


def differences(expected: Any, actual: Any, path: str = "") -> tuple[float, list[str]]:
    """Largest absolute difference over all tensors, and every other mismatch, between two checkpoints (paths to
    the two run folders excepted)."""
    if isinstance(expected, dict):
        worst, found = 0.0, sorted(f"{path}/{k}: only in one" for k in set(expected) ^ set(actual))
        for key in set(expected) & set(actual):
            d, f = differences(expected[key], actual[key], f"{path}/{key}")
            worst, found = max(worst, d), found + f
        return worst, found
    if isinstance(expected, (list, tuple)):
        if len(expected) != len(actual):
            return 0.0, [f"{path}: lengths {len(expected)} != {len(actual)}"]
        results = [differences(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(expected, actual))]
        return max([0.0] + [d for d, _ in results]), [m for _, f in results for m in f]
    if isinstance(expected, torch.Tensor):
        if expected.shape != actual.shape or expected.dtype != actual.dtype:
            return float("inf"), [f"{path}: {expected.shape}/{expected.dtype} != {actual.shape}/{actual.dtype}"]
        if torch.equal(expected, actual):
            return 0.0, []
        diff = (expected.double() - actual.double()).abs().max().item() if expected.numel() else 0.0
        return diff, [f"{path}: max abs difference {diff:g}"]
    if isinstance(expected, str) and "/run_" in expected:
        return 0.0, []  # a path inside one of the two run folders
    return 0.0, [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


def compare_with_uninterrupted(
    tmp_path: Path, method: str, kills: list[int], num_workers: int, devices: int = 1, **model: Any
) -> float:
    data_root = tmp_path / "data"
    reference_config = run_config(data_root, tmp_path / "run_reference", method, num_workers, devices, **model)
    killed_config = run_config(data_root, tmp_path / "run_killed", method, num_workers, devices, **model)
    # The synthetic data is generated once before the two runs race to it.
    from jointssl.data.synthetic import SyntheticData, generate_synthetic_data

    generate_synthetic_data(SyntheticData(**reference_config["data"]["init_args"]["synthetic"]))
    reference = start_fit(reference_config, tmp_path / "reference.yaml", resume=False)  # alongside the others
    for number, step in enumerate(kills):
        kill_after_checkpoint(killed_config, tmp_path / f"killed_{number}.yaml", step, resume=number > 0)
    output = finish(start_fit(killed_config, tmp_path / "resumed.yaml", resume=True))
    assert f"resuming from {tmp_path / 'run_killed' / 'checkpoints' / 'last.ckpt'}" in output
    finish(reference)

    expected = torch.load(tmp_path / "run_reference" / "checkpoints" / "last.ckpt", weights_only=True)
    actual = torch.load(tmp_path / "run_killed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert expected["global_step"] == actual["global_step"] == MAX_STEPS
    weight_difference, _ = differences(expected["state_dict"], actual["state_dict"])
    print(f"{method}: killed after steps {kills}, max abs weight difference {weight_difference:g}")
    _, mismatches = differences(expected, actual)
    # Everything matches bitwise: weights, BatchNorm statistics, optimizer momentum, scheduler, loop progress,
    # loader positions, RNG states, queues/memory banks.
    assert not mismatches, mismatches[:20]
    return weight_difference


def test_swav_run_killed_mid_epoch_and_at_an_epoch_end_resumes_bitwise(tmp_path: Path):
    """Kill after step 8 (the last batch of epoch 0: Lightning then skips the next epoch start without
    ExactResume) and after step 10 (mid-epoch 1), resume twice. SwAV queues (2D and 3D) in use from epoch 1."""
    difference = compare_with_uninterrupted(
        tmp_path, "swav", kills=[8, 10], num_workers=0, queue_length=16, queue_length_3d=8, queue_start_epoch=1
    )
    assert difference == 0.0


def test_deepcluster_run_with_worker_processes_killed_mid_epoch_resumes_bitwise(tmp_path: Path):
    """DeepCluster-v2 (memory banks and k-means labels per rank, a memory fill before the first epoch) with a
    DataLoader worker per stream; killed after step 6 (mid-epoch, the volume stream in its second pass) and after
    step 8 (the epoch end, where the next epoch's k-means must still run)."""
    assert compare_with_uninterrupted(tmp_path, "deepcluster", kills=[6, 8], num_workers=1) == 0.0


@pytest.mark.slow
@pytest.mark.ddp
def test_two_rank_ddp_run_killed_mid_epoch_resumes_bitwise(tmp_path: Path):
    """2-process CPU DDP (each rank's RNG state, loader position and queues/banks restored on its own rank); 4
    batches per epoch: killed after step 4 (an epoch end) and step 6 (mid-epoch)."""
    assert compare_with_uninterrupted(tmp_path, "deepcluster", kills=[4, 6], num_workers=0, devices=2) == 0.0
