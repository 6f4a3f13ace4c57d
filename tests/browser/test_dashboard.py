"""The live dashboard: its event stream against a real redis-server, and the page in headless Chromium
following a real pipeline (broker, model, windows) as events are produced after it opened."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis
from playwright.async_api import Page, async_playwright, expect
from pydantic import SecretStr

from streamer.config import RedisSettings, Settings
from streamer.contracts import Answer, DeadLetter, ErrorCode, Source, WindowBounds, WindowResult
from streamer.engine.build import resident
from streamer.observe.dashboard import run_dashboard
from streamer.observe.dashboard.routes import CLIENT_NAME
from streamer.pipeline.app import connect
from streamer.pipeline.pieces import Delta
from streamer.state.redis import RedisState, Written
from streamer.state.server import free_port
from tests.integration.services import create_topic, produce_lines, unique_name

pytestmark = pytest.mark.integration

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
T0 = 1_700_000_000_000  # aligned to 10 s and long past, so idle windows close by processing time
SIZE_MS = 10_000


@contextlib.asynccontextmanager
async def dashboard(redis_url: str, prefix: str, token: str | None = None):
    """`run_dashboard` on a free port, yielding its base URL once it answers; cancelled on exit."""
    port = free_port()
    secret = SecretStr(token) if token is not None else None
    task = asyncio.create_task(run_dashboard(redis_url, prefix, "127.0.0.1", port, token=secret))
    base = f"http://127.0.0.1:{port}/"
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            for _ in range(100):
                assert not task.done(), task.exception()
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(base) as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"the dashboard did not answer on {base}")
        yield base
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def written(record: Answer | DeadLetter | WindowResult, key: str | None) -> Written:
    return Written(record, record.model_dump_json().encode(), key, "qa")


def answer(i: int) -> Answer:
    return Answer(id=f"q{i}", key="k", task="answer", output=f"output {i}", model="m", tokens_in=5, tokens_out=3,
                  queued_ms=1.0, latency_ms=40.0 + i, source=Source(topic="in", partition=0, offset=i),
                  ts_in=T0, ts_out=int(time.time() * 1000))


async def sse_events(response: aiohttp.ClientResponse, wanted: set[str], timeout_s: float) -> dict[str, dict]:
    """Read `event:`/`data:` pairs until every wanted event name was seen; the first of each is kept."""
    seen: dict[str, dict] = {}
    name = None
    async with asyncio.timeout(timeout_s):
        while not wanted <= seen.keys():
            line = (await response.content.readline()).decode().rstrip("\n")
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name and name not in seen:
                seen[name] = orjson.loads(line.removeprefix("data: "))
    return seen


async def stream_readers(client: redis.Redis) -> int:
    """The dashboard's connections blocked in XREAD or subscribed: what an open event stream holds."""
    clients = await asyncio.to_thread(client.client_list)
    return sum(c.get("name") == CLIENT_NAME and (c.get("cmd") == "xread" or c.get("sub", "0") != "0")
               for c in clients)


async def test_snapshot_and_event_stream_follow_the_documented_redis_keys_and_release_them(redis_url):
    prefix = unique_name("dash-sse")
    state = RedisState(RedisSettings(prefix=prefix), redis_url)
    client = redis.Redis.from_url(redis_url)
    bounds = WindowBounds(kind="tumbling", start=T0, end=T0 + SIZE_MS)
    window = WindowResult(id="w-1", route="qa", key="k", window=bounds, count=2, first_ts=T0, last_ts=T0 + 5,
                          late=0, labels={"positive": 2}, final=True, emitted_at=T0 + SIZE_MS)
    letter = DeadLetter(error=ErrorCode.SCHEMA, detail="text: missing", payload="x" * 5000, payload_encoding="utf-8",
                        source=Source(topic="in", partition=0, offset=9), ts=T0)
    try:
        await state.write([written(answer(1), "k"), written(window, "k")])
        async with dashboard(redis_url, prefix) as base, aiohttp.ClientSession() as session:
            async with session.get(base + "api/snapshot") as response:
                snap = await response.json()
            assert [a["answer"]["id"] for a in snap["answers"]] == ["q1"]
            assert [w["id"] for w in snap["windows"]["latest"]] == ["w-1"]
            assert [w["id"] for w in snap["windows"]["recent"]] == ["w-1"]
            assert snap["counters"]["answers"] == 1 and snap["counters"]["windows"] == 1

            async with session.get(base + "api/events") as events:
                assert events.headers["Content-Type"] == "text/event-stream"
                await sse_events(events, {"tick"}, 5)  # the stream is live: its readers are in place
                update = window.model_copy(update={"count": 3, "id": "w-2"})
                await state.write([written(answer(2), "k"), written(update, "k"), written(letter, None)])
                got = await sse_events(events, {"answer", "window", "dead_letter"}, 10)
                assert await stream_readers(client) == 2
            assert got["answer"]["answer"]["id"] == "q2"  # only what came after the stream opened
            assert (got["window"]["id"], got["window"]["count"]) == ("w-2", 3)
            assert got["dead_letter"]["error"] == "schema" and len(got["dead_letter"]["dead_letter"]["payload"]) < 400

            deadline = time.monotonic() + 5  # the browser left: its XREAD and SUBSCRIBE connections go
            while await stream_readers(client) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert await stream_readers(client) == 0
    finally:
        await state.aclose()
        client.close()


