"""`jointssl export`: turn a pretraining checkpoint into plain weight files that downstream code can use.

The export folder holds:

- ``encoders.safetensors``: f_intra (``encoder.*``) and f_inter (``aggregator.*``) exactly as in the checkpoint,
  read back by :func:`jointssl.downstream.load_pretrained` (with ``config.json``).
- ``backbone.safetensors``: the timm CNN inside f_intra alone, under timm's own parameter names, so that it loads
  without jointssl::

      timm.create_model(backbone, pretrained=True, in_chans=1, num_classes=0,
                        pretrained_cfg_overlay=dict(file=".../backbone.safetensors", num_classes=0))

  (``num_classes=0`` in the overlay keeps timm's load strict; a differing count would make timm drop the classifier
  and load non-strictly.) timm reads a ``file`` override from disk and never touches the network for it.
  ``config.json`` repeats these arguments under ``"timm"``, with the input normalisation the encoder was trained
  with. The multi-scale projection of f_intra (``proj``) is not part of this file: it is not a timm layer.
- ``config.json``: ``{"format": "jointssl-encoders", "version": 1, "architecture": {...}, ...}``.

The checkpoint is read tensors-only (``load_pretrained``); every file is written to a temporary name and renamed,
so that an interrupted export never leaves a truncated file under a final name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import save_file
from torch import Tensor

from jointssl.checkpointing import write_atomic, write_json
from jointssl.data.intensity import NORMALIZE_MEAN, NORMALIZE_STD
from jointssl.errors import UserError
from jointssl.downstream.pretrained import (
    BACKBONE_WEIGHTS,
    EXPORT_CONFIG,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    EXPORT_WEIGHTS,
    PretrainedWeights,
    load_pretrained,
)
from jointssl.models import VolumeEncoder

log = logging.getLogger("jointssl.downstream")

EXPORT_FILES = (EXPORT_WEIGHTS, BACKBONE_WEIGHTS, EXPORT_CONFIG)
#: Prefix of the timm feature extractor inside SliceEncoder's state dict.
BACKBONE_PREFIX = "backbone."


class ExportError(UserError, RuntimeError):
    """The checkpoint cannot be exported (tensors that do not fit the architecture, an existing export, ...)."""


@dataclass(frozen=True)
class ExportedFiles:
    """Paths of one export."""

    folder: Path
    encoders: Path
    backbone: Path
    config: Path


def export_pretrained(checkpoint: str | Path, output: str | Path, overwrite: bool = False) -> ExportedFiles:
    """Export the encoders of a pretraining checkpoint (or of an earlier export) into the folder ``output``.

    Raises :class:`~jointssl.downstream.pretrained.PretrainedLoadError` for a missing, unsafe or wrong-kind input,
    and :class:`ExportError` when its tensors do not fit the architecture it declares or when ``output`` already
    holds an export and ``overwrite`` is false.
    """
    folder = Path(output)
    # Checked before anything is read or written: nothing is half-written when the output cannot be used.
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"output {folder} is a file, not a folder: give a new or existing folder to export into")
    existing = [name for name in EXPORT_FILES if (folder / name).exists()]
    if existing and not overwrite:
        raise ExportError(f"{folder} already holds {existing}; pass overwrite=True (--overwrite) to replace them")
    weights = load_pretrained(checkpoint)
    _check_complete(weights)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"cannot create the output folder {folder}: {error.strerror or error}") from error

    backbone_name = weights.architecture["backbone"]
    feature_state = {
        key[len(BACKBONE_PREFIX):]: value for key, value in weights.encoder.items() if key.startswith(BACKBONE_PREFIX)
    }
    key_map, timm_only_keys = timm_key_map(backbone_name, feature_state)
    backbone_state = {key_map[key]: value for key, value in feature_state.items()}
    encoders_state = {f"encoder.{k}": v for k, v in weights.encoder.items()}
    encoders_state.update({f"aggregator.{k}": v for k, v in weights.aggregator.items()})
    config = export_config(weights, timm_only_keys, source=Path(checkpoint).name)

    files = ExportedFiles(folder, folder / EXPORT_WEIGHTS, folder / BACKBONE_WEIGHTS, folder / EXPORT_CONFIG)
    # config.json last: a folder whose config is present has its weights complete.
    write_atomic(files.encoders, lambda path: _save_tensors(encoders_state, path))
    write_atomic(files.backbone, lambda path: _save_tensors(backbone_state, path))
    write_json(files.config, config)
    log.info(
        "exported %s -> %s: %d encoder, %d aggregator, %d timm backbone tensors",
        checkpoint, folder, len(weights.encoder), len(weights.aggregator), len(backbone_state),
    )
    if timm_only_keys:
        log.warning(
            "%s: the timm model has layers f_intra does not use (untrained, absent from %s): %s; load it with "
            "pretrained_strict=False",
            backbone_name, BACKBONE_WEIGHTS, timm_only_keys,
        )
    return files


def export_config(weights: PretrainedWeights, timm_only_keys: list[str], source: str) -> dict[str, Any]:
    """The ``config.json`` of an export: format, architecture, and how to load the backbone with timm alone."""
    backbone_name = weights.architecture["backbone"]
    # timm's default spatial size for this model; only the channel count differs from its standard config.
    default_cfg = timm.models.get_pretrained_cfg(backbone_name)
    spatial = list(default_cfg.input_size[1:]) if default_cfg is not None else [224, 224]
    overlay = {
        "num_classes": 0,
        "input_size": [1, *spatial],
        # The encoder saw grayscale in [0, 1] normalised as (x - mean) / std; timm's data config should say so.
        "mean": [NORMALIZE_MEAN],
        "std": [NORMALIZE_STD],
    }
    create_kwargs: dict[str, Any] = {"in_chans": 1, "num_classes": 0}
    if timm_only_keys:
        create_kwargs["pretrained_strict"] = False
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "architecture": weights.architecture,
        "source_checkpoint": source,
        "files": {"encoders": EXPORT_WEIGHTS, "backbone": BACKBONE_WEIGHTS},
        "timm": {
            "model_name": backbone_name,
            "create_model_kwargs": create_kwargs,
            "pretrained_cfg_overlay": overlay,
            "keys_not_exported": timm_only_keys,
        },
        "input": {
            "channels": 1,
            "intensity": "grayscale scaled to [0, 1], then (x - mean) / std",
            "mean": NORMALIZE_MEAN,
            "std": NORMALIZE_STD,
        },
    }


def timm_backbone_kwargs(folder: str | Path) -> dict[str, Any]:
    """Keyword arguments of ``timm.create_model`` that load an export's ``backbone.safetensors`` (offline)."""
    folder = Path(folder)
    config = json.loads((folder / EXPORT_CONFIG).read_text())
    timm_config = config["timm"]
    overlay = dict(timm_config["pretrained_cfg_overlay"], file=str(folder / BACKBONE_WEIGHTS))
    return {
        "model_name": timm_config["model_name"],
        "pretrained": True,
        **timm_config["create_model_kwargs"],
        "pretrained_cfg_overlay": overlay,
    }


