"""``@stream_post``: turn a POST handler into a streaming endpoint."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from sanic import Request
from sanic.exceptions import PayloadTooLarge
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from .config import FAILOVER_MODES, SLOW_CLIENT_POLICIES, Settings
from .errors import (
    BodyTooLarge,
    ExtensionMissing,
    InvalidRequest,
    StreamFinished,
    StreamNotFound,
    TooManyProducers,
    TooManyStreams,
)
from .failover import Handover
from .framing import get_dialect, get_format
from .machine import Outcome, outcome_for
from .observe import Hook, Watch
from .openapi import document
from .relay import STREAM_HEADERS, StreamOptions, error_response, relay, to_stream_error
from .resume import Resumer, is_stream_id, new_stream_id, parse_last_event_id

__all__ = ["cancel_stream", "resume_stream", "stream_post"]

logger = logging.getLogger("sanic_streamplus")

Handler = TypeVar("Handler", bound=Callable[..., Any])
_FRAMING = ("format", "dialect")  # what a resumable stream's record says of its framing
_UNSET: Any = object()


def _options(request: Request, settings: Settings, overrides: dict[str, Any]) -> StreamOptions:
    heartbeat = overrides.get("heartbeat", _UNSET)
    if heartbeat is _UNSET:
        heartbeat = settings.heartbeat
    response_timeout = float(request.app.config.get("RESPONSE_TIMEOUT") or 0)
    if heartbeat and response_timeout > 0:
        heartbeat = min(heartbeat, response_timeout / 2)  # or Sanic cuts the idle stream
    return StreamOptions(
        format=get_format(overrides.get("format") or settings.format),
        dialect=get_dialect(overrides.get("dialect") or settings.dialect),
        heartbeat=heartbeat or None,
        high_water_mark=overrides.get("high_water_mark") or settings.high_water_mark,
        send_timeout=settings.send_timeout,
        slow_client=overrides.get("slow_client") or settings.slow_client,
    )


_DRAIN_BYTES = 1 << 20  # of a body past the limit, read and dropped so that the 413 is seen
_DRAIN_TIME = 1.0  # seconds spent on that at most


async def _read_body(request: Request, limit: int) -> None:
    """Read the request body into ``request.body``, refusing it past ``limit`` bytes.

    Stream routes are marked ``is_stream`` so that Sanic does not read the body first (up to its
    own ``REQUEST_MAX_SIZE``, 100 MB by default); this reads it with the stream's own limit, and
    never holds more than ``limit`` bytes of it. A body that grows past the limit is read on
    and dropped (a lingering close, as nginx's ``lingering_close``: at most 1 MiB more, for at
    most 1 s) before the refusal, so that a client still sending gets the 413 instead of a
    connection reset that discards it.

    Raises:
        BodyTooLarge: ``Content-Length`` says more than ``limit``, or the body grew past it.
    """
    http: Any = request.stream  # Sanic's Http1 (native server) or its ASGI app
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        if http is not None:
            http.keep_alive = False  # its body stays unread: the connection cannot be reused
        raise BodyTooLarge(limit)
    if http is None or not getattr(http, "request_body", None):
        return  # no body, or already read
    http.request_max_size = limit + _DRAIN_BYTES  # Sanic's HTTP/1: past it, drop the connection
    body = bytearray()
    try:
        async for data in http:  # counted as it arrives, on Sanic's server and under ASGI alike
            body += data
            if len(body) > limit:
                break
    except PayloadTooLarge:  # Sanic's own count, with the limit above
        raise BodyTooLarge(limit) from None
    if len(body) > limit:
        await _drain(http)
        raise BodyTooLarge(limit)
    request.body = bytes(body)


async def _drain(http: Any) -> None:
    """Read and drop what is left of a refused body, within ``_DRAIN_BYTES`` and
    ``_DRAIN_TIME``; past either, the connection is not kept alive."""

    async def drop() -> bool:  # True: the body ended within the bound
        drained = 0
        async for data in http:
            drained += len(data)
            if drained > _DRAIN_BYTES:
                return False
        return True

    try:
        ended = await asyncio.wait_for(drop(), _DRAIN_TIME)
    except (asyncio.TimeoutError, PayloadTooLarge):
        ended = False
    if not ended:
        http.keep_alive = False


def _refusal(exc: Exception) -> HTTPResponse:
    """The JSON error response for ``exc`` raised before the commit point (a bug is logged)."""
    error = to_stream_error(exc)
    if outcome_for(error) is Outcome.INTERNAL_ERROR:
        logger.exception("stream handler failed", exc_info=exc)
    return error_response(error)


async def _resumable(
    request: Request,
    resumer: Resumer,
    options: StreamOptions,
    produce: Callable[[], Awaitable[Any]],
) -> HTTPResponse | tuple[AsyncIterator[Any], dict[str, str]]:
    """A resumable stream: resume the one ``Last-Event-ID`` names, attach to the one the
    ``Idempotency-Key`` is bound to, or start a producer on the handler's events (``produce()``
    calls the handler). Returns the handler's own response, or the reader's events and the
    response headers that name the stream.

    Raises:
        StreamPlusError: a clear answer before anything is sent: 404/410 for a resume, 503
            ``too_many_producers`` past ``max_producers`` (unless the ``Idempotency-Key`` is
            bound: that attaches), 503 ``store_unavailable``.
    """
    last_event_id = request.headers.get("last-event-id")
    if last_event_id:
        stream_id, after = parse_last_event_id(last_event_id)
        await resumer.check(stream_id, after)
        return resumer.events(stream_id, after), {"X-Stream-Id": stream_id}
    key = request.headers.get("idempotency-key") or None
    place = resumer.reserve()
    if place is None:  # max_producers run already: attach to a bound key's stream, or refuse
        bound = None if key is None else await resumer.store.bound(key)
        if bound is None:
            raise TooManyProducers(resumer.max_producers or 0, 1)
        return resumer.events(bound, 0), {"X-Stream-Id": bound}
    try:
        info = {"format": options.format.name, "dialect": options.dialect.name}
        stream_id, created = await resumer.store.open(new_stream_id(), key, info)
        if created:
            try:
                source = await produce()
            except Exception as exc:
                await resumer.fail(stream_id, to_stream_error(exc))
                raise
            if isinstance(source, HTTPResponse):
                await resumer.fail(stream_id, InvalidRequest("the handler refused the request"))
                return source
            await resumer.start(source, options.dialect, stream_id, _handover(request, source))
    finally:
        resumer.release(place)
    return resumer.events(stream_id, 0), {"X-Stream-Id": stream_id}


def _handover(request: Request, source: Any) -> Handover | None:
    """The upstream request of a pass-through route (the handler returned what
    :func:`~sanic_streamplus.upstream.upstream_events` made, as it is), for a handover when
    the worker stops; None for any other handler (its events cannot be asked for again)."""
    noted = getattr(request.ctx, "streamplus_upstream", None)
    if noted is None or noted[0] is not source:
        return None
    mode, budget = request.ctx.streamplus_failover
    return Handover.of(noted[1], mode, budget, request.ctx.streamplus_attempts)


def _watch(
    state: Any,
    request: Request,
    options: StreamOptions,
    hooks: Iterable[Hook],
    stream_id: str | None,
    began: float | None = None,
) -> Watch | None:
    """What the stream reports to (hooks, signals, metrics, span), or None if nothing listens;
    ``began`` is when it started (``time.monotonic()``), by default now."""
    names = options.format.name, options.dialect.name
    watch: Watch | None = state.observer.watch(request, *names, hooks, stream_id, began)
    if watch is not None:  # the list upstream_events fills with the upstreams it asks
        watch.info.attempts = getattr(request.ctx, "streamplus_attempts", watch.info.attempts)
    return watch


def _first_set(value: int | None, default: int) -> int:
    return default if value is None else value


def _head_response(options: StreamOptions) -> HTTPResponse:
    """HEAD on a stream route: the headers a stream would have, no body, nothing started."""
    return HTTPResponse(
        status=200, headers=STREAM_HEADERS, content_type=options.format.content_type
    )


@dataclass(frozen=True)
class _Route:
    """What ``@stream_post`` knows of one route: its handler and its options."""

    handler: Callable[..., Any]
    overrides: dict[str, Any]
    hooks: list[Hook]
    resumable: bool
    require_json: bool

    async def call(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        """The handler's events (an async iterable), or the response it returned.

        Raises:
            TypeError: the handler returned neither.
        """
        handler = self.handler
        if inspect.isasyncgenfunction(handler):
            return handler(request, *args, **kwargs)
        source = await handler(request, *args, **kwargs)
        if not isinstance(source, HTTPResponse) and not hasattr(source, "__aiter__"):
            raise TypeError(
                f"stream handler {handler.__name__} returned "
                f"{type(source).__name__}; return an async iterable or a response"
            )
        return source


async def _serve(
    route: _Route, request: Request, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> HTTPResponse | None:
    """One request to a ``@stream_post`` route: the refusals before the handler runs, the
    handler's call, then the relay."""
    state = getattr(request.app.ctx, "streamplus", None)
    if state is None:
        missing = ExtensionMissing()
        logger.error("%s", missing.message)
        return error_response(missing)
    settings: Settings = state.settings
    options = _options(request, settings, route.overrides)
    if request.method == "HEAD":
        return _head_response(options)
    request.ctx.streamplus_dialect = options.dialect.name  # upstream_events' default
    request.ctx.streamplus_attempts = []  # filled by upstream_events, read by the watch
    request.ctx.streamplus_failover = (  # upstream_events' failover mode and budget
        route.overrides.get("failover") or settings.failover,
        _first_set(route.overrides.get("max_continuations"), settings.max_continuations),
    )
    if len(state.streams) >= settings.max_streams:
        return error_response(TooManyStreams(settings.max_streams, 1))
    # the stream's place under max_streams, from before its body is read until the relay
    # takes it over; given back on every way out before that
    token = object()
    state.streams.add(token)
    began = time.monotonic()
    try:
        refusal = await _body_refusal(request, settings, route.require_json)
        if refusal is not None:
            return refusal
        began = time.monotonic()  # the stream's start: the handler's call
        started = await _start(route, request, state, options, began, args, kwargs)
        if isinstance(started, HTTPResponse):
            return started
    finally:
        state.streams.discard(token)
    source, headers = started
    stream_id = headers["X-Stream-Id"] if headers else None
    watch = _watch(state, request, options, route.hooks, stream_id, began)
    return await relay(request, source, options, state.streams, headers, watch)


