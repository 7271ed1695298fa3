"""Prometheus in multi-process mode, plus `/healthz` and `/readyz`, on one small trio endpoint.

Rule (anchors/style-and-ecosystem.md B2, client_python's multiprocess docs): every process (the supervisor
and each worker) writes its metric values to mmap'd files in one directory, `PROMETHEUS_MULTIPROC_DIR`, and
only the supervisor serves them, merging the files on each scrape with a fresh `CollectorRegistry` and a
`MultiProcessCollector`. So Prometheus scrapes one stable address however often workers restart or reshard;
per-worker endpoints would be ports that change under it.

The trap is import order: prometheus_client picks its value class (in-memory or mmap files) when
`prometheus_client.values` is first imported, from the environment at that moment. Hence:
- The metric objects live in `workers.metric_defs`, which only code that updates metrics imports, and
  only once the variable is set: the supervisor calls `prepare_multiprocess_dir()` first thing (it exports
  the variable into its own environment) and passes the directory to every worker in the worker's
  environment. `metric_defs` refuses to load if prometheus_client was imported too early, instead of
  silently counting into memory that no scrape reads.
- This module never imports prometheus_client at module level. Serving needs no special value class: it
  only reads the files, with `MultiProcessCollector(registry, path=directory)` and an explicit path. So a
  process that never updates a metric (a test, a tool) can serve, and its import order does not matter.

The directory is wiped at every start, as the docs require: counters from a previous run's pids would
otherwise be summed into this run's. A reaped worker gets `mark_worker_dead(pid)`, which removes its `live*`
gauge files (its shards stop counting as connected); its counter files stay, so totals never go backwards.

Per shard: `/shards` answers a JSON list, one row per shard of this host (state, latency, seq, session age,
worker, node), from the supervisor's `ShardBoard` (supervisor/shard_status.py).

Health: `/healthz` answers 200 while the supervisor is live (its control loop runs, no crash loop) and
`/readyz` 200 once every shard is READY or RESUMED; both 503 otherwise, with the same JSON body. The
supervisor computes the verdicts and the detail; this module only serves them. The endpoint binds loopback
unless the address names a host, since metrics and health detail are not for the internet.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import orjson
import trio

from workers.metric_labels import (
    MULTIPROC_DIR_ENV,
)

from .httpserver import HttpRequest, HttpResponse, serve_http

__all__ = [
    "DEFAULT_LISTEN_HOST",
    "HEALTH_PATH",
    "READY_PATH",
    "SHARDS_PATH",
    "HealthState",
    "mark_worker_dead",
    "parse_listen_address",
    "prepare_multiprocess_dir",
    "remove_stale_directories",
    "render_metrics",
    "serve_metrics",
]

LOGGER: Final = logging.getLogger("supervisor.metrics")
DEFAULT_LISTEN_HOST: Final = "127.0.0.1"
HEALTH_PATH: Final = "/healthz"
READY_PATH: Final = "/readyz"
SHARDS_PATH: Final = "/shards"
#: Where a default metrics directory goes when systemd gives no RuntimeDirectory: a tmpfs, so the mmap'd
#: files never touch a disk.
SHM_DIR: Final = Path("/dev/shm")
_TEMP_PREFIX: Final = "discord-gateway-metrics-"

# -- the multiprocess directory ----------------------------------------------------------------------------


def prepare_multiprocess_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Create or empty the metrics directory for this run and export it as `PROMETHEUS_MULTIPROC_DIR`.

    `path` None makes a fresh private (0700) directory under `$RUNTIME_DIRECTORY` (systemd's per-start
    `/run/<unit>`), else `/dev/shm`, else the temp directory, named after this process's pid; the caller
    may remove it at exit, and if it cannot (SIGKILL, a power cut on a persistent temp directory) the next
    start removes it (`remove_stale_directories`). A named
    directory is created if missing and emptied of prometheus_client's `*.db` files only, so a mistyped
    path never costs anything else. Setting the variable in this process's environment makes the
    supervisor's own metrics (`metric_defs`), `mark_worker_dead` and `serve_metrics` use it; call this
    before anything imports prometheus_client (a warning, `metrics.imported_too_early`, says when it was
    too late: this process's own metrics would then stay in memory).
    """
    if path is None:
        parent = _default_parent()
        remove_stale_directories(Path(parent or tempfile.gettempdir()))
        directory = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", dir=parent))
    else:
        directory = Path(path)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink(missing_ok=True)
    os.environ[MULTIPROC_DIR_ENV] = str(directory)
    LOGGER.debug("metrics.directory", extra={"path": str(directory)})
    if _imported_in_single_process_mode():
        # Not fatal: workers still export, and this process may not count anything itself.
        LOGGER.warning("metrics.imported_too_early", extra={"path": str(directory)})
    return directory


def remove_stale_directories(parent: Path) -> list[Path]:
    """Remove the default metrics directories in `parent` whose supervisor is gone; returns them.

    A directory is `discord-gateway-metrics-<pid>-<random>`: it is stale when it belongs to this user and no
    process `pid` exists. A live pid, even another program's after pid reuse, keeps its directory (a
    directory left behind is a few KiB; removing a running supervisor's would lose its metrics). Names
    without a pid (an older version's) are left alone.
    """
    removed = []
    for candidate in parent.glob(f"{_TEMP_PREFIX}*"):
        pid_text = candidate.name.removeprefix(_TEMP_PREFIX).partition("-")[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)) or not _owned_directory(candidate):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    if removed:
        LOGGER.info("metrics.stale_directories_removed", extra={"paths": [str(path) for path in removed]})
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _owned_directory(path: Path) -> bool:
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def _imported_in_single_process_mode() -> bool:
    values = sys.modules.get("prometheus_client.values")
    return values is not None and getattr(values, "ValueClass", None) is getattr(values, "MutexValue", None)


