"""Live resharding's worker side as units (workers.reshard): the digest, the shadow buffer's aging and
commits, GoLive's flush and skip window, Retire's drain and digest window, the guild arrival count, and
Uncovered (events of the old generation's stopped shards kept until GoLive; the guild id read from the raw
`d`). Times are exact: pytest-trio's `autojump_clock` runs them on a virtual clock starting at 0."""

from __future__ import annotations

import hashlib
import logging

import pytest
import trio
import trio.testing

from workers.control_messages import ControlMessage, Retired
from workers.publish.base import OutboundEvent
from workers.publish.pump import CommittedSeq
from workers.reshard import (
    GUILDS_ARRIVAL_TIMEOUT_S,
    RESHARD_DIGEST_WINDOW_S,
    RETIRE_DRAIN_S,
    SHADOW_BUFFER_S,
    Cutover,
    DigestRing,
    GuildArrivals,
    Offer,
    Phase,
    ShardOutlet,
    event_digest,
    event_guild_ids,
    pack_digests,
    unpack_digests,
)

SESSION = "s1"


def event(seq: int, at: float, name: str = "MESSAGE_CREATE", shard: int = 0) -> OutboundEvent:
    return OutboundEvent(shard, SESSION, seq, name, b'{"id":"%d"}' % seq, at)


def digest_of(item: OutboundEvent) -> int:
    return event_digest(item.name, item.data)


class FakePump:
    """The pump's producer side: takes events up to `capacity` (`release` frees room, as confirms would)."""

    def __init__(self, capacity: int = 100) -> None:
        self.capacity = capacity
        self.events: list[OutboundEvent] = []
        self.held = 0
        self.closing = False
        self._released = trio.Event()

    @property
    def free_slots(self) -> int:
        return self.capacity - self.held

    def try_put(self, item: OutboundEvent) -> bool:
        if self.closing or self.held >= self.capacity:
            return False
        self.events.append(item)
        self.held += 1
        return True

    def release(self, count: int) -> None:
        self.held -= count
        self._released.set()
        self._released = trio.Event()

    async def wait_drained_below(self, n: int) -> None:
        await trio.lowlevel.checkpoint()
        while self.held >= n:
            await self._released.wait()


class Commits:
    """The shard's side of `commit`: a real CommittedSeq, and when each seq was committed."""

    def __init__(self) -> None:
        self.committed = CommittedSeq(SESSION, 0)
        self.at: list[tuple[float, int]] = []

    def __call__(self, item: OutboundEvent) -> None:
        self.at.append((trio.current_time(), item.seq))
        self.committed.confirmed(item.seq)

    def offer(self, outlet: ShardOutlet, item: OutboundEvent) -> Offer:
        """What `ShardRunner._dispatch` does: offer, then record the seq as waiting (or not)."""
        offer = outlet.offer(item)
        self.committed.received(item.seq, offer is not Offer.SKIPPED)
        return offer


# -- the digest ------------------------------------------------------------------------------------------


def test_the_digest_is_the_first_8_bytes_of_blake2b_over_name_nul_and_data() -> None:
    data = b'{"id":"1","content":"hi"}'
    expected = int.from_bytes(hashlib.blake2b(b"MESSAGE_CREATE\0" + data).digest()[:8], "big")
    assert event_digest("MESSAGE_CREATE", data) == expected
    assert 0 <= expected < 2**64
    assert event_digest("MESSAGE_UPDATE", data) != expected
    assert event_digest("MESSAGE_CREATE", data + b" ") != expected
    # The NUL separates name and body: moving a byte across it changes the digest.
    assert event_digest("A", b"BC") != event_digest("AB", b"C")


