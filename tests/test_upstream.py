"""How the upstream body is read: directly from the aiohttp response under httpx-aiohttp's
transport (identity encoding), through httpx's iterators for any other transport or a
content-encoded body; the same events either way, over real sockets."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import aiohttp
import httpx
import pytest

from sanic_streamplus._aio import Deadline
from sanic_streamplus.config import Settings
from sanic_streamplus.errors import UpstreamDisconnected
from sanic_streamplus.framing import EventKind, get_dialect
from sanic_streamplus.sse import ServerSentEvent, SSEDecoder
from sanic_streamplus.testing import FakeUpstream
from sanic_streamplus.upstream import _Body, create_client, stream_events

BODY = {"model": "m", "messages": [], "stream": True}


def settings(url: str, transport: str) -> Settings:
    return Settings.from_config({"STREAMPLUS_UPSTREAM_URL": url, "STREAMPLUS_TRANSPORT": transport})


async def read_all(body: _Body) -> list[ServerSentEvent]:
    decoder, events = SSEDecoder(), []
    for _ in range(10_000):  # bounded: the fake's body is a few KB
        chunk = await asyncio.wait_for(body.read(), 5)
        if not chunk:
            return events
        events += decoder.feed(chunk)
    raise AssertionError("the body never ended")


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(tokens=5, delay=0) as upstream:
        yield upstream


async def test_the_aiohttp_transport_is_read_directly(fake: FakeUpstream) -> None:
    config = settings(fake.url, "aiohttp")
    async with create_client(config) as client:
        request = client.build_request("POST", "/chat/completions", json=BODY)
        response = await client.send(request, stream=True)
        try:
            body = _Body(response, Deadline(), config, None)
            assert isinstance(body.native, aiohttp.StreamReader)  # the fast path
            assert body.chunks is None  # httpx's iterators are never made
            events = await read_all(body)
            assert not response.is_stream_consumed  # nothing went through httpx
        finally:
            await response.aclose()
    assert events[-1].data == "[DONE]" and len(events) == 5 + 3


@pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])
async def test_both_transports_give_the_same_checked_events(
    fake: FakeUpstream, transport: str
) -> None:
    config = settings(fake.url, transport)
    dialect = get_dialect("openai")
    async with create_client(config) as client:
        events = [
            event
            async for event in stream_events(
                client, "POST", "/chat/completions", settings=config, json=BODY, dialect=dialect
            )
        ]
        source = stream_events(
            client, "POST", "/chat/completions", settings=config, json=BODY, dialect=dialect
        )
        batches = source.classified("openai")
        assert batches is not None and source.classified("openai") is None  # once only
        reads = [batch async for batch in batches]
        classified = [pair for batch in reads for pair in batch]
    assert all(reads)  # one list per upstream read, never an empty one
    assert events[-1].data == "[DONE]" and len(events) == 5 + 3
    assert [event for event, _ in classified] == events
    assert [kind for _, kind in classified] == [dialect.end_kind(event) for event in events]
    assert classified[-1][1] is EventKind.TERMINAL


async def test_httpx_default_transport_streams_over_its_own_iterators(
    fake: FakeUpstream,
) -> None:
    config = settings(fake.url, "httpcore")
    async with create_client(config) as client:
        assert isinstance(client._transport, httpx.AsyncHTTPTransport)
        request = client.build_request("POST", "/chat/completions", json=BODY)
        response = await client.send(request, stream=True)
        try:
            body = _Body(response, Deadline(), config, None)
            assert body.native is None and body.chunks is not None
            events = await read_all(body)
        finally:
            await response.aclose()
    assert events[-1].data == "[DONE]" and len(events) == 5 + 3


async def serve_once(payload: bytes, headers: bytes) -> tuple[asyncio.AbstractServer, int]:
    """A raw HTTP/1.1 server that answers every request with ``payload`` and closes."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" + headers)
        writer.write(b"\r\n" + payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])
async def test_a_gzip_body_is_decoded_by_httpx(transport: str) -> None:
    events = b"".join(b"data: %d\n\n" % n for n in range(50))
    packed = gzip.compress(events)
    headers = b"content-encoding: gzip\r\ncontent-length: %d\r\n" % len(packed)
    server, port = await serve_once(packed, headers)
    config = settings(f"http://127.0.0.1:{port}", transport)
    try:
        async with create_client(config) as client:
            got = [event.data async for event in stream_events(client, "GET", "/", settings=config)]
    finally:
        server.close()
    assert got == [str(n) for n in range(50)]


@pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])
async def test_a_body_cut_short_is_upstream_disconnected(transport: str) -> None:
    partial = b"data: 1\n\ndata: 2\n\n"
    server, port = await serve_once(partial, b"content-length: %d\r\n" % (len(partial) + 100))
    config = settings(f"http://127.0.0.1:{port}", transport)
    got: list[str] = []
    try:
        async with create_client(config) as client:
            with pytest.raises(UpstreamDisconnected) as raised:
                async for event in stream_events(client, "GET", "/", settings=config):
                    got.append(event.data)
    finally:
        server.close()
    assert got == ["1", "2"]
    name = "ReadError" if transport == "aiohttp" else "RemoteProtocolError"  # as httpx says
    assert f"mid-stream ({name})" in raised.value.message
