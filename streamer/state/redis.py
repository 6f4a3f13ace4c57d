"""Incremental state in Redis: answers by id, capped live streams, per-key and global counters, windows,
answers kept for reuse (written by the answer's own script, so kept exactly when applied), and the
deltas of streaming answers (`append_partials`: progress, best effort, unguarded).

Each event's outcome is applied by one Lua script that first claims a guard key for the event, so an
event re-processed after a restart is never counted twice; window results, guarded by their window's
final flag, go many to a script call. A batch's outcomes go in one pipeline. Every name
comes from `streamer.state.keys` (README, "Redis data model"), passed to the scripts as KEYS.

Exactly-once mode adds a fence: `{p}:fence` holds, per input partition, the commit point of the last
batch applied. The same script skips an event whose offset is below its partition's fence, and the
batch (outcomes, then the new fence) runs as one MULTI, so a replay after a crash applies nothing twice
even once the per-event guards have expired.

Nothing grows without bound: per-event, per-key and per-window keys expire `answer_ttl_s` after their
last write; streams are capped near `stream_maxlen`; a window index keeps its `window_index_max` newest
ids and a route's latest results their `latest_keys_max` most recently updated keys. The rest (counters,
late counts, the fence) are hashes with one field per error code, route or partition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MasterDownError, OutOfMemoryError, ReadOnlyError, RedisError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamer.config import RedisSettings
from streamer.contracts import Answer, DeadLetter, ErrorCode, WindowResult
from streamer.errors import StreamerError
from streamer.pipeline.pieces import Delta
from streamer.state.keys import Keys, encode_key


class StateUnavailable(StreamerError):
    """Redis did not answer, or refused for now (full, read-only, loading, busy); the write may be retried
    as a whole (it is idempotent)."""


# Shared head of the event scripts. KEYS[1] fence, KEYS[2] guard, KEYS[3] counters, KEYS[4] per-key hash ('' for
# an event without a key); ARGV[1] fence field ('' when not fenced), ARGV[2] offset, ARGV[3] ttl.
_CLAIM = """
local fence_field, offset, ttl, keyed = ARGV[1], tonumber(ARGV[2]), ARGV[3], KEYS[4] ~= ''
if fence_field ~= '' and offset < tonumber(redis.call('HGET', KEYS[1], fence_field) or '0') then return 0 end
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ttl) then return 0 end
local function count(field, by)
  redis.call('HINCRBY', KEYS[3], field, by)
  if keyed then redis.call('HINCRBY', KEYS[4], field, by) end
end
count('events', 1)
if keyed then redis.call('EXPIRE', KEYS[4], ttl) end
"""

# KEYS[5] answer, KEYS[6] answers stream, KEYS[7] reuse entry ('' when answers are not reused); ARGV[4] doc,
# ARGV[5] id, ARGV[6] tokens in, ARGV[7] out, ARGV[8] maxlen, ARGV[9] the digest of what the answer answered.
_ANSWER = _CLAIM + """
redis.call('SET', KEYS[5], ARGV[4], 'EX', ttl)
count('answers', 1)
count('tokens_in', ARGV[6])
count('tokens_out', ARGV[7])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[8], '*', 'id', ARGV[5], 'answer', ARGV[4])
-- Last and never fatal: Lua writes are not rolled back, so a key of another type in the entry's place
-- (a leftover, a foreign writer) must cost only its reuse, not the answer's counters after the claim.
if KEYS[7] ~= '' then
  local kept = redis.pcall('HSET', KEYS[7], 'digest', ARGV[9], 'answer', ARGV[4])
  if type(kept) ~= 'table' then redis.call('EXPIRE', KEYS[7], ttl) end  -- an error reply is a table
end
return 1
"""

# KEYS[5] dead-letters stream, KEYS[6] late; ARGV[4] doc, ARGV[5] code, ARGV[6] route, ARGV[7] maxlen.
_DEAD_LETTER = _CLAIM + """
count('dead_letters', 1)
redis.call('HINCRBY', KEYS[3], 'dead_letters:' .. ARGV[5], 1)
if ARGV[5] == 'late' then redis.call('HINCRBY', KEYS[6], ARGV[6], 1) end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', 'error', ARGV[5], 'dead_letter', ARGV[4])
return 1
"""

# The dead letter standing for a window result that could not be written: no event of its own, so it is
# claimed by the result's id and counted as a dead letter only. KEYS: guard, counters, dead-letters stream;
# ARGV: ttl, doc, code, maxlen.
_RESULT_LETTER = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[2], 'dead_letters', 1)
redis.call('HINCRBY', KEYS[2], 'dead_letters:' .. ARGV[3], 1)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'error', ARGV[3], 'dead_letter', ARGV[2])
return 1
"""

