"""`jointssl export` and pretrained loading: round trips, timm-only loading of the backbone, refusal of unsafe or
wrong-kind files, atomic writes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from safetensors.torch import load_file

from jointssl.cli import main as cli_main
from jointssl.downstream import (
    ExportError,
    ImageClassifier,
    PretrainedLoadError,
    export_pretrained,
    load_pretrained,
)
from jointssl.downstream import export as export_module
from jointssl.downstream.export import BACKBONE_WEIGHTS, timm_backbone_kwargs, timm_key_map
from jointssl.downstream.pretrained import EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_VERSION, EXPORT_WEIGHTS
from jointssl.models import SliceEncoder


def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


@pytest.fixture(scope="module")
def exported(pretrained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "encoders"
    export_pretrained(pretrained_checkpoint, folder)
    return folder


def test_export_round_trip_keeps_every_tensor(pretrained_checkpoint: Path, exported: Path) -> None:
    state = checkpoint_state(pretrained_checkpoint)
    expected = {k: v for k, v in state.items() if k.startswith(("encoder.", "aggregator."))}
    assert_same_tensors(load_file(str(exported / EXPORT_WEIGHTS)), expected)
    config = json.loads((exported / EXPORT_CONFIG).read_text())
    assert (config["format"], config["version"]) == (EXPORT_FORMAT, EXPORT_VERSION)
    from_folder, from_checkpoint = load_pretrained(exported), load_pretrained(pretrained_checkpoint)
    assert from_folder.architecture == from_checkpoint.architecture
    assert from_folder.architecture["backbone"] == "test_resnet" and from_folder.architecture["d_model"] == 32
    assert_same_tensors(from_folder.encoder, from_checkpoint.encoder)
    assert_same_tensors(from_folder.aggregator, from_checkpoint.aggregator)
    # The exported aggregator rebuilds f_inter exactly as well.
    aggregator = from_folder.slice_aggregator().state_dict()
    assert_same_tensors(aggregator, {k[len("aggregator."):]: v for k, v in expected.items() if k.startswith("aggregator.")})
    assert not list(exported.glob("*.tmp")) and not list(exported.glob(".*"))  # no temporary file left behind


@pytest.mark.parametrize("source", ["folder", "checkpoint"])
def test_classifier_encoder_equals_pretrained_encoder(
    source: str, pretrained_checkpoint: Path, exported: Path
) -> None:
    path = exported if source == "folder" else pretrained_checkpoint
    # backbone / d_model are ignored: the architecture comes from the pretrained file.
    model = ImageClassifier(num_classes=2, task="binary", pretrained=str(path), backbone="resnet18", d_model=7)
    assert (model.hparams.backbone, model.hparams.d_model) == ("test_resnet", 32)
    expected = {k[len("encoder."):]: v for k, v in checkpoint_state(pretrained_checkpoint).items()
                if k.startswith("encoder.")}
    assert_same_tensors(model.encoder.state_dict(), expected)


TIMM_ONLY_SCRIPT = r"""
import socket, sys
import torch, timm
from safetensors.torch import save_file

def no_network(*args, **kwargs):
    raise RuntimeError("network access attempted")

socket.socket = no_network  # every download path of timm / huggingface_hub opens a socket
socket.create_connection = no_network
weights, images, output = sys.argv[1:4]
model = timm.create_model("test_resnet", pretrained=True, in_chans=1, num_classes=0,
                          pretrained_cfg_overlay=dict(file=weights, num_classes=0))
model.eval()
with torch.no_grad():
    features = model.forward_features(torch.load(images, weights_only=True))
