"""Slow, stopped and vanished clients: the send timeout, the three slow-client policies, and the
socket options that find a client gone without a FIN.

The client here is a raw socket with a small receive buffer that stops reading after the first
events, so the server's buffers fill within a few megabytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import pytest
from conftest import app_name, completions_body
from sanic import Request, Sanic

from sanic_streamplus import ServerSentEvent, SSEDecoder, StreamPlus, stream_post, upstream_events
from sanic_streamplus.testing import FakeUpstream, fake_tokens, serve_app

TOKEN_SIZE = 2048
TOKENS = 20_000  # about 40 MB: far more than loopback's socket buffers hold (about 10 MB)


def relay_app(upstream_url: str, **config: Any) -> Sanic[Any, Any]:
    """``POST /s`` relays the upstream's chat completions (openai dialect)."""
    app: Sanic[Any, Any] = Sanic(app_name("slow"))
    app.config.STREAMPLUS_UPSTREAM_URL = upstream_url
    app.config.STREAMPLUS_HIGH_WATER_MARK = 16 * 1024
    app.config.STREAMPLUS_HEARTBEAT = 0
    for key, value in config.items():
        app.config[key] = value
    app.extend(extensions=[StreamPlus])

    @app.post("/s")
    @stream_post(dialect="openai")
    async def relay(request: Request) -> Any:
        return upstream_events(request, "/chat/completions", json=request.json)

    return app


