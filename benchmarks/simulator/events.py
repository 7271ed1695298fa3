"""Realistic gateway payloads: READY, GUILD_CREATE and the firehose mix.

The firehose must be cheap to produce (the simulator shares the machine with the worker it feeds), so each
session draws from a small pool of pre-serialised `d` bodies and only formats the envelope with its own
sequence number. Guild ids are chosen so that `(guild_id >> 22) % shard_count == shard_id`, the routing rule
clients rely on.

Guild-stream mode (`GatewayConfig.guild_count`) has one guild set for the bot instead (`bot_guild_ids`):
their `guild_id >> 22` are consecutive integers, so every shard count spreads them evenly, and the guilds of
shard (id, count) are a stride of the list (`guilds_of_shard`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Final

import orjson

from .config import BOT_USER_ID

DISCORD_EPOCH_MS: Final = 1_420_070_400_000
#: Relative weights of the firehose's event types.
FIREHOSE_MIX: Final = (("MESSAGE_CREATE", 6), ("PRESENCE_UPDATE", 3), ("TYPING_START", 1))
POOL_SIZE: Final = 24
#: `guild_id >> 22` of the first guild of `bot_guild_ids` (a 2020 creation time, a multiple of 720720).
BOT_GUILD_TIMESTAMP: Final = (1_600_000_000_000 - DISCORD_EPOCH_MS) // 720_720 * 720_720
WORDS: Final = [
    "shard",
    "gateway",
    "resume",
    "heartbeat",
    "identify",
    "guild",
    "channel",
    "message",
    "presence",
    "typing",
    "trio",
    "nursery",
    "cancel",
    "scope",
    "deadline",
    "bucket",
    "ratelimit",
    "zlib",
    "zstd",
    "stream",
    "broker",
    "rabbit",
    "redis",
    "session",
    "sequence",
    "dispatch",
]


def snowflake(timestamp_ms: int, increment: int) -> int:
    return ((timestamp_ms - DISCORD_EPOCH_MS) << 22) | (increment & 0x3FFFFF)


def guild_ids_for_shard(shard_id: int, shard_count: int, count: int) -> list[int]:
    """`count` guild ids that Discord's routing rule places on `shard_id`."""
    base = 1_600_000_000_000 - DISCORD_EPOCH_MS  # a fixed, plausible creation time
    base -= base % shard_count
    ids: list[int] = []
    step = 0
    while len(ids) < count:
        timestamp = base + shard_id + step * shard_count
        ids.append((timestamp << 22) | (len(ids) + 1))
        step += 1
    return ids


def bot_guild_ids(count: int) -> list[int]:
    """The bot's `count` guilds in guild-stream mode, independent of any shard count.

    Guild i has `guild_id >> 22 == BOT_GUILD_TIMESTAMP + i`; that base is a multiple of 720720 (every count
    from 1 to 16 divides it), so for those shard counts guild i is on shard `i % shard_count`.
    """
    return [((BOT_GUILD_TIMESTAMP + index) << 22) | ((index + 1) & 0x3FFFFF) for index in range(count)]


def guilds_of_shard(guild_ids: list[int], shard_id: int, shard_count: int) -> list[int]:
    """The guilds of `bot_guild_ids(...)` that Discord's routing places on `shard_id` of `shard_count`."""
    if not guild_ids:
        return []
    start = (shard_id - (guild_ids[0] >> 22)) % shard_count
    return guild_ids[start::shard_count]


def message_create_templates(seed: int, count: int = POOL_SIZE) -> list[dict[str, Any]]:
    """`count` MESSAGE_CREATE bodies (0.5-2 KB) from `seed`; callers set `id`, `guild_id`, `channel_id`."""
    rng = random.Random(seed * 1_000_003 - 1)
    return [_event_body("MESSAGE_CREATE", 0, rng) for _ in range(count)]


def bot_user() -> dict[str, Any]:
    return {
        "id": str(BOT_USER_ID),
        "username": "simulated-bot",
        "global_name": None,
        "discriminator": "0",
        "avatar": None,
        "bot": True,
        "verified": True,
        "mfa_enabled": False,
        "flags": 0,
        "email": None,
    }


def ready_payload(
    session_id: str, resume_gateway_url: str, shard: list[int] | None, guild_ids: list[int]
) -> dict[str, Any]:
    ready: dict[str, Any] = {
        "v": 10,
        "user": bot_user(),
        "guilds": [{"id": str(gid), "unavailable": True} for gid in guild_ids],
        "session_id": session_id,
        "resume_gateway_url": resume_gateway_url,
        "application": {"id": str(BOT_USER_ID), "flags": 0},
        "private_channels": [],
        "relationships": [],
        "presences": [],
        "user_settings": {},
        "guild_join_requests": [],
        "geo_ordered_rtc_regions": ["us-east"],
        "_trace": ['["gateway-sim",{"micros":0}]'],
    }
    if shard is not None:
        ready["shard"] = shard
    return ready


