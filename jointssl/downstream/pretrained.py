"""Loading pretrained encoders for downstream tasks, from a jointssl pretraining checkpoint (`.ckpt`) or from
exported weights (a folder written by `jointssl export`: `encoders.safetensors` + `config.json`).

Only tensors are ever read: checkpoints with `torch.load(weights_only=True)`, exports with safetensors. A file
that would need arbitrary unpickling is refused.
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

from jointssl.models import AggregatorConfig, SliceAggregator, SliceEncoder, VolumeEncoder

log = logging.getLogger("jointssl.downstream")

EXPORT_FORMAT = "jointssl-encoders"
EXPORT_VERSION = 1
EXPORT_WEIGHTS = "encoders.safetensors"
EXPORT_CONFIG = "config.json"
#: Architecture keys of the pretraining hyper-parameters that define f_intra (f_inter's: AggregatorConfig).
ENCODER_KEYS = ("backbone", "d_model")


class PretrainedLoadError(ValueError):
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
    result = model.load_state_dict(state, strict=False)
    loaded = len(state) - len(result.unexpected_keys)
    log.info(
        "%s: %d tensors loaded; missing %s; unexpected %s",
        what, loaded, result.missing_keys or "none", result.unexpected_keys or "none",
    )
    if loaded == 0:
        raise PretrainedLoadError(f"{what}: no tensor matches the model (wrong checkpoint for this architecture?)")


def _split(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    aggregator = {k[len("aggregator."):]: v for k, v in state.items() if k.startswith("aggregator.")}
    return encoder, aggregator


def load_pretrained(path: str | Path) -> PretrainedWeights:
    """Read a pretraining checkpoint or an export folder/file. Raises PretrainedLoadError for anything else."""
    path = Path(path)
    if not path.exists():
        raise PretrainedLoadError(f"{path}: pretrained weights not found")
    if path.is_dir() or path.suffix == ".safetensors":
        return _load_export(path if path.is_dir() else path.parent)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PretrainedLoadError(
            f"{path}: refused to load: not a tensors-only checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:300]})"
        ) from error
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


def _load_export(folder: Path) -> PretrainedWeights:
    config_path, weights_path = folder / EXPORT_CONFIG, folder / EXPORT_WEIGHTS
    if not config_path.exists() or not weights_path.exists():
        raise PretrainedLoadError(f"{folder}: an export folder needs {EXPORT_CONFIG} and {EXPORT_WEIGHTS}")
    config = json.loads(config_path.read_text())
    if config.get("format") != EXPORT_FORMAT or config.get("version") != EXPORT_VERSION:
        raise PretrainedLoadError(
            f"{config_path}: format {config.get('format')!r} v{config.get('version')!r}, expected "
            f"{EXPORT_FORMAT!r} v{EXPORT_VERSION}"
        )
    encoder, aggregator = _split(load_file(str(weights_path)))
    architecture = dict(config["architecture"])
    # An export written before a setting existed was made with the value that setting's absence implies.
    architecture["aggregator"] = AggregatorConfig.from_dict(architecture.get("aggregator", {})).asdict()
    return PretrainedWeights(architecture, encoder, aggregator, source=str(folder))
