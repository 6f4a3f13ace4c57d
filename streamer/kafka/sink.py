"""The producer side: an idempotent producer whose deliveries resolve asyncio futures.

The producer is polled from the event loop, so delivery callbacks run on the loop's thread and may
resolve futures directly. A failed delivery says whether trying again can help: a broker away can
(retriable), a record the broker or the client refuses for what it is cannot (`refused`, with the
dead-letter code that replaces it: the pipeline's Kafka sink, `streamer.pipeline.sinks.kafka`, never
produces it for ever).
"""

from __future__ import annotations

import asyncio
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streamer.contracts import ErrorCode
from streamer.errors import StreamerError

_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG_SIZE})
_INVALID = frozenset({KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG, KafkaError.POLICY_VIOLATION,
                      KafkaError.INVALID_TIMESTAMP, KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT, KafkaError._INVALID_ARG})


class DeliveryError(StreamerError):
    """Kafka did not acknowledge a record. `refused` is the dead-letter code when the record itself is
    the problem (too large, invalid): producing it again cannot help. Otherwise (a broker or topic
    problem: away, timed out, not authorized yet) it may be retried."""

    def __init__(self, message: str, refused: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.refused = refused


def delivery_error(topic: str, error: KafkaError) -> DeliveryError:
    return DeliveryError(f"{topic}: {error.str()}", refused_as(error))


def refused_as(error: KafkaError) -> ErrorCode | None:
    """The dead-letter code of an error about the record itself, None for one worth retrying."""
    if error.code() in _TOO_LARGE:
        return ErrorCode.TOO_LARGE
    if error.code() in _INVALID:
        return ErrorCode.REJECTED
    return None


class KafkaSink:
    def __init__(self, config: dict[str, Any]) -> None:
        self._producer = Producer(config)

    def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[None]:
        """Queue one record; the future resolves once Kafka acknowledged it (DeliveryError if not)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(delivery_error(topic, error))

        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=delivered)
                return future
            except BufferError:
                self._producer.poll(0.05)  # local queue full: serve deliveries, then retry
            except KafkaException as exc:  # refused at once (e.g. over message.max.bytes)
                future.set_exception(delivery_error(topic, exc.args[0]))
                return future

    def poll(self) -> None:
        """Serve delivery callbacks without waiting."""
        self._producer.poll(0)

    async def flush(self, timeout_s: float) -> int:
        """Wait for outstanding deliveries, serving callbacks on this thread; returns how many remain."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(self._producer) and asyncio.get_running_loop().time() < deadline:
            self._producer.poll(0)
            await asyncio.sleep(0.005)
        return len(self._producer)

    def close(self) -> None:
        """Drop what Kafka did not acknowledge (its offsets are uncommitted: it is replayed) and stop the client
        now, while the cluster is still up; left to the garbage collector it would keep reconnecting."""
        self._producer.purge()
        self._producer.close()