async def _body_refusal(
    request: Request, settings: Settings, require_json: bool
) -> HTTPResponse | None:
    """Read the body (within ``max_body_size``); the 413 or 400 answer if it is refused."""
    try:
        await _read_body(request, settings.max_body_size)
    except BodyTooLarge as refused:
        return error_response(refused)
    if require_json and request.method != "GET":  # a GET (EventSource's) has no body
        try:
            body = request.json
        except Exception:
            body = None
        if body is None:
            return error_response(InvalidRequest("the request body must be JSON"))
    return None


async def _start(
    route: _Route,
    request: Request,
    state: Any,
    options: StreamOptions,
    began: float,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> HTTPResponse | tuple[AsyncIterator[Any], dict[str, str] | None]:
    """Call the handler (through a producer for a resumable route): its events and the
    response headers of the stream, or the answer instead of a stream (the handler's own, or
    the JSON error for what it raised, reported to the hooks)."""
    try:
        if route.resumable:
            produce = functools.partial(route.call, request, *args, **kwargs)
            return await _resumable(request, state.resumer, options, produce)
        source = await route.call(request, *args, **kwargs)
        return source if isinstance(source, HTTPResponse) else (source, None)
    except Exception as exc:
        refusal = _refusal(exc)
        watch = _watch(state, request, options, route.hooks, None, began)
        if watch is not None:
            await watch.refused(to_stream_error(exc), refusal.status)
        return refusal


@overload
def stream_post(handler: Handler) -> Handler: ...


@overload
def stream_post(
    *,
    heartbeat: float | None = ...,
    format: str | None = ...,
    dialect: str | None = ...,
    high_water_mark: int | None = ...,
    slow_client: str | None = ...,
    failover: str | None = ...,
    max_continuations: int | None = ...,
    resumable: bool = ...,
    require_json: bool = ...,
    event_schema: type | Mapping[str, Any] | None = ...,
    on_finish: Hook | Iterable[Hook] | None = ...,
) -> Callable[[Handler], Handler]: ...


def stream_post(
    handler: Any = None,
    *,
    heartbeat: float | None = _UNSET,
    format: str | None = None,
    dialect: str | None = None,
    high_water_mark: int | None = None,
    slow_client: str | None = None,
    failover: str | None = None,
    max_continuations: int | None = None,
    resumable: bool = False,
    require_json: bool = True,
    event_schema: type | Mapping[str, Any] | None = None,
    on_finish: Hook | Iterable[Hook] | None = None,
) -> Any:
    """Make a POST handler answer with a stream (an SSE event stream by default).

    Use it under the route decorator, with or without arguments::

        @app.post("/chat")
        @stream_post(dialect="openai")
        async def chat(request):
            return upstream_events(request, "/chat/completions", json=request.json)

    The handler is either an async generator that yields events, or a coroutine that returns an
    async iterable of events or a normal ``HTTPResponse`` (e.g. a 400 for bad input). An event is
    a :class:`~sanic_streamplus.sse.ServerSentEvent`, a ``str`` (its data) or a ``dict``/``list``
    (JSON data). Anything raised before the first event is a JSON error response with a real
    status; after it, an error frame in the dialect, then a clean end (see ``docs/errors.md``).

    Before the handler runs, the wrapper answers with a JSON error and starts nothing: 503
    ``too_many_streams`` (with ``Retry-After``) past ``STREAMPLUS_MAX_STREAMS`` streams in this
    worker, 413 ``body_too_large`` past ``STREAMPLUS_MAX_BODY_SIZE`` bytes of body, 400 for a
    body that is not JSON. A ``HEAD`` request gets the stream's headers and no body.

    Validate the body with sanic-ext's ``@validate(json=Model)`` placed *below* this decorator
    (it then runs once the body is read): a failure is a 400 ``invalid_request`` naming the
    problem, before the handler runs. Above it, the server refuses to start. In sanic-ext's
    OpenAPI document the route answers 200 in its format's content type, and the errors above
    as JSON (see ``docs/openapi.md``).

    Args:
        heartbeat: seconds of silence before a heartbeat comment (float), None for none; default
            ``STREAMPLUS_HEARTBEAT``. Always kept below half of ``RESPONSE_TIMEOUT``.
        format: ``"sse"`` (default), ``"ndjson"`` or ``"text"`` (the data alone); default
            ``STREAMPLUS_FORMAT``.
        dialect: ``"plain"``, ``"openai"``, ``"anthropic"`` or ``"openai-responses"``, for end,
            error and heartbeat frames (see ``docs/dialects.md``); default
            ``STREAMPLUS_DIALECT``.
        high_water_mark: the client's write-buffer high-water mark in bytes; default
            ``STREAMPLUS_HIGH_WATER_MARK``.
        slow_client: ``"block"``, ``"coalesce"`` or ``"disconnect"``; default
            ``STREAMPLUS_SLOW_CLIENT`` (see :class:`~sanic_streamplus.config.Settings`).
        failover: with several upstreams (``STREAMPLUS_UPSTREAMS``), ``"fallback"`` (an
            upstream that fails before its first content event is replaced by the next) or
            ``"continue"`` (also after it: the next upstream continues the answer in the same
            client stream); default ``STREAMPLUS_FAILOVER`` (see ``docs/failover.md``).
        max_continuations: how many times one stream may be continued (``"continue"``); default
            ``STREAMPLUS_MAX_CONTINUATIONS`` (1).
        resumable: run the handler's events through a producer into the event store, so that
            a client can resume with ``Last-Event-ID``, a retried POST with the same
            ``Idempotency-Key`` attaches instead of starting again, and the stream can be
            cancelled (see ``docs/resume.md`` and :mod:`sanic_streamplus.resume`).
        require_json: answer 400 before calling the handler if the body is not a JSON document
            (not for a ``GET``, which has none: on a route that also accepts ``GET``, for an
            ``EventSource``, the handler sees ``request.json`` None).
        event_schema: the schema of each event's data, for the OpenAPI document only (events
            are not checked): a dataclass, pydantic or msgspec model (rendered by sanic-ext as
            it renders a body model), or a dict (an OpenAPI schema object).
        on_finish: a hook, or hooks, called with a :class:`~sanic_streamplus.observe.StreamInfo`
            once per stream (outcome and stats), before the app-wide ones; a hook marked
            :func:`~sanic_streamplus.observe.before_final_frame` runs before the terminating
            frame is written (see :mod:`sanic_streamplus.observe`).

    Raises:
        ValueError: at decoration time, for an unknown format, dialect, policy or failover
            mode, or a negative ``max_continuations``.
        TypeError: at decoration time, for an ``event_schema`` that is neither a class nor a
            dict.
        RuntimeError: at server start, for a sanic-ext ``@validate`` above ``@stream_post``
            (see :func:`~sanic_streamplus.openapi.prepare_stream_routes`), or for a route
            that does not accept ``POST`` (``@app.get``, say) unless ``require_json=False``
            (a stream that takes no body, for an ``EventSource``).
    """
    if format is not None:
        get_format(format)
    if dialect is not None:
        get_dialect(dialect)
    if slow_client is not None and slow_client not in SLOW_CLIENT_POLICIES:
        raise ValueError(f"slow_client must be one of {SLOW_CLIENT_POLICIES}, not {slow_client!r}")
    if failover is not None and failover not in FAILOVER_MODES:
        raise ValueError(f"failover must be one of {FAILOVER_MODES}, not {failover!r}")
    if max_continuations is not None and max_continuations < 0:
        raise ValueError(f"max_continuations must be 0 or more, not {max_continuations!r}")
    if event_schema is not None and not isinstance(event_schema, (type, Mapping)):
        raise TypeError(f"event_schema must be a model class or a dict, not {event_schema!r}")
    overrides: dict[str, Any] = {
        "format": format,
        "dialect": dialect,
        "high_water_mark": high_water_mark,
        "slow_client": slow_client,
        "failover": failover,
        "max_continuations": max_continuations,
    }
    if heartbeat is not _UNSET:
        overrides["heartbeat"] = heartbeat
    hooks: list[Hook] = (
        [] if on_finish is None else [on_finish] if callable(on_finish) else [*on_finish]
    )

    def decorate(handler: Handler) -> Handler:
        route = _Route(handler, overrides, hooks, resumable, require_json)

        @functools.wraps(handler)
        async def wrapper(request: Request, *args: Any, **kwargs: Any) -> HTTPResponse | None:
            return await _serve(route, request, args, kwargs)

        wrapper.__streamplus__ = True  # type: ignore[attr-defined]
        wrapper.__streamplus_json__ = require_json  # type: ignore[attr-defined]  # needs POST
        wrapper.__streamplus_dialect__ = dialect  # type: ignore[attr-defined]  # its errors' shape
        wrapper.is_stream = True  # type: ignore[attr-defined]  # Sanic leaves the body to us
        document(wrapper, handler, format, event_schema)
        return wrapper  # type: ignore[return-value]

    if handler is not None:
        return decorate(handler)
    return decorate


async def resume_stream(request: Request, stream_id: str) -> HTTPResponse | None:
    """``GET <STREAMPLUS_RESUME_PATH>/<stream_id>``: read a resumable stream from the start, or
    after the ``Last-Event-ID`` header (``<stream>:<seq>``, as EventSource sends it on
    reconnect), then live, in the format and dialect of the route that started it (the
    ``format`` and ``dialect`` query arguments override them).

    Answers 404 ``stream_not_found``, 410 ``stream_expired`` or ``events_expired`` before
    anything is sent when it cannot replay without a gap, and 503 ``too_many_streams`` (with
    ``Retry-After``) when ``max_streams`` streams are open in this worker: a reader holds a
    connection and a place as a live stream does.
    """
    state = getattr(request.app.ctx, "streamplus", None)
    if state is None or state.resumer is None:
        return error_response(ExtensionMissing())
    if len(state.streams) >= state.settings.max_streams:
        return error_response(TooManyStreams(state.settings.max_streams, 1))
    token = object()  # its place under max_streams until the relay takes it over
    state.streams.add(token)
    try:
        after = 0
        last_event_id = request.headers.get("last-event-id")
        if last_event_id:
            named, after = parse_last_event_id(last_event_id)
            if named != stream_id:
                raise InvalidRequest("the Last-Event-ID names another stream")
        record = await state.resumer.check(stream_id, after)
        overrides = {name: request.args.get(name) or record.info.get(name) for name in _FRAMING}
        options = _options(request, state.settings, overrides)
    except ValueError as exc:  # an unknown format or dialect
        return error_response(InvalidRequest(str(exc)))
    except Exception as exc:
        return _refusal(exc)
    finally:
        state.streams.discard(token)
    events = state.resumer.events(stream_id, after)
    watch = _watch(state, request, options, (), stream_id)
    return await relay(request, events, options, state.streams, {"X-Stream-Id": stream_id}, watch)


async def cancel_stream(request: Request, stream_id: str) -> HTTPResponse:
    """``DELETE <STREAMPLUS_RESUME_PATH>/<stream_id>``: cancel a running resumable stream in
    whatever worker produces it (202 ``{"stream_id", "cancelled": true}``); 409
    ``stream_finished`` if it has finished (``GET`` still replays it); 404 or 410 if it is
    unknown, malformed or expired, as ``GET`` answers; 503 ``store_unavailable`` if the store
    cannot be reached."""
    state = getattr(request.app.ctx, "streamplus", None)
    if state is None or state.resumer is None:
        return error_response(ExtensionMissing())
    resumer: Resumer = state.resumer
    try:
        if not await resumer.cancel(stream_id):
            # no running stream: finished, or the 404 or 410 of GET
            record = await resumer.store.record(stream_id) if is_stream_id(stream_id) else None
            record = record or await resumer.check(stream_id, 0)
            finished = StreamFinished(stream_id, record.state) if record.finished else None
            return error_response(finished or StreamNotFound(stream_id[:100]))
    except Exception as exc:
        return _refusal(exc)
    return json_response({"stream_id": stream_id, "cancelled": True}, status=202)
