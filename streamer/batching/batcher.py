"""Async micro-batcher: requests for one model queue up and run together, one batch at a time.

A GPU forward pass costs about the same for one request as for sixteen, so requests that arrive
while a batch runs wait and go out together in the next one. Batching comes from that queueing,
bounded by a latency budget (`max_wait_ms`) so a lone request is not held back for long.

The flush decision is pure (`batch_size`, `wait_s`: time passed in, no I/O) so it can be tested
exhaustively; `MicroBatcher` is the thin asyncio shell that applies it.

Backpressure: the queue is bounded (`max_queue`, queued + running); `put` raises `QueueFull` past
it instead of growing memory. Callers stay within it rather than retry: the consume loop polls at
most `free_slots()` messages and pauses its partitions while there are none, and a backend's
`generate` awaits `wait_for_room()` before it submits.
"""

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from streamer.engine.backend import BatcherClosed, QueueFull

T = TypeVar("T")
Req = TypeVar("Req")
Res = TypeVar("Res")


@dataclass(frozen=True)
class BatchRules:
    """Limits of one model's batcher; `max_queue` counts queued plus running requests."""

    max_batch: int = 16
    max_batch_tokens: int = 8192
    max_wait_ms: float = 20.0
    max_queue: int = 64

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue < self.max_batch:
            raise ValueError(
                f"max_queue ({self.max_queue}) must be >= max_batch ({self.max_batch}), "
                "otherwise a full batch could never form"
            )


@dataclass(frozen=True)
class Pending(Generic[T]):
    """One queued request with its prompt size and when it arrived (monotonic seconds)."""

    item: T
    tokens: int
    enqueued_s: float


def _deadline_s(oldest: Pending[Any], rules: BatchRules) -> float:
    """When the oldest request has waited long enough; one formula for both flushing and sleeping."""
    return oldest.enqueued_s + rules.max_wait_ms / 1000.0


def _take(queue: Sequence[Pending[Any]], rules: BatchRules) -> int:
    """Leading requests that fit max_batch and max_batch_tokens; at least one, even if oversized."""
    count, tokens = 0, 0
    for pending in queue:
        if count == rules.max_batch or (count and tokens + pending.tokens > rules.max_batch_tokens):
            break
        count += 1
        tokens += pending.tokens
    return count


def _tokens_reach_budget(queue: Sequence[Pending[Any]], rules: BatchRules) -> bool:
    """Whether the queued prompts together fill a batch's token budget (stops summing early)."""
    total = 0
    for pending in queue:
        total += pending.tokens
        if total >= rules.max_batch_tokens:
            return True
    return False


def batch_size(
    queue: Sequence[Pending[Any]], now_s: float, rules: BatchRules, *, draining: bool = False
) -> int:
    """How many leading requests to flush now; 0 means wait.

    Flush when a full batch is queued (by count or by tokens), when the oldest request has waited
    max_wait_ms, or when draining at shutdown, where waiting longer only adds latency.
    """
    if not queue:
        return 0
    due = (
        draining
        or len(queue) >= rules.max_batch
        or now_s >= _deadline_s(queue[0], rules)
        or _tokens_reach_budget(queue, rules)
    )
    return _take(queue, rules) if due else 0


def wait_s(queue: Sequence[Pending[Any]], now_s: float, rules: BatchRules) -> float | None:
    """Seconds until the oldest request times out (0 if it already has); None for an empty queue."""
    if not queue:
        return None
    return max(0.0, _deadline_s(queue[0], rules) - now_s)


@dataclass
class BatchStats:
    """Counters for metrics; plain numbers so any exporter can read them."""

    batches: int = 0
    items: int = 0
    failed_batches: int = 0
    last_batch_size: int = 0


@dataclass(frozen=True)
class _Job(Generic[Req, Res]):
    request: Req
    future: asyncio.Future[Res]


