"""An OpenAI-compatible HTTP API over one `streamer.LLMPool`, so OpenAI clients and tools work unchanged.

POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET /v1/models. Every HTTP
request becomes a call on the shared pool, so concurrent requests are batched together.

Differences from OpenAI, on purpose or for now:
- Streaming sends text as the continuous-batching engine samples it (a piece per token, held back only
  while it could be the start of a `stop` sequence); on the static-batch fallback the whole text
  arrives in one piece when its batch ends.
- /v1/completions runs the prompt through the model's chat template as one user message: the worker
  only does chat, and a raw-continuation path would bypass the batcher.
- `model` is required but not checked: there is one model, named in every response.
- `stop` cuts the text; generation of that request runs on to its limit, and usage counts every token.
- Unknown parameters (top_p, seed, user, ...) are accepted and ignored, as many clients send them;
  parameters whose meaning we cannot honour (n > 1, echo) are rejected with a 400.

With an API key (`streamer serve --api-key`), every /v1 route asks for `Authorization: Bearer <key>`, as
OpenAI does. Each prompt and message text is capped at `limits.max_chars`, and a /v1/completions request
at `limits.max_prompts` prompts, so one request cannot take the whole batcher.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamer.api import Completion, GenerationError, LLMPool
from streamer.config import LimitsSettings
from streamer.observe.http import bearer, same_secret

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy /v1/completions


# --- requests -------------------------------------------------------------------------------------


class _Request(BaseModel):
    """Requests ignore unknown fields: clients send many optional parameters we do not use."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_worker_message(self) -> dict[str, str]:
        """`developer` is OpenAI's newer name for the system turn; text parts are joined."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class _Generation(_Request):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, description="OpenAI's default; 0 is greedy")
    n: Literal[1] = Field(1, description="one choice per prompt")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")


class CompletionRequest(_Generation):
    prompt: str | list[str] = Field(description="a list gives one choice per prompt, generated as one batch")
    echo: Literal[False] = False

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


# --- responses ------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, completions: Sequence[Completion]) -> Usage:
        prompt = sum(c.tokens_in for c in completions)
        generated = sum(c.tokens_out for c in completions)
        return cls(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class TextCompletionResponse(BaseModel):
    """Both the whole /v1/completions answer and each of its stream chunks (OpenAI uses one shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "streamer"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code))

    def response(self) -> web.Response:
        return web.json_response(text=self.body.model_dump_json(), status=self.status)


def invalid_request(exc: ValidationError) -> APIError:
    """One 400 naming every bad field (`messages.0.role: Input should be ...`); param is the first."""
    fields = [".".join(str(p) for p in e["loc"]) or "body" for e in exc.errors()]
    message = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields, exc.errors(), strict=True))
    return APIError(400, message, param=fields[0] if fields else None)


def apply_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut the text before the earliest stop sequence; True when one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StopScanner:
    """Streams text while watching for stop sequences that may span pieces.

    The last len(longest stop) - 1 characters are held back, since they could be the start of a stop.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Text safe to send now, and whether a stop sequence ended the answer."""
        self.pending += piece
        text, stopped = apply_stop(self.pending, self.stops)
        if stopped:
            self.pending = ""
            return text, True
        cut = len(self.pending) - self.hold
        if cut <= 0:
            return "", False
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


