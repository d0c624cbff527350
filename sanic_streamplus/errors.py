"""The exception tree, and how each error shows on the wire.

Catch the class that says what you can act on::

    StreamPlusError                  base of everything this package raises
    ├── InvalidRequest               the downstream request is bad (400, or a Sanic error's 4xx)
    │   └── BodyTooLarge             the request body is over ``max_body_size`` (413)
    ├── TooManyStreams               ``max_streams`` streams are open already (503, Retry-After)
    │   └── TooManyProducers         ``max_producers`` resumable streams are running already
    ├── EventTooLarge                an SSE event grew past the decoder's maximum event size
    │   └── LineTooLong              an upstream line grew past the maximum line length
    ├── UpstreamError                the upstream failed; carries the upstream HTTP status if any
    │   ├── UpstreamUnreachable      connecting to the upstream failed
    │   ├── UpstreamStatusError      the upstream answered a non-2xx status (429 is passed through)
    │   ├── UpstreamBadResponse      the upstream answered 2xx but not ``text/event-stream``
    │   ├── UpstreamDisconnected     the upstream broke the connection in the middle of the body
    │   ├── UpstreamTruncated        the upstream's stream ended without its dialect's end event
    │   ├── UpstreamErrorEvent       the upstream reported an error in its stream (an error event)
    │   ├── UpstreamsUnavailable     every upstream of the route is kept out by its breaker (503)
    │   └── UpstreamTimeout          an upstream timeout expired (504); one class per phase:
    │       ├── ConnectTimeout           connecting
    │       ├── FirstEventTimeout        from the request to the first event
    │       ├── IdleTimeout              between two events (comments do not count)
    │       └── TotalTimeout             the whole stream
    ├── DownstreamError              the client side failed after the commit point
    │   ├── SendTimeout              the client did not drain for ``send_timeout`` seconds
    │   └── SlowClient               the client fell a high-water mark behind (``disconnect``)
    ├── ServerShutdown               the server is stopping (503 before the commit point)
    ├── StoreUnavailable             the event store (Redis) cannot be reached (503, Retry-After)
    ├── ResumeError                  a resumable stream cannot be read as asked
    │   ├── StreamNotFound           no stream has this ID (404)
    │   ├── StreamExpired            the stream expired from the event store (410)
    │   ├── EventsExpired            the events after the Last-Event-ID were dropped (410)
    │   ├── StreamCancelled          the stream was cancelled (409)
    │   ├── StreamFinished           a cancel came after the stream finished (409)
    │   └── ProducerLost             the stream's producer died without finishing (502)
    ├── ReplayedError                the error a resumable stream's producer stored
    └── ExtensionMissing             ``@stream_post`` used on an app without ``StreamPlus``

Each error has an HTTP ``status`` (used before the commit point, when the response status can
still change) and a short machine-readable ``type`` (used in the JSON body and in error frames
after the commit point). See ``docs/errors.md`` for the wire format in each phase.

This module is plain Python (it imports nothing of Sanic, sanic-ext, httpx or aiohttp), so the
sans-IO codec can raise these errors; how a Sanic exception maps onto them is
:func:`sanic_streamplus.relay.to_stream_error`, beside the Sanic side.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "BodyTooLarge",
    "ConnectTimeout",
    "DownstreamError",
    "EventTooLarge",
    "EventsExpired",
    "ExtensionMissing",
    "FirstEventTimeout",
    "IdleTimeout",
    "InvalidRequest",
    "LineTooLong",
    "ProducerLost",
    "ReplayedError",
    "ResumeError",
    "SendTimeout",
    "ServerShutdown",
    "SlowClient",
    "StoreUnavailable",
    "StreamCancelled",
    "StreamExpired",
    "StreamFinished",
    "StreamNotFound",
    "StreamPlusError",
    "TooManyProducers",
    "TooManyStreams",
    "TotalTimeout",
    "UpstreamBadResponse",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamErrorEvent",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "UpstreamTruncated",
    "UpstreamUnreachable",
    "UpstreamsUnavailable",
    "error_body",
    "error_fields",
    "error_record",
]


class StreamPlusError(Exception):
    """Base class of every error raised by sanic-streamplus.

    Attributes:
        status: HTTP status (int) the error maps to before the commit point.
        type: short machine-readable error type (str), used in JSON bodies and error frames.
        message: human-readable message (str); never contains a stack trace or a secret.
        upstream_status: the upstream's HTTP status (int) when one is known, else None.
        outcome: the outcome of a stream that ends with it (str, a
            :class:`~sanic_streamplus.machine.Outcome` value), e.g. ``timeout``.
        retry_after: seconds (str) for a ``Retry-After`` header on the JSON error, or None.
    """

    status: int = 500
    type: str = "internal_error"
    retry_after: str | None = None

    @property
    def outcome(self) -> str:
        """The outcome of a stream that ends with this error:
        :func:`sanic_streamplus.machine.outcome_for` (one list: ``timeout`` for every
        timeout, ``rate_limited`` for an upstream 429, ...)."""
        from .machine import outcome_for  # the machine imports this module

        return str(outcome_for(self))

    def __init__(self, message: str, *, upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.upstream_status = upstream_status


class InvalidRequest(StreamPlusError):
    """The downstream request is bad: not JSON, or refused by the handler with a 4xx.

    Attributes:
        status: 400 unless given (e.g. the status of a Sanic ``NotFound``).
    """

    status = 400
    type = "invalid_request"

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class BodyTooLarge(InvalidRequest):
    """The request body is larger than ``max_body_size`` bytes (HTTP 413, before reading it all).

    Attributes:
        limit: the maximum body size in bytes.
    """

    type = "body_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes", status=413)
        self.limit = limit


class TooManyStreams(StreamPlusError):
    """``max_streams`` streams are open in this worker already: HTTP 503 with ``Retry-After``.

    Attributes:
        limit: the maximum number of concurrent streams per worker.
    """

    status = 503
    type = "too_many_streams"

    def __init__(self, limit: int, retry_after: float) -> None:
        super().__init__(f"this server is at its limit of {limit} concurrent streams; retry later")
        self.limit = limit
        self.retry_after = str(max(1, round(retry_after)))


class TooManyProducers(TooManyStreams):
    """``max_producers`` producers of resumable streams are running (or starting) in this
    worker already, with or without a reader: HTTP 503 with ``Retry-After``, nothing opened.

    Attributes:
        limit: the maximum number of producers per worker.
    """

    type = "too_many_producers"

    def __init__(self, limit: int, retry_after: float) -> None:
        super().__init__(limit, retry_after)
        self.message = (
            f"this server is at its limit of {limit} running resumable streams; retry later"
        )
        self.args = (self.message,)


class EventTooLarge(StreamPlusError):
    """An SSE event grew past the maximum event size without being dispatched.

    Raised by :class:`sanic_streamplus.sse.SSEDecoder.feed` when the bytes of one event (its lines,
    line endings included, and any unterminated line) exceed ``max_event_size``. The decoder must
    not be fed again afterwards.

    Attributes:
        limit: the maximum event size in bytes.
        events: the events completed by the same ``feed()`` call before the limit was hit
            (a list of ``ServerSentEvent``), to be delivered before the error.
    """

    status = 502
    type = "event_too_large"

    def __init__(self, limit: int, events: list[Any] | None = None) -> None:
        super().__init__(f"an upstream event exceeded the maximum event size of {limit} bytes")
        self.limit = limit
        self.events = events or []


class LineTooLong(EventTooLarge):
    """One line of the upstream stream grew past the maximum line length without ending.

    Raised by :class:`sanic_streamplus.sse.SSEDecoder.feed`; like :class:`EventTooLarge`, the
    events completed before it are in ``events`` and the decoder must not be fed again.
    """

    type = "line_too_long"

    def __init__(self, limit: int, events: list[Any] | None = None) -> None:
        super().__init__(limit, events)
        self.message = f"an upstream line exceeded the maximum line length of {limit} bytes"
        self.args = (self.message,)


class UpstreamError(StreamPlusError):
    """The upstream service failed. Maps to HTTP 502 before the commit point."""

    status = 502
    type = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    """Connecting to the upstream failed (DNS, refused, TLS, ...)."""

    type = "upstream_unreachable"


class UpstreamStatusError(UpstreamError):
    """The upstream answered with a non-2xx status before its stream started.

    The status keeps its meaning for the client, so that SDKs raise the right class and do not
    retry a request that is at fault: a 429 stays a 429 (``retry_after`` copied to
    ``Retry-After``); 400, 401, 403, 404, 409, 413 and 422 keep their status (the request, its
    key or its model is at fault); any other status (5xx included) becomes a 502 that carries
    the upstream status in ``upstream_status``. When the upstream's body was a JSON error
    (OpenAI's ``{"error": {"message", "type", "param", "code"}}`` or Anthropic's ``{"type":
    "error", "error": {"type", "message"}}``), its message, type, code and param are kept,
    bounded in length and with the configured API key masked.

    Attributes:
        retry_after: the upstream's ``Retry-After`` header value (str), or None.
        upstream_type: the upstream's own error type (str, e.g. ``invalid_request_error``), or
            None.
        upstream_code: the upstream's own error code (str or int, e.g. ``model_not_found``), or
            None.
        upstream_param: the request parameter the upstream blamed (str), or None.
    """

    type = "upstream_status"
    KEPT_STATUSES = frozenset({400, 401, 403, 404, 409, 413, 422, 429})

    def __init__(
        self,
        upstream_status: int,
        *,
        retry_after: str | None = None,
        message: str | None = None,
        upstream_type: str | None = None,
        upstream_code: str | int | None = None,
        upstream_param: str | None = None,
    ) -> None:
        super().__init__(
            message or f"upstream answered HTTP {upstream_status}",
            upstream_status=upstream_status,
        )
        self.retry_after = retry_after
        self.upstream_type = upstream_type
        self.upstream_code = upstream_code
        self.upstream_param = upstream_param
        if upstream_status in self.KEPT_STATUSES:
            self.status = upstream_status
        if upstream_status == 429:
            self.type = "rate_limited"


class UpstreamBadResponse(UpstreamError):
    """The upstream answered 2xx, but its body is not an event stream."""

    type = "upstream_bad_response"


class UpstreamDisconnected(UpstreamError):
    """The upstream closed or reset the connection in the middle of the event stream."""

    type = "upstream_disconnected"


class UpstreamTruncated(UpstreamError):
    """The upstream's stream ended without the end its dialect requires (``[DONE]`` or a
    ``finish_reason`` for OpenAI chat, ``message_stop`` for Anthropic, ``response.completed``
    / ``incomplete`` / ``failed`` for the Responses API): the answer may be cut short.

    Attributes:
        dialect: the stream's dialect name (str).
    """

    type = "upstream_truncated"

    def __init__(self, dialect: str) -> None:
        super().__init__(f"the upstream's {dialect} stream ended without its end event")
        self.dialect = dialect


class UpstreamErrorEvent(UpstreamError):
    """The upstream reported an error inside its stream: an OpenAI-style ``data: {"error":
    {...}}`` (as LiteLLM sends), Anthropic's ``event: error``, the Responses API's
    ``response.failed`` or ``error``, or ``event: error`` in the ``plain`` dialect. Raised by
    :func:`~sanic_streamplus.upstream.upstream_events` at that event (nothing after it is read);
    a handler may catch it. Uncaught on a route of the same dialect, the upstream's own frame
    goes to the client as it came (then ``[DONE]`` for ``openai``); on a route of another
    dialect, that dialect's error frame with the upstream's message, type and code.

    Attributes:
        dialect: the upstream's dialect name (str), whose frame ``event`` is.
        event: the upstream's error event, as it came (a ``ServerSentEvent``).
        message: the upstream's message (at most 1,000 characters), or a generic one.
        upstream_type: the upstream's error type (str, e.g. ``overloaded_error``), or None.
        upstream_code: the upstream's error code (str or int), or None.
        upstream_param: the request parameter the upstream blamed (str), or None.
    """

    type = "upstream_error"

    def __init__(
        self,
        dialect: str,
        event: Any,
        *,
        message: str | None = None,
        upstream_type: str | None = None,
        upstream_code: str | int | None = None,
        upstream_param: str | None = None,
    ) -> None:
        super().__init__(message or "the upstream reported an error in its stream")
        self.dialect = dialect
        self.event = event
        self.upstream_type = upstream_type
        self.upstream_code = upstream_code
        self.upstream_param = upstream_param

    @classmethod
    def from_event(cls, event: Any, dialect: str) -> UpstreamErrorEvent:
        """The error ``event`` (a ``ServerSentEvent`` of ``dialect``) reports: its message,
        type and code from its JSON data (``{"error": {...}}``, ``{"type": "error", "error":
        {...}}``, ``response.failed``'s ``response.error``, or the object itself), bounded as
        :func:`error_fields` bounds them."""
        try:
            value = json.loads(event.data)
        except ValueError:
            value = None
        found: Any = value
        if isinstance(value, dict):
            response = value.get("response")
            if isinstance(response, dict) and isinstance(response.get("error"), dict):
                found = {"error": response["error"]}
            elif value.get("type") in ("error", "response.failed") and "error" not in value:
                found = {k: v for k, v in value.items() if k != "type"}
        return cls(dialect, event, **error_fields(found))


class UpstreamsUnavailable(UpstreamError):
    """Every upstream of the route is kept out by its circuit breaker (it failed too often, or
    asked for a pause with ``Retry-After``), so none was asked: 503 with ``Retry-After``, the
    seconds until the first of them may be tried again (see ``docs/failover.md``)."""

    status = 503
    type = "upstreams_unavailable"

    def __init__(self, retry_after: int) -> None:
        super().__init__("every upstream is cooling down after failures")
        self.retry_after = str(retry_after)


class UpstreamTimeout(UpstreamError):
    """An upstream timeout expired: HTTP 504 before the commit point. Catch this for any phase,
    or the subclass of one phase; each has its own ``type`` (``<phase>_timeout``); the
    outcome of each is ``timeout``.

    Attributes:
        phase: ``"connect"``, ``"first_event"``, ``"idle"`` or ``"total"``.
        seconds: the limit that expired, in seconds (float).
    """

    status = 504
    phase = "upstream"
    type = "upstream_timeout"

    def __init__(self, seconds: float) -> None:
        super().__init__(f"upstream {self.phase.replace('_', ' ')} timeout ({seconds:g} s) expired")
        self.seconds = seconds


class ConnectTimeout(UpstreamTimeout):
    """Connecting to the upstream took longer than ``connect_timeout``."""

    phase = "connect"
    type = "connect_timeout"


class FirstEventTimeout(UpstreamTimeout):
    """The upstream sent no event within ``first_event_timeout`` of the request."""

    phase = "first_event"
    type = "first_event_timeout"


class IdleTimeout(UpstreamTimeout):
    """The upstream sent no event for ``idle_timeout`` seconds (its comments do not count)."""

    phase = "idle"
    type = "idle_timeout"


class TotalTimeout(UpstreamTimeout):
    """The upstream stream lasted longer than ``total_timeout``."""

    phase = "total"
    type = "total_timeout"


class DownstreamError(StreamPlusError):
    """The client could not take the stream; the upstream is closed and the client cut, after
    an error frame put in its buffer as a last word. Only raised after the commit point."""

    status = 504
    type = "downstream_error"


class SendTimeout(DownstreamError):
    """A write to the client did not drain for ``send_timeout`` seconds (a client that stopped
    reading, or vanished without a FIN).

    Attributes:
        seconds: the send timeout in seconds (float).
    """

    type = "send_timeout"

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the client did not read the stream for {seconds:g} s")
        self.seconds = seconds


class SlowClient(DownstreamError):
    """Slow-client policy ``disconnect``: the client fell a whole high-water mark behind.

    Attributes:
        limit: the high-water mark in bytes.
    """

    type = "slow_client"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the client fell more than {limit} bytes behind the stream")
        self.limit = limit


class ServerShutdown(StreamPlusError):
    """The server is stopping: the stream ends with this error frame (HTTP 503 before the
    commit point), and the upstream is closed."""

    status = 503
    type = "shutdown"

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry the request")


class StoreUnavailable(StreamPlusError):
    """The event store of resumable streams cannot be reached (Redis is down, or did not
    answer in time, retries included): HTTP 503 with ``Retry-After`` before the commit point,
    a ``store_unavailable`` frame after it."""

    status = 503
    type = "store_unavailable"
    retry_after = "1"

    def __init__(self, message: str = "the event store cannot be reached; retry later") -> None:
        super().__init__(message)


class ResumeError(StreamPlusError):
    """A resumable stream cannot be read as asked (see the subclasses).

    Attributes:
        stream_id: the stream's ID (str).
    """

    status = 404
    type = "resume_error"

    def __init__(self, message: str, stream_id: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id


class StreamNotFound(ResumeError):
    """No stream has this ID (or the ``Last-Event-ID`` is not ``<stream>:<seq>``): 404."""

    type = "stream_not_found"

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"no stream {stream_id!r}", stream_id)


class StreamExpired(ResumeError):
    """The stream expired from the event store (its TTL passed): 410."""

    status = 410
    type = "stream_expired"

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} expired", stream_id)


class EventsExpired(ResumeError):
    """The events after the asked sequence number are no longer stored (the store keeps at most
    ``resume_max_events`` per stream), or the number is past the stream's end: 410, or a frame
    for a reader that fell that far behind.

    Attributes:
        after: the sequence number asked for (int).
    """

    status = 410
    type = "events_expired"

    def __init__(self, stream_id: str, after: int) -> None:
        super().__init__(
            f"the events of stream {stream_id!r} after {after} are no longer stored", stream_id
        )
        self.after = after


class StreamCancelled(ResumeError):
    """The stream was cancelled (not a disconnect: someone asked it to stop): 409 or a
    ``cancelled`` frame."""

    status = 409
    type = "cancelled"

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} was cancelled", stream_id)


class StreamFinished(ResumeError):
    """``DELETE`` of a stream that has finished already: nothing is left to cancel, and its
    events can still be read (``GET`` replays them): 409.

    Attributes:
        state: how it finished: ``completed``, ``cancelled`` or ``failed``.
    """

    status = 409
    type = "stream_finished"

    def __init__(self, stream_id: str, state: str) -> None:
        super().__init__(
            f"stream {stream_id!r} has finished ({state}): nothing to cancel; GET still replays it",
            stream_id,
        )
        self.state = state


class ProducerLost(ResumeError):
    """The stream's producer stopped (its process died) without finishing it: 502 or frame."""

    status = 502
    type = "producer_lost"

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"the producer of stream {stream_id!r} was lost", stream_id)


