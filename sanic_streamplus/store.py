"""Event stores for resumable streams: where a stream's events wait for readers that come back.

One producer appends a stream's events; any number of readers, in any worker, read them after a
sequence number and wait for more. Two implementations behind one interface (:class:`EventStore`):

- :class:`MemoryEventStore`: one process (the default); a reader elsewhere cannot find the stream.
- :class:`RedisEventStore`: Redis Streams through redis-py's asyncio client (``XADD`` with a
  length cap, ``XREAD BLOCK``, key TTLs), shared by every worker and machine that uses the Redis.

Sequence numbers start at 1 and grow by one per event; a stream keeps at most ``max_events`` of
them (the oldest are dropped, never silently: a reader asking for a dropped one learns it from
:attr:`StreamRecord.first_seq`). Every key of a stream expires ``ttl`` seconds after its last
append or finish. Exactly one producer per stream: :meth:`EventStore.claim` is a set-if-absent
with a lease, and every append and finish carries the producer's token (a fencing token), so a
producer that lost its lease cannot write.

The store knows nothing of HTTP: the resume logic (``resume.py``) decides what readers see.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from .sse import ServerSentEvent

__all__ = [
    "STATES",
    "EventStore",
    "FencingError",
    "MemoryEventStore",
    "StreamRecord",
]

STATES = ("running", "completed", "cancelled", "failed")


class FencingError(Exception):
    """An append or finish came with a token that is not the stream's producer's any more."""


@dataclass
class StreamRecord:
    """What a store knows of one stream.

    Attributes:
        stream_id: the stream's ID (str).
        state: ``running``, ``completed``, ``cancelled`` or ``failed``.
        first_seq: the oldest sequence number still stored (``last_seq + 1`` when none is).
        last_seq: the newest sequence number appended (0 before the first).
        producer_alive: a producer holds the stream's lease now (bool).
        cancel_requested: someone asked the producer to stop (bool).
        reader_seen: when a reader last read, in seconds since the epoch (float), 0.0 if never.
        error: the error body ``{"type", "message", "upstream_status"}`` of a failed stream.
    """

    stream_id: str
    state: str = "running"
    first_seq: int = 1
    last_seq: int = 0
    producer_alive: bool = False
    cancel_requested: bool = False
    reader_seen: float = 0.0
    error: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        """True once the stream will get no more events."""
        return self.state != "running"


class EventStore(Protocol):
    """The interface of an event store (see the module docstring). Times are seconds."""

    async def open(self, stream_id: str, idempotency_key: str | None) -> tuple[str, bool]:
        """Register the stream ``stream_id``, or, when ``idempotency_key`` is already bound to a
        stream, return that one. Returns ``(stream_id, created)``: ``created`` is True when this
        call registered the stream (its caller then starts the producer)."""
        ...

    async def claim(self, stream_id: str, token: str, lease: float) -> bool:
        """Become the stream's producer for ``lease`` seconds unless another holds it."""
        ...

    async def renew(self, stream_id: str, token: str, lease: float) -> bool:
        """Extend the lease held with ``token``; False if it is lost."""
        ...

    async def append(self, stream_id: str, token: str, event: ServerSentEvent) -> int:
        """Append ``event`` (its ``event`` type and ``data``); return its sequence number.

        Raises:
            FencingError: ``token`` does not hold the lease.
        """
        ...

    async def finish(
        self, stream_id: str, token: str, state: str, error: dict[str, Any] | None = None
    ) -> None:
        """Mark the stream ``completed``, ``cancelled`` or ``failed`` (with ``error``) and wake
        its readers; the lease ends.

        Raises:
            FencingError: ``token`` does not hold the lease.
        """
        ...

    async def read(
        self, stream_id: str, after: int, block: float
    ) -> tuple[list[tuple[int, ServerSentEvent]], StreamRecord | None]:
        """The stored events with a sequence number above ``after``, in order, waiting up to
        ``block`` seconds for one when there are none and the stream is running; and the record
        as it was after the read (None: the stream is unknown or expired). Marks a reader seen."""
        ...

    async def record(self, stream_id: str) -> StreamRecord | None:
        """The stream's record, or None if it is unknown or expired."""
        ...

    async def request_cancel(self, stream_id: str) -> bool:
        """Ask the producer to stop; False if the stream is unknown or already finished."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


@dataclass
class _MemoryStream:
    record: StreamRecord
    events: deque[tuple[int, ServerSentEvent]] = field(default_factory=deque)
    token: str | None = None
    lease_until: float = 0.0
    expires: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryEventStore:
    """An :class:`EventStore` in this process's memory (one worker).

    Args:
        max_events: events kept per stream (the oldest are dropped past it).
        ttl: seconds a stream is kept after its last append or finish.
    """

    def __init__(self, max_events: int = 10_000, ttl: float = 600.0) -> None:
        self.max_events = max_events
        self.ttl = ttl
        self._streams: dict[str, _MemoryStream] = {}
        self._keys: dict[str, tuple[str, float]] = {}
        self._swept = 0.0

    def _get(self, stream_id: str) -> _MemoryStream | None:
        now = time.monotonic()
        if now - self._swept >= 1.0:  # expire everything that is due, once a second at most
            self._swept = now
            for key in [k for k, (_, expires) in self._keys.items() if expires <= now]:
                del self._keys[key]
            for sid in [s for s, stream in self._streams.items() if stream.expires <= now]:
                del self._streams[sid]
        stream = self._streams.get(stream_id)
        return None if stream is None or stream.expires <= now else stream

    def _fenced(self, stream_id: str, token: str) -> _MemoryStream:
        stream = self._get(stream_id)
        if stream is None or stream.token != token or stream.lease_until < time.monotonic():
            raise FencingError(f"stream {stream_id}: token {token} does not hold the lease")
        return stream

    async def open(self, stream_id: str, idempotency_key: str | None) -> tuple[str, bool]:
        self._get(stream_id)  # expire what is due
        if idempotency_key is not None:
            bound = self._keys.get(idempotency_key)
            if bound is not None and bound[1] > time.monotonic():
                return bound[0], False
            self._keys[idempotency_key] = (stream_id, time.monotonic() + self.ttl)
        self._streams[stream_id] = _MemoryStream(
            StreamRecord(stream_id), expires=time.monotonic() + self.ttl
        )
        return stream_id, True

    async def claim(self, stream_id: str, token: str, lease: float) -> bool:
        stream = self._get(stream_id)
        now = time.monotonic()
        if stream is None or (stream.token not in (None, token) and stream.lease_until >= now):
            return False
        stream.token, stream.lease_until = token, now + lease
        stream.record.producer_alive = True
        return True

    async def renew(self, stream_id: str, token: str, lease: float) -> bool:
        try:
            stream = self._fenced(stream_id, token)
        except FencingError:
            return False
        stream.lease_until = time.monotonic() + lease
        return True

    async def append(self, stream_id: str, token: str, event: ServerSentEvent) -> int:
        stream = self._fenced(stream_id, token)
        record = stream.record
        record.last_seq += 1
        stream.events.append((record.last_seq, ServerSentEvent(event.data, event.event)))
        if len(stream.events) > self.max_events:
            stream.events.popleft()
        record.first_seq = stream.events[0][0]
        stream.expires = time.monotonic() + self.ttl
        stream.changed.set()
        return record.last_seq

    async def finish(
        self, stream_id: str, token: str, state: str, error: dict[str, Any] | None = None
    ) -> None:
        stream = self._fenced(stream_id, token)
        stream.record.state, stream.record.error = state, error
        stream.record.producer_alive = False
        stream.token = None
        stream.expires = time.monotonic() + self.ttl
        stream.changed.set()

    async def read(
        self, stream_id: str, after: int, block: float
    ) -> tuple[list[tuple[int, ServerSentEvent]], StreamRecord | None]:
        stream = self._get(stream_id)
        if stream is None:
            return [], None
        stream.record.reader_seen = time.time()
        if stream.record.last_seq <= after and not stream.record.finished and block > 0:
            stream.changed.clear()
            try:
                await asyncio.wait_for(stream.changed.wait(), block)
            except asyncio.TimeoutError:
                pass
        events = [item for item in stream.events if item[0] > after]
        return events, self._snapshot(stream)

    def _snapshot(self, stream: _MemoryStream) -> StreamRecord:
        record = stream.record
        alive = stream.token is not None and stream.lease_until >= time.monotonic()
        return StreamRecord(
            record.stream_id,
            record.state,
            record.first_seq if stream.events else record.last_seq + 1,
            record.last_seq,
            alive,
            record.cancel_requested,
            record.reader_seen,
            record.error,
        )

    async def record(self, stream_id: str) -> StreamRecord | None:
        stream = self._get(stream_id)
        return None if stream is None else self._snapshot(stream)

    async def request_cancel(self, stream_id: str) -> bool:
        stream = self._get(stream_id)
        if stream is None or stream.record.finished:
            return False
        stream.record.cancel_requested = True
        stream.changed.set()
        return True

    async def close(self) -> None:
        self._streams.clear()
        self._keys.clear()
