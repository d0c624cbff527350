"""A test kit: a fake OpenAI-compatible upstream with fault knobs, and a real server for an app.

``FakeUpstream`` is a real HTTP/1.1 server on 127.0.0.1 (plain asyncio, no framework) that answers
``POST .../chat/completions`` with an OpenAI-style ``chat.completion.chunk`` event stream of
deterministic tokens, and records what it saw: each request's headers and body, when its
connection closed, how much of the stream it sent. Knobs (constructor defaults, overridable per
request with a ``"fake": {...}`` object in the JSON body):

- ``tokens`` (int): how many tokens to stream; ``delay`` (s): pause before each token;
- ``token_size`` (bytes, or None): pad each token to this size (for large-volume tests);
- ``fail_after`` (int or None): reset the connection after that many events;
- ``stall`` (s): silence before the response headers; ``stall_after`` (int or None): go silent
  (keeping the connection open) after that many events, for ``stall`` seconds;
- ``error_status`` (int or None) and ``retry_after`` (str or None): answer that status with an
  OpenAI-style JSON error instead of a stream;
- ``content_type`` (str): the stream's Content-Type; ``bom`` (bool): start the body with a BOM;
- ``done`` (bool): end with ``data: [DONE]``.

``serve_app(app)`` runs a Sanic app on a socket bound to 127.0.0.1 port 0 and yields its base
URL: streams need a real server (``app.test_client`` buffers whole bodies).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

__all__ = ["FakeModel", "FakeUpstream", "UpstreamRequest", "fake_tokens", "serve_app"]

_WORDS = ("Hello", " from", " the", " fake", " model", ",", " token", " by", " token", ".")


def fake_tokens(count: int, token_size: int | None = None) -> list[str]:
    """The deterministic tokens the fake model streams: ``count`` strings, each padded with
    ``"~"`` to ``token_size`` characters when given. ``"".join()`` them for the full text."""
    tokens = [f"{_WORDS[i % len(_WORDS)]}{i // len(_WORDS) or ''}" for i in range(count)]
    if token_size:
        tokens = [t.ljust(token_size, "~")[:token_size] for t in tokens]
    return tokens


@dataclass(frozen=True)
class FakeModel:
    """The fake model's knobs (see the module docstring); seconds for times, bytes for sizes."""

    tokens: int = 12
    delay: float = 0.05
    token_size: int | None = None
    fail_after: int | None = None
    stall: float = 0.0
    stall_after: int | None = None
    error_status: int | None = None
    retry_after: str | None = None
    content_type: str = "text/event-stream"
    bom: bool = False
    done: bool = True

    def override(self, values: Any) -> FakeModel:
        """A copy with the known keys of ``values`` (a dict from a request body) applied."""
        if not isinstance(values, dict):
            return self
        names = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in values.items() if k in names})


