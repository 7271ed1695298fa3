"""Route keys (R1): templates, majors and families, checked against the simulator's route catalogue."""

from __future__ import annotations

import random
import string
from typing import Final

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.simulator import routes as sim
from benchmarks.simulator.config import BOT_USER_ID
from ratelimit.routes import (
    DISCORD_EPOCH_MS,
    INTERACTION_TOKEN_PREFIX,
    OLD_MESSAGE_AGE_MS,
    OLD_MESSAGE_DELETE_FAMILY,
    REACTIONS_FAMILY,
    RouteKey,
    route_key,
    token_id,
)

PREFIXES: Final = ("", "/api", "/api/v9", "/api/v10")
EMOJI: Final = ("%F0%9F%91%8D", "party:112233445566778899", "x", "\N{THUMBS UP SIGN}")
TOKEN_ALPHABET: Final = string.ascii_letters + string.digits + "-_"
NOW_MS: Final = 1_790_000_000_000  # 2026-09-21, a fixed "now" so the tests are deterministic


def _snowflake(rng: random.Random) -> str:
    return str(rng.randrange(10**16, 10**20))  # 17-20 digits


def _webhook_token(rng: random.Random) -> str:
    token = "".join(rng.choice(TOKEN_ALPHABET) for _ in range(68))
    return token if not token.startswith(INTERACTION_TOKEN_PREFIX) else "W" + token[1:]


def _interaction_token(rng: random.Random) -> str:
    return INTERACTION_TOKEN_PREFIX + "".join(rng.choice(TOKEN_ALPHABET) for _ in range(160))


def _concrete(route: sim.Route, rng: random.Random) -> tuple[str, dict[str, str]]:
    """A concrete path for a catalogue template, and the values it put in."""
    values: dict[str, str] = {}
    parts = []
    for segment in route.segments:
        if not segment.startswith("{"):
            parts.append(segment)
            continue
        name = segment[1:-1]
        if name in sim.SNOWFLAKE_PARAMS:
            value = _snowflake(rng)
        elif name == "emoji":
            value = rng.choice(EMOJI)
        elif name == "webhook_token":
            value = _webhook_token(rng)
        elif name == "interaction_token":
            value = _interaction_token(rng)
        else:  # pragma: no cover - a new kind of placeholder in the catalogue must be taught here
            raise AssertionError(f"unknown placeholder {segment} in {route.label}")
        values[name] = value
        parts.append(value)
    return "/" + "/".join(parts), values


def _expected_majors(params: dict[str, str]) -> tuple[str, ...]:
    """The simulator's majors (its `MAJOR_PARAMS`, in order), with the webhook token as its hash."""
    return tuple(
        token_id(params[name]) if name == "webhook_token" else params[name]
        for name in sim.MAJOR_PARAMS
        if name in params
    )


def _secrets(params: dict[str, str]) -> list[str]:
    return [params[name] for name in ("webhook_token", "interaction_token") if name in params]


def test_catalogue_is_the_one_described() -> None:
    assert len(sim.ROUTES) == 57
    assert len({route.label for route in sim.ROUTES}) == 57


@pytest.mark.parametrize("route", sim.ROUTES, ids=lambda route: route.label)
def test_catalogue_route_has_its_template_majors_and_interaction_flag(route: sim.Route) -> None:
    catalogue = sim.RouteCatalogue(seed=1)
    rng = random.Random(route.label)
    for draw in range(40):
        path, values = _concrete(route, rng)
        match = catalogue.match(route.method, path)
        assert match is not None and match.route == route  # the simulator agrees on the concrete path
        prefix = PREFIXES[draw % len(PREFIXES)]
        query = "?wait=true&limit=50" if draw % 3 == 0 else ""
        key = route_key(route.method.lower(), prefix + path + query, now_ms=NOW_MS)
        assert key.method == route.method
        assert key.template == route.template
        assert key.majors == _expected_majors(dict(match.params))
        assert key.majors == _expected_majors(values)  # the values generated, not others
        assert key.interaction == route.interaction
        for secret in _secrets(values):
            assert secret not in repr(key) and secret not in key.route and secret not in "".join(key.majors)


