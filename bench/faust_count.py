"""The Faust side of `bench.windows_kafka`: a tumbling 60 s count per key in a faust-streaming windowed table.

Runs as a real Faust worker from its own virtual environment (faust-streaming pins click < 8.4, which
the main one cannot have), started by bench/windows_kafka.py:

    python3 -m venv .venv-faust && .venv-faust/bin/pip install faust-streaming==0.15.3 orjson
    .venv-faust/bin/python -m bench.faust_count worker -l warn --without-web

Configured by environment: FAUST_BENCH_BROKER (kafka://host:port), FAUST_BENCH_TOPIC (1 partition),
FAUST_BENCH_EXPECTED (records on it), FAUST_BENCH_APP (app id = consumer group), FAUST_BENCH_DATADIR,
FAUST_BENCH_OUT (a JSON file this writes once every record is processed).

The table: `Table(default=int).tumbling(60, expires=1 h)` keyed by the event's `key`, windowed on the
event's own `ts` (epoch ms in the JSON; Faust windows are in seconds, hence `relative_to` a function
of the event rather than `relative_to_field`, which would take the milliseconds as seconds). Each
`counts[key] += 1` updates the in-memory store and produces the new value to the table's changelog
topic, which is how a Faust table survives a crash. Expiry is by wall clock, so with `expires` at an
hour no window closes during the run; closing is not what is timed here.

What is timed, inside the agent with perf_counter: from the moment the first record reaches the agent
to the moment the last one has been counted (worker start-up, group join and topic creation excluded).
Nothing in streamer is imported: this environment has only faust-streaming and orjson.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from typing import Any

import faust

BROKER = os.environ.get("FAUST_BENCH_BROKER", "kafka://localhost:9092")
TOPIC = os.environ.get("FAUST_BENCH_TOPIC", "bench-events")
EXPECTED = int(os.environ.get("FAUST_BENCH_EXPECTED", "0"))
OUT = os.environ.get("FAUST_BENCH_OUT", "faust-bench.json")


class Event(faust.Record, serializer="json"):
    id: str
    key: str
    text: str
    ts: int  # epoch ms


def event_time_s(event: Any) -> float:
    """The window clock: the record's own `ts`, in seconds as Faust windows want."""
    return event.value.ts / 1000


app = faust.App(
    os.environ.get("FAUST_BENCH_APP", "faust-bench"),
    broker=BROKER,
    store="memory://",
    datadir=os.environ.get("FAUST_BENCH_DATADIR", "faust-bench-data"),
    topic_partitions=1,
    consumer_auto_offset_reset="earliest",
    web_enabled=False,
    worker_redirect_stdouts=False,
)
events = app.topic(TOPIC, key_type=bytes, value_type=Event)
counts = (
    app.Table("counts", default=int, partitions=1)
    .tumbling(timedelta(seconds=60), expires=timedelta(hours=1))
    .relative_to(event_time_s)
)


@app.agent(events)
async def count(stream: Any) -> None:
    seen, first_s, first_cpu, first_wall = 0, 0.0, 0.0, 0.0
    async for event in stream:
        counts[event.key] += 1
        seen += 1
        if seen == 1:
            first_s, first_cpu, first_wall = time.perf_counter(), time.process_time(), time.time()
        if seen == EXPECTED:
            elapsed_s, cpu_s = time.perf_counter() - first_s, time.process_time() - first_cpu
            windows = {k: v for k, v in counts.table.data.items()}  # ((key, (start, end)) -> count)
            report = {
                "events": seen,
                "elapsed_s": elapsed_s,
                "cpu_s": cpu_s,  # this process, all its threads
                "first_wall": first_wall,
                "windows": len(windows),
                "counted": sum(windows.values()),
            }
            tmp = OUT + ".tmp"
            with open(tmp, "w") as out:
                json.dump(report, out)
            os.replace(tmp, OUT)


if __name__ == "__main__":
    app.main()
