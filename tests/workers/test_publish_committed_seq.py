"""CommittedSeq against a brute-force model, over every confirm order of small histories."""

from __future__ import annotations

import itertools

import pytest

from workers.publish import CommittedSeq, OutboundEvent, commit_to


def model_committed(start: int, received: list[tuple[int, bool]], confirmed: set[int]) -> int:
    """The definition, literally: the highest received seq S (or start) with every published seq <= S
    confirmed."""
    best = start
    for seq, publish in received:
        if publish and seq not in confirmed:
            break
        best = seq
    return best


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_every_filter_mask_and_confirm_order_matches_the_model(n: int) -> None:
    cases = 0
    for mask in itertools.product([True, False], repeat=n):
        for gaps in ((), (2,)):  # with and without a seq that never arrived
            seqs = [s for s in range(10, 10 + n + len(gaps)) if s - 10 + 1 not in gaps][:n]
            received = list(zip(seqs, mask, strict=True))
            published = [seq for seq, publish in received if publish]
            for order in itertools.permutations(published):
                tracker = CommittedSeq("s", start_seq=9)
                for seq, publish in received:
                    tracker.received(seq, publish)
                confirmed: set[int] = set()
                assert tracker.committed == model_committed(9, received, confirmed)
                for seq in order:
                    tracker.confirmed(seq)
                    confirmed.add(seq)
                    assert tracker.committed == model_committed(9, received, confirmed)
                    assert tracker.pending == len(published) - len(confirmed)
                assert tracker.committed == seqs[-1]
                cases += 1
    assert cases > 0


def test_interleaved_receive_and_confirm() -> None:
    tracker = CommittedSeq("s")
    assert (tracker.committed, tracker.last_received) == (0, 0)
    tracker.received(1, publish=True)
    tracker.received(2, publish=False)  # filtered: waits behind 1
    assert tracker.committed == 0
    tracker.confirmed(1)
    assert tracker.committed == 2
    tracker.received(3, publish=False)  # nothing pending: committed at once
    assert tracker.committed == 3
    tracker.received(4, publish=True)
    tracker.received(6, publish=True)  # 5 never came
    tracker.confirmed(6)
    assert tracker.committed == 3
    tracker.confirmed(4)
    assert (tracker.committed, tracker.pending, tracker.last_received) == (6, 0, 6)


def test_duplicates_and_unknown_seqs() -> None:
    tracker = CommittedSeq("s", start_seq=100)
    tracker.received(101, publish=True)
    tracker.confirmed(101)
    tracker.confirmed(101)  # a batch retried after a lost confirm: ignored
    tracker.confirmed(50)  # older than the session's start: ignored
    assert tracker.committed == 101
    with pytest.raises(ValueError, match="never received"):
        tracker.confirmed(102)
    with pytest.raises(ValueError, match="must increase"):
        tracker.received(101, publish=True)  # a replay after RESUME: the caller checks last_received
    with pytest.raises(ValueError, match="must increase"):
        tracker.received(100, publish=False)


def test_commit_to_routes_by_shard_and_ignores_other_sessions() -> None:
    trackers = {0: CommittedSeq("a"), 1: CommittedSeq("b")}
    for tracker in trackers.values():
        tracker.received(1, publish=True)
        tracker.received(2, publish=True)
    on_confirmed = commit_to(trackers)
    on_confirmed(
        [
            OutboundEvent(0, "a", 1, "X", b"{}"),
            OutboundEvent(1, "old-session", 1, "X", b"{}"),
            OutboundEvent(1, "b", 2, "X", b"{}"),
            OutboundEvent(7, "a", 1, "X", b"{}"),  # a shard this worker does not run
        ]
    )
    assert (trackers[0].committed, trackers[1].committed) == (1, 0)
    trackers[1] = CommittedSeq("c", start_seq=5)  # a new session replaces the tracker
    on_confirmed([OutboundEvent(1, "b", 1, "X", b"{}")])
    assert trackers[1].committed == 5
