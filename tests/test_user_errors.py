"""Issue 14, classes 4, 5 and the configuration part of 7: every user error ends the command line in one or a few
lines naming the file or option and the reason, exit status 2, no traceback unless JOINTSSL_DEBUG=1 / --debug asks
for one; a named pretrained file is the file loaded, or refused; the configuration is checked before any file is
decoded. Every message is a row of docs/errors.md.

The cases of `make test` call the console script's entry point, jointssl.cli.main, in this process (`cli`
fixture: its exit status and what it wrote to the file descriptors 1 and 2), which saves an interpreter start-up
(~10 s) per case; the `slow` ones run it in a fresh interpreter as a user does (`run_cli`), and so do
tests/test_untrusted.py's and tests/test_pretrain.py's console tests in `make test`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from jointssl.data import JointDataModule
from jointssl.downstream import PretrainedLoadError, export_pretrained, load_pretrained
from jointssl.downstream.pretrained import EXPORT_CONFIG, EXPORT_WEIGHTS
from tests.conftest import REPO_ROOT, assert_documented
from tests.downstream_fixtures import TINY_PRETRAIN

#: At most this many lines from the "error:" line to the end of stderr.
MAX_MESSAGE_LINES = 5
#: Lightning's start-up banners (seed, accelerators, srun hint, tips) may precede the message; nothing else may.
MAX_STDERR_LINES = 12


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None):
    """`jointssl ARGS` in a fresh interpreter, as a user runs it."""
    environment = {key: value for key, value in os.environ.items() if key != "JOINTSSL_DEBUG"}
    environment.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})})
    return subprocess.run([sys.executable, "-m", "jointssl.cli", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300, errors="backslashreplace")


@pytest.fixture
def cli(capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """`jointssl ARGS` through jointssl.cli.main in this process: a CompletedProcess with its exit status (0, or
    SystemExit's code) and the bytes written to stdout and stderr meanwhile. The environment (seeding writes
    PL_GLOBAL_SEED) and the working directory are restored afterwards; an exception other than SystemExit
    propagates, as a traceback would end the real command."""
    from jointssl.cli import LOG_FORMAT, main

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        environment = dict(os.environ)
        monkeypatch.chdir(cwd)
        monkeypatch.delenv("JOINTSSL_DEBUG", raising=False)
        # main's logging.basicConfig does nothing under pytest (whose capture handlers sit on the root logger):
        # the records go to stderr as they would from the console script.
        root = logging.getLogger()
        handler, level = logging.StreamHandler(sys.stderr), root.level
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        capfd.readouterr()
        try:
            main(list(args))
            status = 0
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            root.removeHandler(handler)
            root.setLevel(level)
            for key in set(os.environ) - set(environment):
                del os.environ[key]
            os.environ.update(environment)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(list(args), status, out, err)

    return run


def user_error(result: subprocess.CompletedProcess, command: str, *named: str) -> str:
    """The message of a user error: exit status 2, no traceback, `jointssl COMMAND: error: ...` ending stderr on
    at most MAX_MESSAGE_LINES lines, naming each of `named`. Returns those lines, as the user sees them."""
    stderr = result.stderr
    assert result.returncode == 2, (result.returncode, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) <= MAX_STDERR_LINES, stderr
    prefix = f"jointssl {command}: error: "
    start = max(i for i, line in enumerate(lines) if line.startswith(prefix))
    message = "\n".join(lines[start:])
    assert len(lines) - start <= MAX_MESSAGE_LINES, message
    for name in named:
        assert name in message, (name, message)
    return message


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, pretrained_checkpoint: Path) -> Path:
    """A folder with 8 tiny images, two class folders, an export of the tiny checkpoint, and two configs:
    `pretrain.yaml` (the tiny JointSSL on the images) and `downstream.yaml` (a linear ImageClassifier)."""
    root = tmp_path_factory.mktemp("user_errors")
    rng = np.random.default_rng(0)
    for folder, count in (("images", 8), ("classes/A", 4), ("classes/B", 4)):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / folder / f"p{i}.png")
    export_pretrained(pretrained_checkpoint, root / "exp")
    quiet = {"accelerator": "cpu", "devices": 1, "max_steps": 1, "logger": False, "enable_progress_bar": False,
             "enable_model_summary": False}
    pretrain = {
        "seed_everything": 0,
        "trainer": {**quiet, "default_root_dir": str(root / "run"), "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]},
        "model": {"class_path": "jointssl.pretrain.JointSSL", "init_args": {**TINY_PRETRAIN, "warmup_epochs": 0}},
        "data": {"class_path": "jointssl.data.JointDataModule", "init_args": {
            "images": [str(root / "images")], "batch_size": 4, "num_workers": 0, "global_crop_size": 32,
            "local_crop_size": 16, "num_slices": 6, "volume_size": 32, "validation_threads": 1}},
    }
    downstream = {
        "seed_everything": 0,
        "trainer": {**quiet, "enable_checkpointing": False, "default_root_dir": str(root / "downstream")},
        "model": {"class_path": "jointssl.downstream.ImageClassifier", "init_args": {
            "num_classes": 2, "task": "binary", "pretrained": None, "backbone": "test_resnet", "d_model": 32,
            "mode": "linear"}},
        "data": {"class_path": "jointssl.downstream.ImageClassificationData", "init_args": {
            "train": str(root / "classes"), "task": "binary", "classes": ["A", "B"], "val_fraction": 0.5,
            "image_size": 32, "batch_size": 2, "num_workers": 0}},
    }
    (root / "pretrain.yaml").write_text(yaml.safe_dump(pretrain))
    (root / "downstream.yaml").write_text(yaml.safe_dump(downstream))
    return root


def fit_pretrained(workspace: Path, pretrained: Path, *extra: str, runner=run_cli) -> subprocess.CompletedProcess:
    return runner("fit", "--config", "downstream.yaml", f"--model.init_args.pretrained={pretrained}", *extra,
                  cwd=workspace)


def fit(workspace: Path, *extra: str, env: dict[str, str] | None = None, runner=run_cli):
    return runner("fit", "--config", "pretrain.yaml", *extra, cwd=workspace, **({"env": env} if env else {}))


# ------------------------------------------------------------------------- class 4: the named file is loaded
def test_a_named_safetensors_file_is_the_file_loaded(workspace: Path, tmp_path: Path, cli) -> None:
    exported = load_file(str(workspace / "exp" / EXPORT_WEIGHTS))
    finetuned = {key: value + 1 if value.is_floating_point() else value for key, value in exported.items()}
    named = workspace / "exp" / "my_finetuned.safetensors"
    save_file(finetuned, str(named), metadata={"format": "pt"})

    weights = load_pretrained(named)
    assert weights.source == str(named)
    for key, value in weights.encoder.items():
        assert torch.equal(value, finetuned[f"encoder.{key}"]), key
    # What the command line loads and says it loaded: that file (exported again, its tensors come back).
    result = cli("export", "--checkpoint", str(named), "--output", str(tmp_path / "again"), cwd=workspace)
    assert result.returncode == 0, result.stderr[-2000:]
    again = load_file(str(tmp_path / "again" / EXPORT_WEIGHTS))
    assert all(torch.equal(again[key], finetuned[key]) for key in finetuned)
    result = fit_pretrained(workspace, named, runner=cli)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_documented("pretrained-named-file", result.stderr)


@pytest.mark.slow  # a CLI subprocess (~10 s of start-up each): `make test-all`
def test_the_timm_backbone_file_is_refused_not_replaced(workspace: Path) -> None:
    message = user_error(fit_pretrained(workspace, workspace / "exp" / "backbone.safetensors"), "fit",
                         "backbone.safetensors")
    assert_documented("pretrained-backbone-file", message)


@pytest.mark.slow  # a CLI subprocess (~10 s of start-up each): `make test-all`
def test_pretrained_paths_that_cannot_be_loaded(workspace: Path, pretrained_checkpoint: Path) -> None:
    bad = workspace / "bad_pretrained"
    bad.mkdir()
    (bad / "empty.ckpt").write_bytes(b"")
    (bad / "truncated.ckpt").write_bytes(pretrained_checkpoint.read_bytes()[:3000])
    # Wrong tensor names, beside a valid config.json: not jointssl encoder weights.
    wrong = bad / "wrong_names"
    wrong.mkdir()
    (wrong / EXPORT_CONFIG).write_text((workspace / "exp" / EXPORT_CONFIG).read_text())
    save_file({"fc.weight": torch.zeros(2, 2)}, str(wrong / EXPORT_WEIGHTS))
    # The right names, one tensor missing: refused rather than half loaded.
    partial = bad / "partial"
    partial.mkdir()
    (partial / EXPORT_CONFIG).write_text((workspace / "exp" / EXPORT_CONFIG).read_text())
    tensors = load_file(str(workspace / "exp" / EXPORT_WEIGHTS))
    dropped = next(key for key in sorted(tensors) if key.startswith("encoder."))
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(partial / EXPORT_WEIGHTS))

    cases = {
        "pretrained-missing": (bad / "missing.ckpt", "missing.ckpt"),
        "pretrained-empty": (bad / "empty.ckpt", "empty.ckpt"),
        "pretrained-truncated": (bad / "truncated.ckpt", "truncated.ckpt"),
        "pretrained-wrong-names": (wrong, str(wrong / EXPORT_WEIGHTS)),
        "pretrained-partial": (partial, dropped[len("encoder."):]),
    }
    seen = {}
    for case, (path, named) in cases.items():
        seen[case] = user_error(fit_pretrained(workspace, path), "fit", named)
        assert "Union" not in seen[case], seen[case]
    assert_documented("pretrained-missing", seen["pretrained-missing"])
    assert_documented("pretrained-empty", seen["pretrained-empty"])
    assert_documented("pretrained-truncated", seen["pretrained-truncated"])
    assert_documented("pretrained-wrong-names", seen["pretrained-wrong-names"])
    assert_documented("pretrained-partial", seen["pretrained-partial"])
    with pytest.raises(PretrainedLoadError, match="does not fit"):
        load_pretrained(partial).slice_encoder()


# ------------------------------------------------------------------------------ class 5: export
def test_export_to_an_existing_file_leaves_it_untouched(workspace: Path, pretrained_checkpoint: Path, cli) -> None:
    target = workspace / "existing_file"
    target.write_text("keep me\n")
    message = user_error(cli("export", "--checkpoint", str(pretrained_checkpoint), "--output", str(target),
                             cwd=workspace), "export", str(target))
    assert target.read_text() == "keep me\n"
    assert_documented("export-output-is-file", message)


@pytest.mark.slow  # a CLI subprocess (~10 s of start-up each): `make test-all`
@pytest.mark.parametrize("truncated", [EXPORT_CONFIG, EXPORT_WEIGHTS])
def test_export_of_a_truncated_export(workspace: Path, tmp_path: Path, truncated: str) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in os.listdir(workspace / "exp"):
        data = (workspace / "exp" / name).read_bytes()
        (source / name).write_bytes(data[: len(data) // 3] if name == truncated else data)
    output = tmp_path / "out"
    message = user_error(run_cli("export", "--checkpoint", str(source), "--output", str(output), cwd=workspace),
                         "export", str(source / truncated))
    assert not output.exists()  # nothing half-written
    if truncated == EXPORT_CONFIG:
        assert_documented("export-truncated-config", message)
    else:
        assert_documented("export-truncated-weights", message)


# ------------------------------------------------------------------------------ class 5: check-data
@pytest.mark.slow  # a CLI subprocess (~10 s of start-up each): `make test-all`
@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes in names")
def test_check_data_prints_a_non_utf8_name_under_a_utf8_locale(workspace: Path, tmp_path: Path) -> None:
    folder = tmp_path / "names"
    folder.mkdir()
    image = (workspace / "images" / "p0.png").read_bytes()
    (Path(os.fsdecode(os.fsencode(str(folder)) + b"/bad\xffname.png"))).write_bytes(image)
    (Path(os.fsdecode(os.fsencode(str(folder)) + b"/empty\xfe.png"))).write_bytes(b"")
    # PYTHONIOENCODING=utf-8: stdout strictly UTF-8, as under en_US.UTF-8 (C.UTF-8 would escape on its own).
    result = run_cli("check-data", "--images", str(folder), "--quiet", cwd=workspace,
                     env={"PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"})
    assert result.returncode == 1, result.stderr[-3000:]  # a bad file found: the report's own status
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "1 bad" in result.stdout
    line = next(line for line in result.stdout.splitlines() if "empty" in line)
    assert "\\" in line  # the undecodable byte, escaped
    assert_documented("check-data-non-utf8-name", line)


# ------------------------------------------------------------------------------ class 5: checkpoints
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_when_saving_a_checkpoint(workspace: Path, tmp_path: Path, cli,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoint writes go to /dev/full: the kernel answers ENOSPC, as a full disk does."""
    import builtins

    import jointssl.checkpointing as checkpointing

    real_open = builtins.open

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        if str(file).endswith(checkpointing.PARTIAL_SUFFIX) and "w" in mode:
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "open", open_on_full_disk, raising=False)
    experiment = tmp_path / "full"
    result = fit(workspace, f"--trainer.default_root_dir={experiment}", runner=cli)
    message = user_error(result, "fit", str(experiment / "checkpoints"), "No space left on device")
    assert_documented("checkpoint-disk-full", message)
    assert not list((experiment / "checkpoints").iterdir())  # no checkpoint, no partial file left behind


