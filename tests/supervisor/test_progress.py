"""`supervisor.progress`: which ready-shard counts of a start get a line; the identify bound's estimate."""

from __future__ import annotations

from supervisor.progress import PROGRESS_EVERY_S, StartProgress, identify_eta_s


def test_identify_eta_is_rounds_of_max_concurrency_times_5_s() -> None:
    assert identify_eta_s(0, 16) == 0.0
    assert identify_eta_s(1, 16) == 5.0
    assert identify_eta_s(16, 16) == 5.0
    assert identify_eta_s(17, 16) == 10.0
    assert identify_eta_s(100, 1) == 500.0


def test_a_line_on_each_tenth_else_at_most_every_few_seconds_and_one_final_line() -> None:
    progress = StartProgress(total=100, max_concurrency=1)
    lines = []
    # One shard ready every second (as with max_concurrency 1 at the real rate, but faster).
    for second in range(1, 101):
        line = progress.observe(second, float(second))
        if line is not None:
            lines.append((second, line.ready, line.eta_s, line.done))
    # The first ready shard, each tenth, and PROGRESS_EVERY_S after the last line in between.
    assert [ready for _, ready, _, _ in lines] == [1, 6, *sorted({*range(10, 101, 10), *range(15, 100, 10)})]
    assert PROGRESS_EVERY_S == 5.0
    assert lines[0] == (1, 1, 495.0, False)
    assert lines[-1] == (100, 100, 0.0, True)
    assert progress.done and progress.observe(99, 200.0) is None


def test_no_line_before_any_shard_is_ready_nor_when_nothing_changed() -> None:
    progress = StartProgress(total=4, max_concurrency=2)
    assert progress.observe(0, 0.0) is None
    assert progress.observe(0, 60.0) is None
    line = progress.observe(1, 61.0)
    assert line is not None and (line.ready, line.eta_s) == (1, 10.0)
    assert progress.observe(1, 100.0) is None
    final = progress.observe(4, 100.5)
    assert final is not None and final.done
