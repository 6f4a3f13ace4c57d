"""`OpenAIBackend`: the `Backend` that sends work to an OpenAI-compatible server.

The server batches; this side decides what goes and when. Queued requests go earliest deadline first,
within a budget of tokens in flight and under a concurrency limit that adapts to the server (limiter.py).
A failed call is classed (retry.py): a timeout, a lost connection, a 5xx or a 429/503 is tried again after
a jittered backoff, for as long as it takes, so no request fails because the server was away; consecutive
failures open the circuit (circuit.py), which stops admission (`free_slots()` 0: the consume loop pauses its
partitions) and turns readiness false until a probe finds the server back. A failure is the request's own
when the server answered other requests since its previous attempt began: those do not count towards the
circuit, and `max_request_failures` of them end the request with an error. A prompt over the server's
context, or another 4xx, is answered with an error and its dead-letter code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from tokenizers import Tokenizer

from streamer.config import OpenAISettings
from streamer.contracts import ErrorCode
from streamer.engine.backend import BackendInfo, BatcherClosed, KVStats, QueueFull, stream_pieces
from streamer.engine.openai import labels
from streamer.engine.openai.circuit import Circuit, CircuitState
from streamer.engine.openai.client import CallFailed, OpenAIClient
from streamer.engine.openai.limiter import ConcurrencyLimit
from streamer.engine.openai.retry import Backoff, Failure
from streamer.engine.openai.schedule import Schedule
from streamer.engine.openai.tokens import count
from streamer.engine.requests import Generated, GenRequest, GenResult, Request, Result, ScoreRequest, ScoreResult
from streamer.errors import StreamerError
from streamer.lifecycle import AsyncLifecycle

log = logging.getLogger(__name__)

_CHOICE_EXTRA_TOKENS = 8  # a constrained answer's quotes and end, beyond the longest label
_NAME_CHARS = 64  # of a response_format schema's name, the most OpenAI accepts
_NO_LOGPROBS_SWITCH = 5  # classify auto: answers in a row without log-probabilities before choice for good
# Failures that may be a request's own (its prompt crashes the server, or takes longer than read_timeout_s);
# a 429/503 or a refused key speaks of the server, never of one request.
_OWNABLE = (Failure.TIMEOUT, Failure.CONNECTION, Failure.SERVER)


class ServerRefused(StreamerError):
    """At start: the server refuses the API key or does not serve the model."""


class _Diverged(Exception):
    """A retried stream's answer does not begin with the text already streamed to the caller."""


class RemoteObserver(Protocol):
    """What the backend reports for metrics (observe.metrics.Metrics implements it); `server` is the base URL.
    The defaults report nowhere."""

    def remote_request(self, server: str, seconds: float) -> None:
        return None

    def remote_first_token(self, server: str, seconds: float) -> None:
        return None

    def remote_retry(self, server: str, cause: str) -> None:
        return None

    def remote_circuit(self, server: str, state: str) -> None:
        return None

    def remote_limit(self, server: str, limit: int) -> None:
        return None


class _Unobserved(RemoteObserver):
    """No metrics were asked for."""


@dataclass(eq=False)
class _Call:
    request: Request
    deadline_s: float
    submitted_s: float
    prompt_tokens: int
    tokens: int  # prompt and answer room: what it holds of the token budget
    future: asyncio.Future[Generated]
    on_piece: Callable[[str], None] | None = None  # a streaming caller's
    failures: int = 0
    own_failures: int = 0  # failures while the server answered other requests
    answers_before: int | None = None  # the server's answers when this request's previous attempt began
    shown: str = ""  # text already streamed to the caller: a retry's answer must begin with it


@dataclass(frozen=True)
class _Answer:
    result: Result
    first_token_s: float | None  # when the first piece of text arrived (generation)
    latency_s: float  # the congestion signal: to the first token, or of the whole (short) label answer


