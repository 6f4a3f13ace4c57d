"""The adaptive concurrency limit: additive increase, multiplicative decrease, once per epoch."""

from hypothesis import given
from hypothesis import strategies as st

from streamer.engine.openai.limiter import ConcurrencyLimit


def test_it_starts_at_the_ceiling_and_a_cut_halves_it() -> None:
    limit = ConcurrencyLimit(floor=1, ceiling=8, tolerance=3.0)
    assert limit.limit == 8
    limit.congested(limit.epoch)
    assert limit.limit == 4


def test_requests_in_flight_together_cut_it_once() -> None:
    limit = ConcurrencyLimit(floor=1, ceiling=8, tolerance=3.0)
    sent_in = limit.epoch
    for _ in range(5):  # five 429s to requests sent before the first cut
        limit.congested(sent_in)
    assert limit.limit == 4
    limit.congested(limit.epoch)  # one sent after it
    assert limit.limit == 2


def test_successes_raise_it_by_about_one_per_round_of_limit_requests() -> None:
    limit = ConcurrencyLimit(floor=1, ceiling=8, tolerance=3.0)
    limit.congested(limit.epoch)
    limit.congested(limit.epoch)
    assert limit.limit == 2
    for _ in range(3):  # 2 + 1/2 + 1/2.5 + 1/2.9
        limit.succeeded(limit.epoch, 0.1)
    assert limit.limit == 3
    for _ in range(100):
        limit.succeeded(limit.epoch, 0.1)
    assert limit.limit == 8


def test_a_first_token_much_slower_than_the_baseline_cuts_it() -> None:
    limit = ConcurrencyLimit(floor=1, ceiling=8, tolerance=3.0)
    limit.succeeded(limit.epoch, 0.1)
    limit.succeeded(limit.epoch, 0.25)  # slower, within tolerance
    assert limit.limit == 8
    limit.succeeded(limit.epoch, 0.5)
    assert limit.limit == 4
    assert limit.baseline_s is not None and 0.1 <= limit.baseline_s < 0.2  # one slow answer barely moves it


@given(st.lists(st.tuples(st.booleans(), st.floats(0.001, 10.0)), max_size=200), st.integers(1, 4),
       st.integers(0, 60))
def test_it_stays_between_floor_and_ceiling(events: list[tuple[bool, float]], floor: int, extra: int) -> None:
    limit = ConcurrencyLimit(floor=floor, ceiling=floor + extra, tolerance=2.0)
    for ok, latency in events:
        if ok:
            limit.succeeded(limit.epoch, latency)
        else:
            limit.congested(limit.epoch)
        assert floor <= limit.limit <= floor + extra
