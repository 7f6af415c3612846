"""`jointssl embed`: frozen-encoder embeddings of 2D images or 3D volumes, saved for :mod:`.protocol`.

The encoders come from a pretraining checkpoint (``.ckpt``) or an export folder, read tensors-only by
:func:`jointssl.downstream.pretrained.load_pretrained`. With ``random_init=True`` the same architecture is built
with weights drawn from ``seed`` instead (the random-initialisation baseline; the checkpoint is still read, for
its architecture). Inputs are preprocessed by :mod:`.inputs`; the encoders run in eval mode without gradients.

- 2D images: ``features`` = f_intra's embedding of each image, [N, D].
- Volumes: f_intra embeds every kept slice, z [S, D]; ``volume`` = the volume feature of pretraining,
  :class:`jointssl.models.VolumeEncoder` (the L2-normalised mean of f_inter's tokens, over all kept slices at once);
  ``slice_mean`` = the mean of z over slices (a volume feature that bypasses f_inter). Each [N, D].

The output folder holds:

- ``features.safetensors``: the feature tensors above (float32), rows in ``items.csv`` order;
- ``items.csv``: ``index,path,label`` (label empty when the source gives none);
- ``embed.json``: what was embedded, and how (fields in docs/evaluation.md).

Each file is written to a temporary name and renamed; ``embed.json`` last, so a folder with an ``embed.json`` is
complete (an overwrite removes the old one first).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from jointssl.checkpointing import write_atomic, write_json
from jointssl.downstream.pretrained import EXPORT_WEIGHTS, PretrainedWeights, load_pretrained
from jointssl.errors import UserError
from jointssl.data.prediction_inputs import preprocess_image
from jointssl.evaluation.inputs import images_with_labels, preprocess_volume, volumes_with_labels
from jointssl.models import SliceEncoder, VolumeEncoder

log = logging.getLogger("jointssl")

EMBED_FORMAT = "jointssl-embeddings"
EMBED_VERSION = 1
FEATURES_FILE = "features.safetensors"
ITEMS_FILE = "items.csv"
META_FILE = "embed.json"
EMBED_FILES = (FEATURES_FILE, ITEMS_FILE, META_FILE)
#: Feature names per kind of input.
IMAGE_FEATURES = ("features",)
VOLUME_FEATURES = ("volume", "slice_mean")

Kind = Literal["images", "volumes"]


class EmbedError(UserError, ValueError):
    """Embedding cannot start or finish: bad options, no input, an existing output folder, ..."""


@dataclass(frozen=True)
class EmbedResult:
    """What :func:`embed` wrote."""

    folder: Path
    kind: Kind
    num_items: int
    features: dict[str, int]  # name -> dimension
    seconds: float


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of the weights file that :func:`load_pretrained` reads: a checkpoint or ``.safetensors`` file as
    named, or the ``encoders.safetensors`` of an export folder."""
    path = Path(path)
    if path.is_dir():
        path = path / EXPORT_WEIGHTS
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise a torch device string (``cpu``, ``cuda``, ``cuda:1``)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise EmbedError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EmbedError(f"device {device!r} requested but CUDA is not available")
    return resolved


def build_encoders(
    weights: PretrainedWeights, with_aggregator: bool, random_init: bool = False, seed: int = 0
) -> VolumeEncoder:
    """f_intra (and f_inter when ``with_aggregator``) of ``weights``' architecture, in eval mode: with its
    tensors, or with ``random_init`` freshly initialised from ``seed`` (the global RNG state is left untouched)."""
    if not random_init:
        return weights.volume_encoder(with_aggregator).eval()
    architecture = weights.architecture
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VolumeEncoder.build(
            architecture["backbone"], architecture["d_model"], weights.aggregator_config() if with_aggregator else None
        )
    return model.eval()


