"""RedisState against a real redis-server: every key it writes is bounded (a TTL or a cap), user keys
never collide in key names, answers are guarded by where the event came from, and a Redis that
refuses writes (full, read-only) is `StateUnavailable`, which the writer retries, never a crash."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from streamer.config import RedisSettings
from streamer.contracts import Answer, DeadLetter, ErrorCode, Source, WindowBounds, WindowResult
from streamer.state.keys import Keys
from streamer.state.redis import SCRIPT_BATCH, RedisState, StateUnavailable, Stored, Written
from streamer.state.server import RedisServer
from tests.integration.services import unique_name

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
TTL_S = 600


def answer(offset: int, key: str | None = "k", id_: str | None = None, *, route: str = "qa",
           digest: str | None = None, output: str = "o") -> Written:
    record = Answer(id=id_ or f"q{offset}", key=key, task="answer", output=output, model="m", tokens_in=5,
                    tokens_out=3, queued_ms=1.0, latency_ms=2.0, source=Source(topic="in", partition=0, offset=offset),
                    ts_in=T0, ts_out=T0)
    return Written(record, record.model_dump_json().encode(), key, route, digest)


def dead_letter(offset: int, error: ErrorCode = ErrorCode.SCHEMA, key: str | None = "k") -> Written:
    record = DeadLetter(error=error, detail="d", payload="x", payload_encoding="utf-8",
                        source=Source(topic="in", partition=0, offset=offset), ts=T0)
    return Written(record, record.model_dump_json().encode(), key, "qa")


def window(n: int, key: str | None = "k", *, final: bool = True, emitted_at: int | None = None) -> Written:
    record = WindowResult(id=f"w-{key}-{n}", route="qa", key=key,
                          window=WindowBounds(kind="tumbling", start=T0 + n * 1000, end=T0 + (n + 1) * 1000),
                          count=1, first_ts=T0, last_ts=T0, late=0, final=final,
                          emitted_at=emitted_at if emitted_at is not None else T0 + n)
    return Written(record, record.model_dump_json().encode(), key, "qa")


@pytest.fixture
async def bounded(redis_url: str) -> AsyncIterator[tuple[RedisState, Keys]]:
    settings = RedisSettings(prefix=unique_name("bounds"), answer_ttl_s=TTL_S, window_index_max=5, latest_keys_max=3)
    state = RedisState(settings, redis_url)
    try:
        yield state, Keys(settings.prefix)
    finally:
        await state.aclose()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url, decode_responses=True) as c:
        yield c


async def test_the_window_index_keeps_the_newest_window_index_max_ids_and_expires(bounded, client) -> None:
    state, keys = bounded
    await state.write([window(n) for n in range(20)])
    index = keys.windows("qa", "k")
    assert client.zrange(index, 0, -1) == [f"w-k-{n}" for n in range(15, 20)]
    assert 0 < client.ttl(index) <= TTL_S


async def test_window_results_past_one_script_call_apply_in_order_and_each_final_once(bounded, client) -> None:
    state, keys = bounded
    n = 2 * SCRIPT_BATCH + 7  # three script calls
    first = [window(i, key=f"k{i}", final=i % 2 == 0) for i in range(n)]
    later = [window(0, key="k0", final=False), window(1, key="k1", final=True), window(2, key="k2", final=True)]

    assert await state.write(first + later) == n + 1  # the provisional after k0's final and k2's second final skip
    assert await state.write(first) == n // 2 - 1  # a replay: only the provisional ones apply, not k1's (final now)

    ids = [f"w-k{i}-{i}" for i in range(n)] + ["w-never-written"]
    assert await state.windows_final(ids) == [i % 2 == 0 or i == 1 for i in range(n)] + [False]
    assert client.hget(keys.counters, "windows") == str((n + 1) // 2 + 1)
    assert client.hget(keys.window("w-k1-1"), "final") == "1"
    assert client.hget(keys.window("w-k3-3"), "final") == "0"


async def test_a_route_named_latest_writes_the_window_of_a_key_naming_another_route(bounded, client) -> None:
    """Found by review (fails on the code before the fix: WRONGTYPE, the writer died, on every replay)."""
    state, keys = bounded
    orders = window(0, key="alice")
    on_latest = window(1, key="qa")
    on_latest = Written(on_latest.record.model_copy(update={"route": "latest"}), on_latest.payload, "qa", "latest")

    assert await state.write([orders]) == 1  # route qa's latest results: a hash
    assert await state.write([on_latest]) == 1  # route latest, key "qa": its own index
    assert client.hget(keys.counters, "windows") == "2"
    assert client.zrange(keys.windows("latest", "qa"), 0, -1) == ["w-qa-1"]


async def test_latest_keeps_the_most_recently_updated_keys_and_both_keys_expire(bounded, client) -> None:
    state, keys = bounded
    await state.write([window(n, key=f"k{n}", emitted_at=T0 + n) for n in range(10)])
    assert set(client.hkeys(keys.latest("qa"))) == {"k7", "k8", "k9"}
    await state.write([window(70, key="k7", final=False, emitted_at=T0 + 100)])  # k7 is now the freshest
    await state.write([window(10, key="k10", emitted_at=T0 + 101)])
    assert set(client.hkeys(keys.latest("qa"))) == {"k7", "k9", "k10"}
    for name in (keys.latest("qa"), keys.latest_order("qa")):
        assert 0 < client.ttl(name) <= TTL_S


async def test_a_per_key_hash_expires_and_each_write_renews_it(bounded, client) -> None:
    state, keys = bounded
    await state.write([answer(0)])
    assert 0 < client.ttl(keys.per_key("k")) <= TTL_S
    client.expire(keys.per_key("k"), 5)
    await state.write([dead_letter(1)])
    assert client.ttl(keys.per_key("k")) > 5
    assert client.hgetall(keys.per_key("k")) == {"events": "2", "answers": "1", "dead_letters": "1",
                                                  "tokens_in": "5", "tokens_out": "3"}


async def test_every_key_written_expires_or_is_capped_after_many_writes(bounded, client) -> None:
    state, keys = bounded
    for batch in range(10):
        base = batch * 100
        outcomes = [answer(base + i, key=f"user-{i}", digest="d" if i % 2 else None) for i in range(10)]
        outcomes += [dead_letter(base + 10), dead_letter(base + 11, ErrorCode.LATE, key=None)]
        outcomes += [window(base + i, key=f"user-{i}", final=i % 2 == 0) for i in range(10)]
        outcomes += [window(base + 20, key=None)]
        await state.write(outcomes, fence={("in", 0): base + 12})
    # Hashes with a fixed set of fields (counters, late counts per route, fence per partition) and capped
    # streams: everything else must go away by itself.
    capped = {keys.counters, keys.late, keys.fence, keys.answers, keys.dead_letters}
    names = set(client.scan_iter(f"{keys.prefix}:*"))
    assert capped <= names
    assert {name for name in names - capped if not 0 < client.ttl(name) <= TTL_S} == set()
    assert client.hlen(keys.latest("qa")) == 3
    assert all(client.zcard(keys.windows("qa", key)) <= 5 for key in (None, "user-0", "user-9"))


async def test_an_answer_is_kept_for_reuse_per_route_with_its_digest_in_the_same_script(bounded, client) -> None:
    state, keys = bounded
    first, other_route = answer(1, id_="same", digest="d1", output="one"), answer(2, id_="same", route="q:b",
                                                                                  digest="d2", output="two")
    await state.write([first, other_route, answer(3, id_="plain")])
    found = await state.stored_answers([("qa", "same"), ("q:b", "same"), ("qa", "plain"), ("qa", "none")])
    assert found == [Stored("d1", first.payload), Stored("d2", other_route.payload), None, None]
    assert 0 < client.ttl(keys.reuse("qa", "same")) <= TTL_S
    assert await state.write([answer(1, id_="same", digest="d3", output="changed")]) == 0  # replayed: applied once
    assert (await state.stored_answers([("qa", "same")])) == [Stored("d1", first.payload)]


async def test_a_conversation_is_saved_only_over_the_revision_it_was_read_at_and_expires(bounded, client) -> None:
    """Of two writers of one conversation (a zombie and the partition's new owner), the second to save finds
    the history moved and reads it again, so a turn is never appended twice."""
    state, keys = bounded
    assert await state.conversation("q:a", "user-7") == (None, 0)
    assert await state.save_conversation("q:a", "user-7", b"one", 0)
    assert not await state.save_conversation("q:a", "user-7", b"stale", 0), "read at 0, moved to 1 meanwhile"
    assert await state.conversation("q:a", "user-7") == (b"one", 1)
    assert await state.save_conversation("q:a", "user-7", b"two", 1)
    assert await state.conversation("q:a", "user-7") == (b"two", 2)
    assert await state.conversation("q", "a:user-7") == (None, 0), "no (route, key) pair names another's"
    assert 0 < client.ttl(keys.chat("q:a", "user-7")) <= TTL_S


async def test_a_key_of_another_type_where_an_answer_is_kept_costs_only_its_reuse(bounded, client) -> None:
    state, keys = bounded
    client.set(keys.reuse("qa", "odd"), "not a hash")  # a leftover or a foreign writer
    odd = answer(1, id_="odd", digest="d1", output="one")
    assert await state.write([odd, answer(2, id_="fine", digest="d2", output="two")]) == 2
    assert client.hget(keys.counters, "answers") == "2"  # the answer's own state is whole
    assert client.get(keys.answer("odd")) is not None and client.xlen(keys.answers) == 2
    found = await state.stored_answers([("qa", "odd"), ("qa", "fine")])
    assert found[0] is None and found[1] is not None  # the poll's other look-ups still hit


async def test_a_look_up_with_redis_away_is_unavailable(redis_url) -> None:
    state = RedisState(RedisSettings(prefix=unique_name("away")), "redis://127.0.0.1:1/0")
    try:
        with pytest.raises(StateUnavailable):
            await state.stored_answers([("qa", "q1")])
    finally:
        await state.aclose()


async def test_keys_none_empty_and_star_have_an_index_each(bounded, client) -> None:
    state, keys = bounded
    await state.write([window(1, key=None), window(2, key=""), window(3, key="*")])
    assert [client.zrange(keys.windows("qa", key), 0, -1) for key in (None, "", "*")] == [
        ["w-None-1"], ["w--2"], ["w-*-3"]]
    assert len(client.hkeys(keys.latest("qa"))) == 3
    await state.write([answer(10, key=""), answer(11, key="*"), answer(12, key=None)])
    assert [client.hget(keys.per_key(key), "answers") for key in ("", "*")] == ["1", "1"]


async def test_two_distinct_events_with_the_same_id_both_count(bounded, client) -> None:
    state, keys = bounded
    assert await state.write([answer(1, id_="same"), answer(2, id_="same")]) == 2
    assert await state.write([answer(1, id_="same")]) == 0  # the same event again: applied once
    assert (await state.counters())["answers"] == 2
    assert client.get(keys.answer("same")) is not None


@pytest.mark.parametrize("fenced", [False, True], ids=["at-least-once", "exactly-once"])
async def test_the_dead_letter_of_a_refused_window_result_counts_once_as_a_dead_letter_and_no_event(
        bounded, fenced) -> None:
    """Adversarial review, finding 1: a window result the broker refused became a dead letter without a
    source, and writing it to Redis raised (AttributeError), killing the writer on every replay."""
    state, _ = bounded
    record = DeadLetter(error=ErrorCode.TOO_LARGE, detail="windows: refused", id="w-k-1", payload="{}",
                        payload_encoding="utf-8", source=None, ts=T0)
    letter = Written(record, record.model_dump_json().encode(), "k", "qa")
    fence = {("in", 0): 3} if fenced else None
    assert await state.write([letter], fence) == 1
    assert await state.write([letter], fence) == 0  # its replay
    counters = await state.counters()
    assert (counters.get("events", 0), counters["dead_letters"], counters["dead_letters:too_large"]) == (0, 1, 1)


async def test_an_event_counts_once_whether_its_outcome_is_an_answer_or_a_dead_letter(bounded) -> None:
    """At least once, a replay may answer an event that a model error dead-lettered before (or the other
    way round): Redis keeps the first; the event's late record is an outcome of its own."""
    state, _ = bounded
    assert await state.write([dead_letter(5, ErrorCode.MODEL_ERROR)]) == 1
    assert await state.write([answer(5)]) == 0
    assert await state.write([dead_letter(5, ErrorCode.LATE)]) == 1
    counters = await state.counters()
    assert (counters["events"], counters.get("answers", 0), counters["dead_letters"]) == (2, 0, 2)


@pytest.fixture
def own_server() -> Iterator[tuple[str, redis.Redis]]:
    """A redis-server of this test's own, since the tests make it refuse writes."""
    with RedisServer() as server, redis.Redis.from_url(server.url) as admin:
        admin.set("filler", "x" * 100_000)
        yield server.url, admin


@contextlib.contextmanager
def full(admin: redis.Redis) -> Iterator[None]:
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")
    try:
        yield
    finally:
        admin.config_set("maxmemory", "0")


@contextlib.contextmanager
def read_only(admin: redis.Redis) -> Iterator[None]:
    admin.replicaof("127.0.0.1", "1")  # a primary that is not there: the server stays a read-only replica
    try:
        yield
    finally:
        admin.replicaof("NO", "ONE")


@contextlib.contextmanager
def busy(admin: redis.Redis) -> Iterator[None]:
    """A script that never ends, past the busy threshold: Redis answers BUSY until it is killed."""
    admin.config_set("busy-reply-threshold", "10")
    loop = threading.Thread(target=_run_forever, args=(admin,))
    loop.start()
    while not _busy(admin):
        time.sleep(0.01)
    try:
        yield
    finally:
        admin.script_kill()
        loop.join()


def _run_forever(admin: redis.Redis) -> None:
    with contextlib.suppress(redis.ResponseError):  # "killed by user"
        admin.eval("while true do end", 0)


def _busy(admin: redis.Redis) -> bool:
    try:
        admin.ping()
    except redis.ResponseError:
        return True
    return False


@contextlib.contextmanager
def save_failed(admin: redis.Redis) -> Iterator[None]:
    """A background save failed (its disk went away): with save points and `stop-writes-on-bgsave-error` (a
    persistent Redis's defaults) writes are refused with MISCONF until a save succeeds or saving is off."""
    place = Path(admin.config_get("dir")["dir"])
    admin.config_set("save", "3600 1")
    shutil.rmtree(place)
    admin.bgsave()
    while admin.info("persistence")["rdb_last_bgsave_status"] != "err":
        time.sleep(0.01)
    try:
        yield
    finally:
        admin.config_set("save", "")  # no save points: a failed save no longer stops writes
        place.mkdir()  # for the server's own clean-up


@pytest.mark.parametrize("refusal", [full, read_only, busy, save_failed])
@pytest.mark.parametrize("fenced", [False, True], ids=["at-least-once", "exactly-once"])
async def test_a_redis_refusing_writes_is_unavailable_and_the_retry_applies_once(own_server, refusal, fenced) -> None:
    url, admin = own_server
    state = RedisState(RedisSettings(prefix="p"), url)
    batch = [answer(0), dead_letter(1), window(2)]
    fence = {("in", 0): 2} if fenced else None
    try:
        with refusal(admin), pytest.raises(StateUnavailable):
            await state.write(batch, fence=fence)
        assert await state.write(batch, fence=fence) == 3
        assert (await state.counters())["events"] == 2
    finally:
        await state.aclose()
