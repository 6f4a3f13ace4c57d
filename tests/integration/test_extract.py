"""`task: extract` end to end on the real broker, Redis and SmolLM2: every answer written is an object its schema
accepts (by construction), named by the schema's id; a token cap that cuts the object is an `invalid_output` dead
letter; a windowed route counts the extracted urgency per window. Field accuracy is reported, with a modest floor:
the model has 135M parameters."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import jsonschema
import orjson
import pytest
import redis

from streamer.config import Settings
from streamer.engine.build import resident
from streamer.pipeline.app import connect
from tests.integration.services import consume_all, create_topic, produce_lines, unique_name
from tests.integration.test_windows import T0, run_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SCHEMA_PATH = ROOT / "examples" / "schemas" / "support_ticket.json"
MESSAGES = [json.loads(line) for line in (ROOT / "tests" / "data" / "support_messages.jsonl").read_text().splitlines()]
WINDOW_MS = 10_000  # T0 is aligned to it: five windows of up to ten messages, one second apart
WINDOWS = 5


def test_every_extracted_answer_matches_the_schema_and_windows_count_its_urgency(kafka_bootstrap, redis_url, worker):
    tag = unique_name("extract")
    settings = Settings(
        kafka={"bootstrap_servers": kafka_bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}"},
        redis={"url": redis_url, "prefix": tag},
        routes=[{"name": "tickets", "input": f"in-{tag}", "output": f"out-{tag}", "task": "extract",
                 "schema": str(SCHEMA_PATH), "count_field": "urgency",
                 "window": {"kind": "tumbling", "size_ms": WINDOW_MS, "idle_timeout_ms": 2000,
                            "output": f"win-{tag}"}}],
    )
    create_topic(kafka_bootstrap, f"in-{tag}", partitions=2)
    events = [{"id": m["id"], "key": "support", "text": m["text"], "ts": T0 + n * 1000} for n, m in enumerate(MESSAGES)]
    capped = {"id": "capped", "key": "support", "text": MESSAGES[0]["text"], "ts": T0 + 500,
              "params": {"max_new_tokens": 6}}
    produce_lines(kafka_bootstrap, f"in-{tag}", [orjson.dumps(e) for e in [capped, *events]],
                  partitions=[0] * (len(events) + 1))
    pipeline = connect(settings, kafka_bootstrap, redis_url, resident(worker, settings))

    asyncio.run(run_until(
        pipeline, lambda: pipeline.windows_written == WINDOWS and pipeline.written >= len(events) + 1, 400))

    answers = {a["id"]: a for a in (orjson.loads(r.value) for r in
                                    consume_all(kafka_bootstrap, f"out-{tag}", len(events), timeout_s=30))}
    assert set(answers) == {m["id"] for m in MESSAGES}
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    for answer in answers.values():
        assert answer["task"] == "extract" and answer["schema_id"] == "support-ticket/v1"
        assert isinstance(answer["output"], dict) and not list(validator.iter_errors(answer["output"]))

    right = Counter(field for m in MESSAGES for field, value in m["expected"].items()
                    if answers[m["id"]]["output"][field] == value)
    accuracy = {field: round(right[field] / len(MESSAGES), 2) for field in MESSAGES[0]["expected"]}
    print(f"\nextract field accuracy over {len(MESSAGES)} messages: {accuracy}")
    assert accuracy["product"] >= 0.4  # chance is 1/7
    assert sum(accuracy.values()) / len(accuracy) >= 0.3

    letters = [orjson.loads(r.value) for r in consume_all(kafka_bootstrap, f"dlq-{tag}", 1, timeout_s=30)]
    assert [(d["error"], d["id"]) for d in letters] == [("invalid_output", "capped")]
    assert "not JSON" in letters[0]["detail"]

    windows = sorted((orjson.loads(r.value) for r in
                      consume_all(kafka_bootstrap, f"win-{tag}", WINDOWS, timeout_s=30)),
                     key=lambda w: w["window"]["start"])
    for n, window in enumerate(windows):
        inside = [e["id"] for e in events if window["window"]["start"] <= e["ts"] < window["window"]["end"]]
        assert window["window"]["start"] == T0 + n * WINDOW_MS
        assert window["labels"] == dict(Counter(answers[i]["output"]["urgency"] for i in inside))
        assert window["count"] == len(inside) + (n == 0)  # the capped event is counted, its urgency is not

    client = redis.Redis.from_url(redis_url)  # dashboards read the same object from Redis
    for i in (MESSAGES[0]["id"], MESSAGES[-1]["id"]):
        assert orjson.loads(client.get(f"{tag}:answer:{i}"))["output"] == answers[i]["output"]
