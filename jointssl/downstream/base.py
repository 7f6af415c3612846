"""The base of every downstream task module (:class:`DownstreamTask`) and the data helpers the tasks share.

A task module subclasses :class:`DownstreamTask` and adds only its network, loss, metrics and data. The base does
the rest of what every task does the same way:

- builds the pretrained parts, f_intra (and f_inter when the task uses it), from a pretraining checkpoint or an
  export folder (:func:`jointssl.downstream.pretrained.load_pretrained`), or randomly initialised with the same
  architecture (:meth:`DownstreamTask.build_pretrained`);
- writes self-contained hyper-parameters: ``pretrained=None`` and the architecture that was built, so that a
  downstream checkpoint reloads without the pretraining file (:func:`self_contained_hparams`);
- in ``mode="linear"`` freezes the pretrained parts and keeps them in eval mode, so their BatchNorm statistics
  never drift (:meth:`DownstreamTask.freeze_pretrained`, :meth:`DownstreamTask.train`);
- one optimiser and schedule, AdamW (no decay on biases and norm weights) with a per-step linear warm-up over
  ``warmup_epochs`` then cosine decay to ``min_lr_ratio * lr``; the pretrained parts train at
  ``lr * pretrained_lr_scale`` (:meth:`DownstreamTask.configure_optimizers`). Each task sets its own defaults
  through its constructor's defaults;
- evaluation gathered under DDP: per-sample result rows from every rank, each sample once
  (:func:`gather_rows_once`), so metrics and pictures are those of the whole validation set;
- checkpoints of an earlier module layout still load: a task lists where its tensors moved
  (:attr:`DownstreamTask.moved_state_prefixes`) and :meth:`DownstreamTask.on_load_checkpoint` renames them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule
from matplotlib.figure import Figure
from torch import Tensor, nn

from jointssl.callbacks.figures import save_figure
from jointssl.distributed import all_gather_cat
from jointssl.downstream.pretrained import load_pretrained
from jointssl.models import AggregatorConfig, SliceAggregator, SliceEncoder
from jointssl.optim import decay_groups, warmup_cosine_scheduler

log = logging.getLogger("jointssl.downstream")

#: "finetune" trains everything; "linear" freezes the pretrained parts (eval mode) and trains the rest.
Mode = Literal["finetune", "linear"]


def check_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is "finetune" or "linear"."""
    if mode not in ("finetune", "linear"):
        raise ValueError(f"mode must be 'finetune' or 'linear', got {mode!r}")


def check_on_bad_file(on_bad_file: str) -> None:
    """Raise ValueError unless ``on_bad_file`` is "error" or "skip": a data module checks it when it is built, so
    that a mistyped policy fails before the (possibly long) file checks that apply it."""
    if on_bad_file not in ("error", "skip"):
        raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")


def self_contained_hparams(hparams: Mapping[str, Any], architecture: Mapping[str, Any]) -> dict[str, Any]:
    """Hyper-parameters that rebuild a downstream model without the pretraining file.

    A downstream checkpoint holds every weight, so ``pretrained`` is cleared and the architecture that was built
    is written in its place (``load_from_checkpoint`` builds the same network randomly and loads the weights).
    Only the architecture entries that are hyper-parameters of the module are written (a module without a
    ``d_model`` argument gets none). Every key stays an ``__init__`` argument: `jointssl predict --ckpt_path`
    builds the module from the checkpoint's hyper-parameters (the path of the pretraining file is kept in the
    checkpoint as ``pretrained_source`` instead, see :meth:`DownstreamTask.on_save_checkpoint`).
    """
    updated = dict(hparams)
    updated["pretrained"] = None
    updated.update({key: copy.deepcopy(value) for key, value in architecture.items() if key in hparams})
    return updated


def rename_moved_keys(state_dict: Mapping[str, Tensor], moved: Mapping[str, str]) -> dict[str, Tensor]:
    """``state_dict`` with every key that starts with an old prefix of ``moved`` (old -> new) under the new one."""
    renamed = {}
    for key, value in state_dict.items():
        old = next((prefix for prefix in moved if key.startswith(prefix)), None)
        renamed[moved[old] + key[len(old):] if old is not None else key] = value
    return renamed


def freeze(module: nn.Module) -> None:
    """No gradients and eval mode (no BatchNorm statistics updates, no dropout)."""
    module.requires_grad_(False)
    module.eval()