@dataclass
class UpstreamRequest:
    """What the fake upstream saw of one request.

    Attributes:
        method, path: of the request line; headers: lower-cased names; body: raw bytes.
        received: ``time.monotonic()`` when the request was complete.
        closed: ``time.monotonic()`` when its connection closed (either side), or None.
        completed: the whole stream (with its terminating chunk) was written.
        events: events written; sent: body bytes written.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received: float = field(default_factory=time.monotonic)
    closed: float | None = None
    completed: bool = False
    events: int = 0
    sent: int = 0
    closed_event: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def json(self) -> Any:
        """The body parsed as JSON, or None."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class _Connection(asyncio.Protocol):
    def __init__(self, server: FakeUpstream) -> None:
        self.server = server
        self.buffer = bytearray()
        self.arrived = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.lost = False
        self.current: UpstreamRequest | None = None
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self.task = asyncio.ensure_future(self.serve())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.arrived.set()

    def eof_received(self) -> bool | None:
        self.lost = True
        self.arrived.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        if self.current is not None and self.current.closed is None:
            self.current.closed = time.monotonic()
            self.current.closed_event.set()
        self.arrived.set()
        self.writable.set()
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    async def read_request(self) -> UpstreamRequest | None:
        while b"\r\n\r\n" not in self.buffer:
            if self.lost:
                return None
            self.arrived.clear()
            await self.arrived.wait()
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            if self.lost:
                return None
            self.arrived.clear()
            await self.arrived.wait()
            rest = bytes(self.buffer).partition(b"\r\n\r\n")[2]
        self.buffer = bytearray(rest[length:])
        return UpstreamRequest(method, path, headers, rest[:length])

    async def write(self, data: bytes) -> None:
        await self.writable.wait()
        if self.lost or self.transport is None:
            raise ConnectionResetError
        self.transport.write(data)

    async def serve(self) -> None:
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            while not self.lost:
                request = await self.read_request()
                if request is None:
                    return
                self.current = request
                self.server.requests.append(request)
                self.server.arrived.set()
                await self.respond(request)
                self.current = None

    async def respond(self, request: UpstreamRequest) -> None:
        body = request.json
        model = self.server.model.override(body.get("fake") if isinstance(body, dict) else None)
        if request.method != "POST" or not request.path.endswith("/chat/completions"):
            await self.simple(404, {"error": {"message": "not found", "type": "not_found"}})
            return
        if model.stall and model.stall_after is None:
            await asyncio.sleep(model.stall)
        if model.error_status:
            extra = f"Retry-After: {model.retry_after}\r\n" if model.retry_after else ""
            error = {"error": {"message": "fake upstream error", "type": "fake_error"}}
            await self.simple(model.error_status, error, extra)
            return
        await self.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: " + model.content_type.encode() + b"\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        prefix = b"\xef\xbb\xbf" if model.bom else b""
        chunks = [_chunk_event({"role": "assistant", "content": ""}, None)]
        for token in fake_tokens(model.tokens, model.token_size):
            chunks.append(_chunk_event({"content": token}, None))
        chunks.append(_chunk_event({}, "stop"))
        if model.done:
            chunks.append(b"data: [DONE]\n\n")
        for number, data in enumerate(chunks):
            if model.fail_after is not None and number >= model.fail_after:
                await self.reset()
                return
            if model.stall_after is not None and number == model.stall_after:
                await asyncio.sleep(model.stall if math.isfinite(model.stall) else 1e9)
            if model.delay and number:
                await asyncio.sleep(model.delay)
            data = prefix + data
            prefix = b""
            await self.write(b"%x\r\n%b\r\n" % (len(data), data))
            request.events += 1
            request.sent += len(data)
        await self.write(b"0\r\n\r\n")
        request.completed = True

    async def simple(self, status: int, payload: Any, extra: str = "") -> None:
        data = json.dumps(payload).encode()
        await self.write(
            f"HTTP/1.1 {status} Fake\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{extra}\r\n".encode()
            + data
        )

    async def reset(self) -> None:
        """Break the connection with a TCP reset, after what was written has left."""
        assert self.transport is not None
        await self.writable.wait()
        await asyncio.sleep(0.05)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


def _chunk_event(delta: dict[str, Any], finish_reason: str | None) -> bytes:
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


class FakeUpstream:
    """A fake OpenAI-compatible streaming upstream on 127.0.0.1 (see the module docstring).

    Use as ``async with FakeUpstream(tokens=5) as upstream: ... upstream.url ...``.

    Attributes:
        model: the default :class:`FakeModel` knobs.
        requests: every :class:`UpstreamRequest` seen, in arrival order.
        connections: the connections open now.
    """

    def __init__(self, model: FakeModel | None = None, **knobs: Any) -> None:
        self.model = (model or FakeModel()).override(knobs)
        self.requests: list[UpstreamRequest] = []
        self.connections: set[_Connection] = set()
        self.arrived = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL of its OpenAI-compatible API, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeUpstream:
        """Listen on ``host``:``port`` (0: a free port)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
            for connection in list(self.connections):
                if connection.transport is not None:
                    connection.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def wait_requests(self, count: int, timeout: float) -> UpstreamRequest:
        """Wait up to ``timeout`` seconds until ``count`` requests have arrived; return the last.

        Raises:
            TimeoutError: fewer than ``count`` requests arrived in time.
        """
        async def arrivals() -> None:
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()

        try:
            await asyncio.wait_for(arrivals(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{len(self.requests)} of {count} requests arrived") from None
        return self.requests[-1]

    async def wait_closed(self, request: UpstreamRequest, timeout: float) -> float | None:
        """Wait up to ``timeout`` seconds for ``request``'s connection to close; return the
        ``time.monotonic()`` at which it closed, or None if it is still open."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(request.closed_event.wait(), timeout)
        return request.closed

    async def __aenter__(self) -> FakeUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@contextlib.asynccontextmanager
async def serve_app(app: Any, **server_options: Any) -> AsyncIterator[str]:
    """Run the Sanic ``app`` on a free port of 127.0.0.1 in the running loop.

    Yields:
        the base URL (str), e.g. ``http://127.0.0.1:PORT``.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = await app.create_server(
        sock=sock, return_asyncio_server=True, access_log=False, **server_options
    )
    await server.startup()
    await server.before_start()
    await server.after_start()
    serving = asyncio.ensure_future(server.serve_forever())
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.before_stop()
        server.close()
        await server.wait_closed()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving
        await server.after_stop()
