"""Incremental state in Redis: answers by id, a capped live stream, per-key and global counters.

Each outcome is applied by one Lua script that first claims a guard key for the event, so an event
re-processed after a restart is never counted twice. A batch's outcomes go in one pipeline.

Exactly-once mode adds a fence: `{p}:fence` holds, per input partition, the commit point of the last
batch applied. The same script skips an event whose offset is below its partition's fence, and the
batch (outcomes, then the new fence) runs as one MULTI, so a replay after a crash applies nothing twice
even once the per-event guards have expired.

Keys (prefix `streamer` by default):
  {p}:answer:{id}        the answer JSON, with a TTL
  {p}:answers            stream of recent answers (fields id, answer), capped with MAXLEN ~
  {p}:dead-letters       stream of recent dead letters (fields error, dead_letter), capped
  {p}:counters           hash: events, answers, dead_letters, dead_letters:{code}, tokens_in, tokens_out
  {p}:key:{key}          hash per event key: events, answers, dead_letters, tokens_in, tokens_out
  {p}:seen:{guard}       idempotency guard per event (answer: a:{id}; dead letter: d:{topic}:{partition}:{offset})
  {p}:late               hash: late events per route
  {p}:window:{id}        hash per window: result (JSON), final (0/1), route, key, end; expires like answers
  {p}:windows:{route}:{key}  sorted set of window ids by window end (key `*` for windows across all keys)
  {p}:windows:latest:{route} hash: key -> the latest result JSON of that key
  {p}:windows            pub/sub channel: every window result JSON as it is written
  {p}:fence              hash: topic:partition -> commit point of the last applied batch (exactly once)
  Counters also hold `windows` (final window results written).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamer.config import RedisSettings
from streamer.contracts import Answer, DeadLetter, WindowResult
from streamer.errors import StreamerError


class StateUnavailable(StreamerError):
    """Redis did not answer; the write may be retried as a whole (it is idempotent)."""


_APPLY = """
local p, ttl, maxlen, kind, guard, doc, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local fenced_tp, offset = ARGV[8], tonumber(ARGV[9])
if fenced_tp ~= '' and offset < tonumber(redis.call('HGET', p .. ':fence', fenced_tp) or '0') then return 0 end
if not redis.call('SET', p .. ':seen:' .. guard, '1', 'NX', 'EX', ttl) then return 0 end
local counters = p .. ':counters'
local per_key = p .. ':key:' .. key
redis.call('HINCRBY', counters, 'events', 1)
if key ~= '' then redis.call('HINCRBY', per_key, 'events', 1) end
if kind == 'answer' then
  local id, tokens_in, tokens_out = ARGV[10], ARGV[11], ARGV[12]
  redis.call('SET', p .. ':answer:' .. id, doc, 'EX', ttl)
  redis.call('HINCRBY', counters, 'answers', 1)
  redis.call('HINCRBY', counters, 'tokens_in', tokens_in)
  redis.call('HINCRBY', counters, 'tokens_out', tokens_out)
  if key ~= '' then
    redis.call('HINCRBY', per_key, 'answers', 1)
    redis.call('HINCRBY', per_key, 'tokens_in', tokens_in)
    redis.call('HINCRBY', per_key, 'tokens_out', tokens_out)
  end
  redis.call('XADD', p .. ':answers', 'MAXLEN', '~', maxlen, '*', 'id', id, 'answer', doc)
else
  local code = ARGV[10]
  redis.call('HINCRBY', counters, 'dead_letters', 1)
  redis.call('HINCRBY', counters, 'dead_letters:' .. code, 1)
  if key ~= '' then redis.call('HINCRBY', per_key, 'dead_letters', 1) end
  if code == 'late' then redis.call('HINCRBY', p .. ':late', ARGV[11], 1) end
  redis.call('XADD', p .. ':dead-letters', 'MAXLEN', '~', maxlen, '*', 'error', code, 'dead_letter', doc)
end
return 1
"""

# A final result is written once per window id; provisional ones only until the final one.
_WINDOW = """
local p, ttl, id, route, key, window_end, doc, final = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6],
  ARGV[7], ARGV[8]
