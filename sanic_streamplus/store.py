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
import contextlib
import hashlib
import json
import math
import secrets
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from .errors import StoreUnavailable
from .sse import ServerSentEvent

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

__all__ = [
    "STATES",
    "EventStore",
    "FencingError",
    "MemoryEventStore",
    "RedisEventStore",
    "SequenceMismatch",
    "StreamRecord",
]

STATES = ("running", "completed", "cancelled", "failed")


class FencingError(Exception):
    """An append or finish came with a token that is not the stream's producer's any more."""


class SequenceMismatch(FencingError):
    """An append's ``last_seq`` is not the stream's: the store lost events its producer had
    appended (a Redis failover to a replica that had not got them yet), or another writer
    appended. The producer stops, as for a lost lease."""


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
        info: what the stream's opener said of it (str to str), e.g. its format and dialect.
        handover_until: while the stream is handed over and not claimed yet (its producer's
            worker stopped, see :meth:`EventStore.handover`), until when another worker may
            claim it, in seconds since the epoch (float); 0.0 otherwise.
    """

    stream_id: str
    state: str = "running"
    first_seq: int = 1
    last_seq: int = 0
    producer_alive: bool = False
    cancel_requested: bool = False
    reader_seen: float = 0.0
    error: dict[str, Any] | None = None
    info: dict[str, str] = field(default_factory=dict)
    handover_until: float = 0.0

    @property
    def finished(self) -> bool:
        """True once the stream will get no more events."""
        return self.state != "running"


class EventStore(Protocol):
    """The interface of an event store (see the module docstring). Times are seconds."""

    async def open(
        self, stream_id: str, idempotency_key: str | None, info: Mapping[str, str] | None = None
    ) -> tuple[str, bool]:
        """Register the stream ``stream_id`` with ``info`` (kept in its record), or, when
        ``idempotency_key`` is already bound to a stream, return that one. Returns
        ``(stream_id, created)``: ``created`` is True when this call registered the stream (its
        caller then starts the producer)."""
        ...

    async def bound(self, idempotency_key: str) -> str | None:
        """The stream ``idempotency_key`` is bound to, or None (unknown or expired); registers
        nothing."""
        ...

    async def claim(self, stream_id: str, token: str, lease: float) -> bool:
        """Become the stream's producer for ``lease`` seconds unless another holds it."""
        ...

    async def renew(self, stream_id: str, token: str, lease: float) -> StreamRecord | None:
        """Extend the lease held with ``token``, and return the stream's record (in the same
        operation: a producer learns of a cancel request and of its readers with it); None if
        the lease is lost."""
        ...

    async def append(
        self, stream_id: str, token: str, *events: ServerSentEvent, last_seq: int | None = None
    ) -> int:
        """Append ``events`` (at least one; their ``event`` type and ``data``), in order, in one
        operation; return the sequence number of the last. With ``last_seq`` (the sequence
        number of the producer's own last append, 0 before its first), only if the stream's
        is that one.

        Raises:
            FencingError: ``token`` does not hold the lease.
            SequenceMismatch: the stream's last sequence number is not ``last_seq``.
        """
        ...

    async def finish(
        self,
        stream_id: str,
        token: str,
        state: str,
        error: dict[str, Any] | None = None,
        *,
        last_seq: int | None = None,
    ) -> None:
        """Mark the stream ``completed``, ``cancelled`` or ``failed`` (with ``error``) and wake
        its readers; the lease ends. With ``last_seq`` (the sequence number of the producer's
        own last append), only if the stream's is that one: a store that lost the last appends
        (a failover) does not end the stream as if it had them.

        Raises:
            FencingError: ``token`` does not hold the lease.
            SequenceMismatch: the stream's last sequence number is not ``last_seq`` (the
                stream is left as it was).
        """
        ...

    async def handover(
        self, stream_id: str, token: str, request: str, until: float, last_seq: int
    ) -> None:
        """Give the stream up without finishing it (its producer's worker stops): the lease
        ends, the stream stays ``running``, ``request`` (what a continuation needs, JSON; never
        a secret) is kept until :meth:`adopt` takes it, which it may until ``until`` (seconds
        since the epoch), and readers are woken.

        Raises:
            FencingError: ``token`` does not hold the lease.
            SequenceMismatch: the stream's last sequence number is not ``last_seq``.
        """
        ...

    async def adopt(self, stream_id: str, token: str, lease: float) -> str | None:
        """Claim a stream handed over (:meth:`handover`) before its ``until``: ``token`` holds
        the lease for ``lease`` seconds and the ``request`` kept is returned (and removed: one
        worker adopts it); None if the stream is not handed over, expired, finished, or another
        producer holds it."""
        ...

    async def read(
        self, stream_id: str, after: int, block: float
    ) -> tuple[list[tuple[int, ServerSentEvent]], StreamRecord | None]:
        """The stored events with a sequence number above ``after``, in order, waiting up to
        ``block`` seconds for one when there are none and the stream is running; and the record
        as it was after the read (None: the stream is unknown or expired), or, for events a
        shared read had already received, as it was when they came (a finish or cancel request
        after them shows in the next read, which returns at once). Marks a reader seen (a
        :class:`RedisEventStore` reading on one Redis: at most about a second late)."""
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
    key: str | None = None  # the idempotency key bound to the stream
    handover: str | None = None  # the request kept by handover(), until adopt() takes it
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

    async def open(
        self, stream_id: str, idempotency_key: str | None, info: Mapping[str, str] | None = None
    ) -> tuple[str, bool]:
        self._get(stream_id)  # expire what is due
        if idempotency_key is not None:
            bound = self._keys.get(idempotency_key)
            if bound is not None and bound[1] > time.monotonic():
                return bound[0], False
            self._keys[idempotency_key] = (stream_id, time.monotonic() + self.ttl)
        self._streams[stream_id] = _MemoryStream(
            StreamRecord(stream_id, info=dict(info or {})),
            expires=time.monotonic() + self.ttl,
            key=idempotency_key,
        )
        return stream_id, True

    async def bound(self, idempotency_key: str) -> str | None:
        bound = self._keys.get(idempotency_key)
        if bound is None or bound[1] <= time.monotonic() or self._get(bound[0]) is None:
            return None
        return bound[0]

    def _refresh(self, stream: _MemoryStream) -> None:
        """Keep ``stream``, and the idempotency key bound to it, ``ttl`` seconds from now."""
        stream.expires = time.monotonic() + self.ttl
        key = stream.key
        if key is not None and self._keys.get(key, ("", 0.0))[0] == stream.record.stream_id:
            self._keys[key] = (stream.record.stream_id, stream.expires)

    async def claim(self, stream_id: str, token: str, lease: float) -> bool:
        stream = self._get(stream_id)
        now = time.monotonic()
        if stream is None or stream.record.finished:  # a finished stream gets no more events
            return False
        if stream.token not in (None, token) and stream.lease_until >= now:
            return False
        stream.token, stream.lease_until = token, now + lease
        stream.record.producer_alive = True
        return True

    async def renew(self, stream_id: str, token: str, lease: float) -> StreamRecord | None:
        try:
            stream = self._fenced(stream_id, token)
        except FencingError:
            return None
        stream.lease_until = time.monotonic() + lease
        return self._snapshot(stream)

    async def append(
        self, stream_id: str, token: str, *events: ServerSentEvent, last_seq: int | None = None
    ) -> int:
        stream = self._fenced(stream_id, token)
        record = stream.record
        if last_seq is not None and last_seq != record.last_seq:
            raise SequenceMismatch(f"stream {stream_id}: at {record.last_seq}, not {last_seq}")
        for event in events:
            record.last_seq += 1
            stream.events.append((record.last_seq, ServerSentEvent(event.data, event.event)))
        while len(stream.events) > self.max_events:
            stream.events.popleft()
        record.first_seq = stream.events[0][0]
        self._refresh(stream)
        stream.changed.set()
        return record.last_seq

    async def finish(
        self,
        stream_id: str,
        token: str,
        state: str,
        error: dict[str, Any] | None = None,
        *,
        last_seq: int | None = None,
    ) -> None:
        stream = self._fenced(stream_id, token)
        if last_seq is not None and last_seq != stream.record.last_seq:
            at = stream.record.last_seq
            raise SequenceMismatch(f"stream {stream_id}: at {at}, not {last_seq}")
        stream.record.state, stream.record.error = state, error
        stream.record.producer_alive = False
        stream.token = None
        self._refresh(stream)
        stream.changed.set()

    async def handover(
        self, stream_id: str, token: str, request: str, until: float, last_seq: int
    ) -> None:
        stream = self._fenced(stream_id, token)
        if last_seq != stream.record.last_seq:
            raise SequenceMismatch(f"stream {stream_id}: at {stream.record.last_seq}")
        stream.handover, stream.record.handover_until = request, until
        stream.token = None
        stream.changed.set()

    async def adopt(self, stream_id: str, token: str, lease: float) -> str | None:
        stream = self._get(stream_id)
        if stream is None or stream.handover is None or stream.record.finished:
            return None
        if stream.record.handover_until < time.time() or stream.token is not None:
            return None
        request, stream.handover, stream.record.handover_until = stream.handover, None, 0.0
        stream.token, stream.lease_until = token, time.monotonic() + lease
        return request

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
            record.info,
            record.handover_until,
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