@pytest.mark.parametrize("route", [r for r in sim.ROUTES if r.webhook], ids=lambda route: route.label)
def test_webhook_follow_up_of_the_application_is_an_interaction(route: sim.Route) -> None:
    # The simulator's own rule (rest.py): a webhook route whose webhook id is the bot's application id is
    # global-exempt. Its token is an interaction token, named so in the template; majors stay id + token hash.
    rng = random.Random(route.label)
    path, values = _concrete(route, rng)
    path = path.replace(values["webhook_id"], str(BOT_USER_ID), 1)
    by_id = route_key(route.method, path, application_id=BOT_USER_ID)
    expected_template = route.template.replace(
        "{webhook_id}/{webhook_token}", "{application_id}/{interaction_token}"
    )
    assert by_id.interaction is True
    assert by_id.template == expected_template
    assert by_id.majors == (str(BOT_USER_ID), token_id(values["webhook_token"]))
    # Without the application id, a webhook token is an ordinary webhook; an interaction token is recognised.
    assert route_key(route.method, path).interaction is False
    interaction_path = path.replace(values["webhook_token"], _interaction_token(rng))
    by_token = route_key(route.method, interaction_path)
    assert by_token.interaction is True and by_token.template == expected_template
    # Another application's id does not make a webhook an interaction.
    assert route_key(route.method, path, application_id=BOT_USER_ID + 1).interaction is False


def test_routes_that_share_a_key_share_a_counter_in_the_catalogue() -> None:
    """If two catalogue routes map to one `route`, the engine would give them one hash: they must agree."""
    rng = random.Random(7)
    groups: dict[str, set[str | None]] = {}
    for route in sim.ROUTES:
        path, _ = _concrete(route, rng)
        groups.setdefault(route_key(route.method, path).route, set()).add(route.group)
    assert all(len(names) == 1 for names in groups.values()), groups
    # 57 templates; the four reaction-modify routes collapse into one key.
    assert len(groups) == 57 - 3


def test_reaction_family_collapses_put_and_delete_on_a_message() -> None:
    base = "/channels/111111111111111111/messages/222222222222222222/reactions"
    keys = [
        route_key("PUT", f"{base}/%F0%9F%91%8D/@me"),
        route_key("DELETE", f"{base}/party:112233445566778899/@me"),
        route_key("DELETE", f"{base}/x/333333333333333333"),
        route_key("DELETE", f"{base}/x"),
        route_key("DELETE", base),
    ]
    assert {key.family for key in keys} == {REACTIONS_FAMILY}
    assert len({key.route for key in keys}) == 1
    assert {key.majors for key in keys} == {("111111111111111111",)}
    assert keys[0].template == "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me"
    assert keys[2].template == "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/{user_id}"
    # Reading reactions is another bucket, and keeps its own method and template.
    read = route_key("GET", f"{base}/x")
    assert (
        read.family is None
        and read.route == "GET /channels/{channel_id}/messages/{message_id}/reactions/{emoji}"
    )
    # Another channel: the same route (same hash), another major (another counter).
    other = route_key("PUT", "/channels/444444444444444444/messages/2/reactions/x/@me")
    assert other.route == keys[0].route and other.majors == ("444444444444444444",)


def _message_id_at(timestamp_ms: int, low_bits: int = 0) -> int:
    return ((timestamp_ms - DISCORD_EPOCH_MS) << 22) | low_bits


def test_old_message_delete_at_the_fourteen_day_edge() -> None:
    created_ms = NOW_MS - OLD_MESSAGE_AGE_MS
    message = _message_id_at(created_ms, low_bits=(1 << 22) - 1)  # the low 22 bits do not count
    path = f"/channels/111111111111111111/messages/{message}"
    at_edge = route_key("DELETE", path, now_ms=NOW_MS)  # exactly 14 days old: not older, normal delete
    past_edge = route_key("DELETE", path, now_ms=NOW_MS + 1)
    assert at_edge.family is None and at_edge.route == "DELETE /channels/{channel_id}/messages/{message_id}"
    assert past_edge.family == OLD_MESSAGE_DELETE_FAMILY
    assert past_edge.route == "DELETE /channels/{channel_id}/messages/{message_id} !old_message_delete"
    assert past_edge.template == at_edge.template and past_edge.majors == at_edge.majors
    # Only DELETE of a channel message; without a clock nothing is classified as old.
    assert route_key("GET", path, now_ms=NOW_MS + 1).family is None
    assert route_key("PATCH", path, now_ms=NOW_MS + 1).family is None
    assert route_key("DELETE", path).family is None
    # Same edge as the simulator's counter choice.
    catalogue = sim.RouteCatalogue(seed=1)
    match = catalogue.match("DELETE", path)
    assert match is not None
    for now in (NOW_MS - 1, NOW_MS, NOW_MS + 1, NOW_MS + 10**9):
        group = catalogue.group_for(match, now)
        old = route_key("DELETE", path, now_ms=now).family == OLD_MESSAGE_DELETE_FAMILY
        assert old == (group is not None and group.name == sim.OLD_MESSAGE_DELETE_GROUP)


