"""One pump for every stream: a source driven through a
:class:`~sanic_streamplus.machine.StreamMachine` into a
:class:`~sanic_streamplus.downstream.Downstream`.

The live relay (a Sanic response, native or ASGI) and the resumable producer (the event store)
are the same :class:`Pump` over different downstreams, so the end rule, the error mapping, the
timers and the log line exist once. Two tasks per stream, each with one job:

- the **reader** (a task of the pump's own) reads the source, classifies each event
  (:meth:`~sanic_streamplus.framing.Dialect.end_kind`: cheap, parsed only when it may end the
  stream), feeds the machine and queues its writes on the downstream without waiting; it waits
  only once ``high_water_mark`` is queued (backpressure: no upstream read before the writer took
  the batch). It closes the source, completely, whenever it stops, then runs the
  ``before_final_frame`` hooks.
- the **writer** (the caller's task: Sanic's handler task, or the producer's) commits, sends
  everything queued in one write whenever it wakes (so all the events of one upstream read leave
  in one write), and writes the end the machine decides: the final frame, the JSON answer, or
  the cut.

Outside inputs (:meth:`Pump.shutdown`, :meth:`Pump.cancel`, :meth:`Pump.client_left`, the
timer) go to the machine; the :class:`~sanic_streamplus.machine.CloseSource` it answers with is
carried out by cancelling the reader, a task with no other job: *why* it stopped is the
machine's :class:`~sanic_streamplus.machine.Ending`, fixed already. One timer per stream serves
the heartbeat (nothing written for ``heartbeat`` seconds) and the send watchdog (a write that did
not drain within ``send_timeout`` seconds); it only calls machine inputs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING, Any

from sanic.exceptions import SanicException

from ._aio import Wake, aclose_iterator, close_completely, timers
from .errors import InvalidRequest, SendTimeout, SlowClient, StreamPlusError, UpstreamErrorEvent
from .framing import EventKind, to_event
from .machine import (
    CloseSource,
    Commit,
    Cut,
    FinalFrame,
    Outcome,
    Output,
    Phase,
    Refuse,
    StreamMachine,
    StreamStateError,
    Write,
    outcome_for,
)
from .sse import ServerSentEvent

if TYPE_CHECKING:
    from .downstream import Downstream
    from .observe import Watch

__all__ = ["Pump", "to_stream_error"]

logger = logging.getLogger("sanic_streamplus")

_LIVE = (Phase.WAITING, Phase.COMMITTED)
_INFINITY = float("inf")


def to_stream_error(exc: BaseException) -> StreamPlusError:
    """Map any exception to the :class:`~sanic_streamplus.errors.StreamPlusError` the client is
    told about.

    A ``StreamPlusError`` is itself; a 4xx Sanic ``SanicException`` (e.g. ``BadRequest`` raised
    by a handler) becomes an :class:`~sanic_streamplus.errors.InvalidRequest` with its status and
    message; anything else is an ``internal_error`` (HTTP 500) whose message says nothing of the
    cause (the caller logs the traceback).
    """
    if isinstance(exc, StreamPlusError):
        return exc
    if isinstance(exc, SanicException) and int(exc.status_code) < 500:
        return InvalidRequest(str(exc.message or exc), status=int(exc.status_code))
    return StreamPlusError("internal server error")


def stream_error(exc: BaseException) -> StreamPlusError:
    """:func:`to_stream_error`, logging the traceback of a bug (an ``internal_error``)."""
    error = to_stream_error(exc)
    if outcome_for(error) is Outcome.INTERNAL_ERROR:
        logger.exception("stream handler failed", exc_info=exc)
    return error


def _events(source: AsyncIterable[Any], dialect: str) -> tuple[AsyncIterator[Any], bool]:
    """The iterator to read ``source`` with, and whether it yields batches (lists of
    ``(event, kind)`` pairs): a source that classifies its events in the stream's dialect
    already (its ``classified(dialect)`` gives the batches, e.g.
    :class:`~sanic_streamplus.upstream.UpstreamEvents`, one per upstream read) is not
    classified twice, and a read's events are pumped in one step."""
    classified = getattr(source, "classified", None)
    if callable(classified):
        pairs = classified(dialect)
        if pairs is not None:
            return pairs, True
    return source.__aiter__(), False