# The Lua scripts of RedisEventStore. Each touches the keys of one stream only (one hash tag,
# so one Cluster slot), in this order where a script takes them: KEYS[1] meta (hash), KEYS[2]
# events (stream), KEYS[3] producer (string), KEYS[4] signal (stream); or the one idempotency
# key (_LUA_BIND). Times are milliseconds. A script answers -1 to a token that does not hold
# the lease.

# Refresh the TTL of every key of the stream but the producer's. Returns the Redis name of the
# idempotency key bound to the stream when its own TTL is due for a refresh (the caller sends
# the PEXPIRE: the key lives in another slot), else ''. ``always``: due now (a finish).
_LUA_REFRESH = """
local function refresh(ttl, now, always)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[4], ttl)
  local key = redis.call('HGET', KEYS[1], 'key')
  if not key then return '' end
  local at = tonumber(redis.call('HGET', KEYS[1], 'key_at') or 0)
  if not always and now >= at and now - at < ttl / 4 then return '' end
  redis.call('HSET', KEYS[1], 'key_at', now)
  return key
end
"""

# Wake the readers blocked in XREAD on the signal stream: one entry 0-<n>, n counting signals.
_LUA_SIGNAL = """
local function signal(kind)
  local n = redis.call('HINCRBY', KEYS[1], 'signals', 1)
  redis.call('XADD', KEYS[4], 'MAXLEN', 1, '0-' .. n, 'kind', kind)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[4], ttl) end
end
"""

_LUA_FENCED = """
local function fenced(token)
  return redis.call('EXISTS', KEYS[1]) == 0 or redis.call('GET', KEYS[3]) ~= token
end
"""

# ARGV: ttl, the idempotency key's Redis name ('' for none), now, then the info as name, value
# pairs (kept in the meta as info:<name>). Registers the stream (afresh).
_LUA_OPEN = """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('HSET', KEYS[1], 'state', 'running', 'last_seq', 0, 'signals', 0, 'cancel', 0,
           'reader_seen', 0)
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'key', ARGV[2], 'key_at', ARGV[3]) end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], 'info:' .. ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1]: an idempotency key. ARGV: stream_id, ttl. Returns the stream the key is bound to
# already, or nil after binding it to stream_id.
_LUA_BIND = """
local bound = redis.call('GET', KEYS[1])
if bound then return bound end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# ARGV: token, lease. Returns 1 if the token holds the lease now.
_LUA_CLAIM = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
return 1
"""

# ARGV: token, lease.
# Returns 0 if the token does not hold the lease, else a snapshot (as _LUA_SNAPSHOT's, no
# events): the producer learns of a cancel request and of its readers in the same round trip.
_LUA_RENEW = (
    _LUA_FENCED
    + """
if fenced(ARGV[1]) then return 0 end
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return {redis.call('HGETALL', KEYS[1]), redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1), 1, {}}
"""
)

# ARGV: token, max_events, ttl, now, the caller's last sequence number ('' for any), then event
# type, data for each event. Returns {the last sequence number, the idempotency key due for a
# refresh or ''}, or -1 (fenced), or -2 and the stream's last sequence number (not the caller's).
_LUA_APPEND = (
    _LUA_FENCED
    + _LUA_REFRESH
    + """
if fenced(ARGV[1]) then return -1 end
local seq = tonumber(redis.call('HGET', KEYS[1], 'last_seq'))
if ARGV[5] ~= '' and tonumber(ARGV[5]) ~= seq then return {-2, seq} end
for i = 6, #ARGV, 2 do
  seq = seq + 1
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], '0-' .. seq, 'event', ARGV[i], 'data', ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'last_seq', seq)
return {seq, refresh(tonumber(ARGV[3]), tonumber(ARGV[4]), false)}
"""
)

# ARGV: token, ttl, state, error JSON ('' for none), now, the caller's last sequence number
# ('' for any). Returns the idempotency key to refresh ('' for none), or -1 (fenced), or -2 and
# the stream's last sequence number (not the caller's).
_LUA_FINISH = (
    _LUA_FENCED
    + _LUA_REFRESH
    + _LUA_SIGNAL
    + """
if fenced(ARGV[1]) then return -1 end
local seq = tonumber(redis.call('HGET', KEYS[1], 'last_seq'))
if ARGV[6] ~= '' and tonumber(ARGV[6]) ~= seq then return {-2, seq} end
redis.call('HSET', KEYS[1], 'state', ARGV[3])
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[1], 'error')
else
  redis.call('HSET', KEYS[1], 'error', ARGV[4])
end
redis.call('DEL', KEYS[3])
local key = refresh(tonumber(ARGV[2]), tonumber(ARGV[5]), true)
signal('finish')
return key
"""
)

# ARGV: token, the request JSON, until (ms since the epoch), the caller's last sequence number.
# Returns 1, or -1 (fenced), or -2 (the stream's last sequence number is not the caller's).
_LUA_HANDOVER = (
    _LUA_FENCED
    + _LUA_SIGNAL
    + """
if fenced(ARGV[1]) then return -1 end
if tonumber(redis.call('HGET', KEYS[1], 'last_seq')) ~= tonumber(ARGV[4]) then return -2 end
redis.call('HSET', KEYS[1], 'handover', ARGV[2], 'handover_until', ARGV[3])
redis.call('DEL', KEYS[3])
signal('handover')
return 1
"""
)

# ARGV: token, lease, now (ms since the epoch). Returns the request kept by _LUA_HANDOVER after
# claiming the lease for the token (and removes it), or false.
_LUA_ADOPT = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return false end
local request = redis.call('HGET', KEYS[1], 'handover')
if not request then return false end
if tonumber(redis.call('HGET', KEYS[1], 'handover_until')) < tonumber(ARGV[3]) then
  return false
end
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('HDEL', KEYS[1], 'handover', 'handover_until')
return request
"""

