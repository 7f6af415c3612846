"""The project stands alone: what a user reads or runs (README, docs, configs, the package, scripts, build files)
names no path outside the repository, so that a clone with nothing beside it is complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# A relative path that climbs with "..": taken relative to the file (Markdown links) and to the repository root
# (commands are run from there); it must name something that exists inside the repository from one of the two.
PARENT_PATH = re.compile(r"(?<![\w.~/])((?:\.\./)+[\w$.{}/-]*)")
# Absolute paths of a particular machine (the developers', a cluster's home directories).
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home|Users|root|mnt|scratch)/[\w.-]+")


def user_facing_files() -> list[Path]:
    files = [REPO_ROOT / "README.md", REPO_ROOT / "pyproject.toml", REPO_ROOT / "Makefile", REPO_ROOT / ".ci" / "run"]
    files += sorted((REPO_ROOT / "docs").rglob("*.md"))
    files += sorted((REPO_ROOT / "configs").rglob("*.yaml"))
    files += sorted((REPO_ROOT / "jointssl").rglob("*.py"))
    files += sorted(p for p in (REPO_ROOT / "scripts").rglob("*") if p.is_file())
    return [p for p in files if p.is_file()]


def paths_outside_repository(text: str, file: Path, root: Path = REPO_ROOT) -> list[str]:
    """Every path in ``text`` (the contents of ``file``) that points outside ``root`` or at a machine's own folders."""
    root = root.resolve()
    found = [m.group(0) for m in MACHINE_PATH.finditer(text)]
    for match in PARENT_PATH.finditer(text):
        relative = match.group(1).rstrip(".,;:)")
        inside = False
        for base in (file.parent, root):
            target = (base / relative).resolve()
            if target.is_relative_to(root) and target.exists():
                inside = True
        if not inside:
            found.append(relative)
    return found


def test_the_scan_finds_outside_paths(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("x")
    doc = tmp_path / "docs" / "page.md"
    text = "see [readme](../README.md), data in ../shared/data, notes in ../../x.md, home /work/shared/a, ok /tmp/x"
    assert paths_outside_repository(text, doc, root=tmp_path) == ["/work/shared", "../shared/data", "../../x.md"]
    assert paths_outside_repository("see [readme](../README.md) and runs/demo", doc, root=tmp_path) == []


@pytest.mark.parametrize("file", user_facing_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_path_outside_the_repository(file: Path) -> None:
    outside = paths_outside_repository(file.read_text(errors="replace"), file)
    assert not outside, f"{file.relative_to(REPO_ROOT)} names paths outside the repository: {outside}"


def test_constraints_pin_versions_pyproject_allows() -> None:
    """constraints.txt (what make install applies) pins every declared dependency, inside pyproject's bounds."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        if name == "jointssl":  # an extra that includes another extra
            continue
        assert name in pins, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {requirement}"
