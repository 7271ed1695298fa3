"""Plausible Discord JSON bodies for the simulated REST routes, cheap to build.

Objects carry the fields discord.py 2.7 and hikari read without defaults (a message's `author`,
`timestamp`, `mentions`...; a user's `avatar`, `discriminator`; the application's `owner`, `verify_key`...),
and nothing else worth the cost. Ids are fresh snowflakes from `SnowflakeMinter` unless the path names one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from .config import BOT_USER_ID
from .routes import DISCORD_EPOCH_MS

Json = dict[str, Any]
#: A fixed guild and channel id for answers whose path names none.
DEFAULT_GUILD_ID: Final = "1087654321098765000"
OWNER_USER_ID: Final = "1087654321098765001"
VERIFY_KEY_HEX: Final = "9a" * 32


class SnowflakeMinter:
    """Fresh snowflakes from the wall clock with an increasing sequence number."""

    def __init__(self) -> None:
        self._sequence = 0

    def next(self) -> str:
        self._sequence = (self._sequence + 1) & 0x3FFFFF
        return str(((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | self._sequence)


def bot_user() -> Json:
    """The bot's own user (`GET /users/@me`): fields of discord.py's ClientUser and hikari's OwnUser."""
    return {
        "id": str(BOT_USER_ID),
        "username": "simulator-bot",
        "discriminator": "0",
        "global_name": None,
        "avatar": None,
        "banner": None,
        "accent_color": None,
        "bot": True,
        "system": False,
        "mfa_enabled": False,
        "verified": True,
        "locale": "en-US",
        "email": None,
        "flags": 0,
        "public_flags": 0,
        "premium_type": 0,
    }


def user(user_id: str) -> Json:
    return {
        "id": user_id,
        "username": f"user{user_id[-4:]}",
        "discriminator": "0",
        "global_name": None,
        "avatar": None,
        "public_flags": 0,
    }


def application() -> Json:
    """`GET /oauth2/applications/@me` and `/applications/@me`: what discord.py's `AppInfo` requires."""
    return {
        "id": str(BOT_USER_ID),
        "name": "simulator-bot",
        "icon": None,
        "description": "A Discord simulator's bot application.",
        "summary": "",
        "type": None,
        "bot_public": True,
        "bot_require_code_grant": False,
        "verify_key": VERIFY_KEY_HEX,
        "flags": 0,
        "owner": user(OWNER_USER_ID),
        "team": None,
        "bot": bot_user(),
        "approximate_guild_count": 0,
        "redirect_uris": [],
        "tags": [],
    }


def _timestamp() -> str:
    return datetime.now(UTC).isoformat()


def message(channel_id: str, message_id: str, content: str = "", *, webhook_id: str | None = None) -> Json:
    author = bot_user() if webhook_id is None else {**user(webhook_id), "bot": True}
    payload: Json = {
        "id": message_id,
        "channel_id": channel_id,
        "author": author,
        "content": content,
        "timestamp": _timestamp(),
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "components": [],
        "pinned": False,
        "type": 0,
        "flags": 0,
    }
    if webhook_id is not None:
        payload["webhook_id"] = webhook_id
    return payload


def channel(channel_id: str, guild_id: str = DEFAULT_GUILD_ID, name: str = "general") -> Json:
    return {
        "id": channel_id,
        "type": 0,
        "guild_id": guild_id,
        "name": name,
        "position": 0,
        "topic": None,
        "nsfw": False,
        "permission_overwrites": [],
        "parent_id": None,
        "last_message_id": None,
        "rate_limit_per_user": 0,
        "flags": 0,
    }


def role(role_id: str, name: str = "role") -> Json:
    return {
        "id": role_id,
        "name": name,
        "color": 0,
        "hoist": False,
        "icon": None,
        "unicode_emoji": None,
        "position": 1,
        "permissions": "0",
        "managed": False,
        "mentionable": False,
        "flags": 0,
    }


def member(user_id: str) -> Json:
    return {
        "user": user(user_id),
        "nick": None,
        "avatar": None,
        "roles": [],
        "joined_at": _timestamp(),
        "premium_since": None,
        "deaf": False,
        "mute": False,
        "flags": 0,
        "pending": False,
    }


