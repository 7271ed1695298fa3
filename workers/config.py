"""What one worker runs with: the service's settings and its share of the shards.

Under the supervisor a worker is handed its `WorkerConfig` over the control channel (`workers.control`):
the settings (`workers.settings.worker_wire`, parsed here by the same parsers) and the shards, gateway URL and
identify concurrency the supervisor learnt from `GET /gateway/bot`. Nothing of it travels in the worker's
environment, so its secrets are not readable in /proc. Standalone (tests, benchmarks) the worker reads the
same settings from its environment (`standalone_config`), and its command line names the shards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

from .errors import ConfigError
from .setting_formats import format_shard_ids
from .settings import Settings, load_from_environment

__all__ = ["ROLES", "Role", "ShardAssignment", "WorkerConfig", "standalone_config"]

#: A worker's part in a live reshard (`workers.reshard`): `live` publishes; `shadow` (a new generation
#: beside the running one) connects and receives, buffers, and publishes only once told to go live.
Role = Literal["live", "shadow"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)


@dataclass(frozen=True, slots=True)
class ShardAssignment:
    """A worker's share of the bot: what the supervisor decided or learnt, not what the user set."""

    shard_ids: tuple[int, ...]
    shard_count: int
    #: The gateway URL from `GET /gateway/bot`; fetched at start when empty.
    gateway_url: str = ""
    #: Identify buckets (`session_start_limit.max_concurrency`); fetched at start when 0.
    max_concurrency: int = 0
    #: Worker processes on this host: while Redis is unreachable each paces 1/share of the global limit.
    ratelimit_fallback_share: int = 1
    #: Cluster mode: every connection (IDENTIFY or RESUME) waits for the supervisor's word that this node
    #: still holds the shard's lease (`SupervisorLink.wait_for_lease`).
    leased: bool = False
    #: `shadow`: a new shard generation during a live reshard; publishes nothing, consumes no command, until
    #: the supervisor's `GoLive` (workers.reshard).
    role: Role = "live"
    #: The supervisor reshards live (RESHARD=auto): close 4011 stops only that shard and is reported
    #: (`ShardingRequired`) instead of ending the worker, and published digests are kept for a `Retire`.
    reshard: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError("role", f"one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.reshard, bool):
            raise ConfigError("reshard", f"true or false, got {self.reshard!r}")
        if not self.shard_ids or max(self.shard_ids) >= self.shard_count or min(self.shard_ids) < 0:
            raise ConfigError(
                "DISCORD_SHARD_IDS",
                f"shard ids below the shard count {self.shard_count}, got {format_shard_ids(self.shard_ids)}",
            )


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    settings: Settings = field(repr=False)
    assignment: ShardAssignment

    @property
    def shard_ids(self) -> tuple[int, ...]:
        return self.assignment.shard_ids

    @property
    def shard_count(self) -> int:
        return self.assignment.shard_count


def standalone_config(
    environ: Mapping[str, str],
    *,
    shard_ids: tuple[int, ...] | None = None,
    shard_count: int | None = None,
    gateway_url: str = "",
    max_concurrency: int = 0,
) -> WorkerConfig:
    """A worker's config from its environment (the table's variables) and command line (which wins).

    ConfigError when there is no token or no shard count: a standalone worker has no supervisor to ask.
    """
    # A missing token first: nothing else matters to a worker that cannot log in.
    if not any(environ.get(name, "").strip() for name in ("DISCORD_TOKEN", "DISCORD_TOKEN_FILE")):
        raise ConfigError("DISCORD_TOKEN", "a bot token (or DISCORD_TOKEN_FILE naming a file holding one)")
    settings = load_from_environment(environ)
    count = shard_count or settings.shards
    if count is None:
        raise ConfigError("DISCORD_SHARD_COUNT", "a shard count (workers are given one by the supervisor)")
    ids = shard_ids or settings.shard_ids or tuple(range(count))
    assignment = ShardAssignment(ids, count, gateway_url=gateway_url, max_concurrency=max_concurrency)
    return WorkerConfig(settings, assignment)
