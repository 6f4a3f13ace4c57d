"""The deterministic simulation: the real pipeline (event handling, window stages, offset tracker, both
writers and their real sinks, the consume loop) on an in-memory partitioned log, Redis and model, driven
by hypothesis. The stand-ins replace only the transports: the pipeline's Kafka and Redis sinks
(streamer/pipeline/sinks) wrap `SimSink` or `SimProducer` and `SimState` as they wrap the real clients.

Rules produce events (valid, hostile, late, far-future), poll in batches of any size, complete or
fail model requests out of order, acknowledge or fail deliveries, end transactions, let time pass,
take Redis or the broker away, lose replies, crash and restart from the committed offsets, and
revoke, lose or assign back partitions (also inside a poll, and by exceeding max.poll.interval).

After every step: no committed offset has passed an event whose outcomes are not all durable; in
exactly-once mode the committed log holds no record twice. At the end (`teardown`), after every
fault has healed and the input is drained: window results and late events are exactly what the
brute-force oracle (tests/sim/oracle.py) says, whatever the batching, replays and rebalances; each
event has its outcome (exactly once, or at least once), and Redis counts each exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from streamer.config import Settings
from streamer.observe.metrics import Metrics
from streamer.pipeline.app import Edges, Pipeline
from streamer.state.redis import StateUnavailable
from streamer.tasks.chat import decode
from streamer.tasks.event import TASKS
from tests.sim.kafka import Cluster, SimProducer, SimSink, SimSource, Stored
from tests.sim.loop import Stalled, VirtualLoop
from tests.sim.model import SimPool, label_of
from tests.sim.oracle import Event, Expected, expect, tumbling
from tests.sim.state import SimState

BASE_MS = 1_700_000_000_000  # wall-clock epoch ms at virtual time 0
PARTITIONS = 3
KEYS = ("a", "b", "c", None)
LABELS = ("pos", "neg")
IDLE_MS = 10**12  # event-time mode: partitions never go idle mid-run, until the drain
WALL_CLOCK_IDLE_MS = 2000  # wall-clock mode: quiet partitions go idle and close windows by the clock
MAX_POLL_INTERVAL_S = 300.0
WINDOW = {"idle_timeout_ms": IDLE_MS, "output": "windows"}
TUMBLING = ("classify+tumbling", "none+tumbling+update", "none+summarize")
ROUTES: dict[str, dict[str, Any]] = {
    "classify+tumbling": {"task": "classify", "labels": list(LABELS), "output": "answers",
                          "window": {"kind": "tumbling", "size_ms": 1000, **WINDOW}},
    "answer+sliding": {"task": "answer", "output": "answers",
                       "window": {"kind": "sliding", "size_ms": 2000, "slide_ms": 500, **WINDOW}},
    "none+session": {"task": "none", "window": {"kind": "session", "gap_ms": 300, **WINDOW}},
    "classify+short-sessions": {"task": "classify", "labels": list(LABELS), "output": "answers",
                                "window": {"kind": "session", "gap_ms": 300, "max_duration_ms": 900, **WINDOW}},
    "none+tumbling+update": {"task": "none", "window": {"kind": "tumbling", "size_ms": 1000, "emit": "update",
                                                        "update_every_events": 3, **WINDOW}},
    "none+summarize": {"task": "none", "window": {"kind": "tumbling", "size_ms": 1000, "task": "summarize",
                                                  **WINDOW}},
    "none+summarize+panes": {"task": "none", "window": {"kind": "sliding", "size_ms": 2000, "slide_ms": 500,
                                                        "task": "summarize", **WINDOW}},  # shared pane summaries
    "answer": {"task": "answer", "output": "answers", "stream": True},  # its pieces go to Redis as well
    "chat": {"task": "chat", "output": "answers", "max_history_tokens": 16},  # a fold every few turns
}
EXCUSED = frozenset({"model_error", "stale_turn"})
"""Dead letters a valid event may end in instead of its answer: the model failed it; a chat turn dead-lettered so
and replayed after its conversation moved on."""
DEEP = b'{"id": "deep", "text": "x", "meta": {"x": ' + b"[" * 300 + b"]" * 300 + b"}}"
HOSTILE: dict[str, tuple[bytes, str]] = {  # the message, and the dead-letter code it must end as
    "deep meta, just allowed": (b'{"id": "d32", "text": "x", "meta": {"x": ' + b"[" * 31 + b"]" * 31 + b"}}", ""),
    "not json": (b"not json", "invalid_json"),
    "no id": (b'{"text": "no id"}', "schema"),
    "deep meta": (DEEP, "schema"),
    "control flood": (b"\x01" * 180_000, "invalid_json"),
    "huge id": (b'{"id": "' + b"i" * 800_000 + b'", "text": "x"}', "schema"),
    "u64 ts": (b'{"id": "u64", "text": "x", "ts": 18446744073709551615}', "schema"),
}


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """The pipeline logs every retry and rebalance; thousands of simulated runs need none of it."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