# Returns 1 if the cancel was requested, 0 if the stream is unknown or finished.
_LUA_CANCEL = (
    _LUA_SIGNAL
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'cancel', 1)
signal('cancel')
return 1
"""
)

# ARGV: after ('' for no events), now in seconds since the epoch ('' to mark no reader), the
# most entries to return. Returns nil for an unknown stream, else {meta as HGETALL, oldest
# entry (XRANGE - + COUNT 1), EXISTS producer, the entries after ``after``}.
_LUA_SNAPSHOT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'reader_seen', ARGV[2]) end
local events = {}
if ARGV[1] ~= '' then
  events = redis.call('XRANGE', KEYS[2], '(0-' .. ARGV[1], '+', 'COUNT', ARGV[3])
end
return {redis.call('HGETALL', KEYS[1]), redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1),
        redis.call('EXISTS', KEYS[3]), events}
"""


# KEYS[1] meta. ARGV: now in seconds since the epoch. Marks a reader seen; 0 if the stream is
# unknown or expired (the shared read's marks: cheaper than a snapshot).
_LUA_MARK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'reader_seen', ARGV[1])
return 1
"""

_EVENT, _DATA = (b"event", "event"), (b"data", "data")  # an events entry's field names
_MAX_TRACKED = 100_000  # streams whose signal count a RedisEventStore keeps at most


def _now_ms() -> int:
    """Now, in milliseconds since the epoch (the scripts' clock for the idempotency key's TTL
    refreshes: a clock that differs between machines only moves a refresh)."""
    return int(time.time() * 1000)


def _ms(seconds: float) -> int:
    """``seconds`` in whole milliseconds, at least 1 (0 means "forever" to XREAD BLOCK)."""
    return max(1, math.ceil(seconds * 1000))


class RedisEventStore:
    """An :class:`EventStore` in Redis, shared by every worker and machine that uses it.

    The methods are those of :class:`EventStore`, with the semantics of
    :class:`MemoryEventStore`. Keys of stream ``<id>`` (each one but the producer's expires
    ``ttl`` seconds after the stream's last append or finish; times are kept in milliseconds).
    One prefix per kind of key, ``stream:`` and ``idem:``, and the idempotency key hashed, so
    that no stream ID and no idempotency key, whatever their characters, name each other's
    entries. Every key of one stream carries the hash tag ``{<id>}``, so they share one Redis
    Cluster slot, and every script touches the keys of one slot (the Cluster rule):

    - ``<prefix>stream:{<id>}:events``: a Redis Stream of the events; entry ID ``0-<seq>``, so
      the entry ID is the sequence number; fields ``event`` and ``data``.
      ``XADD MAXLEN <max_events>`` (exact) drops the oldest.
    - ``<prefix>stream:{<id>}:meta``: a hash: ``state``, ``last_seq``, ``error`` (JSON),
      ``cancel`` (``0``/``1``), ``reader_seen`` (seconds since the epoch), ``signals`` (see
      below), ``key`` (the idempotency key's Redis name, to refresh its TTL) and ``key_at``
      (when that TTL was last refreshed, ms since the epoch), ``info:<name>`` (the info);
      while the stream is handed over and not adopted, ``handover`` (the request kept) and
      ``handover_until`` (ms since the epoch).
    - ``<prefix>stream:{<id>}:producer``: the producer's token, with a ``PX <lease>`` expiry:
      the lease. :meth:`claim` sets it only if it is absent (or already this token: a
      refresh) and the stream is running, :meth:`adopt` only if it is absent and the stream
      is handed over; :meth:`finish` and :meth:`handover` delete it.
    - ``<prefix>stream:{<id>}:signal``: a Redis Stream of one entry, ``0-<n>``, added when the
      stream finishes, a cancel is requested or the stream is handed over (``n`` counts them;
      it is also ``signals`` in the meta).
    - ``<prefix>idem:<sha256 of the idempotency key, hex>``: the stream ID the key is bound
      to, in a slot of its own (the key names the stream, so the stream's tag cannot be
      derived from it). :meth:`open` registers the stream first, then binds the key if it is
      free (a script on that one key), else drops the stream it just registered and answers
      the bound one: the key never names a stream not yet registered. The append and finish
      scripts name the key when its TTL is due for a refresh (a finish always; an append
      once a quarter of ``ttl`` has passed since the last), and the store then sends it a
      ``PEXPIRE`` of its own: one round trip more per quarter ``ttl`` of a stream's life,
      never per event.

    Every write is one Lua script, so a check and its write are atomic: an append or finish
    whose token is not the value of the producer key raises :class:`FencingError`.

    Reading on one Redis: the readers of this store share their blocking reads (see
    :class:`_SharedRead`): one ``XREAD BLOCK`` per group of up to 64 streams on one pooled
    connection, whose reply is handed to the waiting readers, and the events that came
    while a reader was away kept for it. A read answered from those comes with the record
    of when they came (a finish right after them shows in the next read). Script calls
    (appends, lease renewals, snapshots) made in one turn of the event loop go in one
    pipeline (:class:`_Batch`).

    Reading on a Cluster (each stream's keys are in a slot of their own, and one ``XREAD``
    must stay in one slot), and every read with ``block`` 0: one round trip per wake-up. A
    reader blocks in one ``XREAD BLOCK <ms> COUNT
    <read_count>`` on two streams, the events from ``0-<after>`` and the signal stream from
    ``0-<signals>``, pipelined behind a snapshot script (it marks the reader seen and answers
    the meta, the oldest entry and whether the lease is held: the record): the ``XREAD``'s
    reply is the events themselves, and the record is the snapshot's, its ``last_seq``
    raised to the last event's. An append wakes it through the first stream, a finish or
    cancel request through the second, at once, with no polling of the meta; the sequence
    numbers carry no control entries. ``signals`` is the count this store last saw for the
    stream (kept client-side, per stream; the position is the caller's ``after``): a signal
    after it makes the ``XREAD`` return at once, so nothing that happens before the wait is
    missed, and a reader woken by one takes a fresh snapshot (a second round trip, once per
    finish or cancel request). The first blocking read of a stream in this store, and every
    read with ``block`` 0, is one snapshot script that returns the events after ``after``
    itself (at most ``read_count``), followed by the ``XREAD`` only if there were none.
    A stream that expires while a reader waits is noticed at the end of that ``XREAD``
    (at most 2 s later; an expired stream has no keys to wake it).

    Connections: on one Redis, one per group of 64 streams being read (the shared
    ``XREAD`` calls), plus the operations in flight: a pool of a few dozen serves thousands of
    readers (a ``BlockingConnectionPool`` makes an operation wait for a free connection
    rather than fail, as :meth:`from_url` builds it). On a Cluster, each blocking read holds
    one connection of its node's pool for up to ``block`` seconds, so the pool must allow one
    connection per concurrent reader, plus the producers' (redis-py's asyncio
    ``ConnectionPool`` allows 100 by default and raises ``MaxConnectionsError`` past it). A long
    ``block`` is waited out in several ``XREAD``\\ s of at most 2 s, and at most half the
    client's ``socket_timeout``, so that the client never times out a read that is waiting.

    Needs Redis 6.2 or later (exclusive ``XRANGE`` ranges), or Valkey 7.2 or later: a single
    server, or a Cluster through ``redis.asyncio.cluster.RedisCluster`` (see :meth:`from_url`).
    Stream IDs must be non-empty and not start with ``}`` (their keys would have no hash tag;
    :func:`~sanic_streamplus.resume.new_stream_id`'s never do), and ``prefix`` holds no brace.

    Redis going away: every method raises :class:`~sanic_streamplus.errors.StoreUnavailable`
    for redis-py's ``ConnectionError`` and ``TimeoutError``, raised once the client's own
    retries are spent. Build the client with :meth:`from_url` for retries with backoff, so that
    the pool's connections that a Redis restart left dead reconnect instead of failing.

    Args:
        client: a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster`` client
            (``decode_responses`` either way); the store closes it in :meth:`close`.
        max_events: events kept per stream (the oldest are dropped past it); at least 1.
        ttl: seconds a stream is kept after its last append or finish; more than 0.
        prefix: the prefix of every key (str, no ``{`` or ``}``).
        read_count: the most events one read returns (``XREAD COUNT``); a reader further
            behind reads again at once.

    Raises:
        ValueError: ``max_events`` < 1, ``ttl`` <= 0, or a brace in ``prefix``.
        StoreUnavailable: from any method, when Redis cannot be reached or does not answer.
        redis.exceptions.RedisError: from any method, when Redis fails otherwise.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        max_events: int = 10_000,
        ttl: float = 600.0,
        prefix: str = "streamplus:",
        read_count: int = 1000,
    ) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, not {max_events}")
        if ttl <= 0:
            raise ValueError(f"ttl must be more than 0 seconds, not {ttl}")
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must not contain a brace (a hash tag's), not {prefix!r}")
        from redis.exceptions import ConnectionError, TimeoutError

        self.client = client
        self.max_events = max_events
        self.ttl = ttl
        self.prefix = prefix
        self._unreachable = (ConnectionError, TimeoutError)
        pool = getattr(client, "connection_pool", None)  # a RedisCluster has one per node
        kwargs: dict[str, Any] = (
            getattr(pool, "connection_kwargs", {})
            if pool is not None
            else client.get_connection_kwargs()
        )
        self._encoding = str(kwargs.get("encoding") or "utf-8")
        # The longest single XREAD BLOCK, in seconds: half the client's socket timeout, and at
        # most 2 s, as the timeout is not always in the pool's kwargs (redis-py 8's default of
        # 5 s is not, for a client made by ``from_url``).
        timeout = kwargs.get("socket_timeout")
        self._max_block = min(2.0, timeout / 2) if timeout else 2.0
        self.read_count = read_count
        self._signals: dict[str, int] = {}  # stream -> the signal count a reader last saw
        register: Any = client.register_script
        self._open: Any = register(_LUA_OPEN)
        self._bind: Any = register(_LUA_BIND)
        self._claim: Any = register(_LUA_CLAIM)
        self._renew: Any = register(_LUA_RENEW)
        self._append: Any = register(_LUA_APPEND)
        self._finish: Any = register(_LUA_FINISH)
        self._cancel: Any = register(_LUA_CANCEL)
        self._handover: Any = register(_LUA_HANDOVER)
        self._adopt: Any = register(_LUA_ADOPT)
        self._snapshot: Any = register(_LUA_SNAPSHOT)
        self._mark: Any = register(_LUA_MARK)
        from redis.asyncio.cluster import RedisCluster

        # one XREAD over many streams cannot span Cluster slots: cluster readers read alone
        self._shared = None if isinstance(client, RedisCluster) else _SharedRead(self)
        self._batch = None if isinstance(client, RedisCluster) else _Batch(client)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        max_connections: int,
        cluster: bool = False,
        max_events: int = 10_000,
        ttl: float = 600.0,
        prefix: str = "streamplus:",
    ) -> RedisEventStore:
        """A store on a new client of the Redis at ``url`` that rides out a restart.

        The client retries a command that met a dead connection or a timeout on a new
        connection, three times with exponential backoff (20 ms, doubling, at most 0.5 s); a
        connection idle for 30 s is checked with a ``PING`` before use; connecting gives up
        after 1 s, a reply after 10 s (``XREAD BLOCK`` waits stay below half of that). Once a
        restarted Redis is back, no call fails. While it is away, a call fails with
        :class:`~sanic_streamplus.errors.StoreUnavailable` in a fraction of a second when
        connections are refused; when packets vanish, after at most 16 connect timeouts
        (redis-py also retries connecting within each command's retries). Options in
        ``url``'s query string (e.g. ``?socket_connect_timeout=0.5``) win.

        With ``cluster``, the client is redis-py's ``redis.asyncio.cluster.RedisCluster``
        (``url`` names any one node; the client discovers the others and follows ``MOVED``
        and ``ASK`` redirections), with the same retries, timeouts and health check; a
        command that meets a dead node is retried after the client refreshes its view of the
        cluster (a failover's new master).

        Args:
            url: ``redis://``, ``rediss://`` or ``unix://`` URL (``redis://`` or ``rediss://``,
                database 0, with ``cluster``).
            max_connections: the pool's size. On one Redis, the pool is a
                ``BlockingConnectionPool``: a command waits (up to 10 s) for a free connection
                instead of failing; the readers' waits take one connection (the shared
                ``XREAD``), so the size bounds the store operations in flight at once
                (appends, lease renewals, snapshots), not the readers. With ``cluster``: per
                node, and one per reader waiting in ``XREAD BLOCK`` on that node, plus the
                producers' (a Cluster has no shared read).
            cluster: ``url`` names a node of a Redis Cluster (or a Valkey cluster).
            max_events: events kept per stream, as for the constructor.
            ttl: seconds a stream is kept, as for the constructor.
            prefix: the prefix of every key, as for the constructor.

        Raises:
            ValueError: a malformed ``url``, or ``max_events``/``ttl`` out of range.
        """
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.cluster import RedisCluster
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError, TimeoutError

        options: dict[str, Any] = {
            "max_connections": max_connections,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.01), 3),
            "retry_on_error": [ConnectionError, TimeoutError],
            "health_check_interval": 30,
            "socket_connect_timeout": 1.0,
            "socket_timeout": 10.0,
            "socket_keepalive": True,
        }
        client: Redis | RedisCluster
        if cluster:
            client = RedisCluster.from_url(url, **options)
        else:  # a command waits for a free connection (at most the reply timeout)
            client = Redis.from_pool(BlockingConnectionPool.from_url(url, timeout=10.0, **options))
        return cls(client, max_events=max_events, ttl=ttl, prefix=prefix)

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """``script(keys=keys, args=args)``, in the next pipeline of calls on one Redis."""
        if self._batch is None:
            return await script(keys=keys, args=args)
        return await self._batch.call(script, keys, args)

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """Turn redis-py's "cannot reach Redis" errors into :class:`StoreUnavailable`."""
        try:
            yield
        except self._unreachable as exc:
            raise StoreUnavailable(
                f"the event store cannot be reached ({type(exc).__name__}); retry later"
            ) from exc

    def _keys(self, stream_id: str) -> list[str]:
        """The keys of ``stream_id``: meta, events, producer, signal (the scripts' KEYS), all
        with the hash tag ``{<stream_id>}``: one Cluster slot."""
        base = f"{self.prefix}stream:{{{stream_id}}}:"
        return [base + "meta", base + "events", base + "producer", base + "signal"]

    def _key(self, idempotency_key: str) -> str:
        """The Redis name of ``idempotency_key``'s binding (hashed: any length, any text)."""
        digest = hashlib.sha256(idempotency_key.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.prefix}idem:{digest}"

    def _text(self, value: Any) -> str:
        return value.decode(self._encoding) if isinstance(value, bytes) else str(value)

    async def open(
        self, stream_id: str, idempotency_key: str | None, info: Mapping[str, str] | None = None
    ) -> tuple[str, bool]:
        keys = self._keys(stream_id)
        key = "" if idempotency_key is None else self._key(idempotency_key)
        pairs = [item for name, value in (info or {}).items() for item in (name, value)]
        ttl = _ms(self.ttl)
        with self._reachable():
            # the stream first, then the key (its own slot) if still free: the key never names
            # a stream not yet registered; the loser of a race for the key drops its stream
            await self._open(keys=keys, args=[ttl, key, _now_ms(), *pairs])
            if not key:
                return stream_id, True
            bound = await self._bind(keys=[key], args=[stream_id, ttl])
            if bound is None:
                return stream_id, True
            await self.client.delete(*keys)
        return self._text(bound), False

    async def bound(self, idempotency_key: str) -> str | None:
        with self._reachable():
            bound = await self.client.get(self._key(idempotency_key))
        return None if bound is None else self._text(bound)

    async def claim(self, stream_id: str, token: str, lease: float) -> bool:
        with self._reachable():
            claimed = await self._claim(keys=self._keys(stream_id), args=[token, _ms(lease)])
        return bool(claimed)

    async def renew(self, stream_id: str, token: str, lease: float) -> StreamRecord | None:
        with self._reachable():
            reply = await self._call(self._renew, self._keys(stream_id), [token, _ms(lease)])
        return self._record(stream_id, reply)[0] if isinstance(reply, list) else None

    async def append(
        self, stream_id: str, token: str, *events: ServerSentEvent, last_seq: int | None = None
    ) -> int:
        fields = [item for event in events for item in (event.event, event.data)]
        expected = "" if last_seq is None else last_seq
        args = [token, self.max_events, _ms(self.ttl), _now_ms(), expected, *fields]
        with self._reachable():
            reply = await self._call(self._append, self._keys(stream_id), args)
            if not isinstance(reply, list):
                raise FencingError(f"stream {stream_id}: token {token} does not hold the lease")
            if reply[0] == -2:
                raise SequenceMismatch(f"stream {stream_id}: at {reply[1]}, not {last_seq}")
            await self._refresh_key(reply[1])
        return int(reply[0])

    async def _refresh_key(self, key: Any) -> None:
        """Extend the TTL of the idempotency key a script named (``''``: none is due)."""
        if key:
            await self.client.pexpire(self._text(key), _ms(self.ttl))

    async def finish(
        self,
        stream_id: str,
        token: str,
        state: str,
        error: dict[str, Any] | None = None,
        *,
        last_seq: int | None = None,
    ) -> None:
        body = "" if error is None else json.dumps(error)
        expected = "" if last_seq is None else last_seq
        args = [token, _ms(self.ttl), state, body, _now_ms(), expected]
        with self._reachable():
            key = await self._finish(keys=self._keys(stream_id), args=args)
            if isinstance(key, int):
                raise FencingError(f"stream {stream_id}: token {token} does not hold the lease")
            if isinstance(key, list):
                raise SequenceMismatch(f"stream {stream_id}: at {key[1]}, not {last_seq}")
            await self._refresh_key(key)

    async def handover(
        self, stream_id: str, token: str, request: str, until: float, last_seq: int
    ) -> None:
        args = [token, request, _ms(until), last_seq]
        with self._reachable():
            reply = await self._handover(keys=self._keys(stream_id), args=args)
        if reply == -1:
            raise FencingError(f"stream {stream_id}: token {token} does not hold the lease")
        if reply == -2:
            raise SequenceMismatch(f"stream {stream_id}: not at {last_seq}")

    async def adopt(self, stream_id: str, token: str, lease: float) -> str | None:
        with self._reachable():
            reply = await self._adopt(
                keys=self._keys(stream_id), args=[token, _ms(lease), _now_ms()]
            )
        return None if reply is None else self._text(reply)

    async def read(
        self, stream_id: str, after: int, block: float
    ) -> tuple[list[tuple[int, ServerSentEvent]], StreamRecord | None]:
        keys = self._keys(stream_id)
        after = max(after, 0)
        deadline = time.monotonic() + block
        with self._reachable():
            if self._shared is None or block <= 0:
                return await self._read(stream_id, keys, after, deadline)
            return await self._shared.read(stream_id, keys, after, deadline)

    async def _read(
        self, stream_id: str, keys: list[str], after: int, deadline: float
    ) -> tuple[list[tuple[int, ServerSentEvent]], StreamRecord | None]:
        """:meth:`read`: a snapshot with the events when this store knows no signal count of
        the stream (or ``block`` is 0), then pipelined snapshots and ``XREAD BLOCK`` waits of
        at most ``_max_block`` until ``deadline``, and a snapshot with the events once the
        block is spent with nothing (the record as it is then, not as the wait began)."""
        signals = self._signals.get(stream_id)
        if signals is None or deadline <= time.monotonic():
            events, record = await self._take(stream_id, keys, after)
            if record is None or events or record.last_seq > after or record.finished:
                return events, record
            if deadline <= time.monotonic():
                return events, record
            signals = self._signals[stream_id]
        while True:
            wait = min(deadline - time.monotonic(), self._max_block)
            reply, woken = await self._wait(keys, after, signals, wait)
            if reply is None:
                self._signals.pop(stream_id, None)
                return [], None
            record, seen = self._record(stream_id, reply)
            events = []
            signalled = 0
            replies = woken.items() if isinstance(woken, dict) else woken or ()  # RESP3, RESP2
            for name, entries in replies:
                if self._text(name) == keys[1]:
                    events = [self._event(entry) for entry in entries]
                else:
                    signalled = self._seq(entries[-1][0])
            if signalled > seen or not (events or signalled or deadline > time.monotonic()):
                return await self._take(stream_id, keys, after)  # state changed, or time up
            if events:
                record.last_seq = max(record.last_seq, events[-1][0])
                record.producer_alive = record.producer_alive or not record.finished
            signals = max(signals, seen, signalled)
            self._keep(record, signals)
            if events or signalled or record.finished:
                return events, record

    async def _take(
        self, stream_id: str, keys: list[str], after: int
    ) -> tuple[list[tuple[int, ServerSentEvent]], StreamRecord | None]:
        """One snapshot script that marks the reader seen: the events after ``after`` (at
        most ``read_count``) and the record; keeps the stream's signal count."""
        reply = await self._snapshot(
            keys=keys[:3], args=[after, repr(time.time()), self.read_count]
        )
        if reply is None:
            self._signals.pop(stream_id, None)
            return [], None
        record, signals = self._record(stream_id, reply)
        self._keep(record, signals)
        return [self._event(entry) for entry in reply[3]], record

    async def _wait(
        self, keys: list[str], after: int, signals: int, wait: float
    ) -> tuple[Any, Any]:
        """One round trip: the snapshot script (no events; marks the reader seen) and an
        ``XREAD BLOCK`` of ``wait`` seconds on the events after ``after`` and the signals
        after ``signals``, pipelined; their two replies. An ``XREAD`` that its node cut short
        as it turned replica (``UNBLOCKED``: a failover) answers nothing: the next one goes to
        the new master (``RedisCluster`` follows the ``MOVED`` that the old one answers)."""
        from redis.exceptions import NoScriptError, ResponseError

        streams: dict[Any, Any] = {keys[1]: f"0-{after}", keys[3]: f"0-{signals}"}
        for attempt in (0, 1):
            pipe = self.client.pipeline(transaction=False)
            # by name: ClusterPipeline's evalsha() refuses, its execute_command routes by key
            pipe.execute_command("EVALSHA", self._snapshot.sha, 3, *keys[:3], "", time.time(), 0)
            pipe.xread(streams, count=self.read_count, block=_ms(wait))
            reply, woken = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and not attempt:  # a restarted Redis: load
                await self._snapshot(keys=keys[:3], args=["", "", 0])  # it (the plain call does)
                continue
            if isinstance(woken, ResponseError) and str(woken).startswith("UNBLOCKED"):
                woken = None
            for result in (reply, woken):
                if isinstance(result, Exception):
                    raise result
            return reply, woken
        raise AssertionError("unreachable")

    def _keep(self, record: StreamRecord, signals: int) -> None:
        """Keep ``signals`` as this store's count of the stream's signals (the next read waits
        for one after it); forget it once the stream finished (the next read is one
        snapshot, which returns at once)."""
        if record.finished:
            self._signals.pop(record.stream_id, None)
            return
        if len(self._signals) >= _MAX_TRACKED and record.stream_id not in self._signals:
            self._signals.clear()  # streams read once and never again: start afresh
        self._signals[record.stream_id] = signals

    async def record(self, stream_id: str) -> StreamRecord | None:
        with self._reachable():
            reply = await self._snapshot(keys=self._keys(stream_id)[:3], args=["", "", 0])
        return None if reply is None else self._record(stream_id, reply)[0]

    def _record(self, stream_id: str, reply: list[Any]) -> tuple[StreamRecord, int]:
        """The record in a snapshot script's ``reply``, and the signal count."""
        meta = self._fields(reply[0])
        last_seq = int(meta.get("last_seq", 0))
        first_seq = self._seq(reply[1][0][0]) if reply[1] else last_seq + 1
        error = meta.get("error")
        record = StreamRecord(
            stream_id,
            meta.get("state", "running"),
            first_seq,
            last_seq,
            bool(reply[2]),
            meta.get("cancel") == "1",
            float(meta.get("reader_seen", 0.0)),
            None if error is None else json.loads(error),
            {name[5:]: value for name, value in meta.items() if name.startswith("info:")},
            float(meta.get("handover_until", 0)) / 1000,
        )
        return record, int(meta.get("signals", 0))

    def _seq(self, entry_id: Any) -> int:
        return int(self._text(entry_id).partition("-")[2])

    def _event(self, entry: list[Any]) -> tuple[int, ServerSentEvent]:
        """An events entry as (seq, event); the entry is ``[id, [field, value, ...]]`` (raw)
        or ``(id, {field: value})`` (as redis-py parsed it)."""
        entry_id, flat = entry
        if isinstance(flat, list) and len(flat) == 4 and flat[0] in _EVENT and flat[2] in _DATA:
            # the append script's own order: event, <type>, data, <data>
            kind, data = flat[1], flat[3]
            if isinstance(data, bytes):
                kind, data = kind.decode(self._encoding), data.decode(self._encoding)
            seq = int(entry_id[entry_id.index(b"-" if isinstance(entry_id, bytes) else "-") + 1 :])
            return seq, ServerSentEvent(data, kind)
        fields = self._fields(flat)
        event = ServerSentEvent(fields.get("data", ""), fields.get("event", "message"))
        return self._seq(entry_id), event

    def _fields(self, flat: list[Any] | dict[Any, Any]) -> dict[str, str]:
        """A hash or stream entry's ``[field, value, ...]`` (a script's reply), or its fields
        as redis-py parsed them (a dict), as a dict of str."""
        if isinstance(flat, dict):
            return {self._text(name): self._text(value) for name, value in flat.items()}
        items = [self._text(item) for item in flat]
        return dict(zip(items[::2], items[1::2], strict=True))

    async def request_cancel(self, stream_id: str) -> bool:
        keys = self._keys(stream_id)
        with self._reachable():
            return bool(await self._cancel(keys=keys, args=[]))

    async def close(self) -> None:
        if self._shared is not None:
            await self._shared.close()
        if self._batch is not None:
            await self._batch.close()
        with contextlib.suppress(*self._unreachable):
            await self.client.aclose()


