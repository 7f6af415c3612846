"""docs/errors.md stays true: every documented case is asserted by a test (tests.conftest.assert_documented), and
every case a test asserts is documented."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT, documented_messages


def asserted_cases() -> set[str]:
    cases: set[str] = set()
    for path in (REPO_ROOT / "tests").glob("*.py"):
        cases |= set(re.findall(r"assert_documented\(\s*\"([^\"]+)\"", path.read_text()))
    return cases


def test_every_documented_case_is_asserted_by_a_test() -> None:
    missing = set(documented_messages()) - asserted_cases()
    assert not missing, f"docs/errors.md rows without a test: {sorted(missing)}"


def test_every_asserted_case_is_documented() -> None:
    undocumented = asserted_cases() - set(documented_messages())
    assert not undocumented, f"tests assert cases docs/errors.md lacks: {sorted(undocumented)}"
