"""Resumable streams across processes: two example proxies share one real redis-server (or
valkey-server, or Redis Cluster).

A stream starts on one process and resumes on the other; an idempotent retry on the other
attaches to it; a cancel on the other stops the producer; a producer process killed outright
leaves its readers a ``producer_lost`` frame, not a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import app_name, completions_body, run_example
from redis.asyncio import Redis
from redis.crc import key_slot
from sanic import Request, Sanic
from test_resume import ROUTE, contents, get_stream

from sanic_streamplus import SSEDecoder, StreamPlus, resume, stream_post, upstream_events
from sanic_streamplus.config import Settings
from sanic_streamplus.errors import (
    EventsExpired,
    ProducerLost,
    ReplayedError,
    StoreUnavailable,
    StreamCancelled,
)
from sanic_streamplus.failover import Handover, UpstreamPool, handover_events
from sanic_streamplus.framing import get_dialect
from sanic_streamplus.observe import Attempt
from sanic_streamplus.resume import Resumer, new_stream_id
from sanic_streamplus.sse import ServerSentEvent
from sanic_streamplus.store import RedisEventStore
from sanic_streamplus.testing import FakeUpstream, fake_tokens, serve_app, stream_request
from sanic_streamplus.testredis import (
    CLUSTER_SLOTS,
    RedisUnavailable,
    start_redis_cluster,
    stop_redis,
)

TOKENS = 40


@contextlib.asynccontextmanager
async def two_proxies(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, cluster: bool = False, **knobs: Any
) -> AsyncIterator[tuple[FakeUpstream, asyncio.subprocess.Process, str, str]]:
    """A fake upstream with ``knobs``, and two example proxies on it sharing the Redis store
    (``redis_url`` names a Cluster's node with ``cluster``); yields the upstream, the first
    proxy's process, and the two proxies' URLs."""
    monkeypatch.setenv("SANIC_STREAMPLUS_RESUME_STORE", "redis")
    monkeypatch.setenv("SANIC_STREAMPLUS_REDIS_URL", redis_url)
    monkeypatch.setenv("SANIC_STREAMPLUS_REDIS_CLUSTER", str(cluster).lower())
    async with (
        FakeUpstream(**knobs) as upstream,
        run_example("--upstream", upstream.url) as (process, one),
        run_example("--upstream", upstream.url) as (_, two),
    ):
        yield upstream, process, one, two


def elsewhere() -> str:
    """An idempotency key whose Redis key is in a slot the first node of the test Cluster does
    not serve (it serves the lowest third)."""
    for n in range(1000):
        digest = hashlib.sha256(f"key-{n}".encode()).hexdigest()
        if key_slot(f"streamplus:idem:{digest}".encode()) >= CLUSTER_SLOTS // 2:
            return f"key-{n}"
    raise AssertionError("unreachable: half the slots are above the middle")


@pytest.mark.parametrize("redis", ["server", "cluster", "valkey"])
async def test_a_stream_started_on_one_process_resumes_on_the_other(
    redis: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On one redis-server, on a Redis Cluster of three masters (STREAMPLUS_REDIS_CLUSTER), and
    on one valkey-server."""
    cluster = redis == "cluster"
    fixture = {"server": "redis_url", "cluster": "redis_cluster", "valkey": "valkey_server"}
    url = request.getfixturevalue(fixture[redis])
    async with (
        two_proxies(url, monkeypatch, cluster, tokens=TOKENS, delay=0.01) as (
            upstream,
            _,
            one,
            two,
        ),
    ):
        key = {"Idempotency-Key": elsewhere()}  # a plain client to the node gets MOVED
        first = await stream_request(
            one, ROUTE, completions_body(), headers=key, disconnect_after=7
        )
        stream_id = first.headers["x-stream-id"]
        path = f"/streams/{stream_id}"
        response, rest = await get_stream(two, path, **{"Last-Event-ID": first.events[-1].id})
    assert response.status_code == 200
    ids = [event.id for event in first.events + rest if event.id]
    assert ids == [f"{stream_id}:{n}" for n in range(1, TOKENS + 3)]
    assert contents(first.events + rest) == "".join(fake_tokens(TOKENS))
    assert rest[-1].data == "[DONE]"
    assert len(upstream.requests) == 1


async def test_an_idempotent_retry_on_the_other_process_attaches(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        two_proxies(redis_url, monkeypatch, tokens=TOKENS, delay=0.01) as (upstream, _, one, two),
    ):
        key = {"Idempotency-Key": "retry-7"}
        first, second = await asyncio.gather(
            stream_request(one, ROUTE, completions_body(), headers=key),
            stream_request(two, ROUTE, completions_body(), headers=key),
        )
    assert first.headers["x-stream-id"] == second.headers["x-stream-id"]
    for result in (first, second):
        assert result.complete
        assert contents(result.events) == "".join(fake_tokens(TOKENS))
    assert len(upstream.requests) == 1  # the upstream saw one request


async def test_a_cancel_on_the_other_process_stops_the_producer(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        two_proxies(redis_url, monkeypatch, tokens=1000, delay=0.01) as (upstream, _, one, two),
        httpx.AsyncClient(timeout=10) as client,
    ):
        request = client.build_request("POST", one + ROUTE, json=completions_body())
        response = await client.send(request, stream=True)
        stream_id = response.headers["x-stream-id"]
        await asyncio.sleep(0.2)
        cancelled = await client.delete(f"{two}/streams/{stream_id}")
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
        closed = await upstream.wait_closed(upstream.requests[0], 5)
        again = await client.delete(f"{one}/streams/{stream_id}")  # finished: as GET sees it
    events = [line for line in raw.decode().split("\n\n") if line]
    assert cancelled.status_code == 202
    assert again.status_code == 409 and again.json()["error"]["type"] == "stream_finished"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["type"] == "cancelled"
    assert closed is not None and not upstream.requests[0].completed


async def test_a_killed_producer_leaves_its_readers_an_error_frame(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        two_proxies(redis_url, monkeypatch, tokens=1000, delay=0.01) as (_, producer, one, two),
    ):
        first = await stream_request(one, ROUTE, completions_body(), disconnect_after=3)
        stream_id = first.headers["x-stream-id"]
        reading = asyncio.ensure_future(get_stream(two, f"/streams/{stream_id}"))
        await asyncio.sleep(0.3)
        producer.send_signal(signal.SIGKILL)  # no finish, no goodbye: the lease lapses
        response, events = await asyncio.wait_for(reading, 30)
    assert response.status_code == 200
    error = json.loads(events[-2].data)["error"]
    assert error["type"] == "producer_lost"
    assert events[-1].data == "[DONE]"
    assert len(events) > 5  # it was reading live when the producer died


async def test_events_lost_by_a_failover_end_the_stream_clearly(
    redis_url: str, redis_prefix: str
) -> None:
    """A Redis failover to a replica that had not got the last appends yet: the stream is
    rolled back under its producer and its readers (as the new master has it). The producer's
    next append finds the stream not where it left it and fails the stream; a reader that had
    read past the new end gets ``events_expired``, a new reader the events kept, then the
    failure: no renumbered events, no hang."""
    store = RedisEventStore(Redis.from_url(redis_url), prefix=redis_prefix)
    resumer = Resumer(store, ttl=600, grace=100, window=1000)
    stream_id = new_stream_id()
    gate = asyncio.Event()

    async def source() -> AsyncIterator[ServerSentEvent]:
        for n in range(1, 11):
            if n == 6:
                await gate.wait()
            yield ServerSentEvent(f"t{n}")

    async def read(after: int, into: list[str]) -> None:
        async for item in resumer.events(stream_id, after):
            into.append(item.data)

    try:
        await store.open(stream_id, None)
        await resumer.start(source(), get_dialect("plain"), stream_id)
        live: list[str] = []
        reading = asyncio.ensure_future(read(0, live))
        for _ in range(400):
            if len(live) >= 5:
                break
            await asyncio.sleep(0.01)
        assert live == [f"t{n}" for n in range(1, 6)]
        raw = Redis.from_url(redis_url)  # the new master lacks events 4 and 5
        base = f"{redis_prefix}stream:{{{stream_id}}}:"
        await raw.xdel(base + "events", "0-4", "0-5")
        await raw.hset(base + "meta", "last_seq", 3)
        await raw.aclose()
        gate.set()
        with pytest.raises(EventsExpired):
            await asyncio.wait_for(reading, 5)
        again: list[str] = []
        with pytest.raises(ReplayedError) as failed:
            await asyncio.wait_for(read(0, again), 5)
        assert again == ["t1", "t2", "t3"]
        assert failed.value.type == "store_unavailable"
    finally:
        await resumer.close()


@pytest.mark.parametrize("dialect", ["plain", "openai"])
async def test_events_lost_by_a_failover_just_before_the_end_fail_the_stream(
    dialect: str, redis_url: str, redis_prefix: str
) -> None:
    """The same rollback between the producer's last append and its end (openai: the
    ``[DONE]`` of the final frame is appended after it; plain: nothing is): the finish carries
    the producer's last sequence number too, so the stream is failed, not completed short of
    the events it lost, and a new reader gets the events kept, then the failure."""
    store = RedisEventStore(Redis.from_url(redis_url), prefix=redis_prefix)
    resumer = Resumer(store, ttl=600, grace=100, window=1000)
    stream_id = new_stream_id()
    raw = Redis.from_url(redis_url)
    base = f"{redis_prefix}stream:{{{stream_id}}}:"

    def data(n: int) -> str:
        return f"t{n}" if dialect == "plain" else json.dumps({"choices": [{"delta": {"n": n}}]})

    async def source() -> AsyncIterator[ServerSentEvent]:
        for n in range(1, 6):
            yield ServerSentEvent(data(n))
        for _ in range(400):  # every event stored: then the failover loses 4 and 5
            if await raw.xlen(base + "events") == 5:
                break
            await asyncio.sleep(0.01)
        await raw.xdel(base + "events", "0-4", "0-5")
        await raw.hset(base + "meta", "last_seq", 3)
        if dialect == "openai":
            yield ServerSentEvent("[DONE]")

    try:
        await store.open(stream_id, None)
        await resumer.start(source(), get_dialect(dialect), stream_id)
        for _ in range(400):
            record = await store.record(stream_id)
            if record is not None and record.finished:
                break
            await asyncio.sleep(0.01)
        assert record is not None and record.state == "failed", record
        assert record.last_seq == 3
        got: list[str] = []
        with pytest.raises(ReplayedError) as failed:
            async for item in resumer.events(stream_id, 0):
                got.append(item.data)
        assert got == [data(1), data(2), data(3)]
        assert failed.value.type == "store_unavailable"
    finally:
        await raw.aclose()
        await resumer.close()


async def test_a_cluster_failover_during_a_stream_is_transparent_or_clear(
    tmp_path: Path, redis_prefix: str
) -> None:
    """A Redis Cluster's master fails over to its replica (``CLUSTER FAILOVER``, as an
    operator or a managed service's maintenance does) while a producer appends and a reader
    reads: ``RedisCluster`` follows the slot to the new master, and the reader gets every
    event once, in order; or, when redis-py's asyncio cluster client fails a connect to the
    demoted node with an ``AttributeError`` (seen in about half the runs with redis-py 8.1),
    the producer stops and the reader ends with ``producer_lost`` after the events it had, in
    order. Never a hang, a gap or a duplicate."""
    try:
        processes, ports = start_redis_cluster(tmp_path, masters=1, replicas=1)
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    url = f"redis://127.0.0.1:{ports[0]}"
    store = RedisEventStore.from_url(url, max_connections=50, cluster=True, prefix=redis_prefix)
    resumer = Resumer(store, ttl=600, grace=100, window=1000)
    stream_id = new_stream_id()
    got: list[str] = []

    async def source() -> AsyncIterator[ServerSentEvent]:
        for n in range(1, 101):
            await asyncio.sleep(0.02)
            yield ServerSentEvent(f"t{n}")

    async def read() -> None:
        async for item in resumer.events(stream_id, 0):
            got.append(item.data)

    try:
        await store.open(stream_id, None)
        await resumer.start(source(), get_dialect("plain"), stream_id)
        reading = asyncio.ensure_future(read())
        for _ in range(500):
            if len(got) >= 20:
                break
            await asyncio.sleep(0.01)
        replica = Redis(host="127.0.0.1", port=ports[1])
        assert await replica.cluster("FAILOVER")
        ended: Exception | None = None
        try:
            await asyncio.wait_for(reading, 20)
        except (ProducerLost, StoreUnavailable) as exc:  # a clear frame for its client
            ended = exc
        role = (await replica.info("replication"))["role"]
        await replica.aclose()
        assert role == "master"  # the failover did happen during the stream
        expected = [f"t{n}" for n in range(1, 101)]
        assert got == (expected if ended is None else expected[: len(got)])
        assert len(got) >= 20
    finally:
        await resumer.close()
        for process in processes:
            stop_redis(process)


# ------------------------------------------------------------ handover on a graceful stop

HANDOVER_TOKENS = 150  # 1.5 s at 0.01 s a token: the producer's worker stops in the middle


def chunk_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_a_gracefully_stopped_producer_hands_its_stream_over(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to the producer's process mid-stream: the other process adopts the stream and
    continues it (the upstream gets the continuation request); a client that resumed there
    through the openai SDK with ``Last-Event-ID`` reads one whole answer: one role delta, one
    finish, ids with no gap, no error."""
    async with (
        two_proxies(redis_url, monkeypatch, tokens=HANDOVER_TOKENS, delay=0.01) as (
            upstream,
            producer,
            one,
            two,
        ),
    ):
        first = await stream_request(one, ROUTE, completions_body(), disconnect_after=5)
        stream_id = first.headers["x-stream-id"]
        sdk = openai.AsyncOpenAI(
            base_url=two + "/resumable/v1", api_key="client-key", max_retries=0, timeout=20
        )
        async with sdk:
            raw = await sdk.chat.completions.with_raw_response.create(
                model="fake",
                messages=completions_body()["messages"],
                stream=True,
                extra_headers={"Last-Event-ID": first.events[-1].id},
            )
            chunks = []
            async for chunk in raw.parse():
                chunks.append(chunk)
                if len(chunks) == 10:
                    producer.send_signal(signal.SIGTERM)  # a graceful stop, mid-stream
        assert await asyncio.wait_for(producer.wait(), 20) == 0
        # the whole stream, replayed from the store: one stream, one end
        replayed, replay = await get_stream(two, f"/streams/{stream_id}")
    assert raw.headers["x-stream-id"] == stream_id
    assert len(upstream.requests) == 2  # the answer, then its continuation
    so_far = upstream.requests[1].json["messages"][-2]
    assert so_far["role"] == "assistant" and len(so_far["content"]) > 0
    whole = "".join(fake_tokens(HANDOVER_TOKENS))
    assert whole.startswith(so_far["content"]) and so_far["content"] != whole
    assert contents(first.events) + chunk_text(chunks) == so_far["content"] + whole
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert sum(1 for e in first.events if '"role"' in e.data) == 1  # in the part read on one
    assert not any(delta.role for delta in deltas)  # and none after the seam
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    assert {c.id for c in chunks} == {json.loads(first.events[0].data)["id"]}
    assert replayed.status_code == 200
    ids = [event.id for event in replay if event.id]
    assert ids == [f"{stream_id}:{n}" for n in range(1, len(ids) + 1)]
    assert contents(replay) == so_far["content"] + whole
    assert [event.data for event in replay].count("[DONE]") == 1
    assert not any('"error"' in event.data for event in replay)


async def test_sanic_workers_2_a_stream_started_on_one_worker_resumes_on_the_other(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One server, ``workers=2`` (Sanic's worker processes on one port, the example's
    ``--workers 2``): connections are found on each worker by ``X-Worker-Pid``; the stream
    started on one resumes through the other with ``Last-Event-ID``, no gap, no duplicate."""
    monkeypatch.setenv("SANIC_STREAMPLUS_RESUME_STORE", "redis")
    monkeypatch.setenv("SANIC_STREAMPLUS_REDIS_URL", redis_url)
    async with (
        FakeUpstream(tokens=TOKENS, delay=0.01) as upstream,
        run_example("--upstream", upstream.url, "--workers", "2") as (_, url),
        contextlib.AsyncExitStack() as stack,
    ):
        workers: dict[str, httpx.AsyncClient] = {}  # pid -> a client whose connection is there
        for _ in range(60):  # each new connection lands on either worker
            limits = httpx.Limits(max_connections=1)
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=10, limits=limits))
            answer = await client.get(url + "/")  # the chat page
            workers.setdefault(answer.headers["x-worker-pid"], client)
            if len(workers) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(workers) == 2, "no connection reached the second worker"
        (one, starter), (other, resumer) = workers.items()
        async with starter.stream("POST", url + ROUTE, json=completions_body()) as started:
            assert started.headers["x-worker-pid"] == one
            decoder, first = SSEDecoder(), []
            async for chunk in started.aiter_raw():
                first += decoder.feed(chunk)
                if len(first) >= 5:
                    break
        stream_id = started.headers["x-stream-id"]
        resumed = await resumer.get(
            f"{url}/streams/{stream_id}", headers={"Last-Event-ID": first[-1].id}
        )
    assert resumed.headers["x-worker-pid"] == other != one
    rest = SSEDecoder().feed(resumed.content)
    ids = [event.id for event in first + rest if event.id]
    assert ids == [f"{stream_id}:{n}" for n in range(1, TOKENS + 3)]
    assert contents(first + rest) == "".join(fake_tokens(TOKENS))
    assert rest[-1].data == "[DONE]"
    assert len(upstream.requests) == 1


