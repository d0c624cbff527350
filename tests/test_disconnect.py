"""A client that goes away closes the upstream at once: native Sanic server and uvicorn (ASGI)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
from typing import Any

import pytest
from conftest import app_name, chat_body, completions_body

from sanic_streamplus.testclient import serve_uvicorn
from sanic_streamplus.testing import FakeUpstream

ROUNDS = 20


async def open_stream(
    url: str, path: str, body: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send the POST over a raw socket, so the test controls exactly when the client vanishes."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    return reader, writer


async def read_until(reader: asyncio.StreamReader, marker: bytes, count: int) -> None:
    seen = b""
    while seen.count(marker) < count:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, "the proxy closed the stream early"
        seen += chunk


async def disconnect_rounds(url: str, upstream: FakeUpstream, path: str) -> list[float]:
    """Disconnect ROUNDS times after 1..ROUNDS events; return the close delays in seconds."""
    make = chat_body if path == "/chat" else completions_body
    body = json.dumps(make(tokens=1000, delay=0.01)).encode()
    delays = []
    for round_number in range(ROUNDS):
        before = len(upstream.requests)
        reader, writer = await open_stream(url, path, body)
        await read_until(reader, b"data:", 1 + round_number % 7)
        assert len(upstream.requests) == before + 1
        record = upstream.requests[-1]
        if round_number % 2:  # half the rounds vanish with a reset, half with a FIN
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        gone = time.monotonic()
        writer.close()
        closed = await upstream.wait_closed(record, timeout=2.0)
        assert closed is not None, f"round {round_number}: upstream still open 2 s after disconnect"
        assert not record.completed
        delays.append(closed - gone)
    delays.sort()
    print(
        f"\n{url} {path}: disconnect -> upstream closed, {len(delays)} rounds: "
        f"p50 {delays[len(delays) // 2] * 1e3:.1f} ms, max {delays[-1] * 1e3:.1f} ms"
    )
    return delays


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions"])
async def test_disconnect_closes_upstream_on_the_native_server(
    proxy: str, upstream: FakeUpstream, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="sanic_streamplus"):
        delays = await disconnect_rounds(proxy, upstream, path)
        await asyncio.sleep(0.05)
    assert max(delays) < 2.0
    assert len(upstream.connections) == 0
    outcomes = [r.getMessage() for r in caplog.records if r.name == "sanic_streamplus"]
    assert sum("outcome=client_disconnected" in m for m in outcomes) == ROUNDS
    assert not [r for r in caplog.records if r.exc_info], "a disconnect logged a traceback"


async def test_disconnect_before_the_first_event_closes_upstream(
    upstream: FakeUpstream, proxy: str
) -> None:
    """Nothing committed yet: the proxy is waiting for the upstream's headers."""
    body = json.dumps(completions_body(stall=5)).encode()
    _, writer = await open_stream(proxy, "/v1/chat/completions", body)
    record = await upstream.wait_requests(1, timeout=5)
    writer.close()
    closed = await upstream.wait_closed(record, timeout=2.0)
    assert closed is not None, "upstream still open 2 s after the client left"


def example_app(upstream: FakeUpstream) -> Any:
    from chat_proxy import create_app

    return create_app(upstream.url, name=app_name("asgi"))


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions"])
async def test_disconnect_closes_upstream_under_uvicorn(
    upstream: FakeUpstream, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        async with serve_uvicorn(example_app(upstream)) as url:
            delays = await disconnect_rounds(url, upstream, path)
    assert max(delays) < 2.0
    assert len(upstream.connections) == 0
    outcomes = [r.getMessage() for r in caplog.records if r.name == "sanic_streamplus"]
    assert sum("outcome=client_disconnected" in m for m in outcomes) == ROUNDS
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_complete_stream_under_uvicorn(upstream: FakeUpstream) -> None:
    import httpx

    async with serve_uvicorn(example_app(upstream)) as url, httpx.AsyncClient() as client:
        response = await client.post(url + "/v1/chat/completions", json=completions_body())
    assert response.status_code == 200
    assert response.text.endswith("data: [DONE]\n\n")
    assert upstream.requests[-1].completed
