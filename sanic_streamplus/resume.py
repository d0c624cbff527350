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
  process killed) lets its lease lapse, and readers end with a ``producer_lost`` frame;
- **handover**: a worker that stops gracefully (with a :attr:`Resumer.continuer`: the Redis
  store) hands over the producers it can (a pass-through upstream route, see
  :class:`~sanic_streamplus.failover.Handover`): each stops reading its upstream, closes it
  and gives its lease up with the upstream request kept in the store; the first reader of the
  stream on a live worker adopts it and continues it there (the splice continuation, appended
  to the same stream), so every reader sees one stream.

It knows nothing of Redis or of Sanic's responses: the store and the relay do that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ._aio import close_completely
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
    UpstreamTruncated,
    error_record,
)
from .framing import Dialect, Format, get_dialect
from .machine import Commit, Cut, Ending, FinalFrame, Outcome, Refuse, StreamMachine
from .pump import Pump
from .sse import ServerSentEvent
from .store import EventStore, FencingError, SequenceMismatch, StreamRecord

if TYPE_CHECKING:
    from .failover import Handover

Continuer = Callable[
    [str, list[ServerSentEvent]], "tuple[AsyncIterator[ServerSentEvent], Handover] | None"
]
"""What continues a stream handed over: given the request its producer kept (JSON) and the
stream's events so far, the source of the rest and what to hand over next; or None when the
stream cannot be continued (see :func:`~sanic_streamplus.failover.handover_events`)."""

__all__ = ["Resumer", "is_stream_id", "new_stream_id", "parse_last_event_id"]

logger = logging.getLogger("sanic_streamplus")

