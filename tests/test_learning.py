"""The demo learns: `make demo`'s configuration ends with L_intra and L_inter below chance and L_mask above the
visible slices' mean (the diagnostics of jointssl.diagnostics, logged by JointSSL at the logging interval), and
L_mask no worse than neighbour interpolation. Several minutes on 2 CPU cores: slow."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

#: What "beats its trivial baseline by a clear margin" means here, on the mean of the last quarter of the logged
#: values: clustering losses at most this fraction of ln K (1 = chance) ...
MAX_LOSS_OVER_CHANCE = 0.9
#: ... and masked-slice predictions explaining at least this share of what the visible slices' mean leaves.
MIN_MASK_R2_VS_MEAN = 0.3


def last_quarter_mean(rows: list[dict[str, str]], key: str) -> float:
    values = [float(row[key]) for row in rows if row.get(key)]
    assert values, f"{key} was never logged"
    tail = values[-max(1, len(values) // 4):]
    return sum(tail) / len(tail)


@pytest.mark.slow
def test_demo_losses_end_below_their_trivial_baselines(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "jointssl"
    result = subprocess.run(
        [str(script), "fit", "--config", str(REPO_ROOT / "configs" / "demo.yaml"),
         "--trainer.enable_progress_bar=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = next((tmp_path / "runs" / "demo" / "logs").glob("version_*/metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    intra = last_quarter_mean(rows, "train/intra_loss_over_chance")
    inter = last_quarter_mean(rows, "train/inter_loss_over_chance")
    mask_vs_mean = last_quarter_mean(rows, "train/mask_r2_vs_mean")
    mask_vs_neighbours = last_quarter_mean(rows, "train/mask_r2_vs_neighbours")
    summary = f"intra {intra:.3f}, inter {inter:.3f} of ln K; mask R^2 {mask_vs_mean:.3f} / {mask_vs_neighbours:.3f}"
    assert intra < MAX_LOSS_OVER_CHANCE, summary
    assert inter < MAX_LOSS_OVER_CHANCE, summary
    assert mask_vs_mean > MIN_MASK_R2_VS_MEAN, summary
    # The prediction starts from the neighbour interpolation and, on these smooth synthetic volumes, ends about
    # level with it (+0.013 in the run of docs/results.md): no margin is claimed, only that it is not made worse.
    assert mask_vs_neighbours > -0.05, summary
