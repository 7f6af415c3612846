"""Atomic checkpoint files (jointssl.checkpointing): a process killed while saving leaves the previous checkpoint
intact and loadable; leftovers of killed saves are never taken for checkpoints and are cleaned up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from jointssl import checkpointing
from jointssl.checkpointing import (
    AtomicCheckpointIO,
    AtomicCheckpoints,
    atomic_save,
    install_atomic_checkpoint_io,
    partial_path,
    stale_partials,
)
from tests.conftest import REPO_ROOT

# Saves checkpoints {"global_step": k, "weights": full(k)} to argv[1] for k = 1, 2, ... and reports each.
WRITER = """
import sys, torch
from jointssl.checkpointing import AtomicCheckpointIO
checkpoint_io, path, size = AtomicCheckpointIO(), sys.argv[1], int(sys.argv[2])
for step in range(1, 100000):
    checkpoint_io.save_checkpoint({"global_step": step, "weights": torch.full((size,), float(step))}, path)
    print(f"saved {step}", flush=True)
"""
WEIGHTS = 24_000_000  # 96 MB of float32: each save takes long enough to be caught in the middle


def kill_writer_during_a_save(target: Path) -> tuple[str, bool]:
    """Start the writer, SIGKILL it as soon as a save after the first is in progress; returns its output and
    whether a partial file was left (the kill landed inside a save)."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), str(WEIGHTS)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 60
    try:
        # last.ckpt exists once the first save completed; a partial file is a later save in progress.
        while not (target.exists() and stale_partials(target)):
            assert writer.poll() is None, writer.stdout.read()
            assert time.monotonic() < deadline, "no save in progress seen"
            time.sleep(0.002)
        writer.send_signal(signal.SIGKILL)
        output, _ = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
    return output, bool(stale_partials(target))


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path: Path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    for _ in range(3):  # the kill can land just after a save completed; retry until one lands inside a save
        output, interrupted = kill_writer_during_a_save(target)
        if interrupted:
            break
    assert interrupted, "the writer was never killed inside a save"
    completed = [int(line.split()[1]) for line in output.splitlines() if line.startswith("saved ")]
    checkpoint = torch.load(target, map_location="cpu", weights_only=True)
    step = checkpoint["global_step"]
    # The newest complete save (its report may have been cut off by the kill), bit for bit.
    assert step in (max(completed, default=0), max(completed, default=0) + 1) and step >= 1
    assert torch.equal(checkpoint["weights"], torch.full((WEIGHTS,), float(step)))

    # The next save cleans up after the killed one.
    AtomicCheckpointIO().save_checkpoint({"global_step": step + 1}, target)
    assert stale_partials(target) == []
    assert torch.load(target, weights_only=True) == {"global_step": step + 1}


def test_resume_from_last_ignores_the_partial_file_of_a_killed_save(tmp_path: Path):
    """Lightning's `ckpt_path="last"` picks the newest `last*.ckpt`: a killed save's partial file, newer than the
    checkpoint, is not one (loading it would fail on a truncated file)."""
    folder = tmp_path / "checkpoints"

    def trainer(max_steps: int) -> Trainer:
        return Trainer(
            max_steps=max_steps, limit_train_batches=4, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
            callbacks=[ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=2)],
        )

    trainer(2).fit(BoringModel())
    partial = partial_path(folder / "last.ckpt", pid=999999)
    partial.write_bytes((folder / "last.ckpt").read_bytes()[:1000])  # a truncated save, written later
    resumed = trainer(4)
    resumed.fit(BoringModel(), ckpt_path="last")
    assert resumed.global_step == 4
    assert not partial.exists()  # removed by the resumed run's first save of last.ckpt


def test_save_syncs_the_data_before_the_rename_and_the_folder_after(tmp_path: Path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpointing.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(checkpointing.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_save({"x": torch.ones(3)}, tmp_path / "a.ckpt")
    assert events == ["fsync", "replace", "fsync"]  # file, rename, folder


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_partial_file(tmp_path: Path):
    target = tmp_path / "last.ckpt"
    atomic_save({"step": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"step": 2, "bad": Unpicklable()}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert stale_partials(target) == []


def test_loading_reads_tensors_only(tmp_path: Path):
    target = tmp_path / "a.ckpt"
    atomic_save({"w": torch.arange(3)}, target)
    checkpoint_io = AtomicCheckpointIO()
    assert torch.equal(checkpoint_io.load_checkpoint(target)["w"], torch.arange(3))
    with pytest.raises(ValueError, match="weights_only=True only"):
        checkpoint_io.load_checkpoint(target, weights_only=False)
    with pytest.raises(FileNotFoundError):
        checkpoint_io.load_checkpoint(tmp_path / "missing.ckpt")


def test_the_plugin_replaces_only_lightnings_default(tmp_path: Path):
    plain = Trainer(logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    assert type(plain.strategy.checkpoint_io) is TorchCheckpointIO
    AtomicCheckpoints().setup(plain, BoringModel(), "fit")
    assert isinstance(plain.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not install_atomic_checkpoint_io(plain)  # already installed

    class Custom(TorchCheckpointIO):
        pass

    custom = Trainer(logger=False, enable_checkpointing=False, default_root_dir=tmp_path, plugins=[Custom()])
    assert not install_atomic_checkpoint_io(custom)
    assert type(custom.strategy.checkpoint_io) is Custom


def test_write_atomic_replaces_whole_files_and_leaves_none_on_failure(tmp_path: Path):
    target = tmp_path / "new" / "folder" / "report.json"
    checkpointing.write_atomic(target, lambda temporary: temporary.write_text("first"))
    assert target.read_text() == "first"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~checkpointing._current_umask())

    def fail(temporary: Path) -> None:
        temporary.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpointing.write_atomic(target, fail)
    assert target.read_text() == "first"  # the old content, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]  # no temporary left behind


def test_write_json_writes_the_whole_report_or_keeps_the_old_one(tmp_path: Path):
    target = tmp_path / "reports" / "result.json"
    checkpointing.write_json(target, {"auroc": 0.75, "rows": [1, 2]})
    assert target.read_text() == '{\n  "auroc": 0.75,\n  "rows": [\n    1,\n    2\n  ]\n}\n'

    with pytest.raises(TypeError):  # not JSON: refused before anything is written
        checkpointing.write_json(target, {"tensor": torch.zeros(2)})
    assert json.loads(target.read_text()) == {"auroc": 0.75, "rows": [1, 2]}
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
    checkpointing.write_json(target, {"path": Path("a")}, indent=None, default=str)
    assert target.read_text() == '{"path": "a"}\n'
