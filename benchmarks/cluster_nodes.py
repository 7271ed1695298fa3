"""Cluster nodes (`CLUSTER_MODE=redis` supervisors) as real processes, for the cluster tests and the fault
suite: start nodes, stop them the ways a host stops, and wait until the cluster as a whole serves its shards.

- A node is `python -m supervisor` in a process group of its own (`start_new_session=True`), so a "host
  kill" is `os.killpg(pgid, SIGKILL)` of the supervisor and every worker at once (`NodeProcess.kill9`), a
  "frozen host" is SIGSTOP of the group (`freeze`/`thaw`), and a clean stop is SIGTERM to the supervisor
  alone (`sigterm`: it drains its workers itself and hands its groups over), with the exit status returned.
- Each node has its own node id, metrics port (`/healthz`, `/readyz`, `/metrics`), log file (its stderr,
  JSON lines), environment overrides and `REDIS_URL`: a node whose Redis goes through a
  `benchmarks.tcp_forwarder.TcpForwarder` is the one a partition cuts off while the others still reach Redis.
- `Cluster.wait_serving(n)`: until every shard 0..n-1 is served exactly once across the running nodes (the
  union of their `/healthz` `cluster.shards` is 0..n-1 and no shard is on two nodes) and READY (each node's
  `ready_shards == shards`). This is the nodes' own view; the simulator's ledger (its counters
  `identifies`, `resumes`, `shard_overlaps` and violations) is what judges a run from outside.
- `open_cluster(...)` yields a `Cluster` and, whatever happens, kills every node's process group on exit and
  deletes the Redis keys under its `SHARD_STORE_PREFIX` (a unique one by default), so runs do not see each
  other's plan, leases or sessions.

Every wait has a deadline and fails with `BenchmarkError` naming what each node last reported. This module
imports nothing from `tests`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

import httpx
import trio

from benchmarks.children import free_port, worker_env
from benchmarks.harness import ROOT, BenchmarkError

__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "DEFAULT_REDIS_URL",
    "Cluster",
    "ClusterDetail",
    "NodeHealth",
    "NodeProcess",
    "delete_prefix_keys",
    "open_cluster",
]

DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379"
#: Short, so a failover takes seconds (the settings' minimum is 2 s).
DEFAULT_LEASE_TTL_S: Final = 3.0
#: How long one `/healthz` read may take before the node counts as not answering.
HEALTH_TIMEOUT_S: Final = 5.0
#: How long `wait_serving` waits by default (starts pace IDENTIFYs 5 s apart per bucket on the simulator).
SERVING_TIMEOUT_S: Final = 60.0
#: How long a SIGTERMed node may take to hand its groups over and exit before its group is SIGKILLed.
STOP_TIMEOUT_S: Final = 30.0
POLL_S: Final = 0.2
LOG_TAIL_CHARS: Final = 3000


@dataclass(frozen=True, slots=True)
class ClusterDetail:
    """`detail.cluster` of a node's `/healthz`: what the node believes it runs."""

    node: str
    #: Live nodes in the node's last successful sync.
    nodes: int
    #: "connected" or "unreachable".
    redis: str
    groups: tuple[int, ...]
    shards: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """One read of a node's `/healthz`."""

    live: bool
    ready: bool
    #: Shards the node runs (its groups' shards) and how many of them are READY.
    shards: int
    ready_shards: int
    #: None until the node has joined the cluster (it may still wait for Redis).
    cluster: ClusterDetail | None
    raw: Mapping[str, Any]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> NodeHealth:
        detail = body.get("detail") or {}
        cluster = detail.get("cluster")
        return cls(
            live=bool(body.get("live")),
            ready=bool(body.get("ready")),
            shards=int(detail.get("shards") or 0),
            ready_shards=int(detail.get("ready_shards") or 0),
            cluster=None
            if cluster is None
            else ClusterDetail(
                node=str(cluster["node"]),
                nodes=int(cluster["nodes"]),
                redis=str(cluster["redis"]),
                groups=tuple(int(group) for group in cluster["groups"]),
                shards=tuple(int(shard) for shard in cluster["shards"]),
            ),
            raw=body,
        )

    @property
    def serving(self) -> tuple[int, ...]:
        """The shards the node says it runs (none before it joined)."""
        return () if self.cluster is None else self.cluster.shards

    @property
    def all_ready(self) -> bool:
        """Every shard the node runs is READY (true of a node that runs none)."""
        return self.ready_shards == self.shards == len(self.serving)

    def summary(self) -> str:
        redis = "?" if self.cluster is None else self.cluster.redis
        return f"shards {list(self.serving)} ({self.ready_shards}/{self.shards} ready), redis {redis}"