_LEASE = 3.0  # seconds a producer's lease lasts; renewed every _TICK
_TICK = 1.0  # seconds between a producer's checks (lease, cancel, readers): a third of the lease
_BLOCK = 1.0  # seconds a reader waits in the store before it checks the producer
_BATCH = 1024  # events a producer may have waiting for the store before it waits too
# what the producer's machine writes: events, not bytes; a bare end marker ([DONE]) is not
# stored (a reader's own machine writes it), a data-carrying one (message_stop) is
_STORED = Format("stored", "", lambda event: b"", None, False)
# what new_stream_id() makes (the time in ms in base 36, 8 digits until 2059; 64 random bits in
# hex), and a sequence number (ASCII digits, below 2**63 as Redis stream IDs need)
_T = TypeVar("_T")
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
        handover: seconds a stream handed over by this worker when it stops may wait for
            another worker to adopt it, or None: no handover (its readers get ``shutdown``).
        continuer: what continues, in this worker, a stream another worker handed over
            (:data:`Continuer`), or None: this worker adopts none.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        ttl: float,
        grace: float,
        window: int,
        max_producers: int | None = None,
        handover: float | None = None,
        continuer: Continuer | None = None,
    ) -> None:
        self.store = store
        self.handover = handover
        self.continuer = continuer
        self._adopting: set[str] = set()  # streams this worker is adopting
        self.ttl = ttl
        self.grace = grace
        self.window = window
        self.max_producers = max_producers
        self.producers: dict[str, asyncio.Task[None]] = {}
        self.pumps: dict[str, Pump] = {}  # stream -> its producer's pump
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
        self,
        source: AsyncIterable[Any],
        dialect: Dialect,
        stream_id: str,
        handover: Handover | None = None,
    ) -> None:
        """Claim ``stream_id`` (just opened in the store) and run its producer on ``source``;
        ``handover``: the upstream request, when the stream may be handed over.

        Raises:
            FencingError: another producer holds the stream (the caller attaches instead).
        """
        token = secrets.token_hex(8)
        if not await self.store.claim(stream_id, token, _LEASE):
            raise FencingError(f"stream {stream_id} has a producer")
        self._run(source, dialect, stream_id, token, 0, handover)

    def _run(
        self,
        source: AsyncIterable[Any],
        dialect: Dialect,
        stream_id: str,
        token: str,
        seq: int,
        handover: Handover | None,
    ) -> None:
        """Run the producer of ``stream_id``, whose lease ``token`` holds, on ``source``, its
        events appended after ``seq``."""
        downstream = _StoreDownstream(self, stream_id, token, seq, handover)
        limit = max(1, min(_BATCH, self.window))  # events read ahead of the store
        pump = Pump(StreamMachine(dialect, _STORED), downstream, high_water_mark=limit)
        self.pumps[stream_id] = pump
        task = asyncio.ensure_future(self._produce(stream_id, token, source, pump))
        self.producers[stream_id] = task

        def done(_: object) -> None:
            self.producers.pop(stream_id, None)
            self.pumps.pop(stream_id, None)

        task.add_done_callback(done)

    async def _produce(
        self, stream_id: str, token: str, source: AsyncIterable[Any], pump: Pump
    ) -> None:
        """The producer: :class:`~sanic_streamplus.pump.Pump` ``source`` into the store (the
        same end rule as a live stream's), while :meth:`_watch` renews the lease."""
        watcher = asyncio.ensure_future(self._watch(stream_id, token, pump))
        try:
            await pump.run(source)
        finally:
            watcher.cancel()
        downstream: Any = pump.downstream
        if isinstance(pump.failure, SequenceMismatch):  # the store lost events: say so
            await _fail_lost(self.store, stream_id, token)
            return
        if downstream.state is None:  # the store failed, or the lease was lost: not ours
            if isinstance(pump.failure, StoreUnavailable):
                logger.warning("stream %s: the event store is unreachable; stopping", stream_id)
            else:
                logger.warning(
                    "stream %s: the producer lost its lease (%r); stopping", stream_id, pump.failure
                )
            return
        logger.info("stream %s produced: state=%s", stream_id, downstream.state)

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
            await self.store.finish(stream_id, token, "failed", error_record(error))

    async def _watch(self, stream_id: str, token: str, pump: Pump) -> None:
        """Renew the lease (one store operation a tick, which answers the record too); cancel
        the producer when asked to, when no reader is left, or when the lease is lost."""
        while True:
            await asyncio.sleep(_TICK)
            try:
                record = await self.store.renew(stream_id, token, _LEASE)
            except Exception:  # the store is unreachable: try again; the lease may lapse
                logger.warning("stream %s: the event store failed", stream_id, exc_info=True)
                continue
            if record is None or record.cancel_requested:
                break
            if record.reader_seen and time.time() - record.reader_seen > self.grace:
                logger.info("stream %s: no reader for %g s; stopping", stream_id, self.grace)
                break
        pump.cancel(StreamCancelled(stream_id))  # a lost lease: finishing it fails, as it must

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
            if not events and record.last_seq < after:  # the store lost what it had read:
                raise EventsExpired(stream_id, after)  # a failover to a replica behind it
            for seq, event in events:
                yield ServerSentEvent(event.data, event.event, f"{stream_id}:{seq}")
                after = readers[reader] = seq
            if events:
                self._moved(stream_id)
            if record.finished and after >= record.last_seq:
                _raise_ending(stream_id, record)
                return
            if record.producer_alive or record.finished or events:
                lost_since = None
            elif record.handover_until > time.time() and not self.closing:
                await self._adopt(stream_id, record)  # handed over: continue it here
                lost_since = None
            elif lost_since is None:
                lost_since = time.monotonic()
            elif time.monotonic() - lost_since > 2 * _LEASE:
                raise ProducerLost(stream_id)

    async def _adopt(self, stream_id: str, record: StreamRecord) -> None:
        """Adopt ``stream_id``, handed over by a worker that stopped, and continue it here
        (:attr:`continuer`), appending to the same stream; if it cannot be continued (see
        :func:`~sanic_streamplus.failover.handover_events`), finish it ``failed`` with
        :class:`~sanic_streamplus.errors.ServerShutdown` (its readers get a ``shutdown``
        frame), and if it was cancelled meanwhile, ``cancelled``. Nothing when another worker
        adopts it first, or this one has no continuer.

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        continuer = self.continuer
        if continuer is None or stream_id in self._adopting or stream_id in self.producers:
            return
        self._adopting.add(stream_id)
        try:
            token = secrets.token_hex(8)
            request = await self.store.adopt(stream_id, token, _LEASE)
            if request is None:
                return
            if record.cancel_requested:  # cancelled while no worker produced it
                await self.store.finish(stream_id, token, "cancelled")
                return
            stored = await self._stored(stream_id)
            continued = None
            try:
                continued = None if stored is None else continuer(request, stored[1])
            except Exception:  # a request this worker cannot read: end it, not a lapsed lease
                logger.exception("stream %s: the handed-over request is unreadable", stream_id)
            if stored is None or continued is None:
                logger.warning("stream %s: handed over, cannot be continued", stream_id)
                await self.store.finish(stream_id, token, "failed", error_record(ServerShutdown()))
                return
            logger.info("stream %s: adopted, continuing after %d events", stream_id, stored[0])
            dialect = get_dialect(record.info.get("dialect") or "plain")
            self._run(continued[0], dialect, stream_id, token, stored[0], continued[1])
        finally:
            self._adopting.discard(stream_id)

    async def _stored(self, stream_id: str) -> tuple[int, list[ServerSentEvent]] | None:
        """The last sequence number and every event of ``stream_id``, read from the store;
        None when the oldest were dropped by its cap (the text so far is not all there)."""
        events: list[ServerSentEvent] = []
        after = 0
        while True:
            read, record = await self.store.read(stream_id, after, 0)
            if record is None or (read and read[0][0] != after + 1):
                return None
            events += (event for _, event in read)
            after = read[-1][0] if read else after
            if not read or after >= record.last_seq:
                return (after, events) if after == record.last_seq else None

    async def cancel(self, stream_id: str) -> bool:
        """Cancel a running stream, in whatever worker produces it: its producer stops and
        closes its upstream, and its readers end with a ``cancelled`` frame. Returns False if
        the stream is unknown or already finished, or ``stream_id`` is not of the form of one.

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        if not is_stream_id(stream_id) or not await self.store.request_cancel(stream_id):
            return False
        pump = self.pumps.get(stream_id)
        if pump is not None:  # here: at once, without waiting for the producer's next check
            pump.cancel(StreamCancelled(stream_id))
        return True

    async def close(self) -> None:
        """Stop this worker's producers (the server stops): each is handed over (see
        :attr:`handover`) or ends with a ``shutdown`` frame; then close the store."""
        self.closing = True
        tasks = list(self.producers.values())
        for pump in list(self.pumps.values()):
            pump.shutdown()
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


