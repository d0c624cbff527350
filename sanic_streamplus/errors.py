"""The exception tree, and how each error shows on the wire.

Catch the class that says what you can act on::

    StreamPlusError                  base of everything this package raises
    ├── InvalidRequest               the downstream request is bad (400, or a Sanic error's 4xx)
    ├── EventTooLarge                an SSE event grew past the decoder's maximum event size
    ├── UpstreamError                the upstream failed; carries the upstream HTTP status if any
    │   ├── UpstreamUnreachable      connecting to the upstream failed
    │   ├── UpstreamStatusError      the upstream answered a non-2xx status (429 is passed through)
    │   ├── UpstreamBadResponse      the upstream answered 2xx but not ``text/event-stream``
    │   ├── UpstreamDisconnected     the upstream broke the connection in the middle of the body
    │   └── UpstreamTimeout          connect / first event / idle / total timeout expired
    └── ExtensionMissing             ``@stream_post`` used on an app without ``StreamPlus``

Each error has an HTTP ``status`` (used before the commit point, when the response status can
still change) and a short machine-readable ``type`` (used in the JSON body and in error frames
after the commit point). See ``docs/errors.md`` for the wire format in each phase.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EventTooLarge",
    "ExtensionMissing",
    "InvalidRequest",
    "StreamPlusError",
    "UpstreamBadResponse",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "error_body",
]


class StreamPlusError(Exception):
    """Base class of every error raised by sanic-streamplus.

    Attributes:
        status: HTTP status (int) the error maps to before the commit point.
        type: short machine-readable error type (str), used in JSON bodies and error frames.
        message: human-readable message (str); never contains a stack trace or a secret.
        upstream_status: the upstream's HTTP status (int) when one is known, else None.
        outcome: the stream outcome logged for it (str): ``internal_error`` here (a bug: the
            traceback is logged), ``invalid_request``, ``upstream_error`` or ``timeout``.
    """

    status: int = 500
    type: str = "internal_error"
    outcome: str = "internal_error"

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
    outcome = "invalid_request"

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


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
    outcome = "upstream_error"

    def __init__(self, limit: int, events: list[Any] | None = None) -> None:
        super().__init__(f"an upstream event exceeded the maximum event size of {limit} bytes")
        self.limit = limit
        self.events = events or []


class UpstreamError(StreamPlusError):
    """The upstream service failed. Maps to HTTP 502 before the commit point."""

    status = 502
    type = "upstream_error"
    outcome = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    """Connecting to the upstream failed (DNS, refused, TLS, ...)."""

    type = "upstream_unreachable"


class UpstreamStatusError(UpstreamError):
    """The upstream answered with a non-2xx status before its stream started.

    A 429 from the upstream stays a 429 (with ``retry_after`` copied to ``Retry-After``), so a
    client's rate-limit back-off keeps working; any other status becomes a 502 that carries the
    upstream status in ``upstream_status``.

    Attributes:
        retry_after: the upstream's ``Retry-After`` header value (str), or None.
    """

    type = "upstream_status"

    def __init__(self, upstream_status: int, *, retry_after: str | None = None) -> None:
        super().__init__(
            f"upstream answered HTTP {upstream_status}", upstream_status=upstream_status
        )
        self.retry_after = retry_after
        if upstream_status == 429:
            self.status = 429
            self.type = "rate_limited"


class UpstreamBadResponse(UpstreamError):
    """The upstream answered 2xx, but its body is not an event stream."""

    type = "upstream_bad_response"


class UpstreamDisconnected(UpstreamError):
    """The upstream closed or reset the connection in the middle of the event stream."""

    type = "upstream_disconnected"


class UpstreamTimeout(UpstreamError):
    """An upstream timeout expired. Maps to HTTP 504 before the commit point.

    Attributes:
        phase: which timeout expired: ``"connect"``, ``"first_event"``, ``"idle"`` or ``"total"``.
        seconds: the limit that expired, in seconds (float).
    """

    status = 504
    type = "upstream_timeout"
    outcome = "timeout"

    def __init__(self, phase: str, seconds: float) -> None:
        super().__init__(f"upstream {phase.replace('_', ' ')} timeout ({seconds:g} s) expired")
        self.phase = phase
        self.seconds = seconds


class ExtensionMissing(StreamPlusError, RuntimeError):
    """``@stream_post`` is used on an app that has not registered the StreamPlus extension."""

    type = "configuration_error"

    def __init__(self) -> None:
        super().__init__(
            "@stream_post routes need the StreamPlus extension: add "
            "`from sanic_streamplus import StreamPlus` and "
            "`app.extend(extensions=[StreamPlus])` where the app is created"
        )


def error_body(error: StreamPlusError) -> dict[str, Any]:
    """The JSON body for ``error``: ``{"error": {"type", "message", "upstream_status"}}``."""
    return {
        "error": {
            "type": error.type,
            "message": error.message,
            "upstream_status": error.upstream_status,
        }
    }
