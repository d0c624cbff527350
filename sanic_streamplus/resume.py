"""Resumable streams: a producer detached from the client, readers that replay and go on live.

With ``@stream_post(resumable=True)``, a POST starts a *producer* task that consumes the handler's
events and appends them to the :class:`~sanic_streamplus.store.EventStore`; the client's
connection is a *reader* of the store, as is every later connection that resumes the stream:

- **stream identity**: each stream has an ID (``X-Stream-Id`` response header); every event it
  carries has ``id: <stream>:<seq>`` (only events with data exist here, so no id-only block);
- **idempotency**: a POST with an ``Idempotency-Key`` already bound to a stream attaches to it
  (replay, then live) instead of starting a second generation;
- **resume**: ``Last-Event-ID: <stream>:<seq>`` (as EventSource sends it) on the POST route or on
  the extension's ``GET <resume_path>/<stream>`` route replays every event after ``seq``, then
  goes on live; no gap and no duplicate, as the reader asks the store for ``seq + 1`` onward;
- **detached**: a reader leaving does not stop the producer; it stops once no reader has read for
  ``resume_grace`` seconds, or when cancelled;
- **cancel is not disconnect**: :meth:`Resumer.cancel` (or ``DELETE <resume_path>/<stream>``)
  stops the producer in whatever worker runs it, closes the upstream, and readers end with a
  ``cancelled`` frame;
- **exactly one producer**: the store's lease with a fencing token; a producer that dies (its
  process killed) lets its lease lapse, and readers end with a ``producer_lost`` frame.

It knows nothing of Redis or of Sanic's responses: the store and the relay do that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from typing import Any

from ._aio import aclose_iterator, close_completely
from .errors import (
    EventsExpired,
    ProducerLost,
    ReplayedError,
    ServerShutdown,
    StoreUnavailable,
    StreamCancelled,
    StreamExpired,
    StreamNotFound,
    StreamPlusError,
    UpstreamErrorEvent,
    UpstreamTruncated,
    error_body,
)
from .framing import Dialect, EventKind, to_event
from .machine import Outcome, outcome_for
from .relay import to_stream_error
from .sse import ServerSentEvent
from .store import EventStore, FencingError, StreamRecord

__all__ = ["Resumer", "is_stream_id", "new_stream_id", "parse_last_event_id"]

logger = logging.getLogger("sanic_streamplus")

_LEASE = 3.0  # seconds a producer's lease lasts; renewed every _TICK
_TICK = 0.5  # seconds between a producer's checks (lease, cancel, readers)
_BLOCK = 1.0  # seconds a reader waits in the store before it checks the producer
_BATCH = 1024  # events a producer may have waiting for the store before it waits too
# what new_stream_id() makes (the time in ms in base 36, 8 digits until 2059; 64 random bits in
# hex), and a sequence number (ASCII digits, below 2**63 as Redis stream IDs need)
_STREAM_ID = re.compile(r"[0-9a-z]{1,10}-[0-9a-f]{16}")
_SEQ = re.compile(r"[0-9]{1,18}")


def new_stream_id() -> str:
    """A new stream ID: its creation time (ms, base 36) and 64 random bits, e.g.
    ``lz3k9a1b-5f0c2e7a9d1b3c4e``; it never contains ``:``."""
    return f"{_base36(int(time.time() * 1000))}-{secrets.token_hex(8)}"


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while number:
        number, digit = divmod(number, 36)
        out = digits[digit] + out
    return out or "0"


def _created(stream_id: str) -> float | None:
    """The creation time (seconds since the epoch) in ``stream_id``, or None if malformed."""
    head, _, tail = stream_id.partition("-")
    if not head or len(tail) != 16:
        return None
    try:
        return int(head, 36) / 1000
    except ValueError:
        return None


def is_stream_id(value: str) -> bool:
    """True if ``value`` has the form of an ID :func:`new_stream_id` makes (lower-case ASCII
    letters and digits, a ``-``, 16 hex digits): anything else names no stream."""
    return _STREAM_ID.fullmatch(value) is not None


def parse_last_event_id(value: str) -> tuple[str, int]:
    """Split a ``Last-Event-ID`` of this package's form ``<stream>:<seq>``: a stream ID (see
    :func:`is_stream_id`) and 1 to 18 ASCII digits.

    Raises:
        StreamNotFound: the value is not of that form (404, whatever its characters).
    """
    stream_id, _, seq = value.strip().rpartition(":")
    if not is_stream_id(stream_id) or _SEQ.fullmatch(seq) is None:
        raise StreamNotFound(value[:100])
    return stream_id, int(seq)


class Resumer:
    """The resumable streams of one worker: starts producers, makes readers, cancels.

    Args:
        store: the :class:`~sanic_streamplus.store.EventStore`.
        ttl: seconds a stream is kept after its last event (the store's TTL), used to tell an
            expired stream (410) from an unknown one (404).
        grace: seconds a producer goes on with no reader before it stops.
        window: the most events a producer may run ahead of a reader of the same worker that
            is still reading (half the store's cap: such a reader never falls off it); readers
            in other workers, and the ones that left, do not hold it back.
        max_producers: the most producers running or starting in this worker (see
            :meth:`reserve`), or None for no limit.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        ttl: float,
        grace: float,
        window: int,
        max_producers: int | None = None,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.grace = grace
        self.window = window
        self.max_producers = max_producers
        self.producers: dict[str, asyncio.Task[None]] = {}
        self._starting: set[object] = set()  # places held by producers about to start
        self.readers: dict[str, dict[object, int]] = {}  # stream -> reader -> seq it has read
        self.advanced: dict[str, asyncio.Event] = {}  # stream -> a local reader moved on
        self.closing = False  # the server is stopping: a cancelled producer failed with shutdown

    def reserve(self) -> object | None:
        """Hold a place for one more producer under ``max_producers``, for a stream about to be
        opened: its token, to give to :meth:`release` once the producer started (it then
        counts itself) or will not; None when the producers running and starting fill the
        limit."""
        limit = self.max_producers
        if limit is not None and len(self.producers) + len(self._starting) >= limit:
            return None
        place = object()
        self._starting.add(place)
        return place

    def release(self, place: object) -> None:
        """Give back a place :meth:`reserve` held."""
        self._starting.discard(place)

    async def start(
        self, source: AsyncIterable[Any], dialect: Dialect, stream_id: str
    ) -> None:
        """Claim ``stream_id`` (just opened in the store) and run its producer on ``source``.

        Raises:
            FencingError: another producer holds the stream (the caller attaches instead).
        """
        token = secrets.token_hex(8)
        if not await self.store.claim(stream_id, token, _LEASE):
            raise FencingError(f"stream {stream_id} has a producer")
        task = asyncio.ensure_future(self._produce(stream_id, token, source, dialect))
        self.producers[stream_id] = task
        task.add_done_callback(lambda _: self.producers.pop(stream_id, None))

    async def _produce(
        self, stream_id: str, token: str, source: AsyncIterable[Any], dialect: Dialect
    ) -> None:
        store = self.store
        state, error = "completed", None
        iterator = source.__aiter__()
        watcher = asyncio.ensure_future(self._watch(stream_id, token, asyncio.current_task()))
        appender = _Appender(store, stream_id, token)
        seq = 0  # this producer is the stream's only writer: the n-th event is seq n
        classify, finished = dialect.classify, False  # a FINISH event went by
        try:
            async for item in iterator:
                event = to_event(item)
                kind = classify(event)
                if kind is EventKind.TERMINAL:
                    if dialect.end_is_data:  # message_stop, response.completed: readers need it
                        await appender.put(event)
                    break
                if kind is EventKind.UPSTREAM_ERROR:  # stored as it came: readers end at it
                    raise UpstreamErrorEvent.from_event(event, dialect.name)
                finished = finished or kind is EventKind.FINISH
                await appender.put(event)
                seq += 1
                readers = self.readers.get(stream_id)
                if readers and seq - min(readers.values()) > self.window:
                    await self._wait_for_readers(stream_id, seq)
            else:
                if not dialect.complete_without_end(finished):
                    raise UpstreamTruncated(dialect.name)
            await appender.drain()
        except asyncio.CancelledError:
            state = "cancelled"
            if self.closing:
                state, error = "failed", error_body(ServerShutdown())["error"]
        except FencingError:
            logger.warning("stream %s: the producer lost its lease; stopping", stream_id)
            return
        except Exception as exc:
            failure = to_stream_error(exc)
            if outcome_for(failure) is Outcome.INTERNAL_ERROR:
                logger.exception("stream handler failed", exc_info=exc)
            if isinstance(exc, UpstreamErrorEvent) and exc.dialect == dialect.name:
                with contextlib.suppress(Exception):  # its own frame: readers pass it through
                    await appender.put(exc.event)
            state, error = "failed", error_body(failure)["error"]
        finally:
            watcher.cancel()
            await close_completely(aclose_iterator(iterator))
        with contextlib.suppress(Exception):  # what was read before a failure is kept
            await close_completely(appender.drain())
        try:
            await close_completely(store.finish(stream_id, token, state, error))
        except FencingError:
            pass
        except StoreUnavailable:  # its readers learn it from the store they cannot read either
            logger.warning("stream %s: the event store is unreachable; end not stored", stream_id)
        logger.info("stream %s produced: state=%s", stream_id, state)

    async def _wait_for_readers(self, stream_id: str, seq: int) -> None:
        """Hold the producer while a reader of this worker is more than ``window`` events
        behind ``seq`` (the upstream read waits with it: backpressure, as without resumption)."""
        advanced = self.advanced.setdefault(stream_id, asyncio.Event())
        window = self.window
        while (readers := self.readers.get(stream_id)) and seq - min(readers.values()) > window:
            advanced.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(advanced.wait(), _TICK)

    async def fail(self, stream_id: str, error: StreamPlusError) -> None:
        """Finish ``stream_id`` (just opened) as failed with ``error`` without a producer: its
        handler refused the request, and a retry with the same key must learn it."""
        token = secrets.token_hex(8)
        if await self.store.claim(stream_id, token, _LEASE):
            await self.store.finish(stream_id, token, "failed", error_body(error)["error"])

    async def _watch(self, stream_id: str, token: str, producer: asyncio.Task[Any] | None) -> None:
        """Renew the lease; stop the producer when cancelled or when no reader is left."""
        while True:
            await asyncio.sleep(_TICK)
            try:
                record = await self.store.record(stream_id)
                renewed = await self.store.renew(stream_id, token, _LEASE)
            except Exception:  # the store is unreachable: try again; the lease may lapse
                logger.warning("stream %s: the event store failed", stream_id, exc_info=True)
                continue
            if record is None or not renewed or record.cancel_requested:
                break
            if record.reader_seen and time.time() - record.reader_seen > self.grace:
                logger.info("stream %s: no reader for %g s; stopping", stream_id, self.grace)
                break
        if producer is not None:
            producer.cancel()

    async def check(self, stream_id: str, after: int) -> StreamRecord:
        """The record of a stream about to be read after ``after``, for a clear answer before
        anything is sent.

        Raises:
            StreamNotFound: unknown ID (404).
            StreamExpired: the stream expired (410).
            EventsExpired: events after ``after`` were dropped by the store's cap (410).
            StoreUnavailable: the store cannot be reached (503).
        """
        if not is_stream_id(stream_id):  # never sent to the store
            raise StreamNotFound(stream_id[:100])
        record = await self.store.record(stream_id)
        if record is None:
            created = _created(stream_id)
            if created is not None and time.time() - created > self.ttl:
                raise StreamExpired(stream_id)
            raise StreamNotFound(stream_id)
        if after + 1 < record.first_seq or after > record.last_seq:
            raise EventsExpired(stream_id, after)
        return record

    async def events(self, stream_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
        """Read ``stream_id`` after sequence number ``after``: every stored event, then each new
        one as it is appended, with ``id`` ``<stream>:<seq>``; ends when the stream completed.

        Raises:
            StreamCancelled: the stream was cancelled.
            ReplayedError: the producer failed; the error it stored.
            ProducerLost: the producer stopped renewing its lease without finishing.
            EventsExpired: this reader fell behind the store's cap.
            StreamExpired: the stream expired while being read.
        """
        reader = object()
        readers = self.readers.setdefault(stream_id, {})
        readers[reader] = after
        try:
            async with contextlib.aclosing(self._read(stream_id, after, reader, readers)) as read:
                async for event in read:
                    yield event
        finally:
            del readers[reader]
            if not readers:
                self.readers.pop(stream_id, None)
                self.advanced.pop(stream_id, None)
            self._moved(stream_id)

    def _moved(self, stream_id: str) -> None:
        advanced = self.advanced.get(stream_id)
        if advanced is not None:
            advanced.set()

    async def _read(
        self, stream_id: str, after: int, reader: object, readers: dict[object, int]
    ) -> AsyncGenerator[ServerSentEvent, None]:
        lost_since: float | None = None
        while True:
            events, record = await self.store.read(stream_id, after, _BLOCK)
            if record is None:
                raise StreamExpired(stream_id)
            first = events[0][0] if events else record.first_seq
            if first > after + 1:  # dropped by the store's cap before this reader got them
                raise EventsExpired(stream_id, after)
            for seq, event in events:
                yield ServerSentEvent(event.data, event.event, f"{stream_id}:{seq}")
                after = readers[reader] = seq
            if events:
                self._moved(stream_id)
            if record.finished and after >= record.last_seq:
                if record.state == "cancelled":
                    raise StreamCancelled(stream_id)
                if record.state == "failed":
                    raise _replayed(record)
                return
            if record.producer_alive or record.finished or events:
                lost_since = None
            elif lost_since is None:
                lost_since = time.monotonic()
            elif time.monotonic() - lost_since > 2 * _LEASE:
                raise ProducerLost(stream_id)

    async def cancel(self, stream_id: str) -> bool:
        """Cancel a running stream, in whatever worker produces it: its producer stops and
        closes its upstream, and its readers end with a ``cancelled`` frame. Returns False if
        the stream is unknown or already finished, or ``stream_id`` is not of the form of one.

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        if not is_stream_id(stream_id) or not await self.store.request_cancel(stream_id):
            return False
        task = self.producers.get(stream_id)
        if task is not None:  # here: at once, without waiting for the producer's next check
            task.cancel()
        return True

    async def close(self) -> None:
        """Cancel this worker's producers and close the store."""
        self.closing = True
        tasks = list(self.producers.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self.store.close()


def _replayed(record: StreamRecord) -> StreamPlusError:
    """The error a failed stream's readers end with: the stored one, as
    :class:`~sanic_streamplus.errors.ReplayedError`, or for a truncated upstream an
    :class:`~sanic_streamplus.errors.UpstreamTruncated` (its outcome: ``upstream_truncated``)."""
    stored = record.error or {}
    if stored.get("type") == UpstreamTruncated.type:
        truncated = UpstreamTruncated(str(record.info.get("dialect") or "plain"))
        truncated.message = str(stored.get("message") or truncated.message)
        return truncated
    return ReplayedError(stored)


class _Appender:
    """Write-behind for a producer: events wait while one ``append`` is in flight, and the
    next append takes all of them in one operation (one round trip to Redis for a burst)."""

    def __init__(self, store: EventStore, stream_id: str, token: str) -> None:
        self.store, self.stream_id, self.token = store, stream_id, token
        self.pending: list[ServerSentEvent] = []
        self.writing: asyncio.Task[int] | None = None
        self.failure: BaseException | None = None
        self.idle = asyncio.Event()
        self.idle.set()

    async def put(self, event: ServerSentEvent) -> None:
        """Queue ``event``; wait only while ``_BATCH`` events are queued already.

        Raises:
            FencingError: an earlier append found the lease lost.
        """
        if self.failure is not None:
            raise self.failure
        self.pending.append(event)
        if self.writing is None:
            self._write()
        while len(self.pending) >= _BATCH and self.failure is None:
            await self._written()

    async def drain(self) -> None:
        """Wait until every queued event is stored.

        Raises:
            FencingError: an append found the lease lost.
        """
        while (self.writing is not None or self.pending) and self.failure is None:
            await self._written()
        if self.failure is not None:
            raise self.failure

    async def _written(self) -> None:
        self.idle.clear()
        await self.idle.wait()

    def _write(self) -> None:
        batch, self.pending = self.pending, []
        self.writing = asyncio.ensure_future(self.store.append(self.stream_id, self.token, *batch))
        self.writing.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[int]) -> None:
        self.writing = None
        if task.cancelled():
            self.failure = asyncio.CancelledError()
        elif task.exception() is not None:
            self.failure = task.exception()
        elif self.pending:
            self._write()
        self.idle.set()
