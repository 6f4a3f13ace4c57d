"""The public Python API: `async with LLMPool.from_settings() as llm: await llm.generate("Hi")`.

A thin facade over one `Backend` (streamer/engine/backend.py): the continuous engine, static
micro-batches, or a remote OpenAI-compatible server. Concurrent `generate`/`classify`/`summarize` calls on
one facade share that backend, so they are batched together exactly like the Kafka pipeline's events.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from streamer.config import BatchingSettings, EngineSettings, ModelSettings
from streamer.engine.backend import Backend, Broken
from streamer.engine.requests import Generated, GenRequest, GenResult, ScoreRequest, ScoreResult
from streamer.errors import StreamerError
from streamer.lifecycle import AsyncLifecycle
from streamer.tasks.prompts import Messages, classify_messages, summarize_messages

if TYPE_CHECKING:
    from streamer.engine.worker import LLMWorker

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
    """One model behind a backend (continuous engine, static micro-batches or a remote server); `async with pool:`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._started = False

    @classmethod
    def resident(cls, worker: LLMWorker, batching: BatchingSettings | None = None,
                 engine: EngineSettings | None = None, *,
                 on_batch: Callable[[int, float], None] | None = None) -> LLMPool:
        """Over an already loaded worker (tests and the server share one); `on_batch(size, model_s)` as the engine's."""
        from streamer.engine.build import build_pool  # torch: only for a model in this process

        return cls(build_pool(worker, batching or BatchingSettings(), engine or EngineSettings(), on_batch))

    @classmethod
    def from_settings(cls, model: ModelSettings | None = None, batching: BatchingSettings | None = None,
                      engine: EngineSettings | None = None, *,
                      on_batch: Callable[[int, float], None] | None = None) -> LLMPool:
        """Load and warm the model, or connect to the server (blocking: call it before serving)."""
        from streamer.engine.load import load_backend  # loads torch and the model: only when asked

        return cls(load_backend(model or ModelSettings(), batching or BatchingSettings(), engine or EngineSettings(),
                                on_batch))

    @property
    def model(self) -> str:
        return self.backend.model_name

    async def start(self) -> None:
        await self.backend.start()
        self._started = True

    async def aclose(self) -> None:
        """Finish every queued call, then release the backend."""
        await self.backend.aclose()

    async def generate(self, prompt: Prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                       deadline_ms: float | None = None) -> Completion:
        """Chat completion of `prompt`; temperature 0 is greedy (deterministic)."""
        request = GenRequest(to_messages(prompt), max_new_tokens=max_new_tokens, temperature=temperature)
        return await self._complete(request, deadline_ms)

    async def stream(self, prompt: Prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                     deadline_ms: float | None = None) -> AsyncIterator[str | Completion]:
        """`generate`, but the text arrives in pieces as the backend produces it, then the Completion.

        A backend that cannot stream (static micro-batches) yields the whole text in one piece. A stream that
        broke (`Broken`: the text shown does not lead to the answer) raises GenerationError, as a stream must
        join to its text.
        """
        started_s = time.monotonic()
        request = GenRequest(to_messages(prompt), max_new_tokens=max_new_tokens, temperature=temperature)
        self._check_started()
        async for item in self.backend.stream(request, deadline_ms):
            if isinstance(item, Broken):
                raise GenerationError("the model's stream broke: a retry sampled other text than was shown")
            if isinstance(item, str):
                yield item
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
        done = await self.backend.generate(request, deadline_ms)
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
