"""The static front end of the model: concurrent callers are micro-batched onto one resident worker.

The event loop never runs the model: each batch crosses into a single worker thread (torch releases
the GIL while it computes), so Kafka polling and Redis writes go on while a batch generates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from streamer.batching.batcher import BatchRules, MicroBatcher
from streamer.engine.backend import BackendInfo, KVStats, stream_pieces
from streamer.engine.requests import Generated, GenRequest, GenResult, ScoreRequest
from streamer.engine.worker import LLMWorker
from streamer.lifecycle import AsyncLifecycle


@dataclass(frozen=True)
class _Queued:
    request: GenRequest | ScoreRequest
    submitted_s: float
    tokens: int
    on_piece: Callable[[str], None] | None = None


class StaticPool(AsyncLifecycle):
    """Micro-batched static batches of `generate` on one resident worker (models the engine cannot drive)."""

    def __init__(self, worker: LLMWorker, rules: BatchRules,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        """`on_batch(size, model_s)` hears of every batch the worker finished (metrics)."""
        self.worker = worker
        self._on_batch = on_batch
        self.inflight_tokens = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-worker")
        self._batcher: MicroBatcher[_Queued, Generated] = MicroBatcher(rules, self._run_batch)
        self._serving = False

    async def start(self) -> None:
        await self._batcher.start()
        self._serving = True

    async def aclose(self) -> None:
        """Finish everything queued, then release the worker thread."""
        self._serving = False
        await self._batcher.aclose()
        self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        """Whether it serves (readiness): from start to aclose. Nothing fails it in between: a batch
        that raises fails only its own callers, and the micro-batcher goes on with the next."""
        return self._serving

    @property
    def model_name(self) -> str:
        return self.worker.name

    @property
    def info(self) -> BackendInfo:
        return self.worker.info()

    def count_tokens(self, text: str) -> int:
        return self.worker.text_tokens(text)

    def kv_stats(self) -> KVStats | None:
        return None  # generate() keeps no cache between batches

    @property
    def depth(self) -> int:
        """Requests queued, not yet running."""
        return self._batcher.depth

    def free_slots(self) -> int:
        return self._batcher.free_slots()

    async def wait_for_room(self) -> None:
        await self._batcher.wait_for_room()

    def submit(self, request: GenRequest | ScoreRequest, deadline_ms: float | None = None,
               on_piece: Callable[[str], None] | None = None) -> asyncio.Future[Generated]:
        """Queue one request (raises QueueFull when there is no room: the caller pauses its input).
        `generate` cannot hand out tokens as it goes: `on_piece` hears the whole text once, when it is done.

        Generate and score requests share the queue; a mixed batch is split again by the worker.
        Static batches run in arrival order, so `deadline_ms` only matters to the continuous engine.
        """
        tokens = self.worker.prompt_tokens(request)
        future = self._batcher.put(_Queued(request, time.monotonic(), tokens, on_piece), tokens)
        self.inflight_tokens += tokens
        return future

    async def generate(self, request: GenRequest | ScoreRequest, deadline_ms: float | None = None) -> Generated:
        """Submit once there is room and wait for the result."""
        while self.free_slots() == 0:
            await self.wait_for_room()
        return await self.submit(request, deadline_ms)

    def stream(self, request: GenRequest, deadline_ms: float | None = None) -> AsyncIterator[str | Generated]:
        """The whole text in one piece, then the result."""
        return stream_pieces(self, request, deadline_ms)

    async def _run_batch(self, batch: list[_Queued]) -> list[Generated]:
        started_s = time.monotonic()
        requests = [q.request for q in batch]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self.worker.run, requests)
        finally:
            self.inflight_tokens -= sum(q.tokens for q in batch)
        model_ms = (time.monotonic() - started_s) * 1000
        if self._on_batch is not None:
            self._on_batch(len(batch), model_ms / 1000)
        for q, result in zip(batch, results, strict=True):
            if q.on_piece is not None and isinstance(result, GenResult) and result.error is None and result.text:
                q.on_piece(result.text)
        return [
            Generated(result, (started_s - q.submitted_s) * 1000, model_ms, len(batch))
            for q, result in zip(batch, results, strict=True)
        ]
