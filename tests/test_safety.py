"""Safety and limits: no per-user state in the shared client, places under the limits taken before
anything is read, strict stream IDs, and an event store that survives a Redis restart.

- the shared upstream client keeps no cookie: an upstream's ``Set-Cookie`` for one client's
  request never comes back upstream on another's (on both transports);
- a stream's place under ``STREAMPLUS_MAX_STREAMS`` is taken before its body is read, and given
  back on every way out before the stream starts;
- detached producers of resumable streams are bounded by ``STREAMPLUS_MAX_PRODUCERS``;
- stream IDs and ``Last-Event-ID`` values are parsed strictly: a malformed one is a 4xx JSON
  answer on POST, GET and DELETE, and no stream ID can name an idempotency key's Redis entry;
- after a Redis restart no stream fails; while Redis is away, streams fail fast and clearly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import app_name, completions_body
from sanic import Request, Sanic
from sanic.response import json as json_response
from test_resume import ROUTE, contents, proxy

from sanic_streamplus import StreamPlus, stream_post, upstream_events
from sanic_streamplus.resume import new_stream_id
from sanic_streamplus.testing import FakeUpstream, fake_tokens, serve_app, stream_request
from sanic_streamplus.testredis import RedisUnavailable, start_redis, stop_redis

CHAT = "/v1/chat/completions"  # the example proxy's route that is not resumable


def _json_error(response: httpx.Response) -> str:
    """The ``type`` of a JSON error answer (it must be JSON: never Sanic's text page)."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    return str(response.json()["error"]["type"])


# -- the shared client keeps no cookie ---------------------------------------------------------


@pytest.mark.usefixtures("transport")
async def test_an_upstream_cookie_is_neither_kept_nor_sent_to_anyone() -> None:
    """The upstream is named ``localhost``: aiohttp's own cookie jar refuses cookies of IP
    addresses, and would hide a session that keeps them."""
    async with FakeUpstream(tokens=2, delay=0) as upstream:
        app = proxy(upstream)
        app.config.STREAMPLUS_UPSTREAM_URL = upstream.url.replace("127.0.0.1", "localhost")
        cookie = {"set_cookie": "upstream_session=s3cr3t; Path=/"}
        async with serve_app(app) as url:
            async with httpx.AsyncClient(timeout=10) as alice:
                first = await alice.post(url + CHAT, json=completions_body(**cookie))
            async with httpx.AsyncClient(timeout=10) as bob:
                second = await bob.post(url + CHAT, json=completions_body())
                third = await bob.post(url + CHAT, json=completions_body())
    assert first.status_code == second.status_code == third.status_code == 200
    assert "set-cookie" not in first.headers  # not forwarded down either
    assert len(upstream.requests) == 3
    for request in upstream.requests[1:]:
        assert "cookie" not in request.headers


# -- a place under MAX_STREAMS is taken before the body is read ----------------------------------


def limited_app(upstream: FakeUpstream, **config: Any) -> Sanic[Any, Any]:
    """``/s`` relays the upstream (openai dialect); ``/refuse`` answers the handler's own 400;
    ``/raise`` raises a 400 before its first event."""
    app: Sanic[Any, Any] = Sanic(app_name("safety"))
    app.config.STREAMPLUS_UPSTREAM_URL = upstream.url
    for key, value in config.items():
        app.config[key] = value
    app.extend(extensions=[StreamPlus])

    @app.post("/s")
    @stream_post(dialect="openai")
    async def relayed(request: Request) -> Any:
        return upstream_events(request, "/chat/completions", json=request.json)

    @app.post("/refuse")
    @stream_post
    async def refuse(request: Request) -> Any:
        return json_response({"error": {"type": "invalid_request"}}, status=400)

    @app.post("/raise")
    @stream_post
    async def fail(request: Request) -> Any:
        from sanic.exceptions import BadRequest

        raise BadRequest("no")

    return app


async def test_forty_late_bodies_under_a_limit_of_twenty_admit_twenty() -> None:
    """Every request's headers arrive at once, its body 0.5 s later: the place is taken when
    the headers arrive, so the 21st request is refused before its body, not admitted after."""
    async with FakeUpstream(tokens=40, delay=0.05) as upstream:  # each stream lasts ~2 s
        app = limited_app(upstream, STREAMPLUS_MAX_STREAMS=20)
        body = json.dumps(completions_body()).encode()

        async def late() -> AsyncIterator[bytes]:
            await asyncio.sleep(0.5)
            yield body

        limits = httpx.Limits(max_connections=50)
        async with serve_app(app) as url, httpx.AsyncClient(timeout=20, limits=limits) as client:
            answers = await asyncio.gather(
                *(client.post(url + "/s", content=late()) for _ in range(40))
            )
    statuses = sorted(answer.status_code for answer in answers)
    admitted = statuses.count(200)
    assert admitted == 20, statuses
    assert statuses.count(503) == 20
    refused = [answer for answer in answers if answer.status_code == 503]
    assert all(_json_error(answer) == "too_many_streams" for answer in refused)
    assert all(answer.headers["retry-after"] == "1" for answer in refused)
    assert len(upstream.requests) == 20


async def _upload_then_vanish(url: str, path: str) -> None:
    """Send a request's headers and a part of its body, then close the connection."""
    host, port = url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    writer.write((head + "Content-Length: 90\r\n\r\n").encode() + b'{"pad": "')
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler waits for the rest of the body
    writer.transport.abort()
    await asyncio.sleep(0.2)


async def test_the_place_is_given_back_on_every_way_out_before_the_stream() -> None:
    """With room for one stream, each refusal in turn, then a stream: any place not given back
    would leave the next request a 503."""
    async with FakeUpstream(tokens=2, delay=0) as upstream:
        app = limited_app(upstream, STREAMPLUS_MAX_STREAMS=1, STREAMPLUS_MAX_BODY_SIZE=100)

        async def oversized() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for _ in range(5):
                yield b"x" * 50

        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            statuses = {
                "declared too large": (await client.post(url + "/s", content=b"x" * 200)),
                "counted too large": (await client.post(url + "/s", content=oversized())),
                "not json": (await client.post(url + "/s", content=b"{nope")),
                "handler refusal": (await client.post(url + "/refuse", json={})),
                "handler error": (await client.post(url + "/raise", json={})),
            }
            await _upload_then_vanish(url, "/s")
            after = await client.post(url + "/s", json=completions_body())
            state = app.ctx.streamplus
            left = len(state.streams)
    assert {name: answer.status_code for name, answer in statuses.items()} == {
        "declared too large": 413,
        "counted too large": 413,
        "not json": 400,
        "handler refusal": 400,
        "handler error": 400,
    }
    assert after.status_code == 200 and after.text.endswith("data: [DONE]\n\n")
    assert left == 0


# -- detached producers are bounded --------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "limit"),
    [({"STREAMPLUS_MAX_STREAMS": 5}, 5), ({"STREAMPLUS_MAX_PRODUCERS": 3}, 3)],
    ids=["default-max-streams", "max-producers"],
)
async def test_detached_producers_are_bounded(config: dict[str, Any], limit: int) -> None:
    """15 resumable POSTs whose clients hang up after two events: past the limit a new one is
    a 503 with Retry-After and starts nothing; attaching and resuming still work; a cancel
    gives the place back."""
    async with FakeUpstream(tokens=1000, delay=0.01) as upstream:  # ~10 s each
        app = proxy(upstream, **config)
        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            results = []
            for n in range(15):
                key = {"Idempotency-Key": f"k{n}"}
                result = await stream_request(
                    url, ROUTE, completions_body(), headers=key, disconnect_after=2
                )
                results.append(result)
            await asyncio.sleep(0.2)
            running = sum(1 for request in upstream.requests if request.closed is None)
            attached = await stream_request(
                url, ROUTE, completions_body(), headers={"Idempotency-Key": "k0"},
                disconnect_after=2,
            )
            resumed = await stream_request(
                url, ROUTE, completions_body(), disconnect_after=2,
                headers={"Last-Event-ID": results[1].events[-1].id or ""},
            )
            cancelled = await client.delete(f"{url}/streams/{results[2].headers['x-stream-id']}")
            await upstream.wait_closed(upstream.requests[2], 5)
            admitted_after_cancel = await stream_request(
                url, ROUTE, completions_body(), disconnect_after=2
            )
    statuses = [result.status for result in results]
    assert statuses == [200] * limit + [503] * (15 - limit)
    for result in results[limit:]:
        assert result.headers["retry-after"] == "1"
        assert result.json["error"]["type"] == "too_many_producers"
    assert running == limit
    assert attached.status == 200
    assert attached.headers["x-stream-id"] == results[0].headers["x-stream-id"]
    assert resumed.status == 200
    assert cancelled.status_code == 202
    assert admitted_after_cancel.status == 200
    assert len(upstream.requests) == limit + 1


