"""Checkpoint files that survive a crash and never run code when read.

:class:`AtomicCheckpointIO` is a Lightning ``CheckpointIO`` plugin. It writes a checkpoint to a temporary file in
the target's folder, flushes and fsyncs it, renames it over the target with :func:`os.replace` (atomic on POSIX
file systems) and fsyncs the folder. A process killed at any moment therefore leaves either the previous
checkpoint or the new one — never a truncated file. The temporary files of killed saves (``.<name>.<pid>.partial``)
are not ``*.ckpt`` files, so Lightning's ``ckpt_path="last"`` never picks one; the next save of the same
checkpoint deletes them. :func:`write_atomic` is the same rename for the project's other files (exports, reports,
embeddings, the validation cache), written by any function; :func:`write_json` writes a JSON report through it.

Its ``load_checkpoint`` reads with ``torch.load(weights_only=True)`` only: tensors and plain Python values, never
arbitrary objects (a downloaded checkpoint cannot execute code). ``weights_only=False`` is refused.

Every checkpoint jointssl reads goes through :func:`read_checkpoint`, and every file it writes through
:func:`atomic_save` or :func:`write_atomic`: a file that cannot be read (missing, a folder, empty, truncated, not
PyTorch's format, holding pickled objects) or written (a full disk, no permission) is a
:class:`~jointssl.errors.UserError` naming the path and the reason (:class:`CheckpointReadError`,
:class:`FileWriteError`), reported by the command line as one message (jointssl.errors).

Enable it with ``Trainer(plugins=[AtomicCheckpointIO()])``, ``trainer.plugins`` in a config (``- class_path:
jointssl.checkpointing.AtomicCheckpointIO``), or :func:`install_atomic_checkpoint_io` on a built Trainer (the
:class:`AtomicCheckpoints` callback does that in ``setup``, before a checkpoint is read or written).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Callback, LightningModule, Trainer

from jointssl.errors import UserError

log = logging.getLogger("jointssl")

PARTIAL_SUFFIX = ".partial"


class CheckpointReadError(UserError, ValueError):
    """A checkpoint that cannot be read, or not as what it is used for: the message names the file and why."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A checkpoint path where there is no file."""


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint whose tensors do not fit the model it is resumed into (another architecture)."""


class FileWriteError(UserError, OSError):
    """A file that could not be written (full disk, quota, permissions, read-only file system): names the file
    and the system's reason. Nothing was replaced: the previous file at that path, if any, is intact."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        # OSError's own (errno, strerror) constructor would prefix "[Errno N]"; keep the number for callers.
        self.errno = code


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError that caused ``error``: itself, or one it was raised while handling (torch.save reports a failed
    write as a RuntimeError raised during the OSError of the file object)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        current = current.__cause__ or current.__context__
    return None


def _write_failed(what: str, path: Path, error: BaseException) -> FileWriteError | None:
    """The FileWriteError to raise for ``error`` while writing ``path`` (None when no OSError is behind it: e.g.
    an object that cannot be pickled is a bug, not the disk's fault)."""
    os_error = _os_error_in(error)
    if os_error is None:
        return None
    reason = os_error.strerror or str(os_error) or type(os_error).__name__
    hint = ""
    if os_error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free space there or write elsewhere"
    return FileWriteError(f"cannot write {what} {path}: {reason}{hint} (the previous file, if any, is intact)",
                          os_error.errno)


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _write_failed("checkpoint", path, error) from error
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
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        failure = _write_failed("checkpoint", path, error)
        if failure is None:
            raise
        raise failure from error
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _write_failed("file", path, error) from error
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
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        failure = _write_failed("file", path, error)
        if failure is None:
            raise
        raise failure from error


def write_json(path: str | os.PathLike[str], data: Any, indent: int | None = 2, default: Callable | None = None) -> None:
    """``data`` as a JSON file (ending in a newline) through :func:`write_atomic`: the one way jointssl and its
    benchmarks write a report, so that an interrupted run never leaves half a JSON document."""
    text = json.dumps(data, indent=indent, default=default) + "\n"
    write_atomic(Path(path), lambda temporary: temporary.write_text(text, encoding="utf-8"))