class ReplayedError(StreamPlusError):
    """The error a resumable stream's producer failed with, as the store kept it
    (:func:`error_record`), for its readers: the same ``type``, ``message``, ``upstream_status``,
    HTTP ``status`` and ``retry_after``, and an upstream refusal's own ``upstream_type``,
    ``upstream_code`` and ``upstream_param``, so that a reader that gets it before the commit
    point is refused exactly as a live stream would be (an upstream 400 stays a 400)."""

    status = 502

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(
            str(body.get("message") or "the stream failed"),
            upstream_status=body.get("upstream_status"),
        )
        self.type = str(body.get("type") or "upstream_error")
        status = body.get("status")
        if isinstance(status, int) and 400 <= status <= 599:
            self.status = status
        retry_after = body.get("retry_after")
        self.retry_after = retry_after if isinstance(retry_after, str) else None
        self.upstream_type: str | None = body.get("upstream_type")
        self.upstream_code: str | int | None = body.get("upstream_code")
        self.upstream_param: str | None = body.get("upstream_param")


class ExtensionMissing(StreamPlusError, RuntimeError):
    """``@stream_post`` is used on an app that has not registered the StreamPlus extension."""

    type = "configuration_error"

    def __init__(self) -> None:
        super().__init__(
            "@stream_post routes need the StreamPlus extension: add "
            "`from sanic_streamplus import StreamPlus` and "
            "`app.extend(extensions=[StreamPlus])` where the app is created"
        )


