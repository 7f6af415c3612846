"""Experiment tracking: the W&B logger of an experiment directory, and the config callback of `jointssl`.

An experiment directory (`trainer.default_root_dir`) holds one W&B run. Its id lives in `<experiment>/wandb_run_id`,
so a resumed or requeued job (`jointssl fit ... --ckpt_path last`) logs into the *same* run (W&B resume="allow");
checkpoints record the id too (`checkpoint["wandb_run_id"]`), so a checkpoint copied elsewhere still names its run.

    jointssl fit --config configs/demo.yaml --trainer.logger configs/logger/wandb.yaml
    jointssl fit --config configs/demo.yaml --trainer.logger+=configs/logger/wandb.yaml   # besides the CSV logger

`ExperimentConfigCallback` (installed by `jointssl.cli.main`) writes the resolved `config.yaml` into the experiment
directory and logs the resolved config and the package versions to every logger; it also tells
`ExperimentWandbLogger` where the experiment directory is. Secrets never reach either: the config holds only what
the user typed (string values under secret-looking keys are redacted all the same), and no environment variable is
logged.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import platform
import re
import secrets
import string
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from jointssl.checkpointing import write_atomic

log = logging.getLogger("jointssl")

#: File in the experiment directory that holds the W&B run id of the experiment.
RUN_ID_FILE = "wandb_run_id"
#: Checkpoint key under which the W&B run id is recorded.
CHECKPOINT_RUN_ID_KEY = "wandb_run_id"
#: Config keys whose string values are replaced by REDACTED before the config is saved or logged.
SECRET_KEY_PATTERN = re.compile(r"token|secret|password|passwd|api[_-]?key|credential", re.IGNORECASE)
REDACTED = "<redacted>"
# W&B run ids: letters, digits, '-' and '_' (what W&B generates, and what its run URLs accept).
_RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class ExperimentWandbLogger(WandbLogger):
    """W&B logger whose run belongs to an experiment directory: a restarted job continues the same run.

    The run id is read from `<experiment dir>/wandb_run_id` when that file exists; otherwise `run_id` (or a new
    random id) is used and written there (atomically, by the process that creates the run: global rank 0). Under
    DDP only rank 0 creates a run (Lightning's `rank_zero_experiment`). W&B files go to `<experiment dir>/wandb/`.

    Args:
        project: W&B project.
        entity: W&B team or user (None: the account's default entity).
        name: display name of the run (None: W&B picks one).
        tags: tags of the run.
        group: W&B group (e.g. to put the stages of a staged recipe side by side).
        notes: free-text description of the run.
        offline: write the run to disk only (W&B offline mode): no network and no API key needed; upload later
            with `wandb sync <experiment dir>/wandb/offline-run-*`. False: online (needs `wandb login` or
            WANDB_API_KEY in the environment; the WANDB_MODE variable still applies).
        save_dir: the experiment directory. None: the Trainer's `default_root_dir`, bound by
            `ExperimentConfigCallback` (which `jointssl fit` installs) before the run is created. Outside the
            `jointssl` command line, pass it explicitly or call `use_experiment_dir`.
        run_id: start a new experiment directory with this run id (e.g. to continue a run of another directory).
            Ignored, with a warning, when the directory already records a different id.
        log_model: upload checkpoints as W&B artifacts (Lightning's WandbLogger semantics); needs online mode.
        prefix: prefix of every logged metric name.
    """

    def __init__(
        self,
        project: str = "jointssl",
        entity: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        group: str | None = None,
        notes: str | None = None,
        offline: bool = False,
        save_dir: str | None = None,
        run_id: str | None = None,
        log_model: bool | Literal["all"] = False,
        prefix: str = "",
    ) -> None:
        if importlib.util.find_spec("wandb") is None:  # an optional extra; Lightning's own message names no fix
            raise ModuleNotFoundError(
                "W&B logging needs the `wandb` package: pip install 'jointssl[wandb]' (make install includes it)"
            )
        if offline and log_model:
            raise ValueError("log_model needs online mode: checkpoints cannot be uploaded offline (offline=true)")
        if run_id is not None:
            _check_run_id(run_id, "run_id")
        # Offline mode goes to wandb.init as `mode`, not through Lightning's `offline` flag, which sets WANDB_MODE
        # in os.environ for the whole process (and every later run in it).
        super().__init__(
            project=project,
            entity=entity,
            name=name,
            tags=list(tags) if tags else None,
            group=group,
            notes=notes,
            save_dir=save_dir,
            log_model=log_model,
            prefix=prefix,
            mode="offline" if offline else None,
        )
        # Lightning passes anonymous=None, which wandb 0.31 warns about on every init: the setting is gone.
        self._wandb_init.pop("anonymous", None)
        self._requested_run_id = run_id
        self._experiment_dir: Path | None = None
        if save_dir is not None:
            self.use_experiment_dir(save_dir)

    # ------------------------------------------------------------------ experiment directory and run id
    @property
    def experiment_dir(self) -> Path | None:
        """The experiment directory (None until known)."""
        return self._experiment_dir

    @property
    def run_id_file(self) -> Path | None:
        """`<experiment dir>/wandb_run_id` (None until the experiment directory is known)."""
        return None if self._experiment_dir is None else self._experiment_dir / RUN_ID_FILE

    def use_experiment_dir(self, path: str | os.PathLike[str]) -> None:
        """Bind the logger to an experiment directory (before its run is created; every rank may call this)."""
        path = Path(path).absolute()
        if self._experiment is not None and path != self._experiment_dir:
            raise RuntimeError(
                f"the W&B run {self._experiment.id} already logs to {self._experiment_dir}; cannot move it to {path}"
            )
        self._experiment_dir = path
        self._save_dir = str(path)
        self._wandb_init["dir"] = str(path)

    def read_run_id(self) -> str | None:
        """The run id recorded in the experiment directory, or None when there is none yet."""
        file = self.run_id_file
        if file is None or not file.is_file():
            return None
        run_id = file.read_text().strip()
        _check_run_id(run_id, str(file))
        return run_id

    def _resolve_run_id(self) -> str:
        """The experiment's run id: recorded in the directory, else requested, else new; recorded on return."""
        recorded = self.read_run_id()
        if recorded is not None:
            if self._requested_run_id not in (None, recorded):
                log.warning(
                    "run_id=%s ignored: %s records run %s (delete that file to start another run)",
                    self._requested_run_id, self.run_id_file, recorded,
                )
            log.info("W&B: continuing run %s recorded in %s", recorded, self.run_id_file)
            return recorded
        run_id = self._requested_run_id or new_run_id()
        write_atomic(self.run_id_file, lambda temporary: temporary.write_text(run_id + "\n"))
        log.info("W&B: new run %s, id recorded in %s", run_id, self.run_id_file)
        return run_id

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The W&B run, created on first use on global rank 0 (a no-op stand-in on other ranks).

        None while the experiment directory is unknown: Lightning touches `experiment` at the start of `fit` before
        any callback runs, and `ExperimentConfigCallback.setup` binds the directory just after (the run is then
        created on the next use)."""
        if self._experiment is None:
            if self._experiment_dir is None:
                return None
            self._experiment_dir.mkdir(parents=True, exist_ok=True)
            self._wandb_init["id"] = self._id = self._resolve_run_id()
        return WandbLogger.experiment.fget(self)  # type: ignore[attr-defined]

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        _require_experiment_dir(self)
        super().log_hyperparams(params)

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        _require_experiment_dir(self)
        super().log_metrics(metrics, step)

    @property
    def version(self) -> str | None:
        """The W&B run id (before the run exists: the id recorded in the experiment directory, if any)."""
        if self._experiment is not None:
            return self._experiment.id
        return self._id or self.read_run_id()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        # Close the run when the Trainer is done with it: its files are complete on disk (offline runs are read
        # back or synced from them), and a later fit in the same process starts a new segment of the same run
        # instead of Lightning reusing whatever `wandb.run` is left over.
        if self._experiment is not None and hasattr(self._experiment, "finish"):
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None


class ExperimentCSVLogger(CSVLogger):
    """CSV logger of an experiment directory: metrics in `<experiment dir>/<name>/version_<n>/metrics.csv`.

    Lightning's CSVLogger needs its directory up front; this one defaults it to the Trainer's `default_root_dir`
    (bound by `ExperimentConfigCallback`, like `ExperimentWandbLogger`), so one logger config serves every
    experiment. Each fit of the experiment (e.g. every requeue) writes the next version folder.

    Args:
        save_dir: the experiment directory (None: the Trainer's `default_root_dir`).
        name: sub-folder of the experiment directory holding the version folders.
        version: version folder (None: the next free `version_<n>`).
        prefix: prefix of every logged metric name.
        flush_logs_every_n_steps: write metrics.csv every this many logging steps (and at the end).
    """

    def __init__(
        self,
        save_dir: str | None = None,
        name: str = "logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        # Lightning's CSVLogger wants a path; "." stands in until the experiment directory is bound.
        super().__init__(
            save_dir=save_dir or ".", name=name, version=version, prefix=prefix,
            flush_logs_every_n_steps=flush_logs_every_n_steps,
        )
        self._experiment_dir: Path | None = None
        if save_dir is not None:
            self.use_experiment_dir(save_dir)

    @property
    def experiment_dir(self) -> Path | None:
        """The experiment directory (None until known)."""
        return self._experiment_dir

    def use_experiment_dir(self, path: str | os.PathLike[str]) -> None:
        """Bind the logger to an experiment directory (before anything is logged; every rank may call this)."""
        path = Path(path).absolute()
        if self._experiment is not None and path != self._experiment_dir:
            raise RuntimeError(f"the CSV logger already writes to {self.log_dir}; cannot move it to {path}")
        self._experiment_dir = path
        self._save_dir = self._root_dir = str(path)
        self._fs = get_filesystem(str(path))

    @property
    def log_dir(self) -> str | None:  # type: ignore[override]
        """`<experiment dir>/<name>/version_<n>` (None until the experiment directory is known)."""
        return None if self._experiment_dir is None else super().log_dir

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The CSV writer (None while the experiment directory is unknown; see ExperimentWandbLogger.experiment)."""
        if self._experiment_dir is None:
            return None
        return CSVLogger.experiment.fget(self)  # type: ignore[attr-defined]

    @rank_zero_only
    def log_hyperparams(self, params: Any = None) -> None:
        _require_experiment_dir(self)
        super().log_hyperparams(params)

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        _require_experiment_dir(self)
        super().log_metrics(metrics, step)

    @rank_zero_only
    def save(self) -> None:
        if self._experiment_dir is not None:
            super().save()


class ExperimentConfigCallback(SaveConfigCallback):
    """LightningCLI's config callback for jointssl: records how an experiment was run.

    - binds every `ExperimentWandbLogger` / `ExperimentCSVLogger` without a `save_dir` to the experiment directory
      (`default_root_dir`);
    - writes the resolved config to `<experiment dir>/config.yaml` (rank 0, atomically), whatever the loggers;
    - logs the resolved config (`config`) and package versions (`versions`) to every logger's hyperparameters;
    - records the W&B run id in every checkpoint (`checkpoint["wandb_run_id"]`).

    String values under secret-looking keys (token, secret, password, api_key, ...) are redacted in both the file
    and the logged config; environment variables are never logged.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, (ExperimentWandbLogger, ExperimentCSVLogger)) and logger.experiment_dir is None:
                logger.use_experiment_dir(trainer.default_root_dir)
        if self.already_saved:
            return
        if trainer.is_global_zero:
            config_path = Path(trainer.default_root_dir) / self.config_filename
            if config_path.exists() and not self.overwrite:
                raise RuntimeError(
                    f"{config_path} exists: another run used this experiment directory (pass "
                    "save_config_kwargs={'overwrite': True} to LightningCLI to replace it)"
                )
            text = yaml.safe_dump(self.resolved_config(), sort_keys=False)
            write_atomic(config_path, lambda temporary: temporary.write_text(text))
            self.save_config(trainer, pl_module, stage)
        # Every rank leaves setup knowing the config was recorded (a second `fit` in the process skips it).
        self.already_saved = trainer.strategy.broadcast(True)

    def resolved_config(self) -> dict[str, Any]:
        """The full resolved config (every default filled in), secrets redacted."""
        dumped = self.parser.dump(self.config, skip_none=False)
        return redact_secrets(yaml.safe_load(dumped))

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        record = {"config": self.resolved_config(), "versions": package_versions()}
        for logger in trainer.loggers:
            logger.log_hyperparams(record)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        run_id = wandb_run_id(trainer.loggers)
        if run_id is not None:
            checkpoint[CHECKPOINT_RUN_ID_KEY] = run_id


def new_run_id(length: int = 8) -> str:
    """A random W&B run id: lowercase letters and digits, like the ones W&B generates."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(length))


def wandb_run_id(loggers: list[Logger]) -> str | None:
    """The run id of the first W&B logger among `loggers` (None without one, or before its run exists)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            return logger.version
    return None


def run_id_from_checkpoint(path: str | os.PathLike[str]) -> str | None:
    """The W&B run id a checkpoint was written under (None when it records none). Reads tensors/primitives only."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    run_id = checkpoint.get(CHECKPOINT_RUN_ID_KEY)
    return run_id if isinstance(run_id, str) else None


def package_versions() -> dict[str, str | None]:
    """Versions of the interpreter, the libraries jointssl trains with and the CUDA stack (no environment
    variables, host names or paths)."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for distribution in ("jointssl", "torch", "lightning", "timm", "monai", "torchvision", "numpy", "wandb"):
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = None
    versions["torch"] = str(torch.__version__)  # with the build's local tag (+cu130, +cpu), which metadata drops
    versions["cuda"] = torch.version.cuda
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    versions["cudnn"] = None if cudnn is None else str(cudnn)
    versions["gpus"] = (
        ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if torch.cuda.is_available() else None
    )
    return versions


def redact_secrets(value: Any) -> Any:
    """A copy of a nested config with string values under secret-looking keys replaced by REDACTED."""
    if isinstance(value, dict):
        return {
            key: REDACTED if isinstance(item, str) and SECRET_KEY_PATTERN.search(str(key)) else redact_secrets(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact_secrets(item) for item in value]
    return value


def _require_experiment_dir(logger: ExperimentWandbLogger | ExperimentCSVLogger) -> None:
    if logger.experiment_dir is None:
        raise RuntimeError(
            f"{type(logger).__name__}(save_dir=None) does not know its experiment directory yet: run it through "
            "`jointssl fit` (its ExperimentConfigCallback binds trainer.default_root_dir), pass save_dir, or call "
            "logger.use_experiment_dir(path) before training"
        )


def _check_run_id(run_id: str, where: str) -> None:
    if not _RUN_ID_PATTERN.match(run_id):
        raise ValueError(f"{where}: {run_id!r} is not a W&B run id (letters, digits, '-', '_'; at most 128)")