class SimClock:
    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop

    def now_ms(self) -> int:
        return BASE_MS + int(self._loop.time() * 1000)

    def monotonic_s(self) -> float:
        return self._loop.time()


class Instance:
    """One `streamer run` process on the simulated edges; `crash` drops it without a goodbye."""

    def __init__(self, settings: Settings, cluster: Cluster, state: SimState, loop: VirtualLoop,
                 attempts: Counter[str] | None = None) -> None:
        self.loop = loop
        self.pool = SimPool(settings.batching.max_queue, attempts)
        exactly_once = settings.processing.guarantee == "exactly_once"
        self.sink: SimSink | SimProducer = SimProducer(cluster) if exactly_once else SimSink(cluster)
        self.source: SimSource | None = None

        def open_source(rebalance: Any) -> SimSource:
            self.source = SimSource(cluster, rebalance, loop.time)
            return self.source

        self.clock = SimClock(loop)
        edges = Edges(pool=self.pool, state=state, sink=self.sink, open_source=open_source,  # type: ignore[arg-type]
                      clock=self.clock)
        self.pipeline = Pipeline(settings, edges, Metrics())
        loop.run_until_complete(self.pipeline.start())
        loop.settle()

    def turn(self, batch: int) -> None:
        assert self.source is not None
        self.source.batch_limit = batch
        self.loop.call(self.pipeline.turn)
        self.no_partition_with_input_waiting_is_idle()

    def no_partition_with_input_waiting_is_idle(self) -> None:
        """Idle means quiet: a partition whose records wait in Kafka (not handed out yet, e.g. while a
        throttled consumer hands out another partition's backlog first) is not idle, whatever the time
        since its last record, or its waiting records would turn late."""
        if self.source is None:
            return
        waiting = {tp for tp, behind in self.source.lag().items() if behind > 0}
        now_ms = self.clock.now_ms()
        for stage in self.pipeline.stages.values():
            idle = [tp for tp in waiting if stage.watermarks.assigned(tp) and stage.watermarks.idle(tp, now_ms)]
            assert not idle, f"partitions {idle} are idle though their input waits in Kafka"

    def healthy_step(self, then_s: float) -> None:
        """Poll, answer every request, write every outcome (acknowledged or committed), then let `then_s` pass."""
        self.turn(500)
        while self.pool.pending:
            self.pool.finish(0, ok=True)
        self.loop.settle()
        if isinstance(self.sink, SimSink):
            self.sink.deliver(10**9)
        else:
            self.sink.end()
        self.loop.advance(then_s)

    def crash(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.settle()
        if isinstance(self.sink, SimSink):
            self.sink.pending.clear()  # never acknowledged
        self.source = None


FAULTS = frozenset({"hostile", "future", "model", "stall", "redis", "broker", "commits", "crash", "rebalance"})


class Simulation(RuleBasedStateMachine):
    faults = FAULTS  # the fault rules this machine may use; `only` narrows them

    out_of_order = True  # events may come from behind (late ones among them)
    wall_clock = False  # quiet partitions go idle mid-run (tumbling routes only; no exact oracle then)

    @classmethod
    def only(cls, *faults: str, out_of_order: bool = True, wall_clock: bool = False) -> type[Simulation]:
        """A machine using only these fault rules (and every plain rule)."""
        unknown = set(faults) - FAULTS
        assert not unknown, f"unknown faults {unknown}; known: {sorted(FAULTS)}"
        name = (f"Simulation_{'_'.join(sorted(faults)) or 'none'}{'' if out_of_order else '_in_order'}"
                f"{'_wall_clock' if wall_clock else ''}")
        return type(name, (cls,), {"faults": frozenset(faults), "out_of_order": out_of_order,
                                   "wall_clock": wall_clock})

    def __init__(self) -> None:
        super().__init__()
        self.loop = VirtualLoop()
        asyncio.set_event_loop(self.loop)
        self.instance: Instance | None = None
        self.events: list[Event] = []
        self.event_ms = BASE_MS - 60_000
        self.failures = 0  # model requests failed: a classify window may then miss a label

    # --- set-up -----------------------------------------------------------------------------------
    @initialize(shape=st.sampled_from(sorted(ROUTES)), exactly_once=st.booleans(),
                lateness_ms=st.sampled_from([0, 250]))
    def configure(self, shape: str, exactly_once: bool, lateness_ms: int) -> None:
        if self.wall_clock and shape not in TUMBLING:
            shape = TUMBLING[sorted(ROUTES).index(shape) % len(TUMBLING)]
        route = {"name": "r", "input": "in", **ROUTES[shape]}
        if "window" in route:
            idle_ms = WALL_CLOCK_IDLE_MS if self.wall_clock else IDLE_MS
            route["window"] = {**route["window"], "allowed_lateness_ms": lateness_ms, "idle_timeout_ms": idle_ms}
        self.settings = Settings(
            kafka={"bootstrap_servers": "sim:9092", "dead_letter_topic": "dlq", "commit_interval_ms": 100},
            batching={"max_batch": 4, "max_queue": 8},
            processing={"guarantee": "exactly_once" if exactly_once else "at_least_once"},
            shutdown_timeout_s=5, routes=[route])
        self.route = self.settings.routes[0]
        self.exactly_once = exactly_once
        self.cluster = Cluster("in", PARTITIONS, 1_000_000, MAX_POLL_INTERVAL_S)
        self.cluster.committed_hook = self.no_commit_passes_an_unwritten_event
        self.state = SimState(kafka_decides_windows=exactly_once)
        self.attempts: Counter[str] = Counter()  # the model's, per prompt: a replay streams other deltas
        self.instance = Instance(self.settings, self.cluster, self.state, self.loop, self.attempts)

    # --- input ------------------------------------------------------------------------------------
    @rule(partition=st.integers(0, PARTITIONS - 1), key=st.sampled_from(KEYS), step_ms=st.integers(0, 400),
          behind_ms=st.sampled_from([0, 0, 0, 100, 600, 1500]))
    def produce(self, partition: int, key: str | None, step_ms: int, behind_ms: int) -> None:
        """A valid event; event time mostly moves forward, sometimes an event comes from behind."""
        self.event_ms = self.cluster_now_ms() if self.wall_clock else self.event_ms + step_ms
        n = len(self.events)
        ts_ms = self.event_ms - (behind_ms if self.out_of_order else 0)
        doc = {"id": f"e{n}", "key": key, "text": f"event {n}", "ts": ts_ms}
        code = "no_key" if key is None and TASKS[self.route.task].converses else None
        self._append(partition, orjson.dumps(doc), key, Event(partition, 0, key, ts_ms, f"event {n}", code))

    @precondition(lambda self: "hostile" in self.faults)
    @rule(partition=st.integers(0, PARTITIONS - 1), kind=st.sampled_from(sorted(HOSTILE)))
    def produce_hostile(self, partition: int, kind: str) -> None:
        """A message at or past a limit; one just within (code "") is a valid event timed by its record."""
        value, code = HOSTILE[kind]
        if code:
            self._append(partition, value, None, Event(partition, 0, None, 0, "", code))
        else:  # without a key: a chat route has no conversation to put it in
            code = "no_key" if TASKS[self.route.task].converses else None
            self._append(partition, value, None, Event(partition, 0, None, self.cluster_now_ms(), "x", code))

    @precondition(lambda self: "future" in self.faults)
    @rule(partition=st.integers(0, PARTITIONS - 1), years=st.sampled_from([1, 1000]))
    def produce_far_future(self, partition: int, years: int) -> None:
        """An event from a producer with a broken clock (or `ts` in microseconds)."""
        ts_ms = self.cluster_now_ms() + years * 365 * 86_400_000
        doc = {"id": f"f{len(self.events)}", "key": "a", "text": "from the future", "ts": ts_ms}
        self._append(partition, orjson.dumps(doc), "a", Event(partition, 0, "a", ts_ms, "", "future"))

    def _append(self, partition: int, value: bytes, key: str | None, event: Event) -> None:
        stored = Stored(key.encode() if key is not None else None, value, self.cluster_now_ms())
        offset = self.cluster.append(partition, stored)
        self.events.append(Event(event.partition, offset, event.key, event.ts_ms, event.text, event.code))

    def cluster_now_ms(self) -> int:
        return BASE_MS + int(self.loop.time() * 1000)

    # --- the pipeline's own pace ------------------------------------------------------------------
    @precondition(lambda self: self.instance is not None)
    @rule(batch=st.sampled_from([1, 2, 3, 7, 500]))
    def poll(self, batch: int) -> None:
        assert self.instance is not None
        self.instance.turn(batch)

    @precondition(lambda self: self.instance is not None)
    @rule()
    def pump(self) -> None:
        """Healthy progress in one step: poll, answer every request, acknowledge every record, and let
        a commit interval pass and poll again (so faults meet a pipeline that moves)."""
        assert self.instance is not None
        for _ in range(2):
            self.instance.healthy_step(0.15)

    @precondition(lambda self: self.instance is not None and self.instance.pool.pending)
    @rule(index=st.integers(0, 20), ok=st.sampled_from([True, True, True, False]))
    def finish_request(self, index: int, ok: bool) -> None:
        assert self.instance is not None
        ok = ok or "model" not in self.faults
        self.failures += not ok
        self.instance.pool.finish(index, ok=ok)
        self.loop.settle()

    @precondition(lambda self: isinstance(getattr(self.instance, "sink", None), SimSink))
    @rule(count=st.sampled_from([1, 3, 100]))
    def deliver(self, count: int) -> None:
        assert self.instance is not None and isinstance(self.instance.sink, SimSink)
        self.instance.sink.deliver(count)
        self.loop.settle()

    @precondition(lambda self: isinstance(getattr(self.instance, "sink", None), SimProducer))
    @rule()
    def end_transaction(self) -> None:
        assert self.instance is not None and isinstance(self.instance.sink, SimProducer)
        self.instance.sink.end()
        self.loop.settle()

    @rule(ms=st.sampled_from([5, 50, 200, 1000]))
    def wait(self, ms: int) -> None:
        self.loop.advance(ms / 1000)

    @precondition(lambda self: "stall" in self.faults)
    @rule(seconds=st.sampled_from([30, 400]))
    def stall(self, seconds: int) -> None:
        """The process gets no CPU for a while (a GC pause, a suspended VM): past max.poll.interval at 400 s."""
        self.loop.jump(seconds)

    # --- faults -----------------------------------------------------------------------------------
    @precondition(lambda self: "redis" in self.faults)
    @rule(up=st.booleans())
    def redis(self, up: bool) -> None:
        self.state.up = up

    @precondition(lambda self: "redis" in self.faults)
    @rule(lose=st.booleans())
    def redis_replies(self, lose: bool) -> None:
        self.state.lose_replies = lose

    @precondition(lambda self: "redis" in self.faults)
    @rule(slow=st.booleans())
    def redis_partials_slow(self, slow: bool) -> None:
        """Writes of streaming progress hang past partials.write_timeout_s (dropped, counted, never applied)."""
        self.state.slow_partials = slow

    @precondition(lambda self: "broker" in self.faults)
    @rule(up=st.booleans())
    def broker(self, up: bool) -> None:
        self.cluster.up = up

    @precondition(lambda self: "commits" in self.faults and self.instance is not None
                  and self.instance.source is not None)
    @rule(fail=st.booleans())
    def commits(self, fail: bool) -> None:
        assert self.instance is not None and self.instance.source is not None
        self.instance.source.commits_fail = fail

    @precondition(lambda self: "crash" in self.faults and self.instance is not None)
    @rule()
    def crash(self) -> None:
        assert self.instance is not None
        self.instance.crash()
        self.instance = None

    @precondition(lambda self: self.instance is None)
    @rule()
    def restart(self) -> None:
        """A supervisor starts the process again; with Redis away it stops at once (and is restarted later)."""
        try:
            self.instance = Instance(self.settings, self.cluster, self.state, self.loop, self.attempts)
        except StateUnavailable:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.settle()

    @precondition(lambda self: "rebalance" in self.faults and self.instance is not None
                  and self.instance.source is not None)
    @rule(kind=st.sampled_from(["revoke", "lose", "assign", "revoke midway"]),
          partitions=st.sets(st.integers(0, PARTITIONS - 1), min_size=1))
    def rebalance(self, kind: str, partitions: set[int]) -> None:
        assert self.instance is not None and self.instance.source is not None
        tps = [("in", p) for p in sorted(partitions)]
        if kind == "revoke midway":
            self.instance.source.revoke_midway = tps
        else:
            self.instance.source.rebalance(kind, tps)

    # --- what must hold after every step ----------------------------------------------------------
    @invariant()
    def no_commit_passes_an_unwritten_event(self) -> None:
        if not hasattr(self, "cluster"):
            return
        out = self._output()
        expected = self._expected()
        for event in self.events:
            if event.offset >= self.cluster.committed.get(("in", event.partition), 0):
                continue
            missing = out.missing(event, self._answers(event), expected)
            assert not missing, f"offset {event.offset} of partition {event.partition} is committed, but {missing}"

    @invariant()
    def exactly_once_means_once(self) -> None:
        if hasattr(self, "cluster") and self.exactly_once:
            twice = self._output().duplicates()
            assert not twice, f"read_committed readers see these twice: {twice[:5]}"

    # --- the end: heal, drain, compare with the oracle --------------------------------------------
    def teardown(self) -> None:
        try:
            if hasattr(self, "cluster"):
                self._drain()
                self._check_results()
        finally:
            if self.instance is not None:
                self.instance.crash()
            self.loop.close()
            asyncio.set_event_loop(None)

    def _drain(self) -> None:
        self.state.up, self.state.lose_replies, self.cluster.up = True, False, True
        self.state.slow_partials = False
        self.cluster.max_poll_interval_s = float("inf")
        if self.instance is None:
            self.restart()
        assert self.instance is not None and self.instance.source is not None
        self.instance.source.commits_fail = False
        phases = [("consume", self._consumed)] + [("close", self._committed)] * 3
        for phase, done in phases:
            if phase == "close":
                self.loop.jump(IDLE_MS / 1000 + 1)  # every partition idle: windows close by the wall clock
            for _ in range(200):
                self._heal_step()
                if done():
                    break
            if phase == "consume" and not done():
                raise Stalled(f"not consumed: {self.instance.source.position}, model {self.instance.pool.pending}")
        if not self._committed():
            raise Stalled(f"not committed: {self.cluster.committed}, ends {[len(p) for p in self.cluster.log]}")
        for _ in range(5):
            self._heal_step()

    def _heal_step(self) -> None:
        assert self.instance is not None and self.instance.source is not None
        self.instance.source.rebalance("assign", self.cluster.tps())  # every partition back (a no-op once owned)
        self.instance.healthy_step(0.05)

    def _consumed(self) -> bool:
        """Every message handed out and every model request answered."""
        assert self.instance is not None and self.instance.source is not None
        source = self.instance.source
        handed_out = all(tp in source.assigned and source.position[tp] == self.cluster.end(tp)
                         for tp in self.cluster.tps())
        return handed_out and not self.instance.pool.pending

    def _committed(self) -> bool:
        return all(self.cluster.committed.get(tp, 0) == self.cluster.end(tp) for tp in self.cluster.tps())

    def _output(self) -> Output:
        if getattr(self, "_out", None) is None or self._out.size != len(self.cluster.out):
            self._out = Output(self.cluster)
        return self._out

    def _expected(self) -> Expected:
        window = self.route.window
        if window is None:
            return Expected()
        valid = [e for e in self.events if e.code is None]
        if self.wall_clock:  # which events are late depends on timing: take the pipeline's word, check the rest
            return tumbling(self.route.name, window, valid, self._output().late())
        return expect(self.route.name, window, valid)

    def _answers(self, event: Event) -> bool:
        """Whether this event must have a per-event record (an answer, or a dead letter)."""
        return event.code is not None or self.route.task != "none"

    def _check_results(self) -> None:
        out = self._output()
        expected = self._expected()
        for event in self.events:
            missing = out.missing(event, self._answers(event), expected)
            assert not missing, f"event {event.offset} of partition {event.partition}: {missing}"
        if self.exactly_once:
            assert not out.duplicates()
        assert not out.provisional_after_final(), "a provisional result came after its window's final one"
        window = self.route.window
        if window is not None and self.wall_clock:
            self._check_wall_clock_windows(out)
        elif window is not None:
            results = out.final_windows()
            assert set(results) == set(expected.windows), (
                f"windows emitted but not expected: {sorted(set(results) - set(expected.windows))[:3]}; "
                f"expected, not emitted: {sorted(set(expected.windows) - set(results))[:3]}")
            for wid, members in expected.windows.items():
                result = results[wid]
                assert result["count"] == len(members), f"window {wid}: {result['count']} != {len(members)}"
                if self.route.task == "classify" and not self.failures:
                    labels = Counter(label_of(m.text, LABELS) for m in members)
                    assert result["labels"] == dict(labels), f"window {wid}: labels"
            late = out.late()
            assert late == expected.late, f"late: {sorted(late ^ expected.late)[:5]} disagree with the oracle"
        self._check_redis(out, expected)
        self._check_conversations(out)

    def _check_conversations(self, out: Output) -> None:
        """Each conversation's history in Redis holds each turn at most once, a partition's turns in offset
        order, every turn answered on the topic (the history is written before the answer), and no turn is lost:
        each is in the history or dead-lettered. Every answer on the topic of a turn in the history is the
        history's, byte for byte (a replay writes the first answer again)."""
        if not TASKS[self.route.task].converses:
            return
        by_id = {f"e{n}": event for n, event in enumerate(self.events)}
        held: dict[str, str] = {}
        for (_, key), (doc, _) in self.state.chats.items():
            ids = [event_id for event_id, _ in decode(doc).answers]
            assert len(ids) == len(set(ids)), f"conversation {key}: a turn twice in its history: {ids}"
            assert all(by_id[i].key == key for i in ids), f"conversation {key}: another's turn in {ids}"
            for partition in range(PARTITIONS):
                offsets = [by_id[i].offset for i in ids if by_id[i].partition == partition]
                assert offsets == sorted(offsets), f"conversation {key}: turns out of order: {ids}"
            held |= dict(decode(doc).answers)
        for event_id, event in by_id.items():
            if event.code is not None:
                continue
            where = (event.partition, event.offset)
            assert event_id in held or out.letters_of(where) & EXCUSED, f"turn {event_id} lost"
        for answer in out.answers:
            if answer["id"] in held:
                assert answer == orjson.loads(held[answer["id"]]), f"turn {answer['id']}: not the history's answer"

    def _check_wall_clock_windows(self, out: Output) -> None:
        """Which events are late depends on timing here, and an event judged late just after its partition
        went idle may be judged again, otherwise, by a replay within a commit interval (README, Windows):
        a window then counts it besides its late record. Nothing is ever lost or counted twice in one
        window: each window counts at least its members that are not late, and at most all of them."""
        window = self.route.window
        assert window is not None
        everything = tumbling(self.route.name, window, [e for e in self.events if e.code is None], set())
        late = out.late()
        for wid, result in out.final_windows().items():
            members = everything.windows.get(wid, [])
            in_time = [m for m in members if (m.partition, m.offset) not in late]
            assert len(in_time) <= result["count"] <= len(members), (wid, result["count"], len(in_time), len(members))

    def _check_redis(self, out: Output, expected: Expected) -> None:
        """Each event counted once, whatever the replays: the first written per-event outcome wins. (In
        wall-clock mode a replay may judge an event late that Redis, fenced, counted in a window, or the
        other way round: README, Windows; its own outcome still counts once.)"""
        per_event = out.per_event_sources()
        counters = self.state.counters
        non_late = counters["dead_letters"] - counters["dead_letters:late"]
        assert counters["answers"] + non_late == len(per_event), (counters, len(per_event))
        if self.wall_clock:
            return
        late = len(expected.late)
        assert counters["events"] == len(per_event) + late, (counters, len(per_event), late)
        assert counters["dead_letters:late"] == late
        assert counters["windows"] == len(out.final_windows())
        self._check_partials()

    def _check_partials(self) -> None:
        """What readers of streaming progress were promised. Of `partial:{route}:{id}` (the stand-in keeps it as the
        Lua script does): one run, its seq counting up (a gap where deltas were dropped, the first ones
        included), at most one final marker and it last (a dropped marker is no marker), and a run shown from
        seq 0 without a gap up to a final marker without an error joins to the answer in Redis. Of the
        `partials` stream: one event's runs never mix (once a newer run of an id is written, no delta of an
        older one follows: the process that ran it is gone, or retired it). The model splits each attempt's
        answer elsewhere, so deltas of two runs spliced together would not join."""
        for event_id, stream in self.state.streams.items():
            assert len({d.run for d in stream}) == 1, stream
            seqs = [d.seq for d in stream]
            assert seqs == sorted(set(seqs)), stream
            finals = [d.final for d in stream]
            assert finals.count(True) <= 1 and (True not in finals or finals[-1]), stream
            answer = self.state.answers.get(event_id)
            if finals[-1] and stream[-1].error is None and seqs == list(range(len(stream))) and answer:
                assert "".join(d.delta for d in stream) == orjson.loads(answer)["output"], stream
        runs: dict[str, list[str]] = {}  # id -> its runs in the order they were first written
        for delta in self.state.partials:
            seen = runs.setdefault(delta.id, [])
            if not seen or seen[-1] != delta.run:
                assert delta.run not in seen, f"{delta.id}: run {delta.run} written again after a newer run"
                seen.append(delta.run)


class Output:
    """The output topics as a read_committed reader sees them (at least once: as acknowledged)."""

    def __init__(self, cluster: Cluster) -> None:
        self.size = len(cluster.out)
        docs = [(w.topic, orjson.loads(w.value)) for w in cluster.out]
        self.answers = [d for t, d in docs if t == "answers"]
        self.letters = [d for t, d in docs if t == "dlq"]
        self.windows = [d for t, d in docs if t == "windows"]
        self._answered = {_source(d) for d in self.answers}
        self._codes: dict[tuple[int, int], set[str]] = {}
        for letter in self.letters:
            self._codes.setdefault(_source(letter), set()).add(letter["error"])
        self._finals = {d["id"]: d for d in self.windows if d["final"]}

    def letters_of(self, where: tuple[int, int]) -> set[str]:
        """The dead-letter codes of the event at (partition, offset)."""
        return self._codes.get(where, set())

    def late(self) -> set[tuple[int, int]]:
        return {where for where, codes in self._codes.items() if "late" in codes}

    def per_event_sources(self) -> set[tuple[int, int]]:
        """Events with an answer or a dead letter of their own (not a late record)."""
        return self._answered | {where for where, codes in self._codes.items() if codes - {"late"}}

    def final_windows(self) -> dict[str, dict[str, Any]]:
        return self._finals

    def provisional_after_final(self) -> list[str]:
        """Windows with a provisional result after their final one: a reader keeping the latest record per
        window id (or a compacted topic) would keep the provisional count."""
        final: set[str] = set()
        stale = []
        for doc in self.windows:
            if doc["final"]:
                final.add(doc["id"])
            elif doc["id"] in final:
                stale.append(doc["id"])
        return stale

    def duplicates(self) -> list[str]:
        keys = [f"answer {_source(d)}" for d in self.answers]
        keys += [f"{d['error']} {_source(d)}" for d in self.letters]
        keys += [f"window {d['id']}" for d in self.windows if d["final"]]
        return [key for key, n in Counter(keys).items() if n > 1]

    def missing(self, event: Event, answers: bool, expected: Expected) -> str:
        """What of this event's outcomes is not on the output topics ('' when nothing)."""
        where = (event.partition, event.offset)
        codes = self._codes.get(where, set())
        if answers:
            letters = codes - {"late"}
            if event.code is not None and event.code not in letters:
                return f"no {event.code} dead letter (has {sorted(letters)})"
            if event.code is None and where not in self._answered and not letters & EXCUSED:
                return "no answer"
        if event.code is not None:
            return ""
        if where in expected.late:
            return "" if "late" in codes else "no late dead letter"
        gone = [w for w in expected.membership.get(where, []) if w not in self._finals]
        return f"its windows {gone} have no final result" if gone else ""


def _source(doc: dict[str, Any]) -> tuple[int, int]:
    return doc["source"]["partition"], doc["source"]["offset"]
