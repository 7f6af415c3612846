"""`jointssl check-data`: check every training file once, before a multi-day run, and report all problems at once.

    jointssl check-data --images /data/cxr /data/ct_slices.csv --volumes /data/ct --threads 8
    jointssl check-data --config configs/pretrain/joint_swav.yaml
    jointssl check-data --config configs/pretrain/joint_swav.yaml --data.init_args.volumes='[/data/ct]'

It runs exactly the validation of :meth:`jointssl.data.JointDataModule.setup` (the same discovery, the same
decoders and checks, the same load settings) without starting a training run, and prints one line per finding::

    /data/cxr/a.png: error: empty file (0 bytes)
    /data/cxr/b.png: warning: RGBA image with an alpha channel (12% of pixels not opaque): alpha ignored, ...
    /data/ct/notes.txt: ignored: not a volume file (.nii .nii.gz .mgh .mgz .nrrd .nhdr .mha .mhd .npy or a DICOM series)
    jointssl check-data: 120 files checked (100 images, 20 volumes) in 2.0 s: 1 bad, 1 with warnings, 1 ignored

Each line is printed as soon as its file has been checked; on a terminal a progress bar on stderr shows how far
the check is (``--quiet``: none).

``error`` lines are files training refuses (``on_bad_file: error``) or skips (``on_bad_file: skip``);
``warning`` lines are files that load after a documented repair or conversion (colour to grey, padding of short
volumes, ...); ``ignored`` lines are files in volume folders that are not volumes. Exit status: 0 when no file is
bad, 1 when some are, 2 for usage errors (no sources, a source that does not exist, an unreadable config).

With ``--config`` the sources and load settings (``volume_modality``, ``slice_axis``, ``volume_in_plane_size``,
``num_slices``, ``global_crop_size``, ...) come from the config's ``data`` section, parsed by ``jointssl fit``'s own
parser (config fragments, several ``--config``, dotted overrides after it), so the check covers what ``jointssl fit``
with the same arguments would load; ``--images`` / ``--volumes`` then replace the config's sources of that kind.
Without it, the defaults of :class:`~jointssl.data.JointDataModule` apply.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jointssl.errors import UserError

__all__ = [
    "CheckSettings",
    "DataCheckReport",
    "Finding",
    "UsageError",
    "check_data",
    "check_data_command",
    "datamodule_from_config",
    "run",
    "settings_from_datamodule",
]

Severity = Literal["error", "warning", "ignored"]
PROG = "jointssl check-data"
EXIT_CLEAN, EXIT_BAD_FILES, EXIT_USAGE = 0, 1, 2


class UsageError(UserError):
    """A mistake in the arguments or the config (not in the data): exit status 2."""


@dataclass(frozen=True)
class Finding:
    """One reported problem or note: the file (or manifest, or folder) it concerns, how bad it is, and why."""

    path: str
    severity: Severity
    message: str

    def line(self) -> str:
        """``path: severity: message``, one line whatever the path holds (:func:`~jointssl.data.errors.printable`:
        a newline in a file name cannot forge a line, a name that is not UTF-8 prints)."""
        from jointssl.data.errors import printable

        return f"{printable(self.path)}: {self.severity}: {printable(self.message)}"


@dataclass(frozen=True)
class CheckSettings:
    """What training would do with the files: the settings of the data section that decide what is bad or
    repaired. ``volume_load_kwargs`` are :func:`~jointssl.data.volume_io.load_volume` arguments."""

    global_crop_size: int
    num_slices: int
    volume_load_kwargs: dict[str, Any]  # holds max_decoded_bytes for volumes
    threads: int = 8
    #: What one image may decode to (:func:`~jointssl.data.file_checks.check_decoded_size`); None: no bound.
    max_decoded_bytes: int | None = field(default_factory=lambda: _default_max_decoded_bytes())


@dataclass
class DataCheckReport:
    """Every finding of one check, in discovery order (2D sources first), and what was checked."""

    images_checked: int = 0
    volumes_checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    #: Called with each finding as soon as it is found (``jointssl check-data`` prints it).
    on_finding: Callable[[Finding], None] | None = field(default=None, repr=False, compare=False)

    def add(self, findings: Iterable[Finding]) -> None:
        """Record findings, in the order they are found, and pass each to ``on_finding``."""
        for finding in findings:
            self.findings.append(finding)
            if self.on_finding is not None:
                self.on_finding(finding)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warned_paths(self) -> list[str]:
        return list(dict.fromkeys(f.path for f in self.findings if f.severity == "warning"))

    @property
    def ignored(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "ignored"]

    @property
    def exit_code(self) -> int:
        return EXIT_BAD_FILES if self.errors else EXIT_CLEAN

    def summary(self) -> str:
        checked = self.images_checked + self.volumes_checked
        return (
            f"{PROG}: {checked} files checked ({self.images_checked} images, {self.volumes_checked} volumes) in "
            f"{self.seconds:.1f} s: {len(self.errors)} bad, {len(self.warned_paths)} with warnings, "
            f"{len(self.ignored)} ignored"
        )


def _default_max_decoded_bytes() -> int:
    from jointssl.data.file_checks import DEFAULT_MAX_DECODED_BYTES  # lazily: jointssl.data imports torch

    return DEFAULT_MAX_DECODED_BYTES


def check_data(
    images: Sequence[str | os.PathLike],
    volumes: Sequence[str | os.PathLike],
    settings: CheckSettings,
    on_finding: Callable[[Finding], None] | None = None,
    progress: bool = True,
) -> DataCheckReport:
    """Discover and decode every image and volume of the sources once, with the validation code of
    ``JointDataModule.setup``, and report every bad file, repair and ignored file.

    ``on_finding`` is called with each finding as it is found, in report order; ``progress`` draws progress bars
    on stderr while files are decoded (only when stderr is a terminal).

    Raises :class:`UsageError` for a source that does not exist, or a 2D source that is a file but not a
    ``.csv`` manifest. A manifest that cannot be read is reported as a bad file and the other sources are still
    checked.
    """
    started = time.perf_counter()
    for source in [*images, *volumes]:
        if not os.path.lexists(source):
            raise UsageError(f"source does not exist: {source}")
    for source in images:
        if os.path.isfile(source) and Path(source).suffix.lower() != ".csv":
            raise UsageError(f"an image source must be a folder or a .csv manifest, got the file {source}")
    report = DataCheckReport(on_finding=on_finding)
    report.images_checked = _check_images(images, settings, report, progress)
    report.volumes_checked = _check_volumes(volumes, settings, report, progress)
    report.seconds = time.perf_counter() - started
    return report


def _scan_each(sources: Sequence[str | os.PathLike], scan_sources: Callable, into: Any) -> list[Finding]:
    """Scan the sources one at a time into `into` (a SourceScan): a manifest that cannot
    be read is one unreadable finding, not the end of the check. Returns those findings."""
    from jointssl.data.errors import DataValidationError

    unreadable = []
    for source in sources:
        try:
            into.extend(scan_sources([source]))
        except DataValidationError as error:  # a manifest's header or rows: one finding per problem
            unreadable.extend(Finding(e.path, "error", e.reason) for e in error.errors)
        except (ValueError, OSError, csv.Error) as error:
            unreadable.append(_unreadable_manifest(source, error))
    return unreadable


def _unreadable_manifest(source: str | os.PathLike, error: Exception) -> Finding:
    return Finding(str(source), "error", f"cannot read the manifest: {type(error).__name__}: {error}")


def _check_images(
    sources: Sequence[str | os.PathLike], settings: CheckSettings, report: DataCheckReport, progress: bool
) -> int:
    """Add the findings of the 2D sources to the report; return the number of entries checked. An image smaller
    than the global crop trains, but every crop of it is an upsampled blur: a warning."""
    from jointssl.data.datamodule import small_image_note
    from jointssl.data.discovery import SourceScan, scan_image_sources
    from jointssl.data.image_io import MIN_IMAGE_SIDE
    from jointssl.data.validation import check_images

    scan = SourceScan()
    unreadable = _scan_each(sources, scan_image_sources, scan)
    report.add(unreadable)
    report.add(Finding(error.path, "error", error.reason) for error in scan.problems)
    report.add(Finding(path, "warning", note) for path, note in scan.notes)
    crop = settings.global_crop_size

    def findings_of(check) -> Iterator[Finding]:
        if check.error is not None:
            yield Finding(check.error.path, "error", check.error.reason)
            return
        yield from (Finding(check.path, "warning", note) for note in check.notes)
        # The one wording of this finding and of fit's warning (JointDataModule).
        small = small_image_note(check.shape, crop)
        if small is not None:
            yield Finding(check.path, "warning", small)

    check_images(
        scan.records,
        num_threads=max(1, settings.threads),
        min_side=MIN_IMAGE_SIDE,
        progress="checking images" if progress else None,
        on_result=lambda check: report.add(findings_of(check)),
        max_decoded_bytes=settings.max_decoded_bytes,
    )
    return len(unreadable) + len(scan.problems) + len(scan.records)


def _check_volumes(
    sources: Sequence[str | os.PathLike], settings: CheckSettings, report: DataCheckReport, progress: bool
) -> int:
    """Add the findings of the 3D sources to the report; return the number of entries checked. A volume shorter
    than num_slices trains padded with masked empty slices: a warning. A missing file listed in a manifest is
    traced back to the manifest's line."""
    from jointssl.data.discovery import NOT_A_VOLUME, SourceScan, scan_volume_sources
    from jointssl.data.validation import check_volumes

    scan = SourceScan()
    unreadable = _scan_each(sources, scan_volume_sources, scan)
    report.add(unreadable)
    report.add(Finding(error.path, "error", error.reason) for error in scan.problems)
    report.add(Finding(path, "warning", note) for path, note in scan.notes)
    report.add(Finding(path, "ignored", NOT_A_VOLUME) for path in scan.ignored)
    slab = settings.num_slices

    def findings_of(check) -> Iterator[Finding]:
        if check.error is not None:
            origin = scan.origins.get(check.path)
            listed = f" (listed in {origin})" if origin else ""
            yield Finding(check.error.path, "error", check.error.reason + listed)
            return
        yield from (Finding(check.path, "warning", note) for note in check.notes)
        if check.shape is not None and check.shape[0] < slab:
            slices = check.shape[0]
            message = (
                f"{slices} slices, fewer than num_slices {slab}: padded at the end with {slab - slices} empty "
                "slices that are masked out"
            )
            yield Finding(check.path, "warning", message)

    check_volumes(
        scan.records,
        num_threads=max(1, settings.threads),
        progress="checking volumes" if progress else None,
        on_result=lambda check: report.add(findings_of(check)),
        **settings.volume_load_kwargs,
    )
    return len(unreadable) + len(scan.problems) + len(scan.records)


