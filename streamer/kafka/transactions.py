"""A transactional producer: a batch's records and the input offsets they finish commit together or not at all.

Transactional id scheme (KIP-447): one id per instance, not per input partition. Zombies are fenced
twice over: a restarted instance reusing its id (`processing.transactional_id`, e.g. the pod name)
bumps the producer epoch in `init_transactions`, which aborts its predecessor's open transaction at
once; and every `send_offsets_to_transaction` carries the consumer's group metadata (generation,
member id), so an instance that lost its partitions in a rebalance can no longer commit offsets for
them — the coordinator refuses, and its transaction aborts. Per-partition ids (the pre-KIP-447
scheme) would need one producer per input partition; brokers >= 2.5 make that unnecessary.

Blocking calls run in a thread. A committed transaction already means every record of it was
acknowledged; delivery callbacks only note records refused for what they are, so that the pipeline's
Kafka sink (`streamer.pipeline.sinks.kafka`) replaces them with dead letters instead of producing them
again for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from streamer.config import ProcessingSettings
from streamer.contracts import ErrorCode
from streamer.errors import StreamerError
from streamer.kafka.offsets import TP, Position
from streamer.kafka.positions import topic_partitions
from streamer.kafka.sink import refused_as

log = logging.getLogger(__name__)

_CALL_TIMEOUT_S = 10.0
_GRACE_S = 5.0  # past the call's own timeout before a call counts as stuck
_GIVE_UP_S = 30.0  # an abort still failing then: replace the producer


class TransactionFenced(StreamerError):
    """Another instance with this transactional id took over, or the error is fatal: this process must stop."""


class Ending(Enum):
    COMMITTED = "committed"
    ABORTED = "aborted"  # nothing of the batch is visible; produce it again in a new transaction


@dataclass(frozen=True)
class Transacted:
    """How a transaction ended; when aborted, the records the client or broker refused for what they
    are (by index, with the dead-letter code that replaces them): producing them again cannot help."""

    ending: Ending
    refused: dict[int, ErrorCode] = field(default_factory=dict)


def transactional_id(processing: ProcessingSettings, group_id: str) -> str:
    """The configured id, else one unique to this process (safe, but a crash's open transaction then
    blocks read_committed readers until `transaction_timeout_ms`)."""
    return processing.transactional_id or f"{group_id}-{uuid.uuid4().hex[:12]}"


def producer_overrides(processing: ProcessingSettings, group_id: str) -> dict[str, Any]:
    return {
        "transactional.id": transactional_id(processing, group_id),
        "transaction.timeout.ms": processing.transaction_timeout_ms,
        "enable.idempotence": True,
    }


CONSUMER_OVERRIDES: dict[str, Any] = {"isolation.level": "read_committed"}
"""The input consumer skips aborted records (e.g. a chained streamer's) and reads only committed ones."""


Record = tuple[str, bytes | None, bytes]
"""topic, key, value"""


class TransactionalProducer:
    """One transaction at a time. A transaction that cannot be ended cleanly is not retried in place:
    the producer is replaced, and the new one's `init_transactions` (same id, next epoch) aborts the
    old one's open transaction on the coordinator and fences it, whatever state it was left in."""

    def __init__(self, config: dict[str, Any], make: Callable[[dict[str, Any]], Any] = Producer) -> None:
        self._config = config
        self._make = make
        self._producer = make(config)
        self._open = False

    async def start(self) -> None:
        """Register the id with the coordinator, fencing any earlier producer that used it."""
        await self._retrying("init", lambda: self._producer.init_transactions(_CALL_TIMEOUT_S))

    async def transact(self, records: list[Record], positions: dict[TP, Position],
                       group_metadata: object) -> Transacted:
        """Produce `records` and commit `positions` (next offset to read, and the watermark, per partition)
        in one transaction."""
        self._call(self._producer.begin_transaction)
        self._open = True
        refused: dict[int, ErrorCode] = {}
        try:
            for index, (topic, key, value) in enumerate(records):
                self._produce(index, topic, key, value, refused)
            if refused:
                raise _Abortable(f"{len(refused)} records refused")
            if positions:
                await self._send_offsets(topic_partitions(positions), group_metadata)
            # No giving up here: once EndTxn may have been sent, only the coordinator's answer tells
            # whether the batch is committed, and redoing a committed batch would duplicate it.
            await self._retrying("commit", lambda: self._producer.commit_transaction(_CALL_TIMEOUT_S))
        except _Abortable as exc:
            self._producer.poll(0)  # serve the delivery reports that say which records were refused
            log.warning("transaction aborted (%s); its records will be produced again", exc)
            await self._abort()
            return Transacted(Ending.ABORTED, refused)
        except _Stuck as exc:
            log.warning("%s; replacing the producer, its records will be produced again", exc)
            await self._replace()
            return Transacted(Ending.ABORTED, refused)
        self._open = False
        return Transacted(Ending.COMMITTED)

    async def _send_offsets(self, positions: list[TopicPartition], group_metadata: object) -> None:
        """librdkafka waits for send_offsets_to_transaction without a deadline of its own (the timeout
        only applies once the coordinator answers), so with the broker away it can block for minutes.
        It is not resumable either: any failure ends this transaction."""
        producer = self._producer
        try:
            await _in_daemon_thread(
                lambda: producer.send_offsets_to_transaction(positions, group_metadata, _CALL_TIMEOUT_S),
                _CALL_TIMEOUT_S + _GRACE_S)
        except TimeoutError:
            raise _Stuck(f"offsets: no answer after {_CALL_TIMEOUT_S + _GRACE_S:.0f} s") from None
        except KafkaException as exc:
            error = exc.args[0]
            if error.fatal():
                raise TransactionFenced(f"Kafka transaction offsets failed: {error.str()}") from None
            raise _Abortable(f"offsets: {error.str()}") from None

    async def _abort(self) -> None:
        try:
            await self._retrying("abort", lambda: self._producer.abort_transaction(_CALL_TIMEOUT_S), _GIVE_UP_S)
        except _Abortable as exc:
            log.warning("%s; replacing the producer", exc)
            await self._replace()
        self._open = False

    async def _replace(self) -> None:
        """A fresh producer with the same transactional id; the old one may be stuck in a call, so it is
        dropped from a daemon thread, never called on this thread again."""
        old, self._producer = self._producer, self._make(self._config)
        self._open = False
        threading.Thread(target=_retire, args=(old,), daemon=True, name="retire-producer").start()
        await self.start()

    def _produce(self, index: int, topic: str, key: bytes | None, value: bytes, refused: dict[int, ErrorCode]) -> None:
        """Produce one record of the transaction; one the client or broker refuses for what it is lands
        in `refused` (a delivery report: the commit then fails and the transaction aborts)."""

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None and (code := refused_as(error)) is not None:
                refused[index] = code

        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=delivered)
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain, then retry
            except KafkaException as exc:
                if (code := refused_as(exc.args[0])) is not None:
                    refused[index] = code
                    return
                raise _Abortable(exc.args[0].str()) from None

    def poll(self) -> None:
        self._producer.poll(0)

    async def flush(self, timeout_s: float) -> int:
        """Abort a transaction left open at exit (its offsets were not committed: it is replayed)."""
        if self._open:
            try:
                await asyncio.to_thread(self._producer.abort_transaction, timeout_s)
            except KafkaException as exc:
                log.warning("abort at exit failed: %s", exc.args[0].str())
            self._open = False
        return len(self._producer)

    def close(self) -> None:
        """As KafkaSink.close, after `flush` aborted any open transaction."""
        self._producer.purge()
        self._producer.close()

    def _call(self, action: Any) -> None:
        try:
            action()
        except KafkaException as exc:
            raise TransactionFenced(f"Kafka transaction failed: {exc.args[0].str()}") from None

    async def _retrying(self, what: str, action: Any, give_up_s: float | None = None) -> None:
        """Retry retriable errors (a broker away; these calls resume where they stopped) until they pass;
        abortable ones raise _Abortable, and so do retriable ones still failing after `give_up_s`."""
        attempt = 0
        began = time.monotonic()
        while True:
            try:
                await asyncio.to_thread(action)
                return
            except KafkaException as exc:
                error = exc.args[0]
                if error.txn_requires_abort():
                    raise _Abortable(error.str()) from None
                if error.fatal() or not error.retriable():
                    raise TransactionFenced(f"Kafka transaction {what} failed: {error.str()}") from None
                if give_up_s is not None and time.monotonic() - began > give_up_s:
                    raise _Abortable(f"{what} still failing after {give_up_s:.0f} s: {error.str()}") from None
                attempt += 1
                log.warning("transaction %s (attempt %d): %s; retrying", what, attempt, error.str())
                await asyncio.sleep(min(0.1 * attempt, 1.0))


async def _in_daemon_thread(action: Callable[[], object], deadline_s: float) -> None:
    """Run a blocking call in a daemon thread and wait at most `deadline_s` (TimeoutError). A call that
    never returns then costs one idle thread, not the event loop, and does not hold up the process's
    exit as a stuck `asyncio.to_thread` would (the default executor's threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not done.done():
            done.set_result(None) if error is None else done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            action()
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, daemon=True, name="txn-call").start()
    async with asyncio.timeout(deadline_s):
        await done


def _retire(producer: Any) -> None:
    """Drop what the replaced producer still queues (its transaction is aborted anyway); the last
    reference goes with this thread."""
    with contextlib.suppress(KafkaException, RuntimeError):
        producer.purge()


class _Stuck(Exception):
    """A transactional call did not return in time: the producer must be replaced."""


class _Abortable(Exception):
    """The current transaction failed and must be aborted; the producer itself is fine."""
