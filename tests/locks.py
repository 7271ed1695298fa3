"""The pins in requirements/ (made by scripts/lock) and the installed distributions they must match.

A lock is a pip constraints file: one `name==version` line per distribution, with a `python_version`
marker where the tested Pythons install different versions (or only some of them install it). Here the
lines whose markers hold on the running interpreter are the lock, and an install is what a project
requirement pulls in from the installed distributions, followed transitively with markers and extras.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import tomllib
from pathlib import Path
from typing import Any, Final

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT: Final = Path(__file__).resolve().parents[1]
SERVICE_LOCK: Final = ROOT / "requirements" / "service.txt"
DEV_LOCK: Final = ROOT / "requirements" / "dev.txt"
PROJECT: Final = "trio-shard-gateway"
#: What to do when a lock and an install disagree.
RELOCK: Final = "the lock is stale: run scripts/lock and commit requirements/"


def project_metadata() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        project: dict[str, Any] = tomllib.load(file)["project"]
    return project


def supported_pythons() -> list[str]:
    """The `3.X` of pyproject's `Programming Language :: Python :: 3.X` classifiers: what .ci/run tests
    (scripts/pythons reads the same lines) and what scripts/lock pins for."""
    classifiers: list[str] = project_metadata()["classifiers"]
    return [
        m[1] for c in classifiers if (m := re.fullmatch(r"Programming Language :: Python :: (3\.\d+)", c))
    ]


def read_pins(path: Path) -> dict[str, str]:
    """The `==` pins of a constraints file that apply to this interpreter, by canonical name."""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{path.name}: {line!r} is not an exact pin"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{path.name}: two pins for {name} apply here"
        pins[name] = specifier.version
    return pins


def installed_closure(requirements: list[str]) -> list[metadata.Distribution]:
    """The installed distributions `requirements` need, transitively, markers and extras applied."""
    installed = {canonicalize_name(dist.metadata["Name"]): dist for dist in metadata.distributions()}
    needed: dict[str, metadata.Distribution] = {}
    pending: list[tuple[Requirement, frozenset[str]]] = [
        (Requirement(text), frozenset()) for text in requirements
    ]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement, parent_extras = pending.pop()
        if requirement.marker is not None and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in (parent_extras or {""})
        ):
            continue
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = installed.get(name)
        assert dist is not None, f"{requirement} is required but not installed in the test environment"
        assert requirement.specifier.contains(dist.version, prereleases=True), (
            f"{requirement}: the test environment has {dist.version}"
        )
        needed[name] = dist
        extras = frozenset(requirement.extras)
        pending.extend((Requirement(text), extras) for text in dist.requires or [])
    return list(needed.values())


def versions(dists: list[metadata.Distribution]) -> dict[str, str]:
    """`dists` by canonical name, the project itself left out (it is installed from the checkout)."""
    found: dict[str, str] = {canonicalize_name(dist.metadata["Name"]): dist.version for dist in dists}
    found.pop(PROJECT, None)
    return found
