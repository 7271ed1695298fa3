"""A local Discord (REST API and gateway) that enforces Discord's rules and keeps a ledger of what happened.

Tests, benchmarks and the README demo run against it. Start it in-process with `open_simulator(config)`,
or as a program with `python -m benchmarks.simulator --help`.
"""

from .app import Simulator, SimulatorAddresses, open_simulator
from .config import BOT_USER_ID, DEFAULT_TOKEN, GatewayConfig, RestConfig, SimulatorConfig

__all__ = [
    "BOT_USER_ID",
    "DEFAULT_TOKEN",
    "GatewayConfig",
    "RestConfig",
    "Simulator",
    "SimulatorAddresses",
    "SimulatorConfig",
    "open_simulator",
]
