"""The simulated REST API over real sockets: routes, auth, headers, and per-route bucket counters."""

from __future__ import annotations

import time
import warnings
from typing import Any, Final

import pytest
import trio

from benchmarks.simulator import BOT_USER_ID

from .rest_helpers import RESET_FORMAT, limits, rest_harness

TIMEOUT_S: Final = 10
#: A message id from 2016: DELETE of it uses the old-message family.
OLD_MESSAGE_ID: Final = "175928847299117063"


def _recent_message_id() -> str:
    return str((int(time.time() * 1000) - 1_420_070_400_000) << 22)


with warnings.catch_warnings():  # discord.py imports the deprecated audioop module
    warnings.simplefilter("ignore", DeprecationWarning)
    import discord


class _FakeState:
    """What discord.py's `AppInfo` and `ClientUser` read from their connection state."""

    def create_user(self, data: Any) -> discord.User:
        return discord.User(state=self, data=data)  # type: ignore[arg-type]


async def test_gateway_user_and_application_routes() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness() as h:
            bot = (await h.client.get("/gateway/bot")).json()
            assert bot["url"] == h.sim.addresses.gateway_url
            assert bot["shards"] == 4
            assert set(bot["session_start_limit"]) >= {"remaining", "max_concurrency", "total", "reset_after"}
            assert (await h.client.get("/gateway")).json() == {"url": bot["url"]}
            me = await h.client.get("/users/@me")
            assert me.status_code == 200
            assert me.headers["via"] == "1.1 google"
            assert "x-ratelimit-bucket" not in me.headers  # global-only route
            user = discord.ClientUser(state=_FakeState(), data=me.json())  # type: ignore[arg-type]
            assert user.id == BOT_USER_ID
            assert user.bot
            for path in ("/oauth2/applications/@me", "/applications/@me"):
                app = discord.AppInfo(_FakeState(), (await h.client.get(path)).json())  # type: ignore[arg-type]
                assert app.id == BOT_USER_ID


async def test_hikari_parses_own_user() -> None:
    from hikari.impl.entity_factory import EntityFactoryImpl

    with trio.fail_after(TIMEOUT_S):
        async with rest_harness() as h:
            payload = (await h.client.get("/users/@me")).json()
    own = EntityFactoryImpl(app=None).deserialize_my_user(payload)  # type: ignore[arg-type]
    assert int(own.id) == BOT_USER_ID


async def test_auth_rules() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness() as h:
            bad = await h.client.get("/users/@me", headers={"Authorization": "Bot nope"})
            assert bad.status_code == 401
            assert bad.json() == {"message": "401: Unauthorized", "code": 0}
            assert bad.headers["via"] == "1.1 google"
            missing = await h.client.get("/users/@me", headers={"Authorization": ""})
            assert missing.status_code == 401
            token = h.client.headers["authorization"].removeprefix("Bot ")
            bearer = await h.client.get("/users/@me", headers={"Authorization": f"Bearer {token}"})
            assert bearer.status_code == 200
            hook = await h.client.post(
                "/webhooks/5/tok", json={"content": "x"}, headers={"Authorization": ""}
            )
            assert hook.status_code == 200  # webhook with token needs no auth
            await h.control("revoke_token", {"token": token})
            assert (await h.client.get("/users/@me")).status_code == 401
            await h.control("restore_tokens")
            assert (await h.client.get("/users/@me")).status_code == 200
            unknown = await h.client.get("/no/such/route")
            assert unknown.status_code == 404
            assert unknown.json() == {"message": "404: Not Found", "code": 0}


async def test_headers_and_sliding_refill() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness() as h:  # message-create: 5 per 5 s sliding, scaled to 5 per 1 s
            answers = [await h.client.post("/channels/1/messages", json={"content": "x"}) for _ in range(6)]
            assert [a.status_code for a in answers] == [200] * 5 + [429]
            assert [limits(a)[1] for a in answers] == [4, 3, 2, 1, 0, 0]
            assert {limits(a)[0] for a in answers} == {5}
            assert len({limits(a)[3] for a in answers}) == 1
            assert len(limits(answers[0])[3]) == 32
            assert limits(answers[0])[2] == pytest.approx(0.2, abs=0.02)
            assert limits(answers[4])[2] == pytest.approx(1.0, abs=0.05)  # until fully refilled
            for answer in answers:
                reset = answer.headers["x-ratelimit-reset"]
                assert RESET_FORMAT.match(reset)
                assert RESET_FORMAT.match(answer.headers["x-ratelimit-reset-after"])
                assert float(reset) == pytest.approx(time.time() + limits(answer)[2], abs=0.5)
            limited = answers[5]
            assert limited.headers["x-ratelimit-scope"] == "user"
            assert limited.headers["retry-after"] == "1"  # rounded up
            assert "x-ratelimit-global" not in limited.headers
            assert limited.headers["via"] == "1.1 google"
            assert limited.headers["content-type"] == "application/json"
            body = limited.json()
            assert body["message"] == "You are being rate limited."
            assert body["global"] is False
            assert 0.1 < body["retry_after"] <= 0.2  # one slot frees after one interval
            await trio.sleep(body["retry_after"] + 0.01)
            again = await h.client.post("/channels/1/messages", json={"content": "x"})
            assert again.status_code == 200
            assert limits(again)[1] == 0  # only one slot refilled
            await trio.sleep(0.45)
            assert limits(await h.client.post("/channels/1/messages", json={"content": "x"}))[1] == 1