# ----------------------------------------------------------------------------------------------------------
# Settings from a config or from JointDataModule's defaults
# ----------------------------------------------------------------------------------------------------------


def datamodule_from_config(fit_arguments: Sequence[str]):
    """The data module that ``jointssl fit FIT_ARGUMENTS`` would build, parsed by fit's own parser (config files,
    fragments such as ``data: data.yaml``, dotted overrides) and constructed only: nothing is generated or loaded.
    Raises :class:`UsageError` when the arguments or the data section are invalid."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    from jointssl.cli import parse_fit_arguments

    shown = " ".join(fit_arguments)
    try:
        # Only the data section matters here, so a data-only config is accepted too: the pretraining module stands
        # in for a missing `model` (a config's own model replaces it).
        config = parse_fit_arguments(["--model=jointssl.pretrain.JointSSL", *fit_arguments])
    except ValueError as error:
        raise UsageError(f"cannot parse `jointssl fit {shown}`: {error}") from None
    if config.get("data") is None:
        raise UsageError(f"`jointssl fit {shown}` has no `data` section (class_path + init_args)")
    # The fit parser only validates; build the data module alone (the model, maybe a ResNet-50, is not needed).
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    try:
        return parser.instantiate_classes(parser.parse_object({"data": config.data.as_dict()})).data
    except Exception as error:  # the constructor's own checks (a source that is not a list, a bad modality, ...)
        raise UsageError(f"invalid `data` section in `jointssl fit {shown}`: {error}") from None


def settings_from_datamodule(
    datamodule, threads: int | None, max_decoded_bytes: int | None | Literal["config"] = "config"
) -> CheckSettings:
    """The check settings of a :class:`~jointssl.data.JointDataModule` (its own properties, so that the check and
    training cannot disagree); ``max_decoded_bytes`` other than "config" replaces the data module's."""
    if threads is None:
        threads = max(1, min(datamodule.validation_threads, os.cpu_count() or 1))
    load_kwargs = dict(datamodule.volume_load_kwargs)
    if max_decoded_bytes != "config":
        load_kwargs["max_decoded_bytes"] = max_decoded_bytes
    return CheckSettings(
        global_crop_size=datamodule.transform.global_crop_size,
        num_slices=datamodule.num_slices,
        volume_load_kwargs=load_kwargs,
        threads=threads,
        max_decoded_bytes=load_kwargs["max_decoded_bytes"],
    )


