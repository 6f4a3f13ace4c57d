"""Exactly once in Redis: the per-partition fence makes a replayed batch apply nothing, even once the
per-event guards have expired, and a zombie's late, older batch cannot pull the fence back."""

from __future__ import annotations

import orjson
import pytest

from streamer.config import RedisSettings
from streamer.contracts import DeadLetter, ErrorCode, Source
from streamer.state.redis import RedisState, Written
from tests.integration.services import unique_name

pytestmark = pytest.mark.integration


def letters(offsets: range) -> list[Written]:
    out = []
    for offset in offsets:
        letter = DeadLetter(error=ErrorCode.INVALID_JSON, detail="x", payload="x", payload_encoding="utf-8",
                            source=Source(topic="in", partition=0, offset=offset), ts=0)
        out.append(Written(letter, orjson.dumps(letter.model_dump(mode="json")), "k", "r"))
    return out


async def test_a_replayed_batch_below_the_fence_applies_nothing(redis_url, redis_client):
    prefix = unique_name("fence")
    state = RedisState(RedisSettings(prefix=prefix), redis_url)
    try:
        assert await state.write(letters(range(0, 10)), fence={("in", 0): 10}) == 10
        for guard in redis_client.scan_iter(f"{prefix}:seen:*"):
            redis_client.delete(guard)  # as if the guards had expired: only the fence is left
        assert await state.write(letters(range(5, 15)), fence={("in", 0): 15}) == 5  # 10..14 are new
        assert await state.write(letters(range(0, 3)), fence={("in", 0): 3}) == 0  # a zombie's old batch
        assert redis_client.hget(f"{prefix}:fence", "in:0") == b"15"
        assert (await state.counters())["dead_letters"] == 15
    finally:
        await state.aclose()