_FIELD_LIMIT = 1000  # characters of each field of an upstream error kept for the client
_FIELDS = (("message", "message"), ("upstream_type", "type"), ("upstream_param", "param"))


def error_fields(value: Any) -> dict[str, Any]:
    """The ``message``, ``upstream_type``, ``upstream_code`` and ``upstream_param`` of an
    upstream's JSON error (parsed): OpenAI's ``{"error": {"message", "type", "param", "code"}}``,
    Anthropic's ``{"type": "error", "error": {"type", "message"}}``, or ``{"error": "message"}``
    / ``{"message": ...}``; only string (and integer code) values, each at most 1,000
    characters. Empty for anything else."""
    if not isinstance(value, dict):
        return {}
    error = value.get("error", value)
    if isinstance(error, str):
        error = {"message": error}
    if not isinstance(error, dict):
        return {}
    fields: dict[str, Any] = {}
    for name, key in _FIELDS:
        if isinstance(error.get(key), str) and error[key]:
            fields[name] = error[key][:_FIELD_LIMIT]
    code = error.get("code")
    if isinstance(code, str) and code:
        fields["upstream_code"] = code[:_FIELD_LIMIT]
    elif isinstance(code, int) and not isinstance(code, bool):
        fields["upstream_code"] = code
    return fields


def error_record(error: StreamPlusError) -> dict[str, Any]:
    """What the event store keeps of a failed stream's ``error`` (JSON-serialisable): the
    fields of :func:`error_body` plus its HTTP ``status``, and, where set, ``retry_after`` and
    an upstream refusal's ``upstream_type``, ``upstream_code`` and ``upstream_param``;
    :class:`ReplayedError` rebuilds the error from it."""
    record: dict[str, Any] = error_body(error)["error"]
    record["status"] = error.status
    for name in ("retry_after", "upstream_type", "upstream_code", "upstream_param"):
        value = getattr(error, name, None)
        if value is not None:
            record[name] = value
    return record


def error_body(error: StreamPlusError) -> dict[str, Any]:
    """The JSON body for ``error``: ``{"error": {"type", "message", "upstream_status"}}``."""
    return {
        "error": {
            "type": error.type,
            "message": error.message,
            "upstream_status": error.upstream_status,
        }
    }
