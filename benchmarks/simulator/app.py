"""The simulator as one object: REST API, gateway (two ports), and the control endpoint.

`open_simulator(config)` starts everything in the caller's trio run and yields a `Simulator` whose
addresses are readable (ports 0 are resolved), whose ledgers can be inspected directly, and whose faults can
be injected in-process or over HTTP (`/_sim/...`) from another process.

Control endpoint (on the REST port):
- `GET  /_sim/ledger`                 the ledgers as JSON (`{"gateway": ..., "rest": ..., "guilds": ...}`;
                                      `guilds` is the guild-stream ledger, guild_ledger.py)
- `POST /_sim/ledger/reset`           clear the ledgers' records (sessions and buckets are kept)
- `GET  /_sim/state`                  live sessions and connections
- `POST /_sim/gateway/<action>`       gateway faults and settings (see `GatewaySimulator.control`)
- `POST /_sim/rest/<action>`          REST faults and settings (see `RestSimulator.control`)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import orjson
import trio

from supervisor.httpserver import HttpRequest, HttpResponse, serve_http

from .config import SimulatorConfig
from .gateway import GatewaySimulator
from .rest import RestSimulator
from .tokens import TokenRegistry

LOGGER: Final = logging.getLogger("benchmarks.simulator")
CONTROL_PREFIX: Final = "/_sim/"
API_PREFIXES: Final = ("/api/v10/", "/api/v9/", "/api/")


class ControlError(Exception):
    """A control request that cannot be carried out; answered with HTTP 400 and the message."""


@dataclass(frozen=True, slots=True)
class SimulatorAddresses:
    host: str
    rest_port: int
    gateway_port: int
    resume_port: int

    @property
    def rest_url(self) -> str:
        """Base URL of the REST API, the value for `DISCORD_API_URL` (`http://host:port/api/v10`)."""
        return f"http://{self.host}:{self.rest_port}/api/v10"

    @property
    def control_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}/_sim"

    @property
    def gateway_url(self) -> str:
        return f"ws://{self.host}:{self.gateway_port}"

    @property
    def resume_gateway_url(self) -> str:
        return f"ws://{self.host}:{self.resume_port}"


class Simulator:
    """A running simulator. Create it with `open_simulator`."""

    def __init__(
        self,
        config: SimulatorConfig,
        addresses: SimulatorAddresses,
        gateway: GatewaySimulator,
        rest: RestSimulator,
    ) -> None:
        self.config = config
        self.addresses = addresses
        self.gateway = gateway
        self.rest = rest

    def ledger(self) -> dict[str, Any]:
        """A JSON-ready snapshot of the ledgers: gateway, REST and the guild stream's."""
        return {
            "gateway": self.gateway.ledger.snapshot(),
            "rest": self.rest.ledger.snapshot(),
            "guilds": self.gateway.guild_ledger.snapshot(),
        }

    async def handle_http(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith(CONTROL_PREFIX):
            return await self._handle_control(request)
        for prefix in API_PREFIXES:
            if request.path.startswith(prefix):
                return await self.rest.handle(request, "/" + request.path[len(prefix) :])
        return _json_response(404, {"message": "404: Not Found", "code": 0})

    async def _handle_control(self, request: HttpRequest) -> HttpResponse:
        route = request.path[len(CONTROL_PREFIX) :].strip("/")
        try:
            body: Any = orjson.loads(request.body) if request.body else {}
            if not isinstance(body, dict):
                raise ControlError("the control body must be a JSON object")
            if request.method == "GET" and route == "ledger":
                return _json_response(200, self.ledger())
            if request.method == "GET" and route == "state":
                return _json_response(200, self.gateway.state())
            if request.method == "POST" and route == "ledger/reset":
                self.gateway.ledger.reset()
                self.rest.ledger.reset()
                self.gateway.guild_ledger.reset()
                return _json_response(200, {"ok": True})
            section, _, action = route.partition("/")
            if request.method == "POST" and section == "gateway" and action:
                return _json_response(200, await self.gateway.control(action, body))
            if request.method == "POST" and section == "rest" and action:
                return _json_response(200, await self.rest.control(action, body))
        except orjson.JSONDecodeError as exc:
            return _json_response(400, {"error": f"bad JSON: {exc}"})
        except (ControlError, ValueError, KeyError, TypeError) as exc:
            return _json_response(400, {"error": str(exc)})
        return _json_response(404, {"error": f"no control route {request.method} {request.path}"})


def _json_response(status: int, payload: object) -> HttpResponse:
    return HttpResponse(status, [("content-type", "application/json")], orjson.dumps(payload))


@asynccontextmanager
async def open_simulator(config: SimulatorConfig | None = None) -> AsyncIterator[Simulator]:
    """Start the simulator's three servers in a nursery owned by this context; yields once all listen.

    Leaving the context cancels every server and closes every connection abruptly.
    """
    config = config or SimulatorConfig()
    async with trio.open_nursery() as nursery:
        tokens = TokenRegistry(config)
        gateway = GatewaySimulator(config, tokens)
        gateway_port, resume_port = await nursery.start(gateway.serve)
        rest = RestSimulator(config, tokens, gateway.gateway_bot_info)
        addresses = SimulatorAddresses(config.host, 0, gateway_port, resume_port)
        simulator = Simulator(config, addresses, gateway, rest)
        rest_port: int = await nursery.start(serve_http, simulator.handle_http, config.host, config.rest_port)
        simulator.addresses = SimulatorAddresses(config.host, rest_port, gateway_port, resume_port)
        gateway.set_public_urls(simulator.addresses.gateway_url, simulator.addresses.resume_gateway_url)
        LOGGER.info(
            "simulator.listening",
            extra={
                "rest_url": simulator.addresses.rest_url,
                "gateway_url": simulator.addresses.gateway_url,
                "resume_gateway_url": simulator.addresses.resume_gateway_url,
            },
        )
        try:
            yield simulator
        finally:
            nursery.cancel_scope.cancel()
