"""requirements.lock: every dependency of pyproject.toml pinned with its hashes, and what make installs from."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def _lock_entries() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes), from the lock file's requirement blocks (a line each, continued by '\\')."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    for raw in LOCK.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            current = None if not line else current
            continue
        m = PIN.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            entries[current] = (m.group(2).rstrip(" \\"), [])
            continue
        if line.startswith("--hash=") and current is not None:
            entries[current][1].append(line.split("=", 1)[1].rstrip(" \\"))
    return entries


def _project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_every_dependency_is_pinned_in_the_lock_at_a_version_pyproject_allows():
    entries = _lock_entries()
    problems = []
    for req in _project_requirements():
        name = canonicalize_name(req.name)
        if name not in entries:
            problems.append(f"{req.name} is not in requirements.lock")
            continue
        version = Version(entries[name][0])
        # a local build (torch 2.13.0+cpu) satisfies an exact pin of its public version
        if not (req.specifier.contains(version, prereleases=True) or req.specifier.contains(version.public)):
            problems.append(f"{req.name}: the lock pins {version}, pyproject.toml asks for {req.specifier}")
    assert not problems, "requirements.lock is stale (run `make lock`):\n  " + "\n  ".join(problems)


def test_every_pinned_package_carries_a_sha256_and_no_machine_paths():
    entries = _lock_entries()
    assert len(entries) > 50  # the whole environment, not only the direct dependencies
    for name, (_version, hashes) in entries.items():
        assert hashes, f"{name} has no hash in requirements.lock"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name
    text = LOCK.read_text()
    assert "file://" not in text and "--index-url" not in text and "--find-links" not in text


def test_make_installs_from_the_lock_with_hashes_required():
    makefile = (ROOT / "Makefile").read_text()
    stamp_rule = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "requirements.lock" in stamp_rule.splitlines()[0]  # a changed lock reinstalls
    assert "--require-hashes -r requirements.lock" in stamp_rule
    assert "--no-deps -e ." in stamp_rule  # nothing unpinned comes in with the project itself
