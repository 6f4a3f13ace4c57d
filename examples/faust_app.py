"""A faust-streaming app on streamer's pool: reviews -> per-window label counts and an LLM summary.

    make faust-venv     # .venv-faust: faust-streaming, plus streamer and torch from .venv (docs/faust.md)
    REVIEWS_BROKER=kafka://localhost:9092 .venv-faust/bin/python examples/faust_app.py worker -l info

Reviews are JSON on `REVIEWS_INPUT_TOPIC`, keyed by their `key` (the table is co-partitioned with the
topic, so the message key must be the review's key): {"key": "lamp-7", "text": "...", "ts": 1700000000000}
(`ts` in epoch ms; without it, the Kafka timestamp). Every review is classified as it arrives, by an
agent whose `REVIEWS_CONCURRENCY` coroutines share the pool's batches, and counted in a tumbling
`REVIEWS_WINDOW_S` window per key. `REVIEWS_GRACE_S` after a window's end Faust closes it; its summary
is generated then and one WindowSummary per key and window goes to `REVIEWS_OUTPUT_TOPIC`. Model and
batching come from $STREAMER_CONFIG / STREAMER_* as for `streamer run` (SmolLM2 by default).
"""

from __future__ import annotations

import tempfile
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import faust
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamer.errors import StreamerError
from streamer.integrations.faust import ClosedWindow, FaustPool
from streamer.integrations.window_tally import WindowTally

if TYPE_CHECKING:
    from streamer.api import LLMPool

UNCLASSIFIED = "unclassified"
"""The label of a review the model failed on: it still counts, so a window's labels add up to its events."""


class Options(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REVIEWS_")

    broker: str = "kafka://localhost:9092"
    app_id: str = "reviews"
    input_topic: str = "reviews"
    output_topic: str = "review-windows"
    partitions: int = 1
    window_s: float = 60.0
    grace_s: float = 10.0
    cleanup_s: float = 1.0
    concurrency: int = 16
    labels: list[str] = ["positive", "negative", "neutral"]
    max_texts: int = 32
    summary_tokens: int = 64
    datadir: str = f"{tempfile.gettempdir()}/faust-reviews"


class Review(faust.Record, serializer="json"):
    key: str
    text: str
    ts: int | None = None


class WindowSummary(faust.Record, serializer="json", include_metadata=False):
    key: str
    start: int  # epoch ms, inclusive
    end: int  # epoch ms, exclusive
    count: int
    labels: dict[str, int]
    summary: str
    model: str


def review_time(event: Any) -> float:
    """The window clock, in seconds as Faust wants: the review's own `ts`, else its Kafka timestamp."""
    ts = event.value.ts
    return ts / 1000 if ts is not None else event.message.timestamp


options = Options()
app = faust.App(
    options.app_id,
    broker=options.broker,
    store="memory://",
    datadir=options.datadir,
    topic_partitions=options.partitions,
    table_cleanup_interval=options.cleanup_s,
    consumer_auto_offset_reset="earliest",
    web_enabled=False,
)
llm = FaustPool(app)
reviews = app.topic(options.input_topic, key_type=str, value_type=Review)
summaries = app.topic(options.output_topic, key_type=str, value_type=WindowSummary)


async def summarise(pool: LLMPool, window: ClosedWindow, value: Any) -> None:
    seen = WindowTally.of(value)
    summary = await pool.summarize(seen.texts, max_new_tokens=options.summary_tokens)
    await summaries.send(key=window.key, value=WindowSummary(
        key=window.key, start=window.start, end=window.end, count=seen.count, labels=dict(seen.labels),
        summary=summary.text, model=summary.model,
    ))  # fmt: skip


windows = (
    app.Table("review-windows", default=dict, on_window_close=llm.on_window_close(summarise))
    .tumbling(timedelta(seconds=options.window_s), expires=timedelta(seconds=options.grace_s))
    .relative_to(review_time)
)


@app.task
async def declare_output() -> None:
    """Create the output topic at start, not on the first window's send (Faust would log it as missing)."""
    await summaries.maybe_declare()


@app.agent(reviews, concurrency=options.concurrency)
async def classify_reviews(stream: Any) -> None:
    pool = await llm.ready()
    async for review in stream:
        try:
            label = (await pool.classify(review.text, options.labels)).label
        except StreamerError:
            label = UNCLASSIFIED
        # No await between reading and writing the window: the N coroutines cannot interleave here.
        window = windows[review.key]
        windows[review.key] = WindowTally.of(window.value()).add(label, review.text, options.max_texts).to_json()


if __name__ == "__main__":
    app.main()
