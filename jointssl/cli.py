"""`jointssl` command line: a LightningCLI, so every constructor argument of the model, the data module and the
Trainer is a config key (`jointssl fit --print_config` shows them all).

    jointssl fit --config configs/demo.yaml
    jointssl fit --config configs/pretrain/swav_2d.yaml --data.init_args.images='[/data/cxr]'

Helper commands beside LightningCLI's fit/validate/test/predict are dispatched in `main` before LightningCLI
parses anything (they take no model, data or trainer configuration):

    jointssl export --checkpoint runs/demo/checkpoints/last.ckpt --output exported/
    jointssl embed --pretrained runs/demo/checkpoints/last.ckpt --images /data/labelled --output embeddings/
    jointssl evaluate --train embeddings/ --group-regex 'patient([0-9]+)' --report report.json

A mistake in what the user gave (a config value, a file, a path, a full disk) ends every command with one
`jointssl <command>: error: <message>` on stderr and exit status 2; `--debug` or JOINTSSL_DEBUG=1 shows the
traceback instead (jointssl.errors, docs/errors.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import ArgsType, LightningCLI

# Imported so that the short class names in configs resolve and `--help` lists them.
import jointssl.data
import jointssl.pretrain  # noqa: F401
from jointssl.checkpointing import (
    check_checkpoint_fits,
    install_atomic_checkpoint_io,
    read_lightning_checkpoint,
)
from jointssl.errors import DEBUG_FLAG, debug_requested, user_errors_reported
from jointssl.tracking import ExperimentConfigCallback

log = logging.getLogger("jointssl")


class JointSSLCLI(LightningCLI):
    """LightningCLI plus the experiment directory and resumption rules of jointssl.

    The experiment directory is `trainer.default_root_dir`. A ModelCheckpoint without a `dirpath` writes to
    `<experiment>/checkpoints` (Lightning would pick the logger's `version_N` folder, a new one per job, where a
    requeued job could never find its `last.ckpt`). `fit --ckpt_path last` resumes from the newest `last*.ckpt` of
    the checkpoint folders when there is one and starts fresh otherwise; the decision is printed on rank 0. A
    `SLURMEnvironment(auto_requeue=false)` plugin (configs/trainer/slurm.yaml) brings in
    `jointssl.callbacks.requeue.SlurmRequeue` unless one is configured already.
    """

    #: Checkpoint folder inside the experiment directory.
    CHECKPOINT_SUBDIR = "checkpoints"

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Every command (pretraining and downstream) writes checkpoints through temp file + rename.
        install_atomic_checkpoint_io(trainer)
        self._checkpoints_into_experiment_dir(trainer)
        self._add_slurm_requeue(trainer)
        return trainer

    def _checkpoints_into_experiment_dir(self, trainer: Trainer) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        experiment = os.path.realpath(trainer.default_root_dir)
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            if callback.dirpath is None:
                callback.dirpath = os.path.join(experiment, self.CHECKPOINT_SUBDIR)
            elif self._is_local_path(callback.dirpath) and not self._is_inside(callback.dirpath, experiment):
                self._print_rank_zero(
                    f"jointssl: note: ModelCheckpoint writes to {callback.dirpath}, outside the experiment directory "
                    f"{experiment}; `--ckpt_path last` looks there, so two experiments sharing it resume each other"
                )

    def _add_slurm_requeue(self, trainer: Trainer) -> None:
        """A trainer-only file such as configs/trainer/slurm.yaml cannot add a callback without replacing the
        config's list (jsonargparse applies `--trainer FILE` without the earlier values), so the SLURMEnvironment
        plugin it sets is what asks for SlurmRequeue here."""
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        from jointssl.callbacks.requeue import SlurmRequeue

        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        environment = next((p for p in plugins if isinstance(p, SLURMEnvironment)), None)
        if environment is None or environment.auto_requeue or environment.requeue_signal is None:
            return
        if any(isinstance(c, SlurmRequeue) for c in trainer.callbacks):
            return
        # Before the checkpoint callbacks, where Lightning keeps them (they run last in every hook).
        position = next((i for i, c in enumerate(trainer.callbacks) if isinstance(c, ModelCheckpoint)),
                        len(trainer.callbacks))
        trainer.callbacks.insert(position, SlurmRequeue(requeue_signal=int(environment.requeue_signal)))

    #: `ckpt_path` values that are not file paths (Lightning resolves them itself).
    CKPT_PATH_KEYWORDS = ("last", "best", "hpc")

    def _parse_ckpt_path(self) -> None:
        """Lightning reads an existing `ckpt_path` file here to take its hyper-parameters, with a bare torch.load:
        read it first through jointssl's reader, so that an empty, truncated or pickled file is one message."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and self._is_checkpoint_path(str(path)) and os.path.isfile(str(path)):
            read_lightning_checkpoint(str(path), mmap=True)
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = self._resolve_ckpt_path(config.get("ckpt_path"))
        path = config["ckpt_path"]
        if path is not None and self._is_checkpoint_path(str(path)):
            # Before the data module decodes a single file: a checkpoint that cannot be resumed is refused now.
            checkpoint = read_lightning_checkpoint(str(path), mmap=True)
            check_checkpoint_fits(str(path), self.model, checkpoint)

    def _is_checkpoint_path(self, path: str) -> bool:
        return self._is_local_path(path) and path not in self.CKPT_PATH_KEYWORDS and not path.startswith("registry")

    def _resolve_ckpt_path(self, requested: str | None) -> str | None:
        """`last` -> the newest `last*.ckpt` (or None: start fresh); None -> None, except where Lightning would
        silently resume from an `hpc_ckpt_*.ckpt` under Slurm, which is then made explicit. Other values pass."""
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        hpc = self._hpc_checkpoints()
        if requested == "last":
            found = self._last_checkpoints() + hpc
            if not found:
                folders = ", ".join(self._checkpoint_dirs())
                self._print_rank_zero(f"jointssl: no checkpoint in {folders}, starting fresh")
                return None
            # As Lightning's own "last": the most recently written candidate.
            path = max(found, key=os.path.getmtime)
        elif requested is None and hpc and SLURMEnvironment.detect():
            path = max(hpc, key=os.path.getmtime)
            self._print_rank_zero(
                f"jointssl: no --ckpt_path given, but under Slurm Lightning resumes from {path} (left by its "
                "auto-requeue); pass --ckpt_path to choose, or use a new experiment directory"
            )
        elif requested is None or not os.path.isfile(str(requested)):
            return requested
        else:
            path = str(requested)
        self._print_rank_zero(f"jointssl: resuming from {path} at global step {self._checkpoint_global_step(path)}")
        return path

    def _checkpoint_dirs(self) -> list[str]:
        from lightning.pytorch.callbacks import ModelCheckpoint

        dirs = [c.dirpath for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        return list(dict.fromkeys(dirs)) or [os.path.join(self.trainer.default_root_dir, self.CHECKPOINT_SUBDIR)]

    def _last_checkpoints(self) -> list[str]:
        """What Lightning's `ckpt_path="last"` considers: each ModelCheckpoint's `last.ckpt` / `last-vN.ckpt` (where
        `SlurmRequeue` saves too; `<experiment>/checkpoints` without one) and OnExceptionCheckpoint files."""
        from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

        checkpoints = [c for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        folders = [(c.dirpath, c.CHECKPOINT_NAME_LAST) for c in checkpoints] or [
            (self._checkpoint_dirs()[0], ModelCheckpoint.CHECKPOINT_NAME_LAST)
        ]
        found = []
        for folder, name in folders:
            if os.path.isdir(folder):
                last = re.compile(rf"{re.escape(name)}(-v?\d+)?{re.escape(ModelCheckpoint.FILE_EXTENSION)}")
                found += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if last.fullmatch(f)]
        for callback in self.trainer.callbacks:
            if isinstance(callback, OnExceptionCheckpoint) and os.path.isfile(callback.ckpt_path):
                found.append(callback.ckpt_path)
        return list(dict.fromkeys(found))

    def _hpc_checkpoints(self) -> list[str]:
        """`hpc_ckpt_<N>.ckpt` files Lightning's own Slurm auto-requeue leaves in `default_root_dir`."""
        root = self.trainer.default_root_dir
        if not os.path.isdir(root):
            return []
        return [os.path.join(root, name) for name in os.listdir(root) if re.fullmatch(r"hpc_ckpt_\d+\.ckpt", name)]

    @staticmethod
    def _print_rank_zero(message: str) -> None:
        from lightning.pytorch.utilities import rank_zero_only

        if rank_zero_only.rank == 0:
            print(message, flush=True)

    @staticmethod
    def _is_local_path(path: str) -> bool:
        return "://" not in str(path)

    @staticmethod
    def _is_inside(path: str, folder: str) -> bool:
        path, folder = os.path.realpath(path), os.path.realpath(folder)
        return os.path.commonpath([path, folder]) == folder

    @staticmethod
    def _checkpoint_global_step(path: str) -> int:
        """`global_step` of a Lightning checkpoint, read memory-mapped (tensors are not read). A file that is not
        one (empty, truncated, a folder named last.ckpt, ...) is refused here, naming it."""
        return int(read_lightning_checkpoint(path, mmap=True).get("global_step", 0))

    def after_fit(self) -> None:
        # Researchers need to know where the weights went without digging through the log directory.
        checkpoint = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and checkpoint is not None:
            path = checkpoint.last_model_path or checkpoint.best_model_path
            if path:
                print(f"jointssl: checkpoint written to {path}", flush=True)


def export_command(argv: Sequence[str]) -> None:
    """`jointssl export`: write a pretraining checkpoint's encoders as safetensors (see jointssl.downstream.export)."""
    from jointssl.downstream.export import BACKBONE_WEIGHTS, export_pretrained
    from jointssl.downstream.pretrained import EXPORT_CONFIG, EXPORT_WEIGHTS

    parser = argparse.ArgumentParser(
        prog="jointssl export",
        description=(
            f"Export the encoders of a jointssl pretraining checkpoint: {EXPORT_WEIGHTS} (f_intra + f_inter, for "
            f"jointssl downstream modules: pretrained=OUTPUT), {BACKBONE_WEIGHTS} (the timm backbone under timm's "
            f"own names, loadable with timm alone) and {EXPORT_CONFIG}. Only tensors are read from the checkpoint."
        ),
    )
    parser.add_argument("--checkpoint", required=True, help="pretraining .ckpt (or an earlier export folder)")
    parser.add_argument("--output", required=True, help="folder to write the export into (created if needed)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing export")
    options = parser.parse_args(list(argv))
    # PretrainedLoadError / ExportError are user errors: main reports them as `jointssl export: error: ...`.
    files = export_pretrained(options.checkpoint, options.output, overwrite=options.overwrite)
    print(f"jointssl: exported {files.encoders}, {files.backbone} and {files.config}", flush=True)


def _one_line(error: BaseException) -> str:
    """An error message on one line (multi-line messages, e.g. a list of bad files, are joined with "; ")."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def embed_command(argv: Sequence[str]) -> None:
    """`jointssl embed`: embeddings of labelled images or volumes by a checkpoint's encoders (or a random init of the
    same architecture), saved for `jointssl evaluate` (see jointssl.evaluation.features)."""
    from jointssl.downstream.pretrained import PretrainedLoadError
    from jointssl.evaluation.features import EmbedError, embed

    parser = argparse.ArgumentParser(
        prog="jointssl embed",
        description=(
            "Embed 2D images (f_intra: features) or 3D volumes (f_inter: volume; mean of f_intra slice embeddings: "
            "slice_mean) with frozen pretrained encoders; writes features.safetensors, items.csv (path, label: the "
            "class sub-folder or a CSV label column) and embed.json into OUTPUT."
        ),
    )
    parser.add_argument("--pretrained", required=True, help="pretraining .ckpt or `jointssl export` folder")
    parser.add_argument("--random-init", action="store_true",
                        help="the same architecture with weights drawn from --seed instead (the baseline)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-init's weights (default 0)")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", nargs="+", metavar="SRC", help="2D image folders or CSV manifests")
    inputs.add_argument("--volumes", nargs="+", metavar="SRC", help="volume folders, CSV manifests or files")
    parser.add_argument("--output", required=True, help="folder to write the embeddings into (created if needed)")
    parser.add_argument("--image-size", type=int, default=64, help="images resized to this square size (64)")
    parser.add_argument("--volume-size", type=int, default=64, help="volume slices resized to this size (64)")
    parser.add_argument("--slice-stride", type=int, default=1, help="keep every N-th slice of a volume (1)")
    parser.add_argument("--batch-size", type=int, default=64, help="images / slices per forward pass (64)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing embedding")
    options = parser.parse_args(list(argv))
    try:
        result = embed(
            options.pretrained, options.output, images=options.images, volumes=options.volumes,
            random_init=options.random_init, seed=options.seed, image_size=options.image_size,
            volume_size=options.volume_size, slice_stride=options.slice_stride, batch_size=options.batch_size,
            device=options.device, quiet=options.quiet, overwrite=options.overwrite,
        )
    except (PretrainedLoadError, EmbedError, ValueError, OSError) as error:
        parser.exit(2, f"jointssl embed: error: {_one_line(error)}\n")
    features = ", ".join(f"{name} [{result.num_items}, {dim}]" for name, dim in result.features.items())
    print(f"jointssl: embedded {result.num_items} {result.kind} into {result.folder} ({features}) in "
          f"{result.seconds:.1f} s", flush=True)


def evaluate_command(argv: Sequence[str]) -> None:
    """`jointssl evaluate`: kNN and linear-probe accuracy of embeddings written by `jointssl embed` (see
    jointssl.evaluation.protocol)."""
    from jointssl.checkpointing import write_json
    from jointssl.evaluation import probes
    from jointssl.evaluation.protocol import evaluate, format_report

    parser = argparse.ArgumentParser(
        prog="jointssl evaluate",
        description=(
            "Weighted kNN (cosine) and linear probe (standardised features, L2-regularised multinomial logistic "
            "regression by full-batch L-BFGS) on embeddings from `jointssl embed`: trained on --train, tested on "
            "--test, or on a split of --train that keeps each --group-regex group on one side."
        ),
    )
    parser.add_argument("--train", required=True, help="embedding folder (split into train/test without --test)")
    parser.add_argument("--test", help="embedding folder of a separate test set (same encoder)")
    parser.add_argument("--task", help="name of the task in the report (default: the --train folder's name)")
    parser.add_argument("--feature", default="features",
                        help="feature to evaluate: features (images), volume or slice_mean (volumes)")
    parser.add_argument("--label-regex", help="label = first capture group of this regex on the path (replaces the "
                        "stored labels; items without a match are dropped and counted)")
    parser.add_argument("--group-regex", help="group = first capture group (or whole match) on the path, e.g. a "
                        "patient id; whole groups go to one side of the split")
    parser.add_argument("--test-fraction", type=float, default=0.3, help="share of the items in test (0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (0)")
    parser.add_argument("--k", type=int, default=probes.DEFAULT_K, help="kNN neighbours (20)")
    parser.add_argument("--temperature", type=float, default=probes.DEFAULT_TEMPERATURE,
                        help="kNN vote weight exp(cosine / T) (0.07)")
    parser.add_argument("--probe-weight-decay", type=float, default=probes.DEFAULT_WEIGHT_DECAY,
                        help="linear probe penalty weight_decay * sum of squared weights (1e-4)")
    parser.add_argument("--report", help="write the JSON report to this file")
    options = parser.parse_args(list(argv))
    try:
        report = evaluate(
            options.train, options.test, task=options.task, feature=options.feature, label_regex=options.label_regex,
            group_regex=options.group_regex, test_fraction=options.test_fraction, seed=options.seed, k=options.k,
            temperature=options.temperature, probe_weight_decay=options.probe_weight_decay,
        )
        if options.report:
            write_json(options.report, report)
    except (ValueError, OSError) as error:
        parser.exit(2, f"jointssl evaluate: error: {_one_line(error)}\n")
    print(format_report(report), flush=True)
    if options.report:
        print(f"jointssl: report written to {options.report}", flush=True)


#: Helper commands: name -> (one-line help, handler taking the remaining arguments).
def check_data_command(argv: Sequence[str]) -> None:
    """`jointssl check-data`: decode every training file once and report all bad ones (see jointssl.check_data)."""
    from jointssl.check_data import check_data_command as run_check_data

    run_check_data(argv)


HELPER_COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], None]]] = {
    "export": ("Export pretrained encoders (safetensors + config.json) for downstream use.", export_command),
    "check-data": ("Check every training image and volume once; report all bad files (exit 1 if any).", check_data_command),
    "embed": ("Embed labelled images or volumes with frozen pretrained (or random-init) encoders.", embed_command),
    "evaluate": ("kNN and linear-probe accuracy of embeddings from `jointssl embed`.", evaluate_command),
}


#: How `jointssl fit` and everything that parses like it see the model and data: any LightningModule /
#: LightningDataModule by class_path. Every module builds its own optimizer from its constructor arguments
#: (pretraining: LARS with the batch-size learning-rate scaling and the per-part groups); LightningCLI's
#: `--optimizer`/`--lr_scheduler` would silently replace that, so they do not exist (an error, not a new run).
CLI_SCHEMA: dict[str, Any] = {
    "model_class": LightningModule,
    "datamodule_class": LightningDataModule,
    "subclass_mode_model": True,
    "subclass_mode_data": True,
    "auto_configure_optimizers": False,
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (types, defaults, env vars) with the epilog's line breaks kept (the command list)."""


