"""Tumbling 60 s count per key through a real broker: streamer's Pipeline vs a faust-streaming table.

    .venv/bin/python -m bench.windows_kafka [--events 200000] [--keys 10000] [--rate 2000]
    .venv/bin/python -m bench.windows_kafka --skip-faust --profile cprofile   # where streamer's time goes

One broker and one redis-server (bench/services.py). N JSON events {"id", "key", "text", "ts"} go to
a fresh 1-partition topic: keys uniform at random, `ts` rising at `--rate` events per event-time
second, ending minutes before now. One more record follows them, a flush marker 2 minutes of event
time later, so the watermark passes every window of the N events the way a live stream would (no
wait for the idle timeout). Then, one after the other, on that same topic:

  streamer  a Pipeline with one route, `task: none` plus a tumbling 60 s `count` window; final window
            results go to a Kafka topic and Redis, and an event's offset is committed only once every
            window it joined is written. Timed: (consumed) from the first event handed to the event
            handler to the last; (end to end) from the first event handed over to the commit that
            covers all N events, i.e. every window closed and its result acknowledged by Kafka and in
            Redis. The model is loaded (the Pipeline wants one) and unused: no count route calls it.
  faust     bench/faust_count.py as a real Faust worker in its own venv (.venv-faust): the same
            count in a windowed table (in-memory store + changelog topic). Timed inside its agent:
            from the first record reaching the agent to the last one counted. Start-up excluded.
  engine    the in-process window engine (bench/windows.py's loop, no Kafka) on the same keys and
            event times, for scale.

With 2+ CPUs the broker and redis-server are started pinned to all CPUs but the last, and the measured
process (this one for streamer; the Faust worker, its child, for Faust) runs pinned to the last one:
"one core" literally, librdkafka's and aiokafka's threads included. "cpu busy" is that process's
CPU time over the timed span. Streamer's commit interval is 100 ms here (1 s by default), so the
end-to-end figure is not quantised by it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import logging
import os
import platform
import pstats
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson
import torch
from confluent_kafka import KafkaError, Message, Producer

from bench.services import kafka_broker, redis_server
from bench.windows import CASES, make_events
from bench.windows import run as run_engine
from streamer.config import ModelSettings, Settings
from streamer.engine.build import resident
from streamer.engine.load import load_worker
from streamer.pipeline.app import Pipeline, connect
from tests.integration.services import committed_offsets, consume_all, create_topic, end_offsets

ROOT = Path(__file__).resolve().parents[1]
FAUST_PYTHON = ROOT / ".venv-faust" / "bin" / "python"
WINDOW_MS = 60_000
FLUSH_KEY = "~flush"


@dataclass(frozen=True)
class Input:
    topic: str
    values: list[bytes]
    keys: list[bytes]
    events: int  # without the flush marker
    span_s: float
    engine_events: list  # (key, ts_ms, doc, ref), for the in-process engine


@dataclass(frozen=True)
class StreamerFigures:
    consumed_s: float
    end_to_end_s: float
    cpu_s: float  # CPU time of this process (all its threads) over the end-to-end span
    windows: int
    counted: int
    late: int
    committed: int


@dataclass(frozen=True)
class FaustFigures:
    elapsed_s: float
    cpu_s: float
    events: int
    windows: int
    counted: int
    startup_s: float


# --- input ------------------------------------------------------------------------------------------------


def build_input(count: int, keys: int, rate: int) -> Input:
    """bench.windows' events without jitter (`ts` never decreases), moved to end minutes before now."""
    events = make_events(count, keys, rate, jitter_ms=0)
    first_ms, last_ms = events[0][1], events[-1][1]
    now_ms = int(time.time() * 1000)
    t0_ms = (now_ms - (last_ms - first_ms) - 5 * WINDOW_MS) // WINDOW_MS * WINDOW_MS  # window-aligned
    shift = t0_ms - first_ms
    values, msg_keys, shifted = [], [], []
    for i, (key, ts_ms, doc, ref) in enumerate(events):
        ts_ms += shift
        values.append(orjson.dumps({"id": f"e{i}", "key": key, "text": doc.text, "ts": ts_ms}))
        msg_keys.append(key.encode())
        shifted.append((key, ts_ms, doc, ref))
    flush_ts = last_ms + shift + 2 * WINDOW_MS
    values.append(orjson.dumps({"id": "flush", "key": FLUSH_KEY, "text": "flush", "ts": flush_ts}))
    msg_keys.append(FLUSH_KEY.encode())
    return Input(f"events-{uuid.uuid4().hex[:8]}", values, msg_keys, count, (last_ms - first_ms) / 1000, shifted)


