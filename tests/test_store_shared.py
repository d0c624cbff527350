"""The shared blocking read of RedisEventStore, on a real redis-server: the readers of one
process share one ``XREAD BLOCK`` (one connection, seen in ``CLIENT LIST``), a reader cancelled
mid-block leaves the others woken, and a Redis restart during a shared block ends in recovery
or a clear error, never a hang. Timing bounds are ten times loose."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from sanic_streamplus.errors import StoreUnavailable
from sanic_streamplus.sse import ServerSentEvent
from sanic_streamplus.store import RedisEventStore, StreamRecord
from sanic_streamplus.testredis import RedisUnavailable, start_redis, stop_redis

BLOCK = 10.0  # seconds a reader may wait
PROMPT = 1.0  # seconds within which a blocked reader must wake (10x loose)
NAME = "shared-reader"  # the reader store's connections' name in CLIENT LIST

Read = tuple[list[tuple[int, ServerSentEvent]], StreamRecord | None]


async def clients(admin: Redis, name: str) -> list[dict[str, Any]]:
    """The server's CLIENT LIST entries of the connections named ``name``."""
    return [entry for entry in await admin.client_list() if entry.get("name") == name]


async def blocked_xreads(admin: Redis, name: str) -> list[dict[str, Any]]:
    return [
        entry
        for entry in await clients(admin, name)
        if entry.get("cmd") == "xread" and "b" in entry.get("flags", "")
    ]


async def open_streams(producer: RedisEventStore, count: int) -> list[str]:
    ids = [f"s{n}" for n in range(count)]
    for stream_id in ids:
        assert await producer.open(stream_id, None) == (stream_id, True)
        assert await producer.claim(stream_id, "t1", 30)
    return ids


async def timed(reader: RedisEventStore, stream_id: str, after: int) -> tuple[Read, float]:
    read = await reader.read(stream_id, after, BLOCK)
    return read, time.monotonic()