def timm_key_map(backbone: str, feature_state: dict[str, Tensor]) -> tuple[dict[str, str], list[str]]:
    """Map the parameter names of timm's ``features_only`` wrapper (as held by SliceEncoder) to those of the plain
    timm model ``create_model(backbone, in_chans=1, num_classes=0)``.

    The wrappers rename in two ways: ``FeatureListNet`` flattens sequential stages (``blocks.0`` -> ``blocks_0``)
    and ``FeatureGetterNet`` nests the model under ``model.``. A name is therefore matched exactly, else without
    the ``model.`` prefix, else on a canonical form where ``_`` and ``.`` are the same; every match must be unique
    and of the same shape. Returns the map and the plain model's keys no wrapper key maps to (layers after the last
    feature stage, e.g. an EfficientNet's ``conv_head``).
    """
    plain = timm.create_model(backbone, pretrained=False, in_chans=1, num_classes=0)
    plain_state = plain.state_dict()
    by_canonical: dict[str, list[str]] = {}
    for key in plain_state:
        by_canonical.setdefault(_canonical(key), []).append(key)
    key_map: dict[str, str] = {}
    problems: list[str] = []
    for key, value in feature_state.items():
        target = _match_key(key, plain_state, by_canonical)
        if target is None:
            problems.append(f"{key}: no unique counterpart in timm's {backbone}")
        elif tuple(plain_state[target].shape) != tuple(value.shape):
            problems.append(f"{key} -> {target}: shape {tuple(value.shape)} != {tuple(plain_state[target].shape)}")
        else:
            key_map[key] = target
    targets = list(key_map.values())
    if len(set(targets)) != len(targets):
        problems.append("several feature-extractor tensors map to the same timm tensor")
    if problems:
        raise ExportError(f"cannot express the f_intra backbone in timm's {backbone} names: " + "; ".join(problems))
    return key_map, sorted(set(plain_state) - set(targets))


def _canonical(key: str) -> str:
    return key.replace("_", ".")


def _match_key(key: str, plain_state: dict[str, Tensor], by_canonical: dict[str, list[str]]) -> str | None:
    candidates = [key, key[len("model."):]] if key.startswith("model.") else [key]
    for candidate in candidates:
        if candidate in plain_state:
            return candidate
    for candidate in candidates:
        matches = by_canonical.get(_canonical(candidate), [])
        if len(matches) == 1:
            return matches[0]
    return None


def _check_complete(weights: PretrainedWeights) -> None:
    """An export must hold every tensor of f_intra and f_inter: fail now rather than at downstream load time."""
    architecture = weights.architecture
    model = VolumeEncoder.build(
        architecture["backbone"], architecture["d_model"], weights.aggregator_config() if weights.aggregator else None
    )
    _check_state(model.encoder.state_dict().keys(), weights.encoder, f"{weights.source}: f_intra")
    if model.aggregator is not None:
        _check_state(model.aggregator.state_dict().keys(), weights.aggregator, f"{weights.source}: f_inter")


def _check_state(expected: Iterable[str], state: dict[str, Tensor], what: str) -> None:
    expected = set(expected)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ExportError(f"{what} does not match its declared architecture: missing {missing}, unexpected {unexpected}")


def _save_tensors(state: dict[str, Tensor], path: Path) -> None:
    # safetensors refuses views and shared storage: store a contiguous copy of each tensor.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path), metadata={"format": "pt"})
