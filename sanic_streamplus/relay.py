"""The downstream side of a stream: commit point, backpressure, heartbeats, disconnects, errors.

:func:`relay` writes the events of an async iterable to a Sanic response:

- **commit point**: the status line and headers go out with the first event, or with the first
  heartbeat that is due, whichever comes first. A failure before that is a real HTTP status with a
  JSON body ``{"error": {"type", "message", "upstream_status"}}``; after it, an error frame in the
  stream's dialect, then a clean end.
- **batched writes**: one writer task per stream sends everything queued in one ``send()``; it runs
  whenever the relay waits (for the upstream, typically), so all the events of one upstream read
  leave in one write and a lone event leaves at once.
- **backpressure**: once ``high_water_mark`` bytes are queued, the relay waits for the writer to
  take them before it pulls the next event, and the writer's ``send()`` returns only once the
  client's transport has drained below its high-water mark: a slow client slows the upstream read
  and memory stays bounded.
- **slow clients**: a write that does not drain within ``send_timeout`` cuts the client (the
  ``slow_client`` policy decides what happens before that: ``block``, ``coalesce`` or
  ``disconnect``); the client socket gets ``TCP_USER_TIMEOUT`` (twice the send timeout) and TCP
  keepalive, so a client that vanished without a FIN is found within that bound.
- **heartbeats**: a comment (``: ping``) whenever nothing was written for ``heartbeat`` seconds.
- **disconnects**: the source is closed the moment the client goes away (Sanic cancels the
  handler; under ASGI the relay watches for ``http.disconnect`` itself), and the close completes
  even if another cancellation lands while it runs.
- **shutdown**: :func:`shutdown_streams` ends every open stream with a ``shutdown`` error frame.
- one INFO log line per stream with its outcome, duration, events and bytes.

It knows nothing of httpx: the source is any async iterable of events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterable, Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sanic import Request
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, json

from ._aio import aclose_iterator, close_completely
from .errors import (
    DownstreamError,
    InvalidRequest,
    SendTimeout,
    ServerShutdown,
    SlowClient,
    StreamPlusError,
    UpstreamErrorEvent,
    UpstreamTruncated,
    error_body,
)
from .framing import Dialect, EventKind, Format, to_event
from .machine import Outcome, outcome_for
from .observe import Watch
from .sse import ServerSentEvent

__all__ = [
    "STREAM_HEADERS",
    "StreamOptions",
    "error_response",
    "relay",
    "shutdown_streams",
    "to_stream_error",
]

logger = logging.getLogger("sanic_streamplus")

# no-transform: no proxy, CDN or compression layer may re-encode (and so buffer) the stream
STREAM_HEADERS = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}
_CUT_GRACE = 5.0  # seconds, without a send timeout: as Sanic's GRACEFUL_TCP_CLOSE_TIMEOUT


@dataclass(frozen=True)
class StreamOptions:
    """How one stream is written.

    Attributes:
        format: the output :class:`~sanic_streamplus.framing.Format`.
        dialect: the :class:`~sanic_streamplus.framing.Dialect` for end and error frames.
        heartbeat: seconds of silence before a heartbeat is written (float), or None for none.
        high_water_mark: the client transport's write-buffer high-water mark, in bytes.
        send_timeout: seconds a write may wait for the client to drain before it is cut
            (float), or None for no limit.
        slow_client: the slow-client policy: ``block``, ``coalesce`` or ``disconnect``.
    """

    format: Format
    dialect: Dialect
    heartbeat: float | None
    high_water_mark: int
    send_timeout: float | None = None
    slow_client: str = "block"


def to_stream_error(exc: BaseException) -> StreamPlusError:
    """Map any exception to the :class:`~sanic_streamplus.errors.StreamPlusError` the client is
    told about.

    A ``StreamPlusError`` is itself; a 4xx Sanic ``SanicException`` (e.g. ``BadRequest`` raised
    by a handler) becomes an :class:`~sanic_streamplus.errors.InvalidRequest` with its status and
    message; anything else is an ``internal_error`` (HTTP 500) whose message says nothing of the
    cause (the caller logs the traceback).
    """
    if isinstance(exc, StreamPlusError):
        return exc
    if isinstance(exc, SanicException) and int(exc.status_code) < 500:
        return InvalidRequest(str(exc.message or exc), status=int(exc.status_code))
    return StreamPlusError("internal server error")


def error_response(error: StreamPlusError, dialect: Dialect | None = None) -> HTTPResponse:
    """The JSON response for ``error`` before the commit point, its body in ``dialect``'s error
    shape (:meth:`~sanic_streamplus.framing.Dialect.refusal_body`; the ``plain`` one without a
    dialect); a 429 or 503 carries the error's ``Retry-After``."""
    headers = {}
    if error.retry_after and error.status in (429, 503):
        headers["Retry-After"] = error.retry_after
    body = error_body(error) if dialect is None else dialect.refusal_body(error)
    return json(body, status=error.status, headers=headers)


