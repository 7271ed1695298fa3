"""The simulated REST API's global, hidden, shared and invalid-request limits, faults, and ledger."""

from __future__ import annotations

import time
from typing import Final

import httpx
import trio

from benchmarks.simulator import BOT_USER_ID

from .rest_helpers import RestHarness, limits, rest_harness

TIMEOUT_S: Final = 10
NO_AUTH: Final = {"Authorization": ""}


async def test_global_limit_exemptions_and_per_ip() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness(global_limit=5) as h:
            answers = [await h.client.get(f"/channels/{i}") for i in range(6)]
            assert [a.status_code for a in answers] == [200] * 5 + [429]
            limited = answers[5]
            assert limited.headers["x-ratelimit-global"] == "true"
            assert limited.headers["x-ratelimit-scope"] == "global"
            assert limited.headers["via"] == "1.1 google"
            assert "x-ratelimit-bucket" not in limited.headers
            body = limited.json()
            assert body["global"] is True
            assert 0 < body["retry_after"] <= 1.0
            assert limited.headers["retry-after"] == "1"
            # Interaction routes are exempt: the callback and follow-ups on the application's webhook.
            callback = await h.client.post("/interactions/1/tok/callback", json={"type": 5}, headers=NO_AUTH)
            followup = await h.client.post(
                f"/webhooks/{BOT_USER_ID}/tok", json={"content": "x"}, headers=NO_AUTH
            )
            assert (callback.status_code, followup.status_code) == (204, 200)
            # Unauthenticated requests count per source IP.
            ip1 = {**NO_AUTH, "X-Fake-Source-IP": "10.0.0.1"}
            hooks = [
                await h.client.post(f"/webhooks/{i}/tok", json={"content": "x"}, headers=ip1)
                for i in range(6)
            ]
            assert [a.status_code for a in hooks] == [200] * 5 + [429]
            ip2 = {**NO_AUTH, "X-Fake-Source-IP": "10.0.0.2"}
            assert (
                await h.client.post("/webhooks/9/tok", json={"content": "x"}, headers=ip2)
            ).status_code == 200
            await h.control("global_limit", {"limit": 50})
            ledger = await h.ledger()
            assert ledger["by_category"]["global"] == 2


async def test_channel_edit_sublimit() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness(sublimit_count=2, sublimit_window_s=2.0) as h:
            renames = [await h.client.patch("/channels/3", json={"name": f"n{i}"}) for i in range(3)]
            assert [r.status_code for r in renames] == [200, 200, 429]
            hidden = renames[2]
            assert limits(hidden)[1] > 0  # Remaining > 0: a sub-limit, not the bucket
            assert hidden.headers["x-ratelimit-scope"] == "user"
            assert 1.5 < hidden.json()["retry_after"] <= 2.0
            other = await h.client.patch("/channels/3", json={"nsfw": True})
            assert other.status_code == 200  # the rest of the bucket keeps flowing
            assert limits(other)[1] == limits(hidden)[1] - 1
            assert (await h.client.patch("/channels/4", json={"topic": "t"})).status_code == 200
            ledger = await h.ledger()
            assert ledger["by_category"]["sublimit"] == 1


async def test_shared_scope_429_is_not_invalid() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness(invalid_request_limit=3) as h:
            marked = await h.control(
                "shared", {"method": "POST", "path": "/api/v10/channels/9/messages", "seconds": 30}
            )
            assert len(marked["bucket"]) == 32
            answers = [await h.client.post("/channels/9/messages", json={"content": "x"}) for _ in range(4)]
            assert {a.status_code for a in answers} == {429}
            shared = answers[0]
            assert shared.headers["x-ratelimit-scope"] == "shared"
            assert int(shared.headers["retry-after"]) == 30
            assert float(shared.headers["x-ratelimit-reset-after"]) < 1.0
            assert shared.json()["global"] is False
            assert limits(shared)[1] == 5  # the bucket headers do not explain a shared 429
            assert (await h.client.post("/channels/10/messages", json={"content": "x"})).status_code == 200
            ledger = await h.ledger()
            assert ledger["by_category"]["shared"] == 4
            assert ledger["invalid"] == {}
            assert ledger["bans"] == []


async def test_random_shared_429_on_reactions() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness(reaction_shared_probability=1.0, shared_retry_after_s=12.0) as h:
            answer = await h.client.put("/channels/1/messages/2/reactions/x/@me")
            assert answer.status_code == 429
            assert answer.headers["x-ratelimit-scope"] == "shared"
            assert answer.json()["retry_after"] == 12.0


async def test_invalid_requests_lead_to_a_cloudflare_ban() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness(invalid_request_limit=4, invalid_window_s=60.0, ban_duration_s=0.5) as h:
            bad = {"Authorization": "Bot wrong"}
            for _ in range(3):
                assert (await h.client.get("/users/@me", headers=bad)).status_code == 401
            await h.control("webhook", {"id": "77", "state": "invalid_token"})
            assert (await h.client.post("/webhooks/77/tok", json={}, headers=NO_AUTH)).status_code == 401
            banned = await h.client.get("/users/@me")
            assert banned.status_code == 429
            assert banned.headers["content-type"].startswith("text/html")
            assert "via" not in banned.headers
            assert b"Error 1015" in banned.content
            other_ip = await h.client.get("/users/@me", headers={"X-Fake-Source-IP": "10.1.1.1"})
            assert other_ip.status_code == 200
            ledger = await h.ledger()
            assert ledger["by_category"]["ban"] == 1
            assert ledger["invalid"]["127.0.0.1"]["peak"] == 4
            assert len(ledger["bans"]) == 1
            await trio.sleep(0.55)
            assert (await h.client.get("/users/@me")).status_code == 200
            assert (await h.ledger())["invalid"]["127.0.0.1"]["current"] == 0