def resume(workspace: Path, experiment: Path, *extra: str, env: dict[str, str] | None = None, runner=run_cli):
    return fit(workspace, f"--trainer.default_root_dir={experiment}", "--ckpt_path", "last", *extra, env=env,
               runner=runner)


@pytest.mark.slow  # a CLI subprocess (~10 s of start-up each): `make test-all`
def test_resuming_from_a_last_ckpt_that_is_not_a_checkpoint(workspace: Path, tmp_path: Path) -> None:
    cases = {
        "resume-empty": lambda path: path.write_bytes(b""),
        "resume-garbage": lambda path: path.write_bytes(np.random.default_rng(0).bytes(2000)),
        "resume-folder": lambda path: path.mkdir(),
    }
    seen = {}
    for case, make in cases.items():
        last = tmp_path / case / "checkpoints" / "last.ckpt"
        last.parent.mkdir(parents=True)
        make(last)
        seen[case] = user_error(resume(workspace, tmp_path / case), "fit", str(last))
        assert "weights_only" not in seen[case], seen[case]
    assert_documented("resume-empty", seen["resume-empty"])
    assert_documented("resume-garbage", seen["resume-garbage"])
    assert_documented("resume-folder", seen["resume-folder"])


class Payload:
    """Not a tensor or plain value: only a full unpickle builds it."""


