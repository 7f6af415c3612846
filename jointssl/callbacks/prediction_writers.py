"""Prediction writers: what `jointssl predict` leaves on disk, one writer per task (docs/outputs.md).

Each writer reads what its task's ``predict_step`` returns (the prediction contract below) and writes under
``<trainer.default_root_dir>/predictions/`` (or ``output_dir``), every file atomically:

- :class:`ClassificationWriter` (image and volume classification): ``predict_step`` returns ``{"paths": [B],
  "probabilities": [B, C]}`` (candidates: also ``"coordinates": [B, 3]``) -> ``classification.csv`` with
  ``path[, coordX, coordY, coordZ], prob_<class>..., predicted``.
- :class:`SegmentationWriter`: a list of ``{"path", "labels"}`` (labels in the source file's voxel order) ->
  ``<image stem>_seg.nii.gz`` per volume with the source's voxel -> world affine (MONAI ``SaveImage``).
- :class:`DetectionWriter`: a list of per-scan ``{"seriesuid", "scores", "centers", "diameters", ...}`` ->
  ``candidates.csv`` in the LUNA16 submission layout; :func:`read_candidates_csv` reads it back.
- :class:`EmbeddingWriter` (pretraining): ``{"paths", "kind", "embeddings" [B, D], "assignments" [B]}`` ->
  ``embeddings.safetensors`` (``embeddings`` [N, D]) and ``assignments.csv`` (``path, kind, cluster``), row i of one
  being row i of the other.

Under DDP every rank's predictions are gathered to global rank 0, which writes the table once, one row per input:
an input is its dataset index (Lightning reports the batch indices for predict), not its path, since several inputs
may share one (the candidates of a volume). An index that a distributed sampler dealt to two ranks (padding to
equal shards) is written once. Rows follow the dataset order; without batch indices (an iterable dataset, which
gets no distributed sampler and so no repeats) every record is written, in the order of arrival. Segmentation masks are written by the rank that predicted them, as they come:
gathering whole volumes to one process would only cost memory, and a volume predicted twice writes the same file.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from jointssl.checkpointing import write_atomic
from jointssl.distributed import is_distributed, rank, world_size

log = logging.getLogger(__name__)

#: The LUNA16 submission columns (the challenge's evaluation script reads them by name).
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
#: Written after the LUNA16 columns (which the challenge's script ignores), so that the candidates can be scored
#: again as boxes (the project's FROC matches boxes by IoU).
DIAMETER_COLUMN = "diameter_mm"


class PredictionWriter(BasePredictionWriter):
    """The shared part of the writers: where files go, one record per input collected from every batch, gathered to
    rank 0 at the end of the predict epoch and written once by :meth:`write` (each dataset index once).

    Args:
        output_dir: folder of the written files; None: ``<trainer.default_root_dir>/predictions``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        #: (dataloader, dataset index or -1, batch, position in the batch, record) of this rank's inputs
        self._records: list[tuple[int, int, int, int, dict[str, Any]]] = []

    def output_folder(self, trainer: Trainer) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(trainer.default_root_dir) / "predictions"

    def records(self, prediction: Any) -> list[dict[str, Any]]:
        """One plain record (numbers as NumPy, on the CPU) per input of a batch's prediction."""
        raise NotImplementedError

    def write(self, trainer: Trainer, pl_module: LightningModule, records: list[dict[str, Any]]) -> list[Path]:
        """Write every input's record (on global rank 0, each input once); returns the written files."""
        raise NotImplementedError

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._records = []

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        records = self.records(prediction)
        indices = list(batch_indices) if batch_indices is not None and len(batch_indices) == len(records) else None
        for position, record in enumerate(records):
            # Without the sampler's indices, the order of arrival: batch, then position in it.
            index = indices[position] if indices is not None else -1
            self._records.append((dataloader_idx, index, batch_idx, position, record))

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        gathered = gather_to_rank_zero(self._records)
        self._records = []
        if gathered is None:
            return
        gathered.sort(key=lambda entry: entry[:4])
        unique: dict[Any, dict[str, Any]] = {}
        for dataloader, index, batch, position, record in gathered:
            # A padding sampler's repeat has the index of the original; without indices nothing repeats.
            unique.setdefault((dataloader, index) if index >= 0 else (dataloader, index, batch, position), record)
        for path in self.write(trainer, pl_module, list(unique.values())):
            log.info("%s: %d predictions written to %s", type(self).__name__, len(unique), path)