# -- stream IDs and Last-Event-ID are parsed strictly --------------------------------------------


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_malformed_ids_are_a_clear_4xx_on_post_get_and_delete(
    store: str, redis_url: str
) -> None:
    config: dict[str, Any] = {"STREAMPLUS_RESUME_STORE": store}
    if store == "redis":
        config["STREAMPLUS_REDIS_URL"] = redis_url
    async with FakeUpstream(tokens=3, delay=0) as upstream:
        app = proxy(upstream, **config)
        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            key = f"{new_stream_id()}:meta"  # its Redis entry was the meta of "key:<id>"
            keyed = await client.post(
                url + ROUTE, json=completions_body(), headers={"Idempotency-Key": key}
            )
            stream_id = keyed.headers["x-stream-id"]
            colliding = f"key:{key.removesuffix(':meta')}"
            bad_ids = [colliding, "x" * 300, "lz3k9a1b-5F0C2E7A9D1B3C4E", "é-0000000000000000"]
            bad_last = [
                f"{stream_id}:\u00b2",  # str.isdigit() says yes, int() says no
                f"{stream_id}:{'9' * 40}",  # past any sequence number
                f"{stream_id}:-1",
                f"{colliding}:1",
                "42",
            ]
            answers: dict[str, httpx.Response] = {}
            for bad in bad_ids:
                answers[f"GET {bad}"] = await client.get(f"{url}/streams/{bad}")
                answers[f"DELETE {bad}"] = await client.delete(f"{url}/streams/{bad}")
            for bad in bad_last:
                header = {"Last-Event-ID": bad.encode()}  # httpx sends str as ASCII only
                answers[f"POST {bad}"] = await client.post(
                    url + ROUTE, json=completions_body(), headers=header
                )
                answers[f"GET after {bad}"] = await client.get(
                    f"{url}/streams/{stream_id}", headers=header
                )
            again = await client.post(
                url + ROUTE, json=completions_body(), headers={"Idempotency-Key": key}
            )
    assert keyed.status_code == 200
    assert again.status_code == 200 and again.headers["x-stream-id"] == stream_id  # attached
    assert contents(json_events(again.text)) == "".join(fake_tokens(3))
    wrong = {
        name: (answer.status_code, answer.headers.get("content-type"), answer.text[:80])
        for name, answer in answers.items()
        if answer.status_code not in (400, 404)
        or not answer.headers["content-type"].startswith("application/json")
        or answer.json()["error"]["type"] not in ("stream_not_found", "invalid_request")
    }
    assert wrong == {}