class MicroBatcher(Generic[Req, Res]):
    """Queues requests for one model worker and runs them through `run_batch`, one batch at a time.

    `run_batch` returns results aligned with its input. If it raises, every future of that batch
    gets the exception; per-item failures belong inside `Res`. Futures cancelled by their caller
    are dropped when the next batch is formed.
    """

    def __init__(
        self,
        rules: BatchRules,
        run_batch: Callable[[list[Req]], Awaitable[Sequence[Res]]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = rules
        self.stats = BatchStats()
        self._run_batch = run_batch
        self._clock = clock
        self._queue: deque[Pending[_Job[Req, Res]]] = deque()
        self._running = 0
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._room = asyncio.Event()

    @property
    def depth(self) -> int:
        """Requests queued and not yet running."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests in the batch running now (0 or up to max_batch)."""
        return self._running

    def free_slots(self) -> int:
        """How many more requests `put` accepts right now."""
        return self.rules.max_queue - len(self._queue) - self._running

    def put(self, item: Req, tokens: int) -> asyncio.Future[Res]:
        """Queue one request (call from the event loop); the future resolves with its result.

        Raises QueueFull when queued + running reach max_queue, BatcherClosed once aclose began.
        """
        if self._closing:
            raise BatcherClosed("batcher is closing; no new requests")
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if self.free_slots() <= 0:
            raise QueueFull(f"batcher full: {self.depth} queued + {self._running} running")
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        future.add_done_callback(self._on_future_done)
        self._queue.append(Pending(_Job(item, future), tokens, self._clock()))
        self._wake.set()
        return future

    async def wait_for_room(self) -> None:
        """Return once `put` would accept a request; the consumer awaits this before resuming."""
        while self.free_slots() <= 0:
            self._room.clear()
            await self._room.wait()

    async def start(self) -> None:
        """Start the background flush task (idempotent)."""
        if self._closing:
            raise BatcherClosed("batcher was closed; create a new one")
        self._ensure_task()

    async def aclose(self) -> None:
        """Stop taking requests, flush everything queued without waiting for deadlines, then stop."""
        self._closing = True
        self._wake.set()
        await self._ensure_task()

    def _ensure_task(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_loop(), name="micro-batcher")
        return self._task

    def _on_future_done(self, future: asyncio.Future[Res]) -> None:
        """A caller cancelled: free its slot now, even while a batch runs, so intake can resume."""
        if future.cancelled():
            self._drop_cancelled()

    async def _flush_loop(self) -> None:
        """Sleep until a deadline or a wake-up, flush what the rules say, repeat; exits once drained."""
        try:
            while True:
                self._wake.clear()
                self._drop_cancelled()
                now_s = self._clock()
                count = batch_size(self._queue, now_s, self.rules, draining=self._closing)
                if count:
                    await self._run([self._queue.popleft().item for _ in range(count)])
                elif self._closing:
                    return
                else:
                    await self._sleep(wait_s(self._queue, now_s, self.rules))
        finally:
            self._cancel_queued()

    async def _sleep(self, timeout_s: float | None) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _run(self, jobs: list[_Job[Req, Res]]) -> None:
        """Run one batch and settle its futures; the only place user code runs."""
        self._running = len(jobs)
        try:
            results = await self._run_batch([job.request for job in jobs])
            if len(results) != len(jobs):
                raise ValueError(f"run_batch returned {len(results)} results for {len(jobs)} requests")
        except Exception as exc:
            self.stats.failed_batches += 1
            _fail(jobs, exc)
        except BaseException:
            _cancel(jobs)
            raise
        else:
            for job, result in zip(jobs, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)
        finally:
            self._running = 0
            self.stats.batches += 1
            self.stats.items += len(jobs)
            self.stats.last_batch_size = len(jobs)
            self._room.set()

    def _drop_cancelled(self) -> None:
        """Remove queued requests whose caller gave up; a scan of at most max_queue entries."""
        if any(pending.item.future.cancelled() for pending in self._queue):
            self._queue = deque(p for p in self._queue if not p.item.future.cancelled())
            self._room.set()

    def _cancel_queued(self) -> None:
        """On a hard stop (task cancelled), no queued caller may wait forever."""
        _cancel([pending.item for pending in self._queue])
        self._queue.clear()
        self._room.set()


def _fail(jobs: list[_Job[Any, Any]], exc: BaseException) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)


def _cancel(jobs: list[_Job[Any, Any]]) -> None:
    for job in jobs:
        job.future.cancel()
