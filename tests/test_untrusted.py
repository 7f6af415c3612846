"""Untrusted files never run code: every `torch.load` in the package reads tensors only, and a checkpoint carrying
a pickled payload is refused by every loading entry point of the pretraining side (the downstream ones are covered
in test_export.py) without the payload running."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from jointssl.checkpointing import AtomicCheckpointIO
from jointssl.pretrain import JointSSL
from jointssl.tracking import run_id_from_checkpoint
from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "jointssl"
TINY_MODEL = dict(backbone="test_resnet", d_model=32, projection_hidden_dim=64, projection_dim=16,
                  num_prototypes=[10], num_prototypes_3d=[4], aggregator_layers=1, aggregator_heads=4,
                  aggregator_ffn_dim=32)


class WritesMarkerWhenUnpickled:
    """Unpickling calls open(marker, "w"): a stand-in for arbitrary code hidden in a downloaded checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def scan_source(source: str, where: str) -> tuple[int, list[str]]:
    """The number of torch.load calls in a module's source, and every way it may unpickle arbitrary input."""
    tree = ast.parse(source, where)
    loads, problems = 0, []
    for call in _calls(tree):
        name = _dotted(call.func)
        at = f"{where}:{call.lineno}"
        weights_only = _keyword(call, "weights_only")
        imported_load = name == "load" and "from torch import load" in source
        if name in ("torch.load", "torch.serialization.load") or imported_load:
            loads += 1
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                problems.append(f"{at}: torch.load without weights_only=True")
        elif (
            weights_only is not None
            and ("load" in name.rsplit(".", 1)[-1].lower() or name.endswith("Dataset"))
            and not (isinstance(weights_only, ast.Constant) and weights_only.value is True)
        ):  # other readers taking the flag: Lightning's load_checkpoint, MONAI's PersistentDataset, ...
            problems.append(f"{at}: {name}(weights_only=...) not True")
        if name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load", "eval", "exec"):
            problems.append(f"{at}: {name}() runs or unpickles arbitrary input")
        if name in ("np.load", "numpy.load"):
            allow = _keyword(call, "allow_pickle")
            if not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"{at}: np.load without allow_pickle=False")
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            problems.append(f"{at}: {name}() can build arbitrary objects")
    # `torch.load` used other than by calling it (e.g. handed on as a function) would escape the checks above.
    called = {id(call.func) for call in _calls(tree)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _dotted(node) == "torch.load" and id(node) not in called:
            problems.append(f"{where}:{node.lineno}: torch.load used but not called")
    return loads, problems


def test_the_scan_finds_unsafe_loads():
    source = (
        "import torch, pickle\n"
        "a = torch.load(p)\n"
        "b = torch.load(p, weights_only=False)\n"
        "c = torch.load(p, weights_only=True)\n"
        "d = pickle.loads(blob)\n"
        "reader = torch.load\n"
        "e = eval(text)\n"
    )
    loads, problems = scan_source(source, "example.py")
    assert loads == 3
    assert [problem.split(": ", 1)[0] for problem in problems] == [
        "example.py:2", "example.py:3", "example.py:5", "example.py:7", "example.py:6",
    ]


def test_every_torch_load_in_the_package_reads_tensors_only():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    loads, problems = 0, []
    for path in files:
        found, issues = scan_source(path.read_text(), str(path.relative_to(REPO_ROOT)))
        loads, problems = loads + found, problems + issues
    assert loads >= 4, f"found only {loads} torch.load calls: the scan is broken"
    assert not problems, "\n".join(problems)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "payload_ran"


def evil_checkpoint(tmp_path: Path, marker: Path) -> Path:
    """A checkpoint with everything a JointSSL checkpoint has (weights, format version) plus a payload."""
    model = JointSSL(**TINY_MODEL)
    checkpoint = {
        "state_dict": model.state_dict(), "jointssl_format_version": 1, "global_step": 3, "epoch": 0,
        "pytorch-lightning_version": "2.6.6", "payload": WritesMarkerWhenUnpickled(marker),
    }
    path = tmp_path / "evil.ckpt"
    torch.save(checkpoint, path)
    # The payload works: unpickling the file for real runs it (then the marker is removed again).
    probe = tmp_path / "probe.ckpt"
    torch.save({"payload": WritesMarkerWhenUnpickled(marker)}, probe)
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path


def test_init_from_refuses_a_pickled_payload(tmp_path: Path, marker: Path):
    evil = evil_checkpoint(tmp_path, marker)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
        JointSSL(**TINY_MODEL, init_from=str(evil))
    assert not marker.exists()


def test_trainer_resume_through_atomic_checkpoint_io_refuses_a_pickled_payload(tmp_path: Path, marker: Path):
    evil = evil_checkpoint(tmp_path, marker)
    for weights_only in (None, False):  # asking Lightning to unpickle everything is refused too
        trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()])
        with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
            trainer.fit(BoringModel(), ckpt_path=str(evil), weights_only=weights_only)
        assert not marker.exists()


def test_wandb_run_id_lookup_refuses_a_pickled_payload(tmp_path: Path, marker: Path):
    evil = evil_checkpoint(tmp_path, marker)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
        run_id_from_checkpoint(evil)
    assert not marker.exists()


def test_console_fit_refuses_a_pickled_checkpoint(tmp_path: Path, marker: Path):
    """`jointssl fit --ckpt_path evil.ckpt`, as a user resuming from a downloaded file would run it."""
    evil = evil_checkpoint(tmp_path, marker)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "plugins": [{"class_path": "jointssl.checkpointing.AtomicCheckpointIO"}]},
        "model": {"class_path": "jointssl.pretrain.JointSSL", "init_args": TINY_MODEL},
        "data": {"class_path": "jointssl.data.JointDataModule",
                 "init_args": {"synthetic": {"root": str(tmp_path / "data"), "num_images": 16, "image_size": 40},
                               "batch_size": 8, "num_workers": 0, "global_crop_size": 32,
                               "local_crop_size": 16}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "jointssl"), "fit", "--config", str(path), "--ckpt_path", str(evil)],
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    # Issue 14: one message naming the file and the refused object, not torch's weights_only=False advice.
    assert "holds a pickled Python object" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()  # nothing was trained from it


def test_poisoned_volume_cache_file_is_recomputed_not_unpickled(tmp_path: Path, marker: Path, caplog):
    """The disk cache of decoded volumes is read back with weights_only=True: a cache file replaced by a pickle
    payload is discarded and recomputed."""
    from jointssl.data import SyntheticData, generate_synthetic_data
    from jointssl.data.volume_datasets import CachedVolumes
    from jointssl.data.discovery import discover_volumes

    synthetic = SyntheticData(root=str(tmp_path / "data"), num_images=0, num_volumes=1, volume_shape=(24, 24, 6))
    generate_synthetic_data(synthetic)
    records = discover_volumes([str(synthetic.volumes_dir)])
    volumes = CachedVolumes(records, cache="disk", cache_dir=tmp_path / "cache")
    expected = volumes[0]["volume"].clone()
    (cached,) = list((tmp_path / "cache").rglob("*.pt"))
    torch.save({"volume": WritesMarkerWhenUnpickled(marker)}, cached)
    with caplog.at_level("WARNING", logger="jointssl.data"):
        again = CachedVolumes(records, cache="disk", cache_dir=tmp_path / "cache")[0]["volume"]
    assert f"volume cache entry {cached}" in caplog.text and "holds pickled Python objects" in caplog.text
    assert torch.equal(again, expected)
    assert not marker.exists()