class Pump:
    """Drive one stream: its source through ``machine`` into ``downstream`` (see the module).

    Args:
        machine: the stream's :class:`~sanic_streamplus.machine.StreamMachine` (fresh).
        downstream: where its outputs go (:class:`~sanic_streamplus.downstream.Downstream`).
        heartbeat: seconds without a write before a heartbeat (float), or None for none.
        send_timeout: seconds a write may wait for the client to drain before the stream is cut
            (float), or None for no limit.
        high_water_mark: how much may wait in ``downstream.queued`` (bytes for a client, events
            for the store) before the reader waits for the writer.
        slow_client: ``disconnect`` cuts the client (``slow_client``) when ``high_water_mark``
            is queued while a write waits to drain; any other policy waits (``block``), or is
            the downstream's (``coalesce``).
        watch: what the stream reports to (hooks, metrics, span), or None.
        name: the stream's name in its INFO log line (``"POST /chat"``), or None for no line.

    Attributes:
        failure: the exception a downstream write raised (it ended the stream as if the client
            had left), or None.
        upstream_error: the upstream's in-band error report that ended the stream, or None.
    """

    __slots__ = (
        "_backlog",
        "_commit",
        "_cut",
        "_ended",
        "_loop",
        "_timer",
        "_wake",
        "beat_every",
        "downstream",
        "failure",
        "first_byte",
        "last_write",
        "limit",
        "machine",
        "name",
        "reader",
        "send_timeout",
        "sending_since",
        "slow_client",
        "started",
        "upstream_error",
        "watch",
    )

    def __init__(
        self,
        machine: StreamMachine,
        downstream: Downstream,
        *,
        heartbeat: float | None = None,
        send_timeout: float | None = None,
        high_water_mark: int = 64 * 1024,
        slow_client: str = "block",
        watch: Watch | None = None,
        name: str | None = None,
    ) -> None:
        self.machine = machine
        self.downstream = downstream
        self.beat_every = heartbeat or 0.0  # seconds; 0: none
        self.send_timeout = send_timeout or 0.0  # seconds; 0: none
        self.limit = high_water_mark
        self.slow_client = slow_client
        self.watch = watch
        self.name = name
        self.failure: BaseException | None = None
        self.upstream_error: UpstreamErrorEvent | None = None
        self._loop = asyncio.get_running_loop()
        self.started = self.last_write = self._loop.time()
        self.first_byte: float | None = None
        self.sending_since: float | None = None  # loop time the current write began
        self.reader: asyncio.Task[None] | None = None
        self._wake = Wake()  # the writer has something to do
        self._backlog: asyncio.Future[None] | None = None  # the reader waits for the writer
        self._commit: Commit | None = None  # a commit the writer makes before it writes
        self._cut: Cut | None = None  # the cut the writer makes instead of an end
        self._timer: list[Any] | None = None  # the loop's Timers' entry
        self._ended: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ outside inputs

    def shutdown(self) -> None:
        """The server is stopping: end with a ``shutdown`` frame (a 503 before the commit)."""
        self._run(self.machine.shutdown())

    def cancel(self, error: StreamPlusError) -> None:
        """End the stream as ``cancelled``, with ``error``'s frame."""
        self._run(self.machine.cancel(error))

    def client_left(self) -> None:
        """The client (or the store) is gone: close the source, write nothing more."""
        self._run(self.machine.client_left())
        reader = self.reader
        if reader is not None and not reader.done():
            reader.cancel()  # also a before_final_frame hook: it runs after the end instead

    def ended(self) -> asyncio.Future[None]:
        """A future that is done once :meth:`run` has returned (or raised)."""
        if self._ended is None:
            self._ended = self._loop.create_future()
        return self._ended

    # ------------------------------------------------------------------ the run

    async def run(self, source: AsyncIterable[Any]) -> None:
        """Pump ``source`` (an async iterable of ``ServerSentEvent``, ``str``, ``dict`` or
        ``list`` items; closed, completely, whatever happens) until the stream has ended, then
        log it and report it to the watch.

        Raises:
            asyncio.CancelledError: the caller's task was cancelled (Sanic's native server does
                so when the client disconnects): the source is closed first.
        """
        self.reader = asyncio.ensure_future(self._read(source))
        self._arm()
        try:
            await self._write()
            await self._close()
        except asyncio.CancelledError:
            await self._abandon()
            raise
        except Exception as exc:  # a write failed: as good as gone
            self.failure = exc
            await self._abandon()
        finally:
            if self._timer is not None:
                timers().cancel(self._timer)
            self._report()

    async def _abandon(self) -> None:
        """The writer cannot go on: the client left; wait for the source to be closed."""
        self.client_left()
        if self.reader is not None:
            await close_completely(self.reader)

    def _run(self, outputs: list[Output]) -> None:
        """Carry out the machine's ``outputs`` that need no waiting (from any task or a timer
        callback); the writer does the rest when woken."""
        for output in outputs:
            if isinstance(output, Write):
                self.downstream.put(output.data, output.event)
            elif isinstance(output, Commit):
                self._commit = output
            elif isinstance(output, CloseSource):
                reader = self.reader
                if reader is not None and reader is not asyncio.current_task():
                    reader.cancel()  # the reader's own input: it stops by itself
            elif isinstance(output, Cut):
                self._cut = output
                self.downstream.unblock()  # a write stuck in the client's buffer returns
            else:
                raise StreamStateError(f"{type(output).__name__} comes from finish() only")
        self._wake.set()

    # ------------------------------------------------------------------ the reader

    async def _read(self, source: AsyncIterable[Any]) -> None:
        """The reader task: :meth:`_pump` the source, turn how it stopped into the machine's
        input, close the source (completely), run the hooks; the writer is woken at the end."""
        machine = self.machine
        iterator, batches = _events(source, machine.dialect.name)
        try:
            try:
                await self._pump(iterator, batches)
            except asyncio.CancelledError:
                if machine.ending is None:  # not a CloseSource: the loop is going down
                    raise
            except UpstreamErrorEvent as exc:  # the upstream's own report (upstream_events)
                self._inband(exc)
            except Exception as exc:
                self._run(machine.source_failed(stream_error(exc)))
            finally:
                await close_completely(aclose_iterator(iterator))
            await self._before_final()
        finally:
            self._wake.set()

    async def _pump(self, iterator: AsyncIterator[Any], batches: bool) -> None:
        """Feed the machine each event of ``iterator`` (lists of ``(event, kind)`` pairs when
        ``batches``) until it ends or the stream does; the hot path queues the event's bytes
        for the writer, waking it only when nothing was queued (else it knows already)."""
        machine, downstream, watch, limit = self.machine, self.downstream, self.watch, self.limit
        put, wake, feed = downstream.put, self._wake, machine.feed
        kind_of, usage = machine.dialect.end_kind, machine.dialect.usage
        async for item in iterator:
            if batches:  # one upstream read's events, classified by the source
                batch = item
            else:
                event = item if type(item) is ServerSentEvent else to_event(item)
                batch = ((event, kind_of(event)),)
            for event, kind in batch:
                if watch is not None:
                    watch.event(usage(event))
                data = feed(event, kind)
                if data is not None:  # the hot path: one more write
                    if not downstream.queued:
                        wake.set()
                    put(data, event)
                elif not self._event(event, kind):
                    return
                if downstream.queued >= limit and not await self._wait_for_writer():
                    return
        self._run(machine.source_ended())

    def _event(self, event: ServerSentEvent, kind: EventKind) -> bool:
        """An event off the hot path (the first, a START, FINISH, TERMINAL or upstream error
        event): through :meth:`StreamMachine.event`; False once the stream is ending."""
        if kind is EventKind.UPSTREAM_ERROR:  # yielded, not raised: the same
            self.upstream_error = UpstreamErrorEvent.from_event(event, self.machine.dialect.name)
        self._run(self.machine.event(event, kind))
        return self.machine.phase in _LIVE

    def _inband(self, error: UpstreamErrorEvent) -> None:
        """The upstream reported an error in its stream: its own frame goes through as it came
        when it speaks the stream's dialect; else the dialect's error frame carries it."""
        self.upstream_error = error
        machine = self.machine
        if error.dialect == machine.dialect.name:
            self._run(machine.event(error.event, EventKind.UPSTREAM_ERROR))
        else:
            self._run(machine.source_failed(error))

    async def _wait_for_writer(self) -> bool:
        """Backpressure: wait while ``high_water_mark`` is queued; False if the stream ended
        (``disconnect``: the client is cut for it)."""
        machine = self.machine
        while self.downstream.queued >= self.limit and machine.phase in _LIVE:
            if self.slow_client == "disconnect" and self.sending_since is not None:
                self._run(machine.send_timed_out(SlowClient(self.limit)))
                break
            self._backlog = backlog = self._loop.create_future()
            await backlog
        return machine.phase in _LIVE

    async def _before_final(self) -> None:
        """Run the ``before_final_frame`` hooks, with the stats as they stand (heartbeats go on
        meanwhile); not for a client that left (they run after the end then)."""
        ending = self.machine.ending
        if self.watch is None or ending is None or ending.outcome is Outcome.CLIENT_DISCONNECTED:
            return
        self._settle()
        await self.watch.before_final()

    # ------------------------------------------------------------------ the writer

    async def _write(self) -> None:
        """Write what is queued, once per wake-up, until the reader is done with nothing left
        to write, or the stream ended (client gone, cut)."""
        machine, downstream, wake, reader = self.machine, self.downstream, self._wake, self.reader
        assert reader is not None
        while True:
            await wake.wait()
            if machine.phase is Phase.ENDED:
                return
            if self._commit is not None:
                commit, self._commit = self._commit, None
                await downstream.commit(commit)
            if downstream.queued:
                batch = downstream.take()
                backlog, self._backlog = self._backlog, None
                if backlog is not None and not backlog.done():  # (a cancelled reader's: done)
                    backlog.set_result(None)
                machine.written(await self._send(downstream.send(batch)))
                wake.set()  # look again: more may be queued, or the reader done, by now
            elif reader.done():
                return

    async def _send(self, sending: Any) -> int:
        """Await ``sending`` (a downstream write: its byte count) within the send watchdog."""
        loop = self._loop
        self.sending_since = loop.time()
        try:
            written: int = await sending
        finally:
            self.sending_since = None
        self.last_write = now = loop.time()
        if self.first_byte is None:
            self.first_byte = now
        return written

    async def _close(self) -> None:
        """Write the end the machine decides, once the reader is done (source closed, hooks
        run): the final frame or the JSON answer; or the cut; or nothing (client gone)."""
        machine, downstream = self.machine, self.downstream
        assert self.reader is not None
        if self._cut is None and machine.phase is not Phase.ENDED:
            await close_completely(self.reader)
            if machine.ending is None:  # the reader was cancelled from outside
                raise asyncio.CancelledError
            for output in machine.finish():
                if isinstance(output, Commit):
                    await downstream.commit(output)
                elif isinstance(output, Refuse):
                    await downstream.refuse(output, machine.ending)
                elif isinstance(output, FinalFrame):
                    machine.written(await self._send(downstream.finish(output, machine.ending)))
            machine.drained()
        await close_completely(self.reader)  # the upstream closes before a cut's grace
        if self._cut is not None:
            await downstream.cut(self._cut)

    # ------------------------------------------------------------------ the timer

    def _arm(self) -> None:
        if self.beat_every or self.send_timeout:
            at = self.started + min(self.beat_every or _INFINITY, self.send_timeout or _INFINITY)
            self._timer = timers().call_at(at, self._tick)

    def _tick(self) -> None:
        """The stream's one timer: a heartbeat when nothing was written for ``heartbeat``
        seconds, the cut when a write waited ``send_timeout`` seconds; re-armed for the next."""
        self._timer = None
        machine = self.machine
        if machine.phase is Phase.ENDED:
            return
        now, due = self._loop.time(), _INFINITY
        if self.beat_every:
            due = self.last_write + self.beat_every
            if now >= due:
                if not self.downstream.queued:  # what is queued goes out soon anyway
                    self._run(machine.heartbeat_due())
                due = now + self.beat_every
        if self.send_timeout:
            since = self.sending_since
            at = now + self.send_timeout if since is None else since + self.send_timeout
            if since is not None and now >= at:
                self._run(machine.send_timed_out(SendTimeout(self.send_timeout)))
                at = now + self.send_timeout
            due = min(due, at)
        self._timer = timers().call_at(due, self._tick)

    # ------------------------------------------------------------------ the report

    def _status(self) -> int:
        machine = self.machine
        if machine.status is not None:
            return machine.status
        error = machine.ending.error if machine.ending is not None else None
        return error.status if error is not None else 200

    def _error(self) -> StreamPlusError | None:
        """The ending's error for the report: ours, or the upstream's own in-band one."""
        ending = self.machine.ending
        if ending is None:
            return None
        if ending.error is None and ending.outcome is Outcome.UPSTREAM_ERROR:
            return self.upstream_error
        return ending.error

    def _settle(self) -> None:
        if self.watch is None:
            return
        machine = self.machine
        ending = machine.ending
        error = self._error()
        left = ending is None or ending.outcome is Outcome.CLIENT_DISCONNECTED
        ttfb = None if self.first_byte is None else self.first_byte - self.started
        self.watch.settle(error, left, self._status(), machine.events, machine.bytes, ttfb)

    def _report(self) -> None:
        """The stream ended: its INFO line, the watch's stats and its after-the-end hooks."""
        machine = self.machine
        ending = machine.ending
        if self.name is not None:
            outcome = ending.outcome if ending is not None else Outcome.CLIENT_DISCONNECTED
            error = self._error()
            ttfb = "-" if self.first_byte is None else f"{self.first_byte - self.started:.3f}s"
            logger.info(
                "stream %s outcome=%s%s status=%d duration=%.3fs ttfb=%s events=%d bytes=%d",
                self.name,
                outcome,
                "" if error is None else f" error={error.type}",
                self._status(),
                self._loop.time() - self.started,
                ttfb,
                machine.events,
                machine.bytes,
            )
        if self.watch is not None:
            self._settle()
            self.watch.finish()
        if self._ended is None:
            self._ended = self._loop.create_future()
        if not self._ended.done():
            self._ended.set_result(None)
