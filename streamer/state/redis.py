"""Incremental state in Redis: answers by id, a capped live stream, per-key and global counters.

Each outcome is applied by one Lua script that first claims a guard key for the event, so an event
re-processed after a restart is never counted twice. A batch's outcomes go in one pipeline.

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
if not redis.call('SET', p .. ':seen:' .. guard, '1', 'NX', 'EX', ttl) then return 0 end
local counters = p .. ':counters'
local per_key = p .. ':key:' .. key
redis.call('HINCRBY', counters, 'events', 1)
if key ~= '' then redis.call('HINCRBY', per_key, 'events', 1) end
if kind == 'answer' then
  local id, tokens_in, tokens_out = ARGV[8], ARGV[9], ARGV[10]
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
  local code = ARGV[8]
  redis.call('HINCRBY', counters, 'dead_letters', 1)
  redis.call('HINCRBY', counters, 'dead_letters:' .. code, 1)
  if key ~= '' then redis.call('HINCRBY', per_key, 'dead_letters', 1) end
  if code == 'late' then redis.call('HINCRBY', p .. ':late', ARGV[9], 1) end
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


@dataclass(frozen=True)
class Written:
    """An outcome with its serialized form, as produced to Kafka."""

    record: Answer | DeadLetter | WindowResult
    payload: bytes
    key: str | None
    route: str


class RedisState:
    def __init__(self, settings: RedisSettings, url: str) -> None:
        self._settings = settings
        self._client = aioredis.Redis.from_url(url)
        self._apply = self._client.register_script(_APPLY)
        self._apply_window = self._client.register_script(_WINDOW)

    async def ping(self) -> None:
        """Fail fast, with a clear error, when Redis is unreachable at start."""
        try:
            await self._client.ping()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StateUnavailable(f"cannot reach Redis: {exc}") from None

    async def write(self, outcomes: Sequence[Written]) -> int:
        """Apply a batch of outcomes in one pipeline; returns how many were new (not seen before)."""
        if not outcomes:
            return 0
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for outcome in outcomes:
                    script = self._apply_window if isinstance(outcome.record, WindowResult) else self._apply
                    await script(args=self._args(outcome), client=pipe)
                applied = await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StateUnavailable(str(exc)) from exc
        return sum(int(a) for a in applied)

    def _args(self, outcome: Written) -> list[str | bytes | int]:
        s = self._settings
        record = outcome.record
        key = outcome.key or ""
        if isinstance(record, WindowResult):
            final = "1" if record.final else "0"
            return [s.prefix, s.answer_ttl_s, record.id, outcome.route, key or "*", record.window.end,
                    outcome.payload, final]
        common: list[str | bytes | int] = [s.prefix, s.answer_ttl_s, s.stream_maxlen]
        if isinstance(record, Answer):
            guard = f"a:{record.id}"
            return [*common, "answer", guard, outcome.payload, key, record.id, record.tokens_in, record.tokens_out]
        src = record.source
        guard = f"d:{src.topic}:{src.partition}:{src.offset}"
        return [*common, "dead", guard, outcome.payload, key, record.error.value, outcome.route]

    async def windows_final(self, window_ids: Sequence[str]) -> list[bool]:
        """Which windows already have a final result (e.g. written before a crash and replay); one round trip."""
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