_GROUP = 64  # streams in one shared XREAD at most
_LINGER = 5.0  # seconds a stream stays in the shared XREAD after its last reader read
_MARK_EVERY = 1.0  # seconds between the shared read's reader-seen marks of one stream


@dataclass(eq=False)
class _Watch:
    """One stream that the shared read watches for the readers of this process.

    ``buffered`` holds the events that came while no reader waited, consecutive from
    ``base + 1`` up to ``pos`` (a reader at or after ``base`` is served from it; one behind
    it takes a snapshot); ``waiters`` are the readers waiting now, each with its position."""

    stream_id: str
    keys: list[str]
    record: StreamRecord
    pos: int  # the shared XREAD asks for the events after it
    signals: int  # ... and for the signals after it
    loop: _ReadLoop  # the XREAD loop of its group
    base: int = 0
    stale: bool = False  # a signal came that no reader has seen: the next read takes a snapshot
    buffered: list[tuple[int, ServerSentEvent]] = field(default_factory=list)
    waiters: dict[asyncio.Future[list[tuple[int, ServerSentEvent]] | None], int] = field(
        default_factory=dict
    )
    bulks: list[bytes] = field(default_factory=list)  # the keys, RESP-encoded
    used: float = 0.0  # monotonic time a reader last read
    marked: float = 0.0  # monotonic time reader_seen was last marked for it
    unmarked: bool = False  # a reader read since

    def current(self, events: list[tuple[int, ServerSentEvent]]) -> StreamRecord:
        """The record to answer with ``events`` (the last snapshot's, ``last_seq`` raised)."""
        record = self.record
        if not events:
            return replace(record)
        alive = record.producer_alive or not record.finished
        return replace(record, last_seq=max(record.last_seq, events[-1][0]), producer_alive=alive)