def _raise_ending(stream_id: str, record: StreamRecord) -> None:
    """A finished stream read to its end: raise what its state says, if not ``completed``.

    Raises:
        StreamCancelled: it was cancelled.
        ReplayedError: its producer failed (the error it stored).
    """
    if record.state == "cancelled":
        raise StreamCancelled(stream_id)
    if record.state == "failed":
        raise _replayed(record)


async def _to_the_end(operation: Awaitable[_T]) -> _T:
    """Run a store operation to its end even if the caller is cancelled meanwhile (as
    :func:`~sanic_streamplus._aio.close_completely`), and return its result or raise its
    error (a cancelled caller gets ``CancelledError`` once it has ended)."""
    task = asyncio.ensure_future(operation)
    await close_completely(task)
    return task.result()


async def _fail_lost(store: EventStore, stream_id: str, token: str) -> None:
    """Fail ``stream_id`` with ``store_unavailable``: the store lost appends of its producer (a
    failover to a replica that had not got them), so it cannot be ended as if it had them."""
    logger.warning("stream %s: the event store lost events; failing it", stream_id)
    lost = StoreUnavailable("the event store lost events of this stream; start it again")
    with contextlib.suppress(Exception):
        await _to_the_end(store.finish(stream_id, token, "failed", error_record(lost)))


