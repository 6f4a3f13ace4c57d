"""task: extract on engine.kind openai against a real llama.cpp llama-server: the route's schema goes to the
server as `response_format` (json_schema), so every answer matches it; and a server that ignores the format
(a proxy strips it on the way) answers free text, which the pipeline dead-letters as `invalid_output` instead
of passing it on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from streamer.config import Route
from streamer.contracts import ErrorCode, InputEvent
from streamer.engine.openai import open_backend
from streamer.engine.requests import Generated, GenRequest, GenResult
from streamer.tasks.event import TASKS
from tests.integration.fault_proxy import FaultProxy
from tests.integration.services import (
    LlamaServer,
    committed_offsets,
    consume_all,
    create_topic,
    end_offsets,
    produce_lines,
    unique_name,
)
from tests.integration.test_openai_backend import settings
from tests.integration.test_openai_pipeline import openai_settings, pipeline_on, run_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "examples" / "schemas" / "support_ticket.json"
MESSAGES = [json.loads(line) for line in (ROOT / "tests" / "data" / "support_messages.jsonl").read_text().splitlines()
            if line.strip()]
PICKED = MESSAGES[::8]  # six messages, across products, sentiments and urgencies
CAP = 512  # limits.max_new_tokens' default
ANSWER_TOKENS = 128
"""llama-server's grammar lets the model indent the object (SmolLM2 does): about 50 tokens a ticket, against the
native engine's compact 30-odd, so the route's default cap of 64 is too near."""


def extract_route() -> Route:
    return Route.model_validate({"name": "x", "input": "in-x", "output": "out-x", "task": "extract",
                                 "schema": str(SCHEMA), "max_new_tokens": ANSWER_TOKENS})


def extract_request(message: dict[str, Any], route: Route) -> GenRequest:
    """The request the pipeline makes of a support message on an extract route."""
    build = TASKS["extract"].request
    assert build is not None
    request = build(InputEvent(id=message["id"], text=message["text"]), route, CAP)
    assert isinstance(request, GenRequest) and request.schema is not None
    return request


async def test_every_extract_answer_from_the_server_parses_and_matches_the_schema(llama_server: LlamaServer) -> None:
    route = extract_route()
    spec = route.schema_spec
    assert spec is not None
    backend = open_backend(settings(llama_server.base_url), max_queue=16)
    await backend.start()
    try:
        requests = [extract_request(message, route) for message in PICKED]
        whole = await asyncio.gather(*(backend.generate(request) for request in requests[1:]))
        *pieces, last = [part async for part in backend.stream(requests[0])]  # the streaming path carries it too
        assert isinstance(last, Generated) and pieces
        results = [last.result, *(generated.result for generated in whole)]
    finally:
        await backend.aclose()
    for message, result in zip(PICKED, results, strict=True):
        assert isinstance(result, GenResult) and result.error is None, result
        answer = spec.parse(result.text)  # InvalidOutput names the message's answer where it does not match
        assert set(answer) == {"product", "sentiment", "urgency", "order_id"}, (message["id"], answer)
    assert "".join(str(piece) for piece in pieces).strip() == results[0].text


def test_a_server_that_ignores_the_schema_is_dead_lettered_invalid_output_not_answered(
        kafka_bootstrap: str, redis_url: str, llama_server: LlamaServer) -> None:
    tag = unique_name("oaix")
    proxy = FaultProxy(llama_server.base_url.removesuffix("/v1"), drop=frozenset({"response_format"}))
    events = [orjson.dumps({"id": message["id"], "key": "shop", "text": message["text"]}) for message in PICKED]
    create_topic(kafka_bootstrap, f"in-{tag}")

    async def run() -> None:
        await proxy.start()
        try:
            through_proxy = LlamaServer(proxy.base_url, llama_server.args)
            config = openai_settings(kafka_bootstrap, redis_url, tag, through_proxy, [
                {"name": "x", "input": f"in-{tag}", "output": f"out-{tag}", "task": "extract",
                 "schema": str(SCHEMA), "max_new_tokens": 48}])
            pipeline = pipeline_on(config, kafka_bootstrap, redis_url)
            produce_lines(kafka_bootstrap, f"in-{tag}", events)
            await run_until(pipeline, lambda: pipeline.written >= len(events), 180)
        finally:
            await proxy.stop()

    asyncio.run(run())

    assert proxy.dropped["response_format"] == len(events)  # the backend sent it; the "server" never saw it
    letters = [orjson.loads(m.value) for m in consume_all(kafka_bootstrap, f"dlq-{tag}", len(events), 60)]
    assert sorted(letter["id"] for letter in letters) == sorted(message["id"] for message in PICKED)
    for letter in letters:
        assert letter["error"] == ErrorCode.INVALID_OUTPUT, letter
        assert "the answer is not JSON" in letter["detail"] or "does not match schema" in letter["detail"], letter
    assert sum(end_offsets(kafka_bootstrap, f"out-{tag}").values()) == 0  # nothing passed on as an answer
    assert committed_offsets(kafka_bootstrap, f"g-{tag}", f"in-{tag}") == end_offsets(kafka_bootstrap, f"in-{tag}")
