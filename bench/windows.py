"""The window engine in-process: how many events per second one core folds into windows, and at what memory.

    .venv/bin/python -m bench.windows [--events 1000000] [--keys 10000] [--rate 5000] [--no-memory]

Events arrive like a consumer sees them: timestamps rising at `--rate` events per event-time second
with up to `--jitter-ms` of disorder, keys uniform at random. Per event the watermark observes it and
the engine adds it; per poll batch of `--poll` events the watermark is read and closed windows are
expired, as the service does. Events/s is that whole loop on one core without tracing; peak memory is
a second, traced run (tracemalloc), counting only what the windows hold: the input is built before.

Each case runs twice, side by side: as a per-key route's engine (one per partition, events not
kept) and as a `per_key: false` route's (events kept, so a revoke can take some out), with the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from streamer.windows.assign import WindowSpec
from streamer.windows.engine import Aggregator, WindowEngine
from streamer.windows.watermark import Watermarks
from tests.aggregators import CountAggregator, TextStatsAggregator

PARTITION = ("events", 0)
LATENESS_MS = 5_000


@dataclass(frozen=True, slots=True)
class Doc:
    text: str


@dataclass(frozen=True)
class Case:
    name: str
    spec: WindowSpec
    aggregator: Callable[[], Aggregator[Any, Any]]


CASES = [
    Case("tumbling 60s, count", WindowSpec.tumbling(60_000), CountAggregator),
    Case("sliding 60s/10s, count", WindowSpec.sliding(60_000, 10_000), CountAggregator),
    Case("session gap 30s, count", WindowSpec.session(30_000), CountAggregator),
    Case("tumbling 60s, text stats", WindowSpec.tumbling(60_000), TextStatsAggregator),
]


@dataclass(frozen=True)
class Outcome:
    events: int
    late: int
    emitted: int
    elapsed_s: float


def make_events(count: int, keys: int, rate: int, jitter_ms: int, seed: int = 7) -> list[tuple[str, int, Doc, int]]:
    """(key, ts_ms, event, ref) in arrival order; refs stand for offsets, docs are a shared pool."""
    rng = random.Random(seed)
    names = [f"user-{i:05d}" for i in range(keys)]
    docs = [Doc("x" * rng.randint(5, 200)) for _ in range(64)]
    start_ms, step_ms = 1_700_000_000_000, 1000 / rate
    return [
        (rng.choice(names), int(start_ms + i * step_ms) - rng.randint(0, jitter_ms), docs[i % 64], i)
        for i in range(count)
    ]


def run(case: Case, events: list[tuple[str, int, Doc, int]], poll: int, keep_events: bool) -> Outcome:
    engine: WindowEngine[Any, Any] = WindowEngine(case.spec, case.aggregator(), keep_events=keep_events)
    marks = Watermarks(allowed_lateness_ms=LATENESS_MS, idle_timeout_ms=10_000)
    marks.assign([PARTITION], now_ms=0)
    observe, add = marks.observe, engine.add
    late = emitted = 0
    started_s = time.perf_counter()
    for first in range(0, len(events), poll):
        watermark_ms = marks.current(now_ms=0)  # time stands still: the partition is never idle
        for key, ts_ms, doc, ref in events[first : first + poll]:
            observe(PARTITION, ts_ms, 0)
            late += add(key, ts_ms, doc, ref, watermark_ms).late
        emitted += len(engine.expire(marks.current(now_ms=0)))
    emitted += len(engine.expire(2**62))  # end of input: close the rest
    return Outcome(len(events), late, emitted, time.perf_counter() - started_s)


def peak_mib(case: Case, events: list[tuple[str, int, Doc, int]], poll: int, keep_events: bool) -> float:
    tracemalloc.start()
    try:
        run(case, events, poll, keep_events)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=5_000, help="events per second of event time")
    parser.add_argument("--jitter-ms", type=int, default=2_000, help="how far an event may lag the stream")
    parser.add_argument("--poll", type=int, default=500, help="events between watermark reads and expiry")
    parser.add_argument("--no-memory", action="store_true", help="skip the traced run")
    args = parser.parse_args()
    events = make_events(args.events, args.keys, args.rate, args.jitter_ms)
    span_s = (events[-1][1] - events[0][1]) / 1000
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"python {platform.python_version()}; {args.events:,} events, {args.keys:,} keys, "
        f"{span_s:,.0f} s of event time, jitter {args.jitter_ms} ms, lateness {LATENESS_MS} ms"
    )
    print(f"{'case':<26} {'events kept':<12} {'events/s':>11} {'late':>7} {'windows':>9} {'peak MiB':>9}")
    for case in CASES:
        rates, peaks = {}, {}
        for keep_events in (False, True):
            outcome = run(case, events, args.poll, keep_events)
            rates[keep_events] = outcome.events / outcome.elapsed_s
            peaks[keep_events] = None if args.no_memory else peak_mib(case, events, args.poll, keep_events)
            memory = "-" if peaks[keep_events] is None else f"{peaks[keep_events]:.1f}"
            print(f"{case.name:<26} {'yes' if keep_events else 'no':<12} {rates[keep_events]:>11,.0f} "
                  f"{outcome.late:>7,} {outcome.emitted:>9,} {memory:>9}")
        memory_ratio = "" if args.no_memory else f", {peaks[False] / peaks[True]:.2f}x the memory"
        print(f"{'':<26} not keeping: {rates[False] / rates[True]:.2f}x the events/s{memory_ratio}")


if __name__ == "__main__":
    main()