async def test_fixed_window_does_not_refill_until_it_closes() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness() as h:  # bans: 5 per 5 s fixed, scaled to 5 per 1 s; PUT and DELETE share
            paths = [f"/guilds/3/bans/{i}" for i in range(5)]
            answers = [await h.client.put(p) for p in paths[:3]] + [
                await h.client.delete(p) for p in paths[3:]
            ]
            assert [a.status_code for a in answers] == [204] * 5
            assert [limits(a)[1] for a in answers] == [4, 3, 2, 1, 0]
            first = await h.client.put("/guilds/3/bans/9")
            assert first.status_code == 429
            await trio.sleep(0.3)
            second = await h.client.put("/guilds/3/bans/9")
            assert second.status_code == 429  # a sliding bucket would have refilled one slot by now
            assert second.json()["retry_after"] == pytest.approx(first.json()["retry_after"] - 0.3, abs=0.05)
            assert limits(second)[2] == pytest.approx(second.json()["retry_after"], abs=0.002)
            await trio.sleep(second.json()["retry_after"] + 0.01)
            fresh = await h.client.put("/guilds/3/bans/9")
            assert fresh.status_code == 204
            assert limits(fresh)[1] == 4
            assert limits(fresh)[2] == pytest.approx(1.0, abs=0.02)


async def test_shared_counters_and_hashes() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness(bucket_time_scale=1.0) as h:
            # Reactions: one hash and one counter per channel (1 per 0.25 s).
            put = await h.client.put("/channels/7/messages/1/reactions/%F0%9F%91%8D/@me")
            delete = await h.client.delete("/channels/7/messages/2/reactions/x/@me")
            other_channel = await h.client.put("/channels/8/messages/1/reactions/x/@me")
            assert (put.status_code, delete.status_code, other_channel.status_code) == (204, 429, 204)
            assert limits(put)[3] == limits(delete)[3] == limits(other_channel)[3]
            # Role add/remove: one fixed-window counter.
            roles = [
                await (h.client.put if i % 2 == 0 else h.client.delete)(f"/guilds/4/members/{i}/roles/9")
                for i in range(10)
            ]
            assert [limits(r)[1] for r in roles] == list(range(9, -1, -1))
            # POST and DELETE message: same hash, separate counters (discord-api-docs #8073).
            posts = [await h.client.post("/channels/5/messages", json={"content": "x"}) for _ in range(5)]
            removed = await h.client.delete(f"/channels/5/messages/{_recent_message_id()}")
            assert limits(posts[-1])[1] == 0
            assert removed.status_code == 204
            assert limits(removed)[1] == 4
            assert limits(removed)[3] == limits(posts[0])[3]
            # Majors split counters: another channel starts fresh.
            assert limits(await h.client.post("/channels/6/messages", json={"content": "x"}))[1] == 4


async def test_tokens_split_counters() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness(accept_any_token=True) as h:
            for _ in range(5):
                await h.client.post("/channels/1/messages", json={"content": "x"})
            other = await h.client.post(
                "/channels/1/messages", json={"content": "x"}, headers={"Authorization": "Bot another-token"}
            )
            assert limits(other)[1] == 4


async def test_old_message_delete_family_and_global_only_routes() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness() as h:
            recent = await h.client.delete(f"/channels/1/messages/{_recent_message_id()}")
            old = await h.client.delete(f"/channels/1/messages/{OLD_MESSAGE_ID}")
            assert recent.status_code == old.status_code == 204
            assert limits(old)[3] != limits(recent)[3]
            assert limits(old)[0] == 30
            user = await h.client.get("/users/42")
            assert user.status_code == 200
            assert not any(name.startswith("x-ratelimit") for name in user.headers)
            ledger = await h.ledger()
            assert (
                "DELETE /channels/{channel_id}/messages/{message_id} (older than 14 days)" in ledger["routes"]
            )


async def test_payloads_and_bad_json() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness() as h:
            message = (await h.client.post("/channels/12/messages", json={"content": "hello"})).json()
            assert message["channel_id"] == "12"
            assert message["content"] == "hello"
            assert message["author"]["id"] == str(BOT_USER_ID)
            typing = await h.client.post("/channels/12/typing")
            assert typing.status_code == 204
            assert typing.content == b""
            bad = await h.client.post(
                "/channels/13/messages", content=b"{not json", headers={"content-type": "application/json"}
            )
            assert bad.status_code == 400
            assert bad.json() == {"message": "400: Bad Request", "code": 50109}
            assert limits(bad)[1] == 4  # it still counted
            commands = await h.client.put(
                f"/applications/{BOT_USER_ID}/commands", json=[{"name": "a"}, {"name": "b"}]
            )
            assert [c["name"] for c in commands.json()] == ["a", "b"]
            callback = await h.client.post(
                "/interactions/99/tok/callback", json={"type": 4}, headers={"Authorization": ""}
            )
            assert callback.status_code == 204
            catalogue = await h.control("catalogue")
            assert len(catalogue["routes"]) >= 30
