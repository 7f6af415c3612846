"""Shared test fixtures: paths to the real reference data, and isolation of distributed env variables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The reference data lives beside the checkout (../shared/data); users' machines do not have it.
SHARED_DATA = Path(os.environ.get("JOINTSSL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# One intra-op thread: tiny test models gain nothing from a second one, and on 2 cores shared with DataLoader
# workers and DDP ranks a 2-thread OpenMP team waits at every barrier for a descheduled thread (measured: a
# test_resnet step at 32 px took 2 s with 2 threads, 9 ms with 1, on a busy machine).
torch.set_num_threads(1)

# The tiny pretraining checkpoint of the downstream tests, built once per session.
pytest_plugins = ["tests.downstream_fixtures"]


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the calling test when it is absent (as on a user's machine)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not available: {path}")
    return path


@pytest.fixture(autouse=True)
def _restore_environ():
    """Lightning's DDP launchers write MASTER_PORT, LOCAL_RANK, ... into os.environ; a later DDP test would then
    fail with 'address in use' or think it is a child rank."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