local h = p .. ':window:' .. id
if redis.call('HGET', h, 'final') == '1' then return 0 end
redis.call('HSET', h, 'result', doc, 'final', final, 'route', route, 'key', key, 'end', window_end)
redis.call('EXPIRE', h, ttl)
redis.call('ZADD', p .. ':windows:' .. route .. ':' .. key, window_end, id)
redis.call('HSET', p .. ':windows:latest:' .. route, key, doc)
if final == '1' then redis.call('HINCRBY', p .. ':counters', 'windows', 1) end
redis.call('PUBLISH', p .. ':windows', doc)
return 1
"""


# Fences only move forward: a late-committing zombie cannot pull one back.
_FENCE = """
local h = ARGV[1] .. ':fence'
for i = 2, #ARGV, 2 do
  local old = tonumber(redis.call('HGET', h, ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > old then redis.call('HSET', h, ARGV[i], ARGV[i + 1]) end
end
return 1
"""


@dataclass(frozen=True)
class Written:
    """An outcome with its serialized form, as produced to Kafka."""

    record: Answer | DeadLetter | WindowResult
    payload: bytes
    key: str | None
    route: str


class RedisState:
    def __init__(self, settings: RedisSettings, url: str, *, kafka_decides_windows: bool = False) -> None:
        """`kafka_decides_windows` (exactly once): a window rebuilt by replay was never committed to its
        topic, whatever Redis says, so `windows_final` reports none final and the window is emitted again
        (Redis itself still applies a final result once)."""
        self._settings = settings
        self._kafka_decides_windows = kafka_decides_windows
        # Timeouts, so a hung Redis surfaces as StateUnavailable (retried) rather than a stalled write.
        self._client = aioredis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self._apply = self._client.register_script(_APPLY)
        self._apply_window = self._client.register_script(_WINDOW)
        self._fence = self._client.register_script(_FENCE)

    async def ping(self) -> None:
        """Fail fast, with a clear error, when Redis is unreachable at start."""
        try:
            await self._client.ping()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StateUnavailable(f"cannot reach Redis: {exc}") from None

    async def write(self, outcomes: Sequence[Written], fence: dict[tuple[str, int], int] | None = None) -> int:
        """Apply a batch of outcomes in one pipeline; returns how many were new (not seen before).

        With `fence` (exactly once: the batch's commit points), events below their partition's stored
        fence are skipped, and the batch and the fence's advance are applied atomically (MULTI)."""
        if not outcomes and not fence:
            return 0
        try:
            async with self._client.pipeline(transaction=fence is not None) as pipe:
                for outcome in outcomes:
                    script = self._apply_window if isinstance(outcome.record, WindowResult) else self._apply
                    await script(args=self._args(outcome, fenced=fence is not None), client=pipe)
                if fence:
                    points = [v for (topic, partition), point in fence.items() for v in (f"{topic}:{partition}", point)]
                    await self._fence(args=[self._settings.prefix, *points], client=pipe)
                applied = await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StateUnavailable(str(exc)) from exc
        return sum(int(a) for a in applied[: len(outcomes)])

    def _args(self, outcome: Written, *, fenced: bool) -> list[str | bytes | int]:
        s = self._settings
        record = outcome.record
        key = outcome.key or ""
        if isinstance(record, WindowResult):
            final = "1" if record.final else "0"
            return [s.prefix, s.answer_ttl_s, record.id, outcome.route, key or "*", record.window.end,
                    outcome.payload, final]
        src = record.source
        tp = f"{src.topic}:{src.partition}" if fenced else ""
        if isinstance(record, Answer):
            guard = f"a:{record.id}"
            return [s.prefix, s.answer_ttl_s, s.stream_maxlen, "answer", guard, outcome.payload, key, tp, src.offset,
                    record.id, record.tokens_in, record.tokens_out]
        guard = f"d:{src.topic}:{src.partition}:{src.offset}"
        return [s.prefix, s.answer_ttl_s, s.stream_maxlen, "dead", guard, outcome.payload, key, tp, src.offset,
                record.error.value, outcome.route]

    async def windows_final(self, window_ids: Sequence[str]) -> list[bool]:
        """Which windows already have a final result (e.g. written before a crash and replay); one round trip."""
        if self._kafka_decides_windows:
            return [False] * len(window_ids)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for window_id in window_ids:
                    pipe.hget(f"{self._settings.prefix}:window:{window_id}", "final")
                flags = await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StateUnavailable(str(exc)) from exc
        return [flag == b"1" for flag in flags]

    async def counters(self) -> dict[str, int]:
        raw = await self._client.hgetall(f"{self._settings.prefix}:counters")
        return {k.decode(): int(v) for k, v in raw.items()}

    async def aclose(self) -> None:
        await self._client.aclose()