@dataclass(slots=True)
class NodeProcess:
    """One running (or exited) cluster node: a supervisor, leader of its own process group."""

    node_id: str
    process: trio.Process
    metrics_port: int
    log_path: Path
    redis_url: str
    http: httpx.AsyncClient = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def pgid(self) -> int:
        """The node's process group: the supervisor's pid (it was started in a new session)."""
        return self.process.pid

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:<metrics port>`: `/healthz`, `/readyz`, `/metrics`, `/shards`."""
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log_text()[-chars:]

    async def health(self) -> NodeHealth | None:
        """The node's `/healthz`, or None when it does not answer (not listening yet, exited, frozen)."""
        try:
            response = await self.http.get(self.base_url + "/healthz", timeout=HEALTH_TIMEOUT_S)
            body = response.json()
        except (httpx.HTTPError, ValueError):
            return None
        return NodeHealth.from_body(body) if isinstance(body, dict) else None

    async def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait for the supervisor to exit by itself; its exit status. BenchmarkError after `timeout_s`."""
        with trio.move_on_after(timeout_s):
            await self.process.wait()
        if self.process.returncode is None:
            raise BenchmarkError(
                f"node {self.node_id} did not exit within {timeout_s:g} s; log {self.log_path}:\n"
                f"{self.log_tail()}"
            )
        self._kill_group()  # a worker that outlived its supervisor
        return self.process.returncode

    async def sigterm(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """A clean stop: SIGTERM to the supervisor alone (it drains its workers and hands its groups over),
        then wait for its exit status. Past `timeout_s` the whole group is SIGKILLed and BenchmarkError
        raised."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        try:
            return await self.wait_exit(timeout_s)
        except BenchmarkError:
            await self.kill9()
            raise

    async def kill9(self) -> None:
        """A host dying: SIGKILL to the supervisor and all its workers at once; returns once it is reaped."""
        self._kill_group()
        await self.process.wait()

    def freeze(self) -> None:
        """A host that stops answering without closing anything: SIGSTOP to the whole group."""
        self._signal_group(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT to the whole group after `freeze`."""
        self._signal_group(signal.SIGCONT)

    def _kill_group(self) -> None:
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signum)


@dataclass(slots=True)
class Cluster:
    """The nodes of one cluster (one `SHARD_STORE_PREFIX`) run against one simulator; see `open_cluster`."""

    rest_url: str
    folder: Path
    prefix: str
    redis_url: str
    lease_ttl_s: float
    env: Mapping[str, str | None]
    http: httpx.AsyncClient = field(repr=False)
    #: Every node started, in order, the exited ones included (a node id may be reused by a later node).
    started: list[NodeProcess] = field(default_factory=list)

    def node_env(
        self,
        node_id: str,
        metrics_port: int,
        *,
        workers: int | None,
        redis_url: str,
        env: Mapping[str, str | None],
    ) -> dict[str, str]:
        """A node's environment: the simulator's, cluster mode with this cluster's prefix and TTL, and the
        cluster's then the node's overrides (a value of None removes the variable)."""
        values: dict[str, str | None] = {
            "CLUSTER_MODE": "redis",
            "CLUSTER_NODE_ID": node_id,
            "CLUSTER_LEASE_TTL": f"{self.lease_ttl_s:g}",
            "SHARD_STORE_PREFIX": self.prefix,
            "REDIS_URL": redis_url,
            "RATELIMIT_BACKEND": "redis",
            "BROKER_TYPE": "null",
            "PROMETHEUS_ADDRESS": f"127.0.0.1:{metrics_port}",
            "SHUTDOWN_TIMEOUT": "10s",
            "WORKERS": None if workers is None else str(workers),
            **self.env,
            **env,
        }
        base = worker_env(self.rest_url)
        for name, value in values.items():
            if value is None:
                base.pop(name, None)
            else:
                base[name] = value
        return base

    async def start(
        self,
        node_id: str,
        *args: str,
        workers: int | None = 1,
        redis_url: str | None = None,
        env: Mapping[str, str | None] | None = None,
    ) -> NodeProcess:
        """Start node `node_id` (`python -m supervisor ARGS`) with `WORKERS=workers` (its weight; None
        leaves it unset), `redis_url` (default: the cluster's) and `env` overrides. Returns at once: use
        `wait_serving`, or the node's `health()` / `wait_exit()`."""
        port = free_port()
        redis = redis_url or self.redis_url
        environment = self.node_env(node_id, port, workers=workers, redis_url=redis, env=env or {})
        runs = sum(1 for node in self.started if node.node_id == node_id)
        log_path = self.folder / (f"{node_id}.log" if runs == 0 else f"{node_id}-{runs + 1}.log")
        with _create_log(log_path) as log:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "supervisor", *args],
                cwd=str(ROOT),
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        node = NodeProcess(node_id, process, port, log_path, redis, self.http)
        self.started.append(node)
        return node

    def running(self) -> list[NodeProcess]:
        """The started nodes whose supervisor has not exited."""
        return [node for node in self.started if node.running]

    def node(self, node_id: str) -> NodeProcess:
        """The latest node started as `node_id`."""
        for node in reversed(self.started):
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    async def health(self, nodes: Collection[NodeProcess] | None = None) -> dict[str, NodeHealth | None]:
        """Each node's `/healthz` (None: it did not answer), by node id; default: the running nodes."""
        chosen = self.running() if nodes is None else list(nodes)
        return {node.node_id: await node.health() for node in chosen}

    async def wait_serving(
        self,
        shard_count: int,
        *,
        timeout_s: float = SERVING_TIMEOUT_S,
        nodes: Collection[NodeProcess] | None = None,
    ) -> dict[str, tuple[int, ...]]:
        """Until the cluster runs every shard 0..shard_count-1 exactly once and READY, as `nodes` (default:
        the running nodes, looked up again at each poll) report it; the shards of each node, by node id.

        Exactly once: the union of the nodes' `cluster.shards` is 0..shard_count-1 and no shard is on two
        nodes. READY: every node's `ready_shards == shards`. A node that does not answer fails the
        condition (pass `nodes` to leave out one that cannot, e.g. a frozen node). BenchmarkError after
        `timeout_s`, naming what each node last reported."""
        last: dict[str, NodeHealth | None] = {}
        with trio.move_on_after(timeout_s):
            while True:
                last = await self.health(nodes)
                if _serves_once(last, shard_count):
                    return {node_id: health.serving for node_id, health in last.items() if health}
                await trio.sleep(POLL_S)
        report = "; ".join(
            f"{node_id}: {'no answer' if health is None else health.summary()}"
            for node_id, health in last.items()
        )
        exited = "".join(
            f"\nnode {node.node_id} exited with status {node.returncode}; log {node.log_path}:\n"
            f"{node.log_tail()}"
            for node in (self.started if nodes is None else nodes)
            if not node.running
        )
        raise BenchmarkError(
            f"the cluster did not serve shards 0-{shard_count - 1} exactly once and READY within "
            f"{timeout_s:g} s; last: {report or 'no running node'}{exited}"
        )

    async def kill_all(self) -> None:
        """SIGKILL every node's group (running or not: a worker may have outlived its supervisor)."""
        for node in self.started:
            node.thaw()
            await node.kill9()


def _create_log(path: Path) -> BinaryIO:
    # A local file opened once per node, before it starts: not worth a thread.
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "wb")


def _serves_once(health: Mapping[str, NodeHealth | None], shard_count: int) -> bool:
    seen: list[int] = []
    for node in health.values():
        if node is None or node.cluster is None or not node.all_ready:
            return False
        seen.extend(node.serving)
    return sorted(seen) == list(range(shard_count))


async def delete_prefix_keys(redis_url: str, prefix: str, *, timeout_s: float = 10.0) -> int:
    """Delete every key under the `{prefix}` hash tag (the cluster's plan, nodes, leases, fences, sessions,
    identify and ratelimit keys); the number deleted. Errors (Redis away) are left to the caller."""
    from ratelimit.redis_client import open_redis_client

    deleted = 0
    with trio.fail_after(timeout_s):
        async with open_redis_client(redis_url) as client:
            cursor = b"0"
            while True:
                reply = await client.execute(
                    "SCAN", cursor, "MATCH", f"{{{prefix}}}*", "COUNT", 1000, key=f"{{{prefix}}}"
                )
                assert isinstance(reply, list) and len(reply) == 2
                next_cursor, found = reply
                assert isinstance(next_cursor, bytes) and isinstance(found, list)
                keys = [key for key in found if isinstance(key, bytes)]
                if keys:
                    result = await client.execute("DEL", *keys, key=keys[0])
                    deleted += result if isinstance(result, int) else 0
                if next_cursor == b"0":
                    return deleted
                cursor = next_cursor


@contextlib.asynccontextmanager
async def open_cluster(
    rest_url: str,
    folder: Path,
    *,
    prefix: str | None = None,
    redis_url: str = DEFAULT_REDIS_URL,
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    env: Mapping[str, str | None] | None = None,
    cleanup: bool = True,
) -> AsyncIterator[Cluster]:
    """A cluster of nodes against the simulator whose REST API is `rest_url` (`.../api/v10`), with logs in
    `folder`, under `prefix` (default: a unique `cluster-<hex>`), sharing `redis_url` (a node may be given
    another, e.g. a forwarder's). On exit every node's group is SIGKILLed and, with `cleanup`, the prefix's
    keys are deleted from `redis_url` (best effort: a Redis that is gone is left alone)."""
    chosen = prefix or f"cluster-{uuid.uuid4().hex[:10]}"
    async with httpx.AsyncClient() as http:
        cluster = Cluster(rest_url, folder, chosen, redis_url, lease_ttl_s, dict(env or {}), http)
        try:
            yield cluster
        finally:
            with trio.CancelScope(shield=True):
                await cluster.kill_all()
                if cleanup:
                    with contextlib.suppress(Exception):
                        await delete_prefix_keys(redis_url, chosen, timeout_s=5.0)
