"""@stream_post handler forms, formats, heartbeats, timeouts, startup checks and OpenAPI docs."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import httpx
import pytest
from conftest import app_name, chat_body
from sanic import Request, Sanic
from sanic.exceptions import BadRequest
from sanic.response import json as json_response
from sanic_ext import openapi

from sanic_streamplus import (
    ExtensionMissing,
    ServerSentEvent,
    SSEDecoder,
    stream_post,
    upstream_events,
)
from sanic_streamplus.testclient import StreamClient, streamplus_app
from sanic_streamplus.testing import FakeUpstream, fake_tokens, serve_app

MakeClient = Callable[..., StreamClient]


def make_app(**config: Any) -> Sanic[Any, Any]:
    app: Sanic[Any, Any] = streamplus_app("forms", **config)
    return app


def relay_app(upstream_url: str, **config: Any) -> Sanic[Any, Any]:
    """An app whose ``POST /s`` relays the upstream's chat completions stream."""
    app = make_app(STREAMPLUS_UPSTREAM_URL=upstream_url, **config)

    @app.post("/s")
    @stream_post
    async def handler(request: Request) -> Any:
        return upstream_events(request, "/chat/completions", json=request.json)

    return app


async def post(url: str, body: Any = None) -> tuple[httpx.Response, bytes]:
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream("POST", url, json={} if body is None else body) as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
    return response, raw


async def stream(client: StreamClient, path: str, body: Any = None) -> tuple[httpx.Response, bytes]:
    """POST ``body`` (``{}`` by default) with the plugin's stream client; its response and the
    body's bytes as they came."""
    async with client.stream("POST", path, json={} if body is None else body) as response:
        raw = await response.aread()
    return response.response, raw


async def test_generator_items_become_events() -> None:
    app = make_app()

    @app.post("/s")
    @stream_post
    async def handler(request: Request) -> AsyncIterator[Any]:
        yield "plain text"
        yield {"a": 1, "b": "é"}
        yield [1, 2]
        yield ServerSentEvent("two\nlines", event="custom", id="7")

    async with serve_app(app) as url:
        response, raw = await post(url + "/s")
    assert response.status_code == 200
    assert raw == (
        b'data: plain text\n\ndata: {"a":1,"b":"\xc3\xa9"}\n\ndata: [1,2]\n\n'
        b"event: custom\nid: 7\ndata: two\ndata: lines\n\n"
    )


async def test_coroutine_may_return_an_iterable_or_a_response() -> None:
    app = make_app()

    async def numbers() -> AsyncIterator[str]:
        for n in range(3):
            yield str(n)

    @app.post("/s")
    @stream_post
    async def handler(request: Request) -> Any:
        if request.json.get("bad"):
            return json_response({"error": {"type": "invalid_request"}}, status=400)
        return numbers()

    async with serve_app(app) as url:
        ok, raw = await post(url + "/s")
        bad, _ = await post(url + "/s", {"bad": True})
    assert ok.status_code == 200
    assert raw == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert bad.status_code == 400


@pytest.mark.parametrize(
    ("fmt", "content_type", "expected"),
    [
        ("ndjson", "application/x-ndjson", b'{"n":1}\n{"event":"message","data":"hi"}\n'),
        ("text", "text/plain; charset=utf-8", b'{"n":1}hi'),
    ],
)
async def test_ndjson_and_text_formats(fmt: str, content_type: str, expected: bytes) -> None:
    app = make_app()

    @app.post("/s")
    @stream_post(format=fmt)
    async def handler(request: Request) -> AsyncIterator[Any]:
        yield {"n": 1}
        yield "hi"

    async with serve_app(app) as url:
        response, raw = await post(url + "/s")
    assert response.headers["content-type"] == content_type
    assert raw == expected


async def test_openai_dialect_ends_with_one_done_and_nothing_after() -> None:
    app = make_app()

    @app.post("/once")
    @stream_post(dialect="openai")
    async def once(request: Request) -> AsyncIterator[Any]:
        yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

    @app.post("/early")
    @stream_post(dialect="openai")
    async def early(request: Request) -> AsyncIterator[Any]:
        yield "[DONE]"
        yield "never sent"

    async with serve_app(app) as url:
        _, once_raw = await post(url + "/once")
        _, early_raw = await post(url + "/early")
    finish = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    assert once_raw == finish + b"data: [DONE]\n\n"  # complete: a finish_reason went by
    assert early_raw == b"data: [DONE]\n\n"


