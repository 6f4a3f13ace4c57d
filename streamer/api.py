"""The public Python API: `async with LLMPool.from_settings() as llm: await llm.generate("Hi")`.

A thin facade over the engine's pool (`streamer.engine.pool.LLMPool`), which does the micro-batching:
concurrent `generate`/`classify`/`summarize` calls on one facade share one engine pool, so they are
batched together exactly like the Kafka pipeline's events. It keeps the engine's name because the
issue asks for `from streamer import LLMPool` and, for a user, this *is* the pool; inside streamer the
engine class stays importable as `streamer.engine.pool.LLMPool`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from streamer.config import BatchingSettings, EngineSettings, ModelSettings
from streamer.engine.build import build_pool
from streamer.engine.continuous import ContinuousPool
from streamer.engine.requests import Generated, GenRequest, GenResult, ScoreRequest, ScoreResult
from streamer.engine.worker import LLMWorker
from streamer.errors import StreamerError
from streamer.lifecycle import AsyncLifecycle
from streamer.tasks.prompts import Messages, classify_messages, summarize_messages

Prompt = str | Sequence[Mapping[str, str]]
"""A bare prompt (sent as one user message) or chat messages ({"role": ..., "content": ...})."""

_ROLES = frozenset({"system", "user", "assistant"})


class GenerationError(StreamerError):
    """The model failed on this request even when run alone (the worker isolates bad requests)."""


class PoolNotStarted(StreamerError):
    """A call before `async with pool:` / `await pool.start()`: it would otherwise wait forever."""


@dataclass(frozen=True)
class Completion:
    """Generated text and where its time went.

    finish_reason is "length" when max_new_tokens cut the text, else "stop" (the model ended it).
    deadline_missed says whether latency exceeded the call's deadline_ms; the answer is still
    returned, since a running batch cannot drop one row and the work is already paid for.
    """

    text: str
    tokens_in: int
    tokens_out: int
    queued_ms: float
    latency_ms: float
    model: str
    deadline_missed: bool = False
    finish_reason: Literal["stop", "length"] = "stop"
    batch_size: int = 1


@dataclass(frozen=True)
class Classification:
    """The best label and each label's log-likelihood score (higher is likelier)."""

    label: str
    scores: dict[str, float]
    latency_ms: float


