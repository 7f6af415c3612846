"""Checkpoint files that survive a crash and never run code when read.

:class:`AtomicCheckpointIO` is a Lightning ``CheckpointIO`` plugin. It writes a checkpoint to a temporary file in
the target's folder, flushes and fsyncs it, renames it over the target with :func:`os.replace` (atomic on POSIX
file systems) and fsyncs the folder. A process killed at any moment therefore leaves either the previous
checkpoint or the new one — never a truncated file. The temporary files of killed saves (``.<name>.<pid>.partial``)
are not ``*.ckpt`` files, so Lightning's ``ckpt_path="last"`` never picks one; the next save of the same
checkpoint deletes them. :func:`write_atomic` is the same rename for the project's other files (exports, reports,
embeddings, the validation cache), written by any function.

Its ``load_checkpoint`` reads with ``torch.load(weights_only=True)`` only: tensors and plain Python values, never
arbitrary objects (a downloaded checkpoint cannot execute code). ``weights_only=False`` is refused.

Enable it with ``Trainer(plugins=[AtomicCheckpointIO()])``, ``trainer.plugins`` in a config (``- class_path:
jointssl.checkpointing.AtomicCheckpointIO``), or :func:`install_atomic_checkpoint_io` on a built Trainer (the
:class:`AtomicCheckpoints` callback does that in ``setup``, before a checkpoint is read or written).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger("jointssl")

PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path, pid: int | None = None) -> Path:
    """The temporary file a save of ``path`` by process ``pid`` (default: this one) writes first."""
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}{PARTIAL_SUFFIX}")


def stale_partials(path: Path) -> list[Path]:
    """Temporary files left in ``path``'s folder by saves of ``path`` that never finished."""
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return []
    return sorted(
        candidate
        for candidate in path.parent.iterdir()
        if candidate.name.startswith(prefix) and candidate.name.endswith(PARTIAL_SUFFIX)
    )


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` such that ``path`` holds either its previous content or all of ``obj``, also if
    the process dies during the call or the machine loses power right after it returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One writer per checkpoint path (rank 0): a partial file of this path is from a save that was killed.
    for stale in stale_partials(path):
        stale.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted checkpoint save", stale)
    temporary = partial_path(path)
    try:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the rename can make it visible
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # the rename itself is on disk


def _current_umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Write via ``write(temporary path)`` in the same folder (created if needed), then rename over ``path``:
    readers see the old content or all of the new, also if the process dies or the machine loses power (the data
    is synced to disk before the rename). Every non-checkpoint file jointssl writes goes through here.

    The file gets the mode an ordinary ``open(path, "w")`` would give (0666 minus the umask), set explicitly:
    mkstemp creates it 0600, and so does safetensors' ``save_file`` (whatever the umask), which would hide exports
    and reports from colleagues on a shared cluster."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o666 & ~_current_umask())
        synced = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(synced)
        finally:
            os.close(synced)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _fsync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory descriptors
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems do not support fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(descriptor)


def _is_remote(path: _PATH) -> bool:
    return "://" in str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic, durable saves and tensors-only loads (see the module docstring).

    Remote paths (``s3://...``) are saved by Lightning's own fsspec transaction instead (object stores publish an
    object only when its upload completes).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        if _is_remote(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | str | torch.device | None = lambda storage, location: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(
                "jointssl reads checkpoints with weights_only=True only (tensors and plain values): unpickling "
                "arbitrary objects would run code stored in the file"
            )
        if _is_remote(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return torch.load(path, map_location=map_location, weights_only=True)


def install_atomic_checkpoint_io(trainer: Trainer) -> bool:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` when it uses Lightning's default ``TorchCheckpointIO``.

    A CheckpointIO configured on purpose (any other class, or an AtomicCheckpointIO already) is kept. Returns
    whether the plugin was installed.
    """
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if type(current) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True


class AtomicCheckpoints(Callback):
    """Installs :class:`AtomicCheckpointIO` in ``setup`` (before any checkpoint is read or written) unless the
    Trainer was given a CheckpointIO of its own — for runs whose Trainer is not configured with the plugin."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if install_atomic_checkpoint_io(trainer):
            log.debug("checkpoints are written atomically (AtomicCheckpointIO)")
