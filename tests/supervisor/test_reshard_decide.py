"""Live resharding's decisions, without I/O: when to reshard, when to refuse, when a 4011 is fatal."""

from __future__ import annotations

import pytest

from supervisor.reshard import READY_SLACK_S, ReshardDecision, decide, merge_digests, ready_timeout_s


def budget(remaining: int = 1000, total: int = 1000, reserve: int = 10) -> dict[str, int]:
    return {"remaining": remaining, "total": total, "reset_after_ms": 3_600_000, "reserve": reserve}


def test_a_changed_recommendation_reshards_to_it() -> None:
    decision = decide(4, 8, "signal", **budget())
    assert decision == ReshardDecision("reshard", "4 -> 8 shards (signal)", 4, 8)
    assert decide(8, 2, "interval", **budget()).action == "reshard"  # shrinking too


def test_the_same_count_does_nothing_except_after_a_4011() -> None:
    assert decide(8, 8, "interval", **budget()).action == "none"
    assert decide(8, 8, "signal", **budget()).action == "none"
    fatal = decide(8, 8, "4011", **budget())
    assert fatal.action == "fatal"
    assert "4011" in fatal.reason and "8" in fatal.reason
    assert decide(8, 0, "interval", **budget()).action == "none"  # a nonsense answer is ignored


def test_a_new_generation_never_eats_into_the_reserve() -> None:
    # 16 identifies from 25 left would leave 9, under the reserve of 10: refused, the old generation stays.
    refused = decide(8, 16, "4011", **budget(remaining=25))
    assert refused.action == "refuse"
    assert refused.target == 16
    assert "16 shards" in refused.reason
    # 26 left leaves exactly the reserve: allowed.
    assert decide(8, 16, "4011", **budget(remaining=26)).action == "reshard"


def test_the_ready_timeout_is_the_identify_bound_plus_slack() -> None:
    assert ready_timeout_s(16, 1) == 16 * 5.0 + READY_SLACK_S
    assert ready_timeout_s(16, 16) == 5.0 + READY_SLACK_S
    assert ready_timeout_s(17, 16) == 10.0 + READY_SLACK_S


def test_digest_reports_merge_into_one_sorted_set() -> None:
    a = (1).to_bytes(8, "big") + (3).to_bytes(8, "big")
    b = (3).to_bytes(8, "big") + (2).to_bytes(8, "big")
    merged = merge_digests([a, b, b""])
    assert merged == b"".join(n.to_bytes(8, "big") for n in (1, 2, 3))
    with pytest.raises(ValueError, match="8 bytes each, got 7 bytes"):
        merge_digests([b"\x00" * 7])
