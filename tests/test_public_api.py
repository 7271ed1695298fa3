"""The curated public API of the service's packages: pinned, so a change to it is a deliberate one.

(`ratelimit`'s own is pinned in tests/ratelimit/test_public_api.py.)
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import supervisor
import workers

ROOT = Path(__file__).resolve().parents[1]


def test_workers_exports() -> None:
    assert sorted(workers.__all__) == [
        "CommandRejected",
        "CommandTooLarge",
        "ConfigError",
        "ExitStatus",
        "FatalCloseCode",
        "ProtocolError",
        "PublishError",
        "SETTINGS",
        "SessionStoreError",
        "Settings",
        "ShardAssignment",
        "TransportError",
        "WorkerConfig",
        "WorkerError",
    ]


def test_supervisor_exports() -> None:
    assert sorted(supervisor.__all__) == ["SupervisorError", "load_settings", "main"]


@pytest.mark.parametrize("package", ["workers", "supervisor", "ratelimit", "benchmarks"])
def test_the_package_is_typed_and_every_module_exports_what_it_names(package: str) -> None:
    assert (ROOT / package / "py.typed").is_file()
    for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
        if info.name.endswith("__main__") or info.name.startswith("benchmarks.peers"):
            continue  # running them is their import; peers need optional clients
        if info.name == "workers.metric_defs" and info.name not in sys.modules:
            continue  # importing it binds prometheus_client's value class (its import-order note)
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", ()):
            assert hasattr(module, name), f"{info.name}.__all__ names {name}, which it lacks"


def test_importing_workers_loads_no_broker_websocket_or_metrics_library() -> None:
    code = (
        "import sys, workers, supervisor; "
        "print(sorted(m for m in ('aio_pika', 'trio_websocket', 'prometheus_client') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