class _SharedRead:
    """The blocking read of every reader of one :class:`RedisEventStore` (one process): one
    ``XREAD BLOCK`` on one pooled connection over the events and signal streams of up to
    ``_GROUP`` streams that readers of this process read (a :class:`_ReadLoop` per group of
    streams, a new group once the others are full), instead of one connection per waiting
    reader. (One ``XREAD`` over every stream would cost its loop and Redis the whole list of
    keys on every wake-up: a group bounds that, at one connection per ``_GROUP`` streams.)

    A reader registers a waiter (a future) with its position on the stream's
    :class:`_Watch` and awaits it; the loop dispatches what each ``XREAD`` returns to the
    waiters (events after their position, or a signal: they take a snapshot), and buffers
    the events that come while no reader of the stream waits (a reader relaying the last
    batch), so that a reader back for more is served without a round trip. A stream stays
    in the ``XREAD`` for ``_LINGER`` seconds after its last read (so that a reader back for
    more needs no new ``XREAD``); a stream not in the ``XREAD`` in flight (a new reader) ends
    it at once through the loop's wake-up stream, ``<prefix>wake:{<random>}`` (an ``XADD``
    from another pooled connection). Every ``_MARK_EVERY`` seconds, a mark script per
    stream read since (``_LUA_MARK``: it marks the reader seen) rides in the same pipeline as
    the ``XREAD``.
    An ``XREAD`` that fails fails every waiter with its error, and the loop forgets every
    stream (the next reads start from snapshots); it runs while a stream is watched.

    Not for a Redis Cluster: one ``XREAD`` must stay in one slot there, and every stream has
    a slot of its own (its hash tag), so cluster readers each block on their own connection.
    """

    def __init__(self, store: RedisEventStore) -> None:
        self.store = store
        self.watches: dict[str, _Watch] = {}
        self.loops: list[_ReadLoop] = []

    async def read(
        self, stream_id: str, keys: list[str], after: int, deadline: float
    ) -> tuple[list[tuple[int, ServerSentEvent]], StreamRecord | None]:
        """:meth:`RedisEventStore.read` through the shared ``XREAD``: from the buffered events
        if they cover ``after``, else a snapshot; then wait as a waiter until ``deadline``
        (monotonic), and take a snapshot if woken by a signal or when the time is up."""
        watch = self.watches.get(stream_id)
        if watch is None or watch.stale or after < watch.base:
            events, record, watch = await self._snapshot(stream_id, keys, after)
            if watch is None or events or record is None:
                return events, record
        watch.used = time.monotonic()
        while True:
            if after > watch.pos:  # ahead of the watch: the events before are of no use
                watch.pos = watch.base = after
                watch.buffered.clear()
            events = [item for item in watch.buffered if item[0] > after]
            if events:
                watch.buffered.clear()
                watch.base = watch.pos
                watch.unmarked = True
                watch.loop.want(watch)  # paused while its buffer was full
                return events, watch.current(events)
            wait = deadline - time.monotonic()
            if wait <= 0:
                break
            waiter: asyncio.Future[list[tuple[int, ServerSentEvent]] | None]
            waiter = asyncio.get_running_loop().create_future()
            watch.waiters[waiter] = after
            watch.loop.want(watch)
            try:
                events_or_signal = await asyncio.wait_for(waiter, wait)
            except asyncio.TimeoutError:
                break
            finally:
                watch.waiters.pop(waiter, None)
                watch.used = time.monotonic()
            if events_or_signal is None or self.watches.get(stream_id) is not watch:
                break  # a signal (or the watch was dropped): a snapshot says what changed
            watch.unmarked = True
            return events_or_signal, watch.current(events_or_signal)
        events, record, _ = await self._snapshot(stream_id, keys, after)
        return events, record

    async def _snapshot(
        self, stream_id: str, keys: list[str], after: int
    ) -> tuple[list[tuple[int, ServerSentEvent]], StreamRecord | None, _Watch | None]:
        """One snapshot script (it marks the reader seen): the events after ``after`` and the
        record; keeps the stream watched while it runs (None once finished or gone)."""
        store = self.store
        reply = await store._call(
            store._snapshot, keys[:3], [after, repr(time.time()), store.read_count]
        )
        if reply is None:
            self._drop(stream_id)
            return [], None, None
        record, signals = store._record(stream_id, reply)
        events = [store._event(entry) for entry in reply[3]]
        if record.finished:
            self._drop(stream_id)
            return events, record, None
        last = events[-1][0] if events else after
        watch = self.watches.get(stream_id)
        if watch is None:
            bulks = [_bulk(key.encode(store._encoding)) for key in keys]
            loop = next((group for group in self.loops if len(group.members) < _GROUP), None)
            if loop is None:
                loop = _ReadLoop(self)
                self.loops.append(loop)
            watch = _Watch(stream_id, keys, record, last, signals, loop, last, bulks=bulks)
            self.watches[stream_id] = loop.members[stream_id] = watch
        watch.record, watch.stale = record, False
        watch.signals = max(watch.signals, signals)
        if last > watch.pos:
            watch.pos = watch.base = last
            watch.buffered.clear()
        watch.marked, watch.unmarked = time.monotonic(), False
        return events, record, watch

    def _drop(self, stream_id: str) -> None:
        """Forget ``stream_id``; its waiters take a snapshot."""
        watch = self.watches.pop(stream_id, None)
        if watch is not None:
            watch.loop.members.pop(stream_id, None)
            for waiter in watch.waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def close(self) -> None:
        """Stop every loop (their waiters, if any, fail with ``CancelledError``)."""
        for loop in self.loops:
            await loop.close()
        self.watches.clear()


