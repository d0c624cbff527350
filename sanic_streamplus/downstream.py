"""Where a stream's bytes go: the I/O adapters of the :class:`~sanic_streamplus.pump.Pump`.

A :class:`Downstream` does the I/O of the :class:`~sanic_streamplus.machine.StreamMachine`'s
outputs and decides nothing: a queue the reader puts writes into without waiting (``put``), a
batch the writer takes and sends in one write (``take``, ``send``), the commit, the final frame,
the JSON answer and the cut. Three of them:

- :class:`SanicDownstream`: Sanic's native server. The commit tunes the client socket
  (write-buffer high-water mark, ``TCP_NODELAY``, ``TCP_USER_TIMEOUT`` and keepalive);
  ``send()`` returns once the transport has drained below its high-water mark (backpressure);
  the cut puts the last word into the transport's buffer and closes the connection (aborted
  if it does not drain within another send timeout). The ``coalesce`` slow-client policy
  merges text deltas here while the client is behind.
- :class:`AsgiDownstream`: the same under an ASGI server, which owns the connection: no socket
  tuning, and the cut's last word goes out once the client drains (within another send
  timeout), after what the stuck send holds; :func:`watch_disconnect` tells the pump when the
  client left (Sanic never notices ``http.disconnect``).
- :class:`MemoryDownstream`: a list, for tests and benchmarks of the pump itself.

The resumable producer's downstream, the event store, lives with the producer
(:mod:`sanic_streamplus.resume`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from sanic import Request
from sanic.response import HTTPResponse

from .framing import Dialect, Format
from .machine import Commit, Cut, Ending, FinalFrame, Refuse
from .sse import ServerSentEvent

__all__ = [
    "AsgiDownstream",
    "Downstream",
    "MemoryDownstream",
    "SanicDownstream",
    "is_asgi",
    "watch_disconnect",
]

_CUT_GRACE = 5.0  # seconds, without a send timeout: as Sanic's GRACEFUL_TCP_CLOSE_TIMEOUT


class Downstream(Protocol):
    """What a :class:`~sanic_streamplus.pump.Pump` writes to.

    Attributes:
        queued: how much waits to be taken (bytes for a client, events for the store): the
            pump's reader waits once its high-water mark is queued.
    """

    queued: int

    def put(self, data: bytes, event: ServerSentEvent | None) -> None:
        """Queue ``data`` (the bytes of a :class:`~sanic_streamplus.machine.Write`) and
        ``event``, the event they encode (None for a heartbeat); no I/O, no wait."""

    def take(self) -> Any:
        """Take everything queued, as one batch for :meth:`send` (``queued`` drops to 0)."""

    async def send(self, batch: Any) -> int:
        """Write ``batch`` in one write; return the bytes written (waits for the client to
        drain: backpressure)."""

    async def commit(self, commit: Commit) -> None:
        """Start the response: ``commit.status`` and ``commit.headers``."""

    async def finish(self, frame: FinalFrame, ending: Ending) -> int:
        """Write the final frame and end the body; return the bytes written."""

    async def refuse(self, refuse: Refuse, ending: Ending) -> None:
        """Answer with ``refuse`` (a JSON error) instead of a stream."""

    async def cut(self, cut: Cut) -> None:
        """End the stream of a client that stopped draining: ``cut.data`` as its last word."""

    def unblock(self) -> None:
        """Make a :meth:`send` that waits for the client to drain return (a cut is coming)."""


def tune_socket(request: Request, send_timeout: float | None, send_buffer: int | None) -> None:
    """Make a client that vanished without a FIN show up as a disconnect within about twice
    ``send_timeout``: ``TCP_USER_TIMEOUT`` (Linux) drops the connection when sent data stays
    unacknowledged that long, and TCP keepalive probes a silent one. Twice, so that a client
    that is alive but not reading meets the send timeout first (and its error frame), and the
    kernel does not drop the connection during the cut's grace period. ``send_buffer`` (bytes)
    caps the kernel send buffer, so that a backlog waits where it can still be coalesced.
    And ``TCP_NODELAY``, whoever made the socket: with Nagle's algorithm a small write waits
    until the client acknowledged the previous one (up to its delayed-ACK time, 40 ms on
    Linux), and asyncio turns it off only for sockets made with ``IPPROTO_TCP``.
    No-op without a TCP socket."""
    sock = request.transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    if send_buffer:
        options.append((socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer))
    if send_timeout:
        probe = max(1, int(send_timeout / 3))
        options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        for name, value in (
            ("TCP_USER_TIMEOUT", int(2 * send_timeout * 1000)),
            ("TCP_KEEPIDLE", probe),
            ("TCP_KEEPINTVL", probe),
            ("TCP_KEEPCNT", 3),
        ):
            if hasattr(socket, name):
                options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    try:
        for level, option, value in options:
            sock.setsockopt(level, option, value)
    except OSError:  # a socket that is already gone; the disconnect shows anyway
        pass


def is_asgi(request: Request) -> bool:
    """True if ``request`` is served by an ASGI server (not Sanic's own)."""
    return bool(getattr(request.app, "asgi", False)) and not getattr(
        request.stream, "request_body", False
    )


def _split(headers: tuple[tuple[str, str], ...]) -> tuple[dict[str, str], str | None]:
    """``headers`` as a dict without ``Content-Type``, and the ``Content-Type``."""
    rest = {name: value for name, value in headers if name.lower() != "content-type"}
    types = [value for name, value in headers if name.lower() == "content-type"]
    return rest, types[-1] if types else None


class SanicDownstream:
    """A Sanic response on Sanic's own server (see the module).

    Args:
        request: the request being answered.
        format: the output format (the ``coalesce`` policy re-encodes merged events).
        dialect: the dialect (its text deltas, for ``coalesce``).
        high_water_mark: the client transport's write-buffer high-water mark, in bytes.
        send_timeout: seconds (float) for the socket options and the cut's grace, or None.
        coalesce: merge text deltas while the client is behind (the ``coalesce`` policy).

    Attributes:
        refusal: the JSON answer to return from the handler, once refused; else None.
    """

    __slots__ = (
        "_dialect",
        "_format",
        "_held",
        "_in_flight",
        "_pending",
        "coalesce",
        "high_water_mark",
        "put",
        "queued",
        "refusal",
        "request",
        "response",
        "send_timeout",
    )

    def __init__(
        self,
        request: Request,
        format: Format,
        dialect: Dialect,
        *,
        high_water_mark: int,
        send_timeout: float | None = None,
        coalesce: bool = False,
    ) -> None:
        self.request = request
        self.response: Any = None
        self.refusal: HTTPResponse | None = None
        self.high_water_mark = high_water_mark
        self.send_timeout = send_timeout
        self.coalesce = coalesce
        self.queued = 0
        self._pending: list[bytes] = []
        self._held: list[Any] = []  # coalesce: [shape, template, [texts]] or [None, event, None]
        self._in_flight = 0  # bytes of the send() that waits for the client to drain
        self._format, self._dialect = format, dialect
        self.put: Callable[[bytes, ServerSentEvent | None], None] = (
            self._hold if coalesce else self._put
        )

    def _put(self, data: bytes, event: ServerSentEvent | None) -> None:
        self._pending.append(data)
        self.queued += len(data)

    def _hold(self, data: bytes, event: ServerSentEvent | None) -> None:
        """``coalesce``: while the client is behind, keep the event unencoded, merged into the
        last held one when both are text deltas of the same shape."""
        behind = self._held or self._in_flight or self._buffered()
        if event is None or not behind:
            if self._held:
                self._release()
            self._put(data, event)
            return
        delta = self._dialect.text_delta(event)
        held = self._held
        if delta is None:
            held.append([None, event, None])
            self.queued += len(event.data) or 1  # never 0: the writer takes what is queued
            return
        shape, template, text = delta
        if held and held[-1][0] == shape:
            held[-1][2].append(text)
        else:
            held.append([shape, template, [text]])
        self.queued += len(text) or 1

    def _buffered(self) -> int:
        """Bytes the kernel would not take yet (the client is behind); 0 where unknown."""
        size = getattr(self.request.transport, "get_write_buffer_size", None)
        return int(size()) if size is not None else 0

    def _release(self) -> None:
        encode, with_text = self._format.encode, self._dialect.with_text
        for shape, template, texts in self._held:
            event = template if shape is None else with_text(template, "".join(texts))
            self._pending.append(encode(event))
        self._held = []

    def take(self) -> bytes:
        if self._held:
            self._release()
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = []
        self.queued = 0
        return data

    async def send(self, batch: bytes) -> int:
        self._in_flight = len(batch)
        try:
            await self.response.send(batch)
        finally:
            self._in_flight = 0
        return len(batch)

    async def commit(self, commit: Commit) -> None:
        headers, content_type = _split(commit.headers)
        request = self.request
        self.response = await request.respond(
            status=commit.status, headers=headers, content_type=content_type
        )
        self._tune()

    def _tune(self) -> None:
        transport = self.request.transport
        if hasattr(transport, "set_write_buffer_limits"):
            transport.set_write_buffer_limits(high=self.high_water_mark)
            send_buffer = self.high_water_mark if self.coalesce else None
            tune_socket(self.request, self.send_timeout, send_buffer)

    async def finish(self, frame: FinalFrame, ending: Ending) -> int:
        await self.response.send(frame.data, end_stream=True)
        return len(frame.data)

    async def refuse(self, refuse: Refuse, ending: Ending) -> None:
        headers, content_type = _split(refuse.headers)
        self.refusal = HTTPResponse(
            refuse.body, status=refuse.status, headers=headers, content_type=content_type
        )

    def unblock(self) -> None:
        if self.response is not None:
            protocol: Any = self.request.protocol  # Sanic's send() may write: the buffer takes it
            protocol.resume_writing()

    async def cut(self, cut: Cut) -> None:
        """The last word goes into the transport's buffer without waiting (behind what was
        sent: a client that reads again gets it last), and the connection closes; it is
        aborted if the buffer has not drained within another ``send_timeout`` seconds (memory:
        at most a high-water mark for that long)."""
        if self.response is None:
            return
        protocol: Any = self.request.protocol  # Sanic's HttpProtocol, an asyncio.Protocol
        protocol.resume_writing()
        with contextlib.suppress(Exception):  # the last word is best effort
            await asyncio.wait_for(self.response.send(cut.data, end_stream=True), 1)
        protocol.close(timeout=self.send_timeout or _CUT_GRACE)


class AsgiDownstream(SanicDownstream):
    """A Sanic response under an ASGI server, which owns the connection: no socket options, and
    no buffer to put the last word into. Each write (:meth:`send`, :meth:`finish`) runs as a
    task of its own, so that :meth:`unblock` can make the writer stop waiting for a client that
    does not drain without cancelling the ASGI ``send()`` (whether a cancelled one wrote its
    bytes is the server's business); the :meth:`cut` then waits, within the grace, for that
    write and the last word."""

    __slots__ = ("_sending", "_unblocked", "_waiting")

    def __init__(self, request: Request, format: Format, dialect: Dialect, **options: Any) -> None:
        super().__init__(request, format, dialect, **options)
        self._sending: asyncio.Task[None] | None = None  # the ASGI send() under way
        self._waiting: asyncio.Future[None] | None = None  # the writer's wait for it
        self._unblocked = False  # unblock() ended that wait

    def _tune(self) -> None:
        pass

    async def send(self, batch: bytes) -> int:
        self._in_flight = len(batch)
        try:
            return len(batch) if await self._detachable(self.response.send(batch)) else 0
        finally:
            self._in_flight = 0

    async def finish(self, frame: FinalFrame, ending: Ending) -> int:
        sent = await self._detachable(self.response.send(frame.data, end_stream=True))
        return len(frame.data) if sent else 0

    async def _detachable(self, sending: Coroutine[Any, Any, None]) -> bool:
        """Await ``sending`` (an ASGI write) as a task of its own; False if :meth:`unblock`
        made the wait end first (the write goes on: the cut awaits it)."""
        self._sending = task = asyncio.ensure_future(sending)
        self._waiting = waiting = asyncio.shield(task)
        try:
            await waiting
        except asyncio.CancelledError:
            if not self._unblocked:
                task.cancel()  # the writer itself is cancelled: the write goes too
                raise
            return False
        finally:
            self._waiting = None
        self._sending = None
        return True

    def unblock(self) -> None:
        waiting = self._waiting
        if waiting is not None and not waiting.done():
            self._unblocked = True
            waiting.cancel()  # the writer stops waiting; the ASGI send() goes on

    async def cut(self, cut: Cut) -> None:
        """What the stuck write holds, then the last word and the end of the body, once the
        client drains, within another ``send_timeout`` seconds; past that both are abandoned
        and the body is left unfinished (no terminating chunk: the client can tell), and the
        ASGI server closes the connection (uvicorn logs ``ASGI callable returned without
        completing response``)."""
        if self.response is None:
            return
        sending, self._sending = self._sending, None
        try:
            await asyncio.wait_for(
                self._last_word(sending, cut.data), self.send_timeout or _CUT_GRACE
            )
        except Exception:  # (TimeoutError) the body stays unfinished, so the client knows
            stream: Any = self.response.stream  # Sanic's ASGIApp
            if stream is not None:
                stream.send = None  # Sanic's mark of an ended stream: no end of the body then

    async def _last_word(self, sending: asyncio.Task[None] | None, data: bytes) -> None:
        if sending is not None:
            await sending
        await self.response.send(data, end_stream=True)


async def watch_disconnect(request: Request, left: Callable[[], None]) -> None:
    """ASGI only: wait for ``http.disconnect`` and call ``left()`` (Sanic never notices it)."""
    receive = request.transport.receive  # type: ignore[attr-defined]
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            left()
            return


class MemoryDownstream:
    """A downstream that records what it is told, for tests of the pump (no socket).

    Attributes:
        log: ``("commit", Commit)``, ``("send", bytes)``, ``("finish", FinalFrame)``,
            ``("refuse", Refuse)``, ``("cut", Cut)`` in order.
        body: every byte sent (batches, then the final frame or the cut's last word).
        gate: when set to an ``asyncio.Event``, each :meth:`send` waits for it (a client that
            does not drain); :meth:`unblock` sets it.
    """

    def __init__(self) -> None:
        self.queued = 0
        self.log: list[tuple[str, Any]] = []
        self.body = bytearray()
        self.gate: asyncio.Event | None = None
        self._pending: list[bytes] = []

    def put(self, data: bytes, event: ServerSentEvent | None) -> None:
        self._pending.append(data)
        self.queued += len(data)

    def take(self) -> bytes:
        data, self._pending, self.queued = b"".join(self._pending), [], 0
        return data

    async def send(self, batch: bytes) -> int:
        if self.gate is not None:
            await self.gate.wait()
        self.log.append(("send", batch))
        self.body += batch
        return len(batch)

    async def commit(self, commit: Commit) -> None:
        self.log.append(("commit", commit))

    async def finish(self, frame: FinalFrame, ending: Ending) -> int:
        self.log.append(("finish", frame))
        self.body += frame.data
        return len(frame.data)

    async def refuse(self, refuse: Refuse, ending: Ending) -> None:
        self.log.append(("refuse", refuse))

    async def cut(self, cut: Cut) -> None:
        self.log.append(("cut", cut))
        self.body += cut.data

    def unblock(self) -> None:
        if self.gate is not None:
            self.gate.set()
