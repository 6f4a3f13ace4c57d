"""Wires the stages of one streamer process and runs them until asked to stop.

  KafkaSource ─▶ EventHandler ─bad/late─▶ Writer (dead-letter / late topic)
                   ├─▶ LLMPool (micro-batcher ▶ resident worker) ─▶ Writer (output topic + Redis)
                   └─▶ WindowStage (per route) ─window closes─▶ LLMPool? ─▶ Writer (window topic + Redis)
  Writer ─"fully written"─▶ OffsetTracker ─▶ KafkaSource.commit

Shutdown order (after SIGTERM/SIGINT, within `shutdown_timeout_s`):
  1. stop fetching; 2. emit the windows already closed; 3. finish every queued request;
  4. write every outcome to Kafka and Redis; 5. commit the offsets now fully written;
  6. flush the producer and close the clients. Open windows are not emitted: their offsets are
  not committed, so the next owner of the partition rebuilds them from Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from streamer.config import Settings
from streamer.engine.build import build_pool
from streamer.engine.continuous import ContinuousPool
from streamer.engine.worker import LLMWorker
from streamer.events import EventHandler
from streamer.kafka.admin import ensure_topics
from streamer.kafka.client_config import consumer_config, producer_config
from streamer.kafka.offsets import TP, OffsetTracker
from streamer.kafka.sink import KafkaSink
from streamer.kafka.source import KafkaSource
from streamer.kafka.transactions import CONSUMER_OVERRIDES, TransactionalProducer, producer_overrides
from streamer.observe.metrics import Metrics, resident_bytes
from streamer.state.redis import RedisState
from streamer.windows.stage import WindowStage
from streamer.writer import TransactionalWriter, Writer

log = logging.getLogger(__name__)

_IDLE_SLEEP_S = 0.005
_TICK_S = 0.02
_MAX_POLL = 500


class Pipeline:
    def __init__(self, settings: Settings, bootstrap: str, redis_url: str, worker: LLMWorker,
                 *, create_topics: bool = True, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self.metrics = metrics or Metrics()
        self.metrics.model_memory(resident_bytes(worker.model))
        self.metrics.model_loaded(worker.name, worker.loaded.manifest)
        self._bootstrap = bootstrap
        self._create_topics = create_topics
        self._tracker = OffsetTracker()
        self._pool = build_pool(worker, settings.batching, settings.engine, on_batch=self.metrics.batch_done)
        self._exactly_once = settings.processing.guarantee == "exactly_once"
        self._state = RedisState(settings.redis, redis_url, kafka_decides_windows=self._exactly_once)
        self._sink: KafkaSink | TransactionalProducer
        self._writer: Writer
        if self._exactly_once:
            self._sink = TransactionalProducer({**producer_config(settings.kafka, bootstrap),
                                                **producer_overrides(settings.processing, settings.kafka.group_id)})
            self._writer = TransactionalWriter(self._sink, self._state, self._tracker,
                                               settings.kafka.commit_interval_ms / 1000, self._group_metadata,
                                               on_window=self.metrics.window_emitted)
        else:
            self._sink = KafkaSink(producer_config(settings.kafka, bootstrap))
            self._writer = Writer(self._sink, self._state, self._tracker, on_window=self.metrics.window_emitted)
        self.stages = {r.name: WindowStage(r, self._pool, self._writer, self._tracker, self._state,
                                           on_mixed=self.metrics.window_mixed)
                       for r in settings.routes if r.window is not None}
        self._handler = EventHandler(settings, self._pool, self._writer, self._tracker, self.stages, self.metrics)
        self.source: KafkaSource | None = None
        self._stage_of_topic = {r.input: self.stages[r.name] for r in settings.routes if r.window is not None}
        # Window-only routes never queue model work, except summaries, which wait for room themselves.
        self._uses_model = any(r.task != "none" for r in settings.routes)

    @property
    def written(self) -> int:
        """Events fully written so far (answers and dead letters)."""
        return self._writer.written

    @property
    def windows_written(self) -> int:
        """Final window results fully written so far."""
        return self._writer.windows_written

    def _topics_out(self) -> list[str]:
        topics = {self._settings.kafka.dead_letter_topic}
        for route in self._settings.routes:
            window = route.window
            topics |= {t for t in (route.output, window and window.output, window and window.late_topic) if t}
        return sorted(topics)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume, answer, window and write until `stop` is set, then drain and commit."""
        await self._state.ping()
        if self._create_topics:
            await asyncio.to_thread(ensure_topics, self._settings.kafka, self._bootstrap, self._topics_out())
        consumer = consumer_config(self._settings.kafka, self._bootstrap)
        source = KafkaSource({**consumer, **CONSUMER_OVERRIDES} if self._exactly_once else consumer,
                             [r.input for r in self._settings.routes], self._tracker,
                             on_assign=self._assigned, on_revoke=self._revoked, commits=not self._exactly_once)
        self.source = source
        await self._pool.start()
        background = [asyncio.create_task(self._writer.run()), asyncio.create_task(self._serve_sink())]
        try:
            await self._consume(source, stop, background)
        finally:
            await self._shutdown(source, background)

    def probes(self) -> dict[str, Callable[[], object]]:
        """Readiness checks for /readyz: the model is resident, Kafka and Redis answer."""
        return {"model": lambda: True, "kafka": self._kafka_ready, "redis": self._state.ping}

    async def _kafka_ready(self) -> bool:
        return self.source is not None and await asyncio.to_thread(self.source.reachable)

    def _assigned(self, tps: list[TP]) -> None:
        for topic, partition in tps:
            if stage := self._stage_of_topic.get(topic):
                stage.watermarks.assign([(topic, partition)], served=False)

    def _group_metadata(self) -> object:
        assert self.source is not None, "a transaction commits offsets only once consuming started"
        return self.source.group_metadata()

    def _revoked(self, tps: list[TP]) -> None:
        if isinstance(self._writer, TransactionalWriter):
            self._writer.forget(tps)
        self.metrics.forget_partitions(tps)
        for stage in self.stages.values():
            stage.revoke(tps)

    async def _consume(self, source: KafkaSource, stop: asyncio.Event, background: list[asyncio.Task[None]]) -> None:
        limits = self._settings.batching
        next_commit_s = next_tick_s = time.monotonic()
        while not stop.is_set():
            self._raise_if_failed(background)
            room = self._room()
            if room == 0:
                source.pause()
            elif source.paused and room >= min(limits.max_batch, limits.max_queue):
                source.resume()
            # No poll while a transaction is being written: a revoke can then only come between two.
            # Not polling is pausing, for the watermarks too (a write cycle waits while Redis is away).
            polling = not self._writer.busy
            messages = source.poll(0 if source.paused else min(room, _MAX_POLL)) if polling else []
            now_ms = int(time.time() * 1000)
            unreachable = source.unreachable()
            for stage in self.stages.values():
                stage.refresh(now_ms, paused=source.paused or not polling, unreachable=unreachable)
            for message in messages:
                self._handler.accept(message, now_ms)
            now_s = time.monotonic()
            if now_s >= next_tick_s:
                for stage in self.stages.values():
                    if waiting := stage.watermarks.unserved():
                        stage.watermarks.serve(source.served(waiting), now_ms)  # their idle clocks start
                    stage.tick(now_ms)
                next_tick_s = now_s + _TICK_S
            if now_s >= next_commit_s:
                source.commit()
                self._report(source)
                next_commit_s = now_s + self._settings.kafka.commit_interval_ms / 1000
            await asyncio.sleep(0 if messages else _IDLE_SLEEP_S)

    def _report(self, source: KafkaSource) -> None:
        """Gauges sampled at the commit cadence: queue, lag, open windows."""
        self.metrics.queue(self._pool.depth, self._pool.inflight_tokens)
        if isinstance(self._pool, ContinuousPool):
            self.metrics.kv_cache(*self._pool.kv_usage())
        for (topic, partition), lag in source.lag().items():
            self.metrics.lag(topic, partition, lag)
        for name, stage in self.stages.items():
            self.metrics.open_windows(name, stage.open_windows)

    def _room(self) -> int:
        """Events the pipeline can take now: bounded by the pool's queue when events use the model,
        and always by the writer's backlog (outcomes waiting for Kafka and Redis)."""
        limits = self._settings.batching
        if self._writer.backlog >= limits.max_queue:
            return 0
        return self._pool.free_slots() if self._uses_model else _MAX_POLL

    def _raise_if_failed(self, background: list[asyncio.Task[None]]) -> None:
        """A stage that died stops the pipeline with its error rather than stalling it with paused input."""
        for task in background:
            if task.done():
                task.result()
        for stage in self.stages.values():
            if stage.failure is not None:
                raise stage.failure

    async def _serve_sink(self) -> None:
        while True:
            self._sink.poll()
            await asyncio.sleep(_IDLE_SLEEP_S)

    async def _shutdown(self, source: KafkaSource, background: list[asyncio.Task[None]]) -> None:
        source.pause()
        try:
            async with asyncio.timeout(self._settings.shutdown_timeout_s):
                for stage in self.stages.values():
                    await stage.drain()
                await self._pool.aclose()
                await self._writer.drain()
        except TimeoutError:
            log.warning("shutdown timed out; unfinished events will be processed again after restart")
        source.close()
        remaining = await self._sink.flush(5.0)
        if remaining:
            log.warning("%d records were not acknowledged before exit", remaining)
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._sink.close()  # after the task that polls it
        await self._state.aclose()
