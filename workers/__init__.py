"""Data plane: the gateway shards of one shard range (`python -m workers`), and the contract it shares with
the supervisor.

What other packages and embedders import from here: the settings (`Settings`, declared once with their
variables in `workers.settings`), a worker's configuration (`WorkerConfig`: settings plus its
`ShardAssignment`), the exit statuses, and the errors under `WorkerError`. Running a worker in-process is
`workers.main.run_worker`; it is not imported here, so that `import workers` stays light (no broker or
WebSocket library) for the supervisor and for tools.
"""

from .config import ShardAssignment, WorkerConfig
from .errors import (
    CommandRejected,
    CommandTooLarge,
    ConfigError,
    FatalCloseCode,
    ProtocolError,
    PublishError,
    SessionStoreError,
    TransportError,
    WorkerError,
)
from .exit_status import ExitStatus
from .settings import SETTINGS, Settings

__all__ = [
    "SETTINGS",
    "CommandRejected",
    "CommandTooLarge",
    "ConfigError",
    "ExitStatus",
    "FatalCloseCode",
    "ProtocolError",
    "PublishError",
    "SessionStoreError",
    "Settings",
    "ShardAssignment",
    "TransportError",
    "WorkerConfig",
    "WorkerError",
]
