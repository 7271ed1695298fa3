"""Route keys: which Discord REST limit a request falls under, computed from its method and path alone.

Design note. Requirement R1 (`anchors/ratelimit.md` 1.4): the state of a per-route limit is keyed by
(identity, bucket hash, major values). Discord only tells us the bucket hash after a response, so the engine
keeps a map *route -> hash* whose key is the method plus the path with every snowflake, emoji and token
replaced (`RouteKey.route`), and it keeps the top-level resource values apart (`RouteKey.majors`): channel
id, guild id, webhook id plus a hash of the webhook token, interaction id. This is what discord.py's
`Route.key` + major parameters, discord.js's `method:template` + `majorParameter` and hikari's compiled route
+ major params do (sections 2.3-2.5); like discord.py (and the simulator) a guild id deeper in the path
(`/applications/{a}/guilds/{g}/commands`) is a major too.

Why not keep the raw path as the key (nirn keeps the channel id in its path key): every new message id would
be an unknown route, each costing a serialised probe (R2) and a map entry. Why not drop every id: requests on
different channels share one hash but not one counter, so dropping the majors over-throttles all channels
into one queue. Special families (R1): PUT/DELETE of reactions on a message share one counter whatever the
emoji or user (discord-api-docs #981; discord.js `:reaction`, nirn `!modify`), so they collapse into one
route; DELETE of a message older than 14 days has its own hidden bucket (#1295), so it is its own route; an
interaction callback, and a webhook follow-up whose webhook is the application itself, are exempt from the
global limit (R5), and each interaction is its own resource.

Pure: no I/O and no clock. The old-message rule needs the current time, so the caller passes `now_ms`
(Unix milliseconds); without it a DELETE is never classified as old. Tokens never appear in a key: webhook
and interaction tokens become placeholders and only a truncated SHA-256 of a webhook token is kept as a
major (its 48 bits name a resource; they cannot be turned back into the token).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CODE_NAMES",
    "DISCORD_EPOCH_MS",
    "ID_NAMES",
    "INTERACTION_TOKEN_PREFIX",
    "MAJOR_PLACEHOLDERS",
    "OLD_MESSAGE_AGE_MS",
    "OLD_MESSAGE_DELETE_FAMILY",
    "REACTIONS_FAMILY",
    "RouteKey",
    "is_old_message",
    "route_key",
    "snowflake_time_ms",
    "token_id",
]

#: Discord's epoch (2015-01-01T00:00:00Z) in Unix milliseconds; a snowflake's top 42 bits count from it.
DISCORD_EPOCH_MS: Final = 1_420_070_400_000
#: A DELETE of a message strictly older than this falls in the old-message family (discord-api-docs #1295).
OLD_MESSAGE_AGE_MS: Final = 14 * 24 * 3600 * 1000

REACTIONS_FAMILY: Final = "reactions"
OLD_MESSAGE_DELETE_FAMILY: Final = "old_message_delete"

#: Interaction tokens are base64 of `interaction:<id>:<secret>`; this is the base64 of `interaction:`.
INTERACTION_TOKEN_PREFIX: Final = "aW50ZXJhY3Rpb246"

#: Placeholders whose values are kept as majors (Discord's "top-level resources").
MAJOR_PLACEHOLDERS: Final = frozenset({"channel_id", "guild_id", "webhook_id", "interaction_id"})

#: Placeholder names for the id that follows a collection segment. After one of these, any run of 1-20 ASCII
#: digits is an id (tests and the simulator use short ids such as `/channels/1`); elsewhere only a real
#: snowflake (17-20 digits) is.
ID_NAMES: Final[Mapping[str, str]] = {
    "channels": "channel_id",
    "messages": "message_id",
    "guilds": "guild_id",
    "webhooks": "webhook_id",
    "users": "user_id",
    "roles": "role_id",
    "members": "user_id",
    "bans": "user_id",
    "pins": "message_id",
    "commands": "command_id",
    "applications": "application_id",
    "interactions": "interaction_id",
    "emojis": "emoji_id",
    "stickers": "sticker_id",
    "recipients": "user_id",
    "thread-members": "user_id",
    "voice-states": "user_id",
    "permissions": "overwrite_id",
    "integrations": "integration_id",
    "scheduled-events": "guild_scheduled_event_id",
    "stage-instances": "channel_id",
    "polls": "message_id",
    "answers": "answer_id",
    "entitlements": "entitlement_id",
    "skus": "sku_id",
    "subscriptions": "subscription_id",
    "soundboard-sounds": "sound_id",
    "lobbies": "lobby_id",
    "rules": "auto_moderation_rule_id",
}
#: Collections whose members are named by a code, not a snowflake.
CODE_NAMES: Final[Mapping[str, str]] = {"invites": "invite_code", "templates": "template_code"}

_SNOWFLAKE: Final = re.compile(r"[0-9]{17,20}")
_SHORT_ID: Final = re.compile(r"[0-9]{1,20}")
_API_VERSION: Final = re.compile(r"v[0-9]{1,3}")
_METHOD: Final = re.compile(r"[A-Za-z]{1,16}")
_COLLECTION: Final = re.compile(r"[a-z]+(?:-[a-z]+)*")
_FORBIDDEN: Final = re.compile(r"[\s{}\x00-\x1f\x7f]")
#: Roots whose second segment is an id and third a token (`/webhooks/{id}/{token}`, `/interactions/...`).
_TOKEN_ROOTS: Final = frozenset({"webhooks", "interactions"})
_MESSAGE_TEMPLATE: Final = "/channels/{channel_id}/messages/{message_id}"
_REACTIONS_TEMPLATE: Final = _MESSAGE_TEMPLATE + "/reactions"


@dataclass(frozen=True, slots=True)
class RouteKey:
    """Where a request stands for rate limiting: its route template, major values and family.

    `template` is the path with ids, emoji and tokens replaced by `{name}` placeholders; `majors` holds the
    values of the top-level resources in the order they appear (a webhook token only as its hash);
    `family` is `"reactions"`, `"old_message_delete"` or None; `interaction` marks global-exempt routes.
    """

    method: str
    template: str
    majors: tuple[str, ...]
    family: str | None
    interaction: bool

    @property
    def route(self) -> str:
        """The key of the route -> bucket hash map: method and template, plus the family when there is one."""
        if self.family == REACTIONS_FAMILY:
            # One route for every PUT/DELETE under a message's reactions, whatever the emoji or user.
            return f"PUT|DELETE {_REACTIONS_TEMPLATE} !{REACTIONS_FAMILY}"
        if self.family is not None:
            return f"{self.method} {self.template} !{self.family}"
        return f"{self.method} {self.template}"


def route_key(
    method: str, path: str, *, application_id: int | None = None, now_ms: int | None = None
) -> RouteKey:
    """The route key of a request.

    `path` is the request path, with or without `/api` and `/api/v{N}`; a query string is ignored.
    `application_id` (the bot's application id) marks webhook follow-ups of interactions as global-exempt
    when their token does not already show it; `now_ms` (Unix ms) enables the old-message DELETE family.
    Raises `ValueError` for an empty or malformed method or path.
    """
    verb = _method(method)
    segments = _segments(path)
    out: list[str] = []
    majors: list[str] = []
    interaction = False
    root = segments[0]
    for index, segment in enumerate(segments):
        previous = out[-1] if out else ""
        if root in _TOKEN_ROOTS and index == 1 and segment:
            out.append("{" + ID_NAMES[root] + "}")
            majors.append(segment)
        elif root in _TOKEN_ROOTS and index == 2 and segment and out[1].startswith("{"):
            if root == "interactions":
                # The interaction id is already the major; the token adds nothing but a secret.
                interaction = True
                out.append("{interaction_token}")
                continue
            application = application_id is not None and segments[1] == str(application_id)
            if application or segment.startswith(INTERACTION_TOKEN_PREFIX):
                interaction = True
                out[1] = "{application_id}"
                out.append("{interaction_token}")
            else:
                out.append("{webhook_token}")
            majors.append(_digest(segment))
        elif previous == "reactions" and len(out) >= 2 and out[-2] == "{message_id}" and segment:
            out.append("{emoji}")
        elif previous == "{emoji}" and _SHORT_ID.fullmatch(segment):
            out.append("{user_id}")
        elif previous in CODE_NAMES and segment and not segment.startswith("@"):
            out.append("{" + CODE_NAMES[previous] + "}")
        elif (name := _id_name(previous, segment)) is not None:
            out.append("{" + name + "}")
            if name in MAJOR_PLACEHOLDERS:
                majors.append(segment)
        else:
            out.append(segment)
    template = "/" + "/".join(out)
    family: str | None = None
    if verb == "DELETE" and template == _MESSAGE_TEMPLATE:
        if now_ms is not None and is_old_message(int(segments[3]), now_ms):
            family = OLD_MESSAGE_DELETE_FAMILY
    elif verb in ("PUT", "DELETE") and (
        template == _REACTIONS_TEMPLATE or template.startswith(_REACTIONS_TEMPLATE + "/")
    ):
        family = REACTIONS_FAMILY
    return RouteKey(verb, template, tuple(majors), family, interaction)


def token_id(authorization: str | None) -> str:
    """A short stable name for the token in an `Authorization` value (`Bot x`, `Bearer x` or bare `x`).

    "" when there is none. The same name as the simulator's ledger gives the token (SHA-256 of the bare
    token, 12 hex digits), so the two can be compared; the token itself is never returned or logged.
    """
    if authorization is None:
        return ""
    value = authorization.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() in ("bot", "bearer") and rest.strip():
        value = rest.strip()
    return _digest(value) if value else ""


def snowflake_time_ms(snowflake: int) -> int:
    """Unix milliseconds encoded in a snowflake."""
    return (snowflake >> 22) + DISCORD_EPOCH_MS


def is_old_message(message_id: int, now_ms: int) -> bool:
    """Whether a message is strictly older than 14 days at `now_ms` (the old-message DELETE family)."""
    return now_ms - snowflake_time_ms(message_id) > OLD_MESSAGE_AGE_MS


def _digest(secret: str) -> str:
    # surrogatepass: a str from a header or a property test may hold lone surrogates; hashing must not fail.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _method(method: str) -> str:
    if not _METHOD.fullmatch(method):
        raise ValueError(f"HTTP method must be 1-16 ASCII letters, got {method!r}")
    return method.upper()


def _segments(path: str) -> list[str]:
    """The path's segments after the `/api[/vN]` prefix, without the query string."""
    path = path.partition("?")[0].partition("#")[0]
    if not path.startswith("/"):
        raise ValueError(f"REST path must start with '/', got {path[:80]!r}")
    if _FORBIDDEN.search(path):
        # Braces would forge placeholders and whitespace would forge route strings; neither is a valid path.
        raise ValueError("REST path must not contain whitespace, control characters or braces")
    segments = path[1:].split("/")
    if segments[0] == "api":
        segments = segments[1:]
        if segments and _API_VERSION.fullmatch(segments[0]):
            segments = segments[1:]
    if not segments or segments == [""]:
        raise ValueError(f"REST path names no resource: {path[:80]!r}")
    return segments


def _id_name(previous: str, segment: str) -> str | None:
    """The placeholder name for `segment` when it is an id, else None."""
    if previous in ID_NAMES:
        return ID_NAMES[previous] if _SHORT_ID.fullmatch(segment) else None
    if not _SNOWFLAKE.fullmatch(segment):
        return None
    if _COLLECTION.fullmatch(previous):
        return previous.replace("-", "_").removesuffix("s") + "_id"
    return "id"