# Window results, many per script call (a call per result was 37% of committing 10k windows). A final result
# is written once per window id; provisional ones only until the final one.
# KEYS: counters, then per result: its window hash, (route, key) index, route's latest hash, its update order.
# ARGV: ttl, index max, latest max, channel, then per result: doc, final, route, encoded key, window end, id,
# emitted_at. Returns how many were applied.
_WINDOWS = """
local ttl, index_max, latest_max, channel = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local applied = 0
for i = 0, (#KEYS - 1) / 4 - 1 do
  local k, a = 1 + 4 * i, 4 + 7 * i
  local doc, final, key, id = ARGV[a + 1], ARGV[a + 2], ARGV[a + 4], ARGV[a + 6]
  if redis.call('HGET', KEYS[k + 1], 'final') ~= '1' then
    redis.call('HSET', KEYS[k + 1], 'result', doc, 'final', final, 'route', ARGV[a + 3], 'key', key,
               'end', ARGV[a + 5])
    redis.call('EXPIRE', KEYS[k + 1], ttl)
    redis.call('ZADD', KEYS[k + 2], ARGV[a + 5], id)
    redis.call('ZREMRANGEBYRANK', KEYS[k + 2], 0, -index_max - 1)
    redis.call('EXPIRE', KEYS[k + 2], ttl)
    redis.call('HSET', KEYS[k + 3], key, doc)
    redis.call('ZADD', KEYS[k + 4], ARGV[a + 7], key)
    local excess = redis.call('ZCARD', KEYS[k + 4]) - latest_max
    if excess > 0 then
      for _, old in ipairs(redis.call('ZRANGE', KEYS[k + 4], 0, excess - 1)) do
        redis.call('HDEL', KEYS[k + 3], old)
      end
      redis.call('ZREMRANGEBYRANK', KEYS[k + 4], 0, excess - 1)
    end
    redis.call('EXPIRE', KEYS[k + 3], ttl)
    redis.call('EXPIRE', KEYS[k + 4], ttl)
    if final == '1' then redis.call('HINCRBY', KEYS[1], 'windows', 1) end
    redis.call('PUBLISH', channel, doc)
    applied = applied + 1
  end
end
return applied
"""

# Which windows have a final result, many per call (a pipeline of HGETs cost the client twice as much).
# KEYS: window hashes; returns 1 or 0 per key.
_FINALS = """
local flags = {}
for i, key in ipairs(KEYS) do flags[i] = redis.call('HGET', key, 'final') == '1' and 1 or 0 end
return flags
"""

# Window results or keys per script call: each call holds Redis for a few milliseconds at most.
SCRIPT_BATCH = 256


# Kept answers, one command for a whole poll (half the client's cost of a pipeline of HMGETs). KEYS: reuse
# entries; returns (digest, answer) per key, nils where none is kept.
_LOOKUP = """
local found = {}
for i, key in ipairs(KEYS) do  -- a key of another type is no kept answer, not a failed poll
  local pair = redis.pcall('HMGET', key, 'digest', 'answer')
  if pair['err'] then pair = {false, false} end  -- a reply array has no 'err' field
  found[i] = pair
end
return found
"""


# One delta of a streaming answer onto its event's stream, which holds one run: an entry of another run (a
# replay's, or the run this one replays) is deleted first, whichever of either run's writes were dropped.
# KEYS[1] partial:{route}:{id}; ARGV run, seq, delta, final, error, maxlen, ttl_s.
_PARTIAL = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then
  local fields, run = last[1][2], nil
  for i = 1, #fields, 2 do
    if fields[i] == 'run' then run = fields[i + 1] end
  end
  if run ~= ARGV[1] then redis.call('DEL', KEYS[1]) end
end
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[6], '*', 'seq', ARGV[2], 'delta', ARGV[3], 'final', ARGV[4],
           'error', ARGV[5], 'run', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[7])
"""


# A conversation's history replaced only where it is still the revision it was read at: of two writers (a
# zombie and the partition's new owner, say) the second re-reads and finds the turn the first appended.
# KEYS[1] chat:{route}:{key}; ARGV revision read, new document, ttl.
_CONVERSATION = """
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'doc', ARGV[2], 'rev', rev + 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


