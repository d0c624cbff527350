"""Settings: the ``STREAMPLUS_*`` keys of ``app.config``, their defaults, and their parsing."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from .framing import DIALECTS
from .splice import CONTINUE_INSTRUCTION
from .sse import DEFAULT_MAX_EVENT_SIZE, DEFAULT_MAX_LINE_LENGTH

__all__ = [
    "FAILOVER_MODES",
    "FORMATS",
    "HOP_BY_HOP",
    "RESUME_STORES",
    "SLOW_CLIENT_POLICIES",
    "TRANSPORTS",
    "Settings",
    "UpstreamConfig",
    "display_url",
]

FORMATS = ("sse", "ndjson", "text")
TRANSPORTS = ("aiohttp", "httpcore")
SLOW_CLIENT_POLICIES = ("block", "coalesce", "disconnect")
RESUME_STORES = ("memory", "redis")
FAILOVER_MODES = ("fallback", "continue")
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# RFC 9110 section 7.6.1: they describe one connection and are never forwarded
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_DURATIONS = (
    "heartbeat",
    "resume_ttl",
    "resume_grace",
    "resume_handover",
    "breaker_window",
    "breaker_cooldown",
)
_POSITIVE_INTS = (
    "high_water_mark",
    "max_event_size",
    "max_line_length",
    "max_body_size",
    "max_streams",
    "max_producers",
    "max_connections",
    "resume_max_events",
    "breaker_failures",
)

_BOOLS = ("metrics", "otel", "redis_cluster")
_TRUE = ("1", "true", "yes", "on", "y", "t")
_FALSE = ("", "0", "false", "no", "off", "n", "f")


def _flag(value: Any) -> bool:
    """A switch: a bool, or one of the strings Sanic's environment loader knows."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError("must be true or false")