# two workers in one process: two Resumers, each with its own client of the same redis-server

CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m"}
TOOL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}


def chunk(delta: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(json.dumps({**CHUNK, "choices": [{"index": 0, "delta": delta}]}))


async def stalled(tool_call: bool) -> AsyncIterator[ServerSentEvent]:
    """An answer that stops after "ab" (and a tool call's start): its worker stops meanwhile."""
    yield chunk({"role": "assistant", "content": ""})
    yield chunk({"content": "a"})
    yield chunk({"content": "b"})
    if tool_call:
        yield chunk({"tool_calls": [TOOL]})
    await asyncio.sleep(30)


def worker(redis_url: str, prefix: str, **options: Any) -> Resumer:
    store = RedisEventStore(Redis.from_url(redis_url), prefix=prefix)
    return Resumer(store, ttl=600, grace=float("inf"), window=5000, **options)


@pytest.mark.parametrize("case", ["continued", "custom_handler", "tool_call", "budget_spent"])
async def test_what_a_stopping_worker_hands_over_and_what_it_ends(
    case: str, redis_url: str, redis_prefix: str
) -> None:
    """Continued on the other worker (the upstream asked for the rest, the text so far as the
    prefill); or a ``shutdown`` frame for every reader, the upstream never asked: a handler
    whose events are its own (no :class:`Handover`), a tool call in flight (the adopter cannot
    prefill it), the continuation budget spent (the stopping worker does not hand it over)."""
    body = completions_body()
    call = {"method": "POST", "url": "/chat/completions", "json": body, "dialect": "openai"}
    spent = [Attempt("up", continuation=True, events=3)] if case == "budget_spent" else []
    handover = None if case == "custom_handler" else Handover.of(call, "fallback", 1, spent)
    async with FakeUpstream(tokens=5) as upstream:
        pool = UpstreamPool(Settings(upstream_url=upstream.url))
        stopping = worker(redis_url, redis_prefix, handover=30.0)
        live = worker(redis_url, redis_prefix, continuer=partial(handover_events, pool, None))
        try:
            stream_id = new_stream_id()
            await stopping.store.open(stream_id, None, {"dialect": "openai"})
            source = stalled(case == "tool_call")
            await stopping.start(source, get_dialect("openai"), stream_id, handover)
            got: list[ServerSentEvent] = []

            async def read() -> None:
                async for event in live.events(stream_id, 0):
                    got.append(event)

            reading = asyncio.ensure_future(read())
            for _ in range(200):
                if len(got) >= 3:
                    break
                await asyncio.sleep(0.01)
            await stopping.close()  # the server stops
            ended: Exception | None = None
            try:
                await asyncio.wait_for(reading, 10)
            except ReplayedError as exc:
                ended = exc
        finally:
            await live.close()
            await pool.aclose()
    text = contents(got)
    if case == "continued":
        assert ended is None
        assert text == "ab" + "".join(fake_tokens(5))
        assert [event.id for event in got] == [f"{stream_id}:{n}" for n in range(1, len(got) + 1)]
        assert sum(1 for event in got if '"role"' in event.data) == 1
        assert upstream.requests[0].json["messages"][-1] == {"role": "assistant", "content": "ab"}
        return
    assert ended is not None and ended.type == "shutdown"
    assert text == "ab"
    assert upstream.requests == []


async def test_a_handover_no_worker_adopts_ends_with_producer_lost(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The only other worker cannot continue streams (no continuer): once the handover's time
    is up, its reader ends with ``producer_lost`` after two leases, not a hang."""
    monkeypatch.setattr(resume, "_LEASE", 0.5)
    call = {"method": "POST", "url": "/chat/completions", "json": {}, "dialect": "openai"}
    stopping = worker(redis_url, redis_prefix, handover=0.5)
    other = worker(redis_url, redis_prefix)
    try:
        stream_id = new_stream_id()
        await stopping.store.open(stream_id, None, {"dialect": "openai"})
        handover = Handover.of(call, "fallback", 1, [])
        await stopping.start(stalled(False), get_dialect("openai"), stream_id, handover)
        got: list[ServerSentEvent] = []

        async def read() -> None:
            async for event in other.events(stream_id, 0):
                got.append(event)

        reading = asyncio.ensure_future(read())
        await asyncio.sleep(0.3)
        stopped = time.monotonic()
        await stopping.close()
        with pytest.raises(ProducerLost):
            await asyncio.wait_for(reading, 10)
        assert time.monotonic() - stopped < 10 * (0.5 + 2 * 0.5)
        record = await other.store.record(stream_id)
    finally:
        await other.close()
    assert contents(got) == "ab"
    assert record is not None and record.state == "running" and record.handover_until > 0


async def test_only_a_pass_through_route_is_handed_over_and_never_with_a_secret(
    redis_url: str,
) -> None:
    """A server (in this process) with three resumable routes stops mid-stream: the one whose
    handler returns ``upstream_events(...)`` as it is is handed over (running, waiting for an
    adopter); one whose handler yields the events itself, and one that sends a header
    upstream (it may be a credential), end with ``shutdown``. The upstream's API key is in no
    key of the stream."""
    app: Sanic[Any, Any] = Sanic(app_name("handover"))
    app.config.update(
        STREAMPLUS_RESUME_STORE="redis",
        STREAMPLUS_REDIS_URL=redis_url,
        STREAMPLUS_UPSTREAM_API_KEY="sk-secret-4242",
    )
    app.extend(extensions=[StreamPlus])

    @app.post("/pass")
    @stream_post(dialect="openai", resumable=True)
    async def passing(request: Request) -> Any:
        return upstream_events(request, "/chat/completions", json=request.json)

    @app.post("/own")
    @stream_post(dialect="openai", resumable=True)
    async def own(request: Request) -> Any:
        upstream = upstream_events(request, "/chat/completions", json=request.json)

        async def events() -> AsyncIterator[ServerSentEvent]:  # its own events, made of those
            async for event in upstream:
                yield event

        return events()

    @app.post("/header")
    @stream_post(dialect="openai", resumable=True)
    async def header(request: Request) -> Any:
        headers = {"X-Tenant-Token": "t-1"}
        return upstream_events(request, "/chat/completions", json=request.json, headers=headers)

    ids: dict[str, str] = {}
    async with FakeUpstream(tokens=1000, delay=0.01) as upstream:
        app.config.STREAMPLUS_UPSTREAM_URL = upstream.url
        async with serve_app(app) as url:
            for route in ("/pass", "/own", "/header"):
                started = await stream_request(url, route, completions_body(), disconnect_after=3)
                ids[route] = started.headers["x-stream-id"]
    store = RedisEventStore(Redis.from_url(redis_url))
    try:
        records = {route: await store.record(stream_id) for route, stream_id in ids.items()}
        values = [
            value
            for stream_id in ids.values()
            for value in (await store.client.hgetall(store._keys(stream_id)[0])).values()
        ]
    finally:
        await store.close()
    handed = records["/pass"]
    assert handed is not None and handed.state == "running" and handed.handover_until > 0
    for route in ("/own", "/header"):
        record = records[route]
        assert record is not None and record.state == "failed"
        assert record.error is not None and record.error["type"] == "shutdown"
    assert values and not any(b"sk-secret-4242" in value for value in values)
    assert all(request.closed is not None for request in upstream.requests)


async def test_a_reader_of_the_stopping_process_resumes_the_handed_over_stream_elsewhere(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client reads on the process that gets SIGTERM: its connection ends with the
    ``shutdown`` frame as before; it resumes on the other process with ``Last-Event-ID`` and
    gets the rest of the one answer, continued there."""
    async with (
        two_proxies(redis_url, monkeypatch, tokens=HANDOVER_TOKENS, delay=0.01) as (
            upstream,
            producer,
            one,
            two,
        ),
        httpx.AsyncClient(timeout=20) as client,
    ):
        first: list[ServerSentEvent] = []
        stopped = False
        async with client.stream("POST", one + ROUTE, json=completions_body()) as started:
            decoder = SSEDecoder()
            async for data in started.aiter_raw():
                first += decoder.feed(data)
                if len(first) >= 10 and not stopped:
                    producer.send_signal(signal.SIGTERM)
                    stopped = True
        stream_id = started.headers["x-stream-id"]
        last = [event for event in first if event.id][-1]
        resumed, rest = await get_stream(two, f"/streams/{stream_id}", **{"Last-Event-ID": last.id})
        assert await asyncio.wait_for(producer.wait(), 20) == 0
    assert json.loads(first[-2].data)["error"]["type"] == "shutdown"  # the stopping one's frame
    assert resumed.status_code == 200
    read = [event for event in first if event.id] + rest
    ids = [event.id for event in read if event.id]
    assert ids == [f"{stream_id}:{n}" for n in range(1, len(ids) + 1)]
    assert len(upstream.requests) == 2
    so_far = upstream.requests[1].json["messages"][-2]["content"]
    assert contents(read) == so_far + "".join(fake_tokens(HANDOVER_TOKENS))
    assert sum(1 for event in read if '"role"' in event.data) == 1
    assert [event.data for event in rest].count("[DONE]") == 1 and rest[-1].data == "[DONE]"


@pytest.mark.parametrize(
    ("change", "handed"),
    [
        ({}, True),
        ({"content": b"{}", "json": None}, False),  # a raw body
        ({"json": ["not", "an", "object"]}, False),
        ({"headers": {"X-Api-Key": "k"}}, False),  # a header may be a credential
        ({"url": "https://api.example.com/v1/chat?key=k"}, False),  # a URL may carry one
        ({"dialect": "plain"}, False),  # no splice knows its text
        ({"budget": 0}, False),
    ],
    ids=["pass-through", "content", "not-object", "headers", "absolute-url", "plain", "no-budget"],
)
def test_which_upstream_requests_can_be_handed_over(change: dict[str, Any], handed: bool) -> None:
    call: dict[str, Any] = {
        "method": "POST",
        "url": "/chat/completions",
        "json": completions_body(),
        "content": None,
        "headers": None,
        "dialect": "openai",
        "upstreams": ("primary",),
    }
    budget = change.pop("budget", 1)
    handover = Handover.of({**call, **change}, "continue", budget, [])
    assert (handover is not None) is handed
    if handover is not None:
        assert json.loads(handover.request_json()) == {
            "method": "POST",
            "url": "/chat/completions",
            "json": completions_body(),
            "dialect": "openai",
            "upstreams": ["primary"],
            "failover": "continue",
            "max_continuations": 1,
            "continued": 0,
        }
        handover.attempts.append(Attempt("primary", continuation=True, events=2))
        assert handover.continued == 1 and not handover.continuable


async def test_a_stream_cancelled_while_handed_over_ends_cancelled(
    redis_url: str, redis_prefix: str
) -> None:
    """Handed over with no reader, then cancelled (``DELETE``) before any worker adopted it: the
    reader that comes next ends with ``cancelled``, and no continuation is asked for."""
    call = {"method": "POST", "url": "/chat/completions", "json": {}, "dialect": "openai"}
    async with FakeUpstream(tokens=5) as upstream:
        pool = UpstreamPool(Settings(upstream_url=upstream.url))
        stopping = worker(redis_url, redis_prefix, handover=30.0)
        live = worker(redis_url, redis_prefix, continuer=partial(handover_events, pool, None))
        try:
            stream_id = new_stream_id()
            await stopping.store.open(stream_id, None, {"dialect": "openai"})
            handover = Handover.of(call, "fallback", 1, [])
            await stopping.start(stalled(False), get_dialect("openai"), stream_id, handover)
            for _ in range(200):
                record = await live.store.record(stream_id)
                if record is not None and record.last_seq >= 3:
                    break
                await asyncio.sleep(0.01)
            await stopping.close()
            assert await live.cancel(stream_id)
            got = []
            with pytest.raises(StreamCancelled):
                async for event in live.events(stream_id, 0):
                    got.append(event)
        finally:
            await live.close()
            await pool.aclose()
    assert contents(got) == "ab"
    assert upstream.requests == []
