"""The EventStore contract, for both stores: MemoryEventStore and RedisEventStore on a real
redis-server (the ``redis_url`` fixture), a Redis Cluster, a real valkey-server and a Valkey
Cluster. No mocks; timing bounds are ten times loose."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.crc import key_slot

from sanic_streamplus.sse import ServerSentEvent
from sanic_streamplus.store import (
    EventStore,
    FencingError,
    MemoryEventStore,
    RedisEventStore,
    SequenceMismatch,
    StreamRecord,
)

MakeStore = Callable[..., Awaitable[EventStore]]
BLOCK = 10.0  # seconds a reader may wait: a wake-up takes a small fraction of it
PROMPT = 1.0  # seconds within which a blocked reader must wake (~0.1 s expected, 10x loose)


# the Redis stores: the fixture of each server's URL
SERVERS = {
    "redis": "redis_url",
    "cluster": "redis_cluster",
    "valkey": "valkey_server",
    "valkey-cluster": "valkey_cluster",
}


@pytest.fixture(params=["memory", *SERVERS])
async def make_store(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[MakeStore]:
    """A factory of fresh stores of one kind: ``await make_store(max_events=..., ttl=...)``;
    a Redis store (one redis-server or valkey-server, or a Cluster of three masters of either
    through ``RedisCluster``) gets its own client and the test's key prefix, and is closed
    afterwards."""
    stores: list[EventStore] = []

    async def make(max_events: int = 10_000, ttl: float = 600.0, **client: Any) -> EventStore:
        store: EventStore
        if request.param == "memory":
            store = MemoryEventStore(max_events, ttl)
        else:
            cluster = request.param.endswith("cluster")
            url = request.getfixturevalue(SERVERS[request.param])
            redis = (RedisCluster if cluster else Redis).from_url(url, **client)
            store = RedisEventStore(redis, max_events=max_events, ttl=ttl, prefix=redis_prefix)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
async def store(make_store: MakeStore) -> EventStore:
    return await make_store()


async def running(store: EventStore, stream_id: str = "s1", token: str = "t1") -> str:
    """Open ``stream_id`` and claim it with ``token``."""
    assert await store.open(stream_id, None) == (stream_id, True)
    assert await store.claim(stream_id, token, 30)
    return stream_id


def event(n: int) -> ServerSentEvent:
    return ServerSentEvent(f"data {n}", "message" if n % 2 else "delta")


def seqs(events: list[tuple[int, ServerSentEvent]]) -> list[int]:
    return [seq for seq, _ in events]


async def timed_read(
    store: EventStore, stream_id: str, after: int, block: float = BLOCK
) -> tuple[list[tuple[int, ServerSentEvent]], StreamRecord | None, float]:
    """``store.read``, and the monotonic time it returned at."""
    events, record = await store.read(stream_id, after, block)
    return events, record, time.monotonic()


async def test_open_and_idempotency_key(store: EventStore) -> None:
    assert await store.open("a", "key-1") == ("a", True)
    assert await store.open("b", "key-1") == ("a", False)  # the key is bound to "a"
    assert await store.open("c", None) == ("c", True)
    assert await store.open("d", "key-2") == ("d", True)
    assert await store.record("b") is None
    record = await store.record("a")
    assert record == StreamRecord("a", "running", 1, 0, False, False, 0.0, None)
    assert not record.finished


async def test_bound_names_the_stream_of_a_key_and_registers_nothing(store: EventStore) -> None:
    assert await store.bound("key-1") is None
    assert await store.open("a", "key-1") == ("a", True)
    assert await store.bound("key-1") == "a"
    assert await store.bound("key-2") is None
    assert await store.open("b", "key-2") == ("b", True)  # bound() did not take "key-2"


async def test_no_stream_id_names_an_idempotency_key(store: EventStore) -> None:
    """Whatever their characters: on Redis, the meta of stream ``key:x`` once was the entry of
    the key ``x:meta``."""
    for key in ("x:meta", "é" * 300, ""):
        stream_id = f"s-{len(key)}"
        assert await store.open(stream_id, key) == (stream_id, True)
        assert await store.bound(key) == stream_id
    assert await store.open("key:x", None) == ("key:x", True)
    assert await store.claim("key:x", "t1", 30)
    assert await store.append("key:x", "t1", event(1)) == 1
    record = await store.record("key:x")
    assert record is not None and record.last_seq == 1
    assert await store.request_cancel("key:x")
    assert await store.bound("x:meta") == "s-6"


async def test_open_keeps_the_info(store: EventStore) -> None:
    info = {"format": "sse", "dialect": "openai"}
    assert await store.open("a", None, info) == ("a", True)
    record = await store.record("a")
    assert record is not None and record.info == info
    empty = await store.record((await store.open("b", None))[0])
    assert empty is not None and empty.info == {}


async def test_unknown_stream(store: EventStore) -> None:
    started = time.monotonic()
    assert await store.read("nope", 0, BLOCK) == ([], None)  # at once, not after BLOCK
    assert time.monotonic() - started < PROMPT
    assert await store.record("nope") is None
    assert not await store.claim("nope", "t1", 30)
    assert not await store.renew("nope", "t1", 30)
    with pytest.raises(FencingError):
        await store.append("nope", "t1", event(1))
    with pytest.raises(FencingError):
        await store.finish("nope", "t1", "completed")
    assert not await store.request_cancel("nope")


async def test_claim_is_exclusive_while_the_lease_lives(store: EventStore) -> None:
    await store.open("s1", None)
    assert await store.claim("s1", "t1", 30)
    assert not await store.claim("s1", "t2", 30)
    assert await store.claim("s1", "t1", 30)  # the holder claiming again refreshes its lease
    assert not await store.renew("s1", "t2", 30)
    assert await store.renew("s1", "t1", 30)
    record = await store.record("s1")
    assert record is not None and record.producer_alive
    with pytest.raises(FencingError):
        await store.append("s1", "t2", event(1))
    with pytest.raises(FencingError):
        await store.finish("s1", "t2", "completed")
    assert await store.append("s1", "t1", event(1)) == 1


async def test_claim_after_the_lease_expires_fences_the_old_producer(store: EventStore) -> None:
    await store.open("s1", None)
    assert await store.claim("s1", "t1", 0.2)
    assert await store.append("s1", "t1", event(1)) == 1
    await asyncio.sleep(0.5)
    record = await store.record("s1")
    assert record is not None and not record.producer_alive
    assert not await store.renew("s1", "t1", 30)  # lost
    assert await store.claim("s1", "t2", 30)
    with pytest.raises(FencingError):
        await store.append("s1", "t1", event(2))
    with pytest.raises(FencingError):
        await store.finish("s1", "t1", "completed")
    assert await store.append("s1", "t2", event(2)) == 2
    await store.finish("s1", "t2", "completed")


async def test_finish_ends_the_lease(store: EventStore) -> None:
    await running(store)
    await store.append("s1", "t1", event(1))
    await store.finish("s1", "t1", "completed")
    record = await store.record("s1")
    assert record == StreamRecord("s1", "completed", 1, 1, False, False, 0.0, None)
    assert record.finished
    with pytest.raises(FencingError):
        await store.append("s1", "t1", event(2))
    with pytest.raises(FencingError):
        await store.finish("s1", "t1", "failed")
    assert not await store.renew("s1", "t1", 30)
    assert not await store.claim("s1", "t2", 30)  # a finished stream gets no more events
    assert not await store.claim("s1", "t1", 30)


async def test_failed_keeps_its_error(store: EventStore) -> None:
    await running(store)
    error = {"type": "upstream_error", "message": "boom é", "upstream_status": 502}
    await store.finish("s1", "t1", "failed", error)
    record = await store.record("s1")
    assert record is not None and record.state == "failed" and record.error == error


async def test_finish_with_last_seq_only_at_that_sequence_number(store: EventStore) -> None:
    """A producer ends the stream only if the store has its last append (a failover may have
    lost it): a mismatch leaves the stream running, under the same lease."""
    await running(store)
    await store.append("s1", "t1", event(1), event(2))
    with pytest.raises(SequenceMismatch):
        await store.finish("s1", "t1", "completed", last_seq=3)
    record = await store.record("s1")
    assert record is not None and record.state == "running" and record.producer_alive
    await store.finish("s1", "t1", "completed", last_seq=2)
    record = await store.record("s1")
    assert record is not None and record.state == "completed"


async def test_append_numbers_events_and_read_returns_the_rest(store: EventStore) -> None:
    await running(store)
    sent = [
        ServerSentEvent("hello"),
        ServerSentEvent("two\nlines", "delta"),
        ServerSentEvent("", "ping"),
        ServerSentEvent("ünïcødé 🎉"),
        ServerSentEvent('{"json": [1, 2]}', "message", id="ignored", retry=5),
    ]
    assert [await store.append("s1", "t1", item) for item in sent] == [1, 2, 3, 4, 5]
    events, record = await store.read("s1", 0, 0)
    assert seqs(events) == [1, 2, 3, 4, 5]
    assert [(e.data, e.event) for _, e in events] == [(e.data, e.event) for e in sent]
    assert all(e.id is None and e.retry is None for _, e in events)  # only data and type
    assert record is not None and (record.first_seq, record.last_seq) == (1, 5)
    for after in range(6):
        events, _ = await store.read("s1", after, 0)
        assert seqs(events) == list(range(after + 1, 6))
    started = time.monotonic()
    assert (await store.read("s1", 5, 0))[0] == []  # block 0: at once
    assert time.monotonic() - started < PROMPT


async def test_one_append_may_carry_many_events(store: EventStore) -> None:
    await running(store)
    assert await store.append("s1", "t1", event(1), event(2), event(3)) == 3
    assert await store.append("s1", "t1", event(4)) == 4
    events, record = await store.read("s1", 1, 0)
    assert [seq for seq, _ in events] == [2, 3, 4]
    assert [e.data for _, e in events] == [event(n).data for n in (2, 3, 4)]
    assert record is not None and record.last_seq == 4


async def test_read_blocks_until_an_append(store: EventStore) -> None:
    await running(store)
    readers = [asyncio.ensure_future(timed_read(store, "s1", 0)) for _ in range(3)]
    await asyncio.sleep(0.2)
    assert not any(reader.done() for reader in readers)
    appended = time.monotonic()
    await store.append("s1", "t1", event(1))
    for reader in readers:
        events, record, woke = await asyncio.wait_for(reader, BLOCK)
        assert woke - appended < PROMPT
        assert seqs(events) == [1] and events[0][1] == event(1)
        assert record is not None and record.last_seq == 1 and record.state == "running"


async def test_read_after_an_old_seq_does_not_block(store: EventStore) -> None:
    await running(store)
    for n in range(1, 4):
        await store.append("s1", "t1", event(n))
    started = time.monotonic()
    events, _ = await store.read("s1", 2, BLOCK)
    assert seqs(events) == [3] and time.monotonic() - started < PROMPT


@pytest.mark.parametrize("state", ["completed", "cancelled", "failed"])
async def test_read_wakes_when_the_stream_finishes(store: EventStore, state: str) -> None:
    await running(store)
    await store.append("s1", "t1", event(1))
    reader = asyncio.ensure_future(timed_read(store, "s1", 1))
    await asyncio.sleep(0.2)
    assert not reader.done()
    finished = time.monotonic()
    await store.finish(
        "s1", "t1", state, {"type": "x", "message": "y"} if state == "failed" else None
    )
    events, record, woke = await asyncio.wait_for(reader, BLOCK)
    assert woke - finished < PROMPT
    assert events == [] and record is not None and record.state == state and record.finished
    assert not record.producer_alive
    started = time.monotonic()  # finished: no wait any more
    assert (await store.read("s1", 1, BLOCK))[0] == []
    assert time.monotonic() - started < PROMPT


async def test_read_wakes_on_a_cancel_request(store: EventStore) -> None:
    await running(store)
    reader = asyncio.ensure_future(timed_read(store, "s1", 0))
    await asyncio.sleep(0.2)
    assert not reader.done()
    asked = time.monotonic()
    assert await store.request_cancel("s1")
    events, record, woke = await asyncio.wait_for(reader, BLOCK)
    assert woke - asked < PROMPT
    assert events == [] and record is not None
    assert record.cancel_requested and record.state == "running" and record.producer_alive
    # the producer then appends and finishes as it sees fit; readers see it as usual
    assert await store.append("s1", "t1", event(1)) == 1
    await store.finish("s1", "t1", "cancelled")
    events, record = await read_to_the_end(store, "s1", 0)
    assert seqs(events) == [1] and record is not None and record.state == "cancelled"


async def read_to_the_end(
    store: EventStore, stream_id: str, after: int
) -> tuple[list[tuple[int, ServerSentEvent]], StreamRecord | None]:
    """Read as a reader does until the record says the stream finished (at most 5 reads:
    events buffered by a shared read come with the record of when they came, and the finish
    after them shows in the next read)."""
    got: list[tuple[int, ServerSentEvent]] = []
    for _ in range(5):
        events, record = await store.read(stream_id, after, BLOCK)
        got += events
        after = got[-1][0] if got else after
        if record is None or record.finished:
            break
    return got, record


async def test_read_waits_out_its_block(store: EventStore) -> None:
    await running(store)
    started = time.monotonic()
    events, record = await store.read("s1", 0, 0.3)
    elapsed = time.monotonic() - started
    assert events == [] and record is not None and record.last_seq == 0
    assert 0.25 <= elapsed < 3.0


async def test_the_cap_drops_the_oldest(make_store: MakeStore) -> None:
    store = await make_store(max_events=5)
    await running(store)
    for n in range(1, 9):  # 5 + 3
        assert await store.append("s1", "t1", event(n)) == n
    events, record = await store.read("s1", 0, BLOCK)
    assert seqs(events) == [4, 5, 6, 7, 8]
    assert [e.data for _, e in events] == [f"data {n}" for n in range(4, 9)]
    assert record is not None and (record.first_seq, record.last_seq) == (4, 8)
    assert seqs((await store.read("s1", 6, 0))[0]) == [7, 8]
    record = await store.record("s1")
    assert record is not None and record.first_seq == 4


async def test_first_seq_of_an_empty_stream(store: EventStore) -> None:
    await running(store)
    record = await store.record("s1")
    assert record is not None and (record.first_seq, record.last_seq) == (1, 0)


async def test_ttl_expiry(make_store: MakeStore) -> None:
    store = await make_store(ttl=0.3)
    assert await store.open("s1", "key") == ("s1", True)
    assert await store.claim("s1", "t1", 30)
    await store.append("s1", "t1", event(1))
    await asyncio.sleep(0.7)
    assert await store.record("s1") is None
    assert await store.read("s1", 0, BLOCK) == ([], None)
    assert not await store.request_cancel("s1")
    with pytest.raises(FencingError):  # the stream is gone, even if the lease is not
        await store.append("s1", "t1", event(2))
    assert await store.open("s2", "key") == ("s2", True)  # the key expired with it


async def test_append_and_finish_refresh_the_ttl(make_store: MakeStore) -> None:
    store = await make_store(ttl=0.8)
    assert await store.open("s1", "key") == ("s1", True)
    assert await store.claim("s1", "t1", 30)
    for n in range(1, 7):  # 1.2 s in all, more than the ttl
        await asyncio.sleep(0.2)
        await store.append("s1", "t1", event(n))
    assert await store.open("s2", "key") == ("s1", False)  # the key lives as long as its stream
    await store.finish("s1", "t1", "completed")
    await asyncio.sleep(0.4)
    record = await store.record("s1")
    assert record is not None and record.last_seq == 6
    await asyncio.sleep(0.9)
    assert await store.record("s1") is None
    assert await store.open("s3", "key") == ("s3", True)


async def test_read_marks_a_reader_seen(store: EventStore) -> None:
    await running(store)
    record = await store.record("s1")
    assert record is not None and record.reader_seen == 0.0
    before = time.time()
    _, record = await store.read("s1", 0, 0)
    assert record is not None and before <= record.reader_seen <= time.time()
    record = await store.record("s1")
    assert record is not None and before <= record.reader_seen <= time.time()
    await asyncio.sleep(0.05)
    _, record = await store.read("s1", 0, 0.05)  # marked again, on every read
    assert record is not None and record.reader_seen >= before + 0.05


async def test_request_cancel(store: EventStore) -> None:
    assert not await store.request_cancel("nope")
    await running(store)
    assert await store.request_cancel("s1")
    assert await store.request_cancel("s1")  # asking again is harmless
    record = await store.record("s1")
    assert record is not None and record.cancel_requested
    await store.finish("s1", "t1", "cancelled")
    assert not await store.request_cancel("s1")
    await running(store, "s2")
    await store.finish("s2", "t1", "completed")
    assert not await store.request_cancel("s2")


# RedisEventStore only


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_redis_keys_and_their_ttls(redis: Redis, redis_url: str, redis_prefix: str) -> None:
    store = RedisEventStore(Redis.from_url(redis_url), ttl=60, prefix=redis_prefix)
    try:
        await store.open("s1", "k")
        await store.claim("s1", "t1", 5)
        await store.append("s1", "t1", ServerSentEvent("hi", "delta"))
        base = redis_prefix + "stream:{s1}:"  # one hash tag: one Cluster slot
        idem = redis_prefix + "idem:" + hashlib.sha256(b"k").hexdigest()
        parts = [base + part for part in ("meta", "events", "producer", "signal")]
        assert len({key_slot(key.encode()) for key in parts}) == 1
        assert await redis.xrange(base + "events") == [
            (b"0-1", {b"event": b"delta", b"data": b"hi"})
        ]
        assert await redis.get(idem) == b"s1"
        assert await redis.get(base + "producer") == b"t1"
        for key in (base + "meta", base + "events", idem):
            assert 55_000 < await redis.pttl(key) <= 60_000, key
        assert 0 < await redis.pttl(base + "producer") <= 5_000
        await store.request_cancel("s1")
        await store.finish("s1", "t1", "cancelled")
        assert not await redis.exists(base + "producer")
        assert 55_000 < await redis.pttl(base + "signal") <= 60_000
        assert await redis.xlen(base + "events") == 1  # no control entries among the events
        meta = await redis.hgetall(base + "meta")
        assert meta[b"state"] == b"cancelled" and meta[b"cancel"] == b"1"
        assert meta[b"last_seq"] == b"1" and meta[b"signals"] == b"2"
    finally:
        await store.close()


async def test_redis_decoded_responses(redis_url: str, redis_prefix: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=True)
    store = RedisEventStore(client, max_events=2, prefix=redis_prefix)
    try:
        await running(store)
        for n in range(1, 4):
            await store.append("s1", "t1", ServerSentEvent(f"é {n}", "delta"))
        events, record = await store.read("s1", 0, 0)
        assert [(seq, e.data, e.event) for seq, e in events] == [
            (2, "é 2", "delta"),
            (3, "é 3", "delta"),
        ]
        await store.request_cancel("s1")
        await store.finish("s1", "t1", "failed", {"message": "x"})
        record = await store.record("s1")
        assert record is not None and record.error == {"message": "x"}
        assert record.cancel_requested and record.first_seq == 2
        assert await store.open("a", "k") == ("a", True)
        assert await store.open("b", "k") == ("a", False)
    finally:
        await store.close()


async def test_redis_block_longer_than_the_socket_timeout(
    redis_url: str, redis_prefix: str
) -> None:
    store = RedisEventStore(Redis.from_url(redis_url, socket_timeout=0.5), prefix=redis_prefix)
    try:
        await running(store)
        started = time.monotonic()
        events, _ = await store.read("s1", 0, 1.5)  # several XREADs, no TimeoutError
        assert events == [] and 1.4 <= time.monotonic() - started < 15
        reader = asyncio.ensure_future(timed_read(store, "s1", 0, 5.0))
        await asyncio.sleep(1.2)  # past the first XREAD
        assert not reader.done()
        appended = time.monotonic()
        await store.append("s1", "t1", event(1))
        events, _, woke = await asyncio.wait_for(reader, BLOCK)
        assert seqs(events) == [1] and woke - appended < PROMPT
    finally:
        await store.close()


async def test_a_cancelled_read_leaves_the_store_usable(store: EventStore) -> None:
    await running(store)
    reader = asyncio.ensure_future(store.read("s1", 0, BLOCK))
    await asyncio.sleep(0.2)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert await store.append("s1", "t1", event(1)) == 1
    events, record = await store.read("s1", 0, BLOCK)
    assert seqs(events) == [1] and record is not None
    reader = asyncio.ensure_future(timed_read(store, "s1", 1))
    await asyncio.sleep(0.2)
    appended = time.monotonic()
    await store.append("s1", "t1", event(2))
    events, _, woke = await asyncio.wait_for(reader, BLOCK)
    assert seqs(events) == [2] and woke - appended < PROMPT


def test_redis_store_arguments(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    with pytest.raises(ValueError):
        RedisEventStore(client, max_events=0)
    with pytest.raises(ValueError):
        RedisEventStore(client, ttl=0)


async def test_redis_block_longer_than_the_default_socket_timeout(
    redis_url: str, redis_prefix: str
) -> None:
    """redis-py 8's default socket timeout is 5 s, and is not in the pool's kwargs of a client
    made by ``from_url``: a read blocking longer must still not time out."""
    store = RedisEventStore(Redis.from_url(redis_url), prefix=redis_prefix)
    try:
        await running(store)
        started = time.monotonic()
        events, record = await store.read("s1", 0, 6.0)
        assert events == [] and record is not None and 5.9 <= time.monotonic() - started < 60
    finally:
        await store.close()


async def test_renew_answers_the_record(store: EventStore) -> None:
    """One operation a tick for a producer: the lease and what it must know (a cancel request,
    its readers)."""
    await running(store)
    record = await store.renew("s1", "t1", 30)
    assert record is not None and record.producer_alive and not record.cancel_requested
    assert record.reader_seen == 0.0
    await store.read("s1", 0, 0)
    assert await store.request_cancel("s1")
    record = await store.renew("s1", "t1", 30)
    assert record is not None and record.cancel_requested and record.reader_seen > 0
    assert await store.renew("s1", "t2", 30) is None


class CountingConnection(Connection):
    """A real connection to the test's redis-server that counts its writes: one per round
    trip (a pipeline is written at once)."""

    writes = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.writes += 1
        await super().send_packed_command(command, check_health)


async def test_redis_one_round_trip_per_wake_up(redis_url: str, redis_prefix: str) -> None:
    """A reader blocked in the store, woken by each of 20 appends, reads each event in one
    round trip (the XREAD's reply is the events), not a snapshot and an XREAD."""
    producer = RedisEventStore(Redis.from_url(redis_url), prefix=redis_prefix)
    pool = ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    reader = RedisEventStore(Redis(connection_pool=pool), prefix=redis_prefix)
    try:
        await running(producer)
        got: list[int] = []

        async def read_all() -> None:
            after = 0
            while after < 20:
                events, _ = await reader.read("s1", after, BLOCK)
                got.extend(seqs(events))
                after = got[-1] if got else after

        reading = asyncio.ensure_future(read_all())
        await asyncio.sleep(0.1)
        for n in range(1, 21):
            await producer.append("s1", "t1", event(n))
            for _ in range(200):  # until the reader has it: one wake-up per event
                if len(got) >= n:
                    break
                await asyncio.sleep(0.005)
            if n == 1:  # connected, scripts loaded, the first snapshot taken: count from here
                CountingConnection.writes = 0
        await asyncio.wait_for(reading, BLOCK)
        assert got == list(range(1, 21))
        assert CountingConnection.writes <= 19 + 1, CountingConnection.writes  # 19 wake-ups
    finally:
        await reader.close()
        await producer.close()


async def test_append_after_a_last_seq_that_is_not_the_streams(store: EventStore) -> None:
    """A producer that says where it left the stream learns when the store lost events (a
    failover to a replica behind it) instead of numbering new events over them."""
    await running(store)
    assert await store.append("s1", "t1", event(1), last_seq=0) == 1
    with pytest.raises(SequenceMismatch):
        await store.append("s1", "t1", event(2), last_seq=0)
    with pytest.raises(SequenceMismatch):
        await store.append("s1", "t1", event(2), last_seq=5)
    assert await store.append("s1", "t1", event(2), last_seq=1) == 2
    assert await store.append("s1", "t1", event(3)) == 3  # no last_seq: no check
    events, _ = await store.read("s1", 0, 0)
    assert seqs(events) == [1, 2, 3]


async def test_a_handover_gives_the_lease_up_and_one_adopter_takes_it(store: EventStore) -> None:
    """The old producer is fenced out at once; exactly one adopter gets the request; the
    stream stays running and goes on at the same sequence number."""
    await running(store)
    await store.append("s1", "t1", event(1), event(2))
    reader = asyncio.ensure_future(timed_read(store, "s1", 2))
    await asyncio.sleep(0.2)
    asked = time.monotonic()
    with pytest.raises(SequenceMismatch):  # not where the stream is: nothing changes
        await store.handover("s1", "t1", '{"r": 1}', time.time() + 30, 1)
    await store.handover("s1", "t1", '{"r": "é"}', time.time() + 30, 2)
    events, record, woke = await asyncio.wait_for(reader, BLOCK)
    assert woke - asked < PROMPT  # its readers are woken
    assert events == [] and record is not None
    assert record.state == "running" and not record.producer_alive
    assert record.handover_until > time.time() + 20
    with pytest.raises(FencingError):
        await store.append("s1", "t1", event(3))
    with pytest.raises(FencingError):
        await store.finish("s1", "t1", "completed")
    assert not await store.renew("s1", "t1", 30)
    adopted = await asyncio.gather(*(store.adopt("s1", f"a{n}", 30) for n in range(5)))
    request = '{"r": "é"}'
    assert [got for got in adopted if got is not None] == [request]
    winner = f"a{adopted.index(request)}"
    record = await store.record("s1")
    assert record is not None and record.producer_alive and record.handover_until == 0.0
    assert await store.adopt("s1", "other", 30) is None  # taken
    assert not await store.claim("s1", "other", 30)
    with pytest.raises(FencingError):
        await store.append("s1", "t1", event(3))
    assert await store.append("s1", winner, event(3), last_seq=2) == 3
    await store.finish("s1", winner, "completed")


async def test_a_handover_not_adopted_in_time_is_not_adopted(store: EventStore) -> None:
    await running(store)
    assert await store.adopt("s1", "a1", 30) is None  # not handed over
    await store.append("s1", "t1", event(1))
    await store.handover("s1", "t1", "{}", time.time() + 0.2, 1)
    await asyncio.sleep(0.4)
    assert await store.adopt("s1", "a1", 30) is None
    record = await store.record("s1")
    assert record is not None and not record.producer_alive and record.state == "running"