def _existing_synthetic_sources(sources: list[str], folder) -> tuple[list[str], list[Finding]]:
    """Drop a synthetic data folder that `jointssl fit` has not generated yet (with a note) instead of failing."""
    if folder is None or Path(folder).exists() or str(folder) not in sources:
        return sources, []
    note = Finding(str(folder), "warning", "synthetic data not generated yet (jointssl fit generates it): not checked")
    return [source for source in sources if source != str(folder)], [note]


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,  # `--conf...` or `--data...` overrides belong to fit's parser, not to a prefix of ours
        description=(
            "Check every training image and volume once, with the validation of JointDataModule.setup, and report "
            "every bad file (path: error: reason), repair (path: warning: ...) and ignored file in one pass. Exit "
            "status 0: no bad file; 1: bad files; 2: usage error."
        ),
    )
    parser.add_argument(
        "--images",
        nargs="+",
        action="extend",
        default=None,
        metavar="DIR_OR_CSV",
        help="2D image sources: folders (searched recursively) or CSV manifests with a 'path' column",
    )
    parser.add_argument(
        "--volumes",
        nargs="+",
        action="extend",
        default=None,
        metavar="DIR_OR_CSV",
        help="3D volume sources: folders, CSV manifests ('path' or 'image' column) or single volume files",
    )
    parser.add_argument(
        "--config",
        action="append",
        metavar="CONFIG.yaml",
        help="a jointssl config, read as `jointssl fit --config` reads it (repeatable; any other `jointssl fit` "
        "option such as --data.init_args.volumes=[...] may follow): its data section gives the sources and load "
        "settings (--images/--volumes replace its sources of that kind)",
    )
    parser.add_argument("--threads", type=int, default=None, help="decoding threads (default: validation_threads)")
    parser.add_argument(
        "--max-decoded-bytes",
        type=_byte_count,
        default=argparse.SUPPRESS,  # absent: the data module's (settings_from_datamodule)
        metavar="BYTES",
        help="refuse a file whose header declares more than this decoded (e.g. 2147483648, 2GiB, 512MiB, none; "
        "default: the data module's max_decoded_bytes, 1 GiB); validation decodes at most 4x this at once",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars (they are drawn only when stderr is a terminal anyway)"
    )
    return parser