async def until(check: Any, timeout: float = 5.0) -> None:
    """Poll the async ``check`` every 20 ms until it is true (AssertionError after
    ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_twenty_blocked_readers_share_one_xread_on_one_connection(
    redis_url: str, redis_prefix: str
) -> None:
    admin = Redis.from_url(redis_url, decode_responses=True)
    producer = RedisEventStore(Redis.from_url(redis_url), prefix=redis_prefix)
    # a pool of 4 connections: the readers' waits need one, not one each
    reader = RedisEventStore.from_url(
        f"{redis_url}?client_name={NAME}", max_connections=4, prefix=redis_prefix
    )
    try:
        ids = await open_streams(producer, 20)
        readers = [asyncio.ensure_future(timed(reader, stream_id, 0)) for stream_id in ids]

        async def one_blocked() -> bool:
            return len(await blocked_xreads(admin, NAME)) == 1

        await until(one_blocked)
        await asyncio.sleep(0.3)  # settled: still one, and no reader returned
        assert len(await blocked_xreads(admin, NAME)) == 1
        assert len(await clients(admin, NAME)) <= 4
        assert not any(task.done() for task in readers)
        appended = time.monotonic()
        for n, stream_id in enumerate(ids):
            await producer.append(stream_id, "t1", ServerSentEvent(f"to {n}"))
        for n, task in enumerate(readers):
            (events, record), woke = await asyncio.wait_for(task, BLOCK)
            assert [(seq, e.data) for seq, e in events] == [(1, f"to {n}")]
            assert record is not None and record.last_seq == 1 and record.state == "running"
            assert woke - appended < PROMPT
    finally:
        await reader.close()
        await producer.close()
        await admin.aclose()


async def test_a_reader_cancelled_mid_block_leaves_the_others_woken(
    redis_url: str, redis_prefix: str
) -> None:
    """Five readers of five streams and two more of the first, in one shared XREAD; one is
    cancelled while it waits; every other wakes with its event, and the stream of the
    cancelled one reads on."""
    admin = Redis.from_url(redis_url, decode_responses=True)
    producer = RedisEventStore(Redis.from_url(redis_url), prefix=redis_prefix)
    reader = RedisEventStore(Redis.from_url(redis_url, client_name=NAME), prefix=redis_prefix)
    try:
        ids = await open_streams(producer, 5)
        waiting = [(sid, asyncio.ensure_future(timed(reader, sid, 0))) for sid in ids]
        waiting += [(ids[0], asyncio.ensure_future(timed(reader, ids[0], 0))) for _ in range(2)]
        await asyncio.sleep(0.3)
        cancelled_id, cancelled = waiting.pop(2)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await asyncio.sleep(0.1)
        assert len(await blocked_xreads(admin, NAME)) == 1  # the others still wait in it
        assert not any(task.done() for _, task in waiting)
        appended = time.monotonic()
        for stream_id in ids:
            await producer.append(stream_id, "t1", ServerSentEvent(f"for {stream_id}"))
        for stream_id, task in waiting:
            (events, _), woke = await asyncio.wait_for(task, BLOCK)
            assert [(seq, e.data) for seq, e in events] == [(1, f"for {stream_id}")]
            assert woke - appended < PROMPT
        events, record = await reader.read(cancelled_id, 0, BLOCK)
        assert [seq for seq, _ in events] == [1] and record is not None
        later = asyncio.ensure_future(timed(reader, cancelled_id, 1))
        await asyncio.sleep(0.2)
        appended = time.monotonic()
        await producer.append(cancelled_id, "t1", ServerSentEvent("two"))
        (events, _), woke = await asyncio.wait_for(later, BLOCK)
        assert [seq for seq, _ in events] == [2] and woke - appended < PROMPT
    finally:
        await reader.close()
        await producer.close()
        await admin.aclose()


@pytest.fixture
def own_redis(tmp_path: Path) -> Any:
    try:
        process, port = start_redis(tmp_path)
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    state = {"process": process, "port": port}
    yield state
    stop_redis(state["process"])


@pytest.mark.parametrize("away", [0.0, 3.0])
async def test_a_redis_restart_during_a_shared_block_never_hangs(
    own_redis: dict[str, Any], tmp_path: Path, away: float
) -> None:
    """Redis stops while five readers wait in the shared XREAD and comes back (at once, or
    after ``away`` seconds): each reader ends with a clear answer (the stream is gone: the
    restarted Redis kept nothing; or StoreUnavailable while it was away), none hangs; then a
    new stream reads and wakes through the same store."""
    url = f"redis://127.0.0.1:{own_redis['port']}/0"
    producer = RedisEventStore.from_url(url, max_connections=8)
    reader = RedisEventStore.from_url(url, max_connections=8)
    try:
        ids = await open_streams(producer, 5)

        async def outcome(stream_id: str) -> str:
            after = 0
            for _ in range(30):  # reads of at most 1 s, as the resume logic makes them
                try:
                    events, record = await reader.read(stream_id, after, 1.0)
                except StoreUnavailable:
                    return "unavailable"
                if record is None:
                    return "gone"
                after = events[-1][0] if events else after
            return "hung"

        readers = [asyncio.ensure_future(outcome(stream_id)) for stream_id in ids]
        await asyncio.sleep(0.3)
        stop_redis(own_redis["process"])
        await asyncio.sleep(away)
        own_redis["process"], _ = start_redis(tmp_path, own_redis["port"])
        outcomes = await asyncio.wait_for(asyncio.gather(*readers), 40)
        assert set(outcomes) <= {"gone", "unavailable"}, outcomes
        if away:
            assert "unavailable" in outcomes  # away longer than the retries last
        (stream_id,) = await open_streams(producer, 1)
        later = asyncio.ensure_future(timed(reader, stream_id, 0))
        await asyncio.sleep(0.3)
        appended = time.monotonic()
        await producer.append(stream_id, "t1", ServerSentEvent("back"))
        (events, _), woke = await asyncio.wait_for(later, BLOCK)
        assert [seq for seq, _ in events] == [1] and woke - appended < PROMPT
    finally:
        await reader.close()
        await producer.close()


async def test_a_reader_woken_by_events_alone_is_still_marked_seen(
    redis_url: str, redis_prefix: str
) -> None:
    """A reader that always has an event waiting never takes a snapshot of its own: the
    shared read marks it seen (at most about a second late), so its producer's grace holds."""
    producer = RedisEventStore(Redis.from_url(redis_url), prefix=redis_prefix)
    reader = RedisEventStore(Redis.from_url(redis_url), prefix=redis_prefix)
    try:
        (stream_id,) = await open_streams(producer, 1)
        await producer.append(stream_id, "t1", ServerSentEvent("0"))
        _, record = await reader.read(stream_id, 0, BLOCK)  # the first read: a snapshot
        assert record is not None
        first_seen = record.reader_seen
        after, started = 1, time.monotonic()
        while time.monotonic() - started < 2.5:
            await producer.append(stream_id, "t1", ServerSentEvent(str(after)))
            events, _ = await reader.read(stream_id, after, BLOCK)
            after = events[-1][0]
            await asyncio.sleep(0.05)
        record = await producer.record(stream_id)
        assert record is not None and record.reader_seen > first_seen + 1.0
        assert time.time() - record.reader_seen < 2.0
    finally:
        await reader.close()
        await producer.close()