def json_events(text: str) -> list[Any]:
    from sanic_streamplus import SSEDecoder

    return SSEDecoder().feed(text.encode())


# -- Redis restarts and outages ------------------------------------------------------------------


class OwnRedis:
    """A redis-server of a test's own (:func:`~sanic_streamplus.testredis.start_redis`), that it
    can stop and start again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process, self.port = start_redis(workdir)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        stop_redis(self.process)

    def start(self) -> None:
        self.process, _ = start_redis(self.workdir, self.port)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    try:
        redis = OwnRedis(tmp_path)
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield redis
    finally:
        redis.stop()


def redis_proxy(upstream: FakeUpstream, redis: OwnRedis) -> Any:
    return proxy(upstream, STREAMPLUS_RESUME_STORE="redis", STREAMPLUS_REDIS_URL=redis.url)


async def test_after_a_redis_restart_no_stream_fails(own_redis: OwnRedis) -> None:
    """Four streams open four pooled connections; Redis restarts on the same port; the next
    streams find those connections dead, and must reconnect rather than fail."""
    async with FakeUpstream(tokens=10, delay=0.01) as upstream:
        async with serve_app(redis_proxy(upstream, own_redis)) as url:
            before = await asyncio.gather(
                *(stream_request(url, ROUTE, completions_body()) for _ in range(4))
            )
            own_redis.stop()
            own_redis.start()
            after = []
            for _ in range(3):  # rounds: the pool's stale connections would fail one by one
                after += await asyncio.gather(
                    *(stream_request(url, ROUTE, completions_body()) for _ in range(4))
                )
    failed = [result.json for result in before + after if result.status != 200]
    assert failed == []
    for result in before + after:
        assert result.complete and result.events[-1].data == "[DONE]"
        assert contents(result.events) == "".join(fake_tokens(10))


async def test_while_redis_is_away_streams_fail_fast_and_clearly(own_redis: OwnRedis) -> None:
    async with FakeUpstream(tokens=1000, delay=0.01) as upstream:
        app = redis_proxy(upstream, own_redis)
        async with serve_app(app) as url, httpx.AsyncClient(timeout=30) as client:
            live = asyncio.ensure_future(stream_request(url, ROUTE, completions_body(), timeout=30))
            await upstream.wait_requests(1, 5)
            await asyncio.sleep(0.3)
            own_redis.stop()  # the live stream is mid-answer
            began = time.monotonic()
            cut = await live
            cut_after = time.monotonic() - began
            stream_id = cut.headers["x-stream-id"]
            began = time.monotonic()
            post = await client.post(url + ROUTE, json=completions_body())
            get = await client.get(f"{url}/streams/{stream_id}")
            delete = await client.delete(f"{url}/streams/{stream_id}")
            refused_after = time.monotonic() - began
            closed = await upstream.wait_closed(upstream.requests[0], 10)
            own_redis.start()
            back = await stream_request(url, ROUTE, completions_body(tokens=3))
    assert cut.status == 200 and cut.complete
    error = json.loads(cut.events[-2].data)["error"]
    assert error["type"] == "store_unavailable"
    assert cut.events[-1].data == "[DONE]"
    assert cut_after < 20  # measured: 0.15 s
    for answer in (post, get, delete):
        assert answer.status_code == 503, answer.text
        assert _json_error(answer) == "store_unavailable"
        assert answer.headers["retry-after"] == "1"
    assert refused_after < 30  # measured: 0.5 s for the three
    assert closed is not None  # the producer stopped and closed its upstream
    assert back.status == 200 and back.complete
