"""The upstream side: the shared ``httpx.AsyncClient`` and streaming requests that yield events.

``stream_events()`` opens one streaming request, checks that the answer is an event stream, feeds
the body to an :class:`~sanic_streamplus.sse.SSEDecoder` and yields its events. Every upstream
failure becomes a typed :class:`~sanic_streamplus.errors.UpstreamError`; the upstream response is
closed the moment the consumer stops (end, break, exception or cancellation), and the close
completes even if a second cancellation lands while it runs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from http.cookiejar import Cookie, CookieJar
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream

try:
    from httpx_aiohttp.transport import map_aiohttp_exceptions
except ImportError:  # pragma: no cover - a version without it: the aiohttp error's own name
    map_aiohttp_exceptions = None  # type: ignore[assignment]

from ._aio import Deadline, close_completely
from .config import Settings, display_url
from .errors import (
    ConnectTimeout,
    EventTooLarge,
    ExtensionMissing,
    FirstEventTimeout,
    IdleTimeout,
    StreamPlusError,
    TotalTimeout,
    UpstreamBadResponse,
    UpstreamDisconnected,
    UpstreamErrorEvent,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamTruncated,
    UpstreamUnreachable,
    error_fields,
)
from .framing import Dialect, EventKind, get_dialect
from .sse import ServerSentEvent, SSEDecoder

__all__ = ["UpstreamEvents", "create_client", "stream_events", "upstream_events"]

logger = logging.getLogger("sanic_streamplus")
_ERROR_BODY_LIMIT = 2048  # bytes of a non-2xx upstream body read, for the log and its error


class _NoCookies(CookieJar):
    """A cookie jar that stores nothing, so it never sends anything either: the shared client
    serves every user, and an upstream's ``Set-Cookie`` for one must not reach the next.
    (httpx has no switch for this; every way into a ``CookieJar`` goes through ``set_cookie``.)"""

    def set_cookie(self, cookie: Cookie) -> None:
        return None


def _aiohttp_transport(limits: httpx.Limits) -> AiohttpTransport:
    """httpx-aiohttp's transport, on an aiohttp session that keeps no cookies (aiohttp's
    ``ClientSession`` has a jar of its own, under httpx's) and is made as httpx-aiohttp makes
    it otherwise: the connection limit and keep-alive expiry of ``limits``."""
    transport = AiohttpTransport(limits=limits)

    def session() -> aiohttp.ClientSession:  # called in the loop, at the first request
        connector = aiohttp.TCPConnector(
            limit=limits.max_connections or 0,
            keepalive_timeout=limits.keepalive_expiry,
            ssl=transport.ssl_context,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    transport.client = session
    return transport


def create_client(settings: Settings) -> httpx.AsyncClient:
    """Build the shared upstream client from ``settings``.

    The client's base URL is ``settings.upstream_url``; ``settings.upstream_api_key`` is sent as
    ``Authorization: Bearer``. Its read timeout is off: the first-event, idle and total timeouts
    of :func:`stream_events` replace it, because they must not count time spent waiting for a slow
    client to drain. ``settings.transport`` picks what carries the requests: ``aiohttp``
    (httpx-aiohttp's ``AiohttpTransport``) or ``httpcore`` (httpx's own). It keeps no cookie
    (httpx's jar and aiohttp's both store nothing): an upstream's ``Set-Cookie`` is neither
    kept nor sent back, to anyone.
    """
    headers = {"Accept": "text/event-stream"}
    if settings.upstream_api_key:
        headers["Authorization"] = f"Bearer {settings.upstream_api_key}"
    connect = settings.connect_timeout
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=min(settings.max_connections, 100),
    )
    transport = _aiohttp_transport(limits) if settings.transport == "aiohttp" else None
    return httpx.AsyncClient(
        base_url=settings.upstream_url or "",
        headers=headers,
        cookies=_NoCookies(),
        timeout=httpx.Timeout(connect=connect, read=None, write=connect, pool=connect),
        limits=limits,
        transport=transport,
    )


def _timed_out(exc: httpx.TimeoutException) -> bool:
    """True if a connect-phase ``TimeoutException`` really is a timeout.

    httpx-aiohttp maps every aiohttp ``ClientConnectionError`` (a refused connection included)
    to ``httpx.ConnectTimeout``; its cause tells a real timeout from a refusal.
    """
    cause = exc.__cause__
    return cause is None or isinstance(cause, asyncio.TimeoutError)


def _later(now: float, limit: float | None, total_at: float | None) -> float | None:
    at = None if limit is None else now + limit
    if total_at is not None and (at is None or total_at < at):
        return total_at
    return at


def stream_events(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    settings: Settings,
    json: Any = None,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    dialect: Dialect | None = None,
) -> UpstreamEvents:
    """Open a streaming request on ``client`` and yield the events of its answer.

    The request is built and sent with httpx (the client's auth, headers, limits and
    transport). The body is read from the aiohttp response underneath when the client's
    transport is httpx-aiohttp's and the body is not content-encoded (one layer of iterators
    fewer per read); else through httpx's own iterators. Both behave the same.

    Args:
        client: the shared ``httpx.AsyncClient``.
        method: HTTP method, e.g. ``"POST"``.
        url: absolute URL, or a path joined to the client's base URL.
        settings: timeouts (``first_event_timeout``, ``idle_timeout``, ``total_timeout``, seconds)
            and ``max_event_size``, ``max_line_length`` (bytes).
        json: a JSON-serialisable request body, or None.
        content: a raw request body (bytes), or None.
        headers: extra request headers; nothing of the downstream request is forwarded unless
            passed here.
        dialect: the upstream's :class:`~sanic_streamplus.framing.Dialect`, to check the
            stream's integrity (:meth:`~sanic_streamplus.framing.Dialect.end_kind`): its error
            event raises, its terminal event is the last one yielded (nothing after it is
            read), and an end without one raises unless the dialect accepts it
            (:meth:`~sanic_streamplus.framing.Dialect.complete_without_end`). None: no check.

    Returns:
        an :class:`UpstreamEvents`: an async iterator of :class:`ServerSentEvent`, in stream
        order (nothing is sent before the first ``__anext__``); ``aclose()`` closes the
        upstream response.

    Raises (while iterating):
        UpstreamUnreachable: the connection could not be made.
        UpstreamTimeout: one subclass per phase: :class:`ConnectTimeout`,
            :class:`FirstEventTimeout`, :class:`IdleTimeout` (upstream comments, keep-alives
            included, do not reset it: only events do) or :class:`TotalTimeout`.
        UpstreamStatusError: the upstream answered non-2xx (``retry_after`` kept for a 429).
        UpstreamBadResponse: the answer is not ``text/event-stream``.
        UpstreamDisconnected: the connection broke in the middle of the body.
        EventTooLarge: one event exceeded ``settings.max_event_size``; its subclass
            ``LineTooLong``: one line exceeded ``settings.max_line_length``.
        UpstreamErrorEvent: (with ``dialect``) the upstream sent its error event.
        UpstreamTruncated: (with ``dialect``) the stream ended without its terminal event.
    """
    request = client.build_request(method, url, json=json, content=content, headers=headers)
    return UpstreamEvents(client, request, settings, dialect)


class UpstreamEvents(AsyncIterator[ServerSentEvent]):
    """The events of one upstream answer (what :func:`stream_events` returns): an async
    iterator of :class:`ServerSentEvent` with ``aclose()``.

    A relay that drives the stream in the same dialect may take the events already
    classified instead, a read's worth at a time (:meth:`classified`), so that each event is
    classified once.

    Attributes:
        dialect: the name of the dialect the stream is checked in, or None (no check).
    """

    __slots__ = ("_client", "_dialect", "_events", "_request", "_settings", "dialect")

    def __init__(
        self,
        client: httpx.AsyncClient,
        request: httpx.Request,
        settings: Settings,
        dialect: Dialect | None,
    ) -> None:
        self._client, self._request, self._settings = client, request, settings
        self._dialect = dialect
        self.dialect = None if dialect is None else dialect.name
        self._events: AsyncGenerator[Any, None] | None = None

    def _open(self, batches: bool) -> AsyncGenerator[Any, None]:
        if self._events is not None:
            raise RuntimeError("the upstream stream is being read already")
        client, request, settings = self._client, self._request, self._settings
        self._events = _events(client, request, settings, self._dialect, batches)
        return self._events

    def __aiter__(self) -> UpstreamEvents:
        return self

    def __anext__(self) -> Awaitable[ServerSentEvent]:
        events = self._events if self._events is not None else self._open(False)
        return events.__anext__()

    async def aclose(self) -> None:
        """Stop reading: the upstream response is closed, completely."""
        if self._events is not None:
            await self._events.aclose()

    def classified(
        self, dialect: str
    ) -> AsyncIterator[list[tuple[ServerSentEvent, EventKind]]] | None:
        """The events classified already, one upstream read at a time: lists of
        ``(event, kind)`` pairs (``kind``: :meth:`~sanic_streamplus.framing.Dialect.end_kind`'s;
        never an empty list), when the stream is checked in the dialect named ``dialect`` and
        its iteration has not started (the same rules; closing it closes the upstream); else
        None. A relay takes a read's events in one step this way, not one ``__anext__``
        each."""
        if dialect != self.dialect or self._events is not None:
            return None
        return self._open(True)


async def _events(
    client: httpx.AsyncClient,
    request: httpx.Request,
    settings: Settings,
    dialect: Dialect | None,
    batches: bool,
) -> AsyncGenerator[Any, None]:
    """:func:`stream_events`' events, or (``batches``) one list of ``(event, kind)`` pairs per
    upstream read (see :meth:`UpstreamEvents.classified`), checked by a :class:`_Check`; the
    idle deadline moves with each read that completes an event. The response is closed,
    completely, whatever happens."""
    deadline = Deadline()
    total_at = None if settings.total_timeout is None else deadline.now() + settings.total_timeout
    response: httpx.Response | None = None
    body: _Body | None = None
    try:
        response = await _send(client, request, deadline, settings, total_at)
        body = _Body(response, deadline, settings, total_at)
        read, feed = body.read, SSEDecoder(settings.max_event_size, settings.max_line_length).feed
        check = _Check(dialect)
        while chunk := await read():
            try:
                checked = check.pairs(feed(chunk))
            except EventTooLarge as exc:  # what came before it, unchecked; then the error
                checked, check.error = [(event, check.kind(event)) for event in exc.events], exc
            if batches:
                if checked:
                    yield checked
            else:
                for event, _ in checked:
                    yield event
            if check.error is not None:
                raise check.error
            if check.ended:
                return
            if checked:
                body.moved()
        check.source_ended()
    finally:
        deadline.close()
        if response is not None:
            await close_completely(_close(body, response))


class _Check:
    """The integrity check of one upstream stream in ``dialect``
    (:meth:`~sanic_streamplus.framing.Dialect.end_kind`), one read's events at a time; with
    no dialect, no check (every event OTHER, any end complete).

    Attributes:
        error: the upstream's error event as :class:`~sanic_streamplus.errors.UpstreamErrorEvent`
            (or the ``EventTooLarge`` its decoder raised) once there is one, else None.
        ended: the terminal event went by (nothing after it is read).
    """

    __slots__ = ("_dialect", "_finished", "ended", "error", "kind")

    def __init__(self, dialect: Dialect | None) -> None:
        self._dialect = dialect
        self.kind: Callable[[ServerSentEvent], EventKind] = (
            _unchecked if dialect is None else dialect.end_kind
        )
        self._finished = False  # a FINISH event went by (OpenAI chat: complete without [DONE])
        self.error: StreamPlusError | None = None
        self.ended = False

    def pairs(self, events: list[ServerSentEvent]) -> list[tuple[ServerSentEvent, EventKind]]:
        """``events`` with their kinds, up to the end of the stream: up to and with the
        terminal event (then :attr:`ended`), or up to the upstream's error event (not
        included: :attr:`error` is set)."""
        kind_of = self.kind
        out: list[tuple[ServerSentEvent, EventKind]] = []
        for event in events:
            kind = kind_of(event)
            if kind is EventKind.UPSTREAM_ERROR:
                assert self._dialect is not None  # (no dialect: every event is OTHER)
                self.error = UpstreamErrorEvent.from_event(event, self._dialect.name)
                break
            out.append((event, kind))
            if kind is EventKind.FINISH:
                self._finished = True
            elif kind is EventKind.TERMINAL:
                self.ended = True
                break
        return out

    def source_ended(self) -> None:
        """The body ended without the terminal event.

        Raises:
            UpstreamTruncated: the dialect does not take that end as complete.
        """
        dialect = self._dialect
        if dialect is not None and not dialect.complete_without_end(self._finished):
            raise UpstreamTruncated(dialect.name)


def _unchecked(event: ServerSentEvent) -> EventKind:
    """The kind of every event of a stream checked in no dialect."""
    return EventKind.OTHER


def _timeout(settings: Settings, total_at: float | None, first: bool) -> UpstreamTimeout:
    """The timeout that passed: the total one, else the first-event or the idle one."""
    if total_at is not None and asyncio.get_running_loop().time() >= total_at:
        return TotalTimeout(settings.total_timeout or 0.0)
    if first:
        return FirstEventTimeout(settings.first_event_timeout or 0.0)
    return IdleTimeout(settings.idle_timeout or 0.0)


async def _send(
    client: httpx.AsyncClient,
    request: httpx.Request,
    deadline: Deadline,
    settings: Settings,
    total_at: float | None,
) -> httpx.Response:
    """Send ``request`` within the first-event deadline and check the answer: a 2xx event
    stream (see :func:`stream_events` for the errors)."""
    deadline.set(_later(deadline.now(), settings.first_event_timeout, total_at))
    try:
        response: httpx.Response = await deadline.guard(client.send(request, stream=True))
    except TimeoutError:
        raise _timeout(settings, total_at, True) from None
    except httpx.TimeoutException as exc:  # connect, pool or write: read timeout is off
        if not _timed_out(exc):
            _log_unreachable(request, exc.__cause__ or exc)
            raise UpstreamUnreachable(
                f"upstream unreachable ({type(exc.__cause__).__name__})"
            ) from None
        _log_unreachable(request, exc, settings.connect_timeout)
        raise ConnectTimeout(settings.connect_timeout or 0.0) from None
    except httpx.TransportError as exc:
        _log_unreachable(request, exc)
        raise UpstreamUnreachable(f"upstream unreachable ({type(exc).__name__})") from None
    try:
        if not response.is_success:
            raise await _refusal(response, deadline, settings.upstream_api_key)
        content_type = response.headers.get("content-type", "")
        if not content_type.lower().startswith("text/event-stream"):
            raise UpstreamBadResponse(
                f"upstream answered {content_type or 'no content type'}, not text/event-stream",
                upstream_status=response.status_code,
            )
    except BaseException:
        await close_completely(response.aclose())
        raise
    return response


class _Body:
    """The body of an upstream response, read within the stream's deadlines: ``read()``
    returns the next bytes (b"" at the end), or raises ``UpstreamDisconnected`` (the
    connection broke) or the ``UpstreamTimeout`` that passed.

    httpx-aiohttp (0.1.9 .. 0.2.x) wraps the aiohttp ``ClientResponse`` in its
    ``AiohttpResponseStream`` (``_aiohttp_response``), itself in httpx's ``BoundAsyncStream``
    (``_stream``); it asks aiohttp not to decompress. So for a body without content encoding,
    the bytes come from the aiohttp ``StreamReader.readany`` (what is buffered, as it came),
    and aiohttp's payload and connection errors (which httpx-aiohttp maps to
    ``httpx.TransportError``) mean a broken connection; for any other transport or encoding,
    httpx's iterators (``aiter_raw``, or ``aiter_bytes`` to decode) and
    ``httpx.TransportError``.
    """

    __slots__ = (
        "_first",
        "_next",
        "_status",
        "chunks",
        "deadline",
        "errors",
        "native",
        "settings",
        "total_at",
    )

    def __init__(
        self,
        response: httpx.Response,
        deadline: Deadline,
        settings: Settings,
        total_at: float | None,
    ) -> None:
        self.deadline, self.settings, self.total_at = deadline, settings, total_at
        self._status = response.status_code
        self._first = True  # no event yet: the first-event timeout applies
        self.chunks: AsyncIterator[bytes] | None = None
        self._next: Callable[[], Awaitable[bytes]]
        self.errors: tuple[type[BaseException], ...]
        self.native = native = _aiohttp_body(response)  # the fast path's reader, or None
        if native is not None:
            self._next, self.errors = native.readany, _AIOHTTP_ERRORS
            return
        encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
        self.chunks = response.aiter_bytes() if encoded else response.aiter_raw()
        self._next = functools.partial(_next_or_empty, self.chunks.__anext__)
        self.errors = (httpx.TransportError,)

    async def read(self) -> bytes:
        """The next bytes of the body; b"" at its end.

        Raises:
            UpstreamDisconnected: the connection broke (the transport's errors are looked at
                first: some are ``TimeoutError``).
            UpstreamTimeout: the first-event, idle or total timeout passed.
        """
        deadline = self.deadline  # (its guard() inline: one coroutine fewer per read)
        try:
            deadline.enter()
            chunk: bytes = await self._next()
        except self.errors as exc:
            raise UpstreamDisconnected(
                f"upstream connection broke mid-stream ({_httpx_name(exc)})",
                upstream_status=self._status,
            ) from None
        except TimeoutError:
            raise _timeout(self.settings, self.total_at, self._first) from None
        except asyncio.CancelledError:
            if deadline.expired():
                raise _timeout(self.settings, self.total_at, self._first) from None
            raise
        finally:
            deadline.leave()
        return chunk

    def moved(self) -> None:
        """An event arrived: the idle deadline starts again (the total one stays)."""
        self._first = False
        self.deadline.set(_later(self.deadline.now(), self.settings.idle_timeout, self.total_at))


async def _next_or_empty(next_chunk: Callable[[], Awaitable[bytes]]) -> bytes:
    """The next chunk of an httpx byte iterator, or b"" at its end (it yields no empty chunk)."""
    try:
        return await next_chunk()
    except StopAsyncIteration:
        return b""


# what httpx-aiohttp maps to httpx.TransportError (ServerTimeoutError and every connection
# error are ClientConnectionError)
_AIOHTTP_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
)


def _aiohttp_body(response: httpx.Response) -> aiohttp.StreamReader | None:
    """The aiohttp ``StreamReader`` of an httpx-aiohttp response whose body is not content
    encoded (see :class:`_Body`); None for any other."""
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        return None
    stream = getattr(response.stream, "_stream", None)  # httpx's BoundAsyncStream
    if not isinstance(stream, AiohttpResponseStream):
        return None
    native = getattr(stream, "_aiohttp_response", None)
    if not isinstance(native, aiohttp.ClientResponse):
        return None
    content = getattr(native, "content", None)
    return content if isinstance(content, aiohttp.StreamReader) else None


def _httpx_name(exc: BaseException) -> str:
    """The name of the httpx error httpx-aiohttp makes of an aiohttp one (``ReadError`` for a
    body cut short), so that both paths report alike; an httpx error's own name."""
    if isinstance(exc, httpx.HTTPError) or map_aiohttp_exceptions is None:
        return type(exc).__name__
    try:
        with map_aiohttp_exceptions():
            raise exc
    except httpx.HTTPError as mapped:
        return type(mapped).__name__
    except BaseException:
        return type(exc).__name__