def test_a_page_opened_once_with_its_token_goes_live_and_one_without_is_refused(redis_url, chromium):
    prefix, token = unique_name("dash-token"), "a-token-for-the-browser"

    async def scenario() -> None:
        errors: list[str] = []
        state = RedisState(RedisSettings(prefix=prefix), redis_url)
        async with dashboard(redis_url, prefix, token) as base, async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)))
                assert (await page.goto(base)).status == 401
                await page.goto(f"{base}?token={token}")
                assert page.url == base  # the token is out of the address bar
                await page.wait_for_selector("body[data-live='true']", timeout=15_000)
                await state.write([written(answer(7), "k")])  # arrives over the event stream
                await page.wait_for_selector("#answers li[data-id='q7']", timeout=15_000)
                assert await page.evaluate("document.cookie") == ""  # HttpOnly: the page's scripts never see it
            finally:
                await browser.close()
                await state.aclose()
        assert not errors, errors

    asyncio.run(scenario())


def test_the_dead_letter_of_a_refused_window_result_is_listed_without_breaking_the_page(redis_url, chromium):
    """Second adversarial review, finding 3: a dead letter with no source event (a window result the
    broker refused) made the page throw on every frame, freezing its dead-letter and late panels."""
    prefix = unique_name("dash-sourceless")

    async def scenario() -> None:
        errors: list[str] = []
        state = RedisState(RedisSettings(prefix=prefix), redis_url)
        letter = DeadLetter(error=ErrorCode.TOO_LARGE, detail="windows: refused", id="w-1", payload="{}",
                            payload_encoding="utf-8", source=None, ts=T0)
        async with dashboard(redis_url, prefix) as base, async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)))
                await page.goto(base)
                await page.wait_for_selector("body[data-live='true']", timeout=15_000)
                await state.write([written(letter, "k")])
                await page.wait_for_selector("#dead-letters li[data-error='too_large']", timeout=15_000)
                await state.write([written(answer(8), "k")])  # and the page keeps following
                await page.wait_for_selector("#answers li[data-id='q8']", timeout=15_000)
            finally:
                await browser.close()
                await state.aclose()
        assert not errors, errors

    asyncio.run(scenario())


def test_an_extracted_object_shows_as_its_json_text(redis_url, chromium):
    prefix = unique_name("dash-extract")
    extracted = {"product": "phone", "urgency": "high", "order_id": None}

    async def scenario() -> str:
        state = RedisState(RedisSettings(prefix=prefix), redis_url)
        record = answer(7).model_copy(update={"task": "extract", "output": extracted, "schema_id": "ticket/v1"})
        async with dashboard(redis_url, prefix) as base, async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                await page.goto(base)
                await page.wait_for_selector("body[data-live='true']", timeout=15_000)
                await state.write([written(record, "k")])
                shown = page.locator("#answers li[data-id='q7'] .output")
                await shown.wait_for(timeout=15_000)
                return await shown.inner_text()
            finally:
                await browser.close()
                await state.aclose()

    assert json.loads(asyncio.run(scenario())) == extracted  # not "[object Object]"


