"""Overload soak: `streamer run` fed at twice its measured capacity, watched for memory, lag and loss.

    .venv/bin/python -m bench.soak [--minutes 10] [--factor 2] [--probe-events 300] [--rss-growth-mib 256]
    make test-soak                                   # the same for 2 minutes

One broker and one redis-server (bench/services.py); the real default model answers every event
(`max_new_tokens` 8). In one run, against one service process:

  capacity  a burst of --probe-events events is answered; capacity = events / seconds to answer them all.
  overload  events go in at --factor x capacity for --minutes, paced against a start clock.
  drain     input stops; the service works off the backlog.

Every --sample-s seconds it samples the resident memory of the service (RSS of its process tree),
the consumer lag (log end minus the group's committed offset, summed over partitions, as the broker
sees it), the model queue depth (/metrics) and the answers so far (Redis counter). It checks, and
exits 1 when one fails:
  - the RSS never exceeds its value after the capacity phase by more than --rss-growth-mib: the
    backlog stays in Kafka, because a full queue pauses the consumer, not in the process;
  - the lag grows during the overload and is back to 0 after the drain;
  - every event sent is answered: the output topic, de-duplicated by id, holds exactly the ids sent
    (duplicates are counted and shown; at-least-once allows them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import redis
import yaml

from bench.services import kafka_broker, redis_server
from streamer.kafka.tools import produce_lines
from streamer.state.server import free_port
from tests.integration.services import (
    committed_offsets,
    consume_all,
    counters,
    create_topic,
    end_offsets,
    unique_name,
)

_QUEUE_DEPTH = re.compile(r"^streamer_queue_depth (\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class Sample:
    t_s: float  # since the overload started
    phase: str  # overload | drain
    rss_mib: float
    lag: int
    queue_depth: float
    answers: int


@dataclass(frozen=True)
class Service:
    """The `streamer run` process under test and where to look at it."""

    proc: subprocess.Popen[bytes]
    bootstrap: str
    group: str
    topic_in: str
    topic_out: str
    prefix: str
    http_port: int
    state: redis.Redis

    def answers(self) -> int:
        return counters(self.state, self.prefix).get("answers", 0)

    def lag(self) -> int:
        ends = end_offsets(self.bootstrap, self.topic_in)
        done = committed_offsets(self.bootstrap, self.group, self.topic_in)
        return sum(end - done.get(p, 0) for p, end in ends.items())

    def queue_depth(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as response:
            found = _QUEUE_DEPTH.search(response.read().decode())
        return float(found[1]) if found else float("nan")

    def rss_mib(self) -> float:
        return tree_rss_bytes(self.proc.pid) / 2**20


def tree_rss_bytes(root: int) -> int:
    """Resident bytes of a process and all its descendants (a worker process counts too)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)[1]) * 1024
    return total


def events(prefix: str, start: int, count: int) -> Iterator[bytes]:
    for i in range(start, start + count):
        yield orjson.dumps({"id": f"{prefix}-{i}", "key": f"k{i % 8}", "text": f"Name a fruit, number {i}."})