def test_digests_pack_as_8_byte_big_endian_values() -> None:
    digests = [0, 1, 2**64 - 1, 0x0102030405060708]
    packed = pack_digests(digests)
    assert len(packed) == 32
    assert packed[24:] == bytes(range(1, 9))
    assert unpack_digests(packed) == frozenset(digests)
    assert unpack_digests(b"") == frozenset()
    with pytest.raises(ValueError, match="8 bytes each"):
        unpack_digests(b"\0" * 9)


# -- shadow buffer -----------------------------------------------------------------------------------------


async def test_a_shadow_buffer_ages_out_after_5_s_and_commits_then(autojump_clock: trio.abc.Clock) -> None:
    assert SHADOW_BUFFER_S == 5.0 and RESHARD_DIGEST_WINDOW_S == 10.0 and RETIRE_DRAIN_S == 10.0
    commits, pump = Commits(), FakePump()
    outlet = ShardOutlet(0, pump, role="shadow", commit=commits)
    assert outlet.role == "shadow" and not outlet.needs_pump
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outlet.age_out)
        for seq, at in ((1, 0.0), (2, 1.0), (3, 1.0), (4, 2.5)):
            await trio.sleep_until(at)
            assert commits.offer(outlet, event(seq, trio.current_time())) is Offer.BUFFERED
        # Nothing commits while an event is in the buffer: a crash now RESUMEs from seq 0 and replays them.
        await trio.sleep_until(4.999)
        assert commits.committed.committed == 0 and outlet.buffered == 4
        await trio.sleep_until(12.0)
        nursery.cancel_scope.cancel()
    assert commits.at == [(5.0, 1), (6.0, 2), (6.0, 3), (7.5, 4)]
    assert commits.committed.committed == 4
    assert pump.events == [] and outlet.aged_out == 4 and outlet.buffered == 0


async def test_the_buffer_waits_for_its_first_event_after_emptying(autojump_clock: trio.abc.Clock) -> None:
    commits = Commits()
    outlet = ShardOutlet(0, FakePump(), role="shadow", commit=commits)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outlet.age_out)
        commits.offer(outlet, event(1, 0.0))
        await trio.sleep_until(30.0)  # empty since 5.0
        commits.offer(outlet, event(2, trio.current_time()))
        await trio.sleep_until(40.0)
        nursery.cancel_scope.cancel()
    assert commits.at == [(5.0, 1), (35.0, 2)]


# -- GoLive ------------------------------------------------------------------------------------------------


async def test_go_live_publishes_the_buffer_less_the_digests_in_order_then_skips_them_for_10_s(
    autojump_clock: trio.abc.Clock,
) -> None:
    commits, pump = Commits(), FakePump()
    outlet = ShardOutlet(0, pump, role="shadow", commit=commits)
    buffered = [event(seq, 0.0) for seq in range(1, 7)]
    for item in buffered:
        commits.offer(outlet, item)
    later_twin = event(7, 0.0)  # the old generation published it; this shard receives it after GoLive
    last_twin = event(10, 0.0)
    old_generation = {
        digest_of(buffered[1]),
        digest_of(buffered[4]),
        digest_of(later_twin),
        digest_of(last_twin),
    }
    await trio.sleep_until(1.0)
    counts = await outlet.go_live(old_generation, trio.current_time() + RESHARD_DIGEST_WINDOW_S)
    assert (counts.buffered, counts.published, counts.skipped) == (6, 4, 2)
    assert [item.seq for item in pump.events] == [1, 3, 4, 6]
    assert commits.at == [(1.0, 2), (1.0, 5)]  # skipped ones commit at once; published ones on confirm
    assert outlet.phase is Phase.LIVE and outlet.role == "live" and outlet.needs_pump
    await trio.sleep_until(1.0 + RESHARD_DIGEST_WINDOW_S - 0.001)
    assert commits.offer(outlet, later_twin) is Offer.SKIPPED
    assert commits.offer(outlet, event(9, 0.0)) is Offer.PUT
    await trio.sleep_until(1.0 + RESHARD_DIGEST_WINDOW_S)
    assert commits.offer(outlet, last_twin) is Offer.PUT  # the window is over: the set is dropped
    assert [item.seq for item in pump.events] == [1, 3, 4, 6, 9, 10]
    assert outlet.suppressed == 3 and outlet.published == 6