def guild_create_payload(
    guild_id: int, *, target_bytes: int = 0, rng: random.Random | None = None
) -> dict[str, Any]:
    """A GUILD_CREATE; with `target_bytes` it is padded with members until about that size."""
    rng = rng or random.Random(guild_id)
    channel_id = guild_id + 1
    guild: dict[str, Any] = {
        "id": str(guild_id),
        "name": f"guild {guild_id % 100000}",
        "icon": None,
        "owner_id": str(BOT_USER_ID),
        "unavailable": False,
        "large": target_bytes > 0,
        "member_count": 2,
        "joined_at": "2024-01-01T00:00:00.000000+00:00",
        "features": [],
        "roles": [
            {
                "id": str(guild_id),
                "name": "@everyone",
                "permissions": "104324673",
                "position": 0,
                "color": 0,
                "hoist": False,
                "managed": False,
                "mentionable": False,
                "flags": 0,
            }
        ],
        "emojis": [],
        "stickers": [],
        "channels": [
            {
                "id": str(channel_id),
                "type": 0,
                "name": "general",
                "position": 0,
                "permission_overwrites": [],
                "guild_id": str(guild_id),
            }
        ],
        "threads": [],
        "members": [
            {
                "user": bot_user(),
                "roles": [],
                "joined_at": "2024-01-01T00:00:00.000000+00:00",
                "deaf": False,
                "mute": False,
                "flags": 0,
            }
        ],
        "presences": [],
        "voice_states": [],
        "stage_instances": [],
        "guild_scheduled_events": [],
        "soundboard_sounds": [],
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "mfa_level": 0,
        "premium_tier": 0,
        "preferred_locale": "en-US",
        "nsfw_level": 0,
        "system_channel_flags": 0,
    }
    if target_bytes > 0:
        member_bytes = 160
        for index in range(max(0, target_bytes // member_bytes)):
            user_id = snowflake(1_650_000_000_000 + index, rng.getrandbits(22))
            guild["members"].append(
                {
                    "user": {
                        "id": str(user_id),
                        "username": f"member{index}",
                        "discriminator": "0",
                        "avatar": None,
                        "global_name": None,
                    },
                    "roles": [],
                    "joined_at": "2024-01-01T00:00:00.000000+00:00",
                    "deaf": False,
                    "mute": False,
                    "flags": 0,
                }
            )
        guild["member_count"] = len(guild["members"])
    return guild


@dataclass(slots=True)
class FirehosePool:
    """Pre-serialised dispatch bodies for one shard: `(event_name, d_json)` drawn in a seeded order."""

    entries: list[tuple[bytes, bytes]]
    weights_order: list[int]
    position: int = 0

    def next(self) -> tuple[bytes, bytes]:
        index = self.weights_order[self.position]
        self.position = (self.position + 1) % len(self.weights_order)
        return self.entries[index]


def firehose_pool(shard_id: int, guild_ids: list[int], seed: int) -> FirehosePool:
    rng = random.Random(seed * 1_000_003 + shard_id)
    guilds = guild_ids or [guild_ids_for_shard(shard_id, 1, 1)[0]]
    entries: list[tuple[bytes, bytes]] = []
    for index in range(POOL_SIZE):
        name = rng.choices([n for n, _ in FIREHOSE_MIX], weights=[w for _, w in FIREHOSE_MIX])[0]
        guild_id = guilds[index % len(guilds)]
        entries.append((name.encode(), orjson.dumps(_event_body(name, guild_id, rng))))
    order = list(range(POOL_SIZE)) * 4
    rng.shuffle(order)
    return FirehosePool(entries, order)


def _event_body(name: str, guild_id: int, rng: random.Random) -> dict[str, Any]:
    now_ms = 1_700_000_000_000 + rng.randrange(10**9)
    user_id = snowflake(now_ms - 10**8, rng.getrandbits(22))
    channel_id = guild_id + 1
    user = {
        "id": str(user_id),
        "username": f"user{user_id % 10000}",
        "global_name": None,
        "discriminator": "0",
        "avatar": "a" * 32,
        "public_flags": 0,
    }
    if name == "MESSAGE_CREATE":
        # 0.5-2 KB messages: content, an author, a member, and sometimes an embed.
        content = " ".join(rng.choices(WORDS, k=rng.randrange(20, 140)))
        body: dict[str, Any] = {
            "id": str(snowflake(now_ms, rng.getrandbits(22))),
            "type": 0,
            "content": content,
            "channel_id": str(channel_id),
            "guild_id": str(guild_id),
            "author": user,
            "member": {
                "roles": [],
                "joined_at": "2024-01-01T00:00:00.000000+00:00",
                "deaf": False,
                "mute": False,
                "flags": 0,
            },
            "attachments": [],
            "embeds": [],
            "mentions": [],
            "mention_roles": [],
            "pinned": False,
            "mention_everyone": False,
            "tts": False,
            "timestamp": "2026-11-27T20:00:00.000000+00:00",
            "edited_timestamp": None,
            "flags": 0,
            "components": [],
            "nonce": str(rng.getrandbits(60)),
        }
        if rng.random() < 0.2:
            body["embeds"] = [{"type": "rich", "title": "embed", "description": content[:200]}]
        return body
    if name == "PRESENCE_UPDATE":
        return {
            "user": {"id": str(user_id)},
            "guild_id": str(guild_id),
            "status": rng.choice(["online", "idle", "dnd"]),
            "activities": [{"name": "a game", "type": 0, "created_at": now_ms}],
            "client_status": {"desktop": "online"},
        }
    return {
        "channel_id": str(channel_id),
        "guild_id": str(guild_id),
        "user_id": str(user_id),
        "timestamp": now_ms // 1000,
        "member": {
            "user": user,
            "roles": [],
            "joined_at": "2024-01-01T00:00:00.000000+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
        },
    }


def dispatch_bytes(event_name: bytes, seq: int, body_json: bytes) -> bytes:
    """The JSON text of one op 0 dispatch; `t` and `s` first so cheap scanners find them early."""
    return b'{"t":"%s","s":%d,"op":0,"d":%s}' % (event_name, seq, body_json)
