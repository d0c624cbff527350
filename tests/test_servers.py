"""The same disconnect, slow-client and shutdown cases on every server a stream can run on:
Sanic's own, uvicorn and granian (the app as an ASGI app). Where a server does not let us do
what the native server does, the test says what happens there instead; the table of
docs/deploying.md ("ASGI servers") is filled from these tests. Every server runs in the test's
process on 127.0.0.1 (the kit's ``stream_client``: ``serve_app``, ``serve_uvicorn``,
``serve_granian``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from sanic import Request, Sanic

from sanic_streamplus import ServerSentEvent, SSEDecoder, stream_post, upstream_events
from sanic_streamplus.testclient import SERVERS, StreamClient
from sanic_streamplus.testing import FakeUpstream, fake_tokens, stream_request

BODY = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def relay_app(make: Callable[..., Sanic[Any, Any]], upstream: FakeUpstream, **config: Any) -> Any:
    """``POST /s`` relays the fake upstream's chat completions (openai dialect)."""
    app = make(
        "servers",
        STREAMPLUS_UPSTREAM_URL=upstream.url,
        STREAMPLUS_HEARTBEAT=0,
        STREAMPLUS_HIGH_WATER_MARK=16 * 1024,
        **config,
    )

    @app.post("/s")
    @stream_post(dialect="openai")
    async def relay(request: Request) -> Any:
        return upstream_events(request, "/chat/completions", json=request.json)

    return app


def outcomes(caplog: pytest.LogCaptureFixture) -> list[str]:
    """``<outcome> [error=<type>]`` of each stream's log line so far."""
    return [
        " ".join(part for part in r.getMessage().split() if part.startswith(("outcome=", "error=")))
        for r in caplog.records
        if r.name == "sanic_streamplus" and "outcome=" in r.getMessage()
    ]


async def logged(caplog: pytest.LogCaptureFixture, count: int) -> list[str]:
    """:func:`outcomes` once ``count`` streams logged (the line follows the close), within 2 s."""
    for _ in range(100):
        if len(found := outcomes(caplog)) >= count:
            return found
        await asyncio.sleep(0.02)
    return outcomes(caplog)


