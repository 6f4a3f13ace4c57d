"""Micro-batcher: the pure flush rules, then the asyncio shell that applies them."""

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.batching.batcher import BatchRules, MicroBatcher, Pending, batch_size, wait_s
from streamer.engine.backend import BatcherClosed, QueueFull
from streamer.errors import StreamerError

TICK_S = 1 / 64  # dyadic time steps keep float sums exact, so oracle and rules agree at the boundary
NEVER_MS = 3_600_000.0  # a max wait the tests never reach


# --- pure rules ------------------------------------------------------------------------------------


def oracle(queue: Sequence[Pending[int]], now_s: float, rules: BatchRules, draining: bool) -> int:
    """Brute force from the spec: is a flush due, and then the longest prefix that fits (at least one)."""
    if not queue:
        return 0
    waited_s = now_s - queue[0].enqueued_s
    due = (
        draining
        or len(queue) >= rules.max_batch
        or sum(p.tokens for p in queue) >= rules.max_batch_tokens
        or waited_s >= rules.max_wait_ms / 1000
    )
    if not due:
        return 0
    fits = [
        k
        for k in range(1, min(len(queue), rules.max_batch) + 1)
        if sum(p.tokens for p in queue[:k]) <= rules.max_batch_tokens
    ]
    return max(fits, default=1)


rules_st = st.builds(
    lambda max_batch, tokens, wait_ticks, extra: BatchRules(
        max_batch=max_batch,
        max_batch_tokens=tokens,
        max_wait_ms=wait_ticks * TICK_S * 1000,
        max_queue=max_batch + extra,
    ),
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=1, max_value=300),
    st.integers(min_value=0, max_value=20),
    st.integers(min_value=0, max_value=8),
)


@st.composite
def queues(draw: st.DrawFn) -> tuple[list[Pending[int]], float]:
    """A queue in arrival order (non-decreasing timestamps) and a `now` at or after the last arrival."""
    arrivals = draw(st.lists(st.integers(min_value=0, max_value=5), max_size=20))
    tokens = draw(st.lists(st.integers(min_value=0, max_value=200), min_size=len(arrivals)))
    tick, queue = 0, []
    for i, (gap, size) in enumerate(zip(arrivals, tokens, strict=False)):
        tick += gap
        queue.append(Pending(item=i, tokens=size, enqueued_s=tick * TICK_S))
    now_s = (tick + draw(st.integers(min_value=0, max_value=30))) * TICK_S
    return queue, now_s


@given(queues(), rules_st, st.booleans())
def test_batch_size_matches_the_brute_force_oracle(
    run: tuple[list[Pending[int]], float], rules: BatchRules, draining: bool
) -> None:
    queue, now_s = run
    assert batch_size(queue, now_s, rules, draining=draining) == oracle(queue, now_s, rules, draining)


@given(queues(), rules_st)
def test_a_batch_respects_max_batch_and_the_token_budget_unless_one_request_alone_exceeds_it(
    run: tuple[list[Pending[int]], float], rules: BatchRules
) -> None:
    queue, now_s = run
    size = batch_size(queue, now_s, rules, draining=True)
    assert (size == 0) == (not queue)
    assert size <= rules.max_batch
    if size > 1:
        assert sum(p.tokens for p in queue[:size]) <= rules.max_batch_tokens


@given(queues(), rules_st)
def test_after_waiting_wait_s_a_flush_is_due(
    run: tuple[list[Pending[int]], float], rules: BatchRules
) -> None:
    queue, now_s = run
    delay_s = wait_s(queue, now_s, rules)
    if not queue:
        assert delay_s is None
        return
    assert delay_s is not None and delay_s >= 0
    assert batch_size(queue, now_s + delay_s, rules) > 0


def test_a_lone_request_over_the_token_budget_still_flushes_alone() -> None:
    rules = BatchRules(max_batch=4, max_batch_tokens=100, max_wait_ms=NEVER_MS)
    queue = [Pending(0, 500, 0.0), Pending(1, 10, 0.0)]
    assert batch_size(queue, 0.0, rules) == 1