def wait_until(condition, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"soak: timed out waiting for {what}; service log tail:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def service(bootstrap: str, redis_url: str, workdir: Path, max_new_tokens: int) -> Iterator[Service]:
    tag = unique_name("soak")
    port = free_port()
    config = workdir / "streamer.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"g-{tag}", "dead_letter_topic": f"dlq-{tag}",
                  "commit_interval_ms": 500},
        "redis": {"url": redis_url, "prefix": tag},
        "observe": {"http_host": "127.0.0.1", "http_port": port},
        "routes": [{"name": "q", "input": f"in-{tag}", "output": f"out-{tag}", "max_new_tokens": max_new_tokens}],
    }))
    # before the service subscribes: a consumer learns of a topic created later only at its next
    # metadata refresh (5 minutes by default)
    create_topic(bootstrap, f"in-{tag}", partitions=3)
    log = workdir / "service.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    svc = Service(proc, bootstrap, f"g-{tag}", f"in-{tag}", f"out-{tag}", tag, port, redis.Redis.from_url(redis_url))
    try:
        yield svc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ready(svc: Service) -> bool:
    if svc.proc.poll() is not None:
        sys.exit(f"soak: streamer run exited with {svc.proc.returncode}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{svc.http_port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def sample(svc: Service, started_s: float, phase: str) -> Sample:
    return Sample(time.monotonic() - started_s, phase, svc.rss_mib(), svc.lag(), svc.queue_depth(), svc.answers())


def run(args: argparse.Namespace) -> int:
    with (tempfile.TemporaryDirectory(prefix="streamer-soak-") as tmp, kafka_broker() as bootstrap,
          redis_server() as redis_url, service(bootstrap, redis_url, Path(tmp), args.max_new_tokens) as svc):
        log = Path(tmp) / "service.log"
        client = {"bootstrap.servers": bootstrap}
        wait_until(lambda: ready(svc), 300, "/readyz", log)

        # capacity: a burst, answered as fast as the service can
        warm = 16
        produce_lines(client, svc.topic_in, events(svc.prefix, 0, warm))
        wait_until(lambda: svc.answers() >= warm, 300, "the warm-up answers", log)
        probe_started_s = time.monotonic()
        produce_lines(client, svc.topic_in, events(svc.prefix, warm, args.probe_events))
        sent = warm + args.probe_events
        wait_until(lambda: svc.answers() >= sent, 600, "the capacity probe", log)
        capacity = args.probe_events / (time.monotonic() - probe_started_s)
        rss_base_mib = svc.rss_mib()
        rate = args.factor * capacity
        overload = round(rate * args.minutes * 60)
        print(f"capacity {capacity:.1f} events/s; feeding {rate:.1f}/s for {args.minutes:g} min "
              f"({overload} events); RSS after the probe {rss_base_mib:.0f} MiB", flush=True)

        # overload, then drain
        feeder = threading.Thread(target=produce_lines, args=(client, svc.topic_in, events(svc.prefix, sent, overload)),
                                  kwargs={"rate": rate, "timeout_s": 120}, daemon=True)
        started_s = time.monotonic()
        feeder.start()
        samples: list[Sample] = []
        while feeder.is_alive():
            samples.append(sample(svc, started_s, "overload"))
            time.sleep(args.sample_s)
        feeder.join()
        input_stopped_s = time.monotonic() - started_s
        sent += overload
        drain_deadline_s = time.monotonic() + max(600.0, 4 * args.minutes * 60)
        while (samples[-1].answers < sent or samples[-1].lag > 0) and time.monotonic() < drain_deadline_s:
            time.sleep(args.sample_s)
            samples.append(sample(svc, started_s, "drain"))
        drained_s = samples[-1].t_s - input_stopped_s

        answered = consume_all(bootstrap, svc.topic_out, sent, timeout_s=120)
        ids = [orjson.loads(r.value)["id"] for r in answered]
        missing = {f"{svc.prefix}-{i}" for i in range(sent)} - set(ids)
        duplicates = len(ids) - len(set(ids))

    for s in samples[:: max(1, len(samples) // 40)]:
        print(f"  t={s.t_s:6.0f}s {s.phase:8s} rss={s.rss_mib:6.0f} MiB lag={s.lag:6d} "
              f"queue={s.queue_depth:4.0f} answers={s.answers}")
    during = [s for s in samples if s.phase == "overload"]
    peak_rss = max(s.rss_mib for s in samples)
    bound = rss_base_mib + args.rss_growth_mib
    lag_at_stop = during[-1].lag
    checks = {
        f"RSS peak {peak_rss:.0f} MiB <= bound {bound:.0f} MiB (after the probe + {args.rss_growth_mib})":
            peak_rss <= bound,
        f"lag grew: {during[len(during) // 4].lag} at 25% of the overload -> {lag_at_stop} at its end":
            lag_at_stop > during[len(during) // 4].lag,
        f"lag drained to {samples[-1].lag} within {drained_s:.0f} s after the input stopped": samples[-1].lag == 0,
        f"events sent {sent}, answered (distinct ids) {len(set(ids))}, lost {len(missing)}": not missing,
    }
    print(f"soak: capacity {capacity:.1f}/s, offered {rate:.1f}/s ({args.factor:g}x) for {input_stopped_s:.0f} s; "
          f"peak queue depth {max(s.queue_depth for s in samples):.0f}; peak lag {max(s.lag for s in samples)}; "
          f"duplicates {duplicates}")
    for text, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {text}")
    return 0 if all(checks.values()) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="overload duration")
    parser.add_argument("--factor", type=float, default=2.0, help="offered load / measured capacity")
    parser.add_argument("--probe-events", type=int, default=300, help="burst size of the capacity probe")
    parser.add_argument("--rss-growth-mib", type=float, default=256.0, help="allowed RSS growth over the overload")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--sample-s", type=float, default=2.0)
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