def _progress(total: int, what: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"embed {what}", unit=what.rstrip("s"), file=sys.stderr,
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def image_features(
    encoder: SliceEncoder, paths: Sequence[str], image_size: int, batch_size: int, device: torch.device,
    quiet: bool = True,
) -> dict[str, Tensor]:
    """``{"features": [N, D]}`` float32 on CPU: f_intra's embedding of each image (preprocessed by
    :func:`~jointssl.data.prediction_inputs.preprocess_image`), in ``paths`` order."""
    encoder = encoder.to(device).eval()
    parts = []
    with _progress(len(paths), "images", quiet) as bar:
        for chunk in _chunks(paths, batch_size):
            batch = torch.stack([preprocess_image(path, image_size) for path in chunk]).to(device)
            parts.append(encoder(batch).float().cpu())
            bar.update(len(chunk))
    return {"features": torch.cat(parts) if parts else torch.empty(0, encoder.d_model)}


@torch.no_grad()
def volume_features(
    model: VolumeEncoder, records: Sequence, volume_size: int, slice_stride: int, batch_size: int,
    device: torch.device, quiet: bool = True,
) -> dict[str, Tensor]:
    """``{"volume": [N, D], "slice_mean": [N, D]}`` float32 on CPU, one row per volume record (module
    docstring); f_intra runs on at most ``batch_size`` slices at a time."""
    model = model.to(device).eval()
    model.slice_chunk_size = batch_size
    volumes, slice_means = [], []
    with _progress(len(records), "volumes", quiet) as bar:
        for record in records:
            slices = preprocess_volume(record, volume_size, slice_stride).to(device)
            z = model.embed_slices(slices[None])
            volumes.append(model.pool(model.aggregate(z, None), None)[0].float().cpu())
            slice_means.append(z[0].float().mean(dim=0).cpu())
            bar.update(1)
    empty = torch.empty(0, model.d_model)
    return {
        "volume": torch.stack(volumes) if volumes else empty,
        "slice_mean": torch.stack(slice_means) if slice_means else empty,
    }


def embed(
    pretrained: str | os.PathLike,
    output: str | os.PathLike,
    images: Sequence[str] | None = None,
    volumes: Sequence[str] | None = None,
    random_init: bool = False,
    seed: int = 0,
    image_size: int = 64,
    volume_size: int = 64,
    slice_stride: int = 1,
    batch_size: int = 64,
    device: str = "auto",
    quiet: bool = False,
    overwrite: bool = False,
) -> EmbedResult:
    """Embed the 2D images of the sources ``images`` or the volumes of the sources ``volumes`` (exactly one of
    the two) with the encoders of ``pretrained`` and write the output folder (module docstring).

    Raises :class:`EmbedError` (bad options, no item found, an existing embedding without ``overwrite``),
    :class:`~jointssl.downstream.pretrained.PretrainedLoadError` (missing or unusable weights), and the data
    errors of discovery and decoding (``FileNotFoundError`` for a missing source, ``BadFileError`` naming a file
    that cannot be read).
    """
    started = time.perf_counter()
    if (images is None) == (volumes is None):
        raise EmbedError("give either images or volumes sources (exactly one of the two)")
    kind: Kind = "images" if images is not None else "volumes"
    sources = [str(s) for s in (images if images is not None else volumes)]
    if not sources:
        raise EmbedError(f"no {kind} source given")
    for name, value in (("image_size", image_size), ("volume_size", volume_size), ("slice_stride", slice_stride),
                        ("batch_size", batch_size)):
        if value < 1:
            raise EmbedError(f"{name} must be >= 1, got {value}")
    folder = Path(output)
    existing = [name for name in EMBED_FILES if (folder / name).exists()]
    if existing and not overwrite:
        raise EmbedError(f"{folder} already holds {existing}; pass overwrite=True (--overwrite) to replace them")
    target = resolve_device(device)
    weights = load_pretrained(pretrained)
    sha256 = checkpoint_sha256(pretrained)

    if kind == "images":
        found = images_with_labels(sources)
    else:
        found = volumes_with_labels(sources)
    if not found:
        raise EmbedError(f"no {kind} found in {', '.join(sources)}")
    paths = [record.path for record, _ in found]
    labels = [label or "" for _, label in found]
    log.info("embedding %d %s from %s with %s%s on %s", len(found), kind, ", ".join(sources), pretrained,
             f" (random init, seed {seed})" if random_init else "", target)

    model = build_encoders(weights, with_aggregator=kind == "volumes", random_init=random_init, seed=seed)
    if kind == "images":
        features = image_features(model.encoder, paths, image_size, batch_size, target, quiet)
    else:
        features = volume_features(model, [record for record, _ in found], volume_size, slice_stride, batch_size,
                                   target, quiet)

    meta: dict[str, Any] = {
        "format": EMBED_FORMAT,
        "version": EMBED_VERSION,
        "kind": kind,
        "checkpoint": os.path.abspath(pretrained),
        "checkpoint_sha256": sha256,
        "random_init": bool(random_init),
        "seed": int(seed),
        "architecture": {"backbone": weights.architecture["backbone"], "d_model": weights.architecture["d_model"]},
        "sources": [os.path.abspath(s) for s in sources],
        **({"image_size": image_size} if kind == "images" else {"volume_size": volume_size,
                                                                  "slice_stride": slice_stride}),
        "num_items": len(paths),
        "num_labelled": sum(1 for label in labels if label),
        "features": {name: int(tensor.shape[1]) for name, tensor in features.items()},
        "device": str(target),
        "seconds": round(time.perf_counter() - started, 3),
        "jointssl_version": _jointssl_version(),
    }
    write_embedding(folder, features, paths, labels, meta)
    return EmbedResult(folder, kind, len(paths), dict(meta["features"]), meta["seconds"])


def write_embedding(
    folder: Path, features: dict[str, Tensor], paths: Sequence[str], labels: Sequence[str], meta: dict[str, Any]
) -> None:
    """Write the three files of an embedding folder atomically, ``embed.json`` last (module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).unlink(missing_ok=True)  # incomplete until the new embed.json is in place

    def write_items(path: Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["index", "path", "label"])
            writer.writerows([i, p, label] for i, (p, label) in enumerate(zip(paths, labels)))

    tensors = {name: tensor.detach().float().cpu().contiguous() for name, tensor in features.items()}
    write_atomic(folder / FEATURES_FILE, lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
    write_atomic(folder / ITEMS_FILE, write_items)
    write_json(folder / META_FILE, meta)


def _jointssl_version() -> str | None:
    try:
        return importlib.metadata.version("jointssl")
    except importlib.metadata.PackageNotFoundError:
        return None