def test_waiting_requests_below_every_limit_do_not_flush() -> None:
    rules = BatchRules(max_batch=4, max_batch_tokens=100, max_wait_ms=20)
    queue = [Pending(0, 10, 0.0), Pending(1, 10, 0.005)]
    assert batch_size(queue, 0.019, rules) == 0
    assert wait_s(queue, 0.019, rules) == pytest.approx(0.001)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch": 8, "max_queue": 4},
        {"max_batch": 0},
        {"max_batch_tokens": 0},
        {"max_wait_ms": -1},
    ],
)
def test_invalid_rules_are_rejected_with_a_clear_message(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be >="):
        BatchRules(**kwargs)  # type: ignore[arg-type]


# --- asyncio shell ---------------------------------------------------------------------------------


class FakeModel:
    """A run_batch that records batches, can be held at a gate, and tracks concurrency."""

    def __init__(self, *, fail: Exception | None = None, results_for: int | None = None) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.active = 0
        self.max_active = 0
        self.fail = fail
        self.results_for = results_for

    async def __call__(self, requests: list[str]) -> list[str]:
        self.batches.append(list(requests))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.gate.wait()
            if self.fail is not None:
                raise self.fail
            count = len(requests) if self.results_for is None else self.results_for
            return [f"{r}!" for r in requests[:count]]
        finally:
            self.active -= 1


def frozen_clock() -> float:
    """Time stands still, so only size, tokens or draining can trigger a flush."""
    return 0.0


@asynccontextmanager
async def running(batcher: MicroBatcher[str, str]) -> AsyncIterator[MicroBatcher[str, str]]:
    await batcher.start()
    try:
        yield batcher
    finally:
        await asyncio.wait_for(batcher.aclose(), 1)


async def settle() -> None:
    """Let the flush task run whatever it can do without time passing."""
    for _ in range(5):
        await asyncio.sleep(0)


def make(model: FakeModel, **rules: float) -> MicroBatcher[str, str]:
    base = {"max_batch": 4, "max_batch_tokens": 1000, "max_wait_ms": NEVER_MS, "max_queue": 8}
    return MicroBatcher(BatchRules(**{**base, **rules}), model, clock=frozen_clock)  # type: ignore[arg-type]


async def test_a_batch_flushes_as_soon_as_max_batch_requests_are_queued() -> None:
    model = FakeModel()
    async with running(make(model)) as batcher:
        futures = [batcher.put(f"r{i}", 1) for i in range(3)]
        await settle()
        assert model.batches == []
        futures.append(batcher.put("r3", 1))
        assert await asyncio.wait_for(asyncio.gather(*futures), 1) == ["r0!", "r1!", "r2!", "r3!"]
        assert model.batches == [["r0", "r1", "r2", "r3"]]


async def test_a_batch_flushes_when_queued_tokens_reach_the_budget_taking_only_what_fits() -> None:
    model = FakeModel()
    async with running(make(model, max_batch_tokens=100)) as batcher:
        first = batcher.put("a", 60)
        await settle()
        assert model.batches == []
        second = batcher.put("b", 50)
        assert await asyncio.wait_for(first, 1) == "a!"
        assert model.batches == [["a"]]
        assert not second.done() and batcher.depth == 1


async def test_a_lone_request_flushes_after_max_wait_ms() -> None:
    model = FakeModel()
    rules = BatchRules(max_batch=4, max_batch_tokens=1000, max_wait_ms=50, max_queue=8)
    async with running(MicroBatcher(rules, model)) as batcher:
        start_s = time.monotonic()
        future = batcher.put("solo", 1)
        await asyncio.sleep(0.01)
        assert not future.done()
        assert await asyncio.wait_for(future, 1) == "solo!"
        assert time.monotonic() - start_s >= 0.05


async def test_only_one_batch_runs_at_a_time_and_requests_queue_behind_it() -> None:
    model = FakeModel()
    model.gate.clear()
    async with running(make(model, max_batch=2)) as batcher:
        futures = [batcher.put(f"r{i}", 1) for i in range(6)]
        await settle()
        assert (batcher.running, batcher.depth) == (2, 4)
        model.gate.set()
        await asyncio.wait_for(asyncio.gather(*futures), 1)
    assert model.max_active == 1
    assert [len(b) for b in model.batches] == [2, 2, 2]


async def test_put_raises_queue_full_at_capacity_and_room_returns_after_a_batch() -> None:
    model = FakeModel()
    model.gate.clear()
    async with running(make(model, max_batch=2, max_queue=3)) as batcher:
        futures = [batcher.put(f"r{i}", 1) for i in range(3)]
        await settle()
        assert batcher.free_slots() == 0
        with pytest.raises(QueueFull):
            batcher.put("overflow", 1)
        room = asyncio.create_task(batcher.wait_for_room())
        await settle()
        assert not room.done()
        model.gate.set()
        await asyncio.wait_for(room, 1)
        assert batcher.free_slots() >= 2
        futures.append(batcher.put("accepted", 1))
        await asyncio.wait_for(batcher.aclose(), 1)
        assert all(f.done() for f in futures)


async def test_wait_for_room_returns_at_once_when_there_is_room() -> None:
    batcher = make(FakeModel())
    await asyncio.wait_for(batcher.wait_for_room(), 1)


def test_queue_full_is_a_streamer_error() -> None:
    assert issubclass(QueueFull, StreamerError)
    assert issubclass(BatcherClosed, StreamerError)


async def test_aclose_flushes_everything_queued_without_waiting_for_deadlines() -> None:
    model = FakeModel()
    batcher = make(model, max_batch=2)
    await batcher.start()
    futures = [batcher.put(f"r{i}", 1) for i in range(5)]
    await asyncio.wait_for(batcher.aclose(), 1)
    assert [f.result() for f in futures] == ["r0!", "r1!", "r2!", "r3!", "r4!"]
    assert sum(len(b) for b in model.batches) == 5


async def test_aclose_drains_even_if_the_batcher_was_never_started() -> None:
    batcher = make(FakeModel())
    future = batcher.put("early", 1)
    await asyncio.wait_for(batcher.aclose(), 1)
    assert future.result() == "early!"


async def test_a_closed_batcher_refuses_new_requests() -> None:
    batcher = make(FakeModel())
    await batcher.aclose()
    with pytest.raises(BatcherClosed):
        batcher.put("late", 1)
    with pytest.raises(BatcherClosed):
        await batcher.start()


async def test_a_failing_run_batch_fails_every_future_of_that_batch_and_the_batcher_carries_on() -> None:
    model = FakeModel(fail=RuntimeError("boom"))
    async with running(make(model, max_batch=2)) as batcher:
        futures = [batcher.put(f"r{i}", 1) for i in range(2)]
        for future in futures:
            with pytest.raises(RuntimeError, match="boom"):
                await asyncio.wait_for(future, 1)
        model.fail = None
        assert await asyncio.wait_for(asyncio.gather(*[batcher.put(f"s{i}", 1) for i in range(2)]), 1)
        assert batcher.stats.failed_batches == 1


async def test_results_not_aligned_with_the_requests_fail_the_whole_batch() -> None:
    model = FakeModel(results_for=1)
    async with running(make(model, max_batch=2)) as batcher:
        futures = [batcher.put(f"r{i}", 1) for i in range(2)]
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 1)
    assert all(isinstance(r, ValueError) for r in results)


