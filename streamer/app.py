"""Wires the stages of one streamer process and runs them until asked to stop.

  KafkaSource ─▶ decode ─bad─▶ Writer (dead-letter topic)
                   └─▶ LLMPool (micro-batcher ▶ resident worker) ─▶ Writer (output topic + Redis)
  Writer ─"fully written"─▶ OffsetTracker ─▶ KafkaSource.commit

Shutdown order (after SIGTERM/SIGINT, within `shutdown_timeout_s`):
  1. stop fetching; 2. finish every queued request; 3. write every outcome to Kafka and Redis;
  4. commit the offsets now fully written; 5. flush the producer and close the clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from streamer.batching.batcher import BatchRules
from streamer.config import Route, Settings
from streamer.contracts import Answer, DeadLetter, ErrorCode, InputEvent, Source
from streamer.decode import RawMessage, dead_letter, decode
from streamer.engine.pool import Generated, LLMPool
from streamer.engine.worker import GenRequest, LLMWorker
from streamer.kafka.admin import ensure_topics
from streamer.kafka.client_config import consumer_config, producer_config
from streamer.kafka.offsets import OffsetTracker
from streamer.kafka.sink import KafkaSink
from streamer.kafka.source import KafkaSource
from streamer.state.redis import RedisState
from streamer.tasks.prompts import build_messages, finish, route_tasks
from streamer.writer import Outcome, Writer

log = logging.getLogger(__name__)

_IDLE_SLEEP_S = 0.005
_MAX_POLL = 500


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        redis_url: str,
        worker: LLMWorker,
        *,
        create_topics: bool = True,
    ) -> None:
        self._settings = settings
        self._bootstrap = bootstrap
        self._create_topics = create_topics
        self._routes = {route.input: route for route in settings.routes}
        self._tasks = {route.input: route_tasks(route) for route in settings.routes}
        self._tracker = OffsetTracker()
        self._pool = LLMPool(worker, BatchRules(**settings.batching.model_dump()))
        self._sink = KafkaSink(producer_config(settings.kafka, bootstrap))
        self._state = RedisState(settings.redis, redis_url)
        self._writer = Writer(self._sink, self._state, self._tracker)

    @property
    def written(self) -> int:
        """Events fully written so far (answers and dead letters)."""
        return self._writer.written

    async def run(self, stop: asyncio.Event) -> None:
        """Consume, answer and write until `stop` is set, then drain and commit."""
        await self._state.ping()
        if self._create_topics:
            outputs = [r.output for r in self._settings.routes] + [self._settings.kafka.dead_letter_topic]
            await asyncio.to_thread(ensure_topics, self._settings.kafka, self._bootstrap, outputs)
        source = KafkaSource(
            consumer_config(self._settings.kafka, self._bootstrap), list(self._routes), self._tracker
        )
        await self._pool.start()
        background = [asyncio.create_task(self._writer.run()), asyncio.create_task(self._serve_sink())]
        try:
            await self._consume(source, stop, background)
        finally:
            await self._shutdown(source, background)

    async def _consume(self, source: KafkaSource, stop: asyncio.Event, background: list[asyncio.Task[None]]) -> None:
        limits = self._settings.batching
        next_commit_s = time.monotonic()
        while not stop.is_set():
            for task in background:
                if task.done():  # a stage died: stop with its error rather than stall with paused input
                    task.result()
            room = self._pool.free_slots() if self._writer.backlog < limits.max_queue else 0
            if room == 0:
                source.pause()
            elif source.paused and room >= min(limits.max_batch, limits.max_queue):
                source.resume()
            messages = source.poll(0 if source.paused else min(room, _MAX_POLL))
            for message in messages:
                self._accept(message)
            if time.monotonic() >= next_commit_s:
                source.commit()
                next_commit_s = time.monotonic() + self._settings.kafka.commit_interval_ms / 1000
            await asyncio.sleep(0 if messages else _IDLE_SLEEP_S)

    def _accept(self, message: Message) -> None:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        tp = (topic, partition)
        self._tracker.track(tp, offset)
        ts_type, ts_ms = message.timestamp()
        if ts_type == TIMESTAMP_NOT_AVAILABLE:
            ts_ms = int(time.time() * 1000)
        raw = RawMessage(
            message.value(), message.key(), ts_ms, Source(topic=topic, partition=partition, offset=offset)
        )
        route = self._routes[topic]
        decoded = decode(
            raw,
            default_task=route.task,
            known_tasks=self._tasks[topic],
            max_chars=self._settings.limits.max_chars,
        )
        if isinstance(decoded, DeadLetter):
            self._dead(raw, decoded)
            return
        cap = self._settings.limits.max_new_tokens
        request = GenRequest(
            messages=build_messages(decoded, route),
            max_new_tokens=min(decoded.params.max_new_tokens or route.max_new_tokens, cap),
            temperature=decoded.params.temperature or 0.0,
        )
        future = self._pool.submit(request)
        future.add_done_callback(functools.partial(self._answered, decoded, route, raw, time.monotonic()))

    def _answered(
        self,
        event: InputEvent,
        route: Route,
        raw: RawMessage,
        arrived_s: float,
        future: asyncio.Future[Generated],
    ) -> None:
        try:
            generated = future.result()
        except Exception as exc:  # the worker already split and retried; what is left is this event's
            self._dead(raw, dead_letter(raw, ErrorCode.MODEL_ERROR, repr(exc), event.id))
            return
        result = generated.result
        if result.error is not None:
            self._dead(raw, dead_letter(raw, ErrorCode.MODEL_ERROR, result.error, event.id))
            return
        task = event.task or route.task
        answer = Answer(
            id=event.id,
            key=event.key,
            task=task,
            output=finish(task, result.text, route),
            model=self._pool.worker.name,
            tokens_in=result.tokens_in,
            tokens_out=result.tokens_out,
            queued_ms=round(generated.queued_ms, 3),
            latency_ms=round((time.monotonic() - arrived_s) * 1000, 3),
            source=raw.source,
            ts_in=event.ts or raw.timestamp_ms,
            ts_out=int(time.time() * 1000),
            meta=event.meta,
        )
        key = event.key.encode() if event.key is not None else raw.key
        self._writer.add(
            Outcome((raw.source.topic, raw.source.partition), raw.source.offset, route.output, key, answer)
        )

    def _dead(self, raw: RawMessage, letter: DeadLetter) -> None:
        tp = (raw.source.topic, raw.source.partition)
        self._writer.add(
            Outcome(tp, raw.source.offset, self._settings.kafka.dead_letter_topic, raw.key, letter)
        )

    async def _serve_sink(self) -> None:
        while True:
            self._sink.poll()
            await asyncio.sleep(_IDLE_SLEEP_S)

    async def _shutdown(self, source: KafkaSource, background: list[asyncio.Task[None]]) -> None:
        source.pause()
        try:
            async with asyncio.timeout(self._settings.shutdown_timeout_s):
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
        await self._state.aclose()
