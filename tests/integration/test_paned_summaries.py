"""A sliding summarize route on the real broker, Redis and model takes the paned plan: one final result per
window, each with a summary, for as many model calls as the pane plan says (a summary per pane, a
combine per window of two or more panes), not one per window over all its texts."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from streamer.config import Settings
from streamer.engine.build import resident
from streamer.pipeline.app import connect
from tests.integration.services import consume_all, create_topic, produce_lines, unique_name
from tests.integration.test_windows import T0, run_until

pytestmark = pytest.mark.integration

SLIDE_MS, SIZE_MS = 1000, 3000


def test_a_paned_sliding_summary_route_summarises_each_pane_once_and_combines_per_window(
    kafka_bootstrap, redis_url, worker
):
    tag = unique_name("panes")
    settings = Settings(
        kafka={"bootstrap_servers": kafka_bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}"},
        redis={"url": redis_url, "prefix": tag},
        routes=[{"name": "notes", "input": f"in-{tag}", "task": "none",
                 "window": {"kind": "sliding", "size_ms": SIZE_MS, "slide_ms": SLIDE_MS, "idle_timeout_ms": 1000,
                            "task": "summarize", "summary_tokens": 12, "output": f"win-{tag}"}}],
    )
    create_topic(kafka_bootstrap, f"in-{tag}", partitions=1)
    notes = [("The lift on floor 2 is broken.", 100), ("Technicians were called.", 1100),
             ("They replaced a cable.", 1600), ("The lift works again.", 2100)]
    produce_lines(kafka_bootstrap, f"in-{tag}", [orjson.dumps({"id": f"n{i}", "key": "lift", "text": t, "ts": T0 + at})
                                                 for i, (t, at) in enumerate(notes)], keys=[b"lift"] * len(notes))
    pipeline = connect(settings, kafka_bootstrap, redis_url, resident(worker, settings))

    asyncio.run(run_until(pipeline, lambda: pipeline.windows_written == 5, 240))

    results = [orjson.loads(r.value) for r in consume_all(kafka_bootstrap, f"win-{tag}", 5, timeout_s=30)]
    got = sorted((r["window"]["start"] - T0, r["count"]) for r in results)
    assert got == [(-2000, 1), (-1000, 3), (0, 4), (1000, 3), (2000, 1)]
    assert all(r["final"] and r["summary"].strip() and r["model"] == worker.name for r in results)
    stage = pipeline.stages["notes"]
    assert stage.model_calls == 3 + 3, "panes [0, 1 s), [1 s, 2 s), [2 s, 3 s) once; windows of 2+ panes combine"
    print("summaries:", sorted((r["window"]["start"] - T0, r["summary"]) for r in results))