async def test_go_live_waits_for_room_and_keeps_order_with_events_arriving_meanwhile(
    autojump_clock: trio.abc.Clock,
) -> None:
    commits, pump = Commits(), FakePump(capacity=4)
    outlet = ShardOutlet(0, pump, role="shadow", commit=commits)
    for seq in range(1, 7):
        commits.offer(outlet, event(seq, 0.0))
    async with trio.open_nursery() as nursery:

        async def confirm_and_receive() -> None:
            await trio.sleep_until(20.0)  # long past the 5 s: nothing ages out once GoLive began
            commits.offer(outlet, event(7, trio.current_time()))  # still buffered: after the rest
            pump.release(4)

        nursery.start_soon(confirm_and_receive)
        counts = await outlet.go_live(frozenset(), 0.0)
    assert trio.current_time() == 20.0
    assert (counts.buffered, counts.published, counts.skipped) == (7, 7, 0)
    assert [item.seq for item in pump.events] == [1, 2, 3, 4, 5, 6, 7]
    assert commits.at == [] and outlet.aged_out == 0


async def test_cutover_go_live_freezes_every_shard_and_sets_live(autojump_clock: trio.abc.Clock) -> None:
    pump = FakePump()
    commits = {shard: Commits() for shard in (0, 1)}
    outlets = {shard: ShardOutlet(shard, pump, role="shadow", commit=commits[shard]) for shard in (0, 1)}
    cutover = Cutover(outlets, pump, role="shadow", reshard=True)
    assert not cutover.live.is_set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cutover.age_out)
        commits[0].offer(outlets[0], event(1, 0.0, shard=0))
        await trio.sleep_until(3.0)
        twin = event(1, 3.0, shard=1)
        commits[1].offer(outlets[1], twin)
        commits[1].offer(outlets[1], event(2, 3.0, shard=1))
        await trio.sleep_until(6.0)  # shard 0's event aged out at 5.0
        counts = await cutover.go_live(pack_digests([digest_of(twin)]))
        await trio.sleep_until(20.0)  # the aging tasks are gone: nothing else commits
    assert cutover.live.is_set()
    assert (counts.buffered, counts.published, counts.skipped) == (2, 1, 1)
    assert [(item.shard_id, item.seq) for item in pump.events] == [(1, 2)]
    assert commits[0].at == [(5.0, 1)] and commits[1].at == [(6.0, 1)]
    assert await cutover.go_live(b"") == type(counts)()  # a second GoLive is ignored


# -- Retire ------------------------------------------------------------------------------------------------


def test_the_digest_ring_keeps_the_last_window() -> None:
    ring = DigestRing(10.0)
    ring.add(1, 0.0)
    ring.add(2, 5.0)
    ring.add(3, 10.0)  # 1 is exactly 10 s old: gone
    assert ring.recent(10.0) == [2, 3]
    assert ring.recent(15.0) == [3] and len(ring) == 1