def _log_unreachable(
    request: httpx.Request, exc: BaseException, timeout: float | None = None
) -> None:
    """Log a connection to the upstream that could not be made: the URL (without user info or
    query string: see :func:`~sanic_streamplus.config.display_url`) and why; ``timeout`` is the
    connect timeout (seconds) when that is why."""
    if timeout:
        reason = f"no connection within {timeout:g} s"
    elif isinstance(exc, httpx.UnsupportedProtocol) and not request.url.scheme:
        reason = "a path, and no STREAMPLUS_UPSTREAM_URL to join it to"
    else:
        reason = _reason(exc)
    logger.warning(
        "upstream %s %s unreachable: %s", request.method, display_url(str(request.url)), reason
    )


def _reason(exc: BaseException) -> str:
    """What an error of the connect phase says, without a URL that may carry a secret."""
    cause: BaseException | None = exc
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:  # the OS' own words when there
        if isinstance(cause, OSError) and cause.strerror:  # ECONNREFUSED, a DNS failure
            return f"{type(exc).__name__}: {cause.strerror}"
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.UnsupportedProtocol):
        return "not an http:// or https:// URL"
    return type(exc).__name__


async def _refusal(
    response: httpx.Response, deadline: Deadline, secret: str | None
) -> UpstreamStatusError:
    """The error for a non-2xx upstream answer, from its status, its ``Retry-After`` and the
    start of its body (at most ``_ERROR_BODY_LIMIT`` bytes, read within the same deadline),
    which is logged with the upstream URL."""

    async def head() -> bytes:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) >= _ERROR_BODY_LIMIT:
                break
        return bytes(body[:_ERROR_BODY_LIMIT])

    try:
        body = await deadline.guard(head())
    except (TimeoutError, httpx.HTTPError):
        body = b""
    text = body.decode("utf-8", "replace")
    if secret:
        text = text.replace(secret, "***")  # an upstream that echoes the key gives it to no one
    logger.warning(
        "upstream %s %s answered %d: %s",
        response.request.method,
        display_url(str(response.request.url)),
        response.status_code,
        text,
    )
    return UpstreamStatusError(
        response.status_code,
        retry_after=response.headers.get("retry-after"),
        **_error_fields(text),
    )