# Fences only move forward: a late-committing zombie cannot pull one back. KEYS[1] fence; ARGV field, point...
_FENCE = """
for i = 1, #ARGV, 2 do
  local old = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > old then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""


@dataclass(frozen=True)
class Written:
    """An outcome with its serialized form, as produced to Kafka; an answer with a `digest` is kept for
    reuse beside it (`Keys.reuse`)."""

    record: Answer | DeadLetter | WindowResult
    payload: bytes
    key: str | None
    route: str
    digest: str | None = None


@dataclass(frozen=True)
class Stored:
    """An answer kept for reuse: the digest of the event, route and model it answered, and its exact bytes."""

    digest: str
    answer: bytes


Call = tuple[AsyncScript, list[str], list[str | bytes | int]]


class RedisState:
    def __init__(self, settings: RedisSettings, url: str, *, kafka_decides_windows: bool = False) -> None:
        """`kafka_decides_windows` (exactly once): a window rebuilt by replay was never committed to its
        topic, whatever Redis says, so `windows_final` reports none final and the window is emitted again
        (Redis itself still applies a final result once)."""
        self._settings = settings
        self._keys = Keys(settings.prefix)
        self._kafka_decides_windows = kafka_decides_windows
        # Timeouts, so a hung Redis surfaces as StateUnavailable (retried) rather than a stalled write.
        self._client = aioredis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self._answer = self._client.register_script(_ANSWER)
        self._dead_letter = self._client.register_script(_DEAD_LETTER)
        self._windows = self._client.register_script(_WINDOWS)
        self._finals = self._client.register_script(_FINALS)
        self._result_letter = self._client.register_script(_RESULT_LETTER)
        self._fence = self._client.register_script(_FENCE)
        self._lookup = self._client.register_script(_LOOKUP)
        self._partial = self._client.register_script(_PARTIAL)
        self._conversation = self._client.register_script(_CONVERSATION)

    async def ping(self) -> None:
        """Fail fast, with a clear error, when Redis is unreachable at start."""
        try:
            await self._client.ping()
        except RedisError as exc:  # at start, any error: the message says what is wrong
            raise StateUnavailable(f"cannot reach Redis: {exc}") from None

    async def write(self, outcomes: Sequence[Written], fence: dict[tuple[str, int], int] | None = None) -> int:
        """Apply a batch of outcomes in one pipeline; returns how many were new (not seen before).

        With `fence` (exactly once: the batch's commit points), events below their partition's stored
        fence are skipped, and the batch and the fence's advance are applied atomically (MULTI)."""
        if not outcomes and not fence:
            return 0
        fenced = fence is not None
        calls = [self._call(o, fenced=fenced) for o in outcomes if not isinstance(o.record, WindowResult)]
        windows = [o for o in outcomes if isinstance(o.record, WindowResult)]
        calls += [self._window_call(windows[i:i + SCRIPT_BATCH]) for i in range(0, len(windows), SCRIPT_BATCH)]
        try:
            async with self._client.pipeline(transaction=fenced) as pipe:
                for script, keys, args in calls:
                    await script(keys=keys, args=args, client=pipe)
                if fence:
                    points = [v for (topic, partition), point in fence.items() for v in (f"{topic}:{partition}", point)]
                    await self._fence(keys=[self._keys.fence], args=points, client=pipe)
                applied = await pipe.execute()
        except RedisError as exc:
            raise _unavailable(exc) from exc
        return sum(int(a) for a in applied[: len(calls)])

    def _window_call(self, outcomes: Sequence[Written]) -> Call:
        """One script call applying these window results in order."""
        s, k = self._settings, self._keys
        keys = [k.counters]
        args: list[str | bytes | int] = [s.answer_ttl_s, s.window_index_max, s.latest_keys_max, k.channel]
        for outcome in outcomes:
            record = outcome.record
            assert isinstance(record, WindowResult)
            keys += [k.window(record.id), k.windows(outcome.route, record.key), k.latest(outcome.route),
                     k.latest_order(outcome.route)]
            args += [outcome.payload, "1" if record.final else "0", outcome.route, encode_key(record.key),
                     record.window.end, record.id, record.emitted_at]
        return self._windows, keys, args

    def _call(self, outcome: Written, *, fenced: bool) -> Call:
        s, k, record = self._settings, self._keys, outcome.record
        assert not isinstance(record, WindowResult), "window results go through _window_call"
        src = record.source
        if src is None:  # a dead letter standing for a window result: no event to claim or count
            assert isinstance(record, DeadLetter)
            return self._result_letter, [k.result_guard(record.id or ""), k.counters, k.dead_letters], [
                s.answer_ttl_s, outcome.payload, record.error.value, s.stream_maxlen]
        claim = [f"{src.topic}:{src.partition}" if fenced else "", src.offset, s.answer_ttl_s]
        per_key = "" if outcome.key is None else k.per_key(outcome.key)
        if isinstance(record, Answer):
            keep = "" if outcome.digest is None else k.reuse(outcome.route, record.id)
            keys = [k.fence, k.event_guard(src.topic, src.partition, src.offset), k.counters, per_key,
                    k.answer(record.id), k.answers, keep]
            return self._answer, keys, [*claim, outcome.payload, record.id, record.tokens_in, record.tokens_out,
                                        s.stream_maxlen, outcome.digest or ""]
        guard = k.late_guard if record.error is ErrorCode.LATE else k.event_guard
        keys = [k.fence, guard(src.topic, src.partition, src.offset), k.counters, per_key, k.dead_letters, k.late]
        return self._dead_letter, keys, [*claim, outcome.payload, record.error.value, outcome.route,
                                         s.stream_maxlen]

    async def stored_answers(self, wanted: Sequence[tuple[str, str]]) -> list[Stored | None]:
        """The answers kept for reuse of these (route, event id) pairs, None where none is; one round trip."""
        if not wanted:
            return []
        try:
            found = await self._lookup(keys=[self._keys.reuse(route, event_id) for route, event_id in wanted])
        except RedisError as exc:
            raise _unavailable(exc) from exc
        return [Stored(digest.decode(), answer) if digest is not None and answer is not None else None
                for digest, answer in found]

    async def conversation(self, route: str, key: str) -> tuple[bytes | None, int]:
        """A conversation's history document (None: none yet) and its revision, for `save_conversation`."""
        try:
            doc, rev = await self._client.hmget(self._keys.chat(route, key), ["doc", "rev"])
        except RedisError as exc:
            raise _unavailable(exc) from exc
        return doc, int(rev or 0)

    async def save_conversation(self, route: str, key: str, doc: bytes, rev: int) -> bool:
        """Replace the history if it is still at revision `rev`; False: another writer moved it (read again).
        It expires `answer_ttl_s` after its last turn."""
        try:
            saved = await self._conversation(keys=[self._keys.chat(route, key)],
                                             args=[rev, doc, self._settings.answer_ttl_s])
        except RedisError as exc:
            raise _unavailable(exc) from exc
        return bool(saved)

    async def append_partials(self, deltas: Sequence[Delta], ttl_s: int, maxlen: int) -> None:
        """Append deltas of streaming answers to each event's stream and to the capped stream of all, in one
        pipeline. Not guarded: progress is best effort. An event's stream holds one run (`Delta.run`): a delta
        of another run than its last entry's deletes it first, so a reader never sees two runs of one event
        mixed there, even where a run's first deltas were dropped."""
        k = self._keys
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for d in deltas:
                    fields: dict[str | bytes, str | bytes | int] = {
                        "seq": d.seq, "delta": d.delta, "final": int(d.final), "error": d.error or ""}
                    await self._partial(keys=[k.partial(d.route, d.id)],
                                        args=[d.run, d.seq, d.delta, int(d.final), d.error or "", maxlen, ttl_s],
                                        client=pipe)
                    pipe.xadd(k.partials, {"id": d.id, "route": d.route, "run": d.run, **fields},
                              maxlen=self._settings.stream_maxlen, approximate=True)
                await pipe.execute()
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def windows_final(self, window_ids: Sequence[str]) -> list[bool]:
        """Which windows already have a final result (e.g. written before a crash and replay); one round trip."""
        if self._kafka_decides_windows or not window_ids:
            return [False] * len(window_ids)
        keys = [self._keys.window(window_id) for window_id in window_ids]
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for i in range(0, len(keys), SCRIPT_BATCH):
                    await self._finals(keys=keys[i:i + SCRIPT_BATCH], client=pipe)
                chunks = await pipe.execute()
        except RedisError as exc:
            raise _unavailable(exc) from exc
        return [flag == 1 for chunk in chunks for flag in chunk]

    async def counters(self) -> dict[str, int]:
        try:
            raw = await self._client.hgetall(self._keys.counters)
        except RedisError as exc:
            raise _unavailable(exc) from exc
        return {k.decode(): int(v) for k, v in raw.items()}

    async def aclose(self) -> None:
        await self._client.aclose()


# What passes by itself: Redis unreachable or out of clients (ConnectionError, TimeoutError), loading its data
# after a restart (LOADING, a ConnectionError too), full under noeviction (OOM), a replica or a failover
# (READONLY, MASTERDOWN), a resharding (TRYAGAIN); and, with no class of their own, a long script (BUSY) and writes
# refused after a failed background save (MISCONF, until a save succeeds: a full or lost disk). In a MULTI,
# redis-py raises the error that made Redis discard the transaction (EXECABORT), so it counts the same.
_PASSING = (RedisConnectionError, RedisTimeoutError, OutOfMemoryError, ReadOnlyError, MasterDownError, TryAgainError)
_PASSING_CODES = frozenset({"BUSY", "MISCONF"})


def _unavailable(exc: RedisError) -> RedisError | StateUnavailable:
    """StateUnavailable for what passes by itself, so the writer backs off and retries (and the pipeline pauses
    its input); the error itself for anything else: a bug or a misconfiguration, which retrying would hide."""
    if isinstance(exc, _PASSING) or getattr(exc, "status_code", None) in _PASSING_CODES:
        return StateUnavailable(str(exc))
    return exc