async def test_handler_errors_before_and_after_the_commit_point() -> None:
    app = make_app()

    @app.post("/before")
    @stream_post
    async def before(request: Request) -> AsyncIterator[Any]:
        raise RuntimeError("secret detail")
        yield "unreachable"

    @app.post("/bad")
    @stream_post
    async def bad(request: Request) -> AsyncIterator[Any]:
        raise BadRequest("field x is required")
        yield "unreachable"

    @app.post("/after")
    @stream_post
    async def after(request: Request) -> AsyncIterator[Any]:
        yield "first"
        raise RuntimeError("secret detail")

    async with serve_app(app) as url:
        before_response, before_raw = await post(url + "/before")
        bad_response, bad_raw = await post(url + "/bad")
        after_response, after_raw = await post(url + "/after")
    assert before_response.status_code == 500
    assert json.loads(before_raw)["error"]["type"] == "internal_error"
    assert b"secret" not in before_raw and b"Traceback" not in before_raw
    assert bad_response.status_code == 400
    assert json.loads(bad_raw)["error"]["message"] == "field x is required"
    assert after_response.status_code == 200
    events = SSEDecoder().feed(after_raw)
    assert [e.event for e in events] == ["message", "error"]
    assert json.loads(events[1].data)["error"]["type"] == "internal_error"
    assert b"secret" not in after_raw


@pytest.mark.usefixtures("transport")
@pytest.mark.fake_upstream(tokens=3, delay=0.01, stall=2.5)
async def test_heartbeat_keeps_a_silent_stream_alive_past_response_timeout(
    fake_upstream: FakeUpstream, stream_client: MakeClient
) -> None:
    app = make_app(
        RESPONSE_TIMEOUT=1, STREAMPLUS_UPSTREAM_URL=fake_upstream.url, STREAMPLUS_HEARTBEAT=30
    )

    @app.post("/s")
    @stream_post(dialect="openai")
    async def handler(request: Request) -> Any:
        return upstream_events(request, "/chat/completions", json=request.json)

    response, raw = await stream(await stream_client(app), "/s", {"stream": True})
    assert response.status_code == 200
    assert raw.startswith(b": ping\n")  # committed by the first heartbeat, well before 1 s
    assert raw.count(b": ping\n") >= 3  # heartbeat clamped to RESPONSE_TIMEOUT / 2
    events = SSEDecoder().feed(raw)
    assert events[-1].data == "[DONE]"
    assert len(events) == 3 + 3


@pytest.mark.usefixtures("transport")
@pytest.mark.fake_upstream(stall=3)
async def test_first_event_timeout_before_commit_is_a_504(
    fake_upstream: FakeUpstream, stream_client: MakeClient
) -> None:
    app = relay_app(fake_upstream.url, STREAMPLUS_HEARTBEAT=0, STREAMPLUS_FIRST_EVENT_TIMEOUT=0.3)
    response, raw = await stream(await stream_client(app), "/s")
    closed = await fake_upstream.wait_closed(fake_upstream.requests[-1], 2.0)
    assert response.status_code == 504
    error = json.loads(raw)["error"]
    assert error["type"] == "first_event_timeout"
    assert "first event" in error["message"]
    assert closed is not None


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize(
    ("fake_upstream", "config", "relayed", "error_type", "says"),
    [
        pytest.param(
            {"tokens": 10, "delay": 0.001, "stall": 5, "stall_after": 3},
            {"STREAMPLUS_IDLE_TIMEOUT": 0.3},
            range(3, 4),
            "idle_timeout",
            "idle",
            id="idle-timeout",
        ),
        pytest.param(
            {"tokens": 200, "delay": 0.02},
            {"STREAMPLUS_TOTAL_TIMEOUT": 0.5},
            range(3, 200),
            "total_timeout",
            "total",
            id="total-timeout",
        ),
        pytest.param(
            {"tokens": 3, "delay": 0.05, "token_size": 8192},
            {"STREAMPLUS_MAX_EVENT_SIZE": 4096},
            range(1, 2),
            "event_too_large",
            "maximum event size",
            id="oversized-event",
        ),
    ],
    indirect=["fake_upstream"],  # the parameter is the fake upstream's knobs
)
async def test_upstream_failure_after_the_commit_point_is_an_error_frame(
    fake_upstream: FakeUpstream,
    stream_client: MakeClient,
    config: dict[str, Any],
    relayed: range,
    error_type: str,
    says: str,
) -> None:
    upstream = fake_upstream
    response, raw = await stream(await stream_client(relay_app(upstream.url, **config)), "/s")
    closed = await upstream.wait_closed(upstream.requests[-1], 2.0)
    events = SSEDecoder().feed(raw)
    assert response.status_code == 200
    assert len(events) - 1 in relayed
    assert all(e.event == "message" for e in events[:-1])
    assert events[-1].event == "error"
    error = json.loads(events[-1].data)["error"]
    assert error["type"] == error_type and says in error["message"]
    assert closed is not None and not upstream.requests[-1].completed


