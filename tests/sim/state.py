"""Redis in memory, with the rules of the Lua scripts in streamer/state/redis.py: per-event guards,
the exactly-once fence, final window results written once, the counters. A batch applies atomically
or not at all; an outage refuses it, and a lost reply applies it and then reports a failure, the
case that makes idempotency matter. The rules are the ones tests/integration/test_redis_state.py checks on
the real scripts (no test runs both side by side).
It stands where `RedisState` does: under the pipeline's Redis sink (`State` in streamer/pipeline/sinks/redis.py).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import orjson

from streamer.contracts import Answer, WindowResult
from streamer.pipeline.pieces import Delta
from streamer.state.redis import StateUnavailable, Stored, Written


class SimState:
    def __init__(self, *, kafka_decides_windows: bool = False) -> None:
        self.kafka_decides_windows = kafka_decides_windows
        self.counters: Counter[str] = Counter()
        self.per_key: dict[str, Counter[str]] = {}
        self.late: Counter[str] = Counter()
        self.seen: set[str] = set()
        self.fence: dict[str, int] = {}
        self.windows: dict[str, tuple[bool, bytes]] = {}  # id -> (final, result JSON)
        self.answers: dict[str, bytes] = {}
        self.kept: dict[tuple[str, str], Stored] = {}  # (route, id) -> the answer kept for reuse
        self.slow_lookups: asyncio.Event | None = None  # set: look-ups answer only once it is set
        self.partials: list[Delta] = []  # streaming answers' progress as applied, in order (the `partials` stream)
        self.streams: dict[str, list[Delta]] = {}  # partial:{route}:{id} (one route): one run, as append_partials keeps
        self.slow_partials = False  # partial writes hang (past partials.write_timeout_s: dropped, never applied)
        self.chats: dict[tuple[str, str], tuple[bytes, int]] = {}  # chat:{route}:{key} -> (doc, rev)
        self.up = True
        self.lose_replies = False  # apply a write, then fail as if its reply never came

    async def ping(self) -> None:
        if not self.up:
            raise StateUnavailable("cannot reach Redis")

    async def write(self, outcomes: Sequence[Written], fence: dict[tuple[str, int], int] | None = None) -> int:
        if not self.up:
            raise StateUnavailable("Connection refused")
        applied = sum(self._apply(o, fenced=fence is not None) for o in outcomes)
        for (topic, partition), point in (fence or {}).items():
            name = f"{topic}:{partition}"
            self.fence[name] = max(point, self.fence.get(name, 0))
        if self.lose_replies:
            raise StateUnavailable("Timeout reading from socket")
        return applied

    def _apply(self, outcome: Written, *, fenced: bool) -> bool:
        record = outcome.record
        if isinstance(record, WindowResult):
            return self._window(record, outcome.payload)
        src = record.source
        if src is None:  # the dead letter of a window result: guarded by the result's id, no event
            guard = f"r:{record.id}"
            if guard in self.seen:
                return False
            self.seen.add(guard)
            self.counters.update({"dead_letters": 1, f"dead_letters:{record.error.value}": 1})
            return True
        if fenced and src.offset < self.fence.get(f"{src.topic}:{src.partition}", 0):
            return False
        late = not isinstance(record, Answer) and record.error.value == "late"
        guard = f"{'l' if late else 'e'}:{src.topic}:{src.partition}:{src.offset}"
        if guard in self.seen:
            return False
        self.seen.add(guard)
        key = outcome.key or ""
        self.counters["events"] += 1
        per_key = self.per_key.setdefault(key, Counter()) if key else Counter()
        per_key["events"] += 1
        if isinstance(record, Answer):
            self.answers[record.id] = outcome.payload
            if outcome.digest is not None:
                self.kept[(outcome.route, record.id)] = Stored(outcome.digest, outcome.payload)
            self.counters.update({"answers": 1, "tokens_in": record.tokens_in, "tokens_out": record.tokens_out})
            per_key.update({"answers": 1})
        else:
            self.counters.update({"dead_letters": 1, f"dead_letters:{record.error.value}": 1})
            per_key.update({"dead_letters": 1})
            if record.error.value == "late":
                self.late[outcome.route] += 1
        return True

    def _window(self, result: WindowResult, payload: bytes) -> bool:
        final, _ = self.windows.get(result.id, (False, b""))
        if final:
            return False
        self.windows[result.id] = (result.final, payload)
        if result.final:
            self.counters["windows"] += 1
        return True

    async def stored_answers(self, wanted: Sequence[tuple[str, str]]) -> list[Stored | None]:
        if self.slow_lookups is not None:
            await self.slow_lookups.wait()
        if not self.up:
            raise StateUnavailable("Connection refused")
        return [self.kept.get(pair) for pair in wanted]

    async def append_partials(self, deltas: Sequence[Delta], ttl_s: int, maxlen: int) -> None:
        """As RedisState's: each delta onto its event's stream, which a delta of another run replaces (the
        Lua script's DEL), trimmed to `maxlen`; refused while Redis is away, hanging while slow, applied and
        then failed while replies are lost."""
        if not self.up:
            raise StateUnavailable("Connection refused")
        if self.slow_partials:
            await asyncio.sleep(3600)
        for d in deltas:
            stream = self.streams.setdefault(d.id, [])
            if stream and stream[-1].run != d.run:
                stream.clear()
            stream.append(d)
            del stream[:-maxlen]
        self.partials += deltas
        if self.lose_replies:
            raise StateUnavailable("Timeout reading from socket")

    async def conversation(self, route: str, key: str) -> tuple[bytes | None, int]:
        if not self.up:
            raise StateUnavailable("Connection refused")
        doc, rev = self.chats.get((route, key), (None, 0))
        return doc, rev

    async def save_conversation(self, route: str, key: str, doc: bytes, rev: int) -> bool:
        """As the Lua script: replaced only at the revision it was read at; a lost reply applies it and fails."""
        if not self.up:
            raise StateUnavailable("Connection refused")
        saved = self.chats.get((route, key), (b"", 0))[1] == rev
        if saved:
            self.chats[(route, key)] = (doc, rev + 1)
        if self.lose_replies:
            raise StateUnavailable("Timeout reading from socket")
        return saved

    async def windows_final(self, window_ids: Sequence[str]) -> list[bool]:
        if not window_ids:  # as the real one: nothing to ask Redis
            return []
        if not self.up:
            raise StateUnavailable("Connection refused")
        if self.kafka_decides_windows:
            return [False] * len(window_ids)
        return [self.windows.get(i, (False, b""))[0] for i in window_ids]

    def final_windows(self) -> dict[str, dict[str, object]]:
        return {i: orjson.loads(doc) for i, (final, doc) in self.windows.items() if final}

    async def aclose(self) -> None:
        return None