def error_type(event: ServerSentEvent) -> str | None:
    """The ``error.type`` of an openai error frame, else None."""
    return (
        (json.loads(event.data).get("error") or {}).get("type") if event.data[:1] == "{" else None
    )


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A plain httpx client (the server under test is the kit's; the client is ours)."""
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


# --- a client that goes away ---------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "reset"])
@pytest.mark.fake_upstream(tokens=1000, delay=0.01)
async def test_a_client_that_leaves_closes_the_upstream(
    server: str,
    reset: bool,
    fake_upstream: FakeUpstream,
    stream_client: Callable[..., StreamClient],
    streamplus_app: Callable[..., Sanic[Any, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "sanic_streamplus")
    client = await stream_client(relay_app(streamplus_app, fake_upstream), server=server)
    result = await stream_request(
        client.url, "/s", BODY, disconnect_after=3, reset_on_disconnect=reset, timeout=5
    )
    assert result.status == 200 and result.end == "disconnected"
    record = fake_upstream.requests[-1]
    assert await fake_upstream.wait_closed(record, 2.0) is not None, "upstream open 2 s later"
    assert not record.completed
    assert await logged(caplog, 1) == ["outcome=client_disconnected"]


# --- the client socket's options -----------------------------------------------------------

# what the server-side socket of a stream's connection has, once the stream is committed
# (STREAMPLUS_SEND_TIMEOUT 7.5 s): ours on the native server, the ASGI server's otherwise
SOCKET_OPTIONS: dict[str, dict[str, int]] = {
    "sanic": {"TCP_NODELAY": 1, "SO_KEEPALIVE": 1, "TCP_USER_TIMEOUT": 15000, "TCP_KEEPIDLE": 2},
    "uvicorn": {"TCP_NODELAY": 1, "SO_KEEPALIVE": 0, "TCP_USER_TIMEOUT": 0, "TCP_KEEPIDLE": 7200},
    "granian": {"TCP_NODELAY": 1, "SO_KEEPALIVE": 0, "TCP_USER_TIMEOUT": 0, "TCP_KEEPIDLE": 7200},
}


def accepted_socket(port: int, peer_port: int) -> socket.socket:
    """A duplicate of this process's socket connected 127.0.0.1:``port`` <- ``peer_port``: the
    server's side of a connection (every server here runs in the test's process)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:  # not a socket
            continue
        with sock:
            try:
                ends = sock.getsockname()[1], sock.getpeername()[1]
            except (OSError, IndexError, TypeError):
                continue
            if sock.type == socket.SOCK_STREAM and ends == (port, peer_port):
                return sock.dup()
    raise LookupError(f"no socket 127.0.0.1:{port} <- {peer_port} in this process")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/fd and TCP_USER_TIMEOUT")
@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.fake_upstream(tokens=1000, delay=0.01)
async def test_the_client_socket_options(
    server: str,
    fake_upstream: FakeUpstream,
    stream_client: Callable[..., StreamClient],
    streamplus_app: Callable[..., Sanic[Any, Any]],
) -> None:
    app = relay_app(streamplus_app, fake_upstream, STREAMPLUS_SEND_TIMEOUT=7.5)
    client = await stream_client(app, server=server)
    port = int(client.url.rsplit(":", 1)[1])
    body = json.dumps(BODY).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        seen = b""
        while b"data:" not in seen:  # committed: the native server tuned the socket by now
            chunk = await asyncio.wait_for(reader.read(4096), 5)
            assert chunk, "the server closed early"
            seen += chunk
        with accepted_socket(port, writer.get_extra_info("sockname")[1]) as sock:
            options = {
                name: sock.getsockopt(
                    socket.SOL_SOCKET if name.startswith("SO_") else socket.IPPROTO_TCP,
                    getattr(socket, name),
                )
                for name in SOCKET_OPTIONS[server]
            }
    finally:
        writer.close()
    assert options == SOCKET_OPTIONS[server]


# --- a client that stops reading -----------------------------------------------------------

TOKEN_SIZE = 2048
TOKENS = 20_000  # about 40 MB: far more than loopback's socket buffers hold


# what a client that comes back after the grace (another send timeout) gets: the native
# server aborts the connection; under ASGI the body is left unfinished (no terminating chunk)
LATE: dict[str, type[httpx.HTTPError]] = {
    "sanic": httpx.ReadError,
    "uvicorn": httpx.RemoteProtocolError,
    "granian": httpx.RemoteProtocolError,
}


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("comes_back", ["in time", "late"])
@pytest.mark.fake_upstream(tokens=TOKENS, token_size=TOKEN_SIZE, delay=0)
async def test_a_client_that_stops_reading_is_cut_by_the_send_timeout(
    server: str,
    comes_back: str,
    fake_upstream: FakeUpstream,
    stream_client: Callable[..., StreamClient],
    streamplus_app: Callable[..., Sanic[Any, Any]],
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client stops reading, the send timeout (0.5 s) cuts the stream and closes the
    upstream. A client that reads again within the grace (another send timeout) gets
    everything up to the cut, the ``send_timeout`` frame, then a clean end; one that comes
    back later cannot mistake what it gets for a whole stream."""
    caplog.set_level(logging.INFO, "sanic_streamplus")
    app = relay_app(streamplus_app, fake_upstream, STREAMPLUS_SEND_TIMEOUT=0.5)
    client = await stream_client(app, server=server)
    async with http.stream("POST", client.url + "/s", json=BODY) as response:
        chunks = response.aiter_raw()
        raw = await anext(chunks)  # then the client stops reading
        record = await fake_upstream.wait_requests(1, 5)
        assert await fake_upstream.wait_closed(record, 5) is not None, "the upstream stayed open"
        assert not record.completed  # cut halfway, not finished
        if comes_back == "late":
            await asyncio.sleep(1.5)
            with pytest.raises(LATE[server]):
                async for chunk in chunks:
                    raw += chunk
        else:
            async for chunk in chunks:  # the client reads again, within the grace
                raw += chunk
    assert await logged(caplog, 1) == ["outcome=timeout error=send_timeout"]
    events = SSEDecoder().feed(raw)
    if comes_back == "in time":
        assert error_type(events[-2]) == "send_timeout"
        assert events[-1].data == "[DONE]"
        events = events[:-2]
    assert all(error_type(event) is None for event in events)
    text = "".join(
        json.loads(event.data)["choices"][0]["delta"].get("content") or "" for event in events
    )
    assert text and "".join(fake_tokens(TOKENS, TOKEN_SIZE)).startswith(text)  # no gap, no repeat


# --- the server stops ----------------------------------------------------------------------


async def read_all(response: httpx.Response) -> list[ServerSentEvent]:
    decoder, events = SSEDecoder(), []
    async for chunk in response.aiter_raw():
        events += decoder.feed(chunk)
    return events


# how each server stops (its options): what every open stream gets, and how many streams were
# still open when the app's before_server_stop listeners ran (None: not asserted, a race)
STOPPING = [
    # before_server_stop ends every open stream with its frame
    pytest.param("sanic", {}, "shutdown", None, id="sanic"),
    # uvicorn runs the lifespan shutdown only once open responses ended, and at its
    # graceful-shutdown timeout cancels them: the relay answers that with the shutdown frame
    pytest.param("uvicorn", {"timeout_graceful_shutdown": 0.3}, "shutdown", None, id="uvicorn"),
    # without that timeout uvicorn waits for every stream to end by itself
    pytest.param("uvicorn", {}, "completed", 0, id="uvicorn-no-graceful-timeout"),
    # granian finishes open responses before its lifespan shutdown and tells the app nothing (at
    # --workers-kill-timeout its worker is killed): a stream runs to its end (granian waits
    # for the connections, not for the app's tasks: a relay may still be logging at the stop)
    pytest.param("granian", {}, "completed", None, id="granian"),
]


@pytest.mark.parametrize(("server", "options", "outcome", "open_at_stop"), STOPPING)
@pytest.mark.fake_upstream(tokens=150, delay=0.01)
async def test_the_server_stopping_ends_every_open_stream(
    server: str,
    options: dict[str, Any],
    outcome: str,
    open_at_stop: int | None,
    fake_upstream: FakeUpstream,
    streamplus_app: Callable[..., Sanic[Any, Any]],
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two streams are open (1.5 s each) when the server stops, 0.2 s in."""
    caplog.set_level(logging.INFO, "sanic_streamplus")
    app = relay_app(streamplus_app, fake_upstream)
    at_stop: list[int] = []
    app.before_server_stop(lambda app: at_stop.append(len(app.ctx.streamplus.streams)))
    serving = await StreamClient(app, server=server, **options)
    responses = [
        await http.send(http.build_request("POST", serving.url + "/s", json=BODY), stream=True)
        for _ in range(2)
    ]
    readers = [asyncio.ensure_future(read_all(response)) for response in responses]
    await fake_upstream.wait_requests(2, 5)
    await asyncio.sleep(0.2)  # a few tokens flow; then the server stops
    await serving.aclose()
    ends = [await asyncio.wait_for(reader, 5) for reader in readers]
    frame = "shutdown" if outcome == "shutdown" else None
    for events in ends:
        assert len(events) > 5, "it was mid-stream"
        assert error_type(events[-2]) == frame
        assert events[-1].data == "[DONE]"
    for record in fake_upstream.requests:
        assert record.completed == (outcome == "completed")
        if not record.completed:
            assert await fake_upstream.wait_closed(record, 2) is not None, "upstream left open"
    line = f"outcome={outcome}" + (" error=shutdown" if frame else "")
    assert await logged(caplog, 2) == [line, line]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    if open_at_stop is not None:
        assert at_stop == [open_at_stop]
