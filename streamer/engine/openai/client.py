"""The HTTP calls to an OpenAI-compatible server, each failure turned into a `CallFailed` with its class.

Chat completions (whole, or streamed as server-sent events), the model list, and the tokenize endpoint
that llama.cpp and vLLM serve at the server's root. Nothing here retries or decides: the backend does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from streamer.engine.openai.retry import Failure, classify_status, retry_after_s

_BODY_CHARS = 500  # of an error answer, kept in the failure's detail
_NO_ENDPOINT = (404, 405, 501)
# What reading an answer may raise: the transport's errors, and a body that is not UTF-8 (UnicodeDecodeError),
# not JSON (a ValueError) or JSON nested too deep to parse (RecursionError). Each is a CallFailed, never a crash.
_UNUSABLE = (TimeoutError, aiohttp.ClientError, ValueError, RecursionError)


class CallFailed(Exception):
    """A call that got no usable answer: its class, the HTTP status if one came, the server's Retry-After."""

    def __init__(self, failure: Failure, detail: str, retry_after_s: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(f"{failure.value}: {detail}")
        self.failure = failure
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.status = status


Json = dict[str, Any]


class OpenAIClient:
    """One connection pool to one server; `open` before the first call, `close` after the last."""

    def __init__(self, base_url: str, api_key: str | None, connect_timeout_s: float, read_timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url.removesuffix("/v1")  # llama.cpp and vLLM serve /tokenize here
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        self._quick = aiohttp.ClientTimeout(total=connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout,
                                                  connector=aiohttp.TCPConnector(limit=0))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def models(self) -> list[str]:
        """The ids (and llama.cpp's aliases) of the models the server lists."""
        listed = await self._json("GET", f"{self.base_url}/models", None, self._quick)
        return _model_names(listed)

    async def complete(self, body: Mapping[str, Any]) -> Json:
        """One chat completion, answered whole."""
        return await self._json("POST", f"{self.base_url}/chat/completions", {**body, "stream": False}, None)

    async def stream(self, body: Mapping[str, Any]) -> AsyncIterator[Json]:
        """One chat completion as it is generated: every event's JSON, the usage in the last."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        session = self._open_session()
        finished = False  # a finish_reason or the usage came: a clean end without [DONE] is complete too
        try:
            async with session.post(f"{self.base_url}/chat/completions", json=body) as response:
                await _raise_for_status(response)
                async for line in response.content:
                    data = line.decode().strip()
                    if not data.startswith("data:"):
                        continue
                    data = data.removeprefix("data:").strip()
                    if data == "[DONE]":
                        return
                    event = _stream_event(data)
                    finished = finished or _final(event)
                    yield event
        except _UNUSABLE as exc:
            raise _transport_failure(exc) from exc
        if not finished:
            raise CallFailed(Failure.CONNECTION, "the stream ended before its finish_reason")

    async def count_tokens(self, text: str, model: str) -> int | None:
        """Tokens of `text` by the server's own tokenizer; None where the server has no tokenize endpoint."""
        # llama.cpp reads "content", vLLM "model" and "prompt"; each ignores the other's fields.
        body = {"content": text, "prompt": text, "model": model, "add_special": False}
        try:
            answer = await self._json("POST", f"{self.root_url}/tokenize", body, self._quick)
        except CallFailed as failed:
            if failed.status in _NO_ENDPOINT:
                return None
            raise
        if isinstance(answer.get("count"), int):
            return int(answer["count"])
        tokens = answer.get("tokens")
        return len(tokens) if isinstance(tokens, list) else None

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("OpenAIClient.open() first")
        return self._session

    async def _json(self, method: str, url: str, body: Mapping[str, Any] | None,
                    timeout: aiohttp.ClientTimeout | None) -> Json:
        session = self._open_session()
        try:
            async with session.request(method, url, json=body, timeout=timeout or self._timeout) as response:
                await _raise_for_status(response)
                answer = await response.json(content_type=None)
        except _UNUSABLE as exc:
            raise _transport_failure(exc) from exc
        if not isinstance(answer, dict):
            raise CallFailed(Failure.SERVER, f"{url} answered {type(answer).__name__}, not a JSON object")
        return answer


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    body = (await response.text(errors="replace"))[:_BODY_CHARS]
    raise CallFailed(classify_status(response.status, body), f"HTTP {response.status} from {response.url}: {body}",
                     retry_after_s(response.headers.get("Retry-After")), response.status)


def _model_names(listed: Json) -> list[str]:
    """The ids and aliases in a /models answer; an answer of another shape (a gateway's page, a server bug) is
    a server failure, so a probe that meets it fails rather than crashes."""
    data = listed.get("data")
    if not isinstance(data, list) or not all(isinstance(model, dict) for model in data):
        raise CallFailed(Failure.SERVER, f"/models answered no list of models: {json.dumps(listed)[:_BODY_CHARS]}")
    names: list[str] = []
    for model in data:
        aliases = model.get("aliases") or []
        if not isinstance(aliases, list):
            raise CallFailed(Failure.SERVER, f"/models listed aliases that are no list: {aliases!r}"[:_BODY_CHARS])
        names += [name for name in (model.get("id"), *aliases) if isinstance(name, str)]
    return names


def _stream_event(data: str) -> Json:
    """One server-sent event's JSON object; an error event (sent after a 200) raises its CallFailed."""
    event = json.loads(data)
    if not isinstance(event, dict):
        raise CallFailed(Failure.SERVER, f"a stream event that is no JSON object: {data[:_BODY_CHARS]}")
    if "error" in event:
        raise _failed_event(event["error"])
    return event


def _final(event: Json) -> bool:
    """The stream's answer is complete: a choice has its finish_reason, or the usage-only last event came."""
    choices = event.get("choices")
    if not choices:
        return event.get("usage") is not None
    return isinstance(choices, list) and any(isinstance(choice, dict) and choice.get("finish_reason")
                                             for choice in choices)


def _failed_event(error: Any) -> CallFailed:
    """An error the server sent inside a stream (after answering 200)."""
    detail = json.dumps(error)[:_BODY_CHARS]
    status = error.get("code") if isinstance(error, dict) else None
    return CallFailed(classify_status(status if isinstance(status, int) and status >= 400 else 500, detail),
                      f"in the stream: {detail}")


def _transport_failure(exc: BaseException) -> CallFailed:
    if isinstance(exc, CallFailed):
        return exc
    if isinstance(exc, TimeoutError):  # aiohttp's connect and read timeouts are TimeoutErrors too
        return CallFailed(Failure.TIMEOUT, repr(exc))
    if isinstance(exc, (ValueError, RecursionError)):
        return CallFailed(Failure.SERVER, f"an unreadable answer: {exc!r}"[:_BODY_CHARS])
    return CallFailed(Failure.CONNECTION, repr(exc))