def gather_rows_once(local_rows: Tensor) -> Tensor:
    """Every rank's result rows, each sample once (identity in a single process).

    The first column of a row is the sample's dataset index: distributed samplers repeat samples to even out the
    shards, and only the first row of each index is kept (sorted by index). Every rank gets the same rows.
    """
    rows = all_gather_cat(local_rows)
    _, first = np.unique(rows[:, 0].cpu().numpy(), return_index=True)
    return rows[torch.as_tensor(first, device=rows.device)]


class DownstreamTask(LightningModule):
    """A downstream task on the pretrained encoders (see the module docstring for what the base does).

    A subclass's ``__init__`` takes (at least) ``mode``, ``lr``, ``weight_decay``, ``pretrained_lr_scale``,
    ``warmup_epochs`` and ``min_lr_ratio`` with its own defaults, calls ``self.save_hyperparameters()``, builds its
    pretrained parts with :meth:`build_pretrained`, its own layers, then :meth:`freeze_pretrained`; and lists its
    pretrained parts in :attr:`pretrained_parts`. Validation rows go through :meth:`record_rows` and come back
    gathered from every rank with :meth:`gathered_rows`.
    """

    #: State-dict key prefixes of checkpoints written before the task's layout changed -> where those tensors are
    #: now (old -> new), so that such checkpoints still load (:meth:`on_load_checkpoint`).
    moved_state_prefixes: Mapping[str, str] = {}

    def __init__(self) -> None:
        super().__init__()
        self.frozen_parts: list[nn.Module] = []
        self._rows: list[Tensor] = []
        #: The pretraining checkpoint or export the pretrained parts came from (None: random initialisation).
        self.pretrained_source: str | None = None

    # ------------------------------------------------------------------ the pretrained parts
    def build_pretrained(
        self,
        pretrained: str | None,
        backbone: str,
        d_model: int | None,
        aggregator: AggregatorConfig | Mapping[str, Any] | None = None,
        with_aggregator: bool = False,
    ) -> tuple[SliceEncoder, SliceAggregator | None]:
        """f_intra (and f_inter when ``with_aggregator``), and the self-contained hyper-parameters.

        With ``pretrained`` (a pretraining checkpoint or an export folder) the architecture and weights come from
        the file and ``backbone``/``d_model``/``aggregator`` are ignored; without it they are built randomly
        initialised from those arguments (``aggregator``: SliceAggregator keyword arguments besides d_model;
        None = SliceAggregator's defaults; ``d_model`` None only for a task that uses f_intra's backbone alone and
        always with ``pretrained``).
        """
        if pretrained is not None:
            self.pretrained_source = str(pretrained)
            weights = load_pretrained(pretrained)
            if (backbone, d_model) != (weights.architecture["backbone"], weights.architecture["d_model"]):
                log.info(
                    "architecture from %s: backbone %s, d_model %d (the backbone/d_model arguments are not used)",
                    pretrained, weights.architecture["backbone"], weights.architecture["d_model"],
                )
            encoder = weights.slice_encoder()
            slice_aggregator = weights.slice_aggregator() if with_aggregator else None
            architecture = {
                "backbone": weights.architecture["backbone"],
                "d_model": weights.architecture["d_model"],
                "aggregator": dict(weights.architecture["aggregator"]),
            }
        else:
            # A key left out of a dict has SliceAggregator's default, as it always had for downstream tasks
            # (AggregatorConfig.from_dict's older defaults are those of pretraining checkpoints and exports).
            config = aggregator if isinstance(aggregator, AggregatorConfig) else AggregatorConfig(**(aggregator or {}))
            encoder = SliceEncoder(backbone=backbone, d_model=d_model, in_chans=1)
            slice_aggregator = config.build(d_model) if with_aggregator else None
            architecture = {"backbone": backbone, "d_model": d_model, "aggregator": config.asdict()}
        if slice_aggregator is not None:
            # Only masked pretraining uses the mask token; DDP must not wait for its gradient.
            slice_aggregator.mask_token.requires_grad_(False)
        # Record the architecture actually built, so that `load_from_checkpoint(path)` rebuilds it.
        self.hparams.update(self_contained_hparams(self.hparams, architecture))
        return encoder, slice_aggregator

    @property
    def pretrained_parts(self) -> list[nn.Module]:
        """The modules that came from pretraining (frozen in linear mode, ``pretrained_lr_scale`` otherwise)."""
        raise NotImplementedError(f"{type(self).__name__} must list its pretrained parts")

    @property
    def frozen(self) -> bool:
        """True in linear mode: the pretrained parts run without a graph."""
        return self.hparams.mode == "linear"

    def freeze_pretrained(self) -> None:
        """In linear mode: no gradients for the pretrained parts, and eval mode from now on (see :meth:`train`)."""
        if not self.frozen:
            return
        self.frozen_parts = list(self.pretrained_parts)
        for part in self.frozen_parts:
            freeze(part)

    def train(self, mode: bool = True):  # noqa: ANN201 - returns self, the concrete module type
        super().train(mode)
        for part in getattr(self, "frozen_parts", ()):
            part.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The record of where the pretrained parts came from (the hyper-parameters say ``pretrained: null``)."""
        checkpoint["pretrained_source"] = self.pretrained_source

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Renames the tensors of an earlier layout (:attr:`moved_state_prefixes`; Lightning loads the state dict
        after this hook, both in ``load_from_checkpoint`` and when a Trainer resumes) and restores
        ``pretrained_source`` (a hyper-parameter in checkpoints of that layout)."""
        old_hparams = checkpoint.get("hyper_parameters", {})
        self.pretrained_source = checkpoint.get("pretrained_source",
                                                old_hparams.get("pretrained_source", self.pretrained_source))
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = rename_moved_keys(checkpoint["state_dict"], self.moved_state_prefixes)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the trainable parameters (pretrained parts at ``lr * pretrained_lr_scale``), warm-up then
        cosine per step over the trainer's optimizer steps (:func:`jointssl.optim.warmup_cosine_scheduler`)."""
        hp = self.hparams
        pretrained_ids = {id(p) for part in self.pretrained_parts for p in part.parameters()}
        param_groups = []
        for is_pretrained in (False, True):
            part = [p for p in self.parameters() if (id(p) in pretrained_ids) == is_pretrained]
            scale = hp.pretrained_lr_scale if is_pretrained else 1.0
            param_groups.extend(
                {**group, "lr": hp.lr * scale} for group in decay_groups(part, hp.weight_decay) if group["params"]
            )
        optimizer = torch.optim.AdamW(param_groups, lr=hp.lr)
        scheduler = warmup_cosine_scheduler(optimizer, self.trainer, hp.warmup_epochs, hp.min_lr_ratio)
        log.info("%s: AdamW lr %.4g (pretrained parts x%.3g), weight decay %.3g, %d warm-up of %d steps",
                 hp.mode, hp.lr, hp.pretrained_lr_scale, hp.weight_decay,
                 scheduler.lr_lambdas[0].warmup_steps, scheduler.lr_lambdas[0].total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ gathered evaluation
    def record_rows(self, rows: Tensor) -> None:
        """Keep this rank's result rows of an evaluation batch (first column: the sample's dataset index)."""
        self._rows.append(rows.detach())

    def gathered_rows(self, width: int) -> Tensor:
        """Every rank's recorded rows, each sample once, sorted by index (:func:`gather_rows_once`); the record
        is emptied. ``width``: columns of a row (an empty result still needs its shape for the collective)."""
        local = torch.cat(self._rows) if self._rows else torch.zeros(0, width, device=self.device)
        self._rows = []
        return gather_rows_once(local.float())

    def on_validation_epoch_start(self) -> None:
        self._rows = []

    def draw_figure(self, name: str, make_figure: Callable[[], Figure]) -> None:
        """Draw a picture of the gathered validation results and save it (:func:`save_figure`: W&B when a
        WandbLogger is attached, otherwise a PNG beside the checkpoints); on rank 0 only, not in the sanity check."""
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            save_figure(self.trainer, name, make_figure())

    def on_test_epoch_start(self) -> None:
        self._rows = []


def split_by_volume(items: Sequence[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A fixed random split of whole volumes (never slices of one volume on both sides), order kept.

    ``round(len(items) * val_fraction)`` items go to validation, but at least one item goes to each side when
    there are two or more and ``0 < val_fraction < 1``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    count = len(items)
    num_val = round(count * val_fraction)
    if val_fraction > 0 and count >= 2:
        num_val = min(max(num_val, 1), count - 1)
    chosen = set(np.random.default_rng(seed).permutation(count)[:num_val].tolist())
    train = [item for i, item in enumerate(items) if i not in chosen]
    val = [item for i, item in enumerate(items) if i in chosen]
    return train, val