def test_an_answer_types_out_on_the_page_until_it_is_final(redis_url, chromium):
    """Deltas of a streaming answer (`streamer:partials`) show as the answer typing; its answer replaces it."""
    prefix = unique_name("dash-typing")

    def delta(seq: int, text: str, final: bool = False) -> Delta:
        return Delta("q9", "qa", "k", b"k", seq, text, final, first=seq == 0)

    async def scenario() -> None:
        errors: list[str] = []
        state = RedisState(RedisSettings(prefix=prefix), redis_url)
        async with dashboard(redis_url, prefix) as base, async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)))
                await page.goto(base)
                await page.wait_for_selector("body[data-live='true']", timeout=15_000)
                typing = page.locator("#answers li.typing[data-id='q9'] .output")
                await state.append_partials([delta(0, "The capital")], 60, 100)
                await expect(typing).to_have_text("The capital", timeout=15_000)
                await state.append_partials([delta(1, " of France is")], 60, 100)
                await expect(typing).to_have_text("The capital of France is", timeout=15_000)
                await state.append_partials([delta(2, " Paris.", final=True)], 60, 100)
                await state.write([written(answer(9), "k")])
                await page.wait_for_selector("#answers li:not(.typing)[data-id='q9']", timeout=15_000)
                await expect(page.locator("#answers li.typing")).to_have_count(0)
            finally:
                await browser.close()
                await state.aclose()
        assert not errors, errors

    asyncio.run(scenario())


def pipeline_settings(bootstrap: str, redis_url: str, tag: str) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}"},
        redis={"url": redis_url, "prefix": tag},
        routes=[{"name": "qa", "input": f"in-{tag}", "task": "answer", "output": f"out-{tag}", "max_new_tokens": 8,
                 "window": {"kind": "tumbling", "size_ms": SIZE_MS, "idle_timeout_ms": 1000, "task": "summarize",
                            "summary_tokens": 16, "output": f"win-{tag}"}}],
    )


QUESTIONS = [("alice-1", "alice", "What is the capital of France?", 1000),
             ("alice-2", "alice", "Name a primary colour.", 2000),
             ("alice-3", "alice", "How many legs does a spider have?", 3000),
             ("bob-1", "bob", "What is 2 + 2?", 4000),
             ("bob-2", "bob", "Which planet is the largest?", 5000)]


async def texts(page: Page, selector: str) -> list[str]:
    return await page.locator(selector).all_inner_texts()


def test_dashboard_shows_answers_and_closed_windows_live_in_headless_chromium(
    kafka_bootstrap, redis_url, worker, chromium
):
    tag = unique_name("dash")
    create_topic(kafka_bootstrap, f"in-{tag}", partitions=1)
    pipeline = connect(settings := pipeline_settings(kafka_bootstrap, redis_url, tag), kafka_bootstrap, redis_url,
                       resident(worker, settings))
    events = [orjson.dumps({"id": i, "key": k, "text": text, "ts": T0 + at}) for i, k, text, at in QUESTIONS]
    events.append(b"{not json")  # a dead letter, to show the codes panel
    ARTIFACTS.mkdir(exist_ok=True)

    async def scenario() -> None:
        errors: list[str] = []
        stop = asyncio.Event()
        running: asyncio.Task[None] | None = None
        async with dashboard(redis_url, tag) as base, async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1400, "height": 1000})
                page.on("console", lambda m: m.type == "error" and errors.append(m.text))
                page.on("pageerror", lambda e: errors.append(str(e)))
                await page.goto(base)
                await page.wait_for_selector("body[data-live='true']", timeout=15_000)
                assert await page.locator("#answers li").count() == 0  # a fresh prefix: nothing yet

                running = asyncio.create_task(pipeline.run(stop))
                await asyncio.to_thread(produce_lines, kafka_bootstrap, f"in-{tag}", events)

                # Locator waits, not wait_for_function: the page's CSP (rightly) forbids the eval that needs.
                await page.wait_for_selector("#answers li[data-id='alice-1']", timeout=180_000)
                closed = page.locator("#windows [data-window-id][data-final='true']")
                await expect(closed).to_have_count(2, timeout=180_000)
                await expect(page.locator("#counter-dead-letters")).to_have_text("1", timeout=10_000)
                await asyncio.sleep(3)  # a few counter ticks, so the charts have points

                ids = await page.locator("#answers li[data-id]").evaluate_all("els => els.map(e => e.dataset.id)")
                assert sorted(ids) == sorted(q[0] for q in QUESTIONS)
                windows = page.locator("#windows [data-window-id]")
                counts = await windows.evaluate_all("els => els.map(e => [e.dataset.key, e.dataset.count])")
                assert sorted(counts) == [["alice", "3"], ["bob", "2"]]
                assert all(s.strip() for s in await texts(page, "#windows [data-window-id] .summary"))
                assert await page.inner_text("#counter-answers") == "5"
                assert await page.inner_text("#counter-late") == "0"
                assert await page.locator("#dead-letter-codes [data-label='invalid_json']").count() == 1
                assert await page.locator("#chart-throughput polyline").count() >= 1
                await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            finally:
                stop.set()
                if running is not None:
                    await running
                await browser.close()
        assert not errors, errors

    asyncio.run(scenario())