class LLMPool(AsyncLifecycle):
    """One resident model behind the continuous-batching engine (or static micro-batches); `async with pool:`."""

    def __init__(self, worker: LLMWorker, batching: BatchingSettings | None = None,
                 engine: EngineSettings | None = None, *,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        """Wrap an already loaded worker (tests and the server share one); `on_batch(size, model_s)` as the engine's."""
        self.engine = build_pool(worker, batching or BatchingSettings(), engine or EngineSettings(), on_batch)
        self._started = False

    @classmethod
    def from_settings(cls, model: ModelSettings | None = None, batching: BatchingSettings | None = None,
                      engine: EngineSettings | None = None, *,
                      on_batch: Callable[[int, float], None] | None = None) -> LLMPool:
        """Load and warm the model (blocking: seconds from the local cache; call it before serving)."""
        from streamer.runtime import load_worker  # heavy (Kafka, Redis helpers): only when loading

        return cls(load_worker(model or ModelSettings(), engine), batching, engine, on_batch=on_batch)

    @property
    def model(self) -> str:
        return self.engine.worker.name

    async def start(self) -> None:
        await self.engine.start()
        self._started = True

    async def aclose(self) -> None:
        """Finish every queued call, then release the worker thread."""
        await self.engine.aclose()

    async def generate(self, prompt: Prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                       deadline_ms: float | None = None) -> Completion:
        """Chat completion of `prompt`; temperature 0 is greedy (deterministic)."""
        request = GenRequest(to_messages(prompt), max_new_tokens=max_new_tokens, temperature=temperature)
        return await self._complete(request, deadline_ms)

    async def stream(self, prompt: Prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                     deadline_ms: float | None = None) -> AsyncIterator[str | Completion]:
        """`generate`, but the text arrives in pieces as the engine samples tokens, then the Completion.

        The static pool (models the engine cannot drive) yields the whole text in one piece.
        """
        started_s = time.monotonic()
        request = GenRequest(to_messages(prompt), max_new_tokens=max_new_tokens, temperature=temperature)
        self._check_started()
        if not isinstance(self.engine, ContinuousPool):
            done = await self._complete(request, deadline_ms)
            yield done.text
            yield done
            return
        tokens: list[int] = []
        sent = ""
        async for item in self.engine.stream(request, deadline_ms):
            if isinstance(item, int):
                tokens.append(item)
                # Stripped like the final text; a split multi-byte character waits for its other bytes.
                text = self.engine.worker.decode(tokens)
                if len(text) > len(sent) and text.startswith(sent) and not text.endswith("\ufffd"):
                    yield text[len(sent) :]
                    sent = text
            else:
                yield self._completion(request, item, started_s, deadline_ms)

    async def classify(self, text: str, labels: Sequence[str], system_prompt: str | None = None) -> Classification:
        """Pick one of `labels` by log-likelihood: always a label, never free text, independent of sampling."""
        started_s = time.monotonic()
        request = ScoreRequest(classify_messages(text, labels, system_prompt), tuple(labels))
        result = (await self._run(request)).result
        assert isinstance(result, ScoreResult)
        return Classification(result.label, result.scores, _ms_since(started_s))

    async def summarize(self, texts: Sequence[str], max_new_tokens: int = 96,
                        deadline_ms: float | None = None) -> Completion:
        """A short summary of chronological messages (the window summariser's prompt)."""
        if not texts:
            raise ValueError("summarize needs at least one text")
        request = GenRequest(summarize_messages(list(texts)), max_new_tokens=max_new_tokens)
        return await self._complete(request, deadline_ms)

    async def _complete(self, request: GenRequest, deadline_ms: float | None) -> Completion:
        started_s = time.monotonic()
        return self._completion(request, await self._run(request, deadline_ms), started_s, deadline_ms)

    def _completion(self, request: GenRequest, done: Generated, started_s: float,
                    deadline_ms: float | None) -> Completion:
        result = done.result
        if result.error is not None:
            raise GenerationError(result.error)
        assert isinstance(result, GenResult)
        latency_ms = _ms_since(started_s)
        return Completion(
            text=result.text,
            tokens_in=result.tokens_in,
            tokens_out=result.tokens_out,
            queued_ms=done.queued_ms,
            latency_ms=latency_ms,
            model=self.model,
            deadline_missed=deadline_ms is not None and latency_ms > deadline_ms,
            finish_reason="length" if result.tokens_out >= request.max_new_tokens else "stop",
            batch_size=done.batch_size,
        )

    async def _run(self, request: GenRequest | ScoreRequest, deadline_ms: float | None = None) -> Generated:
        self._check_started()
        done = await self.engine.generate(request, deadline_ms)
        if done.result.error is not None:
            raise GenerationError(done.result.error)
        return done

    def _check_started(self) -> None:
        if not self._started:
            raise PoolNotStarted("start the pool first: `async with pool:` or `await pool.start()`")


def to_messages(prompt: Prompt) -> Messages:
    """Validate chat messages into the worker's shape; a bare string becomes one user message."""
    if isinstance(prompt, str):
        return ({"role": "user", "content": prompt},)
    messages = tuple({"role": m.get("role"), "content": m.get("content")} for m in prompt)
    if not messages:
        raise ValueError("messages must not be empty")
    for m in messages:
        if m["role"] not in _ROLES or not isinstance(m["content"], str):
            raise ValueError(f"a message needs a role in {sorted(_ROLES)} and string content, got {m!r}")
    return messages  # type: ignore[return-value]  # checked above: every value is a str


def _ms_since(started_s: float) -> float:
    return (time.monotonic() - started_s) * 1000