async def test_unban_control() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness(invalid_request_limit=1) as h:
            await h.client.get("/users/@me", headers={"Authorization": "Bot wrong"})
            assert (await h.client.get("/users/@me")).status_code == 429
            assert (await h.control("unban"))["lifted"] == 1
            assert (await h.client.get("/users/@me")).status_code == 200


async def _bulk_delete(h: RestHarness, channel: str) -> httpx.Response:
    return await h.client.post(f"/channels/{channel}/messages/bulk-delete", json={"messages": ["1", "2"]})


async def test_first_contact_and_avoidable_classification() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness(bucket_time_scale=1.0, latency_ms=100.0) as h:  # bulk-delete: 1 per 1 s
            statuses: list[int] = []

            async def send() -> None:
                statuses.append((await _bulk_delete(h, "1")).status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(send)
            assert sorted(statuses) == [204, 429, 429]
            assert (await _bulk_delete(h, "1")).status_code == 429
            ledger = await h.ledger()
            assert ledger["by_category"]["first-contact"] == 2
            assert ledger["by_category"]["avoidable"] == 1
            record = ledger["requests"][-1]
            assert record["category"] == "avoidable"
            assert record["template"] == "POST /channels/{channel_id}/messages/bulk-delete"
            assert record["major"] == "1"
            assert len(record["bucket"]) == 32
            assert len(record["token_id"]) == 12
            assert "Bot" not in str(ledger)


async def test_latency_and_server_errors() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness() as h:
            await h.control("latency", {"ms": 150.0, "sigma": 0.0})
            started = trio.current_time()
            assert (await h.client.get("/users/@me")).status_code == 200
            assert trio.current_time() - started >= 0.15
            await h.control("latency", {"ms": 0.0})
            started = trio.current_time()
            await h.client.get("/users/@me")
            assert trio.current_time() - started < 0.1
            await h.control("server_error", {"count": 2, "status": 503})
            assert [(await h.client.get("/users/@me")).status_code for _ in range(3)] == [503, 503, 200]
            await h.control("server_error", {"count": 1, "status": 500})
            failed = await h.client.get("/users/@me")
            assert failed.status_code == 500
            assert failed.json()["message"] == "500: Internal Server Error"


async def test_webhook_faults_and_forbidden() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness() as h:
            await h.control("webhook", {"id": "55", "state": "dead"})
            dead = await h.client.post("/webhooks/55/tok", json={"content": "x"}, headers=NO_AUTH)
            assert dead.status_code == 404
            assert dead.json()["code"] == 10015
            await h.control("webhook", {"id": "55", "state": "invalid_token"})
            invalid = await h.client.post("/webhooks/55/tok", json={"content": "x"}, headers=NO_AUTH)
            assert invalid.status_code == 401
            assert invalid.json()["code"] == 50027
            assert (await h.client.get("/users/@me")).status_code == 200  # the bot token is fine
            await h.control("webhook", {"id": "55", "state": "ok"})
            assert (await h.client.post("/webhooks/55/tok", json={}, headers=NO_AUTH)).status_code == 200
            await h.control("forbid", {"major": "31"})
            forbidden = await h.client.get("/guilds/31/roles")
            assert forbidden.status_code == 403
            assert forbidden.json()["code"] == 50013
            ledger = await h.ledger()
            assert ledger["invalid"]["127.0.0.1"]["current"] == 2


async def test_ledger_reset_keeps_buckets_and_bad_control_is_400() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness() as h:
            for _ in range(6):
                await h.client.post("/channels/1/messages", json={"content": "x"})
            ledger = await h.ledger()
            assert ledger["total"] == 6
            assert ledger["by_status"] == {"200": 5, "429": 1}
            assert ledger["routes"]["POST /channels/{channel_id}/messages"]["total"] == 6
            assert len(ledger["requests"]) == 6
            reset = await h.client.post(f"{h.sim.addresses.control_url}/ledger/reset")
            assert reset.status_code == 200
            assert (await h.client.post("/channels/1/messages", json={"content": "x"})).status_code == 429
            ledger = await h.ledger()
            assert ledger["total"] == 1
            assert ledger["by_category"]["avoidable"] == 1
            bad = await h.client.post(f"{h.sim.addresses.control_url}/rest/nope", json={})
            assert bad.status_code == 400
            bad_limit = await h.client.post(
                f"{h.sim.addresses.control_url}/rest/global_limit", json={"limit": 0}
            )
            assert bad_limit.status_code == 400
            await h.control("reset_buckets")
            assert (await h.client.post("/channels/1/messages", json={"content": "x"})).status_code == 200


async def test_scope_on_success_and_clock_offset() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with rest_harness(scope_on_success=True, wall_clock_offset_s=100.0) as h:
            answer = await h.client.get("/channels/1")
            assert answer.headers["x-ratelimit-scope"] == "user"
            assert float(answer.headers["x-ratelimit-reset"]) > time.time() + 99
