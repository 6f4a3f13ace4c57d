"""Streamer's Kafka-to-Kafka window route vs Quix Streams and faust-streaming: same topic, same events, same clock.

    .venv/bin/python -m bench.peers_windows [--events 100000] [--keys 10000] [--rounds 2] [--no-settle-heap]
    .venv/bin/python -m bench.peers_windows --profile py-spy [--py-spy PATH]   # where streamer's time goes

Needs .venv-quix (`make quix-venv`: quixstreams==3.28.1) and .venv-faust (`make faust-venv`), each peer
in a venv of its own. One broker and one redis-server (bench/services.py). The input is bench/windows_kafka.py's
(`build_input`, produced once): N JSON events {"id", "key", "text", "ts"} on a 1-partition topic, keys
uniform at random, `ts` rising at `--rate` per event-time second, then a flush marker 2 minutes of event
time later that closes every window of the N events. Each system computes a tumbling 60 s count per key
on that topic, as a process of its own started with `taskset -c CPU` (cpu 0 by default: one core, its
client threads included), the broker, redis-server and this process on the other CPUs:

  streamer  bench/windows_kafka.py's route (`task: none` + a tumbling 60 s `count` window, at least
            once): final results to a Kafka topic and Redis, offsets committed once every window an
            event joined is written. This module re-run as a child (`--streamer-child`), model loaded
            before the clock starts (the Pipeline wants one; no count route calls it).
  quix      bench/quix_count.py in .venv-quix: `tumbling_window(60 s).count().final(closing_strategy=
            "partition")` to an output topic, the library's defaults otherwise (RocksDB state with a
            changelog topic, at least once).
  faust     bench/faust_count.py in .venv-faust: a windowed table (in-memory store) whose every update
            goes to the table's changelog topic. Faust has no event-time final emission (its windows
            close by wall clock), so its changelog is its window-result topic: the last record per
            (key, window) is that window's count, and the run ends when the last one is written.

Timed the same way for all three: from the wall-clock time the first input record reached the
application's code (streamer: its event handler; quix: its timestamp extractor; faust: its agent, after
counting that record) to the broker's append time of the last window result on the output topic (each
output topic is created here, before the run, with message.timestamp.type=LogAppendTime; the broker runs
on this machine, so both ends read one clock). Closing, serializing and producing every window are
inside that span; start-up, group join and state recovery are not. "events/s" is N over that span.
Streamer also reports when the commit covering every event was seen (its windows in Redis too).

Runs go in A/B/A order, streamer, quix, faust repeated `--rounds` times and a last streamer run, so drift
in the machine shows; the load average is printed before and after each. Correctness first: every run's
(key, window start) -> count must equal the one computed here from the input (the flush marker's own
window, which never closes, is left out; Faust's table has it, and it is dropped from its side).

`--profile py-spy` runs streamer alone under py-spy (sampling its child process, with idle frames, in
chrome-trace form, from a CPU of the services) and splits the samples of its main thread at the
flush marker's arrival: the consuming phase (first event -> flush marker accepted) and the closing phase
(flush marker accepted -> commit covering every event): per phase, self and inclusive time by function.
py-spy is not a dependency: `.venv/bin/pip download --no-deps py-spy` and unzip the wheel, or install it.
Streamer's own gc.callbacks time every garbage collection of the profiled run, printed per phase, and the
samples taken during one are charged to "(garbage collection)" (py-spy alone would charge a gen2 pass to
whatever line allocated last: a 0.6 s `readuntil`, or `isinstance`).

Streamer's process starts as the product's entry (`streamer run`) does: model loaded, pipeline connected,
then `streamer.heap.settle_heap()` (collect, gc.freeze() what start-up built, gc.set_threshold(700, 10, 100)),
then the timed run. `--no-settle-heap`, a diagnostic with or without the profile, skips that call: the
collector's defaults with nothing frozen, the behaviour before streamer.heap (the header says so).

`run_peers(Options(...))` is the measurement: it prints the tables and returns its `Figures` (events/s per
peer and run, the runs that did not match); bench/peers.py calls it for issue 19's one side-by-side run, after
bench/peers_engine.py's `run_peers`.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from bench.services import kafka_broker, redis_server
from bench.windows_kafka import (
    FAUST_PYTHON,
    FLUSH_KEY,
    ROOT,
    WINDOW_MS,
    Input,
    _cpu_model,
    _faust_version,
    _pin,
    _stop,
    _timed_run,
    build_input,
    produce,
    streamer_settings,
)
from tests.integration.services import consume_all, create_topic, end_offsets

QUIX_PYTHON = ROOT / ".venv-quix" / "bin" / "python"
PEERS = ("streamer", "quix", "faust")

Windows = dict[tuple[str, int], int]  # (key, window start in epoch ms) -> count


@dataclass
class Run:
    peer: str
    first_wall: float  # the first input record reached the app's code (epoch s)
    last_ms: int  # the broker's append time of the last window result (epoch ms)
    windows: Windows
    launched_wall: float
    load: tuple[str, str] = ("", "")  # 1-minute load average before and after the run
    extra: dict[str, float] = field(default_factory=dict)
    gc: list[tuple[float, float, int]] = field(default_factory=list)  # streamer profiled: its collections

    @property
    def span_s(self) -> float:
        return self.last_ms / 1000 - self.first_wall


# --- topics and outputs -------------------------------------------------------------------------------------


def create_log_append_topic(bootstrap: str, name: str, compact: bool = False) -> None:
    """A 1-partition topic whose records carry the broker's append time, whatever their producer stamped."""
    config = {"message.timestamp.type": "LogAppendTime"}
    if compact:
        config["cleanup.policy"] = "compact"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1, config=config)])[name].result(30)
    deadline = time.monotonic() + 30
    while True:
        try:
            if end_offsets(bootstrap, name) == {0: 0}:
                return
        except KafkaException:  # e.g. not leader yet: the topic is still being set up
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {name} not ready")
        time.sleep(0.1)