@pytest.mark.usefixtures("transport")
async def test_upstream_unreachable_is_a_502() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    app = relay_app(f"http://127.0.0.1:{port}/v1")

    async with serve_app(app) as url:
        response, raw = await post(url + "/s")
    assert response.status_code == 502
    assert json.loads(raw)["error"]["type"] == "upstream_unreachable"


@pytest.mark.usefixtures("transport")
async def test_the_log_names_the_url_of_an_unreachable_or_refusing_upstream_and_no_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 502 the operator can act on: the log line of a refused or unreachable upstream says
    which URL was asked (never the API key, never the query string, where keys also hide)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    caplog.set_level(logging.WARNING, "sanic_streamplus")
    async with FakeUpstream(error_status=500) as refusing:
        answers = []
        for base in (f"http://127.0.0.1:{port}/v1", refusing.url):
            app = make_app(STREAMPLUS_UPSTREAM_URL=base, STREAMPLUS_UPSTREAM_API_KEY="sk-key-xyz")

            @app.post("/s")
            @stream_post
            async def handler(request: Request) -> Any:
                path = "/chat/completions?api_key=qs-key-xyz"
                return upstream_events(request, path, json=request.json)

            async with serve_app(app) as url:
                response, _ = await post(url + "/s")
            answers.append(response.status_code)
    lines = [r.getMessage() for r in caplog.records if r.name == "sanic_streamplus"]
    assert answers == [502, 502]
    unreachable = f"upstream POST http://127.0.0.1:{port}/v1/chat/completions unreachable: "
    assert [line for line in lines if line.startswith(unreachable)], lines
    refused = f"upstream POST {refusing.url}/chat/completions answered 500"
    assert [line for line in lines if line.startswith(refused)], lines
    assert not [line for line in lines if "key-xyz" in line]