class _StoreDownstream:
    """The producer's :class:`~sanic_streamplus.downstream.Downstream`: the event store.

    Events wait while one ``append`` is in flight, and the next append takes all of them in one
    operation (one round trip to Redis for a burst: the pump's writer sends one batch per
    wake-up), as far as a reader of this worker that is still reading lets it: never more than
    the window ahead of it (the rest waits, and so does the upstream read). The end stores
    the final frame's events when the ending is no error of ours (completed, or the upstream's
    own error: readers pass it through), and finishes the record: ``completed``,
    ``cancelled`` or ``failed`` with the error (a reader's own machine makes its frame).

    Attributes:
        state: the state the record was finished with; None until then (and for good when the
            lease was lost: a :class:`~sanic_streamplus.store.FencingError` ends the pump).
    """

    __slots__ = (
        "_pending",
        "handover",
        "queued",
        "resumer",
        "seq",
        "state",
        "stream_id",
        "token",
    )

    def __init__(
        self,
        resumer: Resumer,
        stream_id: str,
        token: str,
        seq: int = 0,
        handover: Handover | None = None,
    ) -> None:
        self.resumer, self.stream_id, self.token = resumer, stream_id, token
        self.handover = handover
        self.queued = 0
        self.seq = seq  # this producer is the stream's only writer: the n-th event is seq n
        self.state: str | None = None
        self._pending: list[ServerSentEvent] = []

    def put(self, data: bytes, event: ServerSentEvent | None) -> None:
        if event is not None:
            self._pending.append(event)
            self.queued += 1

    def take(self) -> list[ServerSentEvent]:
        batch, self._pending, self.queued = self._pending, [], 0
        return batch

    async def send(self, batch: list[ServerSentEvent]) -> int:
        """Append ``batch``; then wait while a local reader lags the window behind.

        Raises:
            FencingError: the lease was lost.
        """
        resumer, stream_id = self.resumer, self.stream_id
        while batch:
            readers = resumer.readers.get(stream_id)
            room = resumer.window - (self.seq - min(readers.values())) if readers else len(batch)
            if room <= 0:  # the upstream read waits with it (backpressure, as without resuming)
                await resumer._wait_for_readers(stream_id, self.seq + 1)
                continue
            await resumer.store.append(stream_id, self.token, *batch[:room], last_seq=self.seq)
            self.seq += len(batch[:room])
            batch = batch[room:]
        return 0

    async def commit(self, commit: Commit) -> None:
        pass

    async def finish(self, frame: FinalFrame, ending: Ending) -> int:
        if ending.error is None and frame.events:
            with contextlib.suppress(Exception):  # what was stored before is kept
                self.seq = await _to_the_end(
                    self.resumer.store.append(
                        self.stream_id, self.token, *frame.events, last_seq=self.seq
                    )
                )
        await self._finish(ending)
        return 0

    async def refuse(self, refuse: Refuse, ending: Ending) -> None:
        await self._finish(ending)

    async def _finish(self, ending: Ending) -> None:
        if await self._hand_over(ending):
            return
        error = None
        if ending.outcome is Outcome.CANCELLED:
            state = "cancelled"
        elif ending.error is None:
            state = "completed"
        else:
            state, error = "failed", error_record(ending.error)
        store, stream_id = self.resumer.store, self.stream_id
        try:  # only if the store has every event of ours (a failover may have lost the last)
            await _to_the_end(store.finish(stream_id, self.token, state, error, last_seq=self.seq))
        except SequenceMismatch:
            await _fail_lost(store, stream_id, self.token)
            self.state = "failed"
            return
        except FencingError:
            return
        except Exception as exc:  # StoreUnavailable: its readers learn it from the store too
            logger.warning("stream %s: the end was not stored (%r)", stream_id, exc)
            return
        self.state = state

    async def _hand_over(self, ending: Ending) -> bool:
        """Hand the stream over instead of finishing it, when the server stops and another
        worker can continue it: after an event, with the upstream request known
        (:attr:`handover`) and its continuation budget not spent. True: done (or not ours)."""
        resumer, handover = self.resumer, self.handover
        if (
            not isinstance(ending.error, ServerShutdown)
            or resumer.handover is None
            or handover is None
            or not handover.continuable
            or self.seq == 0
        ):
            return False
        until = time.time() + resumer.handover
        try:
            await resumer.store.handover(
                self.stream_id, self.token, handover.request_json(), until, self.seq
            )
        except FencingError:  # not ours any more
            return True
        except StoreUnavailable:
            logger.warning("stream %s: the event store is unreachable", self.stream_id)
            return True
        logger.info("stream %s: handed over after %d events", self.stream_id, self.seq)
        self.state = "handed_over"
        return True

    async def cut(self, cut: Cut) -> None:
        pass

    def unblock(self) -> None:
        pass
