"""``FakeUpstream``: a fake OpenAI-compatible streaming upstream, a real HTTP/1.1 server on
127.0.0.1 (plain asyncio, HTTP/1.1 framing by h11), that answers each request as its
:class:`~sanic_streamplus.testing.model.FakeModel` and
:class:`~sanic_streamplus.testing.faults.FaultPlan` say, and records what it saw.

h11 parses the requests and produces the response bytes (the head, each chunk, the terminating
chunk); the plan decides how many of them are written and when, and the connection-level faults
(a TCP reset with ``SO_LINGER`` 0, a FIN in the middle of a body) act on the socket itself.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import h11

from .faults import Comments, End, Hang, Headers, Hold, Layout, Reset, Stall, Status, Write
from .model import FakeModel

__all__ = ["FakeUpstream", "UpstreamRequest"]

_FOREVER = 1e9  # seconds: asyncio.sleep() does not take math.inf
_STATUS_BODY = {"error": {"message": "fake upstream error", "type": "fake_error"}}  # Status's
_MODELS = {
    "object": "list",
    "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "sanic-streamplus"}],
}


@dataclass
class UpstreamRequest:
    """What the fake upstream saw of one request.

    Attributes:
        method, path: of the request line; headers: lower-cased names; body: raw bytes.
        received: ``time.monotonic()`` when the request was complete.
        closed: ``time.monotonic()`` when its connection closed (either side), or None.
        completed: the whole stream (with its terminating chunk) was written.
        events: blocks of the body written in full (``FakeModel.frames()``).
        sent: bytes of the event-stream body written (keep-alive comments not counted).
        comments: keep-alive comments written.
        reset: the fake broke the connection with a TCP reset (a plan's ``reset``).
        held: the stream is waiting at a plan's ``hold`` for :meth:`FakeUpstream.release` now.
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
    comments: int = 0
    reset: bool = False
    held: bool = False
    closed_event: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def json(self) -> Any:
        """The body parsed as JSON, or None."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class _Connection(asyncio.Protocol):
    """One client connection: h11 reads its requests, :class:`_Response` answers each."""

    def __init__(self, server: FakeUpstream) -> None:
        self.server = server
        self.http = h11.Connection(h11.SERVER)
        self.arrived = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.lost = False  # the client closed or half-closed: the fake stops writing
        self.current: UpstreamRequest | None = None
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self.task = asyncio.ensure_future(self.serve())

    def data_received(self, data: bytes) -> None:
        with contextlib.suppress(h11.RemoteProtocolError, RuntimeError):  # next_event() tells
            self.http.receive_data(data)
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
        """The next whole request, or None once the client is gone or broke the protocol
        (then answered 400)."""
        start: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as exc:
                if self.http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self.simple(400, {"error": {"message": str(exc), "type": "bad_http"}})
                return None
            if event is h11.NEED_DATA:
                if self.lost:
                    return None
                self.arrived.clear()
                await self.arrived.wait()
            elif isinstance(event, h11.Request):
                start = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) and start is not None:
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.headers}
                method, path = start.method.decode(), start.target.decode("latin-1")
                return UpstreamRequest(method, path, headers, bytes(body))
            else:  # ConnectionClosed, or PAUSED (a request after this one's end)
                return None

    async def write(self, data: bytes) -> None:
        """Write ``data`` once the transport takes more.

        Raises:
            ConnectionResetError: the client is gone.
        """
        await self.writable.wait()
        if self.lost or self.transport is None:
            raise ConnectionResetError
        self.transport.write(data)

    async def send(self, event: h11.Event) -> None:
        """Write ``event``'s bytes, as h11 frames them."""
        data = self.http.send(event)
        if data:
            await self.write(data)

    async def serve(self) -> None:
        try:
            await self.exchanges()
        except h11.LocalProtocolError:  # what the settings asked for is not HTTP/1.1
            if self.transport is not None:
                self.transport.abort()

    async def exchanges(self) -> None:
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            while not self.lost:
                request = await self.read_request()
                if request is None:
                    return
                self.current = request
                self.server.requests.append(request)
                self.server.arrived.set()
                if not await self.respond(request):
                    return
                if self.http.our_state is h11.MUST_CLOSE:
                    assert self.transport is not None
                    self.transport.close()  # its closing time is this request's
                    return
                self.http.start_next_cycle()
                self.current = None

    async def respond(self, request: UpstreamRequest) -> bool:
        """Answer ``request``; False if the answer left the connection unusable."""
        if request.method == "GET" and request.path.rstrip("/").endswith("/models"):
            await self.simple(200, _MODELS)
            return True
        try:
            model = self.server.model_for(request)
            layout = model.layout()
        except (TypeError, ValueError) as exc:
            await self.simple(400, {"error": {"message": str(exc), "type": "bad_fake_knob"}})
            return True
        path = request.path.partition("?")[0]  # a query string (an API key, say) is no route
        if request.method != "POST" or not path.endswith("/chat/completions"):
            await self.simple(404, {"error": {"message": "not found", "type": "not_found"}})
            return True
        return await _Response(self, request, model, layout).run()

    async def simple(self, status: int, payload: Any, retry_after: str | None = None) -> None:
        """A whole answer: ``payload`` as JSON, or a str as ``text/plain``."""
        raw = isinstance(payload, str)
        data = payload.encode() if raw else json.dumps(payload).encode()
        headers = [
            ("Content-Type", "text/plain" if raw else "application/json"),
            ("Content-Length", str(len(data))),
        ]
        if retry_after:
            headers.append(("Retry-After", retry_after))
        await self.send(h11.Response(status_code=status, headers=headers, reason=b"Fake"))
        await self.send(h11.Data(data=data))
        await self.send(h11.EndOfMessage())

    async def reset(self, request: UpstreamRequest) -> None:
        """Break the connection with a TCP reset, after what was written has left."""
        assert self.transport is not None
        await self.writable.wait()
        await asyncio.sleep(0.05)
        request.reset = True
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class _Response:
    """Carries out one laid-out plan on a connection: writes the body in chunks (in
    ``trickle``-sized pieces when the model says so, the ``delay`` before each block or piece),
    and keeps the request's ``sent`` and ``events`` up to date."""

    def __init__(
        self, connection: _Connection, request: UpstreamRequest, model: FakeModel, layout: Layout
    ) -> None:
        self.connection = connection
        self.request = request
        self.model = model
        self.blocks = layout.blocks
        self.actions = layout.actions
        self.ends = list(itertools.accumulate(len(block) for block in layout.blocks))
        self.position = 0  # body bytes taken by write() so far
        self.pending = bytearray()  # less than a trickle piece, waiting for more
        self.head = False

    async def run(self) -> bool:
        """Carry out the actions; False if the connection is not reusable after them."""
        for action in self.actions:
            if isinstance(action, Write):
                await self.write(action.end)
                continue
            await self.flush()
            if isinstance(action, Headers):
                await self.headers()
            elif isinstance(action, Stall):
                await self.pause(action.seconds, action.comment_every)
            elif isinstance(action, Comments):
                for _ in range(action.count):
                    await self.comment()
            elif isinstance(action, Hold):
                await self.hold()
            elif isinstance(action, Status):
                body = _STATUS_BODY if action.body is None else action.body
                await self.connection.simple(action.status, body, action.retry_after)
            elif isinstance(action, End):
                await self.headers()
                await self.connection.send(h11.EndOfMessage())
                self.request.completed = True
            elif isinstance(action, Reset):
                await self.connection.reset(self.request)
                return False
            elif isinstance(action, Hang):
                await asyncio.get_running_loop().create_future()  # until the connection is lost
            else:  # Close
                assert self.connection.transport is not None
                self.connection.transport.close()
                return False
        return True

    async def headers(self) -> None:
        if self.head:
            return
        self.head = True
        headers = [("Content-Type", self.model.content_type)]
        if self.model.set_cookie:
            headers.append(("Set-Cookie", self.model.set_cookie))
        headers += [("Cache-Control", "no-cache"), ("Transfer-Encoding", "chunked")]
        await self.connection.send(h11.Response(status_code=200, headers=headers, reason=b"OK"))

    async def write(self, end: int) -> None:
        """Write the body on up to byte ``end``: with ``trickle``, a last piece shorter than
        that waits for the next write (or a flush); else the ``delay`` before each block."""
        await self.headers()
        trickle, delay = self.model.trickle, self.model.delay
        while self.position < end:
            number = bisect.bisect_right(self.ends, self.position)  # the block it is in
            block, start = self.blocks[number], self.ends[number] - len(self.blocks[number])
            if not trickle and delay and number and self.position == start:
                await asyncio.sleep(delay)
            stop = min(self.ends[number], end)
            data = block[self.position - start : stop - start]
            self.position = stop
            if not trickle:
                await self.chunk(data)
                continue
            self.pending += data
            while len(self.pending) >= trickle:
                await self.piece(trickle)

    async def flush(self) -> None:
        if self.pending:
            await self.piece(len(self.pending))

    async def piece(self, size: int) -> None:
        """A trickled piece: the first ``size`` pending bytes, after the ``delay``."""
        data = bytes(self.pending[:size])
        del self.pending[:size]
        if self.request.sent:
            await asyncio.sleep(self.model.delay)  # sleep(0) still lets the reader see it
        await self.chunk(data)

    async def chunk(self, data: bytes) -> None:
        """``data`` as one chunk of the body."""
        await self.connection.send(h11.Data(data=data))
        self.request.sent += len(data)
        self.request.events = bisect.bisect_right(self.ends, self.request.sent)

    async def comment(self) -> None:
        await self.headers()
        await self.connection.send(h11.Data(data=self.model.comment()))
        self.request.comments += 1

    async def pause(self, seconds: float, every: float | None) -> None:
        """Go silent for ``seconds``, with a keep-alive comment every ``every`` seconds."""
        if not every:
            await asyncio.sleep(min(seconds, _FOREVER))
            return
        await self.headers()
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            await asyncio.sleep(min(every, left, _FOREVER))
            if loop.time() < end:
                await self.comment()

    async def hold(self) -> None:
        released = self.connection.server.released
        if released.is_set():
            return
        self.request.held = True
        try:
            await released.wait()
        finally:
            self.request.held = False


class FakeUpstream:
    """A fake OpenAI-compatible streaming upstream on 127.0.0.1 (see the package docstring).

    Use as ``async with FakeUpstream(tokens=5, plan=FaultPlan().events(3).reset()) as
    upstream: ... upstream.url ...``. A request may bring its own settings in a ``"fake":
    {...}`` object of its JSON body (:meth:`FakeModel.override`), a ``"plan"`` among them.

    Args:
        model: the default :class:`FakeModel`; ``knobs`` (keyword arguments: its fields,
            ``plan=`` a :class:`FaultPlan` included) override some of them.
        answer: a function of a request's parsed JSON body (any JSON value, or None) that
            returns the text to stream (the ``text`` setting), for requests that carry no
            ``"fake"`` object; it may raise ValueError (the request then gets a 400).

    Raises:
        ValueError: a knob is out of range, or a plan comes with fault knobs.

    Attributes:
        model: the default :class:`FakeModel`.
        requests: every :class:`UpstreamRequest` seen, in arrival order.
        connections: the connections open now.
        released: set by :meth:`release`: streams no longer wait at a plan's ``hold``.
    """

    def __init__(
        self,
        model: FakeModel | None = None,
        *,
        answer: Callable[[Any], str] | None = None,
        **knobs: Any,
    ) -> None:
        self.model = (model or FakeModel()).override(knobs)
        self.answer = answer
        self.requests: list[UpstreamRequest] = []
        self.connections: set[_Connection] = set()
        self.arrived = asyncio.Event()
        self.released = asyncio.Event()
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

    def model_for(self, request: UpstreamRequest) -> FakeModel:
        """The model ``request`` was answered with: :attr:`model`, its body's ``"fake"``
        object applied, and ``usage`` when it asked for ``stream_options.include_usage``.

        Raises:
            ValueError, TypeError: a setting of the body is out of range or unknown in type.
        """
        body = request.json
        if not isinstance(body, dict):
            return self.model
        model = self.model.override(body.get("fake"))
        if body.get("fake") is None and self.answer is not None:
            model = replace(model, text=self.answer(body))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            model = replace(model, usage=True)
        return model

    def release(self) -> None:
        """Let every stream waiting at a ``hold`` go on, and any later one pass it without
        waiting."""
        self.released.set()

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