def _tune_socket(request: Request, send_timeout: float | None, send_buffer: int | None) -> None:
    """Make a client that vanished without a FIN show up as a disconnect within about twice
    ``send_timeout``: ``TCP_USER_TIMEOUT`` (Linux) drops the connection when sent data stays
    unacknowledged that long, and TCP keepalive probes a silent one. Twice, so that a client
    that is alive but not reading meets the send timeout first (and its error frame), and the
    kernel does not drop the connection during the cut's grace period. ``send_buffer`` (bytes)
    caps the kernel send buffer, so that a backlog waits where it can still be coalesced.
    No-op without a TCP socket."""
    sock = request.transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = []
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


class _Stream:
    """The state of one relayed stream (see :func:`relay`).

    The relay task ``put()``s encoded events; one writer task owns the response and sends
    everything that is waiting in one ``send()``. It runs whenever the relay task waits (for the
    upstream, typically), so the events of one upstream read leave in one write, and a lone event
    leaves at once. The same task writes heartbeats when the stream has been silent for
    ``heartbeat`` seconds, and makes the commit (status line and headers).
    """

    def __init__(
        self, request: Request, options: StreamOptions, headers: Mapping[str, str] | None
    ) -> None:
        self.request = request
        self.options = options
        self.headers = {**STREAM_HEADERS, **headers} if headers else STREAM_HEADERS
        self.task = asyncio.current_task()
        self.loop = asyncio.get_running_loop()
        self.started = self.last_write = self.loop.time()
        self.first_byte: float | None = None
        self.response: Any = None
        self.sealed = False  # no heartbeat may commit any more
        self.commit_lock = asyncio.Lock()
        self.disconnected = False
        self.events = 0
        self.bytes = 0
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.wake = asyncio.Event()  # the writer has something to do
        self.taken = asyncio.Event()  # the writer took the pending batch
        self.closing = False
        self.failure: BaseException | None = None
        self.ended = asyncio.Event()  # the relay is done: logged, its source closed
        self.interrupt_error: StreamPlusError | None = None  # why the relay task was cancelled
        self.relaying = True  # the relay task is still in its loop (it may be interrupted)
        self.sending = False  # a send() waits for the client to drain
        self.send_started = 0.0  # loop time the current send() began
        self.sender: asyncio.Task[Any] | None = None  # the task in that send()
        self.send_timed_out = False
        self.waiting_writer = False  # the relay task is waiting for the writer
        self.send_timeout = options.send_timeout
        self.watchdog: asyncio.TimerHandle | None = None
        if self.send_timeout:
            self.watchdog = self.loop.call_at(self.started + self.send_timeout, self._check_send)
        self.held: list[Any] = []  # coalesce: [shape, template, [texts]] or [None, event, None]
        self.text_delta = options.dialect.text_delta
        self.interval = options.heartbeat or 0.0  # seconds; 0: no heartbeat
        self.beat = options.dialect.heartbeat(options.format) if self.interval else None
        self.beat_due = False
        self.timer: asyncio.TimerHandle | None = None
        if self.beat is not None:
            self.timer = self.loop.call_at(self.started + self.interval, self._check_beat)
        self.writer = asyncio.ensure_future(self._write_loop())

    def put(self, data: bytes) -> None:
        """Queue ``data`` for the writer (no wait; see :meth:`backpressure`).

        Raises:
            BaseException: the writer failed (e.g. Sanic's ``RequestCancelled``).
        """
        if self.failure is not None:
            raise self.failure
        if self.held:  # coalesce: what was held goes first
            self._take_held()
        self.pending.append(data)
        self.pending_size += len(data)
        if not self.wake.is_set():
            self.wake.set()

    def hold(self, event: ServerSentEvent) -> None:
        """Coalesce policy, while the client is behind: keep ``event`` unencoded for the
        writer, merged into the last held one when both are text deltas of the same shape."""
        if self.failure is not None:
            raise self.failure
        delta = self.text_delta(event)
        held = self.held
        if delta is not None:
            shape, template, text = delta
            if held and held[-1][0] == shape:
                held[-1][2].append(text)
            else:
                held.append([shape, template, [text]])
            self.pending_size += len(text)
        else:
            held.append([None, event, None])
            self.pending_size += len(event.data)
        if not self.wake.is_set():
            self.wake.set()

    def _take_held(self) -> None:
        encode, with_text = self.options.format.encode, self.options.dialect.with_text
        for shape, template, texts in self.held:
            event = template if shape is None else with_text(template, "".join(texts))
            self.pending.append(encode(event))
        self.held = []

    async def backpressure(self) -> None:
        """Wait while a full batch (``high_water_mark`` bytes) waits for the writer."""
        while self.pending_size >= self.options.high_water_mark and self.failure is None:
            self.taken.clear()
            self.waiting_writer = True
            try:
                await self.taken.wait()
            finally:
                self.waiting_writer = False
        if self.failure is not None:
            raise self.failure

    async def commit(self, heartbeat: bool = False) -> bool:
        """Send the status line and headers unless done; a heartbeat may not commit once the
        stream is sealed. Returns True if the response is committed."""
        if self.response is None:
            async with self.commit_lock:
                if self.response is None and not (heartbeat and self.sealed):
                    request = self.request
                    self.response = await request.respond(
                        status=200,
                        headers=self.headers,
                        content_type=self.options.format.content_type,
                    )
                    transport = request.transport
                    if hasattr(transport, "set_write_buffer_limits"):
                        transport.set_write_buffer_limits(high=self.options.high_water_mark)
                        coalesce = self.options.slow_client == "coalesce"
                        send_buffer = self.options.high_water_mark if coalesce else None
                        _tune_socket(request, self.send_timeout, send_buffer)
        return self.response is not None

    async def _write_loop(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                if self.held:
                    self._take_held()
                if self.pending:
                    pending = self.pending
                    data = pending[0] if len(pending) == 1 else b"".join(pending)
                    self.pending = []
                    self.pending_size = 0
                    self.taken.set()
                    await self.commit()
                    await self._send(data)
                elif self.beat_due and self.beat is not None:
                    if await self.commit(heartbeat=True):
                        await self._send(self.beat)
                self.beat_due = False
                if self.closing and not self.pending:
                    return
        except BaseException as exc:  # handed to the relay task, which reports it
            self.failure = exc
            self.taken.set()
            if isinstance(exc, DownstreamError) and not self.waiting_writer:
                self.interrupt(exc)  # the relay waits for the upstream: wake it

    async def _send(self, data: bytes) -> None:
        await self._drained(self.response.send(data))
        now = self.last_write = self.loop.time()
        if self.first_byte is None:
            self.first_byte = now
        self.bytes += len(data)

    async def _drained(self, sending: Awaitable[None]) -> None:
        """Await ``sending`` (a write that waits for the client to drain), within the send
        timeout (watched by :meth:`_check_send`: nothing per send but two stamps).

        Raises:
            SendTimeout: the client did not drain for ``send_timeout`` seconds.
        """
        self.sending = True
        self.send_started = self.loop.time()
        self.sender = asyncio.current_task()
        try:
            await sending
        except asyncio.CancelledError:
            if not self.send_timed_out:
                raise
            self.send_timed_out = False
            if self.sender is not None:
                _uncancel(self.sender)
            raise SendTimeout(self.send_timeout or 0.0) from None
        finally:
            self.sending = False

    def _check_send(self) -> None:
        """The send-timeout watchdog: one timer per stream, re-armed for the current send."""
        timeout = self.send_timeout or 0.0
        now = self.loop.time()
        due = self.send_started + timeout if self.sending else now + timeout
        if self.sending and now >= due and self.sender is not None:
            self.send_timed_out = True
            self.sender.cancel()
            due = now + timeout
        self.watchdog = self.loop.call_at(due, self._check_send)

    def _check_beat(self) -> None:
        due = self.last_write + self.interval
        now = self.loop.time()
        if now >= due:
            self.beat_due = True
            self.wake.set()
            due = now + self.interval
        self.timer = self.loop.call_at(due, self._check_beat)

    async def flush(self) -> None:
        """Let the writer send everything queued, then stop it (commits an empty stream).

        Raises:
            BaseException: the writer failed.
        """
        if self.timer is not None:
            self.timer.cancel()
        self.closing = True
        self.wake.set()
        await asyncio.shield(self.writer)
        if self.failure is not None:
            raise self.failure
        await self.commit()

    async def end(self) -> None:
        """:meth:`flush`, then end the body (within the send timeout).

        Raises:
            BaseException: the writer failed; SendTimeout: the end did not drain in time.
        """
        await self.flush()
        await self._drained(self.response.eof())

    async def watch_disconnect(self, task: asyncio.Task[Any]) -> None:
        """ASGI only: Sanic never notices ``http.disconnect``, so wait for it here."""
        receive = self.request.transport.receive  # type: ignore[attr-defined]
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                self.disconnected = True
                task.cancel()
                return

    async def seal(self) -> bool:
        """Forbid a heartbeat to commit; return True if the response is committed, or has
        events queued (they go out, so the stream counts as committed)."""
        async with self.commit_lock:
            self.sealed = True
            return self.response is not None or bool(self.pending)

    def interrupt(self, error: StreamPlusError) -> None:
        """End the relay with ``error`` wherever it waits (the upstream, typically)."""
        if self.relaying and self.interrupt_error is None and self.task is not None:
            self.interrupt_error = error
            self.task.cancel()

    async def cut(self, frames: Iterable[bytes]) -> None:
        """End the stream of a client that stopped draining: ``frames`` go into the transport's
        buffer without waiting (behind what is queued: a client that reads again gets them
        last), and the connection closes; it is aborted if the transport's buffer has not
        drained within another ``send_timeout`` seconds (memory: at most a high-water mark
        for that long). Native server only; under ASGI the ASGI server owns the connection."""
        self.stop()
        if self.response is None or _is_asgi(self.request):
            return
        protocol: Any = self.request.protocol  # Sanic's HttpProtocol, an asyncio.Protocol
        protocol.resume_writing()  # Sanic's send() may write again: the buffer takes it
        with contextlib.suppress(Exception):  # the last word is best effort
            await asyncio.wait_for(self.response.send(b"".join(frames), end_stream=True), 1)
        protocol.close(timeout=self.send_timeout or _CUT_GRACE)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.writer.cancel()

    def report(
        self, watch: Watch, error: StreamPlusError | None, status: int, disconnected: bool = False
    ) -> None:
        """Hand the stream's ending and stats to ``watch`` (a committed stream's status is 200,
        whatever happened after)."""
        ttfb = None if self.first_byte is None else self.first_byte - self.started
        if self.response is not None:
            status = 200
        watch.settle(error, disconnected, status, self.events, self.bytes, ttfb)

    def log(self, outcome: Outcome, error: StreamPlusError | None, status: int) -> None:
        """The stream's INFO line: its :class:`~sanic_streamplus.machine.Outcome`, the error's
        ``type`` when there is one (``error=idle_timeout``), status and stats."""
        now = self.loop.time()
        ttfb = "-" if self.first_byte is None else f"{self.first_byte - self.started:.3f}s"
        logger.info(
            "stream %s %s outcome=%s%s status=%d duration=%.3fs ttfb=%s events=%d bytes=%d",
            self.request.method,
            self.request.path,
            outcome,
            "" if error is None else f" error={error.type}",
            status,
            now - self.started,
            ttfb,
            self.events,
            self.bytes,
        )


def _is_asgi(request: Request) -> bool:
    return bool(getattr(request.app, "asgi", False)) and not getattr(
        request.stream, "request_body", False
    )


async def relay(
    request: Request,
    source: AsyncIterable[Any],
    options: StreamOptions,
    registry: set[Any] | None = None,
    headers: Mapping[str, str] | None = None,
    watch: Watch | None = None,
) -> HTTPResponse | None:
    """Write the events of ``source`` to the client of ``request``.

    Args:
        request: the Sanic request being answered.
        source: an async iterable of ``ServerSentEvent``, ``str``, ``dict`` or ``list`` items; it
            is closed (``aclose()``) when the stream ends for any reason.
        options: format, dialect, heartbeat interval, high-water mark, send timeout and
            slow-client policy.
        registry: a set the stream is in while it runs, for :func:`shutdown_streams`.
        headers: response headers of the stream's own, on top of the usual ones.
        watch: what the stream reports to (``on_finish`` hooks, metrics, span): it gets every
            event's usage block, and the ending twice: before the final frame is written
            (``before_final_frame`` hooks are awaited then), and once the stream ended.

    Returns:
        None once the response was committed and ended (Sanic needs nothing more), or an
        ``HTTPResponse`` with the JSON error body when the stream failed before its commit point.

    Raises:
        asyncio.CancelledError: the client disconnected (native server); the source is closed
            first. Under ASGI the relay ends quietly instead.
    """
    stream = _Stream(request, options, headers)
    fmt, dialect = options.format, options.dialect
    encode = fmt.encode  # chosen once per stream
    put, limit = stream.put, options.high_water_mark
    coalesce = options.slow_client == "coalesce"
    disconnect = options.slow_client == "disconnect"
    # bytes the kernel would not take yet: the client is behind (0 where it cannot be told)
    buffered = getattr(request.transport, "get_write_buffer_size", None) or (lambda: 0)
    task = stream.task
    assert task is not None
    watcher = asyncio.ensure_future(stream.watch_disconnect(task)) if _is_asgi(request) else None
    if registry is not None:
        registry.add(stream)

    iterator = source.__aiter__()
    outcome, status = Outcome.COMPLETED, 200
    error: StreamPlusError | None = None
    usage, classify = dialect.usage, dialect.classify
    final: list[ServerSentEvent] = []  # the terminating frame: end marker or error events
    started: ServerSentEvent | None = None  # the last START event, the last event: what
    last: ServerSentEvent | None = None  # the Responses dialect's error frame repeats
    finished = passthrough = False  # a FINISH event went by; the upstream's own error frame
    try:
        try:
            async for item in iterator:
                event = to_event(item)
                if watch is not None:
                    watch.event(usage(event))
                kind = classify(event)
                if kind is EventKind.TERMINAL:
                    final = [event]
                    break
                if kind is EventKind.UPSTREAM_ERROR:  # its own report: no second frame of ours
                    raise UpstreamErrorEvent.from_event(event, dialect.name)
                if kind is EventKind.START:
                    started = event
                elif kind is EventKind.FINISH:
                    finished = True
                last = event
                if coalesce and (stream.held or stream.sending or buffered()):
                    stream.hold(event)  # the client is behind: merge text deltas
                else:
                    put(encode(event))
                stream.events += 1
                if stream.pending_size >= limit:
                    if disconnect and stream.sending:
                        raise SlowClient(limit)
                    await stream.backpressure()
            else:
                if not dialect.complete_without_end(finished):
                    raise UpstreamTruncated(dialect.name)
                final = dialect.end_events()
        except asyncio.CancelledError:
            error = stream.interrupt_error
            if error is None:
                raise
            _uncancel(task)
        except UpstreamErrorEvent as exc:
            error = exc
            passthrough = exc.dialect == dialect.name
            if passthrough:  # as it came, then the bare end marker ([DONE]) where there is one
                final = [exc.event, *dialect.end_events()]
        except Exception as exc:
            error = to_stream_error(exc)
            if outcome_for(error) is Outcome.INTERNAL_ERROR:
                logger.exception("stream handler failed", exc_info=exc)
        stream.relaying = False
        committed = True
        if error is not None:
            outcome = outcome_for(error)
            if not passthrough:
                committed = await stream.seal()
                if not committed:
                    status = error.status
                final = dialect.error_frame(error, started, last)
        if not fmt.writes_end and not dialect.end_is_data:  # a bare end marker ([DONE]):
            final = [e for e in final if classify(e) is not EventKind.TERMINAL]  # sse only
        if watch is not None:
            stream.report(watch, error, status)
            await watch.before_final()
        if not committed:
            assert error is not None
            stream.stop()
            return error_response(error, dialect)
        if not isinstance(error, DownstreamError):
            try:
                for event in final:
                    put(encode(event))
                await stream.end()
                return None
            except DownstreamError as exc:
                error, outcome = exc, outcome_for(exc)
                final = dialect.error_frame(exc, started, last)
        # a client that stopped draining: the upstream closes first, as the cut takes time
        await close_completely(aclose_iterator(iterator))
        await stream.cut([encode(event) for event in final])
        return None
    except asyncio.CancelledError:
        outcome, status, error = Outcome.CLIENT_DISCONNECTED, 499, None  # no error of ours
        if stream.disconnected:  # ASGI: we cancelled ourselves; end quietly
            _uncancel(task)
            return None
        raise
    finally:
        stream.relaying = False
        stream.stop()
        if registry is not None:
            registry.discard(stream)
        if watcher is not None:
            watcher.cancel()
        try:
            await close_completely(aclose_iterator(iterator))
        finally:  # even when a cancellation (the cut connection's) lands here
            stream.log(outcome, error, status)
            if watch is not None:
                stream.report(watch, error, status, outcome is Outcome.CLIENT_DISCONNECTED)
                watch.finish()
            stream.ended.set()


def _uncancel(task: asyncio.Task[Any]) -> None:
    uncancel = getattr(task, "uncancel", None)  # Python 3.11+
    if uncancel is not None:
        uncancel()


async def shutdown_streams(registry: set[Any], timeout: float) -> None:
    """End every stream of ``registry`` (see :func:`relay`) with a ``shutdown`` error frame in
    its dialect (before its commit point: a 503 JSON answer), its upstream closed, and wait up
    to ``timeout`` seconds for them to finish."""
    streams = [stream for stream in registry if isinstance(stream, _Stream)]
    for stream in streams:
        stream.interrupt(ServerShutdown())
    if streams:  # the streams, not their connections: a keep-alive connection outlives them
        ended = [asyncio.ensure_future(stream.ended.wait()) for stream in streams]
        _, waiting = await asyncio.wait(ended, timeout=timeout)
        for future in waiting:
            future.cancel()
