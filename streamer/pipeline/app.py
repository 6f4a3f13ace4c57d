"""Wires the stages of one streamer process and runs them until asked to stop.

  Source ─▶ EventHandler ─bad/late─▶ Writer (dead-letter / late topic)
              ├─▶ answer kept in Redis? (one look-up per poll) ─yes─▶ Writer (output topic + Redis)
              ├─▶ model pool (continuous engine or static batches) ─▶ Writer (output topic + Redis)
              ├─▶ chat: behind its conversation's turn (per key) ─▶ history in Redis ─▶ model pool ─▶
              │     history appended ─▶ Writer
              └─▶ WindowStage (per route) ─window closes─▶ model pool? ─▶ Writer (window topic + Redis)
  Writer ─"fully written"─▶ OffsetTracker ─▶ commit (the source; a transaction, exactly once)
  model pool ─pieces of stream: true answers─▶ PartialWriter (Redis partial streams, partial topic;
              best effort, beside the answer, holding no offset); a kept answer reused on a stream: true
              route goes there too, its whole text as one final delta

The stages talk to the world only through `Edges` (the source, the sink, Redis, the model pool and
the clock), so the simulation in tests/sim runs this very wiring on in-memory stand-ins; `connect`
builds the real ones.

Shutdown order (after SIGTERM/SIGINT, within `shutdown_timeout_s`):
  1. stop fetching; 2. emit the windows already closed; 3. finish every look-up of a kept answer and
  every queued request, then flush the streaming answers' last pieces and final markers (best effort);
  4. write every outcome to Kafka and Redis; 5. commit the offsets now fully written;
  6. flush the producer and close the clients. Open windows are not emitted: their offsets are
  not committed, so the next owner of the partition rebuilds them from Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from streamer.clock import Clock, SystemClock
from streamer.config import Settings
from streamer.engine.backend import Backend
from streamer.kafka.admin import ensure_topics
from streamer.kafka.client_config import consumer_config, producer_config
from streamer.kafka.offsets import TP, OffsetTracker
from streamer.kafka.sink import KafkaSink
from streamer.kafka.source import KafkaSource, Listener, Source
from streamer.kafka.transactions import CONSUMER_OVERRIDES, TransactionalProducer, producer_overrides
from streamer.observe.liveness import Liveness, Seen
from streamer.observe.metrics import Metrics
from streamer.outcomes import Sealer
from streamer.pipeline.events import EventHandler
from streamer.pipeline.parse import RawMessage
from streamer.pipeline.partials import PartialWriter
from streamer.pipeline.reuse import Reuse
from streamer.pipeline.sinks.kafka import KafkaRecords, KafkaTransaction
from streamer.pipeline.sinks.redis import RedisOutcomes
from streamer.pipeline.window_stage import WindowStage
from streamer.pipeline.writer import CYCLE_BUDGET_S, TransactionalWriter, Writer
from streamer.state.redis import RedisState
from streamer.tasks.event import TASKS

log = logging.getLogger(__name__)

_IDLE_SLEEP_S = 0.005
_TICK_S = 0.02
_MAX_POLL = 500


async def _nothing() -> None:
    return None


@dataclass
class Edges:
    """What a pipeline reads and writes through; everything between them is in memory."""

    pool: Backend
    state: RedisState
    sink: KafkaSink | TransactionalProducer
    open_source: Callable[[Listener], Source]  # subscribes to the routes' inputs
    prepare: Callable[[], Awaitable[None]] = _nothing  # before consuming, e.g. create the output topics
    clock: Clock = field(default_factory=SystemClock)


def connect(settings: Settings, bootstrap: str, redis_url: str, backend: Backend, *, create_topics: bool = True,
            metrics: Metrics | None = None) -> Pipeline:
    """A pipeline on the real edges: Kafka at `bootstrap`, Redis at `redis_url`, the model behind `backend`
    (whose `on_batch` should be `metrics.batch_done`, see `load_backend`)."""
    metrics = metrics or Metrics()
    info = backend.info
    metrics.model_memory(info.resident_bytes)
    metrics.model_loaded(info.model, info.manifest)
    exactly_once = settings.processing.guarantee == "exactly_once"
    sink: KafkaSink | TransactionalProducer
    if exactly_once:
        sink = TransactionalProducer({**producer_config(settings.kafka, bootstrap),
                                      **producer_overrides(settings.processing, settings.kafka.group_id)})
    else:
        sink = KafkaSink(producer_config(settings.kafka, bootstrap))
    consumer = consumer_config(settings.kafka, bootstrap)
    if exactly_once:
        consumer |= CONSUMER_OVERRIDES
    inputs = [r.input for r in settings.routes]

    async def prepare() -> None:
        if create_topics:
            await asyncio.to_thread(ensure_topics, settings.kafka, bootstrap, _topics_out(settings))

    return Pipeline(settings, Edges(
        pool=backend,
        state=RedisState(settings.redis, redis_url, kafka_decides_windows=exactly_once),
        sink=sink,
        open_source=lambda listener: KafkaSource(consumer, inputs, listener),
        prepare=prepare,
    ), metrics)


def record_limit(settings: Settings) -> int:
    """The largest record the producer takes: limits.max_record_bytes, or the client's own lower
    message.max.bytes."""
    limit = settings.limits.max_record_bytes
    client = settings.kafka.client.get("message.max.bytes")
    return min(limit, int(client)) if client is not None else limit


def cycle_budget(settings: Settings) -> float:
    """How long an exactly-once write cycle may keep the consumer unpolled: well within its
    max.poll.interval.ms, or the member would leave its group."""
    max_poll_s = int(settings.kafka.client.get("max.poll.interval.ms", 300_000)) / 1000
    return min(CYCLE_BUDGET_S, max_poll_s / 3)


def _topics_out(settings: Settings) -> list[str]:
    topics = {settings.kafka.dead_letter_topic}
    for route in settings.routes:
        window = route.window
        topics |= {t for t in (route.output, route.partial_output, window and window.output,
                               window and window.late_topic) if t}
    return sorted(topics)


class Pipeline(Listener):
    def __init__(self, settings: Settings, edges: Edges, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._edges = edges
        self.metrics = metrics or Metrics()
        self._clock = edges.clock
        self._tracker = OffsetTracker()
        self._pool = edges.pool
        self._state = edges.state
        self._exactly_once = settings.processing.guarantee == "exactly_once"
        sealer = Sealer(record_limit(settings), settings.kafka.dead_letter_topic)
        # The sinks in their order (streamer/pipeline/sinks): at least once, Kafka acknowledges, then Redis;
        # exactly once, Redis fenced, then one Kafka transaction. `edges.sink` is the producer of the
        # guarantee (connect and the simulation pair them), hence the ignores.
        self._writer: Writer | TransactionalWriter
        if self._exactly_once:
            self._writer = TransactionalWriter(
                [RedisOutcomes(self._state)], KafkaTransaction(edges.sink, sealer),  # type: ignore[arg-type]
                self._tracker, settings.kafka.commit_interval_ms / 1000, self._group_metadata,
                on_window=self.metrics.window_emitted, budget_s=cycle_budget(settings))
        else:
            records = KafkaRecords(edges.sink, sealer)  # type: ignore[arg-type]
            self._writer = Writer([records, RedisOutcomes(self._state)], self._tracker,
                                  on_window=self.metrics.window_emitted)
        self.stages = {r.name: WindowStage(r, self._pool, self._writer, self._tracker, self._state, sealer,
                                           on_mixed=self.metrics.window_mixed, clock=self._clock)
                       for r in settings.routes if r.window is not None}
        reuse = Reuse(self._state, self._pool) if settings.processing.reuse_answers else None
        self.partials = self._partial_writer(settings, edges)
        chats = any(TASKS[r.task].converses for r in settings.routes)
        self._handler = EventHandler(settings, self._pool, self._writer, self._tracker, self.stages, self.metrics,
                                     sealer, clock=self._clock, reuse=reuse, partials=self.partials,
                                     conversations=self._state if chats else None)
        self.source: Source | None = None
        self.liveness = Liveness(settings.processing.stall_timeout_s)
        self._stage_of_topic = {r.input: self.stages[r.name] for r in settings.routes if r.window is not None}
        # Window-only routes never queue model work, except summaries, which wait for room themselves.
        self._uses_model = any(TASKS[r.task].calls_model for r in settings.routes)
        self._background: list[asyncio.Task[None]] = []
        self._next_tick_s = self._next_commit_s = 0.0
        self._consumed = self._commits = 0
        self._owned: set[TP] = set()  # partitions assigned to this member now

    def _partial_writer(self, settings: Settings, edges: Edges) -> PartialWriter | None:
        """The progress of `stream: true` routes' answers; delta records go through the at-least-once producer
        (config refuses partial_output with exactly_once)."""
        if not any(r.stream for r in settings.routes):
            return None
        topics = {r.name: r.partial_output for r in settings.routes if r.partial_output is not None}
        send = edges.sink.send if topics else None  # type: ignore[union-attr]  # at least once: its producer
        return PartialWriter(settings.partials, self._state, send, topics, self.metrics,
                             settings.limits.max_new_tokens)

    @property
    def written(self) -> int:
        """Events fully written so far (answers and dead letters)."""
        return self._writer.written

    @property
    def windows_written(self) -> int:
        """Final window results fully written so far."""
        return self._writer.windows_written

    async def run(self, stop: asyncio.Event) -> None:
        """Consume, answer, window and write until `stop` is set, then drain and commit."""
        await self.start()
        try:
            while not stop.is_set():
                handled = self.turn()
                await asyncio.sleep(0 if handled else _IDLE_SLEEP_S)
        finally:
            await self.shutdown()

    async def start(self) -> None:
        """Check Redis, prepare the topics, subscribe, start the model and the writer."""
        await self._state.ping()
        await self._edges.prepare()
        self.source = self._edges.open_source(self)
        await self._pool.start()
        self._background = [asyncio.create_task(self._writer.run()), asyncio.create_task(self._serve_sink())]
        if self.partials is not None:
            self._background.append(asyncio.create_task(self.partials.run()))
        self._next_tick_s = self._next_commit_s = self._clock.monotonic_s()

    def probes(self) -> dict[str, Callable[[], object]]:
        """Readiness checks for /readyz: the model can serve, Kafka and Redis answer."""
        return {"model": lambda: self._pool.alive, "kafka": self._kafka_ready,
                "redis": self._state.ping}

    async def _kafka_ready(self) -> bool:
        return self.source is not None and await asyncio.to_thread(self.source.reachable)

    # --- the source's listener: rebalances and commits ----------------------------------------------
    def assigned(self, tps: list[TP]) -> None:
        self._owned.update(tps)
        for topic, partition in tps:
            if stage := self._stage_of_topic.get(topic):
                stage.assign([(topic, partition)])

    def restored(self, tp: TP, mark_ms: int | None) -> None:
        """The partition's next records are placed under the watermark its last commit carried."""
        if stage := self._stage_of_topic.get(tp[0]):
            stage.restore(tp, mark_ms)
            self._tracker.begin(tp, mark_ms)

    def revoked(self, tps: list[TP]) -> None:
        """In-flight events of these partitions still finish and are written (idempotently); their
        offsets are no longer ours, so commit what is fully written now and forget the rest."""
        final = self._tracker.forget(tps)
        limits = self._writer.limits()
        final = {tp: position for tp, position in final.items() if tp not in limits}  # held: replayed whole
        if final and not self._exactly_once and self.source is not None:
            self.source.commit(final, sync=True)
        self._forget(tps)

    def lost(self, tps: list[TP]) -> None:
        self._tracker.forget(tps)
        self._forget(tps)

    def commit_failed(self, tps: list[TP]) -> None:
        self._tracker.commit_failed(tps)

    def _forget(self, tps: list[TP]) -> None:
        """Nothing commits or waits on these partitions any more: their next owner replays them."""
        self._owned.difference_update(tps)
        self._writer.forget(tps)
        self._handler.forget(tps)
        self.metrics.forget_partitions(tps)
        for stage in self.stages.values():
            stage.revoke(tps)

    def _group_metadata(self) -> object:
        assert self.source is not None, "a transaction commits offsets only once consuming started"
        return self.source.group_metadata()

    # --- the consume loop ------------------------------------------------------------------------------
    def turn(self) -> int:
        """One pass of the consume loop: pause or resume, poll, place the events, close windows, commit.
        Returns how many messages it handled."""
        source = self.source
        assert source is not None, "start() first"
        self._raise_if_failed()
        limits = self._settings.batching
        room = self._room()
        if room == 0:
            source.pause()
        elif source.paused and room >= min(limits.max_batch, limits.max_queue):
            source.resume()
        # No poll while a transaction is being written: a revoke can then only come between two.
        # Not polling is pausing, for the watermarks too (a write cycle waits while Redis is away).
        polling = not self._writer.busy
        messages = source.poll(0 if source.paused else min(room, _MAX_POLL)) if polling else []
        now_ms = self._clock.now_ms()
        if self.stages:
            stalled = source.stalled()
            waiting = [tp for tp, behind in source.lag().items() if behind > 0]
            for stage in self.stages.values():
                stage.refresh(now_ms, paused=source.paused or not polling, unreachable=stalled, waiting=waiting)
        for message in messages:
            self._accept(message, now_ms)
        self._handler.flush()  # the poll's look-ups of kept answers, in one round trip
        self._consumed += len(messages)
        now_s = self._clock.monotonic_s()
        if now_s >= self._next_tick_s:
            for stage in self.stages.values():
                if waiting := stage.watermarks.unserved():
                    stage.watermarks.serve(source.served(waiting), now_ms)  # their idle clocks start
                stage.tick(now_ms)
            self._next_tick_s = now_s + _TICK_S
        if now_s >= self._next_commit_s:
            self._commit(source)
            self._report(source, now_s)
            self._next_commit_s = now_s + self._settings.kafka.commit_interval_ms / 1000
        return len(messages)

    def _accept(self, message: RawMessage, now_ms: int) -> None:
        """Hand a message to the event handler, if its partition is still ours: a poll that served a revoke
        may return messages fetched before it (confluent-kafka-python issue 1013), which tracked would be
        committed for a partition another member owns. An offset at or below one this assignment already
        handed out means the consumer went back without a rebalance this process heard of (a revoke and
        an assign inside one poll): start the partition afresh, as a rebalance would have."""
        tp = (message.topic, message.partition)
        if tp not in self._owned:
            return
        if message.offset <= self._tracker.last(tp):
            log.warning("%s[%d] went back to offset %d: starting it afresh", *tp, message.offset)
            self.lost([tp])
            self.assigned([tp])
        self._handler.accept(message, now_ms)

    def _commit(self, source: Source, *, sync: bool = False) -> None:
        """At least once: commit every partition whose fully-written point moved, below the outcomes the
        writer still holds (exactly once commits inside the writer's transactions)."""
        positions = {} if self._exactly_once else self._tracker.positions(self._writer.limits())
        if positions:
            self._tracker.mark_committed(positions)  # first: a failure reported inside commit() undoes it
            source.commit(positions, sync=sync)
            self._commits += 1

    def _report(self, source: Source, now_s: float) -> None:
        """Gauges sampled at the commit cadence: queue, lag, open windows, ledger; liveness."""
        self.metrics.queue(self._pool.depth, self._pool.inflight_tokens)
        if (kv := self._pool.kv_stats()) is not None:
            self.metrics.kv_cache(kv.used_blocks, kv.total_blocks, kv.reused_tokens)
        lags = source.lag()
        for (topic, partition), lag in lags.items():
            self.metrics.lag(topic, partition, lag)
        for name, stage in self.stages.items():
            self.metrics.open_windows(name, stage.open_windows)
        self.metrics.ledger(self._tracker.pending(), self._writer.held)
        committed = self._commits if not self._exactly_once else self._writer.written + self._writer.windows_written
        self.liveness.report(Seen(
            now_s=now_s, lag=sum(lags.values()), consumed=self._consumed, committed=committed,
            model_busy=self._pool.depth > 0 or self._pool.inflight_tokens > 0 or self._handler.looking_up > 0,
            outage=self._writer.outage or not self._pool.alive,  # a model server away is waited out too
            in_group=source.in_group(), brokers_up=not source.stalled()))

    def _room(self) -> int:
        """Events the pipeline can take now: bounded by the pool's queue when events use the model,
        and always by the writer's backlog (outcomes waiting for Kafka and Redis)."""
        limits = self._settings.batching
        if self._writer.backlog >= limits.max_queue:
            return 0
        if not self._uses_model:
            return _MAX_POLL
        return max(0, self._pool.free_slots() - self._handler.looking_up)  # a look-up may miss: a slot each

    def _raise_if_failed(self) -> None:
        """A stage that died stops the pipeline with its error rather than stalling it with paused input;
        liveness fails at once, so a supervisor does not wait for the shutdown to restart it."""
        for task in self._background:
            if task.done() and not task.cancelled() and (error := task.exception()) is not None:
                self.liveness.failed(f"a pipeline task died: {error!r}")
                raise error
        if (failure := self._handler.failure) is not None:
            self.liveness.failed(f"an answer look-up died: {failure!r}")
            raise failure
        for stage in self.stages.values():
            if stage.failure is not None:
                self.liveness.failed(f"window stage {stage.route.name} died: {stage.failure!r}")
                raise stage.failure

    async def _serve_sink(self) -> None:
        while True:
            self._edges.sink.poll()
            await asyncio.sleep(_IDLE_SLEEP_S)

    async def shutdown(self) -> None:
        source = self.source
        assert source is not None
        source.pause()
        writer_alive = not any(t.done() for t in self._background)
        try:
            async with asyncio.timeout(self._settings.shutdown_timeout_s):
                for stage in self.stages.values():
                    await stage.drain()
                await self._handler.drain()  # misses still go to the model before it closes
                await self._pool.aclose()
                if self.partials is not None:  # the last pieces and final markers, best effort
                    await self.partials.flush()
                if writer_alive:  # a dead writer never drains: do not wait for it
                    await self._writer.drain()
        except TimeoutError:
            log.warning("shutdown timed out; unfinished events will be processed again after restart")
        self._commit(source, sync=True)
        source.close()
        remaining = await self._edges.sink.flush(5.0)
        if remaining:
            log.warning("%d records were not acknowledged before exit", remaining)
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._edges.sink.close()  # after the task that polls it
        await self._state.aclose()
