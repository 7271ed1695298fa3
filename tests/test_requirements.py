"""The Pythons we support and the locks we install with agree with pyproject.toml and with this venv.

.ci/run runs the suite on every tested Python in a venv made by `scripts/bootstrap --dev --fresh`, so on
each the dev install must be exactly requirements/dev.txt's pins for that Python: a dependency added to (or
dropped from) pyproject.toml without `scripts/lock` fails here, not in a user's install.
"""

from __future__ import annotations

import platform

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from .locks import (
    DEV_LOCK,
    PROJECT,
    RELOCK,
    SERVICE_LOCK,
    installed_closure,
    project_metadata,
    read_pins,
    supported_pythons,
    versions,
)


def test_requires_python_admits_exactly_the_supported_pythons() -> None:
    tested = supported_pythons()
    assert tested == sorted(tested, key=lambda v: tuple(map(int, v.split(".")))) and tested
    requires = SpecifierSet(project_metadata()["requires-python"])
    for minor in range(8, 20):
        version = f"3.{minor}"
        assert all(requires.contains(f"{version}.{patch}") for patch in (0, 99)) == (version in tested), (
            f"requires-python {requires} and the classifiers disagree about {version}"
        )
    assert ".".join(platform.python_version_tuple()[:2]) in tested


def test_this_venv_is_the_dev_lock() -> None:
    installed = versions(installed_closure([f"{PROJECT}[dev]"]))
    pins = read_pins(DEV_LOCK)
    pins.pop("pip")  # pinned for scripts/bootstrap, required by nothing
    assert installed == pins, RELOCK


def test_the_service_lock_is_the_service_install_at_the_dev_versions() -> None:
    service = read_pins(SERVICE_LOCK)
    dev = read_pins(DEV_LOCK)
    assert {name: dev.get(name) for name in service} == service, "switching extras must change no version"
    service.pop("pip")
    assert versions(installed_closure([PROJECT])) == service, RELOCK


def test_the_locks_pin_what_pyproject_declares() -> None:
    dev = read_pins(DEV_LOCK)
    declared = [*project_metadata()["dependencies"], *project_metadata()["optional-dependencies"]["dev"]]
    for text in declared:
        name = canonicalize_name(Requirement(text).name)
        if name != PROJECT:
            assert name in dev, f"{name} is declared but not pinned: {RELOCK}"
