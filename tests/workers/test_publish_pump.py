"""PublishPump under a virtual clock, with an in-memory publisher that is slow or fails when told to."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from workers.errors import PublishError
from workers.publish import CommittedSeq, OutboundEvent, commit_to, open_publish_pump


def ev(seq: int, shard: int = 0) -> OutboundEvent:
    return OutboundEvent(shard, "s", seq, "MESSAGE_CREATE", b'{"n":%d}' % seq)


class FakePublisher:
    """Accepts a batch after ``latency_s``; the calls numbered in ``fail_calls`` raise PublishError."""

    def __init__(self, latency_s: float = 0.0, fail_calls: Sequence[int] = (), always_fail: bool = False):
        self.latency_s = latency_s
        self.fail_calls = set(fail_calls)
        self.always_fail = always_fail
        self.calls: list[tuple[float, list[int]]] = []  # (virtual time, seqs) at each call
        self.accepted: list[list[int]] = []

    async def publish(self, batch: Sequence[OutboundEvent]) -> None:
        call = len(self.calls)
        self.calls.append((trio.current_time(), [e.seq for e in batch]))
        await trio.sleep(self.latency_s)
        if self.always_fail or call in self.fail_calls:
            raise PublishError(f"call {call} failed")
        self.accepted.append([e.seq for e in batch])


class Recorder:
    def __init__(self) -> None:
        self.confirmed: list[tuple[float, list[int]]] = []

    def __call__(self, batch: Sequence[OutboundEvent]) -> None:
        self.confirmed.append((trio.current_time(), [e.seq for e in batch]))


async def test_a_partial_batch_waits_max_delay_a_full_one_goes_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    publisher, recorder = FakePublisher(latency_s=0.1), Recorder()
    with trio.fail_after(10):
        async with open_publish_pump(
            publisher, capacity=100, max_batch=4, max_delay_s=0.005, on_confirmed=recorder
        ) as pump:
            for seq in (1, 2, 3):
                assert pump.try_put(ev(seq))
            await trio.sleep(1)
            for seq in range(4, 12):
                assert pump.try_put(ev(seq))
            await trio.sleep(1)
    assert publisher.calls == [(0.005, [1, 2, 3]), (1.0, [4, 5, 6, 7]), (1.0, [8, 9, 10, 11])]
    assert [(round(t, 9), seqs) for t, seqs in recorder.confirmed] == [
        (0.105, [1, 2, 3]),
        (1.1, [4, 5, 6, 7]),
        (1.1, [8, 9, 10, 11]),
    ]
    stats = pump.statistics()
    assert (stats.queued, stats.in_flight, stats.published, stats.batches, stats.failures) == (0, 0, 11, 3, 0)


async def test_window_bounds_batches_in_flight_and_calls_start_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    publisher, recorder = FakePublisher(latency_s=1.0), Recorder()
    with trio.fail_after(10):
        async with open_publish_pump(
            publisher, capacity=100, max_batch=2, max_delay_s=0, window=2, on_confirmed=recorder
        ) as pump:
            for seq in range(1, 10):
                assert pump.try_put(ev(seq))
            await trio.sleep(0.5)
            assert (pump.statistics().in_flight, pump.statistics().queued) == (4, 5)
    assert publisher.calls == [
        (0.0, [1, 2]),
        (0.0, [3, 4]),
        (1.0, [5, 6]),
        (1.0, [7, 8]),
        (2.0, [9]),
    ]
    assert [seqs for _, seqs in recorder.confirmed] == [[1, 2], [3, 4], [5, 6], [7, 8], [9]]
    assert recorder.confirmed[-1][0] == 3.0


async def test_failed_batches_retry_with_backoff_and_confirm_in_batch_order(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    # Call 0 (batch [1,2]) and call 2 (its first retry) fail; batch [3,4] (call 1) succeeds meanwhile.
    publisher, recorder = FakePublisher(latency_s=0.01, fail_calls=(0, 2)), Recorder()
    trackers = {0: CommittedSeq("s")}
    for seq in range(1, 5):
        trackers[0].received(seq, publish=True)
    commit = commit_to(trackers)

    def on_confirmed(batch: Sequence[OutboundEvent]) -> None:
        recorder(batch)
        commit(batch)

    with caplog.at_level(logging.WARNING, logger="workers.publish.pump"), trio.fail_after(10):
        async with open_publish_pump(
            publisher,
            capacity=100,
            max_batch=2,
            max_delay_s=0,
            on_confirmed=on_confirmed,
            retry_initial_s=0.05,
        ) as pump:
            for seq in (1, 2):
                assert pump.try_put(ev(seq))
            await trio.sleep(0.001)
            for seq in (3, 4):
                assert pump.try_put(ev(seq))
            await trio.sleep(0.02)
            assert publisher.accepted == [[3, 4]]
            assert recorder.confirmed == [] and trackers[0].committed == 0  # [1,2] still retrying
    # call 0 fails at .01, retry (call 2) at .06 fails at .07, retry (call 3) at .17 succeeds at .18.
    assert [(round(t, 6), seqs) for t, seqs in publisher.calls] == [
        (0.0, [1, 2]),
        (0.001, [3, 4]),
        (0.06, [1, 2]),
        (0.17, [1, 2]),
    ]
    assert [(round(t, 6), seqs) for t, seqs in recorder.confirmed] == [(0.18, [1, 2]), (0.18, [3, 4])]
    assert trackers[0].committed == 4
    stats = pump.statistics()
    assert (stats.failures, stats.last_error, stats.published) == (2, "PublishError('call 2 failed')", 4)
    # Each failure that follows an accepted publish starts an outage; the next accepted one ends it.
    assert [r.message for r in caplog.records] == [
        "publish.broker_unavailable",
        "publish.broker_recovered",
        "publish.broker_unavailable",
        "publish.broker_recovered",
    ]


async def test_an_outage_is_one_warning_when_it_starts_and_one_when_it_is_over(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Four batches in flight retrying for 20 s (dozens of failed publishes) log two lines at warning."""

    class OutagePublisher(FakePublisher):
        async def publish(self, batch: Sequence[OutboundEvent]) -> None:
            self.always_fail = 1.0 <= trio.current_time() < 21.0
            await super().publish(batch)

    publisher, recorder = OutagePublisher(latency_s=0.01), Recorder()
    with caplog.at_level(logging.DEBUG, logger="workers.publish.pump"), trio.fail_after(100):
        async with open_publish_pump(
            publisher, capacity=1000, max_batch=2, max_delay_s=0, on_confirmed=recorder, retry_max_s=1.0
        ) as pump:
            for seq in range(1, 401):
                assert pump.try_put(ev(seq))
                await trio.sleep(0.1)
    assert pump.statistics().published == 400
    failures = pump.statistics().failures
    assert failures > 40
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.message for r in warnings] == ["publish.broker_unavailable", "publish.broker_recovered"]
    assert warnings[1].failed_attempts == failures and 19.0 <= warnings[1].outage_s <= 21.0
    assert sum(r.message == "publish.retry" for r in caplog.records) == failures - 1


