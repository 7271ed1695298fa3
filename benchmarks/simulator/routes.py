"""The simulated REST API's route catalogue: route templates, their bucket groups, and path matching.

Design note. Discord keys a per-route limit by (token, bucket, major parameters); the bucket hash it sends
excludes the majors (`channel_id`, `guild_id`, `webhook_id` + `webhook_token`; here also the interaction id
of a callback, since each interaction is its own resource). A `BucketGroup` is one *counter*: every route
that names the same group shares the counter (reaction routes, discord-api-docs #981; role add/remove). Two
groups may carry the same `hash_key` and so send the same `X-RateLimit-Bucket` while counting separately
(POST vs DELETE message, #8073), which is why a client must key by hash *and* major and may over-throttle.
Routes with `group=None` send no bucket headers and are limited only by the global limit (#1135).

Shapes are fixed, realistic values (so tests and reports can name them); hashes are 32 hex digits derived
from the seed. `random_shapes=True` draws every shape from the seed instead, as the benchmark plan's
"generated catalogue" asks; the split of about 70 % sliding buckets holds either way.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final

from .buckets import BucketShape

#: Path parameters that split a bucket's counter (Discord's "major parameters").
MAJOR_PARAMS: Final = ("channel_id", "guild_id", "webhook_id", "webhook_token", "interaction_id")
#: Parameters that must be snowflakes (digits); `message_id` may also be `@original`.
SNOWFLAKE_PARAMS: Final = frozenset(
    {
        "channel_id",
        "guild_id",
        "message_id",
        "user_id",
        "role_id",
        "webhook_id",
        "interaction_id",
        "application_id",
        "command_id",
        "emoji_id",
    }
)
#: Limits and windows (seconds) that `random_shapes` draws from (the benchmark plan's ranges).
RANDOM_LIMITS: Final = (1, 2, 3, 5, 10, 30, 50)
RANDOM_WINDOWS_S: Final = (0.25, 1.0, 5.0, 10.0, 30.0, 60.0)
RANDOM_SLIDING_FRACTION: Final = 0.7


@dataclass(frozen=True, slots=True)
class BucketGroup:
    """One counter: its name (unique), the key its hash derives from (shared by some groups), its shape."""

    name: str
    hash_key: str
    shape: BucketShape


@dataclass(frozen=True, slots=True)
class Route:
    """One route template.

    `kind` selects the answer payload (see `payloads.py`); `auth` says whether a bot token is required;
    `interaction` marks global-exempt interaction routes; `webhook` marks webhook-with-token routes
    (subject to webhook faults; a follow-up whose `webhook_id` is the application id is an interaction
    route too); `json_body` means a JSON body is required.
    """

    method: str
    template: str
    group: str | None
    kind: str
    auth: bool = True
    interaction: bool = False
    webhook: bool = False
    json_body: bool = False

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.template.strip("/").split("/"))

    @property
    def label(self) -> str:
        return f"{self.method} {self.template}"


def _shape(limit: int, window_s: float, sliding: bool = True) -> BucketShape:
    return BucketShape(limit, window_s, sliding)


#: Counters (name → hash key, shape): 31 counters, 8 of them fixed windows (about 75 % sliding).
GROUPS: Final[tuple[tuple[str, str, BucketShape], ...]] = (
    ("messages-read", "messages-read", _shape(5, 5.0)),
    ("message-create", "messages-write", _shape(5, 5.0)),
    ("message-delete", "messages-write", _shape(5, 5.0)),  # same hash as create, separate counter (#8073)
    ("message-edit", "messages-edit", _shape(5, 5.0)),
    ("message-delete-old", "messages-delete-old", _shape(30, 120.0, sliding=False)),
    ("bulk-delete", "bulk-delete", _shape(1, 1.0)),
    ("typing", "typing", _shape(5, 5.0)),
    ("reactions", "reactions", _shape(1, 0.25)),
    ("reactions-read", "reactions-read", _shape(2, 1.0)),
    ("channel-read", "channel-read", _shape(5, 1.0)),
    ("channel-edit", "channel-edit", _shape(10, 15.0)),
    ("channel-delete", "channel-delete", _shape(5, 5.0)),
    ("pins-read", "pins-read", _shape(5, 5.0)),
    ("pins-modify", "pins-modify", _shape(5, 5.0, sliding=False)),
    ("member-read", "member-read", _shape(10, 10.0)),
    ("member-edit", "member-edit", _shape(10, 10.0)),
    ("member-kick", "member-kick", _shape(5, 1.0, sliding=False)),
    ("member-roles", "member-roles", _shape(10, 10.0, sliding=False)),
    ("roles-read", "roles-read", _shape(5, 1.0)),
    ("role-create", "role-create", _shape(10, 10.0, sliding=False)),
    ("role-edit", "roles-write", _shape(10, 10.0)),
    ("role-delete", "roles-write", _shape(10, 10.0)),  # same hash as role edit, separate counter
    ("bans", "bans", _shape(5, 5.0, sliding=False)),
    ("guild-read", "guild-read", _shape(5, 5.0)),
    ("emoji-create", "emoji-create", _shape(50, 60.0)),
    ("webhook-manage", "webhook-manage", _shape(5, 5.0, sliding=False)),
    ("webhook-execute", "webhook-execute", _shape(5, 2.0)),
    ("webhook-message", "webhook-message", _shape(5, 2.0)),
    ("interaction-callback", "interaction-callback", _shape(5, 1.0)),
    ("commands", "commands", _shape(5, 20.0, sliding=False)),
    ("commands-read", "commands-read", _shape(5, 5.0)),
)

_C: Final = "/channels/{channel_id}"
_M: Final = "/channels/{channel_id}/messages/{message_id}"
_G: Final = "/guilds/{guild_id}"
_W: Final = "/webhooks/{webhook_id}/{webhook_token}"
_A: Final = "/applications/{application_id}"

#: The catalogue. Order matters only among templates that match the same path: literal segments win.
ROUTES: Final[tuple[Route, ...]] = (
    Route("GET", "/gateway", None, "gateway", auth=False),
    Route("GET", "/gateway/bot", None, "gateway_bot"),
    Route("GET", "/users/@me", None, "me"),
    Route("GET", "/users/{user_id}", None, "user"),
    Route("GET", "/oauth2/applications/@me", None, "application"),
    Route("GET", "/applications/@me", None, "application"),
    Route("GET", f"{_C}/messages", "messages-read", "messages"),
    Route("GET", _M, "messages-read", "message"),
    Route("POST", f"{_C}/messages", "message-create", "message", json_body=True),
    Route("PATCH", _M, "message-edit", "message", json_body=True),
    Route("DELETE", _M, "message-delete", "empty"),
    Route("POST", f"{_C}/messages/bulk-delete", "bulk-delete", "empty", json_body=True),
    Route("POST", f"{_C}/typing", "typing", "empty"),
    Route("PUT", f"{_M}/reactions/{{emoji}}/@me", "reactions", "empty"),
    Route("DELETE", f"{_M}/reactions/{{emoji}}/@me", "reactions", "empty"),
    Route("DELETE", f"{_M}/reactions/{{emoji}}/{{user_id}}", "reactions", "empty"),
    Route("DELETE", f"{_M}/reactions", "reactions", "empty"),
    Route("GET", f"{_M}/reactions/{{emoji}}", "reactions-read", "users"),
    Route("GET", _C, "channel-read", "channel"),
    Route("PATCH", _C, "channel-edit", "channel", json_body=True),
    Route("DELETE", _C, "channel-delete", "channel"),
    Route("GET", f"{_C}/pins", "pins-read", "messages"),
    Route("PUT", f"{_C}/pins/{{message_id}}", "pins-modify", "empty"),
    Route("DELETE", f"{_C}/pins/{{message_id}}", "pins-modify", "empty"),
    Route("GET", f"{_G}", "guild-read", "guild"),
    Route("GET", f"{_G}/channels", "guild-read", "channels"),
    Route("GET", f"{_G}/members", "member-read", "members"),
    Route("GET", f"{_G}/members/{{user_id}}", "member-read", "member"),
    Route("PATCH", f"{_G}/members/{{user_id}}", "member-edit", "member", json_body=True),
    Route("DELETE", f"{_G}/members/{{user_id}}", "member-kick", "empty"),
    Route("PUT", f"{_G}/members/{{user_id}}/roles/{{role_id}}", "member-roles", "empty"),
    Route("DELETE", f"{_G}/members/{{user_id}}/roles/{{role_id}}", "member-roles", "empty"),
    Route("GET", f"{_G}/roles", "roles-read", "roles"),
    Route("POST", f"{_G}/roles", "role-create", "role", json_body=True),
    Route("PATCH", f"{_G}/roles/{{role_id}}", "role-edit", "role", json_body=True),
    Route("DELETE", f"{_G}/roles/{{role_id}}", "role-delete", "empty"),
    Route("GET", f"{_G}/bans", "bans", "bans"),
    Route("PUT", f"{_G}/bans/{{user_id}}", "bans", "empty"),
    Route("DELETE", f"{_G}/bans/{{user_id}}", "bans", "empty"),
    Route("POST", f"{_G}/emojis", "emoji-create", "emoji", json_body=True),
    Route("POST", f"{_C}/webhooks", "webhook-manage", "webhook", json_body=True),
    Route("GET", f"{_C}/webhooks", "webhook-manage", "webhooks"),
    Route("GET", "/webhooks/{webhook_id}", "webhook-manage", "webhook"),
    Route("DELETE", "/webhooks/{webhook_id}", "webhook-manage", "empty"),
    Route("POST", _W, "webhook-execute", "message", auth=False, webhook=True, json_body=True),
    Route("GET", f"{_W}/messages/{{message_id}}", "webhook-message", "message", auth=False, webhook=True),
    Route(
        "PATCH",
        f"{_W}/messages/{{message_id}}",
        "webhook-message",
        "message",
        auth=False,
        webhook=True,
        json_body=True,
    ),
    Route("DELETE", f"{_W}/messages/{{message_id}}", "webhook-message", "empty", auth=False, webhook=True),
    Route(
        "POST",
        "/interactions/{interaction_id}/{interaction_token}/callback",
        "interaction-callback",
        "empty",
        auth=False,
        interaction=True,
        json_body=True,
    ),
    Route("GET", f"{_A}/commands", "commands-read", "commands"),
    Route("POST", f"{_A}/commands", "commands", "command", json_body=True),
    Route("PUT", f"{_A}/commands", "commands", "commands", json_body=True),
    Route("PATCH", f"{_A}/commands/{{command_id}}", "commands", "command", json_body=True),
    Route("DELETE", f"{_A}/commands/{{command_id}}", "commands", "empty"),
    Route("GET", f"{_A}/guilds/{{guild_id}}/commands", "commands-read", "commands"),
    Route("POST", f"{_A}/guilds/{{guild_id}}/commands", "commands", "command", json_body=True),
    Route("PUT", f"{_A}/guilds/{{guild_id}}/commands", "commands", "commands", json_body=True),
)

#: The label that the old-message DELETE family reports in the ledger.
OLD_MESSAGE_DELETE_LABEL: Final = f"DELETE {_M} (older than 14 days)"
OLD_MESSAGE_DELETE_GROUP: Final = "message-delete-old"
#: Discord's epoch (2015-01-01) in Unix milliseconds, and the age that moves a DELETE to the old family.
DISCORD_EPOCH_MS: Final = 1_420_070_400_000
OLD_MESSAGE_AGE_MS: Final = 14 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """A request matched to a route: its parameters and the values of its major parameters."""

    route: Route
    params: Mapping[str, str]
    major: str


def bucket_hash(seed: int, hash_key: str) -> str:
    """The 32-hex `X-RateLimit-Bucket` for a hash key under `seed` (stable across runs)."""
    return hashlib.blake2b(f"{seed}:{hash_key}".encode(), digest_size=16).hexdigest()


def snowflake_time_ms(snowflake: int) -> int:
    """Unix milliseconds encoded in a snowflake."""
    return (snowflake >> 22) + DISCORD_EPOCH_MS


class RouteCatalogue:
    """The routes and bucket groups of one simulator run."""

    def __init__(self, seed: int, *, random_shapes: bool = False, time_scale: float = 1.0) -> None:
        rng = random.Random(seed)
        self.groups: dict[str, BucketGroup] = {}
        for name, hash_key, shape in GROUPS:
            if random_shapes:
                shape = BucketShape(
                    rng.choice(RANDOM_LIMITS),
                    rng.choice(RANDOM_WINDOWS_S),
                    rng.random() < RANDOM_SLIDING_FRACTION,
                )
            self.groups[name] = BucketGroup(
                name, hash_key, replace(shape, window_s=shape.window_s * time_scale)
            )
        if random_shapes:  # groups that share a hash must share a shape, or the hash would lie
            by_hash: dict[str, BucketShape] = {}
            for name, group in self.groups.items():
                shape = by_hash.setdefault(group.hash_key, group.shape)
                self.groups[name] = replace(group, shape=shape)
        self.hashes: dict[str, str] = {g.name: bucket_hash(seed, g.hash_key) for g in self.groups.values()}
        self._by_shape: dict[tuple[str, int], list[Route]] = {}
        for route in sorted(ROUTES, key=lambda r: -sum(not s.startswith("{") for s in r.segments)):
            self._by_shape.setdefault((route.method, len(route.segments)), []).append(route)

    @property
    def routes(self) -> tuple[Route, ...]:
        return ROUTES

    def match(self, method: str, path: str) -> RouteMatch | None:
        """Match `method` and an API path (`/channels/1/messages`, no prefix, no query) to a route."""
        parts = path.strip("/").split("/")
        for route in self._by_shape.get((method, len(parts)), ()):
            params = _match_segments(route.segments, parts)
            if params is not None:
                major = "/".join(params[name] for name in MAJOR_PARAMS if name in params)
                return RouteMatch(route, params, major)
        return None

    def group_for(self, match: RouteMatch, now_ms: float) -> BucketGroup | None:
        """The counter a matched request uses (DELETE of a message older than 14 days has its own)."""
        route = match.route
        if route.group == "message-delete" and is_old_message(match.params["message_id"], now_ms):
            return self.groups[OLD_MESSAGE_DELETE_GROUP]
        return self.groups[route.group] if route.group is not None else None


def is_old_message(message_id: str, now_ms: float) -> bool:
    """Whether a message id is older than 14 days at `now_ms` (Unix milliseconds)."""
    return message_id.isdigit() and now_ms - snowflake_time_ms(int(message_id)) > OLD_MESSAGE_AGE_MS


def _match_segments(template: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    params: dict[str, str] = {}
    for pattern, part in zip(template, parts, strict=True):
        if not pattern.startswith("{"):
            if pattern != part:
                return None
            continue
        name = pattern[1:-1]
        if not part:
            return None
        if (
            name in SNOWFLAKE_PARAMS
            and not part.isdigit()
            and not (name == "message_id" and part == "@original")
        ):
            return None
        params[name] = part
    return params