def produce(bootstrap: str, topic: str, values: list[bytes], keys: list[bytes]) -> float:
    """Batched, not flushed per message; returns seconds taken. Raises unless every record is acknowledged."""
    failed: list[KafkaError] = []

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failed.append(err)

    producer = Producer({
        "bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 50,
        "batch.size": 1_000_000, "compression.type": "none", "queue.buffering.max.messages": 1_000_000,
    })
    started = time.perf_counter()
    for value, key in zip(values, keys, strict=True):
        while True:
            try:
                producer.produce(topic, value, key=key, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
    left = producer.flush(60)
    if left or failed:
        raise RuntimeError(f"{left} records not delivered; errors: {failed[:3]}")
    return time.perf_counter() - started


# --- streamer ---------------------------------------------------------------------------------------------


def streamer_settings(bootstrap: str, topic: str, tag: str, max_queue: int | None) -> Settings:
    batching = {"max_queue": max_queue} if max_queue else {}
    return Settings(
        kafka={"bootstrap_servers": bootstrap, "group_id": f"bench-{tag}", "dead_letter_topic": f"dlq-{tag}",
               "partitions": 1, "commit_interval_ms": 100},
        redis={"prefix": f"bench-{tag}"},
        model={"threads": 1},
        batching=batching,
        routes=[{"name": "counts", "input": topic, "task": "none",
                 "window": {"kind": "tumbling", "size_ms": WINDOW_MS, "task": "count", "output": f"win-{tag}"}}],
    )


async def _timed_run(pipeline: Pipeline, topic: str, last_offset: int,
                     timeout_s: float) -> tuple[float, float, float]:
    """(first accepted -> last accepted, first accepted -> commit covering `last_offset`, CPU seconds
    this process used over the latter), in seconds.

    Reads the pipeline without changing its code: the event handler's `accept` is wrapped for the
    first event only (then the class's method is back), and the OffsetTracker is looked at every 2 ms.
    """
    handler, tracker = pipeline._handler, pipeline._tracker  # a benchmark may read internals
    marks: dict[str, float] = {}
    original = handler.accept

    def first_accept(message, now_ms: int) -> None:
        marks["first"], marks["cpu_first"] = time.perf_counter(), time.process_time()
        del handler.accept
        original(message, now_ms)

    handler.accept = first_accept
    stop = asyncio.Event()
    running = asyncio.create_task(pipeline.run(stop))
    deadline = time.monotonic() + timeout_s
    try:
        while not running.done() and time.monotonic() < deadline:
            part = tracker._parts.get((topic, 0))
            if part is not None:
                now = time.perf_counter()
                if "last" not in marks and part.last_tracked >= last_offset:
                    marks["last"] = now
                if part.committed is not None and part.committed.offset >= last_offset:
                    marks["committed"], marks["cpu_committed"] = now, time.process_time()
                    break
            await asyncio.sleep(0.002)
    finally:
        stop.set()
        await running
    if "committed" not in marks:
        raise RuntimeError(f"streamer did not commit offset {last_offset} within {timeout_s} s")
    return (marks["last"] - marks["first"], marks["committed"] - marks["first"],
            marks["cpu_committed"] - marks["cpu_first"])


def run_streamer(bootstrap: str, redis_url: str, worker, data: Input, max_queue: int | None,
                 profile: str | None, profile_out: Path | None) -> StreamerFigures:
    tag = uuid.uuid4().hex[:8]
    settings = streamer_settings(bootstrap, data.topic, tag, max_queue)
    pipeline = connect(settings, bootstrap, redis_url, resident(worker, settings))
    flush_offset = len(data.values) - 1  # committed >= this: every counted event is done
    coro = _timed_run(pipeline, data.topic, flush_offset, timeout_s=120)
    if profile == "cprofile":
        profiler = cProfile.Profile()
        consumed_s, e2e_s, cpu_s = profiler.runcall(asyncio.run, coro)
        _report_cprofile(profiler, profile_out)
    elif profile == "pyinstrument":
        from pyinstrument import Profiler  # optional: .venv/bin/pip install pyinstrument

        with Profiler(interval=0.0005, async_mode="disabled") as profiler:
            consumed_s, e2e_s, cpu_s = asyncio.run(coro)
        text = profiler.output_text(unicode=True, color=False, show_all=False)
        if profile_out:
            profile_out.write_text(text)
            print(f"pyinstrument profile written to {profile_out}")
        else:
            print(text)
    else:
        consumed_s, e2e_s, cpu_s = asyncio.run(coro)
    stage = pipeline.stages["counts"]
    results = [orjson.loads(r.value) for r in consume_all(bootstrap, f"win-{tag}", pipeline.windows_written, 60)]
    committed = committed_offsets(bootstrap, f"bench-{tag}", data.topic).get(0, 0)
    return StreamerFigures(consumed_s, e2e_s, cpu_s, len(results), sum(r["count"] for r in results),
                           stage.late, committed)


def _report_cprofile(profiler: cProfile.Profile, out: Path | None) -> None:
    if out:
        profiler.dump_stats(str(out))
        print(f"cProfile stats written to {out} (e.g. .venv/bin/python -m pstats {out})")
    for order in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).strip_dirs().sort_stats(order).print_stats(30)
        print(f"--- cProfile, top 30 by {order} ---")
        print(buf.getvalue())