def _names(value: Any) -> tuple[str, ...]:
    """Header names from a comma-separated string or a sequence, lower-cased."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(str(item).strip().lower() for item in items if str(item).strip())
    refused = sorted(set(names) & HOP_BY_HOP)
    if refused:
        raise ValueError(f"hop-by-hop headers are never forwarded: {', '.join(refused)}")
    return names


def _seconds(value: Any) -> float | None:
    """A duration in seconds; None, 0 or a negative number means "no limit"."""
    if value is None or value == "":
        return None
    seconds = float(value)
    return seconds if seconds > 0 else None


def display_url(url: str) -> str:
    """``url`` fit for a log line or an error message: its user info (``user:password@``)
    becomes ``***@``, its query string and fragment (where API keys hide) are dropped, e.g.
    ``https://key@api.example.com/v1?token=x`` gives ``https://***@api.example.com/v1``. Never
    raises: a value that is not a URL at all is cut at its first ``?`` or ``#``."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return url.split("?", 1)[0].split("#", 1)[0].rpartition("@")[2]
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _base_url(value: Any) -> str | None:
    """An upstream base URL: ``http`` or ``https``, with a host (None or empty: none set)."""
    if value is None or value == "":
        return None
    url = str(value)
    if any(char.isspace() for char in url):
        raise ValueError("a URL has no spaces")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        hint = "" if "://" in url else f" (did you mean 'http://{display_url(url)}'?)"
        raise ValueError(f"must be an http:// or https:// URL with a host{hint}")
    return url


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream of ``STREAMPLUS_UPSTREAMS``: a name, a base URL and its API key.

    Attributes:
        name: letters, digits, ``_`` and ``-`` (at most 64), unique in the list: what
            ``upstream_events(upstreams=[...])``, the log, ``StreamInfo.attempts`` and the
            metrics call it.
        url: its base URL (``http`` or ``https`` with a host); ``upstream_events()`` paths are
            joined to it.
        api_key: sent as ``Authorization: Bearer``, or None; from the entry itself, else from
            the config key ``STREAMPLUS_UPSTREAM_<NAME>_API_KEY`` (the name upper-cased, ``-``
            as ``_``; Sanic reads it from the environment variable
            ``SANIC_STREAMPLUS_UPSTREAM_<NAME>_API_KEY``). Never from the request.
    """

    name: str
    url: str
    api_key: str | None = None

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        key = "***" if self.api_key else None
        return f"UpstreamConfig(name={self.name!r}, url={display_url(self.url)!r}, api_key={key})"


def _upstream_entries(value: Any) -> list[tuple[str, str, str | None]]:
    """``(name, url, api_key)`` of each entry of ``STREAMPLUS_UPSTREAMS``: a list of dicts
    (``name``, ``url``, optional ``api_key``) or of ``"name=url"`` strings, or one string of
    ``name=url`` pairs separated by commas."""
    items = value.split(",") if isinstance(value, str) else list(value)
    entries = []
    for item in items:
        if isinstance(item, Mapping):
            unknown = set(item) - {"name", "url", "api_key"}
            if unknown:
                raise ValueError(f"unknown key {sorted(unknown)[0]!r} (name, url, api_key)")
            key = item.get("api_key")
            entries.append((str(item.get("name") or ""), str(item.get("url") or ""), key))
            continue
        text = str(item).strip()
        if not text:
            continue
        name, equals, url = text.partition("=")
        if not equals:
            raise ValueError(f"{display_url(text)!r} is not name=url")
        entries.append((name.strip(), url.strip(), None))
    return entries


def _upstreams(value: Any, config: Mapping[str, Any]) -> tuple[UpstreamConfig, ...]:
    """The upstreams of ``STREAMPLUS_UPSTREAMS`` (see :func:`_upstream_entries`), each URL
    checked as ``STREAMPLUS_UPSTREAM_URL`` is, names unique, keys from the entry or ``config``.
    """
    if value is None or value == "":
        return ()
    upstreams: list[UpstreamConfig] = []
    for name, url, api_key in _upstream_entries(value):
        if not _UPSTREAM_NAME.fullmatch(name):
            raise ValueError(f"upstream name {name!r}: letters, digits, _ and - (at most 64)")
        if any(upstream.name == name for upstream in upstreams):
            raise ValueError(f"upstream name {name!r} twice")
        try:
            checked = _base_url(url)
        except ValueError as exc:
            raise ValueError(f"upstream {name!r} ({display_url(url)!r}): {exc}") from None
        if checked is None:
            raise ValueError(f"upstream {name!r} has no url")
        key = api_key or config.get(f"STREAMPLUS_UPSTREAM_{name.upper().replace('-', '_')}_API_KEY")
        upstreams.append(UpstreamConfig(name, checked, str(key) if key else None))
    return tuple(upstreams)


@dataclass(frozen=True)
class Settings:
    """Every setting of the extension, read from ``app.config`` keys ``STREAMPLUS_<NAME>``.

    Durations are in seconds (float; None or 0 disables the limit), sizes in bytes (int).

    Attributes:
        upstream_url: base URL of the upstream the shared client talks to (str), or None;
            ``http`` or ``https`` with a host, checked at startup.
        upstream_api_key: sent upstream as ``Authorization: Bearer <key>`` when set.
        upstreams: several upstreams, tried in order (:class:`UpstreamConfig`; see
            ``docs/failover.md``): in config a list of dicts (``name``, ``url``, optional
            ``api_key``) or a string of ``name=url`` pairs separated by commas (the
            environment's form, with keys in ``STREAMPLUS_UPSTREAM_<NAME>_API_KEY``). Empty:
            the one upstream of ``upstream_url`` and ``upstream_api_key``.
        failover: ``fallback`` (the default: an upstream that fails before its first content
            event is replaced by the next one; after it, the stream ends with the error frame)
            or ``continue`` (also after it: the next upstream continues the answer; see
            ``docs/failover.md``). The route's ``@stream_post(failover=...)`` overrides it.
        max_continuations: how many times one stream may be continued on another upstream
            (``failover="continue"``); 0: never.
        continue_instruction: the user message sent after the partial assistant message of an
            OpenAI (chat or Responses) continuation
            (:data:`~sanic_streamplus.splice.CONTINUE_INSTRUCTION` by default); empty: none
            (an upstream that continues a prefilled assistant message by itself). Anthropic is
            sent none: it continues a prefill natively.
        breaker_failures: failures of one upstream within ``breaker_window`` seconds that open
            its circuit breaker: it is not tried for ``breaker_cooldown`` seconds (a 429's or
            503's ``Retry-After`` opens it at once, for that long). Only with several upstreams.
        breaker_window: seconds over which ``breaker_failures`` are counted (None or 0: since
            the upstream's last success).
        breaker_cooldown: seconds an open breaker keeps its upstream out (None or 0: the
            breaker opens only for a ``Retry-After``).
        connect_timeout: connecting to the upstream.
        first_event_timeout: from sending the upstream request to its first event.
        idle_timeout: from asking for the next upstream event to receiving it.
        total_timeout: a whole upstream stream.
        send_timeout: a client that has not drained the stream for this long is cut, with an
            error frame put in its buffer, and the upstream closed; also the client socket's
            ``TCP_USER_TIMEOUT`` (Linux; twice this) and the base of its TCP keepalive, so a
            client that vanished without a FIN is found within about twice this bound.
        slow_client: what happens while a client is behind: ``block`` (the default: the upstream
            read waits for it), ``coalesce`` (the upstream keeps flowing and consecutive text
            deltas merge, so the client gets fewer, larger events; at a high-water mark of
            merged backlog it blocks) or ``disconnect`` (the upstream never waits: a client a
            whole high-water mark behind is cut with a ``slow_client`` error frame).
        heartbeat: interval of heartbeat comments while the stream is idle; kept below half of
            Sanic's ``RESPONSE_TIMEOUT``, which cuts a stream that writes nothing for that long.
        high_water_mark: the client transport's write-buffer high-water mark in bytes, and the
            most bytes queued for one write; the next upstream read waits until they drain.
        max_event_size: largest upstream event accepted, in bytes.
        max_line_length: longest upstream line accepted, in bytes.
        max_body_size: largest request body a stream route accepts, in bytes (413 above it).
        max_streams: most concurrent streams per worker; the next gets a 503 with
            ``Retry-After`` before anything starts.
        max_producers: most producers of resumable streams running per worker, with or without
            a reader (a detached producer counts under no other limit); the next resumable POST
            gets a 503 ``too_many_producers`` with ``Retry-After`` and opens nothing (one that
            attaches with a bound ``Idempotency-Key``, or resumes, still passes). None: the
            same as ``max_streams``.
        max_connections: size of the shared client's connection pool.
        resume_store: where resumable streams keep their events: ``memory`` (this process:
            one worker) or ``redis`` (every worker and machine on ``redis_url``).
        redis_url: the Redis of the ``redis`` store, e.g. ``redis://127.0.0.1:6379/0``.
        redis_cluster: ``redis_url`` names a node of a Redis Cluster (or Valkey cluster): the
            store uses redis-py's ``RedisCluster`` client, which finds the other nodes.
        resume_ttl: seconds a resumable stream is kept after its last event.
        resume_max_events: events kept per resumable stream; a reader further behind gets an
            ``events_expired`` error.
        resume_grace: seconds a producer goes on with no reader before it stops.
        resume_handover: with the ``redis`` store, seconds a stream handed over by a worker
            that stops gracefully waits for another worker to claim and continue it (the
            first reader of it on a live worker does); None or 0: no handover, its readers
            end with a ``shutdown`` frame (see docs/resume.md, "Handover").
        resume_path: the path prefix of the resume (``GET <path>/<stream_id>``) and cancel
            (``DELETE <path>/<stream_id>``) routes the extension registers.
        forward_headers: names of downstream request headers forwarded upstream by
            :func:`~sanic_streamplus.upstream.upstream_events` (an allowlist; a comma-separated
            string in config). Nothing is forwarded by default, credentials included; hop-by-hop
            headers never are.
        metrics: collect Prometheus metrics (needs ``prometheus-client``: the ``metrics``
            extra) into its default registry: histograms of time to first byte, inter-event
            gap and duration, counters of streams by outcome, events and bytes (see
            :mod:`sanic_streamplus.observe`).
        metrics_path: the route that serves them in Prometheus' text format when ``metrics``
            is on (``GET``); empty for none (serve the default registry yourself).
        otel: one OpenTelemetry span per stream (needs ``opentelemetry-api``: the ``otel``
            extra), child of the request's ``traceparent``.
        format: default output format: ``sse``, ``ndjson`` or ``text``.
        dialect: default dialect (end, error and heartbeat frames; see docs/dialects.md):
            ``plain``, ``openai``, ``anthropic`` or ``openai-responses``.
        transport: what carries the shared ``httpx.AsyncClient``'s requests: ``aiohttp``
            (httpx-aiohttp's ``AiohttpTransport``, the default: about a fifth of the CPU per
            upstream read, see docs/benchmarks.md) or ``httpcore`` (httpx's stock transport).
            The client's API, timeouts and errors are httpx's either way.
    """

    upstream_url: str | None = None
    upstream_api_key: str | None = None
    upstreams: tuple[UpstreamConfig, ...] = ()
    failover: str = "fallback"
    max_continuations: int = 1
    continue_instruction: str | None = CONTINUE_INSTRUCTION
    breaker_failures: int = 5
    breaker_window: float | None = 30.0
    breaker_cooldown: float | None = 30.0
    connect_timeout: float | None = 10.0
    first_event_timeout: float | None = 120.0
    idle_timeout: float | None = 60.0
    total_timeout: float | None = 1800.0
    send_timeout: float | None = 30.0
    slow_client: str = "block"
    heartbeat: float | None = 15.0
    high_water_mark: int = 64 * 1024
    max_event_size: int = DEFAULT_MAX_EVENT_SIZE
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH
    max_body_size: int = 10 << 20
    max_streams: int = 1000
    max_producers: int | None = None
    max_connections: int = 1000
    forward_headers: tuple[str, ...] = ()
    resume_store: str = "memory"
    redis_url: str | None = None
    redis_cluster: bool = False
    resume_ttl: float | None = 600.0
    resume_max_events: int = 10_000
    resume_grace: float | None = 120.0
    resume_handover: float | None = 30.0
    resume_path: str = "/streams"
    metrics: bool = False
    metrics_path: str = "/metrics"
    otel: bool = False
    format: str = "sse"
    dialect: str = "plain"
    transport: str = "aiohttp"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        """Read ``STREAMPLUS_*`` keys from a Sanic ``app.config`` (any mapping).

        Raises:
            ValueError: a value has the wrong type or is out of range (an upstream URL that is
                not ``http``/``https`` with a host, say); the message names the key and value
                (a URL's without its user info or query string).
        """
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = f"STREAMPLUS_{field.name.upper()}"
            if key not in config:
                continue
            raw = config[key]
            try:
                if field.name.endswith("timeout") or field.name in _DURATIONS:
                    values[field.name] = _seconds(raw)
                elif field.name in _POSITIVE_INTS:
                    values[field.name] = int(raw)
                    if values[field.name] <= 0:
                        raise ValueError("must be positive")
                elif field.name in _BOOLS:
                    values[field.name] = _flag(raw)
                elif field.name == "forward_headers":
                    values[field.name] = _names(raw or ())
                elif field.name == "upstream_url":
                    values[field.name] = _base_url(raw)
                elif field.name == "upstreams":
                    values[field.name] = _upstreams(raw, config)
                elif field.name == "max_continuations":
                    values[field.name] = int(raw)
                    if values[field.name] < 0:
                        raise ValueError("must be 0 or more")
                else:
                    values[field.name] = None if raw in (None, "") else str(raw)
            except (TypeError, ValueError) as exc:
                if field.name == "upstreams":  # its entries may hold keys: the message says which
                    raise ValueError(f"{key}: {exc}") from None
                secret = key.endswith("_URL") and any(char in str(raw) for char in "@?#")
                shown = display_url(str(raw)) if secret else raw
                raise ValueError(f"{key}={shown!r}: {exc}") from None
        settings = cls(**values)
        if settings.format not in FORMATS:
            raise ValueError(f"STREAMPLUS_FORMAT must be one of {FORMATS}, not {settings.format!r}")
        if settings.dialect not in DIALECTS:
            raise ValueError(
                f"STREAMPLUS_DIALECT must be one of {tuple(DIALECTS)}, not {settings.dialect!r}"
            )
        if settings.slow_client not in SLOW_CLIENT_POLICIES:
            raise ValueError(
                f"STREAMPLUS_SLOW_CLIENT must be one of {SLOW_CLIENT_POLICIES}, "
                f"not {settings.slow_client!r}"
            )
        if settings.resume_store not in RESUME_STORES:
            raise ValueError(
                f"STREAMPLUS_RESUME_STORE must be one of {RESUME_STORES}, "
                f"not {settings.resume_store!r}"
            )
        if settings.resume_store == "redis" and not settings.redis_url:
            raise ValueError("STREAMPLUS_RESUME_STORE=redis needs STREAMPLUS_REDIS_URL")
        if settings.failover not in FAILOVER_MODES:
            raise ValueError(
                f"STREAMPLUS_FAILOVER must be one of {FAILOVER_MODES}, not {settings.failover!r}"
            )
        if settings.transport not in TRANSPORTS:
            raise ValueError(
                f"STREAMPLUS_TRANSPORT must be one of {TRANSPORTS}, not {settings.transport!r}"
            )
        return settings