def read_output(bootstrap: str, topic: str) -> list:
    expected = end_offsets(bootstrap, topic).get(0, 0)
    records = consume_all(bootstrap, topic, expected, timeout_s=120)
    if len(records) != expected:
        raise RuntimeError(f"{topic}: read {len(records)} of {expected} records")
    return records


def expected_windows(data: Input) -> Windows:
    counts: collections.Counter[tuple[str, int]] = collections.Counter()
    for key, ts_ms, _doc, _ref in data.engine_events:
        counts[(key, ts_ms // WINDOW_MS * WINDOW_MS)] += 1
    return dict(counts)


def _streamer_windows(records: list) -> Windows:
    out: Windows = {}
    for record in records:
        value = orjson.loads(record.value)
        out[(value["key"], value["window"]["start"])] = value["count"]
    return out


def _quix_windows(records: list) -> Windows:
    out: Windows = {}
    for record in records:
        value = orjson.loads(record.value)
        out[(record.key.decode(), value["start"])] = value["value"]
    return out


def _faust_windows(records: list) -> Windows:
    """The changelog's last value per (key, window): key JSON [key, [start_s, end_s]], value JSON int."""
    out: Windows = {}
    for record in records:
        key, (start_s, _end_s) = orjson.loads(record.key)
        if key != FLUSH_KEY:
            out[(key, round(start_s * 1000) // WINDOW_MS * WINDOW_MS)] = orjson.loads(record.value)
    return out


def _last_append_ms(records: list, topic: str, first_wall: float) -> int:
    last = max(r.timestamp_ms for r in records)
    if min(r.timestamp_ms for r in records) < first_wall * 1000 - 1000:  # a producer's time, not the broker's
        raise RuntimeError(f"{topic}: timestamps before the run started: not LogAppendTime")
    return last


# --- the runs ---------------------------------------------------------------------------------------------


def _wait_output(bootstrap: str, topic: str, expected: int, report: Path, proc: subprocess.Popen,
                 timeout_s: float, stall_s: float = 20.0) -> None:
    """Until the output topic holds `expected` records, the process exited, or nothing new came for stall_s."""
    deadline = time.monotonic() + timeout_s
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        end = end_offsets(bootstrap, topic).get(0, 0)
        if end >= expected and report.exists():
            return
        if proc.poll() is not None:
            return
        if end != seen:
            seen, since = end, time.monotonic()
        elif end > 0 and time.monotonic() - since > stall_s:
            return
        time.sleep(0.25)
    raise RuntimeError(f"{topic}: {seen} of {expected} records after {timeout_s:.0f} s")


def _launch(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    env = {**env}
    env.pop("PYTHONPATH", None)
    with log.open("wb") as log_file:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _report(path: Path, proc: subprocess.Popen, log: Path) -> dict:
    if not path.exists():
        raise RuntimeError(f"no report from {proc.args}; log tail:\n{log.read_text()[-3000:]}")
    return json.loads(path.read_text())


def run_streamer(bootstrap: str, redis_url: str, data: Input, expected: int, cpu: int, tmp: Path,
                 timeout_s: float, wrap: Callable[[list[str]], list[str]] | None = None,
                 settle_heap: bool = True) -> Run:
    tag = uuid.uuid4().hex[:8]
    output = f"win-{tag}"  # streamer_settings' window topic
    create_log_append_topic(bootstrap, output)
    report, log = tmp / f"streamer-{tag}.json", tmp / f"streamer-{tag}.log"
    spec = {"bootstrap": bootstrap, "redis_url": redis_url, "topic": data.topic, "tag": tag,
            "last_offset": len(data.values) - 1, "timeout_s": timeout_s, "out": str(report), "cpu": cpu,
            "settle_heap": settle_heap}
    child = [sys.executable, "-m", "bench.peers_windows", "--streamer-child", json.dumps(spec)]
    cmd = wrap(child) if wrap else ["taskset", "-c", str(cpu), *child]
    launched = time.time()
    proc = _launch(cmd, dict(os.environ), log)
    try:
        proc.wait(timeout=timeout_s + 120)  # it stops itself once the commit covers every event
    finally:
        _stop(proc)
    result = _report(report, proc, log)
    records = read_output(bootstrap, output)
    run = Run("streamer", result["first_wall"], _last_append_ms(records, output, result["first_wall"]),
              _streamer_windows(records), launched)
    run.extra = {k: result[k] for k in ("consumed_s", "commit_s", "cpu_s", "late", "frozen")}
    if "flush_wall" in result:
        run.extra["flush_wall"] = result["flush_wall"]
    run.gc = [tuple(c) for c in result["gc"]]
    return run


def run_quix(bootstrap: str, data: Input, expected: int, cpu: int, tmp: Path, timeout_s: float) -> Run:
    if not QUIX_PYTHON.exists():
        raise RuntimeError(f"{QUIX_PYTHON} missing: make quix-venv")
    tag = uuid.uuid4().hex[:8]
    output = f"quix-win-{tag}"
    create_log_append_topic(bootstrap, output)
    report, log = tmp / f"quix-{tag}.json", tmp / f"quix-{tag}.log"
    env = {**os.environ, "QUIX_BENCH_BROKER": bootstrap, "QUIX_BENCH_TOPIC": data.topic, "QUIX_BENCH_OUTPUT": output,
           "QUIX_BENCH_GROUP": f"quix-{tag}", "QUIX_BENCH_STATE_DIR": str(tmp / f"quix-state-{tag}"),
           "QUIX_BENCH_OUT": str(report)}
    launched = time.time()
    proc = _launch(["taskset", "-c", str(cpu), str(QUIX_PYTHON), "bench/quix_count.py"], env, log)
    try:
        _wait_output(bootstrap, output, expected, report, proc, timeout_s)
    finally:
        _stop(proc)
    first_wall = _report(report, proc, log)["first_wall"]
    records = read_output(bootstrap, output)
    return Run("quix", first_wall, _last_append_ms(records, output, first_wall), _quix_windows(records), launched)


def run_faust(bootstrap: str, data: Input, cpu: int, tmp: Path, timeout_s: float) -> Run:
    if not FAUST_PYTHON.exists():
        raise RuntimeError(f"{FAUST_PYTHON} missing: make faust-venv")
    tag = uuid.uuid4().hex[:8]
    app = f"faust-{tag}"
    changelog = f"{app}-counts-changelog"  # Faust's name for table "counts"; it keeps a topic that exists
    create_log_append_topic(bootstrap, changelog, compact=True)
    report, log = tmp / f"faust-{tag}.json", tmp / f"faust-{tag}.log"
    # bench/faust_count.py's environment, as bench/windows_kafka.py's run_faust sets it
    env = {**os.environ, "FAUST_BENCH_BROKER": f"kafka://{bootstrap}", "FAUST_BENCH_TOPIC": data.topic,
           "FAUST_BENCH_EXPECTED": str(len(data.values)), "FAUST_BENCH_APP": app,
           "FAUST_BENCH_DATADIR": str(tmp / f"faust-data-{tag}"), "FAUST_BENCH_OUT": str(report)}
    launched = time.time()
    proc = _launch(["taskset", "-c", str(cpu), str(FAUST_PYTHON), "-m", "bench.faust_count", "worker", "-l", "warn",
                    "--without-web"], env, log)
    try:  # one changelog record per update: as many as input records, the flush marker's included
        _wait_output(bootstrap, changelog, len(data.values), report, proc, timeout_s)
    finally:
        _stop(proc)
    first_wall = _report(report, proc, log)["first_wall"]
    records = read_output(bootstrap, changelog)
    return Run("faust", first_wall, _last_append_ms(records, changelog, first_wall), _faust_windows(records),
               launched)


# --- the streamer child -------------------------------------------------------------------------------------


def streamer_child(spec: dict) -> None:
    """One streamer run on the topic; writes when the first event and the flush marker reached the handler,
    and bench.windows_kafka._timed_run's figures. Pinned by its parent (taskset), or here when profiled.
    Starts as `streamer run` does: model loaded, pipeline connected, then `settle_heap()` (unless the spec
    says not to), then the timed run."""
    if os.environ.get("PEERS_PROFILED"):
        os.sched_setaffinity(0, {spec["cpu"]})
    import torch

    from streamer.config import ModelSettings
    from streamer.engine.build import resident
    from streamer.engine.load import load_worker
    from streamer.heap import settle_heap
    from streamer.pipeline.app import connect

    torch.set_num_threads(1)
    worker = load_worker(ModelSettings(threads=1))
    settings = streamer_settings(spec["bootstrap"], spec["topic"], spec["tag"], None)
    pipeline = connect(settings, spec["bootstrap"], spec["redis_url"], resident(worker, settings))
    if spec["settle_heap"]:
        settle_heap()  # as the product's process entry does once the model is loaded
    marks: dict[str, float] = {}
    cls = type(pipeline._handler)  # a benchmark may read internals
    original, last_offset = cls.accept, spec["last_offset"]

    profiling = bool(os.environ.get("PEERS_PROFILED"))

    def hooked(self, raw, now_ms: int) -> None:
        if "first_wall" not in marks:
            marks["first_wall"] = time.time()
            if not profiling:  # the class's own method from the second event on: nothing added per event
                cls.accept = original
        if raw.offset == last_offset:  # profiling: the flush marker, every event consumed, closing starts
            marks["flush_wall"] = time.time()
            cls.accept = original
        original(self, raw, now_ms)

    cls.accept = hooked
    collections_: list[tuple[float, float, int]] = []  # (start, end, generation) of each garbage collection
    if profiling:
        started: list[float] = [0.0]

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                started[0] = time.time()
            else:
                collections_.append((started[0], time.time(), info["generation"]))

        gc.callbacks.append(on_gc)
    consumed_s, commit_s, cpu_s = asyncio.run(_timed_run(pipeline, spec["topic"], last_offset, spec["timeout_s"]))
    report = {**marks, "consumed_s": consumed_s, "commit_s": commit_s, "cpu_s": cpu_s,
              "late": pipeline.stages["counts"].late, "gc": collections_, "frozen": gc.get_freeze_count()}
    tmp = spec["out"] + ".tmp"
    Path(tmp).write_text(json.dumps(report))
    os.replace(tmp, spec["out"])


# --- py-spy: where streamer's time goes, by phase -------------------------------------------------------------


def _trace_intervals(trace: list[dict]) -> tuple[int, list[tuple[float, float, tuple[str, ...]]]]:
    """py-spy's chrome trace (nested B/E events per thread, ts in µs) as (start s, end s, stack) intervals of
    the thread that ran the event handler."""
    by_tid: dict[int, list[dict]] = collections.defaultdict(list)
    for event in trace:
        if event.get("ph") in ("B", "E"):
            by_tid[event["tid"]].append(event)
    main = next((tid for tid, evs in by_tid.items() if any(e["name"].endswith("hooked") for e in evs)), None)
    if main is None:
        raise RuntimeError("no thread ran the event handler in the trace")
    intervals, stack, last_ts = [], [], None
    for event in by_tid[main]:
        ts = event["ts"] / 1e6
        if last_ts is not None and stack and ts > last_ts:
            intervals.append((last_ts, ts, tuple(stack)))
        frame = f"{event['name']} ({Path(event['args'].get('filename', '?')).name})"
        if event["ph"] == "B":
            stack.append(frame)
        elif stack:
            stack.pop()
        last_ts = ts
    return main, intervals


GC_FRAME = "(garbage collection)"


def _carve_gc(intervals: list[tuple[float, float, tuple[str, ...]]],
              collections_: list[tuple[float, float]]) -> list[tuple[float, float, tuple[str, ...]]]:
    """Samples taken while a collection ran (its times from the process's gc.callbacks) get GC_FRAME as their
    leaf: the collection's own time, charged to the code that triggered it only as inclusive time."""
    spans = sorted(collections_)
    starts = [a for a, _b in spans]
    out = []
    for a, b, stack in intervals:
        cursor = a
        for i in range(max(bisect.bisect_right(starts, a) - 1, 0), len(spans)):
            g_a, g_b = spans[i]
            if g_a >= b:
                break
            lo, hi = max(g_a, cursor), min(g_b, b)
            if hi <= lo:
                continue
            if lo > cursor:
                out.append((cursor, lo, stack))
            out.append((lo, hi, (*stack, GC_FRAME)))
            cursor = hi
        if cursor < b:
            out.append((cursor, b, stack))
    return out


def _phase_table(intervals: list[tuple[float, float, tuple[str, ...]]], start: float, end: float,
                 top: int) -> str:
    selfs: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0.0
    for a, b, stack in intervals:
        d = min(b, end) - max(a, start)
        if d <= 0:
            continue
        total += d
        selfs[stack[-1]] += d
        for frame in set(stack):
            inclusive[frame] += d
    lines = [f"  sampled {total:.2f} s of {end - start:.2f} s"]
    for title, counter in (("self", selfs), ("inclusive", inclusive)):
        lines.append(f"  top {top} by {title} time:")
        for frame, d in counter.most_common(top):
            lines.append(f"    {d:7.3f} s {d / total:6.1%}  {frame}")
    return "\n".join(lines)


CONSUMING_STAGES = (  # (label, function): a sample goes to the first whose function is on its stack
    ("decode + validate the event (decode)", "decode"),
    ("place it in its windows (EventHandler._windows)", "EventHandler._windows"),
    ("metrics (Metrics.event_in)", "Metrics.event_in"),
    ("offset tracking (OffsetTracker.track/done)", "OffsetTracker.track"),
    ("offset tracking (OffsetTracker.track/done)", "OffsetTracker.done"),
    ("poll + RawMessage per record (KafkaSource.poll)", "KafkaSource.poll"),
    ("rest of EventHandler.accept", "EventHandler.accept"),
    ("idle (epoll wait)", "EpollSelector.select"),
)
CLOSING_STAGES = (
    ("redis read: which windows are final already (RedisState.windows_final)", "RedisState.windows_final"),
    ("window results built (WindowStage._result)", "WindowStage._result"),
    ("serialized + sealed (Sealer.seal)", "Sealer.seal"),
    ("a settle wait per window (_settled)", "_settled"),
    ("rest of WindowStage._emit_closed", "WindowStage._emit_closed"),
    ("kafka produce (KafkaRecords.write)", "KafkaRecords.write"),
    ("kafka delivery callbacks (KafkaSink.poll)", "KafkaSink.poll"),
    ("redis write (RedisOutcomes.write)", "RedisOutcomes.write"),
    ("offsets released (OffsetTracker.done)", "OffsetTracker.done"),
    ("rest of the writer (Writer.run: batches, tallies)", "Writer.run"),
    ("commit (Pipeline._commit)", "Pipeline._commit"),
    ("consumer polled (KafkaSource.poll)", "KafkaSource.poll"),
    ("idle (epoll wait)", "EpollSelector.select"),
)


def _stage_table(intervals: list[tuple[float, float, tuple[str, ...]]], start: float, end: float,
                 stages: tuple[tuple[str, str], ...]) -> str:
    spent: collections.Counter[str] = collections.Counter()
    for a, b, stack in intervals:
        d = min(b, end) - max(a, start)
        if d <= 0:
            continue
        names = {frame.split(" (")[0] for frame in stack}
        if stack[-1] == GC_FRAME:
            spent[GC_FRAME] += d
            continue
        spent[next((label for label, fn in stages if fn in names), "other")] += d
    total = sum(spent.values()) or 1.0
    return "\n".join(f"    {d:7.3f} s {d / total:6.1%}  {label}" for label, d in spent.most_common())


def profile_streamer(bootstrap: str, redis_url: str, data: Input, expected: Windows, cpu: int,
                     services: set[int], tmp: Path, timeout_s: float, py_spy: str, out: Path | None,
                     top: int, settle_heap: bool = True) -> None:
    trace_path = out or tmp / "streamer.trace.json"
    services_cpus = ",".join(map(str, sorted(services)))

    def wrap(child: list[str]) -> list[str]:  # py-spy on the services' CPUs, the child pins itself
        return ["env", "PEERS_PROFILED=1", "taskset", "-c", services_cpus, py_spy, "record", "--idle",
                "--rate", "500", "--format", "chrometrace", "-o", str(trace_path), "--", *child]

    run = run_streamer(bootstrap, redis_url, data, len(expected), cpu, tmp, timeout_s, wrap, settle_heap)
    print(f"profiled run: windows {'OK' if run.windows == expected else 'MISMATCH'}; first event -> last window "
          f"written {run.span_s:.2f} s, -> commit {run.extra['commit_s']:.2f} s (py-spy's pauses included)")
    trace = json.loads(trace_path.read_text())
    _tid, intervals = _trace_intervals(trace)
    # the trace's clock starts with py-spy; anchor it on the first sample inside the hooked handler
    anchor = next(a for a, _b, stack in intervals if any(".hooked (" in f for f in stack))
    flush = anchor + run.extra["flush_wall"] - run.first_wall
    shift = anchor - run.first_wall  # wall clock -> trace clock
    intervals = _carve_gc(intervals, [(shift + a, shift + b) for a, b, _g in run.gc])
    commit = anchor + run.extra["commit_s"]
    last_written = anchor + run.span_s
    print(f"\nconsuming phase (first event -> flush marker accepted, {flush - anchor:.2f} s):")
    print(_phase_table(intervals, anchor, flush, top))
    print("  by stage:")
    print(_stage_table(intervals, anchor, flush, CONSUMING_STAGES))
    print(f"\nclosing phase (flush marker accepted -> last window written {last_written - flush:.2f} s "
          f"-> commit {commit - flush:.2f} s):")
    print(_phase_table(intervals, flush, commit, top))
    for title, (a, b) in (("flush marker -> last window written", (flush, last_written)),
                          ("last window written -> commit", (last_written, commit))):
        print(f"  by stage, {title} ({b - a:.2f} s):")
        print(_stage_table(intervals, a, b, CLOSING_STAGES))
    # garbage collection (GC_FRAME in the tables above): from the process's own gc callbacks
    walls = {"consuming": (run.first_wall, run.extra["flush_wall"]),
             "closing, to last written": (run.extra["flush_wall"], run.last_ms / 1000),
             "closing, last written to commit": (run.last_ms / 1000, run.first_wall + run.extra["commit_s"])}
    print("\ngarbage collection (gc.callbacks in streamer's process; inside the phases above):")
    for name, (start, end) in walls.items():
        spent = collections.Counter()
        runs = collections.Counter()
        for a, b, generation in run.gc:
            if start <= a < end:
                spent[generation] += b - a
                runs[generation] += 1
        total = sum(spent.values())
        detail = ", ".join(f"gen{g}: {runs[g]} x, {spent[g]:.3f} s" for g in sorted(spent))
        print(f"  {name:<32} {total:6.3f} s of {end - start:5.2f} s ({total / (end - start):.0%}) {detail}")
    print(f"\nchrome trace: {trace_path} (open in https://ui.perfetto.dev)")


# --- the runs, side by side ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What `run_peers` (and the py-spy profile) run on."""

    events: int = 100_000
    keys: int = 10_000
    rate: int = 2_000  # events per second of event time
    rounds: int = 2  # rounds of streamer, quix, faust; one more streamer ends
    peers: tuple[str, ...] = PEERS
    cpu: int | None = None  # the measured processes' CPU (None: the first this process may use)
    timeout_s: float = 240.0  # per run
    settle_heap: bool = True  # False: streamer's process skips streamer.heap.settle_heap() (the old behaviour)


@dataclass
class Figures:
    """What `run_peers` measured: each peer's events/s, run by run in run order, and the runs whose windows
    were not the expected ones (empty: every run matched)."""

    events: int
    windows: int
    rates: dict[str, list[float]]
    mismatches: list[str]

    def ratio(self, peer: str) -> tuple[float, float, float] | None:
        """streamer's mean events/s over `peer`'s, and the range over runs (slowest streamer run over the
        fastest of `peer`, fastest over slowest); None unless both ran."""
        mine, theirs = self.rates.get("streamer"), self.rates.get(peer)
        if not mine or not theirs:
            return None
        return _mean(mine) / _mean(theirs), min(mine) / max(theirs), max(mine) / min(theirs)


@dataclass
class _Bench:
    bootstrap: str
    redis_url: str
    data: Input
    expected: Windows
    cpu: int
    services: set[int]
    tmp: Path


@contextlib.contextmanager
def _bench(options: Options) -> Iterator[_Bench]:
    """Prints the header, starts the broker and redis-server with this process on the services' CPUs, produces
    the input; yields what the runs need, and puts this process's CPUs back after."""
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[0] if options.cpu is None else options.cpu
    services = (set(cpus) - {cpu}) or {cpu}
    data = build_input(options.events, options.keys, options.rate)
    expected = expected_windows(data)
    print(f"machine: {_cpu_model()}, {os.cpu_count()} cpus, python {sys.version.split()[0]}, "
          f"faust-streaming {_faust_version()}, quixstreams {_quix_version()}")
    print(f"pinning: each measured process `taskset -c {cpu}`; broker, redis-server and this process on cpus "
          f"{sorted(services)}")
    print(f"input: {data.events:,} events + 1 flush marker, {options.keys:,} keys, {data.span_s:,.0f} s of event "
          f"time ({options.rate:,}/s), {sum(map(len, data.values)) / len(data.values):.0f} B each, 1 partition; "
          f"{len(expected):,} windows expected")
    if not options.settle_heap:
        print("streamer's process, a diagnostic: --no-settle-heap, settle_heap() skipped (the collector's "
              "defaults, nothing frozen: the behaviour before streamer.heap)")
    print(f"start: {_uptime()}")

    _pin(services)  # the broker and redis-server inherit this; the peers get taskset
    try:
        with (tempfile.TemporaryDirectory(prefix="peers-windows-") as tmp_dir, kafka_broker() as bootstrap,
              redis_server() as redis_url):
            create_topic(bootstrap, data.topic, partitions=1)
            produce_s = produce(bootstrap, data.topic, data.values, data.keys)
            assert end_offsets(bootstrap, data.topic) == {0: len(data.values)}
            print(f"produced {len(data.values):,} records in {produce_s:.2f} s")
            yield _Bench(bootstrap, redis_url, data, expected, cpu, services, Path(tmp_dir))
    finally:
        _pin(set(cpus))
    print(f"end: {_uptime()}")


def run_peers(options: Options) -> Figures:
    """The runs in A/B/A order, each checked window by window; prints the table and ratios, returns the figures."""
    if unknown := set(options.peers) - set(PEERS):
        raise ValueError(f"unknown peers {sorted(unknown)}")
    peers = [p for p in PEERS if p in options.peers]
    order = [p for _ in range(options.rounds) for p in peers] + (["streamer"] if "streamer" in peers else [])
    runs: list[Run] = []
    with _bench(options) as bench:
        data, expected = bench.data, bench.expected
        for i, peer in enumerate(order, 1):
            before = _load()
            if peer == "streamer":
                run = run_streamer(bench.bootstrap, bench.redis_url, data, len(expected), bench.cpu, bench.tmp,
                                   options.timeout_s, settle_heap=options.settle_heap)
            elif peer == "quix":
                run = run_quix(bench.bootstrap, data, len(expected), bench.cpu, bench.tmp, options.timeout_s)
            else:
                run = run_faust(bench.bootstrap, data, bench.cpu, bench.tmp, options.timeout_s)
            run.load = (before, _load())
            runs.append(run)
            print(f"  run {i}/{len(order)} {peer}: {run.span_s:.2f} s, {data.events / run.span_s:,.0f} events/s, "
                  f"{_check(run, expected)}", flush=True)

        n = data.events
        print()
        print(f"{'#':>2} {'peer':<9} {'start-up s':>10} {'first->last written s':>22} {'events/s':>9} "
              f"{'windows':>8} {'check':<6} {'load before/after':>17}  streamer: consumed s, commit s, cpu busy, "
              "objects frozen")
        for i, run in enumerate(runs, 1):
            extra = ""
            if run.peer == "streamer":
                extra = (f"  {run.extra['consumed_s']:.2f}, {run.extra['commit_s']:.2f}, "
                         f"{run.extra['cpu_s'] / run.extra['commit_s']:.0%}, {run.extra['frozen']:,.0f}")
            print(f"{i:>2} {run.peer:<9} {run.first_wall - run.launched_wall:>10.1f} {run.span_s:>22.2f} "
                  f"{n / run.span_s:>9,.0f} {len(run.windows):>8,} {_check(run, expected)[:8]:<6} "
                  f"{run.load[0] + ' / ' + run.load[1]:>17}{extra}")
        figures = Figures(n, len(expected), {p: [n / r.span_s for r in runs if r.peer == p] for p in peers},
                          [f"{i} {r.peer}" for i, r in enumerate(runs, 1) if r.windows != expected])
        print()
        for peer in peers:
            rates = figures.rates[peer]
            print(f"{peer:<9} events/s end to end: mean {_mean(rates):,.0f} "
                  f"(runs: {', '.join(f'{r:,.0f}' for r in rates)})")
        for peer in ("quix", "faust"):
            if ratio := figures.ratio(peer):
                print(f"ratio streamer / {peer}: {ratio[0]:.2f}x (range over runs {ratio[1]:.2f}x - {ratio[2]:.2f}x)")
        print(f"correctness: {len(expected):,} windows summing to {n:,} expected; "
              + (f"MISMATCH in runs {', '.join(figures.mismatches)}" if figures.mismatches
                 else "every run matches, window by window"))
    return figures


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _check(run: Run, expected: Windows) -> str:
    if run.windows == expected:
        return "OK"
    missing = len(expected.keys() - run.windows.keys())
    extra = len(run.windows.keys() - expected.keys())
    wrong = sum(1 for k in expected.keys() & run.windows.keys() if expected[k] != run.windows[k])
    return f"MISMATCH ({missing} missing, {extra} extra, {wrong} counts differ)"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# --- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=2_000, help="events per second of event time")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of streamer, quix, faust; one more streamer ends")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of streamer,quix,faust")
    parser.add_argument("--cpu", type=int, default=None, help="the measured processes' CPU (default: the first)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per run")
    parser.add_argument("--profile", choices=["py-spy"], default=None, help="profile one streamer run, nothing else")
    parser.add_argument("--py-spy", default=None, help="the py-spy executable (default: on PATH or in .venv/bin)")
    parser.add_argument("--profile-out", type=Path, default=None, help="where the chrome trace goes")
    parser.add_argument("--top", type=int, default=25, help="functions per profile table")
    parser.add_argument("--no-settle-heap", action="store_true",
                        help="diagnostic: streamer's process skips streamer.heap.settle_heap() (the old behaviour)")
    parser.add_argument("--streamer-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.streamer_child:
        streamer_child(json.loads(args.streamer_child))
        return

    peers = tuple(p for p in args.peers.split(",") if p)
    if unknown := set(peers) - set(PEERS):
        parser.error(f"unknown peers {sorted(unknown)}")
    options = Options(args.events, args.keys, args.rate, args.rounds, peers, args.cpu, args.timeout,
                      not args.no_settle_heap)
    if args.profile:
        py_spy = args.py_spy or shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
        if not Path(py_spy).exists():
            parser.error(f"{py_spy} missing: .venv/bin/pip install py-spy, or pass --py-spy PATH")
        with _bench(options) as bench:
            profile_streamer(bench.bootstrap, bench.redis_url, bench.data, bench.expected, bench.cpu, bench.services,
                             bench.tmp, options.timeout_s, py_spy, args.profile_out, args.top, options.settle_heap)
        return
    if run_peers(options).mismatches:
        sys.exit(1)


def _quix_version() -> str:
    meta = list((ROOT / ".venv-quix").glob("lib/python*/site-packages/quixstreams-*.dist-info"))
    return meta[0].name.removeprefix("quixstreams-").removesuffix(".dist-info") if meta else "?"


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    main()
