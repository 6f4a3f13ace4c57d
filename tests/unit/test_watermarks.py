"""Watermarks: the slowest live partition sets event-time progress; idle ones stop holding it back."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.windows.watermark import Watermarks

IDLE_MS = 1_000
P0, P1, P2 = ("events", 0), ("events", 1), ("events", 2)


def marks(lateness_ms: int = 0) -> Watermarks:
    return Watermarks(allowed_lateness_ms=lateness_ms, idle_timeout_ms=IDLE_MS)


def test_nothing_can_be_said_before_any_event() -> None:
    wm = marks()
    assert wm.current(now_ms=0) is None
    wm.assign([P0], now_ms=0)
    assert wm.current(now_ms=0) is None


def test_the_watermark_is_the_slowest_partitions_highest_event_time_minus_the_lateness() -> None:
    wm = marks(lateness_ms=50)
    wm.assign([P0, P1], now_ms=0)
    wm.observe(P0, 1_000, now_ms=10)
    wm.observe(P1, 700, now_ms=10)
    wm.observe(P0, 900, now_ms=20)  # out of order: the highest seen counts
    assert wm.current(now_ms=20) == 700 - 50


def test_a_partition_that_goes_quiet_stops_holding_the_watermark_back() -> None:
    wm = marks()
    wm.assign([P0, P1], now_ms=0)
    wm.observe(P0, 5_000, now_ms=0)
    wm.observe(P1, 100, now_ms=0)
    assert wm.current(now_ms=IDLE_MS - 1) == 100
    wm.observe(P0, 5_100, now_ms=IDLE_MS - 1)
    assert wm.current(now_ms=IDLE_MS) == 5_100, "P1 has been silent for idle_timeout_ms"
    wm.observe(P1, 200, now_ms=IDLE_MS + 1)
    assert wm.current(now_ms=IDLE_MS + 1) == 5_100, "P1 is back, but the watermark does not go backwards"


def test_a_never_seen_partition_holds_the_watermark_until_it_has_been_assigned_for_the_idle_timeout() -> None:
    wm = marks()
    wm.assign([P0, P1], now_ms=0)
    wm.observe(P0, 5_000, now_ms=500)
    assert wm.current(now_ms=500) is None, "P1 may still deliver events older than anything seen"
    assert wm.current(now_ms=IDLE_MS - 1) is None
    assert wm.current(now_ms=IDLE_MS) == 5_000


def test_a_newly_assigned_partition_holds_back_without_moving_the_watermark_backwards() -> None:
    wm = marks()
    wm.assign([P0], now_ms=0)
    wm.observe(P0, 5_000, now_ms=0)
    assert wm.current(now_ms=0) == 5_000
    wm.assign([P1], now_ms=100)
    wm.observe(P0, 9_000, now_ms=200)
    assert wm.current(now_ms=200) == 5_000, "held at what it was, not None and not 9000"
    wm.observe(P1, 7_000, now_ms=300)
    assert wm.current(now_ms=300) == 7_000


def test_assign_without_a_time_starts_the_idle_clock_at_the_next_call() -> None:
    wm = marks()
    wm.assign([P0, P1])
    wm.observe(P0, 5_000, now_ms=10_000)
    assert wm.current(now_ms=10_000) is None
    assert wm.current(now_ms=10_000 + IDLE_MS) == 10_000 + IDLE_MS, "both idle now: processing time rules"


def test_when_every_partition_is_idle_the_watermark_follows_processing_time_minus_the_lateness() -> None:
    """Review finding 11: the all-idle rule set the watermark to `now`, discarding the configured
    lateness after any quiet spell; it is `now - allowed_lateness_ms`."""
    wm = marks(lateness_ms=100)
    wm.assign([P0, P1], now_ms=0)
    wm.observe(P0, 2_000, now_ms=0)
    wm.observe(P1, 1_000, now_ms=0)
    assert wm.current(now_ms=500) == 900
    assert wm.current(now_ms=IDLE_MS) == 1_900, "all idle: the highest partition watermark, here above the clock"
    assert wm.current(now_ms=60_000) == 59_900, "windows ending in the past by the wall clock now close"
    wm.observe(P0, 3_000, now_ms=60_001)
    assert wm.current(now_ms=60_001) == 59_900


def test_while_the_consumer_is_paused_no_partition_goes_idle() -> None:
    wm = marks(lateness_ms=100)
    wm.assign([P0, P1], now_ms=0)
    wm.observe(P0, 2_000, now_ms=0)
    wm.observe(P1, 1_000, now_ms=0)
    for now_ms in range(0, 5 * IDLE_MS, IDLE_MS // 2):  # backpressure: the backlog waits in Kafka
        wm.hold(now_ms)
        assert wm.current(now_ms) == 900, "the pause must not move event time to the wall clock"
    assert not wm.idle(P1, now_ms=5 * IDLE_MS - 1)


def test_a_partition_whose_leader_is_unreachable_does_not_go_idle_while_reachable_quiet_ones_do() -> None:
    wm = marks()
    wm.assign([P0, P1], now_ms=0)
    wm.observe(P0, 2_000, now_ms=0)
    wm.observe(P1, 1_000, now_ms=0)
    for now_ms in range(0, 5 * IDLE_MS, IDLE_MS // 2):  # P1's broker is down: its silence is an outage
        wm.hold(now_ms, [P1, ("unassigned", 9)])
    assert wm.idle(P0, now_ms=5 * IDLE_MS) and not wm.idle(P1, now_ms=5 * IDLE_MS)
    assert wm.current(5 * IDLE_MS) == 1_000, "the cut-off partition still holds event time back"


def test_a_partition_whose_records_wait_in_kafka_is_not_idle_however_long_since_its_last_record() -> None:
    """A throttled consumer hands out P0's fetched backlog first; P1's records wait meanwhile (seen on a
    real broker: 57 events of a classify + window route turned late after Redis came back)."""
    wm = marks()
    wm.assign([P0, P1], now_ms=0)
    wm.observe(P0, 2_000, now_ms=0)
    wm.observe(P1, 1_000, now_ms=0)
    for now_ms in range(0, 5 * IDLE_MS, IDLE_MS // 2):
        wm.hold(now_ms, [])
        wm.waiting([P1])
        wm.observe(P0, 2_000 + now_ms, now_ms=now_ms)
    assert not wm.idle(P1, now_ms=5 * IDLE_MS - IDLE_MS // 2)
    assert wm.current(5 * IDLE_MS - IDLE_MS // 2) == 1_000, "P1's waiting backlog still holds event time back"


def test_a_process_stalled_past_the_idle_timeout_finds_its_partitions_not_idle_when_records_wait() -> None:
    wm = marks()
    wm.assign([P0], now_ms=0)
    wm.observe(P0, 1_000, now_ms=0)
    wm.hold(30_000, [])  # the first reading after a 30 s stall counts it all as idle time
    wm.waiting([P0])  # but records came in meanwhile
    assert not wm.idle(P0, now_ms=30_000)
    assert wm.current(30_000) == 1_000


def test_a_partition_kafka_has_not_served_yet_is_never_idle_and_its_clock_starts_when_served() -> None:
    wm = marks()
    wm.assign([P0], now_ms=0)
    wm.assign([P1], now_ms=0, served=False)  # e.g. waiting for a dead member's pending transaction
    wm.observe(P0, 5_000, now_ms=0)
    assert wm.unserved() == [P1]
    assert wm.current(now_ms=10 * IDLE_MS) is None, "P1 may still deliver old events, however long it waits"
    wm.serve([P1], now_ms=10 * IDLE_MS)
    assert wm.unserved() == []
    assert wm.current(now_ms=11 * IDLE_MS - 1) is None
    assert wm.current(now_ms=11 * IDLE_MS) == 11 * IDLE_MS, "served, then quiet for idle_timeout_ms"


def test_an_event_shows_a_partition_was_served() -> None:
    wm = marks()
    wm.assign([P0], now_ms=0, served=False)
    wm.observe(P0, 700, now_ms=5)
    assert wm.unserved() == [] and wm.current(now_ms=5) == 700


def test_revoked_partitions_stop_counting_and_their_stragglers_are_ignored() -> None:
    wm = marks()
    wm.assign([P0, P1], now_ms=0)
    wm.observe(P0, 5_000, now_ms=0)
    wm.observe(P1, 100, now_ms=0)
    wm.revoke([P1])
    wm.observe(P1, 50, now_ms=1)
    assert wm.current(now_ms=1) == 5_000
    wm.revoke([P0])
    assert wm.current(now_ms=10 * IDLE_MS) == 5_000, "no partitions: hold, do not follow the clock"


@pytest.mark.parametrize("lateness_ms, idle_ms", [(-1, 10), (0, 0)])
def test_settings_are_validated(lateness_ms: int, idle_ms: int) -> None:
    with pytest.raises(ValueError):
        Watermarks(lateness_ms, idle_ms)


# Each step: ("event", partition, ts, dt) | ("assign", partition, 0, dt) | ("revoke", partition, 0, dt).
steps = st.lists(
    st.tuples(
        st.sampled_from(["event", "event", "event", "assign", "revoke"]),
        st.sampled_from([P0, P1, P2]),
        st.integers(min_value=0, max_value=10_000),
        st.integers(min_value=0, max_value=700),
    ),
    max_size=80,
)


@given(steps, st.integers(min_value=0, max_value=500))
def test_the_watermark_never_goes_backwards(run: list[tuple[str, tuple[str, int], int, int]], lateness_ms: int) -> None:
    wm = marks(lateness_ms)
    now_ms, last = 0, None
    for action, partition, ts_ms, dt_ms in run:
        now_ms += dt_ms
        if action == "assign":
            wm.assign([partition], now_ms)
        elif action == "revoke":
            wm.revoke([partition])
        else:
            wm.observe(partition, ts_ms, now_ms)
        current = wm.current(now_ms)
        assert last is None or (current is not None and current >= last)
        last = current


@given(steps, st.integers(min_value=0, max_value=500))
def test_with_every_partition_live_the_watermark_is_their_minimum(
    run: list[tuple[str, tuple[str, int], int, int]], lateness_ms: int
) -> None:
    """No idling (time stands still): the watermark is exactly the running minimum over partitions."""
    wm = marks(lateness_ms)
    wm.assign([P0, P1, P2], now_ms=0)
    highest: dict[tuple[str, int], int] = {}
    for _, partition, ts_ms, _ in run:
        wm.observe(partition, ts_ms, now_ms=0)
        highest[partition] = max(ts_ms, highest.get(partition, ts_ms))
        expected = min(highest.values()) - lateness_ms if len(highest) == 3 else None
        assert wm.current(now_ms=0) == expected


# --- per partition (partitioned windows) ------------------------------------------------------------


def test_a_live_partitions_own_watermark_is_its_highest_event_time_minus_the_lateness() -> None:
    wm = marks(lateness_ms=100)
    wm.assign([P0, P1], now_ms=0)
    wm.observe(P0, 5_000, now_ms=0)
    wm.observe(P1, 1_000, now_ms=0)
    assert wm.partition_marks(now_ms=0) == {P0: 4_900, P1: 900}, "P0 does not wait for P1"


def test_an_idle_partition_follows_the_routes_watermark_and_a_new_one_starts_from_its_own_events() -> None:
    wm = marks()
    wm.assign([P0, P1], now_ms=0)
    wm.observe(P0, 5_000, now_ms=0)
    wm.observe(P1, 1_000, now_ms=0)
    for now_ms in range(100, IDLE_MS, 100):
        wm.observe(P0, 5_000 + now_ms, now_ms)
    assert wm.partition_marks(now_ms=IDLE_MS)[P1] == 5_900, "quiet P1 closes its windows with the route"
    wm.assign([P2], now_ms=IDLE_MS, served=False)
    assert wm.partition_marks(now_ms=IDLE_MS)[P2] is None
    wm.observe(P2, 200, now_ms=IDLE_MS)  # a partition taken over: its backlog is far behind
    assert wm.partition_marks(now_ms=IDLE_MS)[P2] == 200


@given(steps, st.integers(min_value=0, max_value=500))
def test_a_partitions_own_watermark_never_goes_backwards_while_it_stays_assigned(
    run: list[tuple[str, tuple[str, int], int, int]], lateness_ms: int
) -> None:
    wm = marks(lateness_ms)
    now_ms, last = 0, {}
    for action, partition, ts_ms, dt_ms in run:
        now_ms += dt_ms
        if action == "assign":
            wm.assign([partition], now_ms)
        elif action == "revoke":  # assigned again later, it starts afresh
            wm.revoke([partition])
            last.pop(partition, None)
        else:
            wm.observe(partition, ts_ms, now_ms)
        current = wm.partition_marks(now_ms)
        assert set(current) <= {P0, P1, P2}
        for part, mark in current.items():
            assert last.get(part) is None or (mark is not None and mark >= last[part])
        last = {part: mark for part, mark in current.items() if mark is not None}


def test_a_pause_stops_the_idle_clock_without_resetting_it() -> None:
    """Review finding 10: under load the consumer pauses and resumes several times a second, and every
    pause reset every partition's idle clock, so a quiet partition never went idle and its windows (or,
    with windows across keys, the whole route's) never closed. Now paused time does not count, and the
    time a quiet partition was fetched adds up across pauses."""
    wm = marks()
    wm.assign([P0, P1], now_ms=0)
    wm.observe(P0, 5_000, now_ms=0)
    wm.observe(P1, 100, now_ms=0)
    now_ms = 0
    while now_ms < 3 * IDLE_MS:  # busy P0; pauses of 100 ms every 100 ms
        wm.hold(now_ms)
        now_ms += 100
        wm.hold(now_ms, [])
        now_ms += 100
        wm.observe(P0, 5_000 + now_ms, now_ms)
    assert wm.idle(P1, now_ms), "P1 was fetched, silent, for half of 3 s"
    assert wm.current(now_ms) == 5_000 + now_ms


def test_a_partitions_watermark_moves_per_record_and_the_record_gets_the_one_before_it() -> None:
    wm = marks(lateness_ms=10)
    wm.assign([P0], now_ms=0)
    assert wm.observe(P0, 1_000, now_ms=0) is None
    assert wm.observe(P0, 400, now_ms=0) == 990, "placed under its predecessors' watermark"
    assert wm.observe(P0, 2_000, now_ms=0) == 990
    assert wm.mark(P0) == 1_990


def test_a_restored_partition_continues_from_the_watermark_its_commit_carried() -> None:
    wm = marks()
    wm.assign([P0], now_ms=0, served=False)
    wm.restore(P0, 7_000)
    assert wm.observe(P0, 6_000, now_ms=1) == 7_000, "a replayed event is judged as the first time"
    assert wm.mark(P0) == 7_000
