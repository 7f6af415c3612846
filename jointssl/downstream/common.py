"""Pieces every downstream task module shares: building the pretrained encoders, self-contained checkpoints,
frozen (linear-mode) parts, the AdamW + cosine optimiser, splits by volume, input normalisation, gathering
per-sample validation results across ranks (world geometry: :mod:`jointssl.data.geometry`)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from jointssl.distributed import all_gather_cat
from jointssl.downstream.pretrained import load_pretrained
from jointssl.models import SliceAggregator, SliceEncoder
from jointssl.optim import decay_groups, warmup_cosine_lambda

log = logging.getLogger("jointssl.downstream")

#: "finetune" trains everything; "linear" freezes the pretrained parts (eval mode) and trains the rest.
Mode = Literal["finetune", "linear"]


# ----------------------------------------------------------------------------------------------------
# Encoders and checkpoints


def check_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is "finetune" or "linear"."""
    if mode not in ("finetune", "linear"):
        raise ValueError(f"mode must be 'finetune' or 'linear', got {mode!r}")


def build_slice_encoders(
    pretrained: str | None,
    backbone: str,
    d_model: int,
    aggregator: Mapping[str, Any] | None,
    with_aggregator: bool,
) -> tuple[SliceEncoder, SliceAggregator | None, dict[str, Any]]:
    """f_intra (and f_inter when ``with_aggregator``) and the architecture they have.

    With ``pretrained`` (a pretraining checkpoint or an export folder) the architecture and weights come from the
    file and ``backbone``/``d_model``/``aggregator`` are ignored; without it they are built randomly initialised
    from those arguments (``aggregator``: SliceAggregator keyword arguments besides d_model; None = defaults).
    The architecture is ``{"backbone", "d_model", "aggregator"}``.
    """
    if pretrained is not None:
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
        return encoder, slice_aggregator, architecture
    aggregator_kwargs = dict(aggregator or {})
    encoder = SliceEncoder(backbone=backbone, d_model=d_model, in_chans=1)
    slice_aggregator = SliceAggregator(d_model=d_model, **aggregator_kwargs) if with_aggregator else None
    return encoder, slice_aggregator, {"backbone": backbone, "d_model": d_model, "aggregator": aggregator_kwargs}


def self_contained_hparams(hparams: Mapping[str, Any], architecture: Mapping[str, Any]) -> dict[str, Any]:
    """Hyper-parameters that rebuild a downstream model without the pretraining file.

    A downstream checkpoint holds every weight, so ``pretrained`` is cleared and the architecture that was built
    is written in its place (``load_from_checkpoint`` builds the same network randomly and loads the weights).
    Only the architecture entries that are hyper-parameters of the module are written (a module without a
    ``d_model`` argument gets none). The original path is kept under ``pretrained_source`` for the record (not an
    ``__init__`` argument: Lightning drops it on load).
    """
    updated = dict(hparams)
    updated["pretrained_source"] = hparams.get("pretrained_source", hparams.get("pretrained"))
    updated["pretrained"] = None
    updated.update({key: copy.deepcopy(value) for key, value in architecture.items() if key in hparams})
    return updated


def freeze(module: nn.Module) -> None:
    """No gradients and eval mode (no BatchNorm statistics updates, no dropout)."""
    module.requires_grad_(False)
    module.eval()


class FrozenPartsMixin:
    """For a LightningModule (listed before it in the bases): parts frozen with :meth:`freeze_parts` stay in eval
    mode when Lightning switches the module to train mode, so their BatchNorm statistics never drift."""

    frozen_parts: list[nn.Module]

    def freeze_parts(self, parts: Iterable[nn.Module]) -> None:
        """Freeze ``parts`` (see :func:`freeze`) and keep them in eval mode from now on."""
        self.frozen_parts = list(parts)
        for part in self.frozen_parts:
            freeze(part)

    def train(self, mode: bool = True):  # noqa: ANN201 - returns self, the concrete module type
        super().train(mode)  # type: ignore[misc]
        for part in getattr(self, "frozen_parts", ()):
            part.eval()
        return self


# ----------------------------------------------------------------------------------------------------
# Optimisation


def adamw_with_cosine(
    model: nn.Module,
    pretrained_parts: Sequence[nn.Module],
    lr: float,
    pretrained_lr_scale: float,
    weight_decay: float,
    total_steps: int,
) -> dict[str, Any]:
    """AdamW (no weight decay on biases and normalisation weights: `decay_groups`) with a per-step cosine decay to zero.

    Parameters of ``pretrained_parts`` train at ``lr * pretrained_lr_scale`` (fine-tuning often wants them to
    move less than the freshly initialised head); parameters that do not require gradients are left out.
    """
    pretrained_ids = {id(p) for part in pretrained_parts for p in part.parameters()}
    param_groups = []
    for is_pretrained in (False, True):
        part = [p for p in model.parameters() if (id(p) in pretrained_ids) == is_pretrained]
        decayed, not_decayed = decay_groups(part, weight_decay)
        for group in (not_decayed, decayed):
            if group["params"]:
                param_groups.append({**group, "lr": lr * (pretrained_lr_scale if is_pretrained else 1.0)})
    optimizer = torch.optim.AdamW(param_groups, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(0, max(1, total_steps)))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# ----------------------------------------------------------------------------------------------------
# Data


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


def gather_rows_once(local_rows: Tensor) -> Tensor:
    """Every rank's result rows, each sample once (identity in a single process).

    The first column of a row is the sample's dataset index: distributed samplers repeat samples to even out the
    shards, and only the first row of each index is kept (sorted by index). Every rank gets the same rows.
    """
    rows = all_gather_cat(local_rows)
    _, first = np.unique(rows[:, 0].cpu().numpy(), return_index=True)
    return rows[torch.as_tensor(first, device=rows.device)]

