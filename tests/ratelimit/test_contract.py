"""One contract, every backend: the same scenarios against the in-process, shm and Redis state.

Each backend runs with a clock the test drives (`Clock`), so every wait is asserted exactly.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from ratelimit.backend import Backend, LocalBackend
from ratelimit.buckets import RateLimitScope
from ratelimit.global_limit import DEFAULT_JITTER_MARGIN_S, SLACK
from ratelimit.invalid import TOKEN_REVOKED, WEBHOOK_DEAD
from ratelimit.model import INVALID_BUDGET, Ask, EngineConfig, Outcome
from ratelimit.redis_backend import RedisBackend
from ratelimit.redis_client import RedisClient
from ratelimit.shm import ShmBackend
from tests.ratelimit.contract import (
    ASK,
    OTHER_MAJOR,
    BackendFactory,
    Clock,
    close,
    config,
    limited,
    ok,
    scenario_driver,
)

BACKENDS = ["memory", "shm", "redis"]
REDIS_URL = "redis://127.0.0.1:6379"


async def _drop_prefix(prefix: str) -> None:
    redis = RedisClient.from_url(REDIS_URL)
    try:
        keys = await redis.execute("KEYS", f"{{{prefix}}}:*")
        if isinstance(keys, list) and keys:
            await redis.execute("DEL", *[key for key in keys if isinstance(key, bytes)])
    finally:
        await redis.aclose()


@pytest.fixture(params=BACKENDS)
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> BackendFactory:
    kind = request.param

    @asynccontextmanager
    async def make(config: EngineConfig, clock: Clock) -> AsyncIterator[Backend]:
        backend: Backend
        if kind == "memory":
            backend = LocalBackend(config, clock=clock)
        elif kind == "shm":
            backend = ShmBackend.open(
                "contract", config, create=True, directory=tmp_path, clock=clock, unlink_on_close=True
            )
        else:
            prefix = f"contract-{uuid.uuid4().hex[:12]}"
            backend = RedisBackend(REDIS_URL, config, prefix=prefix, clock=clock)
        try:
            yield backend
        finally:
            await backend.aclose()
            if kind == "redis":
                await _drop_prefix(prefix)

    return make


async def test_one_probe_for_an_unknown_bucket_then_the_learned_limit(factory: BackendFactory) -> None:
    async with scenario_driver(factory) as d:
        probe = await d.permit()
        waiting = await d.wait()
        assert waiting.reason == "probe" and close(waiting.seconds, 10.0)  # bounded by the probe's lease
        await d.backend.release(probe, ok(5, 4, 2.0))
        granted = [await d.permit() for _ in range(4)]
        assert len(granted) == 4
        exhausted = await d.wait()
        assert exhausted.reason == "bucket" and close(exhausted.seconds, 2.0)
        d.clock.advance(2.0)
        # Rolled over: refilled to the limit minus the 4 still in flight, then the next deadline is unknown
        # until one of them is answered (at most until the newest lease ends).
        granted.append(await d.permit())
        waiting = await d.wait()
        assert waiting.reason == "probe" and close(waiting.seconds, 10.0)
        for permit in granted:
            await d.backend.release(permit, ok(5, 0, 2.0))


async def test_another_major_is_its_own_bucket(factory: BackendFactory) -> None:
    async with scenario_driver(factory) as d:
        await d.learn(1, 0, 5.0)
        assert (await d.wait()).reason == "bucket"
        await d.permit(OTHER_MAJOR)  # its own probe


async def test_routes_sharing_a_hash_share_the_bucket(factory: BackendFactory) -> None:
    reactions = "/channels/{channel_id}/messages/{message_id}/reactions"
    put = Ask(token="tok", route="PUT|DELETE " + reactions, major="1")
    other = dataclasses.replace(put, route="GET " + reactions)
    async with scenario_driver(factory) as d:
        first = await d.permit(put)
        await d.backend.release(first, ok(2, 1, 1.0, bucket="shared"))
        probe = await d.permit(other)  # its route is unknown: it probes
        await d.backend.release(probe, ok(2, 0, 1.0, bucket="shared"))
        # Both routes now point at one record, which the probe's answer did not raise.
        await d.permit(put)
        assert (await d.wait(other)).reason == "bucket"


async def test_global_limit_paces_and_interactions_are_exempt(factory: BackendFactory) -> None:
    engine = config(global_rate=5, jitter_margin_s=0.0)
    interaction = Ask(token="tok", route="POST /interactions/{interaction_id}/{interaction_token}/callback",
                      major="9", exempt=True)  # fmt: skip
    async with scenario_driver(factory, engine) as d:
        await d.backend.release(await d.permit(), ok(100, 99, 1.0))
        waiting = await d.wait()
        # One interval (1 s / (5 - SLACK)) apart, less the tolerance of SLACK intervals.
        assert waiting.reason == "global" and close(waiting.seconds, (1 - SLACK) / (5 - SLACK))
        await d.permit(interaction)  # exempt: no global wait
        d.clock.advance(waiting.seconds)
        await d.permit()
        assert (await d.wait()).reason == "global"


async def test_cancel_returns_bucket_capacity_and_the_global_slot(factory: BackendFactory) -> None:
    engine = config(global_rate=3, jitter_margin_s=0.0)
    async with scenario_driver(factory, engine) as d:
        await d.backend.release(await d.permit(), ok(1, 1, 5.0))
        d.clock.advance(1.0)
        permit = await d.permit()
        await d.backend.release(permit, Outcome("cancel"))
        await d.permit()  # bucket capacity and the global slot came back


async def test_lost_request_keeps_its_capacity_spent(factory: BackendFactory) -> None:
    async with scenario_driver(factory, config(jitter_margin_s=0.0)) as d:
        await d.learn(2, 2, 5.0)
        d.clock.advance(0.1)
        permit = await d.permit()
        await d.backend.release(permit, Outcome("lost"))
        d.clock.advance(0.1)
        await d.permit()
        waiting = await d.wait()
        assert waiting.reason == "bucket" and close(waiting.seconds, 4.8)


async def test_global_429_freezes_the_token_everywhere(factory: BackendFactory) -> None:
    async with scenario_driver(factory) as d:
        permit = await d.permit()
        await d.backend.release(permit, limited(RateLimitScope.GLOBAL, 3.0, remaining=None))
        other = await d.wait(OTHER_MAJOR)
        assert other.reason == "global" and close(other.seconds, 3.0)


async def test_shared_429_blocks_only_that_resource_and_is_not_invalid(factory: BackendFactory) -> None:
    engine = config(invalid_limit=2, shed_at=0.5, stop_at=0.5)
    async with scenario_driver(factory, engine) as d:
        await d.learn(5, 5, 1.0)
        permit = await d.permit()
        await d.backend.release(permit, limited(RateLimitScope.SHARED, 30.0, remaining=3))
        blocked = await d.wait()
        assert blocked.reason == "blocked" and close(blocked.seconds, 30.0)
        await d.permit(OTHER_MAJOR)  # no budget refusal either: shared 429s do not count


async def test_sublimit_blocks_only_the_request_class(factory: BackendFactory) -> None:
    name_edit = Ask(token="tok", route="PATCH /channels/{channel_id}", major="1",
                    signature="PATCH /channels/{channel_id} +name/topic")  # fmt: skip
    plain_edit = dataclasses.replace(name_edit, signature="")
    async with scenario_driver(factory, config(jitter_margin_s=0.0)) as d:
        await d.learn(10, 10, 10.0, ask=plain_edit)
        d.clock.advance(0.1)
        permit = await d.permit(name_edit)
        await d.backend.release(permit, limited(RateLimitScope.USER, 600.0, remaining=8))
        d.clock.advance(0.1)
        blocked = await d.wait(name_edit)
        assert blocked.reason == "sublimit" and close(blocked.seconds, 599.9)
        await d.permit(plain_edit)


async def test_user_429_empties_the_bucket_until_retry_after(factory: BackendFactory) -> None:
    async with scenario_driver(factory) as d:
        await d.learn(5, 5, 1.0)
        permit = await d.permit()
        await d.backend.release(permit, limited(RateLimitScope.USER, 2.5))
        waiting = await d.wait()
        assert waiting.reason == "bucket" and close(waiting.seconds, 2.5)


async def test_cloudflare_ban_stops_all_traffic_of_the_ip(factory: BackendFactory) -> None:
    async with scenario_driver(factory, config(ban_s=60.0)) as d:
        permit = await d.permit()
        await d.backend.release(permit, Outcome("limited", status=429, limited=None, ban_s=None))
        banned = await d.wait(OTHER_MAJOR)
        assert banned.reason == "ban" and close(banned.seconds, 60.0)
        d.clock.advance(60.0)
        await d.permit(OTHER_MAJOR)


async def test_401_on_the_bot_token_kills_it_but_a_webhook_401_kills_only_the_webhook(
    factory: BackendFactory,
) -> None:
    hook = Ask(token="ip:local", route="POST /webhooks/{webhook_id}/{webhook_token}", major="7|abc",
               webhook="7|abc")  # fmt: skip
    other_hook = dataclasses.replace(hook, major="8|def", webhook="8|def")
    async with scenario_driver(factory, config(webhook_ttl_s=100.0)) as d:
        permit = await d.permit(hook)
        await d.backend.release(permit, Outcome("response", status=401, code=50027))
        assert (await d.refusal(hook)).reason == WEBHOOK_DEAD
        await d.permit(other_hook)
        await d.permit(ASK)  # the bot token is fine
        d.clock.advance(100.0)
        await d.permit(hook)  # the negative cache expired
        permit = await d.permit(OTHER_MAJOR)
        await d.backend.release(permit, Outcome("response", status=401, code=0))
        assert (await d.refusal(ASK)).reason == TOKEN_REVOKED


async def test_invalid_budget_sheds_optional_traffic_first(factory: BackendFactory) -> None:
    engine = config(invalid_limit=10, shed_at=0.5, stop_at=0.8)
    forbidden = Outcome("response", status=403, code=50013)
    async with scenario_driver(factory, engine) as d:
        for index in range(5):
            ask = dataclasses.replace(ASK, major=str(100 + index))
            await d.backend.release(await d.permit(ask), forbidden)
        optional = dataclasses.replace(ASK, optional=True)
        assert (await d.refusal(optional)).reason == INVALID_BUDGET
        for index in range(3):
            ask = dataclasses.replace(ASK, major=str(200 + index))
            await d.backend.release(await d.permit(ask), forbidden)
        assert (await d.refusal(ASK)).reason == INVALID_BUDGET
        d.clock.advance(engine.invalid_window_s + engine.invalid_window_s / engine.invalid_sub_buckets)
        await d.permit(ASK)


async def test_route_without_bucket_headers_is_global_only(factory: BackendFactory) -> None:
    async with scenario_driver(factory, config(jitter_margin_s=0.0, global_rate=1000)) as d:
        probe = await d.permit()
        await d.backend.release(probe, Outcome("response", status=200, headers=None))
        d.clock.advance(0.01)
        first = await d.permit()
        d.clock.advance(0.01)
        second = await d.permit()  # no bucket: only the global limit applies
        assert first.bucket is None and second.bucket is None


async def test_a_dead_holder_blocks_nobody_beyond_its_lease(factory: BackendFactory) -> None:
    async with scenario_driver(factory, config(lease_s=4.0)) as d:
        await d.permit()  # the probe's holder "dies": never released
        waiting = await d.wait()
        assert waiting.reason == "probe" and close(waiting.seconds, 4.0)
        d.clock.advance(4.0)
        await d.permit()  # a new probe


async def test_a_changed_hash_moves_the_route(factory: BackendFactory) -> None:
    async with scenario_driver(factory, config(jitter_margin_s=0.0)) as d:
        await d.learn(1, 0, 5.0)
        assert (await d.wait()).reason == "bucket"
        d.clock.advance(5.0)
        permit = await d.permit()
        await d.backend.release(permit, ok(3, 2, 5.0, bucket="h2"))
        d.clock.advance(0.1)
        await d.permit()  # the route now points at h2, which has 2 left
        await d.permit()
        waiting = await d.wait()
        assert waiting.reason == "bucket" and close(waiting.seconds, 4.9)


async def test_conservative_mode_allows_one_in_flight_per_bucket(factory: BackendFactory) -> None:
    async with scenario_driver(factory, config(max_in_flight=1, lease_s=10.0)) as d:
        await d.learn(5, 5, 1.0)
        permit = await d.permit()
        waiting = await d.wait()
        assert waiting.reason == "probe" and close(waiting.seconds, 10.0)
        await d.backend.release(permit, ok(5, 3, 1.0))
        await d.permit()


def test_inf_is_never_a_lease_wait() -> None:
    assert not close(math.inf, 10.0)
    assert DEFAULT_JITTER_MARGIN_S > 0


async def test_conservative_mode_recovers_from_a_dead_holder(factory: BackendFactory) -> None:
    async with scenario_driver(factory, config(max_in_flight=1, lease_s=1.0)) as d:
        await d.learn(5, 5, 10.0)
        await d.permit()  # its holder dies
        assert (await d.wait()).reason == "probe"
        d.clock.advance(1.0)
        await d.permit()


async def test_a_grant_of_an_expired_record_is_not_given_to_its_successor(factory: BackendFactory) -> None:
    async with scenario_driver(factory, config(lease_s=1.0, idle_ttl_s=1.0)) as d:
        old = await d.permit()  # a probe whose answer comes very late
        d.clock.advance(5.0)  # the record expired meanwhile
        await d.permit()  # a new record, a new probe
        await d.backend.release(old, Outcome("cancel"))  # must not free the new record's probe
        waiting = await d.wait()
        assert waiting.reason == "probe"


async def test_an_error_without_bucket_headers_teaches_nothing(factory: BackendFactory) -> None:
    async with scenario_driver(factory) as d:
        await d.learn(1, 1, 10.0)
        permit = await d.permit()
        await d.backend.release(permit, Outcome("response", status=502, headers=None))
        waiting = await d.wait()  # still limited; the route did not become global-only
        assert waiting.reason == "bucket" and close(waiting.seconds, 10.0)


async def test_a_global_429_freezes_even_when_the_bucket_record_is_gone(factory: BackendFactory) -> None:
    async with scenario_driver(factory, config(lease_s=1.0, idle_ttl_s=1.0)) as d:
        permit = await d.permit()
        d.clock.advance(5.0)  # the probe's record expired while it was out
        await d.backend.release(permit, limited(RateLimitScope.GLOBAL, 10.0, remaining=None))
        frozen = await d.wait(OTHER_MAJOR)
        assert frozen.reason == "global" and close(frozen.seconds, 10.0)