class OpenAIBackend(AsyncLifecycle):
    def __init__(self, settings: OpenAISettings, tokenizer: Tokenizer, max_queue: int, default_deadline_ms: float,
                 observer: RemoteObserver | None = None) -> None:
        assert settings.base_url is not None and settings.model is not None, "EngineSettings checks them"
        self.settings = settings
        self.max_queue = max_queue
        self.default_deadline_s = default_deadline_ms / 1000
        self.inflight_tokens = 0
        self.server = settings.base_url
        self._model = settings.model
        self._tokenizer = tokenizer
        self._observer: RemoteObserver = observer or _Unobserved()
        self._rng = random.Random()
        key = settings.api_key.get_secret_value() if settings.api_key else None
        self._client = OpenAIClient(settings.base_url, key, settings.connect_timeout_s, settings.read_timeout_s)
        self._limit = ConcurrencyLimit(settings.min_concurrency, settings.max_concurrency, settings.latency_tolerance)
        self._circuit = Circuit(settings.circuit_failures, settings.circuit_open_s)
        self._backoff = Backoff(settings.retry_base_s, settings.retry_max_s)
        self._schedule: Schedule[_Call] = Schedule(settings.max_inflight_tokens)
        self._classify = settings.classify
        self._without_logprobs = 0  # classify auto: answers in a row that had none
        self._answers = 0  # requests the server answered, the sign that it is there
        self._server_counts: bool | None = None  # has a tokenize endpoint; None: not known yet
        self._calls: set[_Call] = set()
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._closing = False

    # --- the Backend protocol ----------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(model=self._model, where=self.server)

    @property
    def alive(self) -> bool:
        """Ready while the circuit is closed: with it open, nothing would be answered."""
        return self._circuit.state is CircuitState.CLOSED

    @property
    def depth(self) -> int:
        """Requests not at the server yet (queued, or waiting out a backoff)."""
        return len(self._calls) - self._running

    @property
    def limit(self) -> int:
        """The adaptive concurrency limit now."""
        return self._limit.limit

    def count_tokens(self, text: str) -> int:
        return count(self._tokenizer, text)

    def free_slots(self) -> int:
        if self._circuit.state is not CircuitState.CLOSED:
            return 0
        return max(0, self.max_queue - len(self._calls))

    async def wait_for_room(self) -> None:
        while self.free_slots() <= 0:
            self._room.clear()
            await self._room.wait()

    def kv_stats(self) -> KVStats | None:
        return None

    def submit(self, request: Request, deadline_ms: float | None = None,
               on_piece: Callable[[str], None] | None = None) -> asyncio.Future[Generated]:
        """Queue one request (earliest deadline first). Raises QueueFull past max_queue or with the circuit open.
        `on_piece` hears the answer as the server streams it (see `Backend.submit`)."""
        return self._submit(request, deadline_ms, on_piece).future

    async def generate(self, request: Request, deadline_ms: float | None = None) -> Generated:
        await self.wait_for_room()
        return await self.submit(request, deadline_ms)

    def stream(self, request: GenRequest, deadline_ms: float | None = None) -> AsyncIterator[str | Generated]:
        """The answer in pieces as the server streams them, then the finished result."""
        return stream_pieces(self, request, deadline_ms)

    async def start(self) -> None:
        """Check the key and the model, then serve. A server that is away now only opens the circuit: the
        backend starts and waits for it, as it would for a server that went away later."""
        await self._client.open()
        try:
            await self._check_server()
        except CallFailed as failed:
            log.warning("%s is not answering (%s); waiting for it", self.server, failed)
            self._circuit.trip(time.monotonic())
        self._observer.remote_circuit(self.server, self._circuit.state.value)
        self._observer.remote_limit(self.server, self._limit.limit)
        self._dispatcher = asyncio.create_task(self._dispatch(), name="openai-dispatch")

    async def aclose(self) -> None:
        """Take no more requests, answer every one already taken, then close the connections."""
        self._closing = True
        self._wake.set()
        try:
            if self._dispatcher is not None:
                await self._dispatcher
        finally:  # cut off by a timeout or a cancel, the connections still close
            await self._client.close()

    # --- admission -------------------------------------------------------------------------------------

    def _submit(self, request: Request, deadline_ms: float | None, on_piece: Callable[[str], None] | None) -> _Call:
        if self._closing:
            raise BatcherClosed("the backend is closing; no new requests")
        if self._dispatcher is None:
            raise RuntimeError("OpenAIBackend.start() first")
        if self.free_slots() <= 0:
            raise QueueFull(f"{len(self._calls)} requests queued or running, circuit {self._circuit.state.value}")
        now = time.monotonic()
        prompt = self.count_tokens(_text(request))
        call = _Call(request, now + (deadline_ms / 1000 if deadline_ms is not None else self.default_deadline_s),
                     now, prompt, prompt + _answer_room(request, self.count_tokens),
                     asyncio.get_running_loop().create_future(), on_piece)
        self._calls.add(call)
        self.inflight_tokens += call.tokens
        if self._server_counts is False:
            self._queue(call)
        else:
            self._spawn(self._measure(call))
        return call

    async def _measure(self, call: _Call) -> None:
        """Count the prompt with the server's tokenizer where it has one, for the token budget; the local
        count stands when it has none or does not answer."""
        try:
            counted = await self._client.count_tokens(_text(call.request), self._model)
            self._server_counts = counted is not None
            if counted is not None:
                self.inflight_tokens += counted - call.prompt_tokens
                call.tokens += counted - call.prompt_tokens
                call.prompt_tokens = counted
        except Exception as exc:  # the count only sizes the budget: whatever goes wrong, the request goes on
            log.debug("no token count from %s: %r", self.server, exc)
        finally:  # a request never queued would never be answered
            self._queue(call)

    def _queue(self, call: _Call, not_before_s: float | None = None) -> None:
        self._schedule.add(call, call.deadline_s, call.tokens, not_before_s)
        self._wake.set()

    # --- dispatch --------------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Send what may go now, sleep until something changes or a backoff or the circuit's wait ends."""
        while not (self._closing and not self._calls):
            self._wake.clear()
            now = time.monotonic()
            if self._circuit.probe_due(now):
                self._spawn(self._probe())
            while self._may_send():
                call = self._schedule.take(now)
                if call is None:
                    break
                self._running += 1
                self._spawn(self._attempt(call))
            wake_at = [t for t in (self._schedule.next_due_s(), self._circuit.reopens_at()) if t is not None]
            timeout = max(0.0, min(wake_at) - now) if wake_at else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        await asyncio.gather(*self._tasks)

    def _may_send(self) -> bool:
        return self._circuit.state is CircuitState.CLOSED and self._running < self._limit.limit

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self) -> None:
        """Half-open: is the server back? The model list answers fast and proves the key too. Any error is a
        failed probe: one that escaped would leave the circuit half-open, and admission stopped, for ever."""
        try:
            await self._client.models()
        except Exception as exc:
            log.debug("probe of %s failed: %r", self.server, exc)
            cause = exc.failure if isinstance(exc, CallFailed) else Failure.SERVER
            self._observer.remote_retry(self.server, cause.value)
            self._circuit_failed()
        else:
            self._circuit_succeeded()
        finally:
            self._wake.set()

    async def _attempt(self, call: _Call) -> None:
        epoch = self._limit.epoch
        sent_s = time.monotonic()
        at_once = self._running
        answers_before = self._answers
        try:
            answer = await self._ask(call, sent_s)
        except CallFailed as failed:
            self._failed(call, failed, epoch, sent_s, answers_before)
        except _Diverged as diverged:  # the server answered: a stream that cannot be joined is this call's error
            self._circuit_succeeded()
            self._finish(call, _error(call.request, call.prompt_tokens, str(diverged)), sent_s, None, at_once)
        except Exception as exc:  # a bug or a malformed answer: this request's error, not a hang
            log.exception("request to %s failed", self.server)
            self._finish(call, _error(call.request, call.prompt_tokens, repr(exc)), sent_s, None, at_once)
        else:
            self._answers += 1
            self._circuit_succeeded()
            self._limit.succeeded(epoch, answer.latency_s)
            self._observer.remote_limit(self.server, self._limit.limit)
            self._observer.remote_request(self.server, time.monotonic() - sent_s)
            if answer.first_token_s is not None:
                self._observer.remote_first_token(self.server, answer.first_token_s - sent_s)
            self._finish(call, answer.result, sent_s, answer.first_token_s, at_once)
        finally:
            self._running -= 1
            self._schedule.done(call.tokens)
            self._wake.set()

    def _failed(self, call: _Call, failed: CallFailed, epoch: int, sent_s: float, answers_before: int) -> None:
        if not failed.failure.retried:  # the server answered, and this request is wrong for it
            self._circuit_succeeded()
            code = ErrorCode.CONTEXT_TOO_LONG if failed.failure is Failure.CONTEXT else None
            self._finish(call, _error(call.request, call.prompt_tokens, failed.detail, code), sent_s, None, 1)
            return
        own = self._own_failure(call, failed, answers_before)
        if call.own_failures >= self.settings.max_request_failures:
            detail = (f"{self.server} failed this request {call.own_failures} times while answering others; "
                      f"the last: {failed.detail}")
            self._finish(call, _error(call.request, call.prompt_tokens, detail), sent_s, None, 1)
            return
        log.debug("retrying a request to %s after %s", self.server, failed)
        self._observer.remote_retry(self.server, failed.failure.value)
        if failed.failure in (Failure.OVERLOADED, Failure.TIMEOUT):
            self._limit.congested(epoch)
            self._observer.remote_limit(self.server, self._limit.limit)
        if failed.failure.server_away and not own:  # one request the server fails does not make it away
            self._circuit_failed()
        call.failures += 1
        wait_s = self._backoff.wait_s(call.failures, self._rng, failed.retry_after_s)
        self._queue(call, time.monotonic() + wait_s)

    def _own_failure(self, call: _Call, failed: CallFailed, answers_before: int) -> bool:
        """Whether this failure is the request's own, counted in `call.own_failures`: the server answered other
        requests since the request's previous attempt began (this attempt's, for the first), so it is there and
        fails this one. Without such answers it may be away, and nothing is held against the request."""
        since = answers_before if call.answers_before is None else call.answers_before
        call.answers_before = answers_before
        own = failed.failure in _OWNABLE and self._answers > since
        if own:
            call.own_failures += 1
        return own

    def _circuit_failed(self) -> None:
        was = self._circuit.state
        self._circuit.failed(time.monotonic())
        if self._circuit.state is not was:
            log.warning("%s is away: circuit %s, admission stopped", self.server, self._circuit.state.value)
            self._observer.remote_circuit(self.server, self._circuit.state.value)

    def _circuit_succeeded(self) -> None:
        reopened = self._circuit.state is not CircuitState.CLOSED
        self._circuit.succeeded()
        if reopened:
            log.warning("%s answers again: circuit closed", self.server)
            self._observer.remote_circuit(self.server, self._circuit.state.value)
            self._schedule.ready_all()
            self._room.set()

    def _finish(self, call: _Call, result: Result, sent_s: float, first_token_s: float | None, at_once: int) -> None:
        now = time.monotonic()
        self._calls.discard(call)
        self.inflight_tokens -= call.tokens
        self._room.set()
        if not call.future.done():
            call.future.set_result(Generated(
                result=result, queued_ms=(sent_s - call.submitted_s) * 1000, model_ms=(now - sent_s) * 1000,
                batch_size=max(1, at_once),
                first_token_ms=None if first_token_s is None else (first_token_s - call.submitted_s) * 1000))

    # --- the calls -------------------------------------------------------------------------------------

    async def _ask(self, call: _Call, sent_s: float) -> _Answer:
        if isinstance(call.request, ScoreRequest):
            return await self._score(call.request, call.prompt_tokens, sent_s)
        return await self._generate(call, call.request, sent_s)

    async def _generate(self, call: _Call, request: GenRequest, sent_s: float) -> _Answer:
        """Streamed even for a caller that does not stream: the first token's time is the congestion signal,
        and a stalled server is noticed between pieces."""
        body: dict[str, Any] = {"model": self._model, "messages": list(request.messages),
                                "max_tokens": request.max_new_tokens, "temperature": request.temperature}
        if request.ignore_eos:
            body["ignore_eos"] = True  # llama.cpp and vLLM
        if request.schema is not None:  # the answer is parsed and checked again on arrival (tasks.event)
            body["response_format"] = schema_format(request.schema)
        text, pieces, usage, first_s = "", 0, None, None
        async for event in self._client.stream(body):
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first_s = first_s or time.monotonic()
                    text, pieces = text + piece, pieces + 1
                    self._show(call, text)
        if not text.lstrip().startswith(call.shown):
            raise _Diverged(f"a retry's answer {text[:200]!r} ended inside the text already streamed")
        shown = text.strip()
        tokens_in = int(usage["prompt_tokens"]) if usage else call.prompt_tokens
        tokens_out = int(usage["completion_tokens"]) if usage else pieces
        latency = (first_s or time.monotonic()) - sent_s
        return _Answer(GenResult(shown, tokens_in, tokens_out), first_s, latency)

    def _show(self, call: _Call, text: str) -> None:
        """Stream what the caller has not seen yet (stripped at the start, like the final text). A retry's
        answer is streamed only where it goes on from what was shown, so the pieces always join to the final
        text; one that differs (sampling, a batch-dependent server) ends the call: `_Diverged`."""
        now = text.lstrip()
        if call.on_piece is None or call.shown.startswith(now):
            return
        if not now.startswith(call.shown):
            raise _Diverged(f"a retry's answer {now[:200]!r} differs from the text already streamed "
                            f"{call.shown[:200]!r}")
        call.on_piece(now[len(call.shown):])
        call.shown = now

    async def _score(self, request: ScoreRequest, prompt_tokens: int, sent_s: float) -> _Answer:
        base = {"model": self._model, "messages": list(request.messages), "temperature": 0.0}
        if self._classify != "choice":
            completion = await self._client.complete(
                {**base, "max_tokens": 1, "logprobs": True, "top_logprobs": labels.TOP_LOGPROBS})
            top = labels.top_logprobs(completion)
            self._note_logprobs(top is not None)
            scores = labels.scores_by_first_token(top or [], request.labels)
            if scores is not None:
                best = max(scores, key=scores.__getitem__)
                tokens_in = _usage(completion, "prompt_tokens", prompt_tokens)
                return _Answer(ScoreResult(best, scores, tokens_in), None, time.monotonic() - sent_s)
        completion = await self._client.complete(
            {**base, "max_tokens": _answer_room(request, self.count_tokens),
             "response_format": labels.choice_format(request.labels)})
        text = str(completion["choices"][0]["message"].get("content") or "")
        tokens_in = _usage(completion, "prompt_tokens", prompt_tokens)
        label = labels.chosen_label(text, request.labels)
        if label is None:
            return _Answer(ScoreResult("", {}, tokens_in, error=f"{self.server} answered {text[:200]!r}, "
                                       f"not one of the labels {list(request.labels)}"),
                           None, time.monotonic() - sent_s)
        scores = {other: 0.0 if other == label else labels.UNRANKED for other in request.labels}
        return _Answer(ScoreResult(label, scores, tokens_in), None, time.monotonic() - sent_s)

    def _note_logprobs(self, returned: bool) -> None:
        """classify auto: choice for good only after `_NO_LOGPROBS_SWITCH` answers in a row without
        log-probabilities. A single one (a gateway's odd answer, a server restarting) costs only its own request
        a second, constrained completion; switching on it would lose real scores for the process's life."""
        if self._classify != "auto":
            return
        self._without_logprobs = 0 if returned else self._without_logprobs + 1
        if self._without_logprobs >= _NO_LOGPROBS_SWITCH:
            log.info("%s returns no log-probabilities: classifying by constrained choice", self.server)
            self._classify = "choice"

    async def _check_server(self) -> None:
        try:
            served = await self._client.models()
        except CallFailed as failed:
            if failed.failure is Failure.AUTH:
                raise ServerRefused(f"{self.server} refused the API key (engine.openai.api_key): {failed.detail}"
                                    ) from None
            raise
        if self._model not in served:
            raise ServerRefused(f"{self.server} does not serve model {self._model!r} (engine.openai.model); "
                                f"it lists {served}")