assert not any(name.startswith("jointssl") for name in sys.modules), "jointssl was imported"
save_file({**{"state." + k: v.contiguous() for k, v in model.state_dict().items()}, "features": features}, output)
"""


def test_backbone_loads_in_timm_without_jointssl(pretrained_checkpoint: Path, exported: Path, tmp_path: Path) -> None:
    images = torch.randn(3, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    torch.save(images, tmp_path / "images.pt")
    script = tmp_path / "timm_only.py"
    script.write_text(TIMM_ONLY_SCRIPT)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(script), str(exported / BACKBONE_WEIGHTS), str(tmp_path / "images.pt"),
         str(tmp_path / "out.safetensors")],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = load_file(str(tmp_path / "out.safetensors"))
    timm_state = {k[len("state."):]: v for k, v in out.items() if k.startswith("state.")}

    encoder = load_pretrained(pretrained_checkpoint).slice_encoder().eval()
    feature_state = encoder.backbone.state_dict()
    # Tensor by tensor: the same count, and each f_intra backbone tensor under its timm name (test_resnet's
    # wrapper keeps timm's names, so the names are equal too).
    assert_same_tensors(timm_state, feature_state)
    with torch.no_grad():
        expected_features = encoder.backbone(images)[-1]  # the deepest stage = timm's forward_features
    assert torch.allclose(out["features"], expected_features, atol=1e-5, rtol=1e-5)
    # The helper gives the same create_model arguments as the documented call.
    kwargs = timm_backbone_kwargs(exported)
    assert kwargs["model_name"] == "test_resnet" and kwargs["pretrained_cfg_overlay"]["file"].endswith(BACKBONE_WEIGHTS)


def test_key_map_renames_flattened_stages_and_reports_unused_timm_layers() -> None:
    encoder = SliceEncoder(backbone="test_efficientnet", d_model=8)
    feature_state = encoder.backbone.state_dict()
    key_map, timm_only = timm_key_map("test_efficientnet", feature_state)
    assert len(key_map) == len(feature_state) and len(set(key_map.values())) == len(feature_state)
    assert "conv_head.weight" in timm_only  # after the last feature stage: not trained by jointssl
    import timm

    plain = timm.create_model("test_efficientnet", in_chans=1, num_classes=0).state_dict()
    for source, target in key_map.items():
        assert plain[target].shape == feature_state[source].shape


class WritesMarkerWhenUnpickled:
    """Unpickling calls open(marker, "w"): a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_object_in_checkpoint_is_refused_without_running_it(
    pretrained_checkpoint: Path, tmp_path: Path
) -> None:
    checkpoint = torch.load(pretrained_checkpoint, map_location="cpu", weights_only=True)
    # The payload works: a full unpickle of such a file does create its marker.
    probe_marker = tmp_path / "probe_marker"
    torch.save({"payload": WritesMarkerWhenUnpickled(probe_marker)}, tmp_path / "probe.ckpt")
    torch.load(tmp_path / "probe.ckpt", weights_only=False)
    assert probe_marker.exists()

    marker = tmp_path / "marker"
    checkpoint["payload"] = WritesMarkerWhenUnpickled(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(checkpoint, evil)
    with pytest.raises(PretrainedLoadError, match="refused"):
        load_pretrained(evil)
    with pytest.raises(PretrainedLoadError, match="refused"):
        ImageClassifier(num_classes=2, pretrained=str(evil))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--checkpoint", str(evil), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert not marker.exists()
    assert not (tmp_path / "out" / EXPORT_WEIGHTS).exists()


def test_wrong_kinds_of_checkpoint_are_refused(pretrained_checkpoint: Path, tmp_path: Path) -> None:
    state_dict = tmp_path / "plain_state_dict.pt"
    torch.save(checkpoint_state(pretrained_checkpoint), state_dict)
    with pytest.raises(PretrainedLoadError, match="not a jointssl pretraining checkpoint"):
        load_pretrained(state_dict)

    # A downstream (classifier) checkpoint holds encoder.* tensors too, but is not a pretraining checkpoint.
    classifier = ImageClassifier(num_classes=2, pretrained=str(pretrained_checkpoint))
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.strategy.connect(classifier)
    downstream = tmp_path / "classifier.ckpt"
    trainer.save_checkpoint(downstream)
    with pytest.raises(PretrainedLoadError, match="not a jointssl pretraining checkpoint"):
        load_pretrained(downstream)
    with pytest.raises(PretrainedLoadError, match="not a jointssl pretraining checkpoint"):
        export_pretrained(downstream, tmp_path / "out")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / EXPORT_WEIGHTS).write_bytes(b"")
    (foreign / EXPORT_CONFIG).write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(PretrainedLoadError, match="expected 'jointssl-encoders'"):
        load_pretrained(foreign)
    with pytest.raises(PretrainedLoadError, match="not found"):
        load_pretrained(tmp_path / "missing.ckpt")


def test_export_is_atomic_and_does_not_overwrite_by_default(
    pretrained_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "export"
    export_pretrained(pretrained_checkpoint, folder)
    before = {name: (folder / name).read_bytes() for name in (EXPORT_WEIGHTS, BACKBONE_WEIGHTS, EXPORT_CONFIG)}
    with pytest.raises(ExportError, match="already holds"):
        export_pretrained(pretrained_checkpoint, folder)

    def fail_midway(state, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        export_pretrained(pretrained_checkpoint, folder, overwrite=True)
    # The previous export is intact and no partial or temporary file remains.
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)
    monkeypatch.undo()

    fresh = tmp_path / "fresh"
    monkeypatch.setattr(export_module, "save_file", fail_midway)
    with pytest.raises(OSError):
        export_pretrained(pretrained_checkpoint, fresh)
    assert list(fresh.iterdir()) == []


def test_cli_export_writes_the_folder(pretrained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "cli_export"
    cli_main(["export", "--checkpoint", str(pretrained_checkpoint), "--output", str(folder)])
    assert "exported" in capsys.readouterr().out
    assert_same_tensors(load_pretrained(folder).encoder, load_pretrained(pretrained_checkpoint).encoder)
    with pytest.raises(SystemExit) as exit_info:  # an existing export needs --overwrite
        cli_main(["export", "--checkpoint", str(pretrained_checkpoint), "--output", str(folder)])
    assert exit_info.value.code == 2
    cli_main(["export", "--checkpoint", str(pretrained_checkpoint), "--output", str(folder), "--overwrite"])


def test_jointssl_help_lists_export(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "export"):
        assert command in listed
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert "--checkpoint" in usage and "--output" in usage


def test_export_files_get_the_umask_mode_not_mkstemps_private_one(pretrained_checkpoint: Path, tmp_path: Path) -> None:
    # A shared cluster: colleagues in the group must be able to read an export (mkstemp alone gives 0600).
    previous = os.umask(0o027)
    try:
        export_pretrained(pretrained_checkpoint, tmp_path / "export")
    finally:
        os.umask(previous)
    for name in (EXPORT_WEIGHTS, BACKBONE_WEIGHTS, EXPORT_CONFIG):
        assert stat.S_IMODE((tmp_path / "export" / name).stat().st_mode) == 0o640, name
