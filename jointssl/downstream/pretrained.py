"""Loading pretrained encoders for downstream tasks, from a jointssl pretraining checkpoint (`.ckpt`) or from
exported weights (a folder written by `jointssl export`: `encoders.safetensors` + `config.json`).

Only tensors are ever read: checkpoints with `torch.load(weights_only=True)`, exports with safetensors. A file
that would need arbitrary unpickling is refused.

What `pretrained` names is what is loaded, or it is refused (PretrainedLoadError, a user error naming the file and
why): a folder is an export folder (its `encoders.safetensors` + `config.json`); a `.safetensors` file is loaded
itself, with the `config.json` beside it for the architecture (so `exp/my_finetuned.safetensors` loads that file,
not `exp/encoders.safetensors`); `backbone.safetensors` (timm's names, no projection) and `config.json` alone are
refused; anything else is read as a pretraining checkpoint. Every tensor of the model must come from the file:
a file whose tensor names or shapes do not fit the architecture it declares is refused rather than half loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from jointssl.checkpointing import CheckpointNotFoundError, CheckpointReadError, read_checkpoint
from jointssl.errors import UserError
from jointssl.models import AggregatorConfig, SliceAggregator, SliceEncoder, VolumeEncoder

log = logging.getLogger("jointssl.downstream")

EXPORT_FORMAT = "jointssl-encoders"
EXPORT_VERSION = 1
EXPORT_WEIGHTS = "encoders.safetensors"
EXPORT_CONFIG = "config.json"
#: The timm backbone alone, under timm's names (jointssl.downstream.export): not loadable as f_intra.
BACKBONE_WEIGHTS = "backbone.safetensors"
#: Architecture keys of the pretraining hyper-parameters that define f_intra (f_inter's: AggregatorConfig).
ENCODER_KEYS = ("backbone", "d_model")


class PretrainedLoadError(UserError, ValueError):
    """A pretrained file that is missing, of the wrong kind, or unsafe to load."""


@dataclass
class PretrainedWeights:
    """Architecture + tensors of f_intra (`encoder.*`) and f_inter (`aggregator.*`). ``architecture``:
    ``backbone``, ``d_model`` and ``aggregator`` (``AggregatorConfig.asdict()``)."""

    architecture: dict[str, Any]
    encoder: dict[str, Tensor]
    aggregator: dict[str, Tensor] = field(default_factory=dict)
    source: str = ""

    def slice_encoder(self) -> SliceEncoder:
        model = SliceEncoder(backbone=self.architecture["backbone"], d_model=self.architecture["d_model"], in_chans=1)
        load_reported(model, self.encoder, f"f_intra from {self.source}")
        return model

    def slice_aggregator(self) -> SliceAggregator:
        if not self.aggregator:
            raise PretrainedLoadError(f"{self.source}: holds no slice aggregator (f_inter) weights")
        model = self.aggregator_config().build(self.architecture["d_model"])
        load_reported(model, self.aggregator, f"f_inter from {self.source}")
        return model

    def aggregator_config(self) -> AggregatorConfig:
        return AggregatorConfig.from_dict(self.architecture["aggregator"])

    def volume_encoder(self, with_aggregator: bool = True) -> VolumeEncoder:
        """f_intra (and f_inter when ``with_aggregator``) with these weights, composed as in pretraining."""
        return VolumeEncoder(self.slice_encoder(), self.slice_aggregator() if with_aggregator else None)


def load_reported(model: torch.nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Load `state` into `model`, log missing and unexpected keys, and refuse a load that matched nothing."""
    expected = model.state_dict()
    matching = [key for key in state if key in expected]
    if not matching:
        raise PretrainedLoadError(f"{what}: no tensor matches the model (wrong checkpoint for this architecture?)")
    # A file that fits only in part would leave some layers at their random initialisation, silently.
    missing = [key for key in expected if key not in state]
    reshaped = [key for key in matching if tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or reshaped:
        examples = ", ".join((missing + reshaped)[:3])
        raise PretrainedLoadError(
            f"{what}: the file does not fit the architecture it declares: {len(missing)} of the model's "
            f"{len(expected)} tensors missing, {len(reshaped)} of another shape (e.g. {examples})"
        )
    result = model.load_state_dict(state, strict=False)
    log.info(
        "%s: %d tensors loaded; unexpected %s", what, len(matching), result.unexpected_keys or "none",
    )


def _split(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    aggregator = {k[len("aggregator."):]: v for k, v in state.items() if k.startswith("aggregator.")}
    return encoder, aggregator


def load_pretrained(path: str | Path) -> PretrainedWeights:
    """Read a pretraining checkpoint, an export folder or a ``.safetensors`` file of one (module docstring).
    Raises PretrainedLoadError for anything else."""
    path = Path(path)
    if not path.exists():
        raise PretrainedLoadError(f"{path}: pretrained weights not found")
    if path.is_dir():
        return _load_export(path / EXPORT_WEIGHTS, source=path)
    if path.name == BACKBONE_WEIGHTS:
        raise PretrainedLoadError(
            f"{path}: holds the timm backbone alone (timm's names, without f_intra's projection and f_inter), for "
            f"timm; give the export folder {path.parent} or its {EXPORT_WEIGHTS}"
        )
    if path.suffix == ".safetensors":
        return _load_export(path, source=path)
    if path.suffix == ".json":
        raise PretrainedLoadError(f"{path}: a config holds no weights; give the export folder {path.parent}")
    try:
        checkpoint = read_checkpoint(path)
    except (CheckpointReadError, CheckpointNotFoundError) as error:
        raise PretrainedLoadError(f"refused to load pretrained weights: {error}") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "jointssl_format_version" not in checkpoint:
        raise PretrainedLoadError(f"{path}: not a jointssl pretraining checkpoint (no state_dict / format version)")
    hparams = checkpoint.get("hyper_parameters", {})
    missing = [k for k in ENCODER_KEYS if k not in hparams]
    try:
        aggregator_config = AggregatorConfig.from_pretrain_hparams(hparams)
    except KeyError as error:
        missing.extend(error.args[0])
    if missing:
        raise PretrainedLoadError(f"{path}: checkpoint hyper-parameters lack {missing}: not a JointSSL checkpoint")
    encoder, aggregator = _split(checkpoint["state_dict"])
    if not encoder:
        raise PretrainedLoadError(f"{path}: checkpoint holds no encoder.* tensors")
    architecture = {k: hparams[k] for k in ENCODER_KEYS}
    architecture["aggregator"] = aggregator_config.asdict()
    return PretrainedWeights(architecture, encoder, aggregator, source=str(path))


def _load_export(weights_path: Path, source: Path) -> PretrainedWeights:
    """The tensors of ``weights_path`` with the architecture of the ``config.json`` beside it; ``source`` (the
    folder, or the file the user named) is what messages and records call it."""
    folder = weights_path.parent
    config_path = folder / EXPORT_CONFIG
    if not config_path.exists() or not weights_path.exists():
        raise PretrainedLoadError(
            f"{source}: an export needs {EXPORT_CONFIG} beside its weights ({weights_path.name}); "
            f"`jointssl export` writes both"
        )
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PretrainedLoadError(
            f"{config_path}: not a readable export config (truncated or corrupt: {error}); export again"
        ) from error
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT or config.get("version") != EXPORT_VERSION:
        found = config if not isinstance(config, dict) else config.get("format")
        version = config.get("version") if isinstance(config, dict) else None
        raise PretrainedLoadError(
            f"{config_path}: format {found!r} v{version!r}, expected {EXPORT_FORMAT!r} v{EXPORT_VERSION}"
        )
    architecture = config.get("architecture")
    if not isinstance(architecture, dict) or any(key not in architecture for key in ENCODER_KEYS):
        raise PretrainedLoadError(f"{config_path}: no architecture ({', '.join(ENCODER_KEYS)}); export again")
    try:
        tensors = load_file(str(weights_path))
    except Exception as error:  # noqa: BLE001 - safetensors reports bad bytes as SafetensorError, OSError, ...
        raise PretrainedLoadError(
            f"{weights_path}: not a readable safetensors file (truncated or corrupt: {str(error)[:200]}); export "
            "again"
        ) from error
    encoder, aggregator = _split(tensors)
    if not encoder:
        names = ", ".join(sorted(tensors)[:3]) or "none"
        raise PretrainedLoadError(
            f"{weights_path}: holds no encoder.* tensors (tensor names: {names}): not jointssl encoder weights"
        )
    architecture = dict(architecture)
    # An export written before a setting existed was made with the value that setting's absence implies.
    architecture["aggregator"] = AggregatorConfig.from_dict(architecture.get("aggregator", {})).asdict()
    return PretrainedWeights(architecture, encoder, aggregator, source=str(source))
