"""Every case of the bad-input corpus (tests/bad_inputs.py) through the public entry points — JointDataModule.setup
and check_data — and `jointssl check-data` on the whole corpus at once.

Unreadable-file cases need a user that file permissions apply to: as root they run in a subprocess under an
unprivileged user (setpriv / runuser), and are skipped only when no such mechanism exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from jointssl.check_data import EXIT_BAD_FILES, EXIT_CLEAN, EXIT_USAGE, run
from jointssl.cli import main as cli_main
from jointssl.data import BadFileError, discover_images, discover_volumes, load_image_2d, load_volume
from jointssl.data.volume_transforms import VolumeViews
from tests.bad_inputs import (
    CASES,
    SETTINGS,
    UNPRIVILEGED_CASES,
    BadInputCase,
    GoodData,
    build_corpus,
    ct_like,
    make_readable,
    observe,
    write_good_data,
    write_nifti,
    write_png,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FINDING_LINE = re.compile(r"^(?P<path>.+?): (?P<severity>error|warning|ignored): (?P<message>.*)$")
SUMMARY_LINE = re.compile(
    r"^jointssl check-data: (?P<checked>\d+) files checked \((?P<images>\d+) images, (?P<volumes>\d+) volumes\) "
    r"in [\d.]+ s: (?P<bad>\d+) bad, (?P<warned>\d+) with warnings, (?P<ignored>\d+) ignored$"
)
SUBPROCESS_TIMEOUT_S = 300  # generous for a busy 2-core machine; a hang (symlink loop, FIFO) fails instead


# ------------------------------------------------------------------------------------------------------------
# Fixtures: a folder an unprivileged user can read, and a way to run commands as that user
# ------------------------------------------------------------------------------------------------------------


def unprivileged_prefix() -> list[str] | None:
    """Command prefix that runs a command as a user whom ``chmod 000`` stops: nothing when this process is not
    root, else setpriv/runuser to ``nobody``; None when root has no way to drop privileges."""
    if os.geteuid() != 0:
        return []
    candidates = (
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"],
        ["setpriv", "--reuid=nobody", "--regid=nobody", "--clear-groups"],
        ["runuser", "-u", "nobody", "--"],
    )
    for prefix in candidates:
        if shutil.which(prefix[0]) and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


@pytest.fixture(scope="module")
def workspace() -> Iterator[Path]:
    """A temporary folder every user can read (pytest's tmp_path is private to root), with umask 022."""
    old_umask = os.umask(0o022)
    root = Path(tempfile.mkdtemp(prefix="jointssl-bad-inputs-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        os.umask(old_umask)
        make_readable(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def good(workspace: Path) -> GoodData:
    return write_good_data(workspace / "good")


@pytest.fixture(scope="module")
def prefix(workspace: Path, good: GoodData) -> list[str] | None:
    """The unprivileged prefix, checked to reach the workspace (None when there is none)."""
    found = unprivileged_prefix()
    if found and subprocess.run([*found, "test", "-r", good.image_files[0]]).returncode != 0:
        return None  # the temporary folder's parents are closed to that user
    return found


def run_python(prefix: list[str], workspace: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HOME": str(workspace)}  # the unprivileged user cannot write root's home
    return subprocess.run(
        [*prefix, sys.executable, *args],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def unprivileged_observations(workspace: Path, good: GoodData, prefix: list[str] | None) -> dict | None:
    """Observations of the unreadable-file cases, made by one subprocess run as the unprivileged user."""
    if prefix is None:
        return None
    cases = [make(workspace / "unprivileged" / make.__name__) for make in CASES if make.__name__ in UNPRIVILEGED_CASES]
    (workspace / "cases.json").write_text(json.dumps([case.to_json() for case in cases]))
    (workspace / "good.json").write_text(json.dumps(asdict(good)))
    done = run_python(
        prefix, workspace, "-m", "tests.bad_inputs", str(workspace / "cases.json"), str(workspace / "good.json")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    observations = json.loads(done.stdout.strip().splitlines()[-1])
    return {case.name: (case, observations[case.name]) for case in cases}


# ------------------------------------------------------------------------------------------------------------
# Each case through JointDataModule.setup and check_data
# ------------------------------------------------------------------------------------------------------------


def test_the_corpus_is_large_and_covers_both_dimensions():
    kinds = [make.kind for make in CASES]
    assert len(CASES) >= 25 and len({make.__name__ for make in CASES}) == len(CASES)
    assert kinds.count("2D") >= 10 and kinds.count("3D") >= 10 and kinds.count("manifest") >= 2


def _matches(expected, path: str, severity: str, text: str) -> bool:
    return (
        os.path.abspath(path) == os.path.abspath(expected.path)
        and severity == expected.severity
        and (expected.reason in text)
    )


def assert_observation(case: BadInputCase, observation: dict, good: GoodData) -> None:
    """The exact behaviour: errors refuse the file in setup and in check_data with the expected reason (and no
    other file is blamed); repairs train the file and are reported as warnings."""
    assert observation["setup_other"] is None, f"setup raised something else than DataValidationError: {observation}"
    setup_errors = observation["setup_errors"]
    if case.errors:
        assert setup_errors is not None, f"{case.name}: setup accepted a bad input"
        assert len(setup_errors) == len(case.errors), setup_errors
        for expected in case.errors:
            hits = [e for e in setup_errors if _matches(expected, e[0], "error", e[1])]
            assert len(hits) == 1, f"{case.name}: setup did not report {expected}: {setup_errors}"
    else:
        assert setup_errors is None, f"{case.name}: setup refused a repairable input: {setup_errors}"
        trained = observation["trained"]
        assert len(trained) == len(set(trained)), f"{case.name}: a file is trained twice: {trained}"
        good_files = good.image_files if case.stream == "images" else good.volume_files
        assert set(case.trained) | set(good_files) <= set(trained), f"{case.name}: not trained on: {trained}"

    findings = observation["findings"]
    for expected in case.expected:
        hits = [f for f in findings if _matches(expected, *f)]
        assert len(hits) == 1, f"{case.name}: check_data did not report {expected} once: {findings}"
    reported_errors = [f for f in findings if f[1] == "error"]
    assert len(reported_errors) == len(case.errors), f"{case.name}: unexpected errors {reported_errors}"
    good_paths = {os.path.abspath(p) for p in (*good.image_files, *good.volume_files)}
    assert not [f for f in findings if os.path.abspath(f[0]) in good_paths], "a good file was reported"


@pytest.mark.parametrize("make", CASES, ids=[make.__name__ for make in CASES])
def test_case_through_the_entry_points(make, workspace: Path, good: GoodData, request):
    if make.__name__ in UNPRIVILEGED_CASES:
        observations = request.getfixturevalue("unprivileged_observations")
        if observations is None:
            pytest.skip("running as root without setpriv/runuser: file permissions cannot be tested")
        case, observation = observations[make.__name__]
    else:
        case = make(workspace / "cases" / make.__name__)
        observation = observe(case, good)
    assert_observation(case, observation, good)


def test_repairs_give_the_documented_values(workspace: Path):
    """The repairs do what the warnings say."""
    folder = workspace / "repairs"
    sixteen = next(make for make in CASES if make.__name__ == "png_16bit")(folder / "png16")
    raw = np.asarray(Image.open(sixteen.trained[0]), dtype=np.float64)
    np.testing.assert_allclose(load_image_2d(sixteen.trained[0]), raw / 4095, atol=1e-6)  # 12 bits -> [0, 1]

    rgba = next(make for make in CASES if make.__name__ == "png_rgba")(folder / "rgba")
    rgba_pixels = np.asarray(Image.open(rgba.trained[0]), dtype=np.float64)
    np.testing.assert_allclose(load_image_2d(rgba.trained[0]), rgba_pixels[..., 0] / 255, atol=1e-5)  # alpha dropped

    short = load_volume(write_nifti(folder / "short.nii.gz", ct_like()[:, :, :5]), in_plane_size=16)
    views, padding = VolumeViews(num_slices=SETTINGS["num_slices"], size=16, seed=0)(short.array)
    assert views.shape[:2] == (2, SETTINGS["num_slices"])
    assert padding.tolist() == [False] * 5 + [True] * 3  # padded at the end, masked

    thick = load_volume(write_nifti(folder / "thick.nii.gz", ct_like(), spacing=(0.5, 0.5, 50.0)))
    assert thick.spacing == (50.0, 0.5, 0.5) and thick.array.shape == (10, 24, 24)  # as stored, not resampled
    one_frame = load_volume(write_nifti(folder / "frame.nii.gz", ct_like()[..., None]))
    assert one_frame.array.shape == (10, 24, 24) and one_frame.notes


def test_resampling_a_huge_spacing_to_a_fine_grid_is_refused_before_allocating(workspace: Path):
    """50 mm slices resampled to 0.01 mm would need ~10**12 voxels: a clear error instead of an out-of-memory."""
    thick = write_nifti(workspace / "resample" / "thick.nii.gz", ct_like(), spacing=(0.5, 0.5, 50.0))
    with pytest.raises(
        BadFileError, match=r"resampling from voxel sizes .* would give .* voxels \(more than 2\*\*31\)"
    ):
        load_volume(thick, target_spacing=(0.01, 0.01, 0.01))
    resampled = load_volume(thick, target_spacing=(10.0, 1.0, 1.0)).array  # a sane target still works
    assert resampled.shape[1:] == (12, 12) and 40 <= resampled.shape[0] <= 50


def test_mutual_symlink_loops_list_each_file_once(workspace: Path):
    """Two folders linking to each other (and to the root) terminate at once with every real file once."""
    root = workspace / "loops"
    image_a, image_b = write_png(root / "a" / "x.png"), write_png(root / "b" / "y.png")
    os.symlink("../b", root / "a" / "to_b")
    os.symlink("../a", root / "b" / "to_a")
    os.symlink("..", root / "a" / "to_root")
    found = [os.path.realpath(r.path) for r in discover_images([root])]
    assert sorted(found) == sorted(map(os.path.realpath, (image_a, image_b)))  # each once, whichever way reached
    volume = write_nifti(root / "b" / "v.nii.gz", ct_like())
    assert [os.path.realpath(r.path) for r in discover_volumes([root])] == [os.path.realpath(volume)]


# ------------------------------------------------------------------------------------------------------------
# `jointssl check-data`
# ------------------------------------------------------------------------------------------------------------


def test_check_data_reports_the_whole_corpus_in_one_pass(workspace: Path, prefix: list[str] | None):
    """One `jointssl check-data --config` run over every case (plus good files): each bad file is named with its
    reason, each repair listed as a warning, nothing else is blamed, and the exit status is 1. (Run as
    `python -m jointssl.check_data`, the command's own module, which spares the subprocess importing the models;
    the `jointssl` dispatch to it is tested below.)"""
    corpus = build_corpus(workspace / "corpus", include_unprivileged=prefix is not None)
    config = workspace / "corpus" / "config.yaml"
    data = {"images": corpus.image_sources, "volumes": corpus.volume_sources, **SETTINGS}
    config.write_text(yaml.safe_dump({"data": {"class_path": "jointssl.data.JointDataModule", "init_args": data}}))
    runner = prefix if prefix is not None else []
    done = run_python(runner, workspace, "-m", "jointssl.check_data", "--config", str(config), "--threads", "2")
    assert done.returncode == EXIT_BAD_FILES, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr

    lines = done.stdout.strip().splitlines()
    summaries = [SUMMARY_LINE.match(line) for line in lines if line.startswith("jointssl check-data:")]
    assert len(summaries) == 1 and summaries[0] is not None and lines[-1].startswith("jointssl check-data:"), lines
    findings = [FINDING_LINE.match(line) for line in lines[:-1]]
    assert all(findings), [line for line, match in zip(lines, findings) if match is None]
    findings = [(m["path"], m["severity"], m["message"]) for m in findings]

    unexplained = list(findings)
    for case in corpus.cases:
        for expected in case.expected:
            hits = [f for f in findings if _matches(expected, *f)]
            assert len(hits) == 1, f"{case.name}: {expected} reported {len(hits)} times"
            unexplained.remove(hits[0])
    assert unexplained == [], f"findings no case expects: {unexplained}"

    summary = summaries[0]
    expected_errors = sum(len(case.errors) for case in corpus.cases)
    warned = {e.path for case in corpus.cases for e in case.expected if e.severity == "warning"}
    assert int(summary["bad"]) == expected_errors
    assert int(summary["warned"]) == len(warned)
    assert int(summary["ignored"]) == sum(e.severity == "ignored" for case in corpus.cases for e in case.expected)
    assert int(summary["checked"]) >= len(corpus.cases) + 4  # every case and the good files
    # the volume manifest's missing file is traced back to its manifest line
    assert any("(listed in" in f[2] and "volumes.csv line 3" in f[2] for f in findings)


def test_check_data_exit_status_clean_bad_and_usage(workspace: Path, good: GoodData, capsys):
    assert run(["--images", good.images, "--volumes", good.volumes, "--threads", "1"]) == EXIT_CLEAN
    output = capsys.readouterr().out
    assert "error:" not in output and "4 files checked (2 images, 2 volumes)" in output  # default settings

    bad = workspace / "exit_status"
    (bad / "empty.png").parent.mkdir(parents=True)
    (bad / "empty.png").write_bytes(b"")
    with pytest.raises(SystemExit) as raised:  # through the `jointssl` command's dispatch
        cli_main(["check-data", "--images", str(bad), good.images])
    assert raised.value.code == EXIT_BAD_FILES
    assert f"{bad / 'empty.png'}: error: empty file (0 bytes)" in capsys.readouterr().out

    for arguments in ([], ["--images", str(workspace / "nowhere")], ["--config", str(workspace / "none.yaml")]):
        with pytest.raises(SystemExit) as raised:
            run(arguments)
        assert raised.value.code == EXIT_USAGE, arguments
        assert "jointssl check-data: error:" in capsys.readouterr().err


def test_check_data_config_uses_training_settings(workspace: Path, good: GoodData, capsys):
    """With --config, the data section's settings decide: num_slices 64 makes the 10-slice good volumes
    'padded' warnings; a synthetic folder not generated yet is noted, not a usage error."""
    config = workspace / "settings.yaml"
    init_args = {
        "volumes": [good.volumes],
        "num_slices": 64,
        "synthetic": {"root": str(workspace / "not_yet"), "num_images": 4},
    }
    config.write_text(yaml.safe_dump({"data": {"class_path": "jointssl.data.JointDataModule", "init_args": init_args}}))
    assert run(["--config", str(config), "--threads", "1"]) == EXIT_CLEAN
    output = capsys.readouterr().out
    assert output.count("fewer than num_slices 64") == 2
    assert "synthetic data not generated yet" in output


def test_check_data_parses_the_config_as_fit_does(workspace: Path, good: GoodData, capsys):
    """A shipped recipe whose sources do not exist here, pointed at other data by dotted overrides, and a config
    whose `data` is a fragment file: check-data reads both as `jointssl fit` would."""
    recipe = REPO_ROOT / "configs" / "pretrain" / "joint_swav.yaml"
    overrides = [f"--data.init_args.images=[{good.images}]", f"--data.init_args.volumes=[{good.volumes}]"]
    assert run(["--config", str(recipe), *overrides, "--data.init_args.num_slices=64", "--threads", "1"]) == EXIT_CLEAN
    output = capsys.readouterr().out
    assert "4 files checked (2 images, 2 volumes)" in output
    assert output.count("fewer than num_slices 64") == 2  # the override reached the load settings

    fragment = workspace / "fragment_data.yaml"
    fragment.write_text(yaml.safe_dump({"class_path": "jointssl.data.JointDataModule", "init_args": {"images": [good.images]}}))
    config = workspace / "with_fragment.yaml"
    config.write_text(f"model:\n  class_path: jointssl.pretrain.JointSSL\ndata: {fragment}\n")
    assert run(["--config", str(config), "--threads", "1"]) == EXIT_CLEAN
    assert "2 files checked (2 images, 0 volumes)" in capsys.readouterr().out

    with pytest.raises(SystemExit) as raised:  # a typo in an override is a usage error naming the option
        run(["--config", str(config), "--data.init_args.volume=[x]"])
    assert raised.value.code == EXIT_USAGE
    assert "volume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:  # fit options without a config
        run(["--images", good.images, "--data.init_args.num_slices=4"])
    assert raised.value.code == EXIT_USAGE
