"""Limits, HEAD, compression safety, header forwarding, secrets, graceful shutdown.

Everything here is refused or ended before it costs anything: a 413/503 JSON answer before the
handler runs, a HEAD that starts no upstream request, a shutdown that ends each open stream with
a final frame in its dialect and closes its upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import signal
import time
from typing import Any

import httpx
import pytest
from conftest import app_name, completions_body, run_example
from sanic import Request, Sanic
from sanic.response import HTTPResponse

from sanic_streamplus import SSEDecoder, StreamPlus, stream_post, upstream_events
from sanic_streamplus.config import Settings
from sanic_streamplus.testclient import serve_uvicorn
from sanic_streamplus.testing import FakeUpstream, serve_app

SECRET = "sk-very-secret-key"


def relay_app(upstream_url: str, *, methods: tuple[str, ...] = ("POST",), **config: Any) -> Sanic:
    """An app whose ``/s`` relays the upstream's chat completions stream (openai dialect) and
    whose ``/p`` turns it into plain text events."""
    app: Sanic[Any, Any] = Sanic(app_name("limits"))
    app.config.STREAMPLUS_UPSTREAM_URL = upstream_url
    app.config.STREAMPLUS_UPSTREAM_API_KEY = SECRET
    for key, value in config.items():
        app.config[key] = value
    app.extend(extensions=[StreamPlus])

    @app.route("/s", methods=list(methods))
    @stream_post(dialect="openai")
    async def openai(request: Request) -> Any:
        return upstream_events(request, "/chat/completions", json=request.json)

    @app.post("/p")
    @stream_post
    async def plain(request: Request) -> Any:
        async for event in upstream_events(request, "/chat/completions", json=request.json):
            if event.data != "[DONE]":
                yield {"text": json.loads(event.data)["choices"][0]["delta"].get("content")}

    return app


@pytest.mark.parametrize("serve", [serve_app, serve_uvicorn], ids=["sanic", "uvicorn"])
async def test_a_body_over_the_limit_is_a_413_before_anything_starts(serve: Any) -> None:
    async with FakeUpstream() as upstream:
        app = relay_app(upstream.url, STREAMPLUS_MAX_BODY_SIZE=1000)
        async with serve(app) as url, httpx.AsyncClient(timeout=10) as client:
            declared = await client.post(url + "/s", json={"pad": "x" * 2000})

            async def chunks() -> Any:  # no Content-Length: the body is counted as it arrives
                for _ in range(20):  # still sending after the limit: the 413 must reach it
                    yield b'{"pad": "' + b"x" * 100 + b'"}'
                    await asyncio.sleep(0.01)

            chunked = await client.post(url + "/s", content=chunks())
            small = await client.post(url + "/s", json=completions_body(tokens=2))
    for response in (declared, chunked):
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["type"] == "body_too_large"
        assert "1000 bytes" in error["message"]
    assert small.status_code == 200
    assert small.text.endswith("data: [DONE]\n\n")
    assert len(upstream.requests) == 1  # only the small one went upstream


@pytest.mark.parametrize("serve", [serve_app, serve_uvicorn], ids=["sanic", "uvicorn"])
async def test_a_body_that_never_ends_is_refused_within_the_drain_time(serve: Any) -> None:
    """A body past the limit is read on and dropped for at most about a second (so a client
    still sending sees the 413), not for as long as the client goes on sending."""
    async with FakeUpstream() as upstream:
        app = relay_app(upstream.url, STREAMPLUS_MAX_BODY_SIZE=1000)
        async with serve(app) as url:
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")

            async def trickle() -> None:  # 200 bytes every 20 ms, for at most 20 s
                with contextlib.suppress(ConnectionError):
                    for _ in range(1000):
                        writer.write(b"c8\r\n" + b"x" * 200 + b"\r\n")
                        await writer.drain()
                        await asyncio.sleep(0.02)

            sending = asyncio.create_task(trickle())
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            finally:
                sending.cancel()
                writer.close()
    assert head.startswith(b"HTTP/1.1 413"), head
    assert upstream.requests == []


async def test_streams_past_the_limit_get_a_503_with_retry_after() -> None:
    async with FakeUpstream(tokens=200, delay=0.01) as upstream:
        app = relay_app(upstream.url, STREAMPLUS_MAX_STREAMS=2)
        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            async with (
                client.stream("POST", url + "/s", json=completions_body()) as one,
                client.stream("POST", url + "/s", json=completions_body()) as two,
            ):
                assert one.status_code == two.status_code == 200
                refused = await client.post(url + "/s", json=completions_body())
            await asyncio.sleep(0.1)  # the two streams end; the slots are free again
            after = await client.post(url + "/s", json=completions_body(tokens=2, delay=0))
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "too_many_streams"
    assert after.status_code == 200
    assert len(upstream.requests) == 3


async def test_head_answers_the_stream_headers_and_starts_nothing() -> None:
    async with FakeUpstream() as upstream:
        app = relay_app(upstream.url, methods=("POST", "HEAD"))

        @app.get("/g")  # sanic-ext answers HEAD on GET routes by calling the GET handler
        @stream_post(require_json=False)
        async def get_stream(request: Request) -> Any:
            return upstream_events(request, "/chat/completions", json={})

        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            heads = [await client.head(url + path) for path in ("/s", "/g")]
    for head in heads:
        assert head.status_code == 200
        assert head.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert head.content == b""
    assert upstream.requests == []


async def test_a_compression_middleware_leaves_streams_alone() -> None:
    """A response middleware of the usual kind (gzip the body when the client accepts it and
    the response allows it) must not touch a stream: streams have no body to compress at that
    point, and ``no-transform`` forbids it to anything further along."""
    async with FakeUpstream(tokens=5, delay=0) as upstream:
        app = relay_app(upstream.url)

        @app.get("/doc")
        async def doc(request: Request) -> HTTPResponse:
            return HTTPResponse("x" * 5000, content_type="text/plain")

        @app.on_response
        async def compress(request: Request, response: HTTPResponse) -> None:
            if (
                "gzip" in request.headers.get("accept-encoding", "")
                and "no-transform" not in response.headers.get("cache-control", "")
                and response.body
            ):
                response.body = gzip.compress(response.body)
                response.headers["content-encoding"] = "gzip"

        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            gzip_headers = {"accept-encoding": "gzip"}
            document = await client.get(url + "/doc", headers=gzip_headers)
            stream = await client.post(url + "/s", json=completions_body(), headers=gzip_headers)
    assert document.headers["content-encoding"] == "gzip"  # the middleware does work
    assert "content-encoding" not in stream.headers
    assert "no-transform" in stream.headers["cache-control"]
    assert stream.text.endswith("data: [DONE]\n\n")


async def test_only_allowlisted_headers_go_upstream() -> None:
    sent = {
        "authorization": "Bearer client-token",
        "cookie": "session=abc",
        "x-request-id": "req-1",
        "x-tenant": "t-9",
    }
    async with FakeUpstream(tokens=1, delay=0) as upstream:
        default = relay_app(upstream.url)
        allowing = relay_app(upstream.url, STREAMPLUS_FORWARD_HEADERS="X-Request-Id, Cookie")
        for app in (default, allowing):
            async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
                response = await client.post(url + "/s", json=completions_body(), headers=sent)
                assert response.status_code == 200
    plain, allowed = (request.headers for request in upstream.requests)
    assert plain["authorization"] == allowed["authorization"] == f"Bearer {SECRET}"  # ours
    assert "cookie" not in plain and "x-request-id" not in plain and "x-tenant" not in plain
    assert allowed["cookie"] == "session=abc" and allowed["x-request-id"] == "req-1"
    assert "x-tenant" not in allowed


def test_hop_by_hop_headers_are_refused_in_the_allowlist() -> None:
    with pytest.raises(ValueError, match="hop-by-hop headers are never forwarded: connection"):
        Settings.from_config({"STREAMPLUS_FORWARD_HEADERS": "x-a, Connection"})
    settings = Settings.from_config({"STREAMPLUS_FORWARD_HEADERS": "X-A, x-b"})
    assert settings.forward_headers == ("x-a", "x-b")


@pytest.mark.parametrize(
    "knobs",
    [
        {"error_status": 401},
        {"error_status": 500},
        {"content_type": "text/html"},
        {"fail_after": 2},
        {"set_cookie": "upstream_session=s3cr3t"},
    ],
    ids=["401", "500", "not-sse", "reset", "set-cookie"],
)
async def test_errors_never_echo_secrets_or_upstream_bodies(knobs: dict[str, Any]) -> None:
    async with FakeUpstream(tokens=5, delay=0) as upstream:
        app = relay_app(upstream.url)
        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            response = await client.post(url + "/s", json=completions_body(**knobs))
    assert response.status_code in (200, 401, 502)  # an upstream 401 keeps its status
    assert SECRET not in response.text
    if response.status_code != 200:  # of the upstream's body, only its JSON error's message
        assert response.json()["error"]["message"] in (
            "fake upstream error",
            "upstream answered HTTP 500",
        ) or "text/html" in response.json()["error"]["message"]
    assert "Traceback" not in response.text and "File \"" not in response.text
    assert "set-cookie" not in response.headers
    assert "s3cr3t" not in response.text


async def read_events(response: httpx.Response) -> list[Any]:
    decoder, events = SSEDecoder(), []
    async for chunk in response.aiter_raw():
        events += decoder.feed(chunk)
    return events


async def test_shutdown_ends_open_streams_with_a_final_frame_and_closes_upstreams() -> None:
    async with FakeUpstream(tokens=1000, delay=0.01) as upstream:
        app = relay_app(upstream.url)
        client = httpx.AsyncClient(timeout=10)
        async with serve_app(app) as url:
            openai = await client.send(
                client.build_request("POST", url + "/s", json=completions_body()), stream=True
            )
            plain = await client.send(
                client.build_request("POST", url + "/p", json=completions_body()), stream=True
            )
            await upstream.wait_requests(2, 5)
            await asyncio.sleep(0.1)  # a few tokens flow; then the server stops
        openai_events = await read_events(openai)
        plain_events = await read_events(plain)
        closed = [await upstream.wait_closed(request, 2) for request in upstream.requests]
        await client.aclose()
    assert json.loads(openai_events[-2].data)["error"]["type"] == "shutdown"
    assert openai_events[-1].data == "[DONE]"
    assert plain_events[-1].event == "error"
    assert json.loads(plain_events[-1].data)["error"]["type"] == "shutdown"
    assert len(openai_events) > 3 and len(plain_events) > 2  # it was mid-stream
    assert all(when is not None for when in closed)


async def test_shutdown_of_the_example_process_sends_final_frames_without_a_traceback() -> None:
    async with (
        FakeUpstream(tokens=1000, delay=0.01) as upstream,
        run_example("--upstream", upstream.url, output=True) as (process, url),
        httpx.AsyncClient(timeout=10) as client,
    ):
        path = url + "/v1/chat/completions"
        response = await client.send(
            client.build_request("POST", path, json=completions_body()), stream=True
        )
        await upstream.wait_requests(1, 5)
        await asyncio.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        events = await read_events(response)
        assert process.stdout is not None
        output = (await asyncio.wait_for(process.stdout.read(), 20)).decode()
        await asyncio.wait_for(process.wait(), 10)
        stopping = time.monotonic() - signalled
        closed = await upstream.wait_closed(upstream.requests[0], 2)
    assert json.loads(events[-2].data)["error"]["type"] == "shutdown"
    assert events[-1].data == "[DONE]"
    assert closed is not None
    assert "outcome=shutdown" in output
    assert "Traceback" not in output, output
    assert process.returncode == 0
    # the keep-alive connection must not hold the stop for half of GRACEFUL_SHUTDOWN_TIMEOUT
    assert stopping < 5.0
