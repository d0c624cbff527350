"""Asyncio tools the relay, the producer and the upstream client share: a close that survives
cancellation, closing an async iterator, one timer per event loop for every stream's timers,
a cheap resettable deadline and a cheap wake-up."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import weakref
from collections.abc import Awaitable, Callable
from typing import Any


async def close_completely(closing: Awaitable[Any]) -> None:
    """Run ``closing`` to its end even if the calling task is cancelled meanwhile.

    A cancellation that lands while a connection is being closed would otherwise abandon the
    close half-way and leave the upstream connection open. The close runs in its own task; a
    cancellation of the caller is held until the close is done, then re-raised. Errors raised
    by the close itself are swallowed: the resource is gone either way.

    Raises:
        asyncio.CancelledError: the caller was cancelled while it waited (after the close ended).
    """
    task = asyncio.ensure_future(closing)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and task.cancelled():
                break
            cancelled = True
        except Exception:
            break
    if not task.cancelled():
        task.exception()  # mark it retrieved
    if cancelled:
        raise asyncio.CancelledError


async def aclose_iterator(iterator: Any) -> None:
    """``await iterator.aclose()`` if it has one (an async generator, an httpx stream)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


class Timers:
    """Every stream's timers of one event loop on one loop timer (get it with
    :func:`timers`).

    A timer of the event loop costs about 700 bytes under uvloop (its handle, the libuv timer,
    a copy of the context); a stream has two (the pump's heartbeat and send watchdog, the
    upstream's deadline), so at a thousand idle streams the timers alone take 1.4 MB. Here a
    timer is one small list in a heap (``[when, order, callback]``), and the loop has one timer
    of its own, at the earliest of them. Callbacks run in the order of their times (then of
    their scheduling), from the loop timer's callback, without a context of their own.
    """

    __slots__ = ("__weakref__", "_at", "_cancelled", "_handle", "_heap", "_loop", "_order")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[list[Any]] = []
        self._order = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0  # when the loop timer fires (while there is one)
        self._cancelled = 0  # entries of the heap whose callback was cancelled

    def __len__(self) -> int:
        """How many timers are scheduled (cancelled ones not counted)."""
        return len(self._heap) - self._cancelled

    def call_at(self, when: float, callback: Callable[[], object]) -> list[Any]:
        """Call ``callback()`` at loop time ``when`` (seconds); the entry returned is the
        timer, for :meth:`cancel` (``entry[0]`` is its time)."""
        entry = [when, next(self._order), callback]
        heapq.heappush(self._heap, entry)
        if self._handle is None or when < self._at:
            self._arm(when)
        return entry

    def cancel(self, entry: list[Any]) -> None:
        """Cancel the timer ``entry`` (a no-op once it ran or was cancelled). Cancelled
        entries leave the heap when their time comes, or all at once when they are half of it."""
        if entry[2] is None:
            return
        entry[2] = None
        self._cancelled += 1
        if self._cancelled > 64 and 2 * self._cancelled > len(self._heap):
            self._heap = [kept for kept in self._heap if kept[2] is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._at = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        heap, now = self._heap, self._loop.time()
        while heap and (heap[0][2] is None or heap[0][0] <= now):
            entry = heapq.heappop(heap)
            callback = entry[2]
            if callback is None:
                self._cancelled -= 1
                continue
            entry[2] = None
            try:
                callback()
            except Exception as exc:  # as the loop does for its own callbacks
                self._loop.call_exception_handler(
                    {"message": "Exception in a stream timer callback", "exception": exc}
                )
        if heap and (self._handle is None or heap[0][0] < self._at):  # (a callback may
            self._arm(heap[0][0])  # have armed it for a later timer of its own)


_TIMERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Timers] = (
    weakref.WeakKeyDictionary()
)


def timers() -> Timers:
    """The running loop's :class:`Timers` (made at the first call in the loop)."""
    loop = asyncio.get_running_loop()
    found = _TIMERS.get(loop)
    if found is None:
        _TIMERS[loop] = found = Timers(loop)
    return found


