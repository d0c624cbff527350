"""Asyncio tools the relay, the producer and the upstream client share: a close that survives
cancellation, closing an async iterator, a cheap resettable deadline and a cheap wake-up."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
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


class Deadline:
    """A deadline that cancels one task while it waits inside :meth:`guard`.

    Resetting it (:meth:`set`) costs one float assignment: a single ``loop.call_at`` timer
    follows the deadline and re-arms itself when the deadline moved. The task is only cancelled
    while it is inside ``guard()`` (e.g. waiting for upstream bytes), never while it is doing
    something else (e.g. waiting for the client to drain), and the cancellation it causes comes
    out of ``guard()`` as ``TimeoutError``.
    """

    __slots__ = ("_at", "_fired", "_handle", "_loop", "_task", "_waiting")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[Any] | None = None
        self._at: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._waiting = False
        self._fired = False

    def now(self) -> float:
        """The loop's time (seconds), the clock deadlines are set in."""
        return self._loop.time()

    def set(self, at: float | None) -> None:
        """Move the deadline to loop time ``at`` (seconds), or remove it with None."""
        self._at = at
        if at is not None and (self._handle is None or self._handle.when() > at):
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self._loop.call_at(at, self._check)

    def _check(self) -> None:
        self._handle = None
        at = self._at
        if at is None:
            return
        if self._loop.time() < at:
            self._handle = self._loop.call_at(at, self._check)
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
            self._handle.cancel()
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