def _error_fields(text: str) -> dict[str, Any]:
    """The message, type, code and param of a JSON error body
    (:func:`~sanic_streamplus.errors.error_fields`); empty for any other body."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return error_fields(value)


async def _close(body: _Body | None, response: httpx.Response) -> None:
    if body is not None and body.chunks is not None:
        await body.chunks.aclose()  # type: ignore[attr-defined]
    await response.aclose()  # (httpx-aiohttp: releases the aiohttp response, closing its
    # connection unless the body was read to its end)


def upstream_events(
    request: Any,
    url: str,
    *,
    method: str = "POST",
    json: Any = None,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    dialect: str | None = None,
    upstreams: Sequence[str] | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """Stream the events of an upstream request on the app's shared client.

    The usual body of a ``@stream_post`` handler: ``return upstream_events(request, "/chat",
    json=request.json)``. Uses the client and settings of the StreamPlus extension of
    ``request.app``; ``url`` is joined to ``STREAMPLUS_UPSTREAM_URL`` unless absolute. Of the
    downstream request's headers, only those named in ``STREAMPLUS_FORWARD_HEADERS`` are sent
    upstream (none by default: not ``Authorization``, not ``Cookie``); ``headers`` are added on
    top. See :func:`stream_events` for what it yields and raises.

    ``dialect`` is the upstream's dialect (``"plain"``, ``"openai"``, ``"anthropic"``,
    ``"openai-responses"``), by which the stream's integrity is checked; by default the route's
    own (``@stream_post(dialect=...)``, left on ``request.ctx.streamplus_dialect``), and on a
    route without ``@stream_post``, ``STREAMPLUS_DIALECT`` (``plain`` unless set: then only an
    ``event: error`` is an error, and any end is complete). So iterating it yourself:

    - the upstream's error event (OpenAI's ``data: {"error": ...}``, Anthropic's ``event:
      error``, the Responses API's ``response.failed`` / ``error``) raises
      :class:`~sanic_streamplus.errors.UpstreamErrorEvent` (its ``upstream_type``,
      ``upstream_code``, ``message`` and the raw ``event``), which you may catch;
    - a stream that ends without its terminal event (OpenAI chat: neither ``[DONE]`` nor a
      ``finish_reason``; Anthropic: no ``message_stop``; Responses: no ``response.completed``
      / ``incomplete`` / ``failed``) raises :class:`~sanic_streamplus.errors.UpstreamTruncated`
      at the end of the iteration;
    - the terminal event is the last one yielded.

    Returned from a ``@stream_post`` handler, the relay turns both into the stream's ending: the
    upstream's own error frame where the route's dialect is the upstream's, else the route's
    error frame (a JSON answer before anything was sent; see ``docs/errors.md``).

    With several upstreams (``STREAMPLUS_UPSTREAMS``), ``url`` is joined to each one's base URL
    and they are tried in order (``upstreams``: the names to try, in that order; default all,
    in config order): an upstream that fails before its first content event is replaced by the
    next (:func:`~sanic_streamplus.failover.failover_events`; ``docs/failover.md``), and each one
    asked is an ``Attempt`` in ``StreamInfo.attempts``.

    The request is noted on ``request.ctx.streamplus_upstream`` (with the iterator returned):
    a resumable route that returns this iterator as it is can be handed over to another
    worker when its own stops (:class:`~sanic_streamplus.failover.Handover`).

    Raises:
        ExtensionMissing: the app has not registered the StreamPlus extension, or its server has
            not started.
        ValueError: an unknown ``dialect``, or a name of ``upstreams`` that is not configured.
    """
    state = getattr(request.app.ctx, "streamplus", None)
    if state is None or state.pool is None:
        raise ExtensionMissing()
    settings: Settings = state.settings
    if settings.forward_headers:
        forwarded = {
            name: request.headers[name]
            for name in settings.forward_headers
            if name in request.headers
        }
        headers = {**forwarded, **(headers or {})}
    name = dialect or getattr(request.ctx, "streamplus_dialect", None) or settings.dialect
    members = state.pool.select(upstreams)
    source: AsyncIterator[ServerSentEvent]
    if len(members) > 1:
        from .failover import failover_events  # it builds on this module

        attempts = getattr(request.ctx, "streamplus_attempts", None)
        default = (settings.failover, settings.max_continuations)
        mode, budget = getattr(request.ctx, "streamplus_failover", default)
        source = failover_events(
            members,
            method,
            url,
            dialect=get_dialect(name).name,
            attempts=[] if attempts is None else attempts,
            json=json,
            content=content,
            headers=headers,
            failover=mode,
            max_continuations=budget,
            instruction=settings.continue_instruction,
        )
    else:
        source = stream_events(
            members[0].client,
            method,
            url,
            settings=settings,
            json=json,
            content=content,
            headers=headers,
            dialect=get_dialect(name),
        )
    # the request, for a resumable stream's handover when this source is the handler's own
    call = {"method": method, "url": url, "json": json, "content": content, "headers": headers}
    call.update(dialect=get_dialect(name).name, upstreams=upstreams)
    request.ctx.streamplus_upstream = (source, call)
    return source