# --- routes ---------------------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Routes:
    """The handlers, bound to one pool, its limits and API key (no module state, so apps can coexist)."""

    def __init__(self, api: LLMPool, limits: LimitsSettings, api_key: str | None) -> None:
        self.api = api
        self.limits = limits
        self.api_key = api_key
        self.created = int(time.time())

    def guard(self, handler: Handler) -> Handler:
        """`handler` for callers with the API key (all callers when there is none)."""
        key = self.api_key
        if not key:
            return handler

        async def guarded(request: web.Request) -> web.StreamResponse:
            given = bearer(request)
            if not same_secret(given, key):
                message = "incorrect API key" if given else "no API key: send Authorization: Bearer <key>"
                response = APIError(401, message, code="invalid_api_key").response()
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
            return await handler(request)

        return guarded

    def _check_text(self, text: str, param: str) -> None:
        cap = self.limits.max_chars
        if len(text) > cap:
            raise APIError(400, f"{param} is {len(text)} characters; this server allows at most {cap} characters",
                           param=param)

    def _check_prompts(self, req: CompletionRequest) -> None:
        prompts, cap = req.prompts, self.limits.max_prompts
        if len(prompts) > cap:
            raise APIError(400, f"prompt has {len(prompts)} prompts; this server allows at most {cap} prompts per "
                           "request", param="prompt")
        for i, prompt in enumerate(prompts):
            self._check_text(prompt, "prompt" if isinstance(req.prompt, str) else f"prompt.{i}")

    async def models(self, _: web.Request) -> web.Response:
        body = ModelList(data=[ModelCard(id=self.api.model, created=self.created)])
        return web.json_response(text=body.model_dump_json())

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await _parse(request, ChatCompletionRequest)
            max_new = self._max_tokens(req.max_completion_tokens or req.max_tokens, self.limits.max_new_tokens)
            messages = [m.as_worker_message() for m in req.messages]
            for i, message in enumerate(messages):
                self._check_text(message["content"], f"messages.{i}.content")
            if req.stream:
                return await self._stream_chat(request, req, messages, max_new)
            done = await self._generate([messages], req, max_new)
        except APIError as exc:
            return exc.response()
        [(completion, text, finish)] = done
        body = ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.api.model,
            usage=Usage.of([completion]),
            choices=[ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=finish)],
        )
        return web.json_response(text=body.model_dump_json())

    async def _stream_chat(self, request: web.Request, req: ChatCompletionRequest, messages: list[dict[str, str]],
                           max_new: int) -> web.StreamResponse:
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: ChunkDelta, finish_reason: FinishReason | None = None) -> ChatCompletionChunk:
            choice = ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)
            return ChatCompletionChunk(id=ident, created=created, model=self.api.model, choices=[choice])

        events = _Events(request)
        await events.send(chunk(ChunkDelta(role="assistant", content="")))
        done: Completion | None = None
        try:
            async for piece, finish, completion in self._pieces(messages, req, max_new):
                await events.send(chunk(ChunkDelta(content=piece) if piece else ChunkDelta(), finish))
                done = completion or done
        except APIError as exc:
            await events.send(exc.body)
            return await events.close()
        if req.include_usage and done is not None:
            await events.send(ChatCompletionChunk(id=ident, created=created, model=self.api.model, choices=[],
                                                  usage=Usage.of([done])))
        return await events.close()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await _parse(request, CompletionRequest)
            self._check_prompts(req)
            max_new = self._max_tokens(req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)
            chats = [[{"role": "user", "content": p}] for p in req.prompts]
            if req.stream:
                return await self._stream_completions(request, req, chats, max_new)
            done = await self._generate(chats, req, max_new)
        except APIError as exc:
            return exc.response()
        choices = [TextChoice(index=i, text=text, finish_reason=finish) for i, (_, text, finish) in enumerate(done)]
        body = TextCompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.api.model,
                                      choices=choices, usage=Usage.of([c for c, _, _ in done]))
        return web.json_response(text=body.model_dump_json())

    async def _stream_completions(self, request: web.Request, req: CompletionRequest,
                                  chats: list[list[dict[str, str]]], max_new: int) -> web.StreamResponse:
        """Every prompt streams at once (they share the engine's steps); chunks interleave, tagged by index."""
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        events = _Events(request)
        queue: asyncio.Queue[TextCompletionResponse | APIError | None] = asyncio.Queue()
        completions: list[Completion] = []

        async def one(index: int, chat: list[dict[str, str]]) -> None:
            try:
                async for piece, finish, completion in self._pieces(chat, req, max_new):
                    choice = TextChoice(index=index, text=piece, finish_reason=finish)
                    await queue.put(TextCompletionResponse(id=ident, created=created, model=self.api.model,
                                                           choices=[choice]))
                    if completion is not None:
                        completions.append(completion)
            except APIError as exc:
                await queue.put(exc)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(one(i, chat)) for i, chat in enumerate(chats)]
        open_streams = len(tasks)
        while open_streams:
            item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, APIError):
                await events.send(item.body)
            else:
                await events.send(item)
        await asyncio.gather(*tasks)
        if req.include_usage and len(completions) == len(chats):
            await events.send(TextCompletionResponse(id=ident, created=created, model=self.api.model, choices=[],
                                                     usage=Usage.of(completions)))
        return await events.close()

    async def _pieces(self, chat: list[dict[str, str]], req: _Generation,
                      max_new: int) -> AsyncIterator[tuple[str, FinishReason | None, Completion | None]]:
        """(text, None, None) pieces as they are generated, then ("", finish_reason, completion) once.

        Text that could begin a stop sequence is held back until it cannot; after a stop the rest of
        the generation is drained unseen, so usage still has every token.
        """
        scanner = StopScanner(req.stops)
        stopped = False
        try:
            async for item in self.api.stream(chat, max_new_tokens=max_new, temperature=req.temperature):
                if isinstance(item, Completion):
                    if not stopped:
                        rest = scanner.flush()
                        if rest:
                            yield rest, None, None
                    yield "", "stop" if stopped else item.finish_reason, item
                    return
                if stopped:
                    continue
                text, stopped = scanner.feed(item)
                if text:
                    yield text, None, None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        except GenerationError as exc:
            log.warning("generation failed: %s", exc)
            raise APIError(500, f"the model failed on this request: {exc}", type_="server_error") from None

    def _max_tokens(self, asked: int | None, default: int) -> int:
        cap = self.limits.max_new_tokens
        if asked is not None and asked > cap:
            raise APIError(400, f"max_tokens is {asked}; this server allows at most {cap}", param="max_tokens")
        return asked or min(default, cap)

    async def _generate(self, chats: list[list[dict[str, str]]], req: _Generation,
                        max_new: int) -> list[tuple[Completion, str, FinishReason]]:
        """Run every chat concurrently (one batch), then apply `stop`."""
        try:
            completions = await asyncio.gather(
                *(self.api.generate(chat, max_new_tokens=max_new, temperature=req.temperature) for chat in chats)
            )
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        except GenerationError as exc:
            log.warning("generation failed: %s", exc)
            raise APIError(500, f"the model failed on this request: {exc}", type_="server_error") from None
        done: list[tuple[Completion, str, FinishReason]] = []
        for completion in completions:
            text, stopped = apply_stop(completion.text, req.stops)
            done.append((completion, text, "stop" if stopped else completion.finish_reason))
        return done


