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
import logging
from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass
from typing import Any

from sanic import Request
from sanic.response import HTTPResponse, json

from .downstream import AsgiDownstream, SanicDownstream, is_asgi, watch_disconnect
from .errors import StreamPlusError, error_body
from .framing import Dialect, Format
from .machine import StreamMachine
from .observe import Watch
from .pump import Pump, to_stream_error

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


def error_response(error: StreamPlusError, dialect: Dialect | None = None) -> HTTPResponse:
    """The JSON response for ``error`` before the commit point, its body in ``dialect``'s error
    shape (:meth:`~sanic_streamplus.framing.Dialect.refusal_body`; the ``plain`` one without a
    dialect); a 429 or 503 carries the error's ``Retry-After``."""
    headers = {}
    if error.retry_after and error.status in (429, 503):
        headers["Retry-After"] = error.retry_after
    body = error_body(error) if dialect is None else dialect.refusal_body(error)
    return json(body, status=error.status, headers=headers)


async def relay(
    request: Request,
    source: AsyncIterable[Any],
    options: StreamOptions,
    registry: set[Any] | None = None,
    headers: Mapping[str, str] | None = None,
    watch: Watch | None = None,
) -> HTTPResponse | None:
    """Write the events of ``source`` to the client of ``request``: a
    :class:`~sanic_streamplus.pump.Pump` over a :class:`~sanic_streamplus.machine.StreamMachine`
    and the request's :class:`~sanic_streamplus.downstream.SanicDownstream` (or
    :class:`~sanic_streamplus.downstream.AsgiDownstream`).

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
            first. Under ASGI the relay ends quietly instead, and a cancellation of the request
            (uvicorn's, at its ``timeout_graceful_shutdown``) ends the stream with its
            ``shutdown`` frame, as a native server's stop does.
    """
    all_headers = {**STREAM_HEADERS, **headers} if headers else STREAM_HEADERS
    machine = StreamMachine(options.dialect, options.format, all_headers)
    asgi = is_asgi(request)
    downstream = (AsgiDownstream if asgi else SanicDownstream)(
        request,
        options.format,
        options.dialect,
        high_water_mark=options.high_water_mark,
        send_timeout=options.send_timeout,
        coalesce=options.slow_client == "coalesce",
    )
    pump = Pump(
        machine,
        downstream,
        heartbeat=options.heartbeat,
        send_timeout=options.send_timeout,
        high_water_mark=options.high_water_mark,
        slow_client=options.slow_client,
        watch=watch,
        name=f"{request.method} {request.path}",
    )
    watcher = asyncio.ensure_future(watch_disconnect(request, pump.client_left)) if asgi else None
    if registry is not None:
        registry.add(pump)
    try:
        await (_run_asgi(pump, source) if asgi else pump.run(source))
    finally:
        if registry is not None:
            registry.discard(pump)
        if watcher is not None:
            watcher.cancel()
    return downstream.refusal


async def _run_asgi(pump: Pump, source: AsyncIterable[Any]) -> None:
    """``pump.run(source)`` under an ASGI server, which tells an app nothing when it stops but
    cancels the requests it will not wait for any more (uvicorn, at its
    ``timeout_graceful_shutdown``): that cancellation ends the stream as a server stop does,
    with its ``shutdown`` frame, and the request then ends normally (a second cancellation
    ends it at once, as a disconnect)."""
    running = asyncio.ensure_future(pump.run(source))
    try:
        await asyncio.shield(running)
    except asyncio.CancelledError:
        if running.done():
            raise
        pump.shutdown()
        await running
        task: Any = asyncio.current_task()
        if hasattr(task, "uncancel"):  # Python 3.11+: the cancellation is answered
            task.uncancel()


async def shutdown_streams(registry: set[Any], timeout: float) -> None:
    """End every stream of ``registry`` (see :func:`relay`) with a ``shutdown`` error frame in
    its dialect (before its commit point: a 503 JSON answer), its upstream closed, and wait up
    to ``timeout`` seconds for them to finish."""
    pumps = [pump for pump in registry if isinstance(pump, Pump)]
    for pump in pumps:
        pump.shutdown()
    if pumps:  # the streams, not their connections: a keep-alive connection outlives them
        await asyncio.wait([pump.ended() for pump in pumps], timeout=timeout)
