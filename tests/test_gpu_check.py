"""benchmarks/gpu_check.py: the dry run (CPU, tiny shapes) runs every variant of the GPU run end to end and prints
its fields; without CUDA and without --dry-run it stops with a clear message."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)
    spec.loader.exec_module(module)
    return module


def _fields(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split()[1:])


def test_dry_run_prints_every_variant_with_its_fields(capsys) -> None:
    gpu_check = _gpu_check()
    torch.set_num_threads(1)
    # The dry run's default variants are the GPU run's; two of them here (eager bf16 and everything on) keep the
    # test short: each variant builds a model and, compiled, traces it again.
    assert gpu_check.parse_args(["--dry-run"]).variants == gpu_check.REFERENCE["variants"]
    variants = ["bf16", "bf16+channels_last+compile"]
    assert gpu_check.main(["--dry-run", "--peak-tflops", "0.002", "--variants", *variants]) == 0
    out = capsys.readouterr().out
    flops = re.search(r"model ([0-9.e+-]+) TFLOP, recomputation of checkpointed chunks ([0-9.e+-]+) TFLOP", out)
    assert flops, out
    model_tflop, recompute_tflop = map(float, flops.groups())
    # Chunks of 4 with checkpointing: f_intra's forward runs again in backward, about a third of its FLOPs.
    assert 0 < recompute_tflop < model_tflop
    results = [_fields(line) for line in out.splitlines() if line.startswith("RESULT ")]
    assert [r["variant"] for r in results] == variants
    for r in results:
        step_s = float(r["step_ms"]) / 1000
        # 4 images x (2 + 2 crops) + 2 volumes x 2 views x 8 slices through f_intra per step.
        assert float(r["images_per_s"]) == pytest.approx(48 / step_s, rel=0.01)
        assert float(r["model_tflops_per_s"]) == pytest.approx(model_tflop / step_s, rel=0.01)
        assert float(r["mfu"]) == pytest.approx(model_tflop / step_s / 0.002, rel=0.01)
        assert r["peak_memory_mib"] == "n/a"  # CPU: torch.cuda.max_memory_allocated does not apply
        assert r["finite"] == "True"
    summary = [line for line in out.splitlines() if line.startswith("SUMMARY ")]
    assert len(summary) == 1 and "fastest:" in summary[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_2(capsys) -> None:
    assert _gpu_check().main([]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_a_misspelt_variant_is_refused() -> None:
    with pytest.raises(SystemExit):
        _gpu_check().parse_args(["--dry-run", "--variants", "bf16+channel_last"])
