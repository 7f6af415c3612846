"""What a training step waits for, counted: host synchronisations and torch.distributed collectives per step.

On a GPU each host synchronisation (the host reading a device value: ``.item()``, ``.tolist()``, ``.numpy()``, a
tensor's truth value, ``int()`` / ``float()`` of a tensor) stalls the queue of launched kernels, and each
collective is a round trip between the processes. :class:`StepSyncCounter` counts both for every training step,
from one ``on_train_batch_start`` to the next (so the logging after a step is that step's), and names the line of
code each comes from. Tests assert the counts (tests/test_step_syncs.py); benchmarks print them.

The counting patches ``torch.Tensor``'s reading methods and ``torch.distributed``'s collectives while a fit runs
(removed at its end); it is a measuring tool, not for production runs. A CPU tensor cannot be told from a device
one by its type in a CPU-only test, so reads made by the data pipeline (``torch.utils.data``, ``jointssl/data``,
the augmentation libraries: host work on host tensors, in loader workers on a real run) are not counted; on a
CUDA device only reads of non-CPU tensors are counted.
"""

from __future__ import annotations

import collections
import json
import threading
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

from jointssl.checkpointing import write_json

#: Tensor methods that read a value to the host.
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__")
#: torch.distributed calls counted as collectives (a call made inside another, e.g. all_gather_object's
#: all_gather, counts once, as the outer one).
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
    "barrier", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "all_gather_object",
    "gather_object", "broadcast_object_list",
)
#: Where host work on host tensors happens: the data pipeline (see the module docstring).
DATA_PIPELINE = ("torch/utils/data/", "jointssl/data/", "torchvision/", "monai/transforms/", "monai/data/")


class StepSyncCounter(Callback):
    """Counts host synchronisations and collectives per training step (module docstring).

    After the fit, ``steps[global_step]`` is a Counter of ``(kind, where)``: ``kind`` is ``"host"`` or
    ``"collective"``, ``where`` is ``"path:line name"`` of the calling line (the package path from ``jointssl/``,
    ``lightning/``, ...). With ``output`` the counts are written there as JSON by every rank (``{rank}`` in the
    name is replaced by the global rank), for runs in other processes.

    Args:
        output: JSON file of the counts (``{"<step>": {"<kind> <where>": count}}``); None: keep them in memory.
    """

    def __init__(self, output: str | None = None) -> None:
        self.output = output
        self.steps: dict[int, collections.Counter] = {}
        self._step: int | None = None
        self._originals: list[tuple[Any, str, Any]] = []
        self._inside = threading.local()  # depth of counted calls in this thread (nested ones are not counted)

    # ------------------------------------------------------------------ counting
    def _record(self, kind: str, name: str) -> None:
        if self._step is None or threading.current_thread() is not threading.main_thread():
            return
        frames = [frame for frame in traceback.extract_stack() if "torch/distributed/" not in frame.filename
                  and not frame.filename.endswith("instrumentation.py")]
        if any(marker in frame.filename for frame in frames for marker in DATA_PIPELINE):
            return
        caller = frames[-1]
        where = f"{_short_path(caller.filename)}:{caller.lineno} {name}"
        self.steps.setdefault(self._step, collections.Counter())[(kind, where)] += 1

    def _wrap(self, owner: Any, name: str, kind: str) -> None:
        original = getattr(owner, name)
        counter = self

        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(counter._inside, "depth", 0)
            if depth == 0 and (kind == "collective" or _on_device_or_cpu_only(args[0])):
                counter._record(kind, name)
            counter._inside.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._inside.depth = depth

        self._originals.append((owner, name, original))
        setattr(owner, name, counted)

    def _install(self) -> None:
        if self._originals:
            return
        for name in HOST_READS:
            self._wrap(torch.Tensor, name, "host")
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._wrap(dist, name, "collective")

    def _uninstall(self) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)
        self._originals = []

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._uninstall()
        if self.output is not None:
            write_json(self.output.replace("{rank}", str(trainer.global_rank)),
                       {str(step): {f"{kind} {where}": n for (kind, where), n in counts.items()}
                        for step, counts in self.steps.items()}, indent=1)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._uninstall()


def read_counts(path: str | Path) -> dict[int, collections.Counter]:
    """A :class:`StepSyncCounter` JSON file back as ``{step: Counter({(kind, where): n})}``."""
    raw = json.loads(Path(path).read_text())
    return {int(step): collections.Counter({tuple(key.split(" ", 1)): n for key, n in counts.items()})
            for step, counts in raw.items()}


def _on_device_or_cpu_only(tensor: Any) -> bool:
    """Count a read of a non-CPU tensor; with no accelerator in use, every read (see the module docstring)."""
    if not isinstance(tensor, torch.Tensor):
        return False
    return tensor.device.type != "cpu" or not torch.cuda.is_initialized()


def _short_path(filename: str) -> str:
    for marker in ("jointssl/", "lightning/", "torch/", "tests/", "benchmarks/"):
        if marker in filename:
            return marker + filename.split(marker, 1)[1]
    return filename
