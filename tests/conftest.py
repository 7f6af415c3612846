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


ERRORS_DOC = REPO_ROOT / "docs" / "errors.md"


def documented_messages() -> dict[str, str]:
    """docs/errors.md's tables: case -> the "what you see" cell (backticks removed)."""
    messages: dict[str, str] = {}
    for line in ERRORS_DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0] != "case":
            messages[cells[0].strip("`")] = cells[2].replace("`", "")
    return messages


def assert_documented(case: str, message: str) -> None:
    """`message` (what the user saw) matches docs/errors.md's row `case`: its text literally, `<...>` as any text.
    Keeps the user-facing table true; tests/test_errors_doc.py checks that every row has such a test."""
    import re

    documented = documented_messages()[case]
    pattern = ".*?".join(re.escape(part) for part in re.split(r"<[^<>]*>", documented))
    assert re.search(pattern, message, re.DOTALL), f"docs/errors.md `{case}` says {documented!r}; got {message!r}"