class _ReadLoop:
    """One shared ``XREAD BLOCK`` loop of :class:`_SharedRead` over its ``members``."""

    def __init__(self, shared: _SharedRead) -> None:
        self.shared = shared
        self.store = shared.store
        self.members: dict[str, _Watch] = {}
        self.task: asyncio.Task[None] | None = None
        self.inflight: set[_Watch] | None = None  # the watches of the XREAD in flight
        self.waking: asyncio.Task[None] | None = None
        self.wake_key = f"{self.store.prefix}wake:{{{secrets.token_hex(8)}}}"
        self.wake_bulk = _bulk(self.wake_key.encode(self.store._encoding))
        self.wake_id = "0-0"


    def want(self, watch: _Watch) -> None:
        """Have ``watch`` in the ``XREAD``: start the loop, or end the ``XREAD`` in flight
        through the wake-up stream if ``watch`` is not in it."""
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run())
        elif self.inflight is not None and watch not in self.inflight and self.waking is None:
            self.waking = asyncio.ensure_future(self._wake())

    async def _wake(self) -> None:
        """End the ``XREAD`` in flight: an entry on the wake-up stream (its TTL ten blocks)."""
        pipe = self.store.client.pipeline(transaction=False)
        pipe.xadd(self.wake_key, {"w": "1"}, maxlen=1, approximate=False)
        pipe.pexpire(self.wake_key, _ms(10 * self.store._max_block))
        with contextlib.suppress(Exception):  # the XREAD ends within _max_block anyway
            await pipe.execute()

    async def _run(self) -> None:
        """The loop: one pipeline of due marks and the ``XREAD``, then dispatch, while any
        stream is watched."""
        try:
            while True:
                now = time.monotonic()
                watching: list[_Watch] = []
                for stream_id, watch in list(self.members.items()):
                    if not watch.waiters and now - watch.used > _LINGER:
                        self.shared._drop(stream_id)
                    elif watch.waiters or len(watch.buffered) < self.store.read_count:
                        watching.append(watch)
                if not watching:
                    return
                replies = await self._xread(watching, now)
                self._dispatch(watching, replies)
        except Exception as exc:  # every waiter fails with it; every stream is forgotten
            for stream_id, watch in list(self.members.items()):
                for waiter in watch.waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                self.shared._drop(stream_id)
        finally:
            self.inflight = None
            self.task = None

    async def _xread(self, watching: list[_Watch], now: float) -> list[Any]:
        """One round trip: the due marks (snapshot scripts, no events) and the ``XREAD
        BLOCK``, packed here (each watch's keys encoded once) and answered raw; their replies
        (the marks' first; an ``UNBLOCKED`` ``XREAD`` answers None)."""
        from redis.exceptions import NoScriptError, ResponseError

        store = self.store
        marks = [w for w in watching if w.unmarked and now - w.marked >= _MARK_EVERY]
        head = _bulk(b"EVALSHA") + _bulk(store._mark.sha.encode()) + _bulk(b"1")
        stamp = _bulk(repr(time.time()).encode())
        packed = [b"*5\r\n" + head + w.bulks[0] + stamp for w in marks]
        for watch in marks:
            watch.marked, watch.unmarked = now, False
        keys, ids = [self.wake_bulk], [_bulk(self.wake_id.encode())]
        for watch in watching:
            keys += watch.bulks[1::2]  # events, signal
            ids += (_bulk(b"0-%d" % watch.pos), _bulk(b"0-%d" % watch.signals))
        block = str(_ms(store._max_block)).encode()
        count = str(store.read_count).encode()
        packed.append(
            b"*%d\r\n" % (6 + 2 * len(keys))
            + b"".join(map(_bulk, (b"XREAD", b"COUNT", count, b"BLOCK", block, b"STREAMS")))
            + b"".join(keys)
            + b"".join(ids)
        )
        self.inflight, self.waking = set(watching), None
        try:
            client: Any = store.client  # a Redis: no shared read on a Cluster
            replies = await _roundtrip(client, b"".join(packed), len(packed))
        finally:
            self.inflight = None
        woken = replies[-1]
        if isinstance(woken, ResponseError) and str(woken).startswith("UNBLOCKED"):
            replies[-1] = None
        elif isinstance(woken, Exception):
            raise woken
        for watch, reply in zip(marks, replies, strict=False):
            if isinstance(reply, NoScriptError):  # a restarted Redis: load it for the next
                await store._mark(keys=watch.keys[:1], args=[time.time()])
            elif isinstance(reply, Exception):
                raise reply
            elif not reply:  # gone: its waiters take a snapshot (and learn it)
                self.shared._drop(watch.stream_id)
        return replies

    def _dispatch(self, watching: list[_Watch], replies: list[Any]) -> None:
        """Hand what the ``XREAD`` returned to the waiters, or buffer it."""
        store = self.store
        named: dict[str, tuple[_Watch, bool]] = {}
        for watch in watching:
            named[watch.keys[1]] = (watch, True)
            named[watch.keys[3]] = (watch, False)
        woken = replies[-1]
        for name, entries in woken.items() if isinstance(woken, dict) else woken or ():
            key = store._text(name)
            if key == self.wake_key:
                self.wake_id = store._text(entries[-1][0])
                continue
            watch, is_events = named[key]
            if self.members.get(watch.stream_id) is not watch:
                continue  # dropped meanwhile
            if not is_events:
                signalled = store._seq(entries[-1][0])
                if signalled > watch.signals:
                    watch.signals, watch.stale = signalled, True
                    for waiter in watch.waiters:
                        if not waiter.done():
                            waiter.set_result(None)
                continue
            events = [item for item in map(store._event, entries) if item[0] > watch.pos]
            if not events:
                continue
            watch.pos = events[-1][0]
            watch.record.last_seq = max(watch.record.last_seq, watch.pos)
            taken = False
            for waiter, after in watch.waiters.items():
                mine = [item for item in events if item[0] > after]
                if mine and not waiter.done():
                    waiter.set_result(mine)
                    taken = True
            if taken:
                watch.buffered.clear()
                watch.base = watch.pos
            else:
                watch.buffered.extend(events)

    async def close(self) -> None:
        """Stop the loop."""
        for task in (self.task, self.waking):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self.members.clear()


