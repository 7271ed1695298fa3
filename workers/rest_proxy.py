"""The REST proxy inside a worker: its ratelimiter, the AMQP RPC front and the HTTP front (DESIGN 3.6).

The RPC front runs whenever the worker's broker is AMQP (on the worker's own connection: one more consumer
channel, replies on the publish channel); the HTTP front when `PROXY_HTTP_ADDRESS` is set. Both share one
`RestProxy`, so one process keeps one view of the limits, and the backend (`RATELIMIT_BACKEND`) shares it
with every other worker and host:

- `shm`: the host's segment for this bot (`ratelimit.configured.shm_segment_name`, in `RATELIMIT_SHM_DIR`),
  which the supervisor creates before its workers start and removes when it stops; a supervised worker only
  joins it (a missing segment is an error, not a reason to make a private one that nobody shares). A
  worker started alone (tests, by hand) creates it, or joins it when another process already has.
- `redis`: `REDIS_URL` (many hosts; `ratelimit.redis_backend`, a trio-native client).
- `memory`: this process only (tests; a single worker).

Stopping: `stop(grace_s)` drains both fronts (see `ratelimit.proxy.amqp` and `ratelimit.proxy.http`);
`serve` returns once they have.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from ratelimit.configured import BackendSpec, engine_config, open_ratelimiter, shm_segment_name
from ratelimit.engine import Ratelimiter
from ratelimit.proxy import RestProxy, open_rest_proxy
from ratelimit.proxy.amqp import RestRpcServer
from ratelimit.proxy.http import HttpProxyServer

from .amqp_bridge import Amqp
from .config import WorkerConfig
from .setting_formats import parse_address


@dataclass
class WorkerRestProxy:
    """The fronts this worker serves (None when off)."""

    rpc: RestRpcServer | None
    http: HttpProxyServer | None
    http_address: tuple[str, int] | None
    limiter: Ratelimiter | None = None
    proxy: RestProxy | None = None

    async def serve(self, *, task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run both fronts until they are stopped (or cancelled); reports the HTTP port once both are up."""
        async with trio.open_nursery() as nursery:
            port: int | None = None
            if self.rpc is not None:
                await nursery.start(self.rpc.serve)
            if self.http is not None and self.http_address is not None:
                host, wanted = self.http_address
                port = await nursery.start(self.http.serve, host, wanted)
            task_status.started(port)

    def stop(self, grace_s: float) -> None:
        if self.rpc is not None:
            self.rpc.stop(grace_s)
        if self.http is not None:
            self.http.stop(grace_s)


def proxy_enabled(config: WorkerConfig) -> bool:
    return config.settings.broker_type == "amqp" or config.settings.proxy_http_address is not None


def backend_spec(config: WorkerConfig, *, supervised: bool) -> BackendSpec:
    return BackendSpec(
        kind=config.settings.ratelimit_backend,
        config=engine_config(config.settings.global_limit),
        shm_name=shm_segment_name(config.settings.token),
        shm_dir=config.settings.ratelimit_shm_dir,
        owner=not supervised,
        redis_url=config.settings.redis_url,
        redis_pool_size=config.settings.redis_pool_size,
    )


@contextlib.asynccontextmanager
async def open_worker_rest_proxy(
    config: WorkerConfig, amqp: Amqp | None, *, supervised: bool
) -> AsyncIterator[WorkerRestProxy]:
    """The limiter, the proxy and the configured fronts (none when `proxy_enabled` is False). `supervised`:
    the supervisor owns the shm segment."""
    if not proxy_enabled(config):
        yield WorkerRestProxy(None, None, None)
        return
    async with (
        open_ratelimiter(
            backend_spec(config, supervised=supervised),
            fallback_share=config.assignment.ratelimit_fallback_share,
        ) as limiter,
        open_rest_proxy(
            limiter,
            api_url=config.settings.api_url,
            timeout_s=config.settings.timeout_s,
            bot_token=config.settings.token,
        ) as proxy,
    ):
        rpc = (
            RestRpcServer(amqp, proxy, group=config.settings.amqp_group, event=config.settings.amqp_event)
            if amqp is not None
            else None
        )
        http = (
            HttpProxyServer(proxy, secret=config.settings.proxy_http_secret)
            if config.settings.proxy_http_address is not None
            else None
        )
        address = config.settings.proxy_http_address
        yield WorkerRestProxy(
            rpc, http, parse_address("PROXY_HTTP_ADDRESS", address) if address else None, limiter, proxy
        )