def _default_parent() -> str | None:
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime and os.path.isdir(runtime):
        return runtime
    if SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK | os.X_OK):
        return str(SHM_DIR)
    return None


def mark_worker_dead(pid: int, directory: str | os.PathLike[str] | None = None) -> None:
    """Drop the `live*` gauges of a reaped process (default directory: `$PROMETHEUS_MULTIPROC_DIR`).

    Does nothing when there is no directory: metrics are off.
    """
    path = directory if directory is not None else os.environ.get(MULTIPROC_DIR_ENV)
    if not path:
        return
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]  # the module has no annotations


def render_metrics(directory: str | os.PathLike[str], accept: str = "") -> tuple[bytes, str]:
    """One scrape: every process's values in `directory`, merged, encoded for the `Accept` header.

    Blocking (it reads one file per process and metric type); `serve_metrics` runs it in a thread.
    """
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]  # no annotations
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type


# -- health and the endpoint -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HealthState:
    """The supervisor's verdicts for one request, and JSON-ready detail to show with them.

    `live`: the control loop runs and no worker is in a crash loop (`/healthz`). `ready`: every shard of
    this host is READY or RESUMED (`/readyz`). `detail` is served as it is (shard counts, workers, pids).
    """

    live: bool
    ready: bool
    detail: Mapping[str, object] = field(default_factory=dict)


def parse_listen_address(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, `:port` or `port` as (host, port); no host means loopback; port 0 is free."""
    host, separator, port_text = address.strip().rpartition(":")
    if not separator:
        host, port_text = "", address.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"metrics address {address!r}: write an IPv6 host in brackets, as [::1]:9090")
    if not port_text.isdigit() or int(port_text) > 65_535:
        raise ValueError(f"metrics address {address!r} needs a port from 0 to 65535")
    return host or DEFAULT_LISTEN_HOST, int(port_text)


async def serve_metrics(
    address: str,
    endpoint: str,
    health: Callable[[], HealthState],
    *,
    directory: str | os.PathLike[str] | None = None,
    shards: Callable[[], Sequence[Mapping[str, object]]] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `endpoint` (the merged metrics), `/healthz`, `/readyz` and `/shards` on `address` until
    cancelled.

    Args:
        address: `host:port` (see `parse_listen_address`); port 0 picks a free port.
        endpoint: the metrics path, usually `/metrics`.
        health: called on each health request; must be cheap and must not block.
        directory: the multiprocess directory (default `$PROMETHEUS_MULTIPROC_DIR`).
        shards: called on each `/shards` request for its rows (cheap, non-blocking); None serves `[]`.
        task_status: started with the bound port once the socket listens.

    Raises:
        ValueError: a bad address or endpoint, or no metrics directory, before anything is bound.
    """
    host, port = parse_listen_address(address)
    if not endpoint.startswith("/") or endpoint in (HEALTH_PATH, READY_PATH, SHARDS_PATH):
        raise ValueError(
            f"metrics endpoint must be a path other than {HEALTH_PATH}, {READY_PATH} and {SHARDS_PATH}: "
            f"{endpoint!r}"
        )
    metrics_dir = Path(directory) if directory is not None else _directory_from_environ()
    if not metrics_dir.is_dir():
        raise ValueError(f"metrics directory {str(metrics_dir)!r} does not exist")

    async def handle(request: HttpRequest) -> HttpResponse:
        if request.path not in (endpoint, HEALTH_PATH, READY_PATH, SHARDS_PATH):
            return HttpResponse(404, [("content-type", "text/plain; charset=utf-8")], b"not found\n")
        if request.method != "GET":
            return HttpResponse(405, [("allow", "GET"), ("content-type", "text/plain; charset=utf-8")])
        if request.path == endpoint:
            body, content_type = await trio.to_thread.run_sync(
                render_metrics, metrics_dir, request.headers.get("accept", "")
            )
            return HttpResponse(200, [("content-type", content_type)], body)
        if request.path == SHARDS_PATH:
            rows = shards() if shards is not None else []
            headers = [("content-type", "application/json"), ("cache-control", "no-store")]
            return HttpResponse(200, headers, orjson.dumps(rows, default=str))
        state = health()
        ok = state.live if request.path == HEALTH_PATH else state.ready
        body = orjson.dumps({"live": state.live, "ready": state.ready, "detail": state.detail}, default=str)
        headers = [("content-type", "application/json"), ("cache-control", "no-store")]
        return HttpResponse(200 if ok else 503, headers, body)

    async with trio.open_nursery() as nursery:
        bound_port: int = await nursery.start(serve_http, handle, host, port)
        LOGGER.info("metrics.listening", extra={"host": host, "port": bound_port, "endpoint": endpoint})
        task_status.started(bound_port)


def _directory_from_environ() -> Path:
    value = os.environ.get(MULTIPROC_DIR_ENV)
    if not value:
        raise ValueError(f"no metrics directory: call prepare_multiprocess_dir() or set {MULTIPROC_DIR_ENV}")
    return Path(value)
