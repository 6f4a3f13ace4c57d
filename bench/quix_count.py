"""The Quix Streams side of `bench.peers_windows`: a tumbling 60 s count per key, final results to a topic.

Runs as a plain Quix Streams application from its own virtual environment (`make quix-venv`: .venv-quix
with quixstreams==3.28.1), started by bench/peers_windows.py pinned to one core:

    .venv-quix/bin/python bench/quix_count.py

Configured by environment: QUIX_BENCH_BROKER (host:port), QUIX_BENCH_TOPIC (the input, 1 partition),
QUIX_BENCH_OUTPUT (the window results' topic), QUIX_BENCH_GROUP (consumer group), QUIX_BENCH_STATE_DIR,
QUIX_BENCH_OUT (a JSON file this writes when the first record arrives: its wall-clock time).

The dataframe is what the Quix documentation shows for the job, with the library's defaults kept (RocksDB
state, changelog topic, at-least-once, 5 s commit interval): the event's own `ts` (epoch ms in the JSON)
is the record's timestamp, `tumbling_window(60 s).count().final(closing_strategy="partition")` emits a
window once the partition's event time passes its end (the default "key" strategy would close a key's
window only when that key is seen again, and most never are), and each result goes to the output topic
as JSON `{"start", "end", "value"}` with the event's message key. The input's flush marker, two minutes
of event time after the last event, closes every window of the events, as it does for streamer.

Nothing is timed here but the first record's arrival (in the timestamp extractor, which runs for every
record anyway); the parent reads when the last result was written from the output topic itself.
Nothing in streamer is imported: this environment has only quixstreams and its dependencies.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from quixstreams import Application

BROKER = os.environ.get("QUIX_BENCH_BROKER", "localhost:9092")
TOPIC = os.environ.get("QUIX_BENCH_TOPIC", "bench-events")
OUTPUT = os.environ.get("QUIX_BENCH_OUTPUT", "bench-quix-windows")
OUT = os.environ.get("QUIX_BENCH_OUT", "quix-bench.json")
WINDOW_MS = 60_000

_first: list[float] = []


def event_time_ms(value: Any, _headers: Any, _timestamp: int, _kind: Any) -> int:
    """The window clock: the record's own `ts`. Notes the wall-clock time of the first record it sees."""
    if not _first:
        _first.append(time.time())
        tmp = OUT + ".tmp"
        with open(tmp, "w") as out:
            json.dump({"first_wall": _first[0]}, out)
        os.replace(tmp, OUT)
    return value["ts"]


def main() -> None:
    app = Application(
        broker_address=BROKER,
        consumer_group=os.environ.get("QUIX_BENCH_GROUP", "quix-bench"),
        auto_offset_reset="earliest",
        state_dir=os.environ.get("QUIX_BENCH_STATE_DIR", "quix-bench-state"),
        loglevel="WARNING",
    )
    events = app.topic(TOPIC, value_deserializer="json", timestamp_extractor=event_time_ms)
    results = app.topic(OUTPUT, value_serializer="json")
    sdf = app.dataframe(events)
    sdf = sdf.tumbling_window(duration_ms=WINDOW_MS).count().final(closing_strategy="partition")
    sdf.to_topic(results)
    app.run()  # until SIGTERM, which Quix handles by finishing the batch, committing and closing


if __name__ == "__main__":
    main()