async def test_cancelled_requests_are_skipped_when_a_batch_is_formed() -> None:
    model = FakeModel()
    async with running(make(model, max_batch=3)) as batcher:
        a, b = batcher.put("a", 1), batcher.put("b", 1)
        b.cancel()
        c, d = batcher.put("c", 1), batcher.put("d", 1)
        await asyncio.wait_for(asyncio.gather(a, c, d), 1)
    assert model.batches == [["a", "c", "d"]]


async def test_a_cancelled_request_frees_its_slot_even_while_a_batch_runs() -> None:
    model = FakeModel()
    model.gate.clear()
    async with running(make(model, max_batch=2, max_queue=3)) as batcher:
        running_batch = [batcher.put(name, 1) for name in ("a", "b")]
        doomed = batcher.put("doomed", 1)
        await settle()
        assert batcher.free_slots() == 0
        doomed.cancel()
        await asyncio.wait_for(batcher.wait_for_room(), 1)
        assert (batcher.free_slots(), batcher.depth) == (1, 0)
        model.gate.set()
        assert await asyncio.wait_for(asyncio.gather(*running_batch), 1) == ["a!", "b!"]


async def test_a_request_cancelled_while_its_batch_runs_stays_cancelled_and_others_get_results() -> None:
    model = FakeModel()
    model.gate.clear()
    async with running(make(model, max_batch=2)) as batcher:
        keep, drop = batcher.put("keep", 1), batcher.put("drop", 1)
        await settle()
        drop.cancel()
        model.gate.set()
        assert await asyncio.wait_for(keep, 1) == "keep!"
    assert drop.cancelled()


async def test_stats_count_batches_items_and_the_last_batch_size() -> None:
    model = FakeModel()
    batcher = make(model, max_batch=2)
    for i in range(3):
        batcher.put(f"r{i}", 1)
    await asyncio.wait_for(batcher.aclose(), 1)
    assert (batcher.stats.batches, batcher.stats.items, batcher.stats.last_batch_size) == (2, 3, 1)