def _byte_count(text: str) -> int | None:
    """``--max-decoded-bytes``: an integer with an optional KiB / MiB / GiB (or K / M / G) suffix, or "none"."""
    value = text.strip().lower().replace(" ", "")
    if value in ("none", "null"):
        return None
    for suffix, factor in (("gib", 1 << 30), ("mib", 1 << 20), ("kib", 1 << 10), ("g", 1 << 30), ("m", 1 << 20),
                           ("k", 1 << 10), ("b", 1)):
        if value.endswith(suffix):
            value, scale = value[: -len(suffix)], factor
            break
    else:
        scale = 1
    try:
        count = int(float(value) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 2GiB, 512MiB, none)") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return count


def run(argv: Sequence[str]) -> int:
    """Parse ``argv``, check the data, print the report; return the exit status."""
    parser = build_parser()
    options, fit_overrides = parser.parse_known_args(list(argv))  # exits with status 2 on bad arguments
    if fit_overrides and not options.config:
        parser.error(f"unrecognized arguments: {' '.join(fit_overrides)} (`jointssl fit` options need a --config)")
    options.fit_arguments = [arg for path in options.config or [] for arg in ("--config", path)] + fit_overrides
    if options.threads is not None and options.threads < 1:
        parser.error("--threads must be >= 1")
    # Readers' own log lines (nibabel's "pixdim should be positive; setting to abs", MONAI's missing GPU codecs)
    # name no file and repeat what the report says better.
    for name in ("nibabel", "nibabel.global", "monai"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from tqdm import tqdm

    def print_finding(finding: Finding) -> None:
        # tqdm.write clears a progress bar on stderr first, so that the line is not drawn into it.
        tqdm.write(finding.line(), file=sys.stdout)
        sys.stdout.flush()

    try:
        report = _check_from_options(options, print_finding)
    except UsageError as error:
        from jointssl.data.errors import printable

        parser.exit(EXIT_USAGE, f"{PROG}: error: {printable(str(error))}\n")
    print(report.summary(), flush=True)
    return report.exit_code


def _check_from_options(options: argparse.Namespace, on_finding: Callable[[Finding], None]) -> DataCheckReport:
    """Check what the options name, passing each finding to ``on_finding`` as it is found."""
    from jointssl.data import JointDataModule

    notes: list[Finding] = []
    if options.config:
        datamodule = datamodule_from_config(options.fit_arguments)
        images = list(datamodule.image_sources) if options.images is None else list(options.images)
        volumes = list(datamodule.volume_sources) if options.volumes is None else list(options.volumes)
        synthetic = datamodule.synthetic
        if synthetic is not None:
            images, missing_images = _existing_synthetic_sources(images, synthetic.images_dir)
            volumes, missing_volumes = _existing_synthetic_sources(volumes, synthetic.volumes_dir)
            notes = missing_images + missing_volumes
    else:
        datamodule = JointDataModule()
        images, volumes = list(options.images or []), list(options.volumes or [])
    if not images and not volumes and not notes:
        raise UsageError("nothing to check: give --images and/or --volumes, or a --config with data sources")
    settings = settings_from_datamodule(datamodule, options.threads, getattr(options, "max_decoded_bytes", "config"))
    for note in notes:
        on_finding(note)
    report = check_data(images, volumes, settings, on_finding=on_finding, progress=not options.quiet)
    report.findings[:0] = notes
    return report


def check_data_command(argv: Sequence[str]) -> None:
    """The ``jointssl check-data`` helper command (see the module docstring); exits with the report's status."""
    code = run(argv)
    if code != EXIT_CLEAN:
        sys.exit(code)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
