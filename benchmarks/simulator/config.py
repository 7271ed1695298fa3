"""The simulator's settings: one frozen value, shared by the CLI, tests and benchmarks.

Everything that shapes what the simulated Discord does lives here so that a run can be reproduced from its
config alone (plus `seed`). Runtime changes (fault injection, a new event rate) go through the control
endpoint and never mutate this object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Final, Literal

Compression = Literal["zlib-stream", "zstd-stream", "none"]

#: A token with the shape of a real bot token (base64 user id, timestamp, HMAC), so clients that validate
#: the shape (hikari) accept it. It authenticates against the simulator only.
DEFAULT_TOKEN: Final = "MTA4NzY1NDMyMTA5ODc2NTQzMg.GsimUL.c2ltdWxhdG9yLW9ubHktdG9rZW4tbm90LXJlYWw"
#: The bot's user id; also the application id (as for real bots).
BOT_USER_ID: Final = 1087654321098765432
#: Discord's identify window: one IDENTIFY per `shard_id % max_concurrency` key per this many seconds.
IDENTIFY_INTERVAL_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """How the simulated gateway behaves."""

    #: Recommended shard count returned by `GET /gateway/bot` (control action `recommended_shards` sets it).
    shard_count: int = 4
    #: IDENTIFYs with a shard count below this close with 4011 (0 = no minimum); RESUMEs are not affected.
    min_shard_count: int = 0
    #: `session_start_limit.max_concurrency`: identify buckets per 5 s.
    max_concurrency: int = 1
    #: `session_start_limit.total`: the daily identify budget.
    session_start_total: int = 1000
    #: `session_start_limit.remaining` at start; an IDENTIFY when it is 0 resets the token (all sessions end).
    session_start_remaining: int = 1000
    #: `session_start_limit.reset_after` in milliseconds.
    session_start_reset_after_ms: int = 86_400_000
    #: HELLO's `heartbeat_interval` in milliseconds (Discord sends 41250).
    heartbeat_interval_ms: int = 41_250
    #: Dispatches per second per connected session in the firehose (0 = only READY and GUILD_CREATEs).
    event_rate: float = 0.0
    #: Guilds per shard, announced in READY and sent as GUILD_CREATEs (unused in guild-stream mode).
    guilds_per_shard: int = 2
    #: Guild-stream mode when > 0: the bot has this many guilds, whatever the shard count; shard (id, count)
    #: holds those with `(guild_id >> 22) % count == id`, and sessions of every shard count see one stream.
    guild_count: int = 0
    #: Guild-stream mode: MESSAGE_CREATEs per second for the whole bot, each delivered to every live session
    #: whose shard holds its guild (the per-session firehose, `event_rate`, is off in this mode).
    guild_event_rate: float = 0.0
    #: Guild-stream mode: event records the guild ledger keeps for its `records` list (counters are exact).
    guild_ledger_records: int = 10_000
    #: Probability that a firehose event is a large GUILD_CREATE.
    large_guild_probability: float = 0.0
    #: Size of a large GUILD_CREATE in bytes (before compression).
    large_guild_bytes: int = 1_000_000
    #: Transport compressions the gateway accepts; asking for another closes the connection with 4002.
    compressions: tuple[Compression, ...] = ("zlib-stream", "zstd-stream", "none")
    #: zlib-stream: compressed messages longer than this are sent as several WS messages of at most this
    #: many bytes each (0 = never split). Discord splits only large messages.
    zlib_split_bytes: int = 0
    #: zlib-stream compression level (1 fastest, 9 smallest).
    zlib_level: int = 6
    #: zstd window log (Discord's captured HELLO decodes to 18).
    zstd_window_log: int = 18
    #: Seconds a disconnected session stays resumable.
    session_ttl_s: float = 120.0
    #: Dispatches kept per session for RESUME replay; a resume from an older seq gets op 9 false.
    replay_buffer: int = 100_000
    #: Large bots must run a multiple of this many shards (0 = no such rule).
    shard_multiple: int = 0
    #: Most guilds one shard may hold before IDENTIFY gets 4011.
    max_guilds_per_shard: int = 2500
    #: Whether the privileged intents (GUILD_MEMBERS, GUILD_PRESENCES, MESSAGE_CONTENT) are approved.
    privileged_intents: bool = False
    #: Seconds to wait before answering an identify-window violation with op 9 false (Discord delays it).
    invalid_session_delay_s: float = 1.0


@dataclass(frozen=True, slots=True)
class RestConfig:
    """How the simulated REST API behaves."""

    #: Global requests per second per token (and per IP for unauthenticated requests).
    global_limit: int = 50
    #: Multiplies every bucket window (0.1 makes a 5 s bucket a 0.5 s one, for fast tests).
    bucket_time_scale: float = 1.0
    #: Added response latency: the median milliseconds of a lognormal delay.
    latency_ms: float = 0.0
    #: Sigma of that lognormal delay (0 = always exactly `latency_ms`).
    latency_sigma: float = 0.0
    #: Invalid requests (401, 403, non-shared 429) per source IP within `invalid_window_s` before a ban.
    invalid_request_limit: int = 10_000
    #: The sliding window of that invalid-request count, in seconds (Discord: 10 minutes).
    invalid_window_s: float = 600.0
    #: How long a ban lasts; while banned every answer is a non-JSON 429.
    ban_duration_s: float = 3600.0
    #: Hidden sub-limit on channel name/topic edits: this many per `sublimit_window_s` per channel.
    sublimit_count: int = 2
    #: The window of that sub-limit, in seconds (Discord: 10 minutes).
    sublimit_window_s: float = 600.0
    #: Send `X-RateLimit-Scope` on successful answers too (Discord documents it for 429s only).
    scope_on_success: bool = False
    #: Offset added to the server's wall clock in `X-RateLimit-Reset` (to test clients for skew).
    wall_clock_offset_s: float = 0.0
    #: Probability that a reaction request gets a shared-scope 429 ("other users" on that message's channel).
    reaction_shared_probability: float = 0.0
    #: `retry_after` of those random shared-scope 429s, in seconds (Discord's can be minutes).
    shared_retry_after_s: float = 30.0
    #: Draw every bucket's limit, window and sliding/fixed kind from `seed` instead of the realistic table.
    random_bucket_shapes: bool = False
    #: Request records the REST ledger keeps for its `requests` list (counters are always exact).
    ledger_records: int = 10_000


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Everything a simulator run needs. Ports 0 pick free ports; read them back from the running app."""

    #: Address every port listens on (keep it on loopback).
    host: str = "127.0.0.1"
    #: Port of the REST API and the control endpoint (0 = any free port).
    rest_port: int = 0
    #: Port of the gateway, the `url` in `GET /gateway/bot` (0 = any free port).
    gateway_port: int = 0
    #: Port of READY's `resume_gateway_url` (0 = any free port).
    resume_port: int = 0
    #: Bot tokens that authenticate.
    tokens: tuple[str, ...] = (DEFAULT_TOKEN,)
    #: Accept every non-empty token instead of only `tokens`.
    accept_any_token: bool = False
    #: Seeds the route catalogue's bucket hashes and the firehose's content.
    seed: int = 0
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    rest: RestConfig = field(default_factory=RestConfig)

    def replace(self, **changes: object) -> SimulatorConfig:
        """Return a copy with top-level fields changed (`gateway=` and `rest=` take whole sections)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