@pytest.mark.slow  # a CLI subprocess (~10 s of start-up each): `make test-all`
def test_resuming_from_a_checkpoint_with_pickled_objects(workspace: Path, tmp_path: Path,
                                                         pretrained_checkpoint: Path) -> None:
    checkpoint = torch.load(pretrained_checkpoint, map_location="cpu", weights_only=True)
    checkpoint["extra"] = Payload()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save(checkpoint, last)
    message = user_error(resume(workspace, tmp_path), "fit", str(last), "Payload")
    # torch's own advice, retrying with weights_only=False, is what must not be done with such a file.
    assert "weights_only=False" not in message
    assert_documented("resume-pickled", message)


def test_resuming_with_another_backbone_names_both(workspace: Path, tmp_path: Path,
                                                   pretrained_checkpoint: Path, cli) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(pretrained_checkpoint.read_bytes())
    message = user_error(resume(workspace, tmp_path, "--model.init_args.backbone=resnet10t", runner=cli), "fit",
                         str(last), "test_resnet", "resnet10t")
    assert_documented("resume-other-backbone", message)


# ------------------------------------------------------------------------------ class 5 and 7: config values
@pytest.mark.parametrize(("case", "override", "option"), [
    ("config-negative-batch-size", "--data.init_args.batch_size=-4", "batch_size"),
    ("config-num-slices-zero", "--data.init_args.num_slices=0", "num_slices"),
    ("config-one-global-crop", "--data.init_args.num_global_crops=1", "num_global_crops"),
])
def test_config_values_out_of_range_are_one_line_naming_the_option(workspace: Path, tmp_path: Path, case: str,
                                                                   override: str, option: str, cli) -> None:
    experiment = tmp_path / "run"
    message = user_error(fit(workspace, override, f"--trainer.default_root_dir={experiment}", runner=cli), "fit",
                         option)
    assert "Union" not in message
    if case == "config-negative-batch-size":
        assert_documented("config-negative-batch-size", message)
    elif case == "config-num-slices-zero":
        assert_documented("config-num-slices-zero", message)
    else:
        assert_documented("config-one-global-crop", message)
    assert not (experiment / "validation_cache").exists()  # refused before any file was decoded


