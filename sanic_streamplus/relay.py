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
- **heartbeats**: a comment (``: ping``) whenever nothing was written for ``heartbeat`` seconds.
- **disconnects**: the source is closed the moment the client goes away (Sanic cancels the
  handler; under ASGI the relay watches for ``http.disconnect`` itself), and the close completes
  even if another cancellation lands while it runs.
- one INFO log line per stream with its outcome, duration, events and bytes.

It knows nothing of httpx: the source is any async iterable of events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any

from sanic import Request
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, json

from ._aio import close_completely
from .errors import (
    InvalidRequest,
    StreamPlusError,
    UpstreamStatusError,
    error_body,
)
from .framing import Dialect, Format, to_event

__all__ = ["StreamOptions", "error_response", "relay", "to_stream_error"]

logger = logging.getLogger("sanic_streamplus")

_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class StreamOptions:
    """How one stream is written.

    Attributes:
        format: the output :class:`~sanic_streamplus.framing.Format`.
        dialect: the :class:`~sanic_streamplus.framing.Dialect` for end and error frames.
        heartbeat: seconds of silence before a heartbeat is written (float), or None for none.
        high_water_mark: the client transport's write-buffer high-water mark, in bytes.
    """

    format: Format
    dialect: Dialect
    heartbeat: float | None
    high_water_mark: int


def to_stream_error(exc: BaseException) -> StreamPlusError:
    """Map any exception to the :class:`StreamPlusError` the client is told about.

    A ``StreamPlusError`` is itself; a 4xx Sanic ``SanicException`` (e.g. ``BadRequest`` raised
    by a handler) becomes an :class:`InvalidRequest` with its status and message; anything else
    is an ``internal_error`` (HTTP 500) whose message says nothing of the cause (the caller logs
    the traceback).
    """
    if isinstance(exc, StreamPlusError):
        return exc
    if isinstance(exc, SanicException) and int(exc.status_code) < 500:
        return InvalidRequest(str(exc.message or exc), status=int(exc.status_code))
    return StreamPlusError("internal server error")


def error_response(error: StreamPlusError) -> HTTPResponse:
    """The JSON response for ``error`` before the commit point (429 keeps ``Retry-After``)."""
    headers = {}
    if isinstance(error, UpstreamStatusError) and error.retry_after:
        headers["Retry-After"] = error.retry_after
    return json(error_body(error), status=error.status, headers=headers)


class _Stream:
    """The state of one relayed stream (see :func:`relay`).

    The relay task ``put()``s encoded events; one writer task owns the response and sends
    everything that is waiting in one ``send()``. It runs whenever the relay task waits (for the
    upstream, typically), so the events of one upstream read leave in one write, and a lone event
    leaves at once. The same task writes heartbeats when the stream has been silent for
    ``heartbeat`` seconds, and makes the commit (status line and headers).
    """

    def __init__(self, request: Request, options: StreamOptions) -> None:
        self.request = request
        self.options = options
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
        self.interval = options.heartbeat or 0.0  # seconds; 0: no heartbeat
        self.beat = options.format.heartbeat if self.interval else None
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
        self.pending.append(data)
        self.pending_size += len(data)
        if not self.wake.is_set():
            self.wake.set()

    async def backpressure(self) -> None:
        """Wait while a full batch (``high_water_mark`` bytes) waits for the writer."""
        while self.pending_size >= self.options.high_water_mark and self.failure is None:
            self.taken.clear()
            await self.taken.wait()
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
                        headers=_STREAM_HEADERS,
                        content_type=self.options.format.content_type,
                    )
                    transport = request.transport
                    if hasattr(transport, "set_write_buffer_limits"):
                        transport.set_write_buffer_limits(high=self.options.high_water_mark)
        return self.response is not None

    async def _write_loop(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
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

    async def _send(self, data: bytes) -> None:
        await self.response.send(data)
        now = self.last_write = self.loop.time()
        if self.first_byte is None:
            self.first_byte = now
        self.bytes += len(data)

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

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.writer.cancel()

    def log(self, outcome: str, status: int) -> None:
        now = self.loop.time()
        ttfb = "-" if self.first_byte is None else f"{self.first_byte - self.started:.3f}s"
        logger.info(
            "stream %s %s outcome=%s status=%d duration=%.3fs ttfb=%s events=%d bytes=%d",
            self.request.method,
            self.request.path,
            outcome,
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
    request: Request, source: AsyncIterable[Any], options: StreamOptions
) -> HTTPResponse | None:
    """Write the events of ``source`` to the client of ``request``.

    Args:
        request: the Sanic request being answered.
        source: an async iterable of ``ServerSentEvent``, ``str``, ``dict`` or ``list`` items; it
            is closed (``aclose()``) when the stream ends for any reason.
        options: format, dialect, heartbeat interval and high-water mark.

    Returns:
        None once the response was committed and ended (Sanic needs nothing more), or an
        ``HTTPResponse`` with the JSON error body when the stream failed before its commit point.

    Raises:
        asyncio.CancelledError: the client disconnected (native server); the source is closed
            first. Under ASGI the relay ends quietly instead.
    """
    stream = _Stream(request, options)
    fmt, dialect = options.format, options.dialect
    encode = fmt.encode  # chosen once per stream
    put, limit = stream.put, options.high_water_mark
    task = asyncio.current_task()
    assert task is not None
    watcher = asyncio.ensure_future(stream.watch_disconnect(task)) if _is_asgi(request) else None

    iterator = source.__aiter__()
    outcome, status = "completed", 200
    error: StreamPlusError | None = None
    try:
        try:
            async for item in iterator:
                event = to_event(item)
                if dialect.is_end(event):
                    if fmt.writes_end:
                        put(encode(event))
                    break
                put(encode(event))
                stream.events += 1
                if stream.pending_size >= limit:
                    await stream.backpressure()
            else:
                if fmt.writes_end:
                    for event in dialect.end_events():
                        put(encode(event))
        except Exception as exc:
            error = to_stream_error(exc)
            outcome = error.outcome
            if outcome == "internal_error":
                logger.exception("stream handler failed", exc_info=exc)
        if error is not None:
            if not await stream.seal():
                status = error.status
                stream.stop()
                return error_response(error)
            for event in dialect.error_events(error):
                put(encode(event))
        await stream.flush()
        await stream.response.eof()
        return None
    except asyncio.CancelledError:
        outcome, status = "client_disconnected", 499
        if stream.disconnected:  # ASGI: we cancelled ourselves; end quietly
            uncancel = getattr(task, "uncancel", None)
            if uncancel is not None:
                uncancel()
            return None
        raise
    finally:
        stream.stop()
        if watcher is not None:
            watcher.cancel()
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await close_completely(aclose())
        stream.log(outcome, status)