def schema_format(schema: str) -> dict[str, Any]:
    """The response_format that holds the server to a JSON Schema (given as JSON text): OpenAI's `json_schema`
    form, which vLLM, SGLang and llama.cpp's llama-server accept too. A server that ignores it answers in free
    text, which the task's check on arrival dead-letters (`invalid_output`) rather than passing it on."""
    parsed = json.loads(schema)
    return {"type": "json_schema",
            "json_schema": {"name": _schema_name(parsed), "schema": parsed, "strict": True}}


def _schema_name(schema: Any) -> str:
    """The schema's `$id` or `title` as OpenAI accepts a name (`^[a-zA-Z0-9_-]{1,64}$`), else "extract"."""
    named = next((schema[key] for key in ("$id", "title") if isinstance(schema, dict)
                  and isinstance(schema.get(key), str)), "")
    return re.sub(r"[^A-Za-z0-9_-]+", "_", named).strip("_")[:_NAME_CHARS] or "extract"


def _text(request: Request) -> str:
    """What the token count is taken of: the messages' contents (the chat template adds a few tokens)."""
    return "\n".join(message.get("content", "") for message in request.messages)


def _answer_room(request: Request, label_tokens: Callable[[str], int]) -> int:
    if isinstance(request, ScoreRequest):
        return max(map(label_tokens, request.labels)) + _CHOICE_EXTRA_TOKENS
    return request.max_new_tokens


def _usage(completion: dict[str, Any], key: str, default: int) -> int:
    usage = completion.get("usage") or {}
    return int(usage.get(key, default))


def _error(request: Request, tokens_in: int, detail: str, code: str | None = None) -> Result:
    if isinstance(request, ScoreRequest):
        return ScoreResult("", {}, tokens_in, error=detail, error_code=code)
    return GenResult("", tokens_in, 0, error=detail, error_code=code)