def test_constants_agree_with_the_simulator() -> None:
    assert DISCORD_EPOCH_MS == sim.DISCORD_EPOCH_MS
    assert OLD_MESSAGE_AGE_MS == sim.OLD_MESSAGE_AGE_MS


@pytest.mark.parametrize(
    ("method", "path", "template", "majors"),
    [
        ("GET", "/channels/1/messages", "/channels/{channel_id}/messages", ("1",)),
        ("POST", "/api/v10/channels/7/messages?x=1", "/channels/{channel_id}/messages", ("7",)),
        ("GET", "/users/@me", "/users/@me", ()),
        ("GET", "/api/v10/users/@me/guilds", "/users/@me/guilds", ()),
        (
            "DELETE",
            "/users/@me/guilds/123456789012345678",
            "/users/@me/guilds/{guild_id}",
            ("123456789012345678",),
        ),
        ("GET", "/gateway/bot", "/gateway/bot", ()),
        (
            "PUT",
            "/guilds/123456789012345678/members/223456789012345678/roles/323456789012345678",
            "/guilds/{guild_id}/members/{user_id}/roles/{role_id}",
            ("123456789012345678",),
        ),
        (
            "GET",
            "/guilds/123456789012345678/scheduled-events/223456789012345678/users",
            "/guilds/{guild_id}/scheduled-events/{guild_scheduled_event_id}/users",
            ("123456789012345678",),
        ),
        (
            "PATCH",
            "/guilds/123456789012345678/auto-moderation/rules/223456789012345678",
            "/guilds/{guild_id}/auto-moderation/rules/{auto_moderation_rule_id}",
            ("123456789012345678",),
        ),
        (
            "GET",
            "/guilds/123456789012345678/widget-things/223456789012345678",
            "/guilds/{guild_id}/widget-things/{widget_thing_id}",
            ("123456789012345678",),
        ),
        ("GET", "/invites/discord-api", "/invites/{invite_code}", ()),
        (
            "GET",
            "/stage-instances/123456789012345678",
            "/stage-instances/{channel_id}",
            ("123456789012345678",),
        ),
        ("GET", "/123456789012345678", "/{id}", ()),
        ("GET", "/channels/12345678901234567890123", "/channels/12345678901234567890123", ()),
        ("GET", "/webhooks/123456789012345678", "/webhooks/{webhook_id}", ("123456789012345678",)),
        (
            "GET",
            "/webhooks/123456789012345678/" + "t" * 68 + "/messages/@original",
            "/webhooks/{webhook_id}/{webhook_token}/messages/@original",
            ("123456789012345678", token_id("t" * 68)),
        ),
    ],
)
def test_templates_beyond_the_catalogue(
    method: str, path: str, template: str, majors: tuple[str, ...]
) -> None:
    key = route_key(method, path)
    assert (key.template, key.majors) == (template, majors)


