"""The stream machine: what one relayed stream does, decided without I/O.

In the style of h11's ``Connection``: a plain object that is told what happened (an input
method) and answers with what to do (a list of outputs), so every rule about commit points,
heartbeats, endings and frames lives here once, and the adapters (a Sanic response, an ASGI
send, the event store of a resumable stream, a list in a test) only do the I/O. No asyncio,
no sockets, no clock: timers are the adapter's, and it says when one fired.

Phases (one :class:`Phase`)::

            event / heartbeat due: Commit
    WAITING ─────────────────────────────▶ COMMITTED
       │ source ended / failed · terminal ·     │ source ended / failed · terminal ·
       │ upstream error · shutdown · cancel     │ upstream error · shutdown · cancel
       ▼                                        ▼
     ENDING  (the ending is fixed, the source closed; before_final_frame hooks run;
       │      heartbeats go on if committed, and cannot commit any more)
       │ finish(): Refuse (JSON answer) or [Commit] + FinalFrame
       ▼
     CLOSING (the final frame / answer is being written)
       │ drained()
       ▼
     ENDED   ◀── client left (any phase: the source closed, nothing more written)
             ◀── send timed out (COMMITTED, ENDING, CLOSING: Cut)

The first ending wins and is final (:class:`Ending`: an :class:`Outcome` and the error, if
any). Whatever comes later (a timer, the client leaving, a shutdown, a late event of the
source) changes neither the outcome nor the frame; it may only stop the I/O sooner (a cut).
The source is closed exactly once (:class:`CloseSource`, when the ending is fixed), nothing is
written after the final frame, the response is committed at most once, and the final frame is
made once (:class:`FinalFrame`, or the last word of a :class:`Cut`).

Stream integrity, per dialect (:meth:`~sanic_streamplus.framing.Dialect.classify` tells the
machine what each event is): a source that ends without its dialect's terminal event is
``upstream_truncated`` (an error frame in the dialect, then the end; before the commit point a
502 answer), except where the dialect says the answer was complete anyway (OpenAI chat: a
``finish_reason`` went by, so ``[DONE]`` is written for it; plain: always). An upstream's
in-band error is ``upstream_error``: its own frame goes through once, as the final frame,
followed by the dialect's bare end marker where it has one (``[DONE]``) and by nothing of ours.

Per-stream dialect state: the machine keeps the stream's last START event and its last event
(what the Responses dialect's error frame repeats: the response ``id``, the next
``sequence_number``) and hands them to :meth:`~sanic_streamplus.framing.Dialect.error_frame`;
the dialect object itself stays unchanged, so one can serve every stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from .errors import (
    DownstreamError,
    EventTooLarge,
    InvalidRequest,
    ProducerLost,
    ReplayedError,
    ResumeError,
    SendTimeout,
    ServerShutdown,
    SlowClient,
    StoreUnavailable,
    StreamCancelled,
    StreamPlusError,
    TooManyStreams,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamTruncated,
)
from .framing import Dialect, EventKind, Format
from .sse import ServerSentEvent

__all__ = [
    "CloseSource",
    "Commit",
    "Cut",
    "Ending",
    "EventKind",
    "FinalFrame",
    "Outcome",
    "Output",
    "Phase",
    "Refuse",
    "StreamMachine",
    "StreamStateError",
    "Write",
    "outcome_for",
]


class Outcome(str, Enum):
    """How a stream ended: the one list used by the log line, ``StreamInfo.outcome``, the
    metrics label and the span attribute (str-valued: ``Outcome.COMPLETED == "completed"``).

    ====================== ====================================================================
    ``completed``          the source ended complete (its end marker, or what its dialect
                           accepts instead) and the end frames went out
    ``client_disconnected`` the client went away, or was cut for falling behind (``slow_client``)
    ``upstream_error``     the upstream failed, refused, reported an error in its stream, or sent
                           what cannot be relayed
    ``upstream_truncated`` the upstream's stream ended without its dialect's end event
    ``rate_limited``       the upstream answered 429, or this server is at ``max_streams``
    ``timeout``            a connect, first-event, idle, total (upstream) or send (downstream)
                           timeout
    ``cancelled``          the stream was cancelled (``DELETE``, or no reader for the grace)
    ``shutdown``           the server stopped while the stream ran
    ``invalid_request``    the handler refused the request (4xx), or a resume asked for what
                           is not there
    ``internal_error``     a bug: the handler raised something else (the traceback is logged)
    ====================== ====================================================================
    """

    COMPLETED = "completed"
    CLIENT_DISCONNECTED = "client_disconnected"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TRUNCATED = "upstream_truncated"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"
    INVALID_REQUEST = "invalid_request"
    INTERNAL_ERROR = "internal_error"

    def __str__(self) -> str:  # "completed", not "Outcome.COMPLETED" (StrEnum is 3.11+)
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


# first match wins: subclasses before their bases
_OUTCOMES: tuple[tuple[type[StreamPlusError], Outcome], ...] = (
    (ServerShutdown, Outcome.SHUTDOWN),
    (StreamCancelled, Outcome.CANCELLED),
    (UpstreamTruncated, Outcome.UPSTREAM_TRUNCATED),
    (UpstreamTimeout, Outcome.TIMEOUT),
    (SendTimeout, Outcome.TIMEOUT),
    (SlowClient, Outcome.CLIENT_DISCONNECTED),
    (TooManyStreams, Outcome.RATE_LIMITED),
    (UpstreamError, Outcome.UPSTREAM_ERROR),
    (EventTooLarge, Outcome.UPSTREAM_ERROR),
    (ProducerLost, Outcome.UPSTREAM_ERROR),
    (StoreUnavailable, Outcome.UPSTREAM_ERROR),  # a backend failed, as the upstream can
    (ReplayedError, Outcome.UPSTREAM_ERROR),
    (InvalidRequest, Outcome.INVALID_REQUEST),
    (ResumeError, Outcome.INVALID_REQUEST),
)


def outcome_for(error: StreamPlusError) -> Outcome:
    """The :class:`Outcome` of a stream that ended with ``error``: an upstream 429 is
    ``rate_limited``; see :class:`Outcome` for the rest (anything unknown: ``internal_error``)."""
    if isinstance(error, UpstreamStatusError) and error.upstream_status == 429:
        return Outcome.RATE_LIMITED
    for kind, outcome in _OUTCOMES:
        if isinstance(error, kind):
            return outcome
    return Outcome.INTERNAL_ERROR


class Phase(Enum):
    """Where a stream is (see the module's diagram)."""

    WAITING = "waiting"  # nothing sent yet: the status can still change
    COMMITTED = "committed"  # the status line and headers went out (200)
    ENDING = "ending"  # the ending is fixed and the source closed; no final frame yet
    CLOSING = "closing"  # the final frame (or the JSON answer) is being written
    ENDED = "ended"  # nothing more is written


@dataclass(frozen=True)
class Ending:
    """Why a stream ended: its outcome and our error, if any. Fixed once: the first ending
    wins. ``error`` is None when no frame of ours reports it: ``completed``, a plain client
    disconnect, and the upstream's in-band error (``upstream_error``; its own frame went
    through as it was)."""

    outcome: Outcome
    error: StreamPlusError | None = None


@dataclass(frozen=True)
class Commit:
    """Send the status line and these headers (``Content-Type`` included)."""

    status: int
    headers: tuple[tuple[str, str], ...]


@dataclass(slots=True)
class Write:
    """Write ``data`` (bytes) to the client; ``event`` is the event it encodes (None for a
    heartbeat), for an adapter that stores events or merges text deltas. One per event: not
    frozen (a frozen dataclass costs about three times as much to make); treat it as
    read-only."""

    data: bytes
    event: ServerSentEvent | None = None


@dataclass(frozen=True)
class Refuse:
    """Answer with this instead of a stream (before the commit point): ``status``, the UTF-8
    JSON ``body`` and ``headers`` (``Content-Type`` and ``Retry-After`` when there is one)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class FinalFrame:
    """Write ``data`` (bytes, maybe empty), then end the body; call
    :meth:`StreamMachine.drained` once that is done. ``events`` are the events ``data``
    encodes (for an adapter that stores events: a resumable stream's producer)."""

    data: bytes
    events: tuple[ServerSentEvent, ...] = ()


@dataclass(frozen=True)
class Cut:
    """The client stopped draining: put ``data`` (the last word, maybe empty) into the
    transport's buffer without waiting for it, and close the connection."""

    ending: Ending
    data: bytes


@dataclass(frozen=True)
class CloseSource:
    """Close the source (``aclose()`` the upstream or the handler's generator), completely."""


Output = Commit | Write | Refuse | FinalFrame | Cut | CloseSource


class StreamStateError(RuntimeError):
    """An input that cannot happen in the machine's phase: a bug in the adapter driving it
    (like h11's ``LocalProtocolError``), never the client's or the upstream's doing."""


_LIVE = (Phase.WAITING, Phase.COMMITTED)


class StreamMachine:
    """The sans-IO state of one stream (see the module docstring).

    Args:
        dialect: the stream's :class:`~sanic_streamplus.framing.Dialect` (not changed: the
            per-stream state it needs is kept here).
        format: the output :class:`~sanic_streamplus.framing.Format`.
        headers: the response headers of a committed stream, without ``Content-Type`` (the
            format's).

    Attributes:
        phase: the current :class:`Phase`.
        ending: the :class:`Ending` once fixed, else None.
        status: the HTTP status the client got (200 once committed, the answer's status when
            refused, 499 for a client that left before either), or None while undecided.
        events: events written (end markers, error frames and heartbeats not counted).
        bytes: bytes the adapter reported written (:meth:`written`).
    """

    __slots__ = (
        "_beat",
        "_encode",
        "_finished",
        "_headers",
        "_last",
        "_last_word",
        "_refusal",
        "_started",
        "bytes",
        "dialect",
        "ending",
        "events",
        "format",
        "phase",
        "status",
    )

    def __init__(
        self, dialect: Dialect, format: Format, headers: Mapping[str, str] | None = None
    ) -> None:
        self.dialect = dialect
        self.format = format
        self.phase = Phase.WAITING
        self.ending: Ending | None = None
        self.status: int | None = None
        self.events = 0
        self.bytes = 0
        self._headers = (*(headers or {}).items(), ("Content-Type", format.content_type))
        self._encode = format.encode
        self._beat = dialect.heartbeat(format)
        self._started: ServerSentEvent | None = None  # the last START event (error frames)
        self._last: ServerSentEvent | None = None  # the last event (error frames)
        self._finished = False  # a FINISH event went by (integrity, OpenAI chat)
        self._last_word: list[ServerSentEvent] = []  # the final frame's events, once ending
        self._refusal: Refuse | None = None  # the JSON answer, for an ending before commit

    # ------------------------------------------------------------------ source inputs

    def event(self, event: ServerSentEvent, kind: EventKind) -> list[Output]:
        """The source produced ``event``, of ``kind`` (``dialect.classify(event)``).

        Returns: ``[Commit, Write]`` for the first event, ``[Write]`` after; for a TERMINAL
        event or an upstream error, ``[CloseSource]`` (the event is the final frame);
        ``[]`` once the stream is ending (a late event of a closed source is dropped).
        """
        if self.phase not in _LIVE:
            return []
        if kind is EventKind.TERMINAL:
            return self._end(Ending(Outcome.COMPLETED), [event])
        if kind is EventKind.UPSTREAM_ERROR:  # its own report: no error of ours
            return self._end(Ending(Outcome.UPSTREAM_ERROR), [event], passthrough=True)
        if kind is EventKind.START:
            self._started = event
        elif kind is EventKind.FINISH:
            self._finished = True
        self._last = event
        self.events += 1
        write = Write(self._encode(event), event)
        if self.phase is Phase.WAITING:
            return [self._commit(), write]
        return [write]

    def feed(self, event: ServerSentEvent, kind: EventKind) -> bytes | None:
        """:meth:`event` for the hot path: for an event that needs nothing but a write (a
        committed stream, ``kind`` OTHER, TEXT_DELTA or USAGE), count it and return its bytes
        (what :meth:`event`'s ``Write`` would carry, without making one); else None and nothing
        changed (call :meth:`event`)."""
        if self.phase is not Phase.COMMITTED or (
            kind is not EventKind.OTHER
            and kind is not EventKind.TEXT_DELTA
            and kind is not EventKind.USAGE
        ):
            return None
        self._last = event
        self.events += 1
        return self._encode(event)

    def source_ended(self) -> list[Output]:
        """The source is exhausted. Complete if the dialect says so
        (:meth:`~sanic_streamplus.framing.Dialect.complete_without_end`): its end events go
        out; else ``upstream_truncated``: its error frame (a 502 answer before the commit
        point). Returns ``[CloseSource]`` (``[]`` once ending)."""
        if self.phase not in _LIVE:
            return []
        if self.dialect.complete_without_end(self._finished):
            return self._end(Ending(Outcome.COMPLETED), self.dialect.end_events())
        return self._fail(UpstreamTruncated(self.dialect.name))

    def source_failed(self, error: StreamPlusError) -> list[Output]:
        """The source raised ``error`` (the adapter maps any exception with
        :func:`~sanic_streamplus.relay.to_stream_error`). Returns ``[CloseSource]``; the error
        frame, or the JSON answer before the commit point, comes with :meth:`finish`."""
        return self._fail(error) if self.phase in _LIVE else []

    # ------------------------------------------------------------------ outside inputs

    def heartbeat_due(self) -> list[Output]:
        """Nothing was written for the heartbeat interval. Returns ``[Commit, Write]`` while
        waiting, ``[Write]`` once committed (also while ending: hooks may take a while), and
        ``[]`` when a heartbeat may not commit (ending before the commit point), after the
        final frame, or when the format has no heartbeat."""
        if self._beat is None or self.phase in (Phase.CLOSING, Phase.ENDED):
            return []
        beat = Write(self._beat)
        if self.phase is Phase.WAITING:
            return [self._commit(), beat]
        if self.phase is Phase.ENDING and self.status is None:
            return []  # sealed: an ending before the commit point answers with a status
        return [beat]

    def send_timed_out(self, error: DownstreamError) -> list[Output]:
        """A write did not drain in time (:class:`~sanic_streamplus.errors.SendTimeout`), or
        the client fell a high-water mark behind (:class:`~sanic_streamplus.errors.SlowClient`).
        Returns ``[CloseSource, Cut]`` (the cut's last word: the error frame) when committed;
        ``[Cut]`` while ending (the ending stays; its frame is the last word) or closing (no
        second frame); ``[]`` once ended.

        Raises:
            StreamStateError: nothing was being written (no commit yet).
        """
        if self.phase is Phase.ENDED:
            return []
        if self.status is None:
            raise StreamStateError(f"a send timed out in phase {self.phase.value}: none was sent")
        out: list[Output] = []
        if self.phase is Phase.COMMITTED:
            out = self._fail(error)  # now ENDING, with this error's frame
        last_word = self._frame() if self.phase is Phase.ENDING else b""  # CLOSING: sent
        self.phase = Phase.ENDED
        assert self.ending is not None
        return [*out, Cut(self.ending, last_word)]

    def client_left(self) -> list[Output]:
        """The client went away. Returns ``[CloseSource]`` unless the ending was fixed already
        (it stays; then ``[]``); the stream is ENDED: nothing more is written."""
        out: list[Output] = []
        if self.phase in _LIVE:
            out = self._end(Ending(Outcome.CLIENT_DISCONNECTED), [])
        if self.status is None:  # it left before the commit or an answer
            self.status = 499
        self.phase = Phase.ENDED
        return out

    def shutdown(self) -> list[Output]:
        """The server is stopping: end with
        :class:`~sanic_streamplus.errors.ServerShutdown` (``[CloseSource]``; ``[]`` once
        ending): its error frame, or a 503 answer before the commit point."""
        return self._fail(ServerShutdown()) if self.phase in _LIVE else []

    def cancel(self, error: StreamPlusError) -> list[Output]:
        """Someone asked the stream to stop (``error``: typically
        :class:`~sanic_streamplus.errors.StreamCancelled`); outcome ``cancelled`` whatever the
        error's class. Returns ``[CloseSource]`` (``[]`` once ending)."""
        if self.phase not in _LIVE:
            return []
        return self._fail(error, Outcome.CANCELLED)

    # ------------------------------------------------------------------ adapter inputs

    def finish(self) -> list[Output]:
        """Write the end now (the ``before_final_frame`` hooks ran). Returns ``[Refuse]`` for
        an error before the commit point, else ``[FinalFrame]`` (after a ``Commit`` when none
        was made yet); ``[]`` if the stream ended meanwhile (client left, cut).

        Raises:
            StreamStateError: the stream is not ending (no ending yet, or finished already).
        """
        if self.phase is Phase.ENDED:
            return []
        if self.phase is not Phase.ENDING:
            raise StreamStateError(f"finish() in phase {self.phase.value}")
        self.phase = Phase.CLOSING
        if self._refusal is not None:
            self.status = self._refusal.status
            return [self._refusal]
        out: list[Output] = [] if self.status is not None else [self._commit()]
        events = self._final_events()
        return [*out, FinalFrame(b"".join(map(self._encode, events)), tuple(events))]

    def drained(self) -> list[Output]:
        """The final frame (or the answer) was written and the body ended: the stream is
        ENDED. Returns ``[]``.

        Raises:
            StreamStateError: no final frame or answer was asked for.
        """
        if self.phase not in (Phase.CLOSING, Phase.ENDED):
            raise StreamStateError(f"drained() in phase {self.phase.value}")
        self.phase = Phase.ENDED
        return []

    def written(self, nbytes: int) -> None:
        """``nbytes`` (bytes) reached the client's transport (for the stats).

        Raises:
            StreamStateError: nothing may have been written (no commit, no answer).
        """
        if self.status is None:
            raise StreamStateError("bytes written before a commit or an answer")
        self.bytes += nbytes

    # ------------------------------------------------------------------ internals

    def _commit(self) -> Commit:
        self.status = 200
        if self.phase is Phase.WAITING:
            self.phase = Phase.COMMITTED
        return Commit(200, self._headers)

    def _fail(self, error: StreamPlusError, outcome: Outcome | None = None) -> list[Output]:
        ending = Ending(outcome or outcome_for(error), error)
        if self.status is None:  # before the commit point: a JSON answer, no frame
            status, body, headers = self.dialect.answer(error)
            self._refusal = Refuse(status, body, tuple(headers.items()))
            return self._end(ending, [])
        return self._end(ending, self.dialect.error_frame(error, self._started, self._last))

    def _end(
        self, ending: Ending, last_word: list[ServerSentEvent], passthrough: bool = False
    ) -> list[Output]:
        """Fix ``ending`` (the caller checked there was none) and the final frame's events:
        ``last_word``, then the dialect's bare end marker after an upstream's own error
        (``passthrough``)."""
        self.ending = ending
        self._last_word = [*last_word, *self.dialect.end_events()] if passthrough else last_word
        self.phase = Phase.ENDING
        return [CloseSource()]

    def _final_events(self) -> list[ServerSentEvent]:
        """The final frame's events; a bare end marker (``[DONE]``) only where the format
        writes one. Called once per stream (finish, or the cut's last word)."""
        events = self._last_word
        if not (self.format.writes_end or self.dialect.end_is_data):
            classify = self.dialect.classify
            events = [event for event in events if classify(event) is not EventKind.TERMINAL]
        return events

    def _frame(self) -> bytes:
        return b"".join(map(self._encode, self._final_events()))