async def _parse(request: web.Request, model: type[M]) -> M:
    try:
        return model.model_validate_json(await request.read())
    except ValidationError as exc:
        raise invalid_request(exc) from None


class _Events:
    """A server-sent-event response, opened on the first chunk, closed by `data: [DONE]` as OpenAI does."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

    async def send(self, chunk: BaseModel) -> None:
        if not self.response.prepared:
            await self.response.prepare(self.request)
        await self.response.write(f"data: {chunk.model_dump_json()}\n\n".encode())

    async def close(self) -> web.StreamResponse:
        if not self.response.prepared:
            await self.response.prepare(self.request)
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response


def add_openai_routes(app: web.Application, api: LLMPool, limits: LimitsSettings | None = None, *,
                      api_key: str | None = None) -> None:
    """Add the /v1 routes to an app (e.g. the service's metrics app); `api` must be started to answer.
    `api_key`: the bearer token every route asks for; None or empty: none."""
    routes = _Routes(api, limits or LimitsSettings(), api_key)
    app.router.add_get("/v1/models", routes.guard(routes.models))
    app.router.add_post("/v1/chat/completions", routes.guard(routes.chat))
    app.router.add_post("/v1/completions", routes.guard(routes.completions))


async def start_server(api: LLMPool, host: str, port: int, limits: LimitsSettings | None = None, *,
                       api_key: str | None = None) -> web.AppRunner:
    """Listen on host:port (0 picks a free port); `await runner.cleanup()` stops. Does not start `api`."""
    app = web.Application()
    add_openai_routes(app, api, limits, api_key=api_key)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = runner.addresses[0][1]
    log.info("OpenAI-compatible API on http://%s:%d/v1 (model %s)", host, bound, api.model)
    return runner


async def run_server(api: LLMPool, host: str, port: int, limits: LimitsSettings | None = None,
                     stop: asyncio.Event | None = None, *, api_key: str | None = None) -> None:
    """Start the pool and serve until `stop` is set or the task is cancelled; queued calls finish first."""
    async with api:
        runner = await start_server(api, host, port, limits, api_key=api_key)
        try:
            await (stop or asyncio.Event()).wait()
        finally:
            await runner.cleanup()