@pytest.mark.parametrize(
    "bad", ["ftp://127.0.0.1/v1", "localhost:8741", "http://", "https://:443/v1", "http://a b/"]
)
@pytest.mark.parametrize("when", ["env", "config", "after-extend"])
async def test_a_bad_upstream_url_fails_at_startup_naming_it(
    bad: str, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not an unexplained 502 on every request: the server does not start, and says why."""
    message = rf"STREAMPLUS_UPSTREAM_URL='{bad}': .*http:// or https://|no spaces"
    if when == "env":  # Sanic reads SANIC_STREAMPLUS_* when the app is made
        monkeypatch.setenv("SANIC_STREAMPLUS_UPSTREAM_URL", bad)
    with pytest.raises(ValueError, match=message):
        app = make_app(**({"STREAMPLUS_UPSTREAM_URL": bad} if when == "config" else {}))
        if when == "after-extend":
            app.config.STREAMPLUS_UPSTREAM_URL = bad
        async with serve_app(app):
            pass


async def test_stream_post_on_a_route_without_post_fails_at_startup_naming_it() -> None:
    app = make_app()

    @app.route("/ok", methods=["POST", "HEAD"])
    @stream_post
    async def ok(request: Request) -> AsyncIterator[str]:
        yield "x"

    @app.get("/listen")
    @stream_post
    async def listen(request: Request) -> AsyncIterator[str]:
        yield "x"

    with pytest.raises(RuntimeError, match=r"route '.*\.listen' \(GET /listen\).*@app\.post"):
        async with serve_app(app):
            pass
    app = make_app()  # POST beside HEAD, and a GET stream that takes no body, are fine
    app.add_route(ok, "/ok", methods=["POST", "HEAD"])
    app.add_route(stream_post(require_json=False)(listen.__wrapped__), "/events", methods=["GET"])
    async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
        head = await client.head(url + "/ok")
        streamed = await client.post(url + "/ok", json={})
        got = await client.get(url + "/events")
    assert head.status_code == 200 and head.content == b""
    assert streamed.status_code == 200 and SSEDecoder().feed(streamed.content)[0].data == "x"
    assert got.status_code == 200 and SSEDecoder().feed(got.content)[0].data == "x"


async def test_a_route_for_post_and_get_needs_json_only_from_the_post() -> None:
    """EventSource can only GET: on a route that takes both, the GET (no body) reaches the
    handler, while a POST's body must still be JSON."""
    app = make_app()

    @app.route("/both", methods=["POST", "GET"])
    @stream_post
    async def both(request: Request) -> AsyncIterator[str]:
        yield request.method if request.json is None else request.json["say"]

    async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
        got = await client.get(url + "/both")
        posted = await client.post(url + "/both", json={"say": "hi"})
        not_json = await client.post(url + "/both", content=b"hi")
    assert got.status_code == 200 and SSEDecoder().feed(got.content)[0].data == "GET"
    assert posted.status_code == 200 and SSEDecoder().feed(posted.content)[0].data == "hi"
    assert not_json.status_code == 400
    assert not_json.json()["error"]["message"] == "the request body must be JSON"


@pytest.mark.usefixtures("transport")
@pytest.mark.fake_upstream(tokens=500, delay=0.01)
async def test_a_generator_handler_closes_its_upstream_when_the_client_leaves(
    fake_upstream: FakeUpstream, stream_client: MakeClient
) -> None:
    upstream = fake_upstream
    app = make_app(STREAMPLUS_UPSTREAM_URL=upstream.url)

    @app.post("/s")
    @stream_post
    async def handler(request: Request) -> AsyncIterator[Any]:
        events = upstream_events(request, "/chat/completions", json=request.json)
        async with aclosing(events):
            async for event in events:
                yield event.data.upper()

    client = await stream_client(app)
    async with client.stream("POST", "/s", json={}) as response:
        async for _ in response.aiter_events():
            break
    closed = await upstream.wait_closed(upstream.requests[-1], 2.0)
    assert closed is not None
    assert not upstream.requests[-1].completed


async def test_stream_post_without_the_extension_fails_at_startup() -> None:
    app: Sanic[Any, Any] = Sanic(app_name("bare"))

    @app.post("/s")
    @stream_post
    async def handler(request: Request) -> AsyncIterator[str]:
        yield "x"

    with pytest.raises(ExtensionMissing, match=r"app\.extend\(extensions=\[StreamPlus\]\)"):
        async with serve_app(app):
            pass


def test_unknown_dialect_or_format_is_an_error_at_decoration() -> None:
    with pytest.raises(ValueError, match="dialect"):
        stream_post(dialect="klingon")
    with pytest.raises(ValueError, match="format"):
        stream_post(format="xml")


async def test_openapi_documents_the_route_as_an_event_stream() -> None:
    app = make_app()

    @app.post("/s")
    @stream_post
    @openapi.summary("Stream some tokens")
    async def handler(request: Request) -> AsyncIterator[str]:
        """Streams tokens."""
        yield "x"

    async with serve_app(app) as url, httpx.AsyncClient() as client:
        spec = (await client.get(url + "/docs/openapi.json")).json()
    operation = spec["paths"]["/s"]["post"]
    assert operation["summary"] == "Stream some tokens"
    assert "text/event-stream" in operation["responses"]["200"]["content"]


@pytest.mark.usefixtures("transport")
async def test_tokens_flow_before_the_upstream_finishes(client: httpx.AsyncClient) -> None:
    """The first token reaches the client long before the slow upstream is done."""
    async with FakeUpstream(tokens=20, delay=0.1) as upstream:
        from chat_proxy import create_app

        app = create_app(upstream.url, name=app_name("flow"))
        async with serve_app(app) as url:
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with client.stream("POST", url + "/chat", json=chat_body()) as response:
                async for chunk in response.aiter_raw():
                    if b"event: token" in chunk:
                        first = loop.time() - started
                        break
            assert first < 1.0  # the whole stream takes >= 2 s
            assert fake_tokens(1)[0] in chunk.decode()
