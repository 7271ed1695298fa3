"""The invalid-request budget, token/webhook health (R7) and sub-limit blocks (R6): pure calls with `now`."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.buckets import RateLimitScope
from ratelimit.invalid import (
    TOKEN_REVOKED,
    WEBHOOK_DEAD,
    InvalidRequestBudget,
    SublimitTable,
    TokenHealth,
    signature,
)
from ratelimit.routes import route_key

# --- InvalidRequestBudget -------------------------------------------------------------------------------


def test_a_response_counts_for_the_window_and_expires_with_its_sub_bucket() -> None:
    budget = InvalidRequestBudget(limit=100)  # 600 s in 60 sub-buckets of 10 s
    assert budget.sub_bucket_s == 10.0
    assert budget.record(401, None, 5.0)  # sub-bucket 0: [0, 10)
    assert budget.record(403, None, 10.0)  # sub-bucket 1: [10, 20)
    assert budget.count(10.0) == 2
    assert budget.count(604.999) == 2  # still inside the 600 s of both
    assert budget.count(609.999) == 2  # sub-bucket 0 still covered: errs high by under one sub-bucket
    assert budget.count(610.0) == 1  # sub-bucket 0 gone
    assert budget.count(619.999) == 1
    assert budget.count(620.0) == 0
    assert budget.statistics(620.0).counted == 2


def test_shared_429s_and_other_statuses_do_not_count() -> None:
    budget = InvalidRequestBudget(limit=100)
    assert not budget.record(429, "shared", 0.0)
    assert not budget.record(429, RateLimitScope.SHARED, 0.0)
    assert not budget.record(429, "Shared", 0.0)
    assert not budget.record(404, None, 0.0)
    assert not budget.record(200, None, 0.0)
    assert not budget.record(500, None, 0.0)
    assert budget.record(429, RateLimitScope.USER, 0.0)
    assert budget.record(429, "global", 0.0)
    assert budget.record(429, None, 0.0)  # no scope header: a Cloudflare ban page, say
    assert budget.record(401, None, 0.0)
    assert budget.record(403, "shared", 0.0)  # the scope exemption is for 429s only
    stats = budget.statistics(0.0)
    assert (stats.count, stats.counted, stats.ignored) == (5, 5, 6)


def test_optional_traffic_is_shed_first_then_everything() -> None:
    budget = InvalidRequestBudget(limit=100)  # warn at 25, shed optional at 50, stop all at 95
    for _ in range(24):
        budget.record(401, None, 0.0)
    assert budget.level(0.0) == "ok"
    budget.record(401, None, 0.0)
    assert budget.level(0.0) == "warn"
    for _ in range(24):
        budget.record(401, None, 0.0)
    assert budget.count(0.0) == 49
    assert budget.allows(True, 0.0) and budget.allows(False, 0.0)
    budget.record(401, None, 0.0)
    assert budget.level(0.0) == "shed"
    assert not budget.allows(True, 0.0)
    assert budget.allows(False, 0.0)
    for _ in range(44):
        budget.record(401, None, 0.0)
    assert budget.count(0.0) == 94
    assert budget.allows(False, 0.0)
    budget.record(401, None, 0.0)
    assert not budget.allows(False, 0.0)
    assert not budget.allows(True, 0.0)
    assert budget.level(610.0) == "ok"  # the window moved on
    assert budget.allows(True, 610.0)


def test_default_thresholds() -> None:
    budget = InvalidRequestBudget()
    assert (budget.limit, budget.window_s) == (10_000, 600.0)
    for _ in range(5000):
        budget.record(429, "user", 1.0)
    assert budget.level(1.0) == "shed"
    assert not budget.allows(True, 1.0)
    assert budget.allows(False, 1.0)
    assert budget.peak_fraction == 0.5


def test_peak_fraction_remembers_the_highest_window() -> None:
    budget = InvalidRequestBudget(limit=200)
    for _ in range(30):
        budget.record(401, None, 0.0)
    assert budget.peak_fraction == 0.15
    for _ in range(10):
        budget.record(401, None, 700.0)  # the first 30 have expired
    assert budget.count(700.0) == 10
    assert budget.peak_fraction == 0.15
    for _ in range(40):
        budget.record(403, None, 800.0)
    assert budget.count(800.0) == 50
    assert budget.peak_fraction == 0.25
    assert budget.statistics(800.0).peak_count == 50


def test_a_stale_now_lands_in_the_newest_sub_bucket() -> None:
    budget = InvalidRequestBudget(limit=100)
    budget.record(401, None, 100.0)
    budget.record(401, None, 95.0)  # an older clock read: kept as long as the newest, never shorter
    assert budget.count(709.999) == 2
    assert budget.count(710.0) == 0


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError, match="warn_at"):
        InvalidRequestBudget(warn_at=0.6, shed_at=0.5)
    with pytest.raises(ValueError, match="limit"):
        InvalidRequestBudget(limit=0)


_STEPS = st.lists(
    st.tuples(st.integers(min_value=0, max_value=800), st.booleans()),  # (gap in 0.25 s, record or query)
    min_size=1,
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(steps=_STEPS)
def test_the_count_is_the_window_exact_to_one_sub_bucket(steps: list[tuple[int, bool]]) -> None:
    budget = InvalidRequestBudget(limit=1000, window_s=60.0, sub_buckets=6)  # 10 s sub-buckets
    now = 0.0
    recorded: list[float] = []
    peak = 0
    for gap, is_record in steps:
        now += gap * 0.25
        if is_record:
            budget.record(401, None, now)
            recorded.append(now)
        count = budget.count(now)
        exact = sum(1 for t in recorded if t > now - 60.0)
        loose = sum(1 for t in recorded if t > now - 70.0)
        assert exact <= count <= loose  # never more than was recorded in the window plus one sub-bucket
        peak = max(peak, count)
    assert budget.peak_fraction == peak / 1000


# --- TokenHealth ----------------------------------------------------------------------------------------


def test_a_storm_of_dead_webhook_401s_never_kills_the_bot_token() -> None:
    # Scenario 5.3.7: a revoked token and 1,000 dead webhooks in the mix, ten rounds of traffic.
    health = TokenHealth()
    budget = InvalidRequestBudget()
    webhooks = [f"{n}|digest{n}" for n in range(1000)]
    sent = 0
    for round_ in range(10):
        now = float(round_)
        requests = [("bot", None)] + [("bot", key) for key in webhooks] + [("revoked", None)]
        for token, key in requests:
            if health.check(token, key, now) is not None:
                continue
            sent += 1
            if token == "revoked":
                health.record(401, 0, token_id=token, webhook_key=None, now=now)
                budget.record(401, None, now)
            elif key is not None:
                assert health.record(401, 50027, token_id=token, webhook_key=key, now=now) == WEBHOOK_DEAD
                budget.record(401, None, now)
    assert sent == 10 + 1000 + 1  # the bot's own requests every round; each dead thing failed once
    assert health.check("bot", None, 9.0) is None
    assert health.check("revoked", None, 9.0) == TOKEN_REVOKED
    assert budget.peak_fraction == 1001 / 10_000
    stats = health.statistics()
    assert (stats.dead_tokens, stats.dead_webhooks, stats.refused) == (
        1,
        1000,
        9 * 1001 + 1,
    )  # + the check above


def test_50027_kills_the_webhook_and_a_plain_401_kills_the_token() -> None:
    health = TokenHealth()
    assert health.record(401, 50027, token_id="bot", webhook_key="1|a", now=0.0) == WEBHOOK_DEAD
    assert health.check("bot", None, 0.0) is None
    assert health.check("bot", "1|a", 0.0) == WEBHOOK_DEAD
    assert health.check("bot", "2|b", 0.0) is None
    # 50027 without a webhook to blame marks nothing, and certainly not the token.
    assert health.record(401, 50027, token_id="bot", webhook_key=None, now=0.0) is None
    assert health.check("bot", None, 0.0) is None
    # A plain 401 with the bot token: the token is dead for every bot-authenticated request.
    assert health.record(401, 0, token_id="bot", webhook_key=None, now=1.0) == TOKEN_REVOKED
    assert health.record(401, None, token_id="other", webhook_key=None, now=1.0) == TOKEN_REVOKED
    assert health.check("bot", None, 5000.0) == TOKEN_REVOKED  # no expiry
    assert health.check("bot", "2|b", 5000.0) is None  # a webhook token's request does not use it
    assert health.check("third", None, 1.0) is None
    health.revive("bot")
    assert health.check("bot", None, 5000.0) is None


def test_403_marks_nothing() -> None:
    health = TokenHealth()
    assert health.record(403, 50013, token_id="bot", webhook_key=None, now=0.0) is None
    assert health.record(403, 50013, token_id="bot", webhook_key="1|a", now=0.0) is None
    assert health.check("bot", None, 0.0) is None
    assert health.check("bot", "1|a", 0.0) is None


def test_webhook_404s_and_the_negative_cache_expiry() -> None:
    health = TokenHealth()  # 1 h
    assert health.record(404, None, token_id="bot", webhook_key="1|a", now=0.0) == WEBHOOK_DEAD
    assert health.record(404, 10015, token_id="bot", webhook_key="2|b", now=0.0) == WEBHOOK_DEAD
    assert health.record(404, 10008, token_id="bot", webhook_key="3|c", now=0.0) is None  # unknown message
    assert health.record(404, None, token_id="bot", webhook_key=None, now=0.0) is None  # not a webhook route
    assert health.check("bot", "1|a", 3599.999) == WEBHOOK_DEAD
    assert health.check("bot", "3|c", 0.0) is None
    assert health.check("bot", "1|a", 3600.0) is None
    assert health.statistics().dead_webhooks == 0  # both expired at 3600 and were pruned
    assert health.check("bot", None, 3600.0) is None


def test_a_repeat_failure_extends_the_webhook_and_the_cache_is_bounded() -> None:
    health = TokenHealth(webhook_ttl_s=100.0, max_webhooks=2)
    health.record(401, 50027, token_id="bot", webhook_key="a", now=0.0)
    health.record(401, 50027, token_id="bot", webhook_key="b", now=10.0)
    health.record(401, 50027, token_id="bot", webhook_key="a", now=20.0)  # a now expires at 120
    health.record(401, 50027, token_id="bot", webhook_key="c", now=30.0)  # evicts b, the first to expire
    assert health.statistics().dead_webhooks == 2
    assert health.check("bot", "b", 30.0) is None
    assert health.check("bot", "a", 119.0) == WEBHOOK_DEAD
    assert health.check("bot", "c", 119.0) == WEBHOOK_DEAD
    assert health.check("bot", "a", 120.0) is None


# --- SublimitTable --------------------------------------------------------------------------------------


def test_signature_follows_discord_js_has_sublimit() -> None:
    channel = "/channels/{channel_id}"
    assert signature("PATCH", channel, frozenset({"name"})) == "PATCH /channels/{channel_id} +name/topic"
    assert (
        signature("patch", channel, frozenset({"topic", "nsfw"}))
        == "PATCH /channels/{channel_id} +name/topic"
    )
    assert signature("PATCH", channel, frozenset({"nsfw"})) == "PATCH /channels/{channel_id}"
    assert signature("PATCH", channel, frozenset()) == "PATCH /channels/{channel_id}"
    assert signature("PUT", channel, frozenset({"name"})) == "PUT /channels/{channel_id}"
    messages = "/channels/{channel_id}/messages/{message_id}"
    assert signature("PATCH", messages, frozenset({"name"})) == f"PATCH {messages}"
    assert SublimitTable.signature is signature


def test_a_blocked_name_edit_blocks_nothing_else() -> None:
    table = SublimitTable()
    key = route_key("PATCH", "/channels/111")
    name_edit = signature(key.method, key.template, frozenset({"name"}))
    plain = signature(key.method, key.template, frozenset({"nsfw"}))
    table.block(name_edit, key.majors[0], 600.0)
    assert table.blocked_until(name_edit, "111", 0.0) == 600.0
    assert table.blocked_until(signature("PATCH", key.template, frozenset({"topic"})), "111", 0.0) == 600.0
    assert table.blocked_until(plain, "111", 0.0) is None  # a plain PATCH of the same channel
    assert table.blocked_until(name_edit, "222", 0.0) is None  # the same edit on another channel
    assert table.blocked_until(name_edit, "111", 599.999) == 600.0
    assert table.blocked_until(name_edit, "111", 600.0) is None
    assert table.statistics().entries == 0


def test_blocks_extend_never_shorten_and_the_table_is_bounded() -> None:
    table = SublimitTable(max_entries=2)
    table.block("s", "1", 100.0)
    table.block("s", "1", 50.0)  # shorter: ignored
    assert table.blocked_until("s", "1", 0.0) == 100.0
    table.block("s", "1", 150.0)
    assert table.blocked_until("s", "1", 120.0) == 150.0
    table.block("s", "2", 130.0)
    table.block("s", "3", 200.0)  # evicts ("s", "2"), the first to expire
    assert table.blocked_until("s", "2", 125.0) is None
    assert table.blocked_until("s", "1", 125.0) == 150.0
    assert table.blocked_until("s", "3", 125.0) == 200.0
    stats = table.statistics()
    assert (stats.entries, stats.blocks, stats.evicted) == (2, 5, 1)
    table.prune(200.0)
    assert table.statistics().entries == 0