# --- faust ------------------------------------------------------------------------------------------------


def run_faust(bootstrap: str, data: Input, timeout_s: float) -> FaustFigures:
    if not FAUST_PYTHON.exists():
        raise RuntimeError(f"{FAUST_PYTHON} missing: python3 -m venv .venv-faust && "
                           ".venv-faust/bin/pip install faust-streaming==0.15.3 orjson")
    with tempfile.TemporaryDirectory(prefix="faust-bench-") as tmp:
        out, log = Path(tmp) / "result.json", Path(tmp) / "worker.log"
        env = {**os.environ, "FAUST_BENCH_BROKER": f"kafka://{bootstrap}", "FAUST_BENCH_TOPIC": data.topic,
               "FAUST_BENCH_EXPECTED": str(len(data.values)), "FAUST_BENCH_APP": f"faust-{uuid.uuid4().hex[:8]}",
               "FAUST_BENCH_DATADIR": str(Path(tmp) / "data"), "FAUST_BENCH_OUT": str(out)}
        env.pop("PYTHONPATH", None)
        started = time.time()
        with log.open("wb") as log_file:
            worker = subprocess.Popen(
                [str(FAUST_PYTHON), "-m", "bench.faust_count", "worker", "-l", "warn", "--without-web"],
                cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while not out.exists():
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"faust worker {'exited' if worker.poll() is not None else 'timed out'};"
                                       f" log tail:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            report = json.loads(out.read_text())
        finally:
            _stop(worker)
    return FaustFigures(report["elapsed_s"], report["cpu_s"], report["events"], report["windows"], report["counted"],
                        report["first_wall"] - started)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# --- machine ------------------------------------------------------------------------------------------------


def _pin(cpus: set[int]) -> None:
    """Every thread of this process onto `cpus`; threads and children started later inherit it."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _faust_version() -> str:
    meta = list((ROOT / ".venv-faust").glob("lib/python*/site-packages/faust_streaming-*.dist-info"))
    return meta[0].name.removeprefix("faust_streaming-").removesuffix(".dist-info") if meta else "?"


# --- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=2_000, help="events per second of event time")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="streamer batching.max_queue (default: the config default); it also caps a poll")
    parser.add_argument("--skip-faust", action="store_true")
    parser.add_argument("--faust-timeout", type=float, default=240.0)
    parser.add_argument("--profile", choices=["cprofile", "pyinstrument"], default=None,
                        help="profile the streamer run (its figures then include the profiler's overhead)")
    parser.add_argument("--profile-out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cpus = sorted(os.sched_getaffinity(0))
    measured, services = ({cpus[-1]}, set(cpus[:-1])) if len(cpus) >= 2 else (set(cpus), set(cpus))
    data = build_input(args.events, args.keys, args.rate)
    print(f"machine: {_cpu_model()}, {os.cpu_count()} cpus, python {platform.python_version()}, "
          f"torch {torch.__version__}, faust-streaming {_faust_version()}")
    print(f"pinning: broker + redis-server on cpus {sorted(services)}, measured process on cpu {sorted(measured)}")
    print(f"input: {data.events:,} events + 1 flush marker, {args.keys:,} keys, {data.span_s:,.0f} s of event time "
          f"({args.rate:,}/s), {sum(map(len, data.values)) / len(data.values):.0f} B each, 1 partition")

    _pin(services)  # the broker and redis-server inherit this
    with kafka_broker() as bootstrap, redis_server() as redis_url:
        _pin(measured)
        torch.set_num_threads(1)
        create_topic(bootstrap, data.topic, partitions=1)
        produce_s = produce(bootstrap, data.topic, data.values, data.keys)
        assert end_offsets(bootstrap, data.topic) == {0: len(data.values)}
        print(f"produced {len(data.values):,} records in {produce_s:.2f} s")

        worker = load_worker(ModelSettings(threads=1))
        ours = run_streamer(bootstrap, redis_url, worker, data, args.max_queue, args.profile, args.profile_out)
        del worker
        theirs = None if args.skip_faust else run_faust(bootstrap, data, args.faust_timeout)

    engine = run_engine(CASES[0], data.engine_events, poll=500, keep_events=False)  # per key: a partition's engine
    n, m = data.events, len(data.values)
    print()
    print(f"{'':<52} {'seconds':>8} {'events/s':>10} {'cpu busy':>9}")
    print(f"{'engine in-process (bench.windows loop, no Kafka)':<52} {engine.elapsed_s:>8.2f} "
          f"{engine.events / engine.elapsed_s:>10,.0f}")
    print(f"{'streamer: consumed (first -> last event accepted)':<52} {ours.consumed_s:>8.2f} "
          f"{m / ours.consumed_s:>10,.0f}")
    print(f"{'streamer: end to end (first accepted -> committed)':<52} {ours.end_to_end_s:>8.2f} "
          f"{n / ours.end_to_end_s:>10,.0f} {ours.cpu_s / ours.end_to_end_s:>9.0%}")
    if theirs:
        print(f"{'faust: processed (first -> last event counted)':<52} {theirs.elapsed_s:>8.2f} "
              f"{theirs.events / theirs.elapsed_s:>10,.0f} {theirs.cpu_s / theirs.elapsed_s:>9.0%}")
    print()
    ok = ours.counted == n and ours.late == 0 and ours.committed >= m - 1
    print(f"streamer: {ours.windows:,} final window results, counts sum {ours.counted:,} "
          f"(expected {n:,}), {ours.late} late, committed offset {ours.committed:,} -> {'OK' if ok else 'MISMATCH'}")
    if theirs:
        fok = theirs.counted == m and theirs.events == m
        print(f"faust: {theirs.windows:,} (key, window) entries, counts sum {theirs.counted:,} (expected {m:,}, "
              f"the flush marker included) -> {'OK' if fok else 'MISMATCH'}; first record reached the agent "
              f"{theirs.startup_s:.1f} s after the worker was launched (not timed)")
        faust_rate = theirs.events / theirs.elapsed_s
        print(f"ratio streamer consumed / faust processed:   {m / ours.consumed_s / faust_rate:.1f}x")
        print(f"ratio streamer end to end / faust processed: {n / ours.end_to_end_s / faust_rate:.1f}x")
        print(f"ratio engine in-process / faust processed:   {engine.events / engine.elapsed_s / faust_rate:.1f}x")
    if args.profile:
        print("(streamer figures include the profiler's overhead)")


if __name__ == "__main__":
    main()