def gather_to_rank_zero(items: list[Any]) -> list[Any] | None:
    """Every rank's ``items`` concatenated in rank order on global rank 0 (None on the other ranks); the items
    themselves in a single process. Picklable Python objects (paths and NumPy arrays), which the tensor gathers of
    jointssl.distributed do not carry."""
    if not is_distributed():
        return list(items)
    gathered: list[list[Any] | None] = [None] * world_size() if rank() == 0 else None  # type: ignore[assignment]
    dist.gather_object(items, gathered, dst=0)
    if rank() != 0:
        return None
    return [item for part in gathered for item in part]  # type: ignore[union-attr]


def _numpy(value: Any) -> np.ndarray:
    """A tensor or array as a CPU NumPy array of its own precision (world coordinates in float64 stay float64);
    half precision (bf16 has no NumPy type) as float32."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype in (torch.float16, torch.bfloat16) else value).numpy()
    return np.asarray(value)


def _write_text(path: Path, text: str) -> Path:
    """``text`` to ``path`` atomically (``newline=""``: the csv module's line ends are kept); a clear error naming
    the file when it cannot be written."""
    def write(temporary: Path) -> None:
        with temporary.open("w", newline="", encoding="utf-8") as handle:
            handle.write(text)

    return _atomically(path, write)


def _atomically(path: Path, write) -> Path:
    try:
        write_atomic(path, write)
    except OSError as error:
        raise OSError(f"cannot write the predictions file {path}: {error}") from error
    return path


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    table = csv.writer(buffer, lineterminator="\n")
    table.writerow(header)
    table.writerows(rows)
    return buffer.getvalue()


class ClassificationWriter(PredictionWriter):
    """``classification.csv``: one row per input with ``path``, ``prob_<class>`` per class and ``predicted``; for
    candidates (a prediction with ``coordinates``) ``coordX, coordY, coordZ`` after the path, the candidate's
    position as its CSV gives it, so that the rows join back onto the candidates CSV.

    Class names come from the data module's ``classes`` when it has one name per probability column, else they
    are the column indices. ``predicted`` is the most probable class; for a multilabel task (the module's
    ``hparams.task``) it is every class with probability >= 0.5, joined by ``;``.

    Args:
        output_dir: folder of the CSV; None: ``<trainer.default_root_dir>/predictions``.
        filename: the CSV's file name.
    """

    def __init__(self, output_dir: str | None = None, filename: str = "classification.csv") -> None:
        super().__init__(output_dir)
        self.filename = filename

    def records(self, prediction: dict[str, Any]) -> list[dict[str, Any]]:
        probabilities = _numpy(prediction["probabilities"]).astype(np.float64)
        paths = [str(p) for p in prediction["paths"]]
        if probabilities.ndim != 2 or len(probabilities) != len(paths):
            raise ValueError(f"ClassificationWriter needs probabilities [B, C] for B paths, got "
                             f"{probabilities.shape} for {len(paths)} paths")
        records = [{"path": path, "probabilities": row} for path, row in zip(paths, probabilities)]
        if "coordinates" in prediction:
            coordinates = _numpy(prediction["coordinates"]).astype(np.float64).reshape(len(paths), 3)
            for record, position in zip(records, coordinates):
                record["coordinates"] = position
        return records

    def write(self, trainer: Trainer, pl_module: LightningModule, records: list[dict[str, Any]]) -> list[Path]:
        width = len(records[0]["probabilities"]) if records else 0
        classes = getattr(getattr(trainer, "datamodule", None), "classes", None)
        names = [str(c) for c in classes] if classes and len(classes) == width else [str(c) for c in range(width)]
        multilabel = getattr(pl_module, "hparams", {}).get("task") == "multilabel"
        rows = []
        for record in records:
            probabilities = record["probabilities"]
            if multilabel:
                predicted = ";".join(name for name, p in zip(names, probabilities) if p >= 0.5)
            else:
                predicted = names[int(np.argmax(probabilities))]
            position = [repr(float(c)) for c in record["coordinates"]] if "coordinates" in record else []
            rows.append([record["path"], *position, *(f"{p:.6g}" for p in probabilities), predicted])
        coordinates = list(CANDIDATE_COLUMNS[1:4]) if records and "coordinates" in records[0] else []
        header = ["path", *coordinates, *(f"prob_{name}" for name in names), "predicted"]
        return [_write_text(self.output_folder(trainer) / self.filename, _csv_text(header, rows))]


class DetectionWriter(PredictionWriter):
    """``candidates.csv`` in the LUNA16 submission layout: ``seriesuid, coordX, coordY, coordZ, probability``, one
    row per candidate, centres in world millimetres of the annotations' frame (what ``predict_step`` gives), then
    ``diameter_mm`` (ignored by the LUNA16 script; :func:`read_candidates_csv` reads it to score the candidates as
    boxes again). A scan without candidates has no row.

    Args:
        output_dir: folder of the CSV; None: ``<trainer.default_root_dir>/predictions``.
        filename: the CSV's file name.
    """

    def __init__(self, output_dir: str | None = None, filename: str = "candidates.csv") -> None:
        super().__init__(output_dir)
        self.filename = filename

    def records(self, prediction: list[dict[str, Any]]) -> list[dict[str, Any]]:
        scans = prediction if isinstance(prediction, list) else [prediction]
        return [
            {"seriesuid": str(scan["seriesuid"]), "centers": _numpy(scan["centers"]).astype(np.float64).reshape(-1, 3),
             "scores": _numpy(scan["scores"]).astype(np.float64).reshape(-1),
             "diameters": _numpy(scan["diameters"]).astype(np.float64).reshape(-1)}
            for scan in scans
        ]

    def write(self, trainer: Trainer, pl_module: LightningModule, records: list[dict[str, Any]]) -> list[Path]:
        rows = [
            [scan["seriesuid"], *(repr(float(c)) for c in centre), repr(float(score)), repr(float(diameter))]
            for scan in records
            for centre, score, diameter in zip(scan["centers"], scan["scores"], scan["diameters"])
        ]
        text = _csv_text([*CANDIDATE_COLUMNS, DIAMETER_COLUMN], rows)
        return [_write_text(self.output_folder(trainer) / self.filename, text)]


def read_candidates_csv(path: str | os.PathLike, seriesuids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """A candidates CSV (LUNA16 layout; ``diameter_mm`` optional) as per-scan dicts like
    ``NoduleDetector.predict_step``'s: ``seriesuid``, ``centers`` ``[n, 3]`` (world mm), ``scores`` ``[n]``,
    ``diameters`` ``[n]`` (NaN without the column).

    Args:
        path: the CSV (read by jointssl.data.manifest: every bad row reported with its line).
        seriesuids: the evaluated scans in order; each gets an entry, with no candidates when the CSV has no row
            of it (FROC counts false positives per evaluated scan). None: the scans of the CSV, in order of first
            appearance.
    """
    from jointssl.data.manifest import RowError, read_manifest

    table = read_manifest(path, required=[c.lower() for c in CANDIDATE_COLUMNS], what="candidates CSV")
    has_diameter = table.column(DIAMETER_COLUMN.lower()) is not None

    def parse(row) -> tuple[str, list[float]]:
        uid = row.text("seriesuid")
        if not uid:
            raise RowError("empty seriesuid")
        values = [row.number(c.lower()) for c in CANDIDATE_COLUMNS[1:]]
        return uid, [*values, row.number(DIAMETER_COLUMN.lower()) if has_diameter else float("nan")]

    by_scan: dict[str, list[list[float]]] = {uid: [] for uid in seriesuids or ()}
    for uid, values in table.parse_all(parse):
        by_scan.setdefault(uid, []).append(values)
    order = list(seriesuids) if seriesuids is not None else list(by_scan)
    scans = []
    for uid in order:
        values = np.asarray(by_scan[uid], dtype=np.float64).reshape(-1, 5)
        scans.append({"seriesuid": uid, "centers": values[:, :3], "scores": values[:, 3], "diameters": values[:, 4]})
    return scans


class EmbeddingWriter(PredictionWriter):
    """Pretraining predictions: ``embeddings.safetensors`` (one tensor ``embeddings`` ``[N, D]``: f_intra of each
    2D image, the pooled volume feature of each volume) and ``assignments.csv`` (``path, kind, cluster``: the
    head-0 prototype of the intra task for images, of the inter task for volumes), in the same row order.

    Args:
        output_dir: folder of both files; None: ``<trainer.default_root_dir>/predictions``.
    """

    def records(self, prediction: dict[str, Any]) -> list[dict[str, Any]]:
        embeddings = _numpy(prediction["embeddings"]).astype(np.float32)
        assignments = _numpy(prediction["assignments"]).reshape(-1)
        paths, kinds = [str(p) for p in prediction["paths"]], [str(k) for k in prediction["kind"]]
        if not len(paths) == len(kinds) == len(embeddings) == len(assignments):
            raise ValueError(f"EmbeddingWriter needs one kind, embedding and assignment per path, got {len(paths)} "
                             f"paths, {len(kinds)} kinds, {len(embeddings)} embeddings, {len(assignments)} assignments")
        return [{"path": p, "kind": k, "embedding": e, "cluster": int(c)}
                for p, k, e, c in zip(paths, kinds, embeddings, assignments)]

    def write(self, trainer: Trainer, pl_module: LightningModule, records: list[dict[str, Any]]) -> list[Path]:
        from safetensors.torch import save_file

        folder = self.output_folder(trainer)
        width = len(records[0]["embedding"]) if records else 0
        matrix = torch.from_numpy(np.stack([r["embedding"] for r in records]) if records
                                  else np.zeros((0, width), np.float32))
        embeddings = _atomically(folder / "embeddings.safetensors",
                                 lambda temporary: save_file({"embeddings": matrix.contiguous()}, str(temporary)))
        table = _csv_text(["path", "kind", "cluster"], [[r["path"], r["kind"], r["cluster"]] for r in records])
        return [embeddings, _write_text(folder / "assignments.csv", table)]


class SegmentationWriter(PredictionWriter):
    """One ``<image stem>_seg.nii.gz`` per volume: the predicted class indices (uint8, or int16 beyond 255) on the
    source image's grid with the source's voxel -> world affine, so that it overlays the image in any viewer.

    ``labels`` arrive in the source file's voxel order; the affine is the one the project's reader of the source
    format gives (jointssl.data.volume_readers: NIfTI, MGH, NRRD, MetaImage, DICOM series), in RAS as NIfTI
    stores it; a ``.npy`` source has no geometry and gets the identity (with a warning). Written by MONAI
    ``SaveImage`` (nibabel, no resampling), then moved into place atomically. Two sources with the same stem in
    one run are an error (the second would overwrite the first).

    Args:
        output_dir: folder of the masks; None: ``<trainer.default_root_dir>/predictions``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(output_dir)
        self._written: dict[str, str] = {}

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._written = {}

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        for volume in prediction if isinstance(prediction, list) else [prediction]:
            self.write_mask(self.output_folder(trainer), str(volume["path"]), _numpy(volume["labels"]))

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log.info("SegmentationWriter: %d masks written to %s (rank %d)", len(self._written),
                 self.output_folder(trainer), rank())
        self._written = {}

    def write_mask(self, folder: Path, source: str, labels: np.ndarray) -> Path:
        """Write ``labels`` (the source file's voxel order) as ``<folder>/<stem of source>_seg.nii.gz``."""
        from monai.transforms import SaveImage

        affine, shape = source_geometry(source)
        if tuple(labels.shape) != tuple(shape):
            raise ValueError(f"labels of {source} have shape {tuple(labels.shape)}, but the file's voxel array is "
                             f"{tuple(shape)}: predict_step must return them in the source file's voxel order")
        name = f"{volume_stem(source)}_seg"
        earlier = self._written.get(name)
        if earlier is not None and earlier != source:
            raise ValueError(f"{source} and {earlier} would both be written as {folder / name}.nii.gz: give the "
                             "images distinct file names")
        if labels.size and not (labels.min() >= np.iinfo(np.int16).min and labels.max() <= np.iinfo(np.int16).max):
            raise ValueError(f"labels of {source} hold values outside int16: not class indices")
        dtype = np.uint8 if not labels.size or (labels.min() >= 0 and labels.max() <= 255) else np.int16
        saver = SaveImage(output_ext=".nii.gz", output_dtype=dtype, resample=False, writer="NibabelWriter",
                          separate_folder=False, print_log=False, channel_dim=None)
        meta = {"affine": affine, "original_affine": affine, "spatial_shape": tuple(shape), "filename_or_obj": source}
        path = folder / f"{name}.nii.gz"

        def write(temporary: Path) -> None:
            # SaveImage names its file itself (``<filename>.nii.gz``, nibabel compresses by that suffix): it
            # writes beside the temporary file and the result replaces it, then write_atomic renames it into place.
            written = Path(f"{temporary}-saveimage.nii.gz")
            try:
                saver(labels.astype(dtype), meta_data=meta, filename=f"{temporary}-saveimage")
                os.replace(written, temporary)
            finally:
                written.unlink(missing_ok=True)

        _atomically(path, write)
        self._written[name] = source
        return path


def source_geometry(source: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """The voxel -> RAS affine and the voxel array shape of a volume, as the project's reader gives them (a DICOM
    series' affine is known after decoding; a ``.npy`` has none: identity, with a warning)."""
    from jointssl.data.volume_io import read_volume_header, volume_reader

    header = read_volume_header(source)
    if header.affine is not None:
        return np.asarray(header.affine, dtype=np.float64), tuple(header.shape)
    reader = volume_reader(source)
    if reader.world_geometry:  # DICOM series: geometry from the decoded series
        decoded = reader.decode(source)
        return np.asarray(decoded.affine, dtype=np.float64), tuple(decoded.shape[-3:])
    log.warning("%s has no world geometry (%s): its mask is written with the identity affine", source,
                reader.format_name)
    return np.eye(4), tuple(header.shape)


def volume_stem(path: str) -> str:
    """A volume's file name without its volume suffix (``case.nii.gz`` -> ``case``); a DICOM series' folder name."""
    from jointssl.data.volume_io import VOLUME_FILE_SUFFIXES

    name = Path(path.rstrip(os.sep)).name
    for suffix in sorted(VOLUME_FILE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
