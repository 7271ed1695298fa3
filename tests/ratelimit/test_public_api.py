"""The public API of `ratelimit` and `ratelimit.proxy` is pinned, and every module's `__all__` is honest:
its names exist, other ratelimit modules import only names it exports, and its exceptions sit under
`RatelimitError`."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import get_args

import pytest

import ratelimit
import ratelimit.proxy
from ratelimit import BackendKind, RatelimitError, SharedBackendKind

PACKAGE_DIR = Path(ratelimit.__file__).parent

RATELIMIT_ALL = [
    "Ask",
    "Backend",
    "BackendKind",
    "BackendSpec",
    "BackendUnavailable",
    "EngineConfig",
    "EngineStatistics",
    "LocalBackend",
    "Outcome",
    "Permit",
    "RateLimitTimeout",
    "RatelimitError",
    "RatelimitedTransport",
    "Ratelimiter",
    "RedisBackend",
    "RedisBackendStatistics",
    "RedisConnectionError",
    "RedisReplyError",
    "RequestRefused",
    "RespProtocolError",
    "SharedBackendKind",
    "ShmBackend",
    "ShmError",
    "ShmStatistics",
    "open_backend",
    "open_ratelimiter",
    "open_redis_backend",
]
PROXY_ALL = [
    "DEFAULT_TIMEOUT_S",
    "HttpLimits",
    "HttpProxyServer",
    "ProxyError",
    "ProxyRequest",
    "ProxyResponse",
    "ProxyStatistics",
    "RestProxy",
    "RestRpcServer",
    "RpcBroker",
    "RpcDelivery",
    "RpcStatus",
    "SendMark",
    "make_request",
    "open_rest_proxy",
]


def _modules() -> list[ModuleType]:
    names = [info.name for info in pkgutil.walk_packages(ratelimit.__path__, "ratelimit.")]
    return [ratelimit, *(importlib.import_module(name) for name in sorted(names))]


MODULES = _modules()


def test_the_public_names_are_pinned() -> None:
    assert ratelimit.__all__ == RATELIMIT_ALL
    assert ratelimit.proxy.__all__ == PROXY_ALL


@pytest.mark.parametrize("module", MODULES, ids=lambda module: module.__name__)
def test_every_exported_name_exists(module: ModuleType) -> None:
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{module.__name__} has no __all__"
    assert len(exported) == len(set(exported))
    assert [name for name in exported if not hasattr(module, name)] == []


@pytest.mark.parametrize("module", MODULES, ids=lambda module: module.__name__)
def test_modules_import_only_exported_names(module: ModuleType) -> None:
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0]
    unexported = [
        f"{node.module}.{alias.name}"
        for node in imports
        if node.module is not None and node.module.partition(".")[0] == "ratelimit"
        for alias in node.names
        if not _is_exported(node.module, alias.name)
    ]
    assert unexported == []


def _is_exported(module_name: str, name: str) -> bool:
    """Whether `from module_name import name` takes a name the module exports (or one of its submodules)."""
    source = importlib.import_module(module_name)
    is_submodule = isinstance(getattr(source, name, None), ModuleType)
    return is_submodule or name in getattr(source, "__all__", ())


@pytest.mark.parametrize("module", MODULES, ids=lambda module: module.__name__)
def test_exported_exceptions_are_ratelimit_errors(module: ModuleType) -> None:
    exceptions = [
        value
        for value in (getattr(module, name) for name in module.__all__)
        if isinstance(value, type) and issubclass(value, BaseException)
    ]
    assert [error.__name__ for error in exceptions if not issubclass(error, RatelimitError)] == []


def test_backend_kinds() -> None:
    assert set(get_args(SharedBackendKind)) == {"shm", "redis"}
    assert set(get_args(BackendKind)) == {"shm", "redis", "memory"}


def test_the_package_is_typed() -> None:
    assert (PACKAGE_DIR / "py.typed").is_file()