def _helper_epilog() -> str:
    width = max(len(name) for name in HELPER_COMMANDS)
    lines = [f"  jointssl {name:<{width}}  {text}" for name, (text, _) in HELPER_COMMANDS.items()]
    return "other commands (each has its own --help):\n" + "\n".join(lines)


#: How the command line's log records look on stderr.
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def main(args: ArgsType = None) -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # MONAI announces on import that an optional GPU DICOM decoder is missing; jointssl does not use it.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    # Frozen and unused parts run in eval mode on purpose (their BatchNorm statistics must not drift; JointSSL logs
    # which parts they are), which Lightning reports as a possible mistake at every start.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # A file name that is not valid in the output encoding (a non-UTF-8 name under a UTF-8 locale: lone
    # surrogates) is printed escaped instead of ending the command with a UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    argv = sys.argv[1:] if args is None else args
    debug = False
    if isinstance(argv, (list, tuple)):
        debug = debug_requested(list(argv))
        argv = [arg for arg in argv if arg != DEBUG_FLAG]
        if args is not None:
            args = argv
        elif debug:
            # LightningCLI reads sys.argv itself when given no args; it must not see --debug.
            sys.argv = [sys.argv[0], *argv]
    else:
        debug = debug_requested()
    command = argv[0] if isinstance(argv, list) and argv and not argv[0].startswith("-") else None
    with user_errors_reported(f"jointssl {command}" if command else "jointssl", debug=debug):
        if command in HELPER_COMMANDS:
            HELPER_COMMANDS[command][1](argv[1:])
            return
        JointSSLCLI(
            **CLI_SCHEMA,
            # A second run in the same directory must not fail on an existing config.yaml.
            save_config_kwargs={"overwrite": True},
            # config.yaml into the experiment directory; resolved config + versions to the loggers (jointssl.tracking).
            save_config_callback=ExperimentConfigCallback,
            # `jointssl --help` lists the helper commands too (LightningCLI only knows the Trainer's).
            parser_kwargs={"epilog": _helper_epilog(), "formatter_class": _HelpFormatter},
            args=args,
        )


class _ParseOnlyCLI(JointSSLCLI):
    """Parses exactly as `jointssl fit` and stops there: nothing is seeded, built or run."""

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parse_fit_arguments(args: Sequence[str]) -> Any:
    """The configuration (a jsonargparse Namespace) that `jointssl fit ARGS` would run with, parsed by fit's own
    parser: `--config` files and fragments (`data: data.yaml`), dotted overrides (`--data.init_args.images=[...]`),
    several `--config`s. Raises ValueError with the parser's message when the arguments are invalid."""
    try:
        with warnings.catch_warnings():
            # The caller's own sys.argv (e.g. `jointssl check-data ...`) is not what is parsed here, on purpose.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            return _ParseOnlyCLI(**CLI_SCHEMA, run=False, parser_kwargs={"exit_on_error": False}, args=list(args)).config
    except (argparse.ArgumentError, SystemExit) as error:  # jsonargparse: ArgumentError; argparse internals: exit
        raise ValueError(str(error)) from None


if __name__ == "__main__":
    main()