def guild(guild_id: str) -> Json:
    return {
        "id": guild_id,
        "name": f"guild {guild_id[-4:]}",
        "icon": None,
        "splash": None,
        "discovery_splash": None,
        "owner_id": OWNER_USER_ID,
        "afk_channel_id": None,
        "afk_timeout": 300,
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "roles": [role(guild_id, "@everyone")],
        "emojis": [],
        "stickers": [],
        "features": [],
        "mfa_level": 0,
        "application_id": None,
        "system_channel_id": None,
        "system_channel_flags": 0,
        "rules_channel_id": None,
        "vanity_url_code": None,
        "description": None,
        "banner": None,
        "premium_tier": 0,
        "preferred_locale": "en-US",
        "public_updates_channel_id": None,
        "nsfw_level": 0,
        "premium_progress_bar_enabled": False,
    }


def webhook(webhook_id: str, channel_id: str, token: str) -> Json:
    return {
        "id": webhook_id,
        "type": 1,
        "guild_id": DEFAULT_GUILD_ID,
        "channel_id": channel_id,
        "name": "simulator-hook",
        "avatar": None,
        "token": token,
        "application_id": None,
        "user": bot_user(),
    }


def command(command_id: str, guild_id: str | None = None, name: str = "ping") -> Json:
    return {
        "id": command_id,
        "application_id": str(BOT_USER_ID),
        "guild_id": guild_id,
        "name": name,
        "description": "A simulated command.",
        "type": 1,
        "options": [],
        "default_member_permissions": None,
        "dm_permission": True,
        "nsfw": False,
        "version": command_id,
    }


def emoji(emoji_id: str, name: str) -> Json:
    return {
        "id": emoji_id,
        "name": name,
        "roles": [],
        "user": bot_user(),
        "require_colons": True,
        "managed": False,
        "animated": False,
        "available": True,
    }


#: Builds an answer from the path parameters, the parsed JSON body (any JSON value) and an id source.
PayloadBuilder = Callable[[Mapping[str, str], Any, SnowflakeMinter], Any]


def _body_str(body: Any, key: str, default: str) -> str:
    value = body.get(key) if isinstance(body, Mapping) else None
    return value if isinstance(value, str) else default


def _message(params: Mapping[str, str], body: Any, ids: SnowflakeMinter) -> Json:
    message_id = params.get("message_id", "@original")
    if message_id == "@original" or "message_id" not in params:
        message_id = ids.next()
    channel_id = params.get("channel_id", DEFAULT_GUILD_ID)
    return message(
        channel_id, message_id, _body_str(body, "content", ""), webhook_id=params.get("webhook_id")
    )


def _messages(params: Mapping[str, str], body: Any, ids: SnowflakeMinter) -> list[Json]:
    return [message(params["channel_id"], ids.next(), "hello") for _ in range(2)]


def _command(params: Mapping[str, str], body: Any, ids: SnowflakeMinter) -> Json:
    return command(
        params.get("command_id") or ids.next(), params.get("guild_id"), _body_str(body, "name", "ping")
    )


def _commands(params: Mapping[str, str], body: Any, ids: SnowflakeMinter) -> list[Json]:
    if isinstance(body, list):
        names = [item.get("name", "cmd") if isinstance(item, dict) else "cmd" for item in body]
        return [command(ids.next(), params.get("guild_id"), str(name)) for name in names]
    return [command(ids.next(), params.get("guild_id"))]


#: Builders by route `kind`; `empty` (204) is handled by the caller.
BUILDERS: Final[dict[str, PayloadBuilder]] = {
    "me": lambda p, b, i: bot_user(),
    "user": lambda p, b, i: user(p["user_id"]),
    "users": lambda p, b, i: [user(OWNER_USER_ID)],
    "application": lambda p, b, i: application(),
    "message": _message,
    "messages": _messages,
    "channel": lambda p, b, i: channel(p["channel_id"], name=_body_str(b, "name", "general")),
    "channels": lambda p, b, i: [channel(i.next(), p["guild_id"])],
    "guild": lambda p, b, i: guild(p["guild_id"]),
    "member": lambda p, b, i: member(p["user_id"]),
    "members": lambda p, b, i: [member(OWNER_USER_ID)],
    "role": lambda p, b, i: role(p.get("role_id") or i.next(), _body_str(b, "name", "new role")),
    "roles": lambda p, b, i: [role(p["guild_id"], "@everyone")],
    "bans": lambda p, b, i: [],
    "emoji": lambda p, b, i: emoji(i.next(), _body_str(b, "name", "emoji")),
    "webhook": lambda p, b, i: webhook(
        p.get("webhook_id") or i.next(), p.get("channel_id", DEFAULT_GUILD_ID), "simulated-webhook-token"
    ),
    "webhooks": lambda p, b, i: [],
    "command": _command,
    "commands": _commands,
}