async def test_retire_drops_new_events_drains_and_reports_the_last_10_s(
    autojump_clock: trio.abc.Clock,
) -> None:
    pump, commits, sent = FakePump(), Commits(), []

    async def send(message: ControlMessage) -> None:
        sent.append((trio.current_time(), message))

    outlet = ShardOutlet(0, pump, commit=commits)
    cutover = Cutover({0: outlet}, pump, reshard=True, send=send)
    published = [event(seq, 0.0) for seq in range(1, 5)]
    for at, item in zip((0.0, 4.0, 9.0, 12.0), published, strict=True):
        await trio.sleep_until(at)
        assert commits.offer(outlet, item) is Offer.PUT
        cutover.on_confirmed([item])
        pump.release(1)
    late = event(5, 12.0)
    commits.offer(outlet, late)  # put, not yet accepted by the sink when Retire comes
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cutover.retire)
        await trio.sleep_until(12.5)
        assert commits.offer(outlet, event(6, 12.5)) is Offer.DROPPED
        assert sent == []  # still draining
        cutover.on_confirmed([late])
        pump.release(1)
    assert len(sent) == 1
    at, message = sent[0]
    assert at == 12.5 and isinstance(message, Retired)
    # Published in (2.5, 12.5]: not the one confirmed at 0.0, every later one, oldest first.
    assert message.digests == pack_digests(digest_of(item) for item in [*published[1:], late])
    assert [item.seq for item in pump.events] == [1, 2, 3, 4, 5]
    assert outlet.role == "retiring" and outlet.dropped == 1


async def test_retire_drains_at_most_10_s(autojump_clock: trio.abc.Clock) -> None:
    pump, sent = FakePump(), []

    async def send(message: ControlMessage) -> None:
        sent.append((trio.current_time(), message))

    outlet = ShardOutlet(0, pump, commit=Commits())
    pump.try_put(event(1, 0.0))  # the broker never accepts it
    packed = await Cutover({0: outlet}, pump, reshard=True, send=send).retire()
    assert sent == [(RETIRE_DRAIN_S, Retired(b""))] and packed == b""


async def test_a_retiring_shadow_drops_its_buffer(autojump_clock: trio.abc.Clock) -> None:
    pump, commits = FakePump(), Commits()
    outlet = ShardOutlet(0, pump, role="shadow", commit=commits)
    commits.offer(outlet, event(1, 0.0))
    await Cutover({0: outlet}, pump, role="shadow").retire()
    assert outlet.buffered == 0 and outlet.dropped == 1 and commits.at == [] and pump.events == []


async def test_a_live_worker_without_reshard_keeps_no_digests(autojump_clock: trio.abc.Clock) -> None:
    pump = FakePump()
    cutover = Cutover({0: ShardOutlet(0, pump, commit=Commits())}, pump)
    assert cutover.ring is None and cutover.live.is_set()
    cutover.on_confirmed([event(1, 0.0)])
    assert await cutover.retire() == b""


# -- guild arrivals ----------------------------------------------------------------------------------------


def test_guilds_pending_counts_unavailable_guilds_until_they_arrive_or_15_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    arrivals = GuildArrivals(3)
    ready = {"guilds": [{"id": "1", "unavailable": True}, {"id": "2", "unavailable": True}, {"id": "3"}]}
    arrivals.on_ready(ready, 100.0)
    assert arrivals.pending(100.0) == 2
    arrivals.on_guild({"id": "1", "unavailable": False})
    arrivals.on_guild({"id": "99"})
    assert arrivals.pending(110.0) == 1
    with caplog.at_level(logging.WARNING, logger="workers.reshard"):
        assert arrivals.pending(100.0 + GUILDS_ARRIVAL_TIMEOUT_S) == 0
        assert arrivals.pending(200.0) == 0
    timeouts = [record for record in caplog.records if record.getMessage() == "shard.guilds_timeout"]
    assert len(timeouts) == 1 and timeouts[0].__dict__["guilds"] == 1 and timeouts[0].__dict__["shard"] == 3
    arrivals.on_ready({"guilds": [{"id": "5", "unavailable": True}]}, 300.0)
    arrivals.on_guild({"id": "5", "unavailable": True})  # a GUILD_DELETE during an outage counts too
    assert arrivals.pending(300.0) == 0
    arrivals.on_ready(None, 400.0)
    assert arrivals.pending(400.0) == 0


# -- Uncovered ---------------------------------------------------------------------------------------------

#: Guilds on the old generation's shard 0 and 1 of 4: (guild_id >> 22) % 4.
ON_OLD_0 = (4 << 22) | 12345
ON_OLD_1 = (5 << 22) | 678


