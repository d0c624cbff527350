"""The loop's shared timers (``_aio.Timers``): every stream's heartbeat, send watchdog and upstream
deadline on one loop timer, on a real event loop."""

from __future__ import annotations

import asyncio
from typing import Any

from sanic_streamplus._aio import Deadline, timers


async def test_timers_run_in_time_order_and_cancelled_ones_never() -> None:
    loop = asyncio.get_running_loop()
    shared = timers()
    assert timers() is shared  # one per loop
    ran: list[tuple[str, float]] = []
    start = loop.time()

    def note(name: str, at: float) -> Any:
        return lambda: ran.append((name, loop.time() - at))

    late = shared.call_at(start + 0.06, note("late", start + 0.06))
    shared.call_at(start + 0.04, note("second", start + 0.04))
    cancelled = shared.call_at(start + 0.02, note("cancelled", start + 0.02))
    shared.call_at(start + 0.01, note("first", start + 0.01))
    shared.cancel(cancelled)
    shared.cancel(cancelled)  # twice: a no-op
    assert len(shared) == 3
    await asyncio.sleep(0.2)
    assert [name for name, _ in ran] == ["first", "second", "late"]
    assert all(0 <= lateness < 0.1 for _, lateness in ran)  # never early
    shared.cancel(late)  # after it ran: a no-op
    assert len(shared) == 0


async def test_a_timer_scheduled_from_a_timer_callback_keeps_the_earlier_ones_on_time() -> None:
    loop = asyncio.get_running_loop()
    shared = timers()
    ran: list[str] = []
    start = loop.time()
    # the first callback schedules a timer later than one already waiting: that one still
    # runs at its own time, not at the later one's
    shared.call_at(
        start + 0.01, lambda: shared.call_at(start + 1.0, lambda: ran.append("much later"))
    )
    shared.call_at(start + 0.05, lambda: ran.append("on time"))
    await asyncio.sleep(0.2)
    assert ran == ["on time"]


async def test_a_failing_callback_is_reported_and_the_others_still_run() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        shared = timers()
        ran: list[str] = []

        def fail() -> None:
            raise RuntimeError("boom")

        now = loop.time()
        shared.call_at(now + 0.01, fail)
        shared.call_at(now + 0.01, lambda: ran.append("after"))
        await asyncio.sleep(0.1)
        assert ran == ["after"]
        assert [type(context["exception"]) for context in reported] == [RuntimeError]
    finally:
        loop.set_exception_handler(None)


async def test_cancelled_timers_do_not_pile_up() -> None:
    # streams that end long before their idle deadline leave no trace behind
    loop = asyncio.get_running_loop()
    shared = timers()
    entries = [shared.call_at(loop.time() + 600, lambda: None) for _ in range(1000)]
    for entry in entries:
        shared.cancel(entry)
    assert len(shared) == 0
    assert len(shared._heap) < 200  # compacted, not 1000 dead entries for ten minutes


async def test_a_deadline_on_the_shared_timers_still_times_a_wait_out() -> None:
    loop = asyncio.get_running_loop()
    deadline = Deadline()
    deadline.set(loop.time() + 0.05)
    started = loop.time()
    try:
        await deadline.guard(asyncio.sleep(5))
    except TimeoutError:
        pass
    else:
        raise AssertionError("the deadline did not fire")
    assert loop.time() - started < 2
    deadline.set(loop.time() + 10)  # far out, then moved in: fires at the new time
    deadline.set(loop.time() + 0.05)
    started = loop.time()
    try:
        await deadline.guard(asyncio.sleep(5))
    except TimeoutError:
        pass
    else:
        raise AssertionError("the moved deadline did not fire")
    assert loop.time() - started < 2
    deadline.close()
