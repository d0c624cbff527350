"""What a stream did, told to whoever asks: ``on_finish`` hooks, Sanic signals, Prometheus
metrics and OpenTelemetry spans.

Every stream that reaches the relay (its handler was called and returned events) ends with one
:class:`StreamInfo`: its **outcome** and its stats (time to first byte, time to first event,
events, bytes, duration, and the upstream's usage block when one went by). It is handed to:

- **hooks**, ``(info) -> None`` or ``async (info) -> None``, given per route
  (``@stream_post(on_finish=...)``) or for every stream (``app.ctx.streamplus.on_finish``).
  A hook marked :func:`before_final_frame` runs, and is awaited, *before* the stream's
  terminating frame (``[DONE]``, the error frame, or the JSON error answer) is written: on
  platforms that freeze the process once the last byte is out, that is the only moment that
  surely runs. Its stats leave out that frame. Other hooks run after the stream ended, in a
  task of their own. A hook that raises is logged and changes nothing;
- the **Sanic signals** ``streamplus.stream.start`` and ``streamplus.stream.finish``, whose
  handlers get ``stream_info`` (dispatched only when a handler is registered);
- **Prometheus** (``STREAMPLUS_METRICS``), in prometheus-client's default registry;
- **OpenTelemetry** (``STREAMPLUS_OTEL``): one span per stream, child of the request's
  ``traceparent``.

Outcomes (``StreamInfo.outcome``, the log line's ``outcome=``, the metrics' ``outcome`` label and
the span's ``streamplus.outcome``) are the one list of :class:`~sanic_streamplus.machine.Outcome`
(str values: ``completed``, ``client_disconnected``, ``upstream_error``, ``upstream_truncated``,
``rate_limited``, ``timeout``, ``cancelled``, ``shutdown``, ``invalid_request``,
``internal_error``); ``StreamInfo.error`` is the precise error ``type``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sanic import Request

from .errors import StreamPlusError
from .machine import Outcome, outcome_for

__all__ = [
    "OUTCOMES",
    "Attempt",
    "Hook",
    "Observer",
    "StreamInfo",
    "Watch",
    "before_final_frame",
    "outcome_of",
]

logger = logging.getLogger("sanic_streamplus")

OUTCOMES = tuple(Outcome)  # the one list: machine.Outcome's members
START_SIGNAL = "streamplus.stream.start"
FINISH_SIGNAL = "streamplus.stream.finish"
_FAILED = frozenset(  # a span with one of these outcomes has status ERROR
    (Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_TRUNCATED, Outcome.TIMEOUT, Outcome.INTERNAL_ERROR)
)
# seconds; what a chat stream's time to first byte, gap between tokens and length look like
_TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass(eq=False)
class Attempt:
    """One upstream a stream asked (or skipped), in ``StreamInfo.attempts`` (see
    ``docs/failover.md``).

    Attributes:
        upstream: the upstream's name (``STREAMPLUS_UPSTREAMS``).
        outcome: how the attempt ended: ``streamed`` (its events went to the client and it
            ended as the stream ended: the stream's own ``outcome`` says how), ``circuit_open``
            (skipped: its breaker is open, nothing asked), ``refused`` (a 4xx other than 429:
            answered to the client, no failover), or the ``type`` of the error that moved the
            stream on (``upstream_unreachable``, ``upstream_status``, ``rate_limited``,
            ``first_event_timeout``, ``upstream_truncated``, ``upstream_error``, ...);
            ``""`` while it runs.
        continuation: the attempt continues a stream after its commit point (it got the
            answer so far as a prefill).
        events: events of this upstream relayed to the client.
        time_to_first_event: seconds from this attempt's request to its first event, or None.
    """

    upstream: str
    outcome: str = ""
    continuation: bool = False
    events: int = 0
    time_to_first_event: float | None = None


@dataclass(eq=False)
class StreamInfo:
    """What one stream did, as its hooks see it.

    Attributes:
        request: the Sanic request the stream answers (its ``ctx`` has what your middleware
            put there: the user to bill, say).
        route: the route's name (``app.handler``), bounded in number: a metrics label.
        method: ``POST`` (or ``GET`` for a resume).
        path: the request path.
        format: the output format (``sse``, ``ndjson``, ``text``).
        dialect: the dialect name (``plain``, ``openai``, ...).
        stream_id: a resumable stream's ID, else None.
        started_at: when the stream started, in seconds since the epoch (``time.time()``).
        outcome: a :class:`~sanic_streamplus.machine.Outcome` (a str: ``"completed"``, ...;
            see the module docstring); ``""`` while it runs.
        error: the error's ``type`` (e.g. ``idle_timeout``), None for ``completed`` and for a
            plain disconnect.
        status: the HTTP status the client got: 200 once the stream was committed, else the
            JSON error's (499 for a client that left before anything was sent).
        duration: seconds from the start to the end (to the final frame, for a
            ``before_final_frame`` hook).
        time_to_first_byte: seconds from the start to the first byte written to the client
            (an event or a heartbeat), or None.
        time_to_first_event: seconds from the start to the first event from the source (the
            first token, typically), or None.
        events: events relayed (end markers and heartbeats not counted).
        bytes: bytes written to the client (without the final frame, for a
            ``before_final_frame`` hook).
        usage: the last usage block the upstream sent (a dict as the dialect found it:
            ``prompt_tokens``/``completion_tokens`` for OpenAI chat, ``input_tokens``/
            ``output_tokens`` for Anthropic and the Responses API), or None.
        attempts: the upstreams asked, in order (:class:`Attempt`), when the route has
            several (``STREAMPLUS_UPSTREAMS``); empty for a single upstream.
    """

    request: Request = field(repr=False)
    route: str
    method: str
    path: str
    format: str
    dialect: str
    stream_id: str | None = None
    started_at: float = 0.0
    outcome: Outcome | str = ""
    error: str | None = None
    status: int = 200
    duration: float = 0.0
    time_to_first_byte: float | None = None
    time_to_first_event: float | None = None
    events: int = 0
    bytes: int = 0
    usage: dict[str, Any] | None = None
    attempts: list[Attempt] = field(default_factory=list)


Hook = Callable[[StreamInfo], "Awaitable[None] | None"]
H = TypeVar("H", bound=Callable[..., Any])


def before_final_frame(hook: H) -> H:
    """Mark an ``on_finish`` hook to run before the stream's terminating frame is written
    (and be awaited: the client waits for it; heartbeats go on meanwhile while the stream is
    committed). Use it for what must not be lost on platforms that freeze the process after
    the last byte (billing, say)."""
    hook.__streamplus_before_final_frame__ = True  # type: ignore[attr-defined]
    return hook


def outcome_of(error: StreamPlusError | None, disconnected: bool = False) -> Outcome:
    """The :class:`~sanic_streamplus.machine.Outcome` of a stream that ended with ``error``
    (:func:`~sanic_streamplus.machine.outcome_for`; None: no error), or whose client went away
    (``disconnected``)."""
    if error is None:
        return Outcome.CLIENT_DISCONNECTED if disconnected else Outcome.COMPLETED
    return outcome_for(error)


def _is_early(hook: Hook) -> bool:
    return bool(getattr(hook, "__streamplus_before_final_frame__", False))


async def _call(hook: Hook, info: StreamInfo) -> None:
    try:
        result = hook(info)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("on_finish hook %r failed", hook)


class _Metrics:
    """The Prometheus metrics, created once per process in prometheus-client's default
    registry (label ``route``: the route name)."""

    def __init__(self) -> None:
        try:
            from prometheus_client import Counter, Gauge, Histogram
        except ImportError:
            raise ValueError(
                "STREAMPLUS_METRICS needs prometheus-client: pip install sanic-streamplus[metrics]"
            ) from None
        route = ["route"]
        self.ttfb = Histogram(
            "streamplus_time_to_first_byte_seconds",
            "Seconds from a stream's start to its first byte written to the client.",
            route,
            buckets=_TTFB_BUCKETS,
        )
        self.first_event = Histogram(
            "streamplus_time_to_first_event_seconds",
            "Seconds from a stream's start to its first event from the source.",
            route,
            buckets=_TTFB_BUCKETS,
        )
        self.gap = Histogram(
            "streamplus_inter_event_gap_seconds",
            "Seconds between consecutive events of a stream's source.",
            route,
            buckets=_GAP_BUCKETS,
        )
        self.duration = Histogram(
            "streamplus_stream_duration_seconds",
            "Seconds from a stream's start to its end.",
            route,
            buckets=_DURATION_BUCKETS,
        )
        self.streams = Counter(
            "streamplus_streams", "Streams ended, by outcome.", ["route", "outcome"]
        )
        self.events = Counter("streamplus_events", "Events relayed to clients.", route)
        self.bytes = Counter("streamplus_bytes", "Bytes written to clients.", route)
        self.failovers = Counter(
            "streamplus_failovers",
            "Streams moved on from one upstream to the next, by the reason (the failed "
            "attempt's outcome: an error type, or circuit_open).",
            ["route", "reason"],
        )
        self.open = Gauge(
            "streamplus_streams_open", "Streams running now.", route, multiprocess_mode="livesum"
        )


_METRICS: _Metrics | None = None


def _metrics() -> _Metrics:
    global _METRICS
    if _METRICS is None:
        _METRICS = _Metrics()
    return _METRICS


def metrics_response_body() -> tuple[bytes, str]:
    """The default registry in Prometheus' text format, and its content type. Under
    prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set: several Sanic
    workers), every worker's values, summed. Served only when ``STREAMPLUS_METRICS`` is on,
    which fails the server's start without prometheus-client.
    """
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def _tracer() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        raise ValueError(
            "STREAMPLUS_OTEL needs opentelemetry-api: pip install sanic-streamplus[otel]"
        ) from None
    return trace.get_tracer("sanic_streamplus")


class Observer:
    """One per worker (``app.ctx.streamplus.observer``): the app-wide hooks, the signals,
    the metrics and the tracer; :meth:`watch` starts what one stream reports.

    Args:
        app: the Sanic app (for its signals).
        hooks: the app-wide ``on_finish`` hooks (a list the observer keeps, not a copy).
        metrics: collect Prometheus metrics.
        otel: one OpenTelemetry span per stream.

    Raises:
        ValueError: ``metrics`` or ``otel`` asked for without its package installed.
    """

    def __init__(
        self,
        app: Any,
        hooks: list[Hook] | None = None,
        *,
        metrics: bool = False,
        otel: bool = False,
    ) -> None:
        self.app = app
        self.hooks = [] if hooks is None else hooks
        self.metrics = _metrics() if metrics else None
        self.tracer = _tracer() if otel else None
        self.tasks: set[asyncio.Task[None]] = set()

    def on_finish(self, hook: H) -> H:
        """Register ``hook`` for every stream of the app (usable as a decorator)."""
        self.hooks.append(hook)
        return hook

    def watch(
        self,
        request: Request,
        format: str,
        dialect: str,
        hooks: Iterable[Hook] = (),
        stream_id: str | None = None,
        started: float | None = None,
    ) -> Watch | None:
        """Start watching one stream (its start signal, span and gauge go out now), or None
        when nothing listens: no hook, metric, span or signal handler (then the stream pays
        nothing per event).

        Args:
            request: the request the stream answers.
            format: the output format's name.
            dialect: the dialect's name.
            hooks: the route's own ``on_finish`` hooks (they run before the app-wide ones).
            stream_id: a resumable stream's ID.
            started: when the stream started (``time.monotonic()`` seconds; default now):
                the handler's call, so that its own wait for the upstream counts.
        """
        hooks = [*hooks, *self.hooks]
        if not (hooks or self.metrics or self.tracer or self.has_signal(START_SIGNAL)) and (
            not self.has_signal(FINISH_SIGNAL)
        ):
            return None
        route = request.route.name if request.route is not None else request.path
        now = time.monotonic()
        started = now if started is None else started
        info = StreamInfo(
            request,
            route,
            request.method,
            request.path,
            format,
            dialect,
            stream_id,
            time.time() - (now - started),
        )
        return Watch(self, info, hooks, started)

    def has_signal(self, event: str) -> bool:
        """True if a handler for the Sanic signal ``event`` is registered."""
        return self.app.signal_router.name_index.get(event) is not None

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run ``work`` in a task of its own, kept until it ends (see :meth:`close`)."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for hooks and signals still running."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)


class Watch:
    """What one stream reports, fed by the relay: :meth:`event` for every event from the
    source, :meth:`settle` with the ending, :meth:`before_final` just before the terminating
    frame, :meth:`finish` once it ended.
    """

    __slots__ = (
        "early",
        "early_done",
        "finished",
        "gap",
        "info",
        "last_event",
        "late",
        "observer",
        "span",
        "started",
    )

    def __init__(
        self, observer: Observer, info: StreamInfo, hooks: list[Hook], started: float
    ) -> None:
        self.info = info
        self.observer = observer
        self.early = [hook for hook in hooks if _is_early(hook)]
        self.late = [hook for hook in hooks if not _is_early(hook)]
        self.started = started
        self.last_event: float | None = None
        self.early_done = self.finished = False
        metrics = observer.metrics
        self.gap = metrics.gap.labels(info.route).observe if metrics is not None else None
        if metrics is not None:
            metrics.open.labels(info.route).inc()
        self.span: Any = None
        if observer.tracer is not None:
            from opentelemetry import propagate

            self.span = observer.tracer.start_span(
                f"stream {info.route}",
                context=propagate.extract(info.request.headers),
                attributes={
                    "http.request.method": info.method,
                    "http.route": info.route,
                    "url.path": info.path,
                    "streamplus.format": info.format,
                    "streamplus.dialect": info.dialect,
                },
            )
        if observer.has_signal(START_SIGNAL):
            observer.spawn(self._signal(START_SIGNAL))

    def event(self, usage: dict[str, Any] | None) -> None:
        """One event came from the source; ``usage`` is the usage block it carried, if any."""
        now = time.monotonic()
        last = self.last_event
        self.last_event = now
        if last is None:
            self.info.time_to_first_event = now - self.started
            if self.span is not None:
                self.span.add_event("first_event")
        elif self.gap is not None:
            self.gap(now - last)
        if usage is not None:
            self.info.usage = usage

    def settle(
        self,
        error: StreamPlusError | None,
        disconnected: bool,
        status: int,
        events: int,
        written: int,
        time_to_first_byte: float | None,
    ) -> None:
        """Record how the stream ends: its error (None if none), whether the client went away,
        the status, the events and bytes written, and the time to first byte (seconds)."""
        info = self.info
        info.outcome = outcome_of(error, disconnected)
        info.error = error.type if error is not None else None
        info.status = status
        info.events = events
        info.bytes = written
        info.time_to_first_byte = time_to_first_byte
        info.duration = time.monotonic() - self.started

    async def before_final(self) -> None:
        """Run the ``before_final_frame`` hooks (once), in order."""
        if self.early_done:
            return
        self.early_done = True
        for hook in self.early:
            await _call(hook, self.info)

    async def refused(self, error: StreamPlusError, status: int) -> None:
        """The stream failed before it started (its handler raised): answered ``status``."""
        self.settle(error, False, status, 0, 0, None)
        await self.before_final()
        self.finish()

    def finish(self) -> None:
        """The stream ended: metrics and span now; the other hooks (and ``before_final_frame``
        ones that could not run before a final frame: a client that left) and the finish
        signal in a task of their own."""
        if self.finished:
            return
        self.finished = True
        info = self.info
        metrics = self.observer.metrics
        if metrics is not None:
            route = info.route
            metrics.open.labels(route).dec()
            metrics.streams.labels(route, info.outcome).inc()
            metrics.duration.labels(route).observe(info.duration)
            metrics.events.labels(route).inc(info.events)
            metrics.bytes.labels(route).inc(info.bytes)
            if info.time_to_first_byte is not None:
                metrics.ttfb.labels(route).observe(info.time_to_first_byte)
            if info.time_to_first_event is not None:
                metrics.first_event.labels(route).observe(info.time_to_first_event)
            for attempt in info.attempts[:-1]:  # every attempt but the last moved the stream on
                metrics.failovers.labels(route, attempt.outcome).inc()
        if self.span is not None:
            self._end_span()
        signal = self.observer.has_signal(FINISH_SIGNAL)
        if self.late or signal or (self.early and not self.early_done):
            self.observer.spawn(self._after(signal))

    async def _after(self, signal: bool) -> None:
        await self.before_final()
        for hook in self.late:
            await _call(hook, self.info)
        if signal:
            await self._signal(FINISH_SIGNAL)

    async def _signal(self, event: str) -> None:
        try:
            await self.observer.app.dispatch(
                event, context={"stream_info": self.info}, inline=True, fail_not_found=False
            )
        except Exception:
            logger.exception("signal %s failed", event)

    def _end_span(self) -> None:
        from opentelemetry.trace import Status, StatusCode

        info, span = self.info, self.span
        span.set_attributes(
            {
                "streamplus.outcome": str(info.outcome),
                "http.response.status_code": info.status,
                "streamplus.events": info.events,
                "streamplus.bytes": info.bytes,
            }
        )
        if info.stream_id is not None:
            span.set_attribute("streamplus.stream_id", info.stream_id)
        if info.error is not None:
            span.set_attribute("error.type", info.error)
        if info.time_to_first_byte is not None:
            span.set_attribute("streamplus.time_to_first_byte", info.time_to_first_byte)
        if info.time_to_first_event is not None:
            span.set_attribute("streamplus.time_to_first_event", info.time_to_first_event)
        usage = info.usage or {}
        for ours, theirs in (
            ("gen_ai.usage.input_tokens", ("input_tokens", "prompt_tokens")),
            ("gen_ai.usage.output_tokens", ("output_tokens", "completion_tokens")),
        ):
            for name in theirs:
                if isinstance(usage.get(name), int):
                    span.set_attribute(ours, usage[name])
                    break
        if info.outcome in _FAILED:
            span.set_status(Status(StatusCode.ERROR, info.error))
        span.end()