def guild_event(seq: int, at: float, guild: int | None) -> OutboundEvent:
    data = b'{"id":"%d","content":"hi"}' % seq
    if guild is not None:
        data = b'{"id":"%d","channel_id":"7","guild_id":"%d","content":"hi"}' % (seq, guild)
    return OutboundEvent(0, SESSION, seq, "MESSAGE_CREATE", data, at)


@pytest.mark.parametrize(
    ("name", "data", "guilds"),
    [
        # guild_id first, last, absent (READY, a DM), null
        ("MESSAGE_CREATE", b'{"guild_id":"81384788765712384","id":"1","content":"a"}', {81384788765712384}),
        (
            "TYPING_START",
            b'{"user_id":"2","timestamp":1,"channel_id":"3","guild_id":"41771983423143937"}',
            {41771983423143937},
        ),
        (
            "READY",
            b'{"v":10,"user":{"id":"1"},"guilds":[{"id":"5","unavailable":true}],"session_id":"s"}',
            set(),
        ),
        ("MESSAGE_CREATE", b'{"id":"1","channel_id":"2","content":"dm"}', set()),
        ("PRESENCE_UPDATE", b'{"user":{"id":"1"},"guild_id":null}', set()),
        # nested only: counted (the search cannot tell; it only makes the worker keep more)
        ("MESSAGE_CREATE", b'{"id":"1","message_reference":{"guild_id":"999","message_id":"4"}}', {999}),
        (
            "MESSAGE_CREATE",
            b'{"message_reference":{"guild_id":"999"},"id":"1","guild_id":"1000"}',
            {999, 1000},
        ),
        # a key's text inside a string value is escaped: never a match
        ("MESSAGE_CREATE", b'{"id":"1","content":"\\"guild_id\\":\\"5\\""}', set()),
        # not the compact layout: parsed for the top-level key
        ("MESSAGE_CREATE", b'{"id": "1", "guild_id": "1234"}', {1234}),
        ("MESSAGE_CREATE", b'{"id":"1","guild_id":1234}', {1234}),
        # the guild itself: its top-level id (and any nested guild_id, the same guild)
        ("GUILD_CREATE", b'{"channels":[{"id":"11"}],"id":"4242","threads":[{"guild_id":"4242"}]}', {4242}),
        ("GUILD_DELETE", b'{"id":"4343","unavailable":true}', {4343}),
        ("GUILD_UPDATE", b'{"roles":[{"id":"9"}],"id":"4444","name":"g"}', {4444}),
    ],
)
def test_the_guild_id_is_read_from_the_raw_d(name: str, data: bytes, guilds: set[int]) -> None:
    assert event_guild_ids(name, data) == guilds


async def test_uncovered_keeps_its_guilds_events_until_go_live_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    commits, pump = Commits(), FakePump()
    outlet = ShardOutlet(0, pump, role="shadow", commit=commits)
    cutover = Cutover({0: outlet}, pump, role="shadow")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cutover.age_out)
        commits.offer(outlet, guild_event(1, 0.0, ON_OLD_0))
        commits.offer(outlet, guild_event(2, 0.0, ON_OLD_1))
        commits.offer(outlet, guild_event(3, 0.0, None))  # no guild: ages out as ever
        await trio.sleep_until(1.0)
        cutover.uncover(4, (0,))  # old shard 0 of 4 closed with 4011: its guilds have no publisher
        await trio.sleep_until(2.0)
        commits.offer(outlet, guild_event(4, 2.0, ON_OLD_1))
        commits.offer(outlet, guild_event(5, 2.0, ON_OLD_0))
        await trio.sleep_until(12.0)
        commits.offer(outlet, guild_event(6, 12.0, ON_OLD_1))
        await trio.sleep_until(13.0)
        # The other guilds' events aged out at exactly 5 s; the committed seq waits at seq 1, still held.
        assert commits.at == [(5.0, 2), (5.0, 3), (7.0, 4)]
        assert commits.committed.committed == 0
        assert outlet.buffered == 3 and outlet.held == 2 and outlet.kept == 2 and outlet.aged_out == 3
        assert pump.events == []
        counts = await cutover.go_live(b"")
    assert (counts.buffered, counts.published, counts.skipped) == (3, 3, 0)
    assert [item.seq for item in pump.events] == [1, 5, 6]  # kept ones first: they arrived first
    for item in pump.events:
        commits.committed.confirmed(item.seq)
    assert commits.committed.committed == 6


