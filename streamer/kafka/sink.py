"""The producer side: an idempotent producer whose deliveries resolve asyncio futures.

The producer is polled from the event loop, so delivery callbacks run on the loop's thread and may
resolve futures directly.
"""

from __future__ import annotations

import asyncio
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streamer.errors import StreamerError


class DeliveryError(StreamerError):
    """Kafka did not acknowledge a record."""


class KafkaSink:
    def __init__(self, config: dict[str, Any]) -> None:
        self._producer = Producer(config)

    def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[None]:
        """Queue one record; the future resolves once Kafka acknowledged it."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(DeliveryError(f"{topic}: {error.str()}"))

        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=delivered)
                return future
            except BufferError:
                self._producer.poll(0.05)  # local queue full: serve deliveries, then retry
            except KafkaException as exc:
                raise DeliveryError(f"{topic}: {exc.args[0].str()}") from None

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