@pytest.mark.slow  # a CLI subprocess (~10 s of start-up each): `make test-all`
def test_debug_shows_the_traceback(workspace: Path, tmp_path: Path) -> None:
    override = "--data.init_args.batch_size=-4"
    for env, flag in (({"JOINTSSL_DEBUG": "1"}, ()), (None, ("--debug",))):
        result = fit(workspace, *flag, override, f"--trainer.default_root_dir={tmp_path}", env=env)
        assert result.returncode != 0
        assert_documented("debug-traceback", result.stderr)
        assert "batch_size must be >= 1" in result.stderr


@pytest.mark.slow  # a CLI subprocess (~10 s of start-up each): `make test-all`
def test_fit_warns_of_images_smaller_than_the_global_crop(workspace: Path, tmp_path: Path) -> None:
    result = fit(workspace, "--data.init_args.global_crop_size=64", f"--trainer.default_root_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_documented("fit-crop-above-images", result.stderr)


def test_crops_above_the_slice_size_are_warned_of_at_construction(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        JointDataModule(volumes=["/nonexistent/volumes"], global_crop_size=300, volume_in_plane_size=256)
    assert_documented("config-crop-above-slices", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jointssl.data"):
        JointDataModule(volumes=["/nonexistent/volumes"], global_crop_size=224, volume_in_plane_size=256)
    assert "global_crop_size" not in caplog.text


@pytest.mark.slow  # a CLI subprocess (~10 s of start-up each): `make test-all`
def test_errors_raised_in_setup_are_messages_too(workspace: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in os.listdir(workspace / "images"):
        (images / name).write_bytes((workspace / "images" / name).read_bytes())
    (images / "zero.png").write_bytes(b"")
    message = user_error(fit(workspace, f"--data.init_args.images=[{images}]",
                             f"--trainer.default_root_dir={tmp_path / 'run'}"), "fit", str(images / "zero.png"))
    assert "empty file" in message


@pytest.mark.slow  # a CLI subprocess (~10 s of start-up each): `make test-all`
def test_export_keeps_reporting_existing_exports(workspace: Path, pretrained_checkpoint: Path) -> None:
    before = json.loads((workspace / "exp" / EXPORT_CONFIG).read_text())
    message = user_error(run_cli("export", "--checkpoint", str(pretrained_checkpoint), "--output",
                                 str(workspace / "exp"), cwd=workspace), "export", "already holds")
    assert "--overwrite" in message
    assert json.loads((workspace / "exp" / EXPORT_CONFIG).read_text()) == before