async def test_a_later_uncovered_replaces_the_set_and_aged_out_events_stay_gone(
    autojump_clock: trio.abc.Clock,
) -> None:
    commits, pump = Commits(), FakePump()
    outlet = ShardOutlet(0, pump, role="shadow", commit=commits)
    cutover = Cutover({0: outlet}, pump, role="shadow")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cutover.age_out)
        commits.offer(outlet, guild_event(1, 0.0, ON_OLD_0))  # ages out at 5.0: before the Uncovered
        await trio.sleep_until(6.0)
        cutover.uncover(4, (0,))
        commits.offer(outlet, guild_event(2, 6.0, ON_OLD_0))
        commits.offer(outlet, guild_event(3, 6.0, ON_OLD_1))
        await trio.sleep_until(12.0)
        cutover.uncover(4, (1,))  # replaces: seq 2, kept already, stays kept
        commits.offer(outlet, guild_event(4, 12.0, ON_OLD_0))
        commits.offer(outlet, guild_event(5, 12.0, ON_OLD_1))
        await trio.sleep_until(18.0)
        cutover.uncover(4, ())  # clears
        commits.offer(outlet, guild_event(6, 18.0, ON_OLD_1))
        await trio.sleep_until(24.0)
        assert commits.at == [(5.0, 1), (11.0, 3), (17.0, 4), (23.0, 6)]
        assert commits.committed.committed == 1
        await cutover.go_live(b"")
    assert [item.seq for item in pump.events] == [2, 5]


async def test_uncovered_before_any_event_and_the_skip_set_applies_to_kept_events(
    autojump_clock: trio.abc.Clock,
) -> None:
    commits, pump = Commits(), FakePump()
    outlet = ShardOutlet(0, pump, role="shadow", commit=commits)
    cutover = Cutover({0: outlet}, pump, role="shadow")
    cutover.uncover(4, (0, 1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cutover.age_out)
        published_by_old = guild_event(1, 0.0, ON_OLD_0)
        commits.offer(outlet, published_by_old)
        commits.offer(outlet, guild_event(2, 0.0, ON_OLD_1))
        await trio.sleep_until(30.0)
        counts = await cutover.go_live(pack_digests([digest_of(published_by_old)]))
    assert (counts.buffered, counts.published, counts.skipped) == (2, 1, 1)
    assert [item.seq for item in pump.events] == [2]
    assert commits.at == [(30.0, 1)]


async def test_live_and_retired_workers_ignore_uncovered(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    pump = FakePump()
    live = ShardOutlet(0, pump, commit=Commits())
    with caplog.at_level(logging.DEBUG, logger="workers.reshard"):
        Cutover({0: live}, pump).uncover(4, (0,))
        shadow = ShardOutlet(1, pump, role="shadow", commit=Commits())
        retiring = Cutover({1: shadow}, pump, role="shadow")
        await retiring.retire()
        retiring.uncover(4, (0,))
    ignored = [record for record in caplog.records if record.getMessage() == "reshard.uncovered_ignored"]
    assert [record.levelno for record in ignored] == [logging.DEBUG, logging.DEBUG]
    assert live._uncovered is None and shadow._uncovered is None
    assert not shadow.uncover(4, (0,))  # the outlet itself refuses outside SHADOW too