async def test_try_put_refuses_when_full_and_wait_drained_below(autojump_clock: trio.abc.Clock) -> None:
    publisher, recorder = FakePublisher(latency_s=2.0), Recorder()
    with trio.fail_after(10):
        async with open_publish_pump(
            publisher, capacity=4, max_batch=2, max_delay_s=0, window=1, on_confirmed=recorder
        ) as pump:
            assert [pump.try_put(ev(seq)) for seq in range(1, 7)] == [True] * 4 + [False] * 2
            assert pump.free_slots == 0
            await pump.wait_drained_below(4)  # batch [1, 2] confirmed at t=2
            assert (trio.current_time(), pump.free_slots) == (2.0, 2)
            await pump.wait_drained_below(1)  # [3, 4] at t=4
            assert (trio.current_time(), pump.free_slots) == (4.0, 4)
            assert pump.try_put(ev(5))
        assert trio.current_time() == 6.0
    assert [seqs for _, seqs in recorder.confirmed] == [[1, 2], [3, 4], [5]]


async def test_exit_drains_at_once_without_the_batching_delay(autojump_clock: trio.abc.Clock) -> None:
    publisher, recorder = FakePublisher(latency_s=0.5), Recorder()
    with trio.fail_after(10):
        async with open_publish_pump(publisher, capacity=10, max_delay_s=60, on_confirmed=recorder) as pump:
            assert pump.try_put(ev(1)) and pump.try_put(ev(2))
        assert trio.current_time() == 0.5
        assert not pump.try_put(ev(3))  # closed
    assert recorder.confirmed == [(0.5, [1, 2])]


async def test_exit_gives_up_after_the_drain_deadline(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    publisher, recorder = FakePublisher(always_fail=True), Recorder()
    with caplog.at_level(logging.WARNING, logger="workers.publish.pump"), trio.fail_after(60):
        async with open_publish_pump(
            publisher, capacity=10, on_confirmed=recorder, drain_timeout_s=3.0, retry_initial_s=1.0
        ) as pump:
            assert pump.try_put(ev(1))
            await trio.sleep(1)
        assert trio.current_time() == 4.0
    assert recorder.confirmed == []
    # attempts at .005, 1.005, 3.005 (backoff 1, 2), then the deadline at 4.0
    assert [t for t, _ in publisher.calls] == [0.005, 1.005, 3.005]
    assert caplog.records[-1].message == "publish.drain_timeout"
    assert pump.statistics().in_flight == 1


async def test_the_owner_may_end_the_drain_sooner(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's stop deadline (`limit_drain`) wins over a later `drain_timeout_s`, never a sooner one."""
    publisher, recorder = FakePublisher(always_fail=True), Recorder()
    with caplog.at_level(logging.WARNING, logger="workers.publish.pump"), trio.fail_after(60):
        async with open_publish_pump(
            publisher, capacity=10, on_confirmed=recorder, drain_timeout_s=5.0, retry_initial_s=1.0
        ) as pump:
            assert pump.try_put(ev(1))
            pump.limit_drain(2.5)
            pump.limit_drain(100.0)  # a later deadline does not undo a sooner one
            await trio.sleep(1)
        assert trio.current_time() == 2.5
    assert recorder.confirmed == []
    assert caplog.records[-1].message == "publish.drain_timeout"


async def test_an_error_in_the_block_cancels_the_pump_at_once(autojump_clock: trio.abc.Clock) -> None:
    publisher, recorder = FakePublisher(latency_s=5.0), Recorder()
    with trio.fail_after(10), pytest.raises(RuntimeError, match="shell died"):
        async with open_publish_pump(publisher, capacity=10, max_delay_s=0, on_confirmed=recorder) as pump:
            assert pump.try_put(ev(1))
            await trio.sleep(1)
            raise RuntimeError("shell died")
    assert trio.current_time() == 1.0
    assert recorder.confirmed == []


async def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        async with open_publish_pump(FakePublisher(), capacity=0, on_confirmed=Recorder()):
            pass
