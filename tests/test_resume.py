"""Resumable streams on one worker (the memory store): resume, idempotency, cancel, expiry,
the producer detached from its client, and a producer that fails.

The same behaviour across processes sharing a Redis is in ``test_resume_redis.py``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from conftest import app_name, completions_body

from sanic_streamplus import ServerSentEvent, SSEDecoder
from sanic_streamplus.resume import new_stream_id
from sanic_streamplus.testing import FakeUpstream, fake_tokens, serve_app, stream_request

ROUTE = "/resumable/v1/chat/completions"
TOKENS = 30


def proxy(upstream: FakeUpstream, **config: Any) -> Any:
    from chat_proxy import create_app

    app = create_app(upstream.url, name=app_name("resume"))
    for key, value in config.items():
        app.config[key] = value
    return app


def contents(events: list[ServerSentEvent]) -> str:
    """The text the events carry (openai chunks), in order."""
    text = ""
    for event in events:
        if event.data != "[DONE]":
            for choice in json.loads(event.data)["choices"]:
                text += choice["delta"].get("content") or ""
    return text


async def get_stream(url: str, path: str, **headers: str) -> tuple[httpx.Response, list[Any]]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url + path, headers=headers)
    return response, SSEDecoder().feed(response.content)


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("how", ["get-route", "post-header"])
async def test_resume_after_a_disconnect_yields_the_whole_sequence_once(how: str) -> None:
    async with FakeUpstream(tokens=TOKENS, delay=0.01) as upstream:
        async with serve_app(proxy(upstream)) as url:
            first = await stream_request(url, ROUTE, completions_body(), disconnect_after=5)
            stream_id = first.headers["x-stream-id"]
            last_id = first.events[-1].id
            assert last_id == f"{stream_id}:5"
            await asyncio.sleep(0.2)  # the producer goes on without a reader
            if how == "get-route":
                response, rest = await get_stream(
                    url, f"/streams/{stream_id}", **{"Last-Event-ID": last_id}
                )
                status = response.status_code
            else:
                second = await stream_request(
                    url, ROUTE, completions_body(), headers={"Last-Event-ID": last_id}
                )
                status, rest = second.status, second.events
    assert status == 200
    ids = [event.id for event in first.events + rest if event.id]
    assert ids == [f"{stream_id}:{n}" for n in range(1, TOKENS + 3)]  # role, tokens, stop
    assert contents(first.events + rest) == "".join(fake_tokens(TOKENS))
    assert rest[-1].data == "[DONE]"
    assert len(upstream.requests) == 1  # one generation, paid once


async def test_an_idempotent_retry_attaches_instead_of_generating_again() -> None:
    async with FakeUpstream(tokens=TOKENS, delay=0.01) as upstream:
        async with serve_app(proxy(upstream)) as url:
            key = {"Idempotency-Key": "order-42"}
            one, two = await asyncio.gather(
                stream_request(url, ROUTE, completions_body(), headers=key),
                stream_request(url, ROUTE, completions_body(), headers=key),
            )
            three = await stream_request(url, ROUTE, completions_body(), headers=key)  # done
    assert one.headers["x-stream-id"] == two.headers["x-stream-id"] == three.headers["x-stream-id"]
    for result in (one, two, three):
        assert result.complete
        assert contents(result.events) == "".join(fake_tokens(TOKENS))
    assert len(upstream.requests) == 1


async def test_a_resumable_stream_counts_once_under_max_streams() -> None:
    async with FakeUpstream(tokens=200, delay=0.01) as upstream:
        app = proxy(upstream, STREAMPLUS_MAX_STREAMS=2)
        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            async with (
                client.stream("POST", url + ROUTE, json=completions_body()) as one,
                client.stream("POST", url + ROUTE, json=completions_body()) as two,
            ):
                statuses = [one.status_code, two.status_code]
                refused = await client.post(url + ROUTE, json=completions_body())
    assert statuses == [200, 200]
    assert refused.status_code == 503


async def test_readers_of_the_resume_route_count_under_max_streams() -> None:
    async with FakeUpstream(tokens=200, delay=0.01) as upstream:
        app = proxy(upstream, STREAMPLUS_MAX_STREAMS=2)
        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            async with client.stream("POST", url + ROUTE, json=completions_body()) as one:
                path = f"{url}/streams/{one.headers['x-stream-id']}"
                async with client.stream("GET", path) as reader:
                    statuses = [one.status_code, reader.status_code]
                    refused = await client.get(path)
                again_status = 0
                for _ in range(40):  # the reader's place is back once the server saw it leave
                    async with client.stream("GET", path) as again:
                        again_status = again.status_code
                    if again_status == 200:
                        break
                    await asyncio.sleep(0.05)
    assert statuses == [200, 200]
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "too_many_streams"
    assert refused.headers["retry-after"] == "1"
    assert again_status == 200


async def test_cancel_closes_the_upstream_and_readers_get_a_cancelled_frame() -> None:
    async with FakeUpstream(tokens=1000, delay=0.01) as upstream:
        async with serve_app(proxy(upstream)) as url, httpx.AsyncClient(timeout=10) as client:
            request = client.build_request("POST", url + ROUTE, json=completions_body())
            response = await client.send(request, stream=True)
            stream_id = response.headers["x-stream-id"]
            await asyncio.sleep(0.1)
            cancelled = await client.delete(f"{url}/streams/{stream_id}")
            events = SSEDecoder().feed(b"".join([c async for c in response.aiter_raw()]))
            again = await client.delete(f"{url}/streams/{stream_id}")
            closed = await upstream.wait_closed(upstream.requests[0], 2)
    assert cancelled.status_code == 202
    assert json.loads(events[-2].data)["error"]["type"] == "cancelled"
    assert events[-1].data == "[DONE]"
    assert closed is not None
    assert not upstream.requests[0].completed
    assert again.status_code == 409  # finished (cancelled): nothing left to cancel
    assert again.json()["error"]["type"] == "stream_finished"


async def test_unknown_expired_and_dropped_ids_get_a_clear_answer_before_the_stream() -> None:
    async with FakeUpstream(tokens=50, delay=0.005) as upstream:
        app = proxy(upstream, STREAMPLUS_RESUME_TTL=1.0, STREAMPLUS_RESUME_MAX_EVENTS=10)
        async with serve_app(app) as url:
            first = await stream_request(url, ROUTE, completions_body(), disconnect_after=1)
            stream_id = first.headers["x-stream-id"]
            for _ in range(100):  # the producer finishes the stream with no reader
                if upstream.requests[0].completed:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
            path = f"/streams/{stream_id}"
            dropped, _ = await get_stream(url, path, **{"Last-Event-ID": f"{stream_id}:3"})
            kept, kept_events = await get_stream(url, path, **{"Last-Event-ID": f"{stream_id}:45"})
            unknown, _ = await get_stream(url, f"/streams/{new_stream_id()}")
            ancient, _ = await get_stream(url, "/streams/lz3k9a1b-0000000000000000")
            malformed = await stream_request(
                url, ROUTE, completions_body(), headers={"Last-Event-ID": "42"}
            )
            await asyncio.sleep(1.3)
            expired, _ = await get_stream(url, path)
    assert dropped.status_code == 410 and dropped.json()["error"]["type"] == "events_expired"
    assert kept.status_code == 200
    assert [e.id for e in kept_events[:-1]] == [f"{stream_id}:{n}" for n in range(46, 53)]
    assert kept_events[-1].data == "[DONE]"
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "stream_not_found"
    assert ancient.status_code == 410 and ancient.json()["error"]["type"] == "stream_expired"
    assert malformed.status == 404 and malformed.json["error"]["type"] == "stream_not_found"
    assert expired.status_code == 410 and expired.json()["error"]["type"] == "stream_expired"


async def test_a_fast_stream_longer_than_the_cap_reaches_its_live_reader_whole() -> None:
    """The producer runs at most half the cap ahead of a reader of its own worker (the
    upstream waits with it); a reader that left does not hold it back."""
    async with FakeUpstream(tokens=2000, delay=0) as upstream:
        app = proxy(upstream, STREAMPLUS_RESUME_MAX_EVENTS=50)
        async with serve_app(app) as url:
            live = await stream_request(url, ROUTE, completions_body())
            await stream_request(url, ROUTE, completions_body(), disconnect_after=3)
            left = upstream.requests[1]
            for _ in range(100):
                if left.completed:
                    break
                await asyncio.sleep(0.05)
    assert live.complete and live.events[-1].data == "[DONE]"
    assert contents(live.events) == "".join(fake_tokens(2000))
    assert left.completed  # produced to the end with no reader


async def test_the_producer_goes_on_for_the_grace_time_then_stops() -> None:
    async with FakeUpstream(tokens=1000, delay=0.01) as upstream:
        app = proxy(upstream, STREAMPLUS_RESUME_GRACE=0.5)
        async with serve_app(app) as url:
            first = await stream_request(url, ROUTE, completions_body(), disconnect_after=3)
            record = upstream.requests[0]
            await asyncio.sleep(0.3)
            assert record.closed is None  # the reader left; the producer goes on
            closed = await upstream.wait_closed(record, 5)
            path = f"/streams/{first.headers['x-stream-id']}"
            _, events = await get_stream(url, path, **{"Last-Event-ID": first.events[-1].id})
    assert closed is not None and not record.completed
    assert json.loads(events[-2].data)["error"]["type"] == "cancelled"


async def test_a_producer_that_fails_gives_every_reader_its_error_frame() -> None:
    async with FakeUpstream(tokens=20, delay=0.01, fail_after=8) as upstream:
        async with serve_app(proxy(upstream)) as url:
            first = await stream_request(url, ROUTE, completions_body())
            stream_id = first.headers["x-stream-id"]
            _, replay = await get_stream(url, f"/streams/{stream_id}")
    for events in (first.events, replay):
        error = json.loads(events[-2].data)["error"]
        assert error["type"] == "upstream_disconnected"
        assert events[-1].data == "[DONE]"
        assert [e.id for e in events[:-2]] == [f"{stream_id}:{n}" for n in range(1, 9)]


async def test_delete_and_get_agree_on_a_finished_stream() -> None:
    """A finished stream is still there: DELETE says so (409 ``stream_finished``) while GET
    replays it; an unknown or expired ID gets the same 404/410 from both."""
    async with FakeUpstream(tokens=5, delay=0.001) as upstream:
        async with serve_app(proxy(upstream)) as url, httpx.AsyncClient(timeout=10) as client:
            done = await stream_request(url, ROUTE, completions_body())
            path = f"/streams/{done.headers['x-stream-id']}"
            deleted = await client.delete(url + path)
            replayed, events = await get_stream(url, path)
            ids = {"unknown": new_stream_id(), "expired": "lz3k9a1b-0000000000000000"}
            answers = {
                name: ((await client.delete(f"{url}/streams/{sid}")).status_code,
                       (await client.get(f"{url}/streams/{sid}")).status_code)
                for name, sid in ids.items()
            }
    assert done.events[-1].data == "[DONE]"
    assert deleted.status_code == 409
    error = deleted.json()["error"]
    assert error["type"] == "stream_finished" and "completed" in error["message"]
    assert replayed.status_code == 200
    assert contents(events) == "".join(fake_tokens(5)) and events[-1].data == "[DONE]"
    assert answers == {"unknown": (404, 404), "expired": (410, 410)}
