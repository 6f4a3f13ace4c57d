"""The dashboard's snapshot: what the page shows when its event stream (re)opens, read from Redis."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import redis.asyncio as aioredis

from streamer.observe.dashboard import entries
from streamer.state.keys import Keys

_LATEST_CAP = 1000  # `windows:latest:{route}` fields read per route (capped by redis.latest_keys_max anyway)


async def read_snapshot(client: aioredis.Redis, keys: Keys, limit: int, recent_per_key: int) -> dict[str, Any]:
    """Counters, late counts, the newest answers and dead letters, and windows: the latest result of the
    `limit` most recently updated (route, key) pairs, plus the last `recent_per_key` windows of each."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.counters)
        pipe.hgetall(keys.late)
        pipe.xrevrange(keys.answers, count=limit)
        pipe.xrevrange(keys.dead_letters, count=limit)
        counters, late, answers, dead_letters = await pipe.execute()
    latest = await _latest_windows(client, keys, limit)
    return {
        "now": entries.now_ms(),
        "prefix": keys.prefix,
        "counters": entries.ints(counters),
        "late": entries.ints(late),
        "answers": [a for entry_id, fields in answers if (a := entries.answer(entry_id, fields))],
        "dead_letters": [d for entry_id, fields in dead_letters if (d := entries.dead_letter(entry_id, fields))],
        "windows": {"latest": latest, "recent": await _recent_windows(client, keys, latest, recent_per_key)},
    }


async def _latest_windows(client: aioredis.Redis, keys: Keys, limit: int) -> list[dict[str, Any]]:
    head = keys.latest("")
    routes = [name[len(head):] async for name in client.scan_iter(match=_glob_escape(head) + "*", count=1000,
                                                                 _type="HASH")]
    results: list[dict[str, Any]] = []
    for route in sorted(set(routes)):
        fields: dict[str, str] = {}
        async with contextlib.aclosing(client.hscan_iter(keys.latest(route), count=_LATEST_CAP)) as scan:
            async for field, doc in scan:
                fields[field] = doc
                if len(fields) >= _LATEST_CAP:
                    break
        results += [r for doc in fields.values() if isinstance(r := entries.parse(doc), dict)]
    results.sort(key=lambda r: r.get("emitted_at", 0), reverse=True)
    return results[:limit]


async def _recent_windows(client: aioredis.Redis, keys: Keys, latest: list[dict[str, Any]],
                          per_key: int) -> list[dict[str, Any]]:
    """Earlier windows of the same (route, key) pairs, newest end first; expired ones are skipped."""
    if per_key < 1 or not latest:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for result in latest:
            pipe.zrevrange(keys.windows(str(result.get("route")), result.get("key")), 0, per_key - 1)
        id_lists = await pipe.execute()
    ids = list(dict.fromkeys(i for ids in id_lists for i in ids))
    async with client.pipeline(transaction=False) as pipe:
        for window_id in ids:
            pipe.hget(keys.window(window_id), "result")
        docs = await pipe.execute()
    return [r for doc in docs if doc is not None and isinstance(r := entries.parse(doc), dict)]


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