#: What torch's weights-only unpickler says when a file holds an object it refuses to build.
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``, or a :class:`CheckpointReadError` (``CheckpointNotFoundError``)
    that says which file and why: not found, a folder, empty, truncated or not PyTorch's format, or holding
    objects that only a full unpickle could build (refused: unpickling runs code stored in the file; torch's own
    message advises ``weights_only=False``, which is exactly what must not be done with a file of unknown
    origin). ``mmap``: map the file instead of reading it (tensors are read only when touched)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path}: no such file")
    if path.is_dir():
        raise CheckpointReadError(f"checkpoint {path}: is a folder, not a checkpoint file")
    try:
        size = path.stat().st_size
        if size == 0:
            raise CheckpointReadError(
                f"checkpoint {path}: empty file (0 bytes), left by an interrupted copy or a full disk; delete it "
                "or point to another checkpoint"
            )
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except CheckpointReadError:
        raise
    except pickle.UnpicklingError as error:
        unsafe = _UNSAFE_GLOBAL.search(str(error))
        if unsafe is None:  # bytes the unpickler cannot parse at all (random data, a cut-off legacy file)
            # torch's text around the reason advises weights_only=False, exactly what must not be done here.
            detail = str(error).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
            reason = f"unpickler: {detail[0].strip()}" if detail and detail[0].strip() else type(error).__name__
            raise CheckpointReadError(
                f"checkpoint {path}: truncated or not a PyTorch checkpoint ({size} bytes; {reason[:200]})"
            ) from error
        raise CheckpointReadError(
            f"checkpoint {path}: holds a pickled Python object ({unsafe.group(1)}), not only tensors and plain "
            "values; refused, jointssl never unpickles objects (that would run code stored in the file)"
        ) from error
    except OSError as error:
        raise CheckpointReadError(f"checkpoint {path}: cannot read it: {error.strerror or error}") from error
    except Exception as error:  # noqa: BLE001 - torch.load fails on bad bytes with any type (EOFError, IndexError, ...)
        if mmap:
            # torch maps only its zip format and says so for anything else: read it whole for the real reason
            # (or the content of a checkpoint in the legacy format).
            return read_checkpoint(path, map_location=map_location, mmap=False)
        raise CheckpointReadError(
            f"checkpoint {path}: truncated or not a PyTorch checkpoint ({size} bytes; {_first_line(error)})"
        ) from error


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # The first sentence: torch goes on with advice that does not apply here.
    return f"{type(error).__name__}: {lines[0].split('. ')[0][:200]}" if lines else type(error).__name__


def read_lightning_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu", mmap: bool = False) -> dict:
    """:func:`read_checkpoint` of a file that must be a Lightning checkpoint (what ``Trainer.fit(ckpt_path=...)``
    resumes from): a dict with ``state_dict`` and Lightning's version key."""
    checkpoint = read_checkpoint(path, map_location=map_location, mmap=mmap)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "pytorch-lightning_version" not in checkpoint:
        raise CheckpointReadError(
            f"checkpoint {path}: not a Lightning checkpoint (no state_dict / pytorch-lightning_version): a run "
            "resumes only from a checkpoint its Trainer wrote"
        )
    return checkpoint


def check_checkpoint_fits(path: str | os.PathLike[str], model: torch.nn.Module, checkpoint: dict | None = None) -> None:
    """Refuse to resume ``model`` from the checkpoint at ``path`` when its tensors cannot load into it, naming
    the hyper-parameters in which the checkpoint and the model differ (e.g. ``backbone``) instead of Lightning's
    screens of missing and unexpected keys.

    Only parameters are compared (their shapes are fixed when the model is built; buffers such as memory banks
    are sized later, in set-up), and a missing one only under strict loading: a mismatch found here is one the
    load would fail on."""
    if checkpoint is None:
        checkpoint = read_lightning_checkpoint(path, mmap=True)
    saved = checkpoint.get("state_dict", {})
    strict = getattr(model, "strict_loading", True)
    missing, reshaped = [], []
    for name, parameter in model.named_parameters():
        if name not in saved:
            if strict:
                missing.append(name)
        elif tuple(saved[name].shape) != tuple(parameter.shape):
            reshaped.append(name)
    if not missing and not reshaped:
        return
    saved_hparams = checkpoint.get("hyper_parameters") or {}
    current = dict(getattr(model, "hparams", {}) or {})
    differences = [
        f"{name} {saved_hparams[name]!r}, the config says {current[name]!r}"
        for name in saved_hparams
        if name in current and not name.startswith("_") and saved_hparams[name] != current[name]
    ]
    tensors = f"{len(missing)} parameter(s) missing, {len(reshaped)} of another shape"
    if differences:
        reason = f"was trained with {'; '.join(differences)} ({tensors})"
    else:
        reason = f"does not fit the model ({tensors}, e.g. {(missing + reshaped)[0]})"
    raise CheckpointMismatchError(
        f"checkpoint {path} {reason}: resume with the checkpoint's settings, or start a new experiment directory"
    )


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
        return read_checkpoint(path, map_location=map_location)


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
