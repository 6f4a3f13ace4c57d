"""Kafka as a sink: the output records, acknowledged one by one (at least once) or committed in one
transaction with the input offsets (exactly once, the `TransactionalSink`).

Either way a record Kafka refuses for what it is (too large, invalid) is replaced by its dead letter, which
finishes the same events under the same ordering rule; a refused dead letter is cut to its bare facts. A
broker away is waited for (at least once) or ends the try (exactly once: the writer tries again next cycle).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from streamer.contracts import ErrorCode
from streamer.kafka.offsets import TP, Position
from streamer.kafka.sink import DeliveryError
from streamer.kafka.transactions import Ending, Record, Transacted
from streamer.outcomes import Outcome, Sealer
from streamer.pipeline.sinks import Attempt
from streamer.state.retry import backoff_s

log = logging.getLogger(__name__)


class RecordProducer(Protocol):
    """At least once: one record at a time, acknowledged through a future (`streamer.kafka.sink.KafkaSink`)."""

    def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[None]: ...


class TransactionProducer(Protocol):
    """Exactly once: records and commit positions in one transaction
    (`streamer.kafka.transactions.TransactionalProducer`)."""

    async def start(self) -> None: ...

    async def transact(self, records: list[Record], positions: dict[TP, Position], group_metadata: object
                       ) -> Transacted: ...


class KafkaRecords:
    """At least once (a `Sink`): every record of the batch produced at once, each awaited until acknowledged."""

    def __init__(self, producer: RecordProducer, sealer: Sealer) -> None:
        self._producer = producer
        self._sealer = sealer
        self.outage = False  # a delivery failed and is being produced again

    async def write(self, batch: list[Outcome]) -> list[Outcome]:
        deliveries = [self._producer.send(o.topic, o.kafka_key, o.payload) for o in batch]
        return [await self._delivered(o, delivery) for o, delivery in zip(batch, deliveries, strict=True)]

    async def _delivered(self, outcome: Outcome, delivery: asyncio.Future[None]) -> Outcome:
        """The outcome once acknowledged: a broker away is waited for; a record refused for what it is is
        replaced by its dead letter (twice at most: a refused dead letter by a bare one)."""
        attempt, replaced = 0, 0
        while True:
            try:
                await delivery
                self.outage = False
                return outcome
            except DeliveryError as exc:
                if exc.refused is not None and replaced < 2:
                    log.warning("%s; writing a %s dead letter in its place", exc, exc.refused.value)
                    outcome = _dead_letter(self._sealer, outcome, exc.refused, str(exc))
                    replaced += 1
                else:
                    pause = backoff_s(attempt)
                    log.warning("%s; producing again in %.1f s", exc, pause)
                    self.outage = True
                    await asyncio.sleep(pause)
                    attempt += 1
                delivery = self._producer.send(outcome.topic, outcome.kafka_key, outcome.payload)


class KafkaTransaction:
    """Exactly once (the `TransactionalSink`): the batch's records and the offsets in one transaction."""

    def __init__(self, producer: TransactionProducer, sealer: Sealer) -> None:
        self._producer = producer
        self._sealer = sealer

    async def start(self) -> None:
        await self._producer.start()

    async def commit(self, batch: list[Outcome], positions: dict[TP, Position], group_metadata: object) -> Attempt:
        records = [(o.topic, o.kafka_key, o.payload) for o in batch]
        transacted = await self._producer.transact(records, positions, group_metadata)
        if transacted.ending is Ending.COMMITTED:
            return Attempt(True, batch)
        again = list(batch)
        for index, code in transacted.refused.items():
            outcome = batch[index]
            log.warning("%s refused a record (%s); writing a dead letter in its place", outcome.topic, code.value)
            again[index] = _dead_letter(self._sealer, outcome, code, f"{outcome.topic}: refused ({code.value})")
        return Attempt(False, again)


def _dead_letter(sealer: Sealer, outcome: Outcome, code: ErrorCode, detail: str) -> Outcome:
    """The dead letter standing for a refused record: the same events, under the same ordering rule."""
    return sealer.replacement(outcome.record, code, detail, outcome.releases, outcome.route, in_order=outcome.in_order)