class _Batch:
    """Script calls made while a pipeline is in flight go out together in the next one: one
    round trip (one ``send``, one pooled connection) for the appends, lease renewals and
    snapshots of every stream of this process, instead of one each. At most one pipeline is
    in flight; a call waits for it at most one round trip. A script that a restarted Redis
    lost (``NOSCRIPT``) is loaded and its call made again on its own; a pipeline that fails
    fails each of its calls with the error. Not for a Redis Cluster (its pipelines split by
    node, and its failover tests rely on one command per call)."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.queue: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]] = []
        self.task: asyncio.Task[None] | None = None
        self.alone: set[asyncio.Task[None]] = set()  # calls made again on their own

    def call(self, script: Any, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queue ``script(keys=keys, args=args)``; its reply, or the error, in the future."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.append((script, keys, args, future))
        if self.task is None:
            self.task = asyncio.ensure_future(self._flush())
        return future

    async def _flush(self) -> None:
        from redis.exceptions import NoScriptError

        try:
            await asyncio.sleep(0)  # the calls of this turn of the event loop join the first
            while self.queue:
                batch, self.queue = self.queue, []
                pool: Any = self.client.connection_pool
                encoder = pool.get_encoder()
                encode, encoding, errors = encoder.encode, encoder.encoding, encoder.encoding_errors
                packed = [
                    _pack(
                        [
                            arg.encode(encoding, errors) if type(arg) is str else encode(arg)
                            for arg in ("EVALSHA", script.sha, len(keys), *keys, *args)
                        ]
                    )
                    for script, keys, args, _ in batch
                ]
                try:
                    replies = await _roundtrip(self.client, b"".join(packed), len(packed))
                except Exception as exc:
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (script, keys, args, future), reply in zip(batch, replies, strict=True):
                    if isinstance(reply, NoScriptError):
                        alone = asyncio.ensure_future(self._alone(script, keys, args, future))
                        self.alone.add(alone)
                        alone.add_done_callback(self.alone.discard)
                    elif future.done():
                        continue
                    elif isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        finally:
            self.task = None
            for *_, future in self.queue:  # cancelled (the store closes)
                future.cancel()
            self.queue.clear()

    async def _alone(
        self, script: Any, keys: list[str], args: list[Any], future: asyncio.Future[Any]
    ) -> None:
        """``script``'s call on its own (redis-py's script call loads it first)."""
        try:
            reply = await script(keys=keys, args=args)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(reply)

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


def _bulk(value: bytes) -> bytes:
    """``value`` as a RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _pack(args: list[bytes]) -> bytes:
    """One command of ``args`` (encoded) in RESP, as redis-py packs it."""
    return b"*%d\r\n" % len(args) + b"".join(map(_bulk, args))


async def _roundtrip(client: Redis, packed: bytes, count: int) -> list[Any]:
    """Send ``count`` commands packed in ``packed`` on one connection of ``client``'s pool
    and read their replies: one round trip, replies raw (no response callbacks; an error
    reply is its exception, in its place). A dead connection is retried as the client's
    own commands are (its ``Retry``: the whole batch again on a new connection).

    Raises:
        redis.exceptions.ConnectionError, TimeoutError: the retries are spent.
    """
    from redis.exceptions import ResponseError

    pool: Any = client.connection_pool
    connection: Any = await pool.get_connection()

    async def attempt() -> list[Any]:
        await connection.send_packed_command(packed)
        replies: list[Any] = []
        for _ in range(count):
            try:
                replies.append(await connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies

    async def failed(_: Exception) -> None:
        await connection.disconnect()

    try:
        result: list[Any] = await connection.retry.call_with_retry(attempt, failed)
        return result
    finally:
        await pool.release(connection)