class Deadline:
    """A deadline that cancels one task while it waits inside :meth:`guard`.

    Resetting it (:meth:`set`) costs one float assignment: a single timer (of the loop's
    :class:`Timers`) follows the deadline and re-arms itself when the deadline moved. The task
    is only cancelled while it is inside ``guard()`` (e.g. waiting for upstream bytes), never
    while it is doing something else (e.g. waiting for the client to drain), and the
    cancellation it causes comes out of ``guard()`` as ``TimeoutError``.
    """

    __slots__ = ("_at", "_fired", "_handle", "_loop", "_task", "_timers", "_waiting")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._timers = timers()
        self._task: asyncio.Task[Any] | None = None
        self._at: float | None = None
        self._handle: list[Any] | None = None  # the timer (Timers.call_at's entry)
        self._waiting = False
        self._fired = False

    def now(self) -> float:
        """The loop's time (seconds), the clock deadlines are set in."""
        return self._loop.time()

    def set(self, at: float | None) -> None:
        """Move the deadline to loop time ``at`` (seconds), or remove it with None."""
        self._at = at
        if at is not None and (self._handle is None or self._handle[0] > at):
            if self._handle is not None:
                self._timers.cancel(self._handle)
            self._handle = self._timers.call_at(at, self._check)

    def _check(self) -> None:
        self._handle = None
        at = self._at
        if at is None:
            return
        if self._loop.time() < at:
            self._handle = self._timers.call_at(at, self._check)
        elif self._waiting and self._task is not None and not self._fired:
            self._fired = True
            self._task.cancel()

    def enter(self) -> None:
        """A guarded wait of the current task begins (what :meth:`guard` does around its
        awaitable, for a caller that awaits by itself: one coroutine fewer per wait). Pair it
        with :meth:`leave` in a ``finally``, and pass a ``CancelledError`` of the wait through
        :meth:`expired`.

        Raises:
            TimeoutError: the deadline has passed already.
        """
        at = self._at
        if at is not None and self._loop.time() >= at:
            raise TimeoutError
        self._task = asyncio.current_task()
        self._waiting = True

    def leave(self) -> None:
        """The guarded wait is over (it returned or raised)."""
        self._waiting = False

    def expired(self) -> bool:
        """Whether the ``CancelledError`` that ended the guarded wait is the deadline's (then
        the cancellation is answered: the caller raises ``TimeoutError`` instead), not a
        cancellation from outside (that wins when both came)."""
        if not self._fired:
            return False
        self._fired = False
        uncancel = getattr(self._task, "uncancel", None)
        return uncancel is None or uncancel() <= 0

    async def guard(self, awaitable: Awaitable[Any]) -> Any:
        """Await ``awaitable``, cancelling it if the deadline passes first.

        Raises:
            TimeoutError: the deadline passed before ``awaitable`` finished.
            asyncio.CancelledError: the task was cancelled from outside.
        """
        try:
            self.enter()
        except TimeoutError:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self.expired():
                raise TimeoutError from None
            raise
        finally:
            self._waiting = False

    def close(self) -> None:
        """Cancel the timer."""
        self._at = None
        if self._handle is not None:
            self._timers.cancel(self._handle)
            self._handle = None


class Wake:
    """A wake-up for one waiting task: :meth:`set` from anywhere (a task, a callback);
    ``await wake.wait()`` returns at once if it was set since the last wait, else when it is
    set, and clears it. ``asyncio.Event`` without its waiter deque (memory per stream), its
    loop look-ups and its coroutine per wait (time per event): a future exists only while the
    task waits, and a wait that need not wait awaits one done future kept for it."""

    __slots__ = ("_done", "_loop", "_set", "_waiter")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._set = False
        self._waiter: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] | None = None  # made at the first wait that is set

    def set(self) -> None:
        """Wake the waiting task, or the next :meth:`wait`."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # (cancelled with its task: then the next wait)
                waiter.set_result(None)
                return
        self._set = True

    def wait(self) -> Awaitable[None]:
        """What to await until set (done at once if set already), clearing it.

        Raises (when awaited):
            asyncio.CancelledError: the task was cancelled while it waited.
        """
        if self._set:
            self._set = False
            done = self._done
            if done is None:
                self._done = done = self._loop.create_future()
                done.set_result(None)
            return done
        self._waiter = waiter = self._loop.create_future()
        return waiter
