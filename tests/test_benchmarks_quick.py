"""The scaling benchmark runs end to end at tiny shapes (benchmarks/bench_scaling.py --quick), and its fits are right."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

bench_scaling = pytest.importorskip("bench_scaling")


def test_fit_recovers_the_exponent_and_the_line() -> None:
    ns = [16, 32, 64, 128]
    quadratic = bench_scaling.fit(ns, [2e-4 * n**2 for n in ns])
    assert quadratic["exponent"] == pytest.approx(2.0) and quadratic["exponent_last_two"] == pytest.approx(2.0)
    line = bench_scaling.fit(ns, [0.5 + 0.01 * n for n in ns])
    assert line["intercept"] == pytest.approx(0.5) and line["per_slice"] == pytest.approx(0.01)
    assert line["linear_max_rel_error"] == pytest.approx(0.0, abs=1e-9)


def test_quick_slices_run_times_every_variant(tmp_path: Path) -> None:
    output = tmp_path / "scaling.json"
    result = bench_scaling.main(["--quick", "--skip-memory", "--slices", "4", "8", "--agg-slices", "16",
                                 "--output", str(output), "--plot", "--plot-dir", str(tmp_path)])
    medians = result["slices"]["time_median_s"]["cpu"]
    assert set(medians["joint"]) == set(medians["joint ckpt"]) == {4, 8}
    assert set(medians["deformable"]) == set(medians["sdpa"]) == {4, 8, 16}
    assert "wall sdpa all N" in result["slices"]["fits"]
    assert output.exists() and (tmp_path / "scaling_slices.png").exists()
