"""Several upstreams per route: the next one takes over when one fails (see ``docs/failover.md``).

:func:`failover_events` is a *source*: an async iterator of events, like
:func:`~sanic_streamplus.upstream.stream_events`, around which it is built, so the pump and the
machine do not change. It asks the upstreams of an :class:`UpstreamPool` in order and yields the
events of the first one that gets to its first **content event**:

- **before it** (nothing of that upstream has been yielded), a connect failure, a connect or
  first-event timeout, a 5xx, a 429, an answer that is not an event stream, and a stream that
  ends or fails (its in-band error, a reset, truncation) move on to the next upstream. A 4xx
  other than 429 does not: the request is at fault, and the client gets that refusal, with its
  status (``refused``). The events an upstream sends before its first content (an OpenAI role
  delta, Anthropic's ``message_start`` and ``content_block_start``, the Responses API's
  ``response.created`` / ``in_progress`` / ``output_item.added`` / ``content_part.added``)
  are **held** until it proves it streams content, so the client only ever sees the events of
  the upstream that answers: one role delta, one ``message_start``, one response id. The
  client sees one answer: the first upstream that streams, or the last refusal.
- **after it** the stream belongs to that upstream: a failure ends it with the error frame, as
  with one upstream, unless the route continues (``failover="continue"``, :mod:`.splice`).

Each upstream has a :class:`Breaker`: ``breaker_failures`` failures within ``breaker_window``
seconds keep it out for ``breaker_cooldown`` seconds, and a 429's or 503's ``Retry-After`` keeps
it out that long at once, so a dead upstream is not tried by every request. An upstream whose
breaker is open is skipped (``circuit_open``); when all are, the stream is refused with a 503
``upstreams_unavailable`` and the ``Retry-After`` of the first to come back.

Every upstream asked (or skipped) is an :class:`~sanic_streamplus.observe.Attempt` in
``StreamInfo.attempts``; each attempt but the last is counted in the
``streamplus_failovers_total`` metric, by route and reason (the attempt's outcome).

A resumable stream whose worker stops gracefully is continued the same way on another worker
(``docs/resume.md``, "Handover"): :class:`Handover` is the upstream request its producer keeps
in the store, and :func:`handover_events` the continuation the adopting worker runs.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json as jsonlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx

from .config import Settings, UpstreamConfig
from .errors import (
    IdleTimeout,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamErrorEvent,
    UpstreamStatusError,
    UpstreamsUnavailable,
    UpstreamTruncated,
)
from .framing import Dialect, EventKind, get_dialect
from .observe import Attempt
from .splice import Splice
from .sse import ServerSentEvent
from .upstream import create_client, stream_events

__all__ = [
    "CONTINUED",
    "Breaker",
    "Handover",
    "Member",
    "UpstreamPool",
    "failover_events",
    "handover_events",
    "is_content",
]

logger = logging.getLogger("sanic_streamplus")
MAX_HELD = 64  # events held before the first content event; past it, the upstream has begun
MAX_RETRY_AFTER = 3600.0  # seconds: the longest cooldown a Retry-After may ask for
# events that come before an answer's content, by their type (event name, or the data's "type")
_PREAMBLE = frozenset(
    {
        "message_start",
        "ping",
        "content_block_start",
        "response.created",
        "response.in_progress",
        "response.queued",
        "response.output_item.added",
        "response.content_part.added",
    }
)


class Breaker:
    """The circuit breaker of one upstream (sans-IO: the caller passes the time).

    Closed, it counts failures; ``failures`` of them within ``window`` seconds open it for
    ``cooldown`` seconds (:meth:`failed` with a ``retry_after`` opens it at once, for that
    long). Once the cooldown is over the upstream is tried again (half-open) by one request at
    a time, the trial (:meth:`admits`): a success closes the breaker, a failure opens it again
    at once; while the trial runs, other requests skip the upstream as if it were open.

    Args:
        failures: failures that open it (at least 1).
        window: seconds over which they are counted; None: since the last success.
        cooldown: seconds it stays open; None: it never opens but for a ``Retry-After``.
    """

    __slots__ = ("cooldown", "failures", "open_until", "recent", "trial", "tripped", "window")

    def __init__(self, failures: int, window: float | None, cooldown: float | None) -> None:
        self.failures = max(1, failures)
        self.window = window
        self.cooldown = cooldown
        self.recent: deque[float] = deque()
        self.open_until = 0.0
        self.tripped = False  # opened since the last success: half-open once the cooldown ends
        self.trial = False  # half-open and one request is trying the upstream

    def is_open(self, now: float) -> bool:
        """True while the cooldown runs (``now``: the event loop's time, seconds)."""
        return now < self.open_until

    def admits(self, now: float) -> bool:
        """True if a request may try the upstream at ``now``: the breaker is closed, or it is
        half-open and no trial runs (this request becomes the trial: end it with
        :meth:`succeeded`, :meth:`failed` or :meth:`released`)."""
        if now < self.open_until or self.trial:
            return False
        self.trial = self.tripped
        return True

    def released(self) -> None:
        """A request admitted by :meth:`admits` ended with no verdict on the upstream (it was
        cancelled, or the upstream refused the request itself): a trial may run again."""
        self.trial = False

    def remaining(self, now: float) -> float:
        """Seconds until the breaker lets the upstream be tried again (0: now)."""
        return max(0.0, self.open_until - now)

    def failed(self, now: float, retry_after: float | None = None) -> None:
        """The upstream failed at ``now``; ``retry_after``: the seconds its answer asked for."""
        if retry_after is not None and retry_after > 0:
            self._open(now, min(retry_after, MAX_RETRY_AFTER))
            return
        self.trial = False
        if self.cooldown is None:
            return
        if self.tripped:  # half-open: the trial failed
            self._open(now, self.cooldown)
            return
        recent = self.recent
        recent.append(now)
        if self.window is not None:
            while recent and recent[0] <= now - self.window:
                recent.popleft()
        if len(recent) >= self.failures:
            self._open(now, self.cooldown)

    def succeeded(self) -> None:
        """The upstream streamed: the breaker closes and forgets its failures."""
        self.recent.clear()
        self.tripped = self.trial = False

    def _open(self, now: float, seconds: float) -> None:
        self.open_until = max(self.open_until, now + seconds)
        self.tripped = True
        self.recent.clear()


@dataclass(eq=False)
class Member:
    """One upstream of a pool: its config, its settings (the app's, with its URL and key: the
    key is masked in what its error bodies say), its shared client and its breaker."""

    config: UpstreamConfig
    settings: Settings
    client: httpx.AsyncClient
    breaker: Breaker

    @property
    def name(self) -> str:
        """The upstream's name."""
        return self.config.name


class UpstreamPool:
    """The upstreams of one worker, in ``STREAMPLUS_UPSTREAMS`` order, each with its own
    ``httpx.AsyncClient`` (:func:`~sanic_streamplus.upstream.create_client`: its base URL and
    key, the pool size, transport and timeouts of ``settings``; no cookies) and its
    :class:`Breaker`. Without ``STREAMPLUS_UPSTREAMS``, one member called ``default``: the
    client of ``STREAMPLUS_UPSTREAM_URL`` and ``STREAMPLUS_UPSTREAM_API_KEY``, as before.
    Made in ``before_server_start`` (the clients open no connection until used), closed in
    ``after_server_stop``."""

    def __init__(self, settings: Settings) -> None:
        configs = settings.upstreams or (
            UpstreamConfig("default", settings.upstream_url or "", settings.upstream_api_key),
        )
        self.members = []
        for config in configs:
            own = replace(
                settings, upstream_url=config.url or None, upstream_api_key=config.api_key
            )
            breaker = Breaker(
                settings.breaker_failures, settings.breaker_window, settings.breaker_cooldown
            )
            self.members.append(Member(config, own, create_client(own), breaker))

    def select(self, names: Sequence[str] | None = None) -> list[Member]:
        """The members called ``names``, in that order (None: all, in config order).

        Raises:
            ValueError: a name that is not in ``STREAMPLUS_UPSTREAMS``.
        """
        if names is None:
            return list(self.members)
        by_name = {member.name: member for member in self.members}
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise ValueError(f"no upstream called {unknown[0]!r} in STREAMPLUS_UPSTREAMS")
        return [by_name[name] for name in names]

    async def aclose(self) -> None:
        """Close every client."""
        for member in self.members:
            await member.client.aclose()


def is_content(dialect: Dialect, event: ServerSentEvent) -> bool:
    """Whether ``event`` is part of the answer itself, not of what announces it: for OpenAI chat
    a chunk whose deltas carry more than a ``role`` (text, a tool call, a refusal), a finish
    reason or usage; for Anthropic and the Responses API any event but the preamble
    (``message_start``, ``ping``, ``content_block_start``, ``response.created`` /
    ``in_progress`` / ``queued`` / ``output_item.added`` / ``content_part.added``); in the
    ``plain`` dialect every event. Parses the event (it is only asked of the first few)."""
    kind = dialect.classify(event)
    if kind in (EventKind.TERMINAL, EventKind.FINISH, EventKind.USAGE, EventKind.UPSTREAM_ERROR):
        return True
    if kind is EventKind.START:
        return False
    if dialect.name == "openai":
        return _openai_content(event.data)
    if dialect.name == "plain":
        return True
    return _event_type(event) not in _PREAMBLE


def _openai_content(data: str) -> bool:
    try:
        chunk = jsonlib.loads(data)
    except ValueError:
        return True  # not a chunk: something the upstream means
    if not isinstance(chunk, dict):
        return True
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and any(v for k, v in delta.items() if k != "role"):
            return True
    return False


def _event_type(event: ServerSentEvent) -> str | None:
    if event.event != "message":
        return event.event
    try:
        value = jsonlib.loads(event.data)
    except ValueError:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    return kind if isinstance(kind, str) else None


def _retry_after(error: UpstreamError) -> float | None:
    """The seconds a 429's or 503's ``Retry-After`` asks for (RFC 9110 section 10.2.3:
    delay-seconds or an HTTP-date), or None."""
    value = error.retry_after if isinstance(error, UpstreamStatusError) else None
    if value is None or error.upstream_status not in (429, 503):
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _refused(error: UpstreamError) -> bool:
    """A refusal no other upstream would answer differently: a 4xx other than 429."""
    status = error.upstream_status
    return (
        isinstance(error, UpstreamStatusError)
        and status is not None
        and 400 <= status < 500
        and status != 429
    )


@dataclass
class _Opened:
    """An upstream that got to its first content event: its stream, positioned after it, and
    the events it sent up to and including it."""

    member: Member
    attempt: Attempt
    events: AsyncIterator[ServerSentEvent]
    held: list[ServerSentEvent]


Open = Callable[[Member, Any], AsyncIterator[ServerSentEvent]]


async def _first_content(
    members: Sequence[Member],
    skip: set[str],
    open_stream: Open,
    body: Callable[[], Any],
    dialect: Dialect,
    attempts: list[Attempt],
    continuation: bool,
) -> _Opened:
    """Ask ``members`` (but ``skip``) in order for ``body()`` (called once per upstream asked)
    until one gets to its first content event.

    Raises:
        UpstreamError: a 4xx other than 429 (no failover), or the last upstream's failure.
        UpstreamsUnavailable: no upstream was asked: every breaker is open.
    """
    loop = asyncio.get_running_loop()
    last: UpstreamError | None = None
    for member in members:
        if member.name in skip:
            continue
        now = loop.time()
        if not member.breaker.admits(now):
            attempts.append(Attempt(member.name, "circuit_open", continuation))
            continue
        attempt = Attempt(member.name, continuation=continuation)
        attempts.append(attempt)
        events = open_stream(member, body())
        held: list[ServerSentEvent] = []
        try:
            async for event in events:
                if not held:
                    attempt.time_to_first_event = loop.time() - now
                held.append(event)
                if len(held) >= MAX_HELD or is_content(dialect, event):
                    break
            member.breaker.succeeded()
            return _Opened(member, attempt, events, held)
        except UpstreamError as error:
            await events.aclose()  # type: ignore[attr-defined]
            if _refused(error):
                attempt.outcome = "refused"
                member.breaker.released()
                raise
            attempt.outcome = error.type
            member.breaker.failed(loop.time(), _retry_after(error))
            last = error
            logger.warning("upstream %s failed before streaming (%s)", member.name, error.type)
        except BaseException:
            member.breaker.released()
            await events.aclose()  # type: ignore[attr-defined]
            raise
    if last is not None:
        raise last
    now = loop.time()
    wait = min((m.breaker.remaining(now) for m in members if m.name not in skip), default=1.0)
    raise UpstreamsUnavailable(max(1, math.ceil(wait)))


async def failover_events(
    members: Sequence[Member],
    method: str,
    url: str,
    *,
    dialect: str,
    attempts: list[Attempt],
    json: Any = None,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    failover: str = "fallback",
    max_continuations: int = 0,
    instruction: str | None = None,
    splice: Splice | None = None,
    continued: int = 0,
) -> AsyncIterator[ServerSentEvent]:
    """Yield the events of the first of ``members`` that streams (see the module docstring).

    ``method``, ``url``, ``json``, ``content`` and ``headers`` are the request, as for
    :func:`~sanic_streamplus.upstream.stream_events` (``url`` joined to each upstream's base
    URL unless absolute), sent with each member's settings (timeouts, limits; its key masked in
    its error bodies).

    Args:
        members: the upstreams to try, in order.
        dialect: the upstreams' dialect name, by which their streams are checked, their first
            content event found and a continuation spliced.
        attempts: the list the attempts are appended to (``StreamInfo.attempts``).
        failover: ``"fallback"`` or ``"continue"``: after the first content event, an
            upstream that is cut (:data:`CONTINUED`) is continued by the next one, the text so
            far as a prefill (:class:`~sanic_streamplus.splice.Splice`), if ``json`` is a JSON
            object and no tool call is in flight.
        max_continuations: how many times the stream may be continued.
        instruction: the user message after the prefill of an OpenAI continuation, or None.
        splice: a stream handed over (:func:`handover_events`): the splice that was told of
            every event delivered already; the first upstream is asked for the continuation
            (``json`` plus the text so far) and its events are rewritten, as a continuation's.
        continued: with ``splice``, how many times the stream was continued before (its
            budget left for a later cut: ``max_continuations - continued - 1``).

    Yields:
        :class:`ServerSentEvent`, in stream order: one upstream's, or one upstream's then its
        continuations', rewritten to read as one answer.

    Raises:
        UpstreamError: a 4xx other than 429 (no failover); the last upstream's failure before
            its first content event; a failure after it that is not continued (as
            :func:`~sanic_streamplus.upstream.stream_events` raises it: the error that cut
            the answer, also when no upstream could continue it).
        UpstreamsUnavailable: every upstream's breaker is open.
    """
    checker = get_dialect(dialect)

    def open_stream(member: Member, body: Any) -> AsyncIterator[ServerSentEvent]:
        return stream_events(
            member.client,
            method,
            url,
            settings=member.settings,
            json=body,
            content=content,
            headers=headers,
            dialect=checker,
        )

    continuing = failover == "continue" and max_continuations > 0 and isinstance(json, dict)
    if splice is None and continuing:
        splice = Splice(checker, instruction=instruction)
    relay = _Relay(checker, splice)
    resumed = splice is not None and splice.can_continue and isinstance(json, dict)
    body: Callable[[], Any] = lambda: json  # noqa: E731
    if resumed:
        assert splice is not None and isinstance(json, dict)
        relay.continuations = continued + 1
        body = functools.partial(splice.continuation_body, json)
    budget = max_continuations if continuing else 0
    skip: set[str] = set()
    opened = await _first_content(members, skip, open_stream, body, checker, attempts, resumed)
    while True:
        events = opened.events
        relay.attempt = opened.attempt
        try:
            for event in opened.held:
                passed = relay.passed(event)
                if passed is not None:
                    yield passed
            async for event in events:
                passed = relay.passed(event)
                if passed is not None:
                    yield passed
            opened.attempt.outcome = "completed"
            return
        except UpstreamError as error:
            opened.attempt.outcome = error.type
            opened.member.breaker.failed(asyncio.get_running_loop().time())
            if not relay.may_continue(error, budget):
                raise
            await events.aclose()  # type: ignore[attr-defined]
            skip.add(opened.member.name)
            opened = await relay.continuation(members, skip, open_stream, json, attempts, error)
        finally:
            await events.aclose()  # type: ignore[attr-defined]


CONTINUED = (UpstreamDisconnected, IdleTimeout, UpstreamTruncated, UpstreamErrorEvent)
"""The failures after the first content event that ``failover="continue"`` continues: the
connection broke, no event for the idle timeout, the end without the terminal event, the
upstream's in-band error. Not a total timeout (the bound is the stream's), not an event too
large."""


class _Relay:
    """What :func:`failover_events` does with each event it passes on: the splice's rewrite
    (in a continuation) and record, the attempt's count and end."""

    __slots__ = ("attempt", "continuations", "dialect", "end_kind", "splice")

    def __init__(self, dialect: Dialect, splice: Splice | None) -> None:
        self.dialect = dialect
        self.end_kind = dialect.end_kind
        self.splice = splice
        self.continuations = 0
        self.attempt = Attempt("")

    def passed(self, event: ServerSentEvent) -> ServerSentEvent | None:
        """``event`` as the client gets it (None: dropped, a continuation's repeated start)."""
        splice = self.splice
        if splice is not None:
            if self.continuations:
                rewritten = splice.rewrite(event)
                if rewritten is None:
                    return None
                event = rewritten
            splice.delivered(event)
        self.attempt.events += 1
        if self.end_kind(event) is EventKind.TERMINAL:  # the consumer stops at it
            self.attempt.outcome = "completed"
        return event

    def may_continue(self, error: UpstreamError, budget: int) -> bool:
        """Whether the stream cut by ``error`` goes on on another upstream."""
        splice = self.splice
        return (
            splice is not None
            and isinstance(error, CONTINUED)
            and self.continuations < budget
            and splice.can_continue
        )

    async def continuation(
        self,
        members: Sequence[Member],
        skip: set[str],
        open_stream: Open,
        body: dict[str, Any],
        attempts: list[Attempt],
        error: UpstreamError,
    ) -> _Opened:
        """The next upstream that streams the rest of the answer, asked for the original
        ``body`` plus the text so far.

        Raises:
            UpstreamError: ``error`` (what cut the answer), when no upstream continues it.
        """
        splice = self.splice
        assert splice is not None
        self.continuations += 1
        logger.warning(
            "upstream %s cut the stream (%s): continuing", self.attempt.upstream, error.type
        )
        try:
            return await _first_content(
                members,
                skip,
                open_stream,
                lambda: splice.continuation_body(body),
                self.dialect,
                attempts,
                True,
            )
        except UpstreamError:
            raise error from None


@dataclass
class Handover:
    """A resumable stream's upstream request, kept by its producer so that another worker can
    continue the stream when this one stops (``docs/resume.md``, "Handover").

    Never a secret: the upstreams by their config name (the URL and key come from the
    adopting worker's ``STREAMPLUS_UPSTREAMS``), no header, and a URL relative to the
    upstream's base URL (an absolute one may carry a key in its query).

    Attributes:
        request: ``method``, ``url`` (relative), ``json`` (the body: a JSON object),
            ``dialect`` (the upstream's), ``upstreams`` (names, or None: all), ``failover`` and
            ``max_continuations`` (the route's), ``continued`` (continuations before this
            producer's upstream: a failover's or a handover's).
        attempts: the upstreams this producer asked (``StreamInfo.attempts``): the
            continuations among them count against the budget too.
    """

    request: dict[str, Any]
    attempts: list[Attempt]

    @classmethod
    def of(
        cls,
        call: Mapping[str, Any],
        failover: str,
        max_continuations: int,
        attempts: list[Attempt],
    ) -> Handover | None:
        """The handover of the upstream request ``call`` (what
        :func:`~sanic_streamplus.upstream.upstream_events` was called with: ``method``,
        ``url``, ``json``, ``content``, ``headers``, ``dialect``, ``upstreams``), or None when
        it cannot be continued elsewhere: a raw ``content`` body or one that is not a JSON
        object, headers to send (forwarded or the handler's: they may hold a secret), an
        absolute URL, the ``plain`` dialect (no splice knows its text), or a budget of 0."""
        url, body = str(call["url"]), call.get("json")
        if (
            call.get("content") is not None
            or not isinstance(body, dict)
            or call.get("headers")
            or not httpx.URL(url).is_relative_url
            or call["dialect"] == "plain"
            or max_continuations <= 0
        ):
            return None
        upstreams = call.get("upstreams")
        request = {
            "method": str(call["method"]),
            "url": url,
            "json": body,
            "dialect": str(call["dialect"]),
            "upstreams": None if upstreams is None else list(upstreams),
            "failover": failover,
            "max_continuations": max_continuations,
            "continued": 0,
        }
        return cls(request, attempts)

    @property
    def continued(self) -> int:
        """Continuations so far: the stored count and this producer's upstreams' (an
        attempt that continued the stream and streamed)."""
        own = sum(1 for attempt in self.attempts if attempt.continuation and attempt.events)
        return int(self.request["continued"]) + own

    @property
    def continuable(self) -> bool:
        """The stream may be continued once more: its budget is not spent."""
        return self.continued < int(self.request["max_continuations"])

    def request_json(self) -> str:
        """:attr:`request` as JSON, with ``continued`` as it stands now."""
        return jsonlib.dumps({**self.request, "continued": self.continued})


def handover_events(
    pool: UpstreamPool,
    instruction: str | None,
    request: str,
    delivered: list[ServerSentEvent],
) -> tuple[AsyncIterator[ServerSentEvent], Handover] | None:
    """The continuation of a stream another worker handed over: ``request``
    (:meth:`Handover.request_json`) continued on ``pool``'s upstreams of that name, after the
    events ``delivered`` so far (read back from the store), as :func:`failover_events` continues
    a cut stream (the seams hidden); and the :class:`Handover` of the new producer. None when
    it cannot be continued: nothing was delivered, a tool call is in flight or the answer is
    complete (:attr:`~sanic_streamplus.splice.Splice.can_continue`), or this worker has no
    upstream of a name it names. (The budget was checked by the worker that handed it
    over: :attr:`Handover.continuable`.)"""
    spec = jsonlib.loads(request)
    handover = Handover(spec, [])
    dialect = get_dialect(spec["dialect"])
    splice = Splice(dialect, instruction=instruction)
    for event in delivered:
        splice.delivered(event)
    if not splice.can_continue:
        return None
    try:
        members = pool.select(spec["upstreams"])
    except ValueError:
        return None
    source = failover_events(
        members,
        spec["method"],
        spec["url"],
        dialect=dialect.name,
        attempts=handover.attempts,
        json=spec["json"],
        failover=spec["failover"],
        max_continuations=int(spec["max_continuations"]),
        instruction=instruction,
        splice=splice,
        continued=int(spec["continued"]),
    )
    return source, handover
