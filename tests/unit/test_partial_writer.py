"""The partial writer: a slow Redis makes pieces coalesce, never waits the model; a Redis that fails or hangs
costs the deltas of that flush, counted; delta records are keyed by the event key, numbered, and end once."""

import asyncio

from streamer.config import PartialSettings
from streamer.contracts import PartialDelta
from streamer.observe.metrics import Metrics
from streamer.pipeline.partials import PartialWriter
from streamer.state.redis import StateUnavailable


class Store:
    def __init__(self) -> None:
        self.batches: list[list] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = False

    async def append_partials(self, deltas, ttl_s, maxlen) -> None:
        await self.gate.wait()
        if self.fail:
            raise StateUnavailable("Redis is away")
        self.batches.append(list(deltas))


class Topic:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, PartialDelta]] = []

    def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[None]:
        self.records.append((topic, key, PartialDelta.model_validate_json(value)))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_slow_redis_coalesces_pieces_and_the_records_number_each_event() -> None:
    async def scenario() -> None:
        store, topic, metrics = Store(), Topic(), Metrics()
        writer = PartialWriter(PartialSettings(), store, topic.send, {"q": "answers.partial"}, metrics, 64)
        progress = writer.open("e1", "q", "user-7", b"user-7")
        progress.piece("The")
        store.gate.clear()  # Redis stalls mid-write
        flushing = asyncio.create_task(writer.flush())
        await asyncio.sleep(0)
        for piece in (" capital", " is", " Paris."):
            progress.piece(piece)  # the model goes on: nothing waits
        progress.finish()
        store.gate.set()
        await flushing
        await writer.flush()
        assert [[(d.seq, d.delta, d.final) for d in b] for b in store.batches] == [
            [(0, "The", False)], [(1, " capital is Paris.", True)]]
        assert [(t, k, r.seq, r.delta, r.final) for t, k, r in topic.records] == [
            ("answers.partial", b"user-7", 0, "The", False),
            ("answers.partial", b"user-7", 1, " capital is Paris.", True)]
        assert sample(metrics, "streamer_partials_written_total", route="q") == 2
    asyncio.run(scenario())


def test_a_failed_or_hung_write_drops_its_deltas_and_counts_them() -> None:
    async def scenario() -> None:
        store, metrics = Store(), Metrics()
        writer = PartialWriter(PartialSettings(write_timeout_s=0.05), store, None, {}, metrics, 64)
        progress = writer.open("e1", "q", None, None)
        progress.piece("a")
        store.fail = True
        await writer.flush()
        store.fail = False
        store.gate.clear()
        progress.piece("b")
        await writer.flush()  # times out: the model never waited for it
        store.gate.set()
        progress.piece("c")
        progress.finish()
        await writer.flush()
        assert [[(d.seq, d.delta, d.final) for d in b] for b in store.batches] == [[(2, "c", True)]]
        assert sample(metrics, "streamer_partials_dropped_total", route="q", reason="redis") == 2
    asyncio.run(scenario())


def test_a_full_buffer_drops_pieces_and_counts_them() -> None:
    async def scenario() -> None:
        store, metrics = Store(), Metrics()
        writer = PartialWriter(PartialSettings(max_buffered_chars=4), store, None, {}, metrics, 64)
        progress = writer.open("e1", "q", None, None)
        for piece in ("abc", "def", "g"):
            progress.piece(piece)
        progress.finish()
        await writer.flush()
        assert [(d.seq, d.delta, d.final) for d in store.batches[0]] == [(0, "abc", False), (2, "", True)]
        assert sample(metrics, "streamer_partials_dropped_total", route="q", reason="buffer") == 2
    asyncio.run(scenario())


def test_delta_records_the_broker_has_not_acknowledged_are_bounded(monkeypatch) -> None:
    """With the broker away, records would pile up in the producer queue the answers share: past the bound
    they are dropped and counted, and the Redis stream still gets every delta."""
    monkeypatch.setattr("streamer.pipeline.partials.MAX_UNACKED", 2)

    async def scenario() -> None:
        store, metrics = Store(), Metrics()
        pending: list[asyncio.Future[None]] = []

        def send(topic: str, key: bytes | None, value: bytes) -> asyncio.Future[None]:
            pending.append(asyncio.get_running_loop().create_future())  # never acknowledged
            return pending[-1]

        writer = PartialWriter(PartialSettings(), store, send, {"q": "p"}, metrics, 64)
        progress = writer.open("e1", "q", None, None)
        for piece in ("a", "b", "c"):
            progress.piece(piece)
            await writer.flush()
        assert len(pending) == 2 and len(store.batches) == 3
        assert sample(metrics, "streamer_partials_dropped_total", route="q", reason="kafka") == 1
        pending[0].set_result(None)
        await asyncio.sleep(0)
        progress.finish()
        await writer.flush()
        assert len(pending) == 3  # room again
    asyncio.run(scenario())