class PausingClient:
    """POST over a raw socket with a ``recv_buffer`` of 4 KB (or None: the system's); read on
    demand."""

    def __init__(self, url: str, body: Any, recv_buffer: int | None = 4096) -> None:
        self.url, self.body = url, json.dumps(body).encode()
        self.recv_buffer = recv_buffer
        self.raw = bytearray()

    async def __aenter__(self) -> PausingClient:
        host, port = self.url.removeprefix("http://").split(":")
        sock = socket.socket()
        if self.recv_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.recv_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        self.reader, self.writer = await asyncio.open_connection(sock=sock)
        self.writer.write(
            b"POST /s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            % (len(self.body), self.body)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def read_until(self, marker: bytes, timeout: float = 10) -> None:
        """Read until ``marker`` has arrived."""
        async with asyncio.timeout(timeout):
            while marker not in self.raw:
                chunk = await self.reader.read(4096)
                assert chunk, "the server closed early"
                self.raw += chunk

    async def read_rest(self, delay: float = 0.0, size: int = 65536, timeout: float = 30) -> None:
        """Read until the server closes, at most ``size`` bytes at a time, sleeping ``delay``
        seconds between reads."""
        async with asyncio.timeout(timeout):
            while chunk := await self.reader.read(size):
                self.raw += chunk
                await asyncio.sleep(delay)

    def events(self) -> tuple[list[ServerSentEvent], bool]:
        """The events of the chunked body, and whether the body was complete."""
        raw = bytes(self.raw)
        body, at = bytearray(), raw.index(b"\r\n\r\n") + 4
        while at < len(raw):
            end = raw.index(b"\r\n", at)
            size = int(raw[at:end], 16)
            if size == 0:
                return SSEDecoder().feed(bytes(body)), True
            body += raw[end + 2 : end + 2 + size]
            at = end + 4 + size
        return SSEDecoder().feed(bytes(body)), False


def contents(events: list[ServerSentEvent]) -> str:
    text = ""
    for event in events:
        chunk = json.loads(event.data) if event.data != "[DONE]" else {}
        for choice in chunk.get("choices", ()):
            text += choice["delta"].get("content") or ""
    return text


async def outcomes(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ``<outcome> error=<type>`` logged so far, once at least one is (the log line follows
    the close)."""
    for _ in range(100):
        found = [
            " ".join(r.getMessage().split("outcome=")[1].split()[:2])  # outcome=, error=
            for r in caplog.records
            if r.name == "sanic_streamplus" and "outcome=" in r.getMessage()
        ]
        if found:
            return found
        await asyncio.sleep(0.02)
    return []


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize(
    ("policy", "send_timeout", "error_type", "outcome"),
    [
        ("block", 0.5, "send_timeout", "timeout"),
        ("disconnect", 30, "slow_client", "client_disconnected"),
    ],
)
async def test_a_client_that_stops_reading_is_cut_and_gets_the_error_frame_last(
    policy: str,
    send_timeout: float,
    error_type: str,
    outcome: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "sanic_streamplus")
    body = completions_body(tokens=TOKENS, token_size=TOKEN_SIZE, delay=0)
    async with FakeUpstream() as upstream:
        app = relay_app(
            upstream.url, STREAMPLUS_SEND_TIMEOUT=send_timeout, STREAMPLUS_SLOW_CLIENT=policy
        )
        async with serve_app(app) as url, PausingClient(url, body) as client:
            await client.read_until(b"data:")
            closed = await upstream.wait_closed(await upstream.wait_requests(1, 5), 10)
            assert closed is not None, "the upstream stayed open"
            assert not upstream.requests[0].completed  # cut halfway, not finished
            await client.read_rest()  # the client reads again, within the grace
            logged = await outcomes(caplog)
    events, complete = client.events()
    assert complete
    error = json.loads(events[-2].data)["error"]
    assert error["type"] == error_type
    assert events[-1].data == "[DONE]"
    text = contents(events[:-2])
    assert text and "".join(fake_tokens(TOKENS, TOKEN_SIZE)).startswith(text)  # no gap
    assert logged == [f"{outcome} error={error_type}"]


@pytest.mark.usefixtures("transport")
async def test_block_waits_for_a_paused_client_and_loses_nothing() -> None:
    body = completions_body(tokens=TOKENS, token_size=TOKEN_SIZE, delay=0)
    async with FakeUpstream() as upstream:
        app = relay_app(upstream.url, STREAMPLUS_SEND_TIMEOUT=0)
        async with serve_app(app) as url, PausingClient(url, body, None) as client:
            await client.read_until(b"data:")
            record = await upstream.wait_requests(1, 5)
            await asyncio.sleep(1.0)  # the client pauses; the upstream must wait for it
            sent_while_paused = record.sent
            assert not record.completed and record.closed is None
            await client.read_rest()
    events, complete = client.events()
    assert complete and events[-1].data == "[DONE]"
    assert contents(events) == "".join(fake_tokens(TOKENS, TOKEN_SIZE))
    assert sent_while_paused < TOKENS * TOKEN_SIZE // 2  # held back, not buffered in the proxy


@pytest.mark.usefixtures("transport")
async def test_coalesce_gives_a_slow_reader_fewer_larger_events_and_every_character() -> None:
    tokens = 100_000  # small tokens (15 MB of events, mostly envelope): more than buffers hold
    body = completions_body(tokens=tokens, delay=0)
    async with FakeUpstream() as upstream:
        app = relay_app(upstream.url, STREAMPLUS_SLOW_CLIENT="coalesce")
        async with serve_app(app) as url, PausingClient(url, body) as client:
            await client.read_rest(delay=0.005, size=16384, timeout=60)  # ~3 MB/s: behind at once
    events, complete = client.events()
    assert complete and events[-1].data == "[DONE]"
    assert contents(events) == "".join(fake_tokens(tokens))
    assert len(events) < tokens // 2  # merged while the client was behind
    finish = json.loads(events[-2].data)["choices"][0]
    assert finish["finish_reason"] == "stop"  # never merged away
    assert json.loads(events[0].data)["choices"][0]["delta"]["role"] == "assistant"


async def test_the_client_socket_gets_a_user_timeout_and_keepalive() -> None:
    app: Sanic[Any, Any] = Sanic(app_name("sockopt"))
    app.config.STREAMPLUS_SEND_TIMEOUT = 7.5
    app.extend(extensions=[StreamPlus])

    @app.post("/s")
    @stream_post(require_json=False)
    async def options(request: Request) -> Any:
        yield "first"  # the socket is tuned at the commit point
        await asyncio.sleep(0.05)
        sock = request.transport.get_extra_info("socket")
        yield {
            "user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        }

    async with serve_app(app) as url, PausingClient(url, {}) as client:
        await client.read_rest()
    events, complete = client.events()
    assert complete
    assert json.loads(events[1].data) == {"user_timeout": 15000, "keepalive": 1, "idle": 2}