def test_interaction_callback_is_exempt_and_its_own_resource() -> None:
    token = "aW50ZXJhY3Rpb246MTIzOnNlY3JldA"
    a = route_key("POST", f"/api/v10/interactions/111111111111111111/{token}/callback")
    b = route_key("POST", "/interactions/222222222222222222/another-token/callback")
    assert a.interaction and b.interaction
    assert a.template == "/interactions/{interaction_id}/{interaction_token}/callback"
    assert a.route == b.route and a.majors == ("111111111111111111",) and b.majors == ("222222222222222222",)
    assert token not in repr(a)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", ""),
        ("GET", "channels/1"),
        ("GET", "?x=/channels"),
        ("GET", "/"),
        ("GET", "/api"),
        ("GET", "/api/v10/"),
        ("", "/channels/1"),
        ("G ET", "/channels/1"),
        ("GET", "/channels/{channel_id}"),
        ("GET", "/channels/1 2"),
        ("GET", "/channels/1\n"),
    ],
)
def test_malformed_input_is_a_value_error(method: str, path: str) -> None:
    with pytest.raises(ValueError, match=r"method|path"):
        route_key(method, path)


def test_token_id_hashes_and_never_returns_the_token() -> None:
    secret = "MTA4NzY1NDMyMTA5ODc2NTQzMg.GhIjKl.abcdefghijklmnopqrstuvwxyz0123456789AB"
    ids = {
        token_id(f"Bot {secret}"),
        token_id(f"bot  {secret} "),
        token_id(secret),
        token_id(f"Bearer {secret}"),
    }
    assert len(ids) == 1
    (one,) = ids
    assert len(one) == 12 and secret not in one and one not in secret
    assert token_id(f"Bot {secret}x") != one
    assert token_id(None) == "" and token_id("") == "" and token_id("   ") == ""
    # The same name as the simulator's ledger gives the token.
    from benchmarks.simulator.tokens import token_id as ledger_token_id

    assert one == ledger_token_id(secret)


def test_route_key_is_a_frozen_value() -> None:
    key = route_key("get", "/channels/1")
    assert key == RouteKey("GET", "/channels/{channel_id}", ("1",), None, False)
    assert hash(key) == hash(route_key("GET", "/api/v9/channels/1"))
    with pytest.raises(AttributeError):
        key.method = "POST"  # type: ignore[misc]


_SEGMENTS: Final = st.one_of(
    st.sampled_from(
        [
            "channels",
            "messages",
            "guilds",
            "webhooks",
            "interactions",
            "reactions",
            "members",
            "roles",
            "users",
            "@me",
            "@original",
            "callback",
            "api",
            "v10",
            "invites",
            "emojis",
            "pins",
            "",
        ]
    ),
    st.integers(0, 2**64 - 1).map(str),
    st.text(min_size=1, max_size=12),
    st.text(TOKEN_ALPHABET, min_size=60, max_size=80),
)


@settings(max_examples=400)
@given(method=st.text(max_size=8), path=st.text(max_size=60), app=st.none() | st.integers(0, 2**64))
def test_arbitrary_strings_raise_only_value_error_and_are_deterministic(
    method: str, path: str, app: int | None
) -> None:
    for candidate in (path, "/" + path):
        try:
            key = route_key(method, candidate, application_id=app, now_ms=NOW_MS)
        except ValueError:
            continue
        assert key == route_key(method, candidate, application_id=app, now_ms=NOW_MS)
        assert key.route.startswith(key.method) or key.family == REACTIONS_FAMILY


@settings(max_examples=400)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]),
    segments=st.lists(_SEGMENTS, min_size=1, max_size=8),
    now_ms=st.none() | st.integers(0, 2**63),
)
def test_path_like_strings_are_deterministic_and_hide_tokens(
    method: str, segments: list[str], now_ms: int | None
) -> None:
    path = "/" + "/".join(segments)
    try:
        key = route_key(method, path, application_id=BOT_USER_ID, now_ms=now_ms)
    except ValueError:
        return
    assert key == route_key(method, path, application_id=BOT_USER_ID, now_ms=now_ms)
    assert key.template.startswith("/")
    parts = path.partition("?")[0].partition("#")[0].split("/")[1:]
    if parts[:1] == ["api"]:
        parts = parts[2:] if len(parts) > 1 and parts[1] == "v10" else parts[1:]
    if len(parts) >= 3 and parts[0] in ("webhooks", "interactions") and parts[1] and parts[2]:
        secret = parts[2]
        # Shorter strings may occur elsewhere by chance, and a later segment may repeat the token's text (that
        # segment is a path segment, kept as the route's own text, not the token).
        if len(secret) >= 20 and secret not in parts[1] and all(secret not in p for p in parts[3:]):
            assert secret not in repr(key) and secret not in key.route
