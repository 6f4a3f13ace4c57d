"""Earliest deadline first among ready requests, within a budget of tokens in flight."""

from hypothesis import given
from hypothesis import strategies as st

from streamer.engine.openai.schedule import Schedule


def test_the_earliest_deadline_goes_first_and_ties_keep_arrival_order() -> None:
    schedule: Schedule[str] = Schedule(budget_tokens=1000)
    schedule.add("late", deadline_s=9.0, tokens=1)
    schedule.add("soon", deadline_s=1.0, tokens=1)
    schedule.add("soon too", deadline_s=1.0, tokens=1)
    assert [schedule.take(0.0) for _ in range(4)] == ["soon", "soon too", "late", None]


def test_a_backing_off_request_waits_for_its_time_then_keeps_its_deadline() -> None:
    schedule: Schedule[str] = Schedule(budget_tokens=1000)
    schedule.add("retry", deadline_s=0.5, tokens=1, not_before_s=2.0)
    schedule.add("new", deadline_s=5.0, tokens=1)
    schedule.add("other", deadline_s=6.0, tokens=1)
    assert schedule.next_due_s() == 2.0
    assert schedule.take(1.0) == "new"
    assert schedule.take(2.0) == "retry"
    schedule.add("again", deadline_s=0.1, tokens=1, not_before_s=99.0)
    schedule.ready_all()  # the server is back
    assert schedule.take(3.0) == "again" and schedule.next_due_s() is None


def test_the_head_waits_for_budget_and_is_not_overtaken() -> None:
    schedule: Schedule[str] = Schedule(budget_tokens=100)
    schedule.add("a", deadline_s=1.0, tokens=60)
    schedule.add("big", deadline_s=2.0, tokens=60)
    schedule.add("small", deadline_s=3.0, tokens=10)
    assert schedule.take(0.0) == "a"
    assert schedule.take(0.0) is None, "small must not overtake big"
    schedule.done(60)
    assert schedule.take(0.0) == "big"


def test_a_request_larger_than_the_budget_goes_alone() -> None:
    schedule: Schedule[str] = Schedule(budget_tokens=100)
    schedule.add("huge", deadline_s=1.0, tokens=500)
    assert schedule.take(0.0) == "huge" and schedule.inflight_tokens == 500


@given(st.lists(st.tuples(st.floats(0, 100), st.integers(1, 50)), min_size=1, max_size=50))
def test_everything_goes_once_in_deadline_order_and_never_over_budget(items: list[tuple[float, int]]) -> None:
    schedule: Schedule[int] = Schedule(budget_tokens=120)
    for i, (deadline, tokens) in enumerate(items):
        schedule.add(i, deadline, tokens)
    taken: list[int] = []
    while len(schedule):
        batch = []
        while (i := schedule.take(0.0)) is not None:
            batch.append(i)
        assert schedule.inflight_tokens <= 120 or len(batch) == 1
        for i in batch:
            schedule.done(items[i][1])
        taken += batch
    assert sorted(taken) == list(range(len(items)))
    assert [items[i][0] for i in taken] == sorted(items[i][0] for i in taken)
