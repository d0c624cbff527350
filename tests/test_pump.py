"""The pump over its in-memory downstream: one write per read, heartbeats before the first event,
backpressure, the send watchdog's cut, the end rule and outside inputs; the source closed once.

The real-socket behaviour (Sanic native and ASGI) is what the other test files check; here the
pump's own rules, with exact bytes and no network.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sanic_streamplus.downstream import MemoryDownstream
from sanic_streamplus.errors import StreamCancelled
from sanic_streamplus.framing import EventKind, get_dialect, get_format
from sanic_streamplus.machine import Commit, Cut, FinalFrame, Outcome, Phase, StreamMachine
from sanic_streamplus.pump import Pump
from sanic_streamplus.sse import ServerSentEvent, SSEDecoder

pytestmark = pytest.mark.timeout(30)


class Source:
    """An async generator of ``items``, sleeping ``pause`` seconds after each of ``every``
    items (0: never); it counts the items pulled and its closes."""

    def __init__(self, items: list[Any], every: int = 0, pause: float = 0.0, end: float = 0.0):
        self.items, self.every, self.pause, self.end = items, every, pause, end
        self.pulled = 0
        self.closed = 0

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            for number, item in enumerate(self.items, 1):
                self.pulled += 1
                yield item
                if self.every and number % self.every == 0:
                    await asyncio.sleep(self.pause)
            await asyncio.sleep(self.end)
        finally:
            self.closed += 1


def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def pump(dialect: str = "openai", **options: Any) -> tuple[Pump, MemoryDownstream]:
    machine = StreamMachine(get_dialect(dialect), get_format("sse"), {"X": "1"})
    downstream = MemoryDownstream()
    return Pump(machine, downstream, **options), downstream


def sends(downstream: MemoryDownstream) -> list[bytes]:
    return [data for kind, data in downstream.log if kind == "send"]


async def test_the_events_of_one_read_leave_in_one_write_and_the_end_once() -> None:
    source = Source([chunk("a"), chunk("b"), chunk("c", "stop"), "[DONE]"], every=3, pause=0.05)
    stream, downstream = pump()
    await stream.run(source.__aiter__())
    kinds = [kind for kind, _ in downstream.log]
    assert kinds == ["commit", "send", "finish"]
    assert sends(downstream)[0].count(b"data: ") == 3  # one write for the read's three events
    assert downstream.log[-1][1] == FinalFrame(b"data: [DONE]\n\n", downstream.log[-1][1].events)
    assert stream.machine.ending is not None
    assert stream.machine.ending.outcome is Outcome.COMPLETED
    assert source.closed == 1


async def test_a_heartbeat_commits_a_stream_whose_first_event_is_late() -> None:
    async def late() -> AsyncIterator[Any]:
        await asyncio.sleep(0.35)
        yield chunk("a", "stop")

    stream, downstream = pump(heartbeat=0.1)
    await stream.run(late())
    commit = downstream.log[0][1]
    assert isinstance(commit, Commit) and commit.status == 200
    assert sends(downstream)[:2] == [b": ping\n", b": ping\n"]  # before the first event
    assert downstream.body.endswith(b"data: [DONE]\n\n")


async def test_no_item_is_pulled_while_a_full_batch_waits_for_the_writer() -> None:
    items = [chunk("x" * 100) for _ in range(1000)] + ["[DONE]"]
    source = Source(items)
    stream, downstream = pump(high_water_mark=1000)
    downstream.gate = asyncio.Event()  # the client does not drain
    running = asyncio.ensure_future(stream.run(source.__aiter__()))
    await asyncio.sleep(0.2)
    pulled = source.pulled
    event_size = len(b"data: " + json.dumps(chunk("x" * 100)).encode())
    assert pulled <= 2 * (1000 // event_size + 2)  # one batch in the send, one queued
    downstream.gate.set()
    await asyncio.wait_for(running, 10)
    events = SSEDecoder().feed(bytes(downstream.body))
    assert len(events) == 1001 and events[-1].data == "[DONE]"


async def test_a_write_that_does_not_drain_is_cut_and_the_source_closed() -> None:
    source = Source([chunk("a")] * 50, every=1, pause=0.01, end=30)
    stream, downstream = pump(send_timeout=0.2)
    downstream.gate = asyncio.Event()  # never set by the test: only the cut's unblock opens it
    await asyncio.wait_for(stream.run(source.__aiter__()), 10)
    kind, cut = downstream.log[-1]
    assert kind == "cut" and isinstance(cut, Cut)
    assert cut.ending.outcome is Outcome.TIMEOUT
    assert b'"type":"send_timeout"' in cut.data and cut.data.endswith(b"data: [DONE]\n\n")
    assert source.closed == 1 and source.pulled < 50


async def test_a_source_that_ends_without_its_end_is_truncated() -> None:
    stream, downstream = pump("anthropic")
    await stream.run(Source(['{"type":"message_start","message":{}}']).__aiter__())
    frame = downstream.log[-1][1]
    assert isinstance(frame, FinalFrame)
    (error,) = frame.events
    assert error.event == "error" and json.loads(error.data)["error"]["type"] == "api_error"
    assert stream.machine.ending is not None
    assert stream.machine.ending.outcome is Outcome.UPSTREAM_TRUNCATED


async def test_an_empty_source_is_refused_before_the_commit_point() -> None:
    stream, downstream = pump()
    await stream.run(Source([]).__aiter__())
    [(kind, refusal)] = downstream.log
    assert kind == "refuse" and refusal.status == 502


async def test_a_cancelled_caller_closes_the_source_once_and_writes_nothing_more() -> None:
    source = Source([chunk("a")] * 1000, every=1, pause=0.01)
    stream, downstream = pump()
    running = asyncio.ensure_future(stream.run(source.__aiter__()))
    await asyncio.sleep(0.1)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert source.closed == 1
    assert stream.machine.phase is Phase.ENDED
    assert stream.machine.ending is not None
    assert stream.machine.ending.outcome is Outcome.CLIENT_DISCONNECTED
    assert [kind for kind, _ in downstream.log if kind in ("finish", "cut", "refuse")] == []


@pytest.mark.parametrize("how", ["shutdown", "cancel"])
async def test_shutdown_and_cancel_end_with_their_frame_and_close_the_source(how: str) -> None:
    source = Source([chunk("a")] * 1000, every=1, pause=0.01)
    stream, downstream = pump()
    running = asyncio.ensure_future(stream.run(source.__aiter__()))
    await asyncio.sleep(0.1)
    if how == "shutdown":
        stream.shutdown()
    else:
        stream.cancel(StreamCancelled("s"))
    await asyncio.wait_for(running, 5)
    await asyncio.wait_for(stream.ended(), 1)
    error = SSEDecoder().feed(bytes(downstream.body))[-2]
    expected = "shutdown" if how == "shutdown" else "cancelled"
    assert json.loads(error.data)["error"]["type"] == expected
    assert source.closed == 1 and source.pulled < 1000


def test_feed_is_events_write_for_a_plain_event_of_a_committed_stream_and_none_else() -> None:
    from sanic_streamplus.framing import EventKind
    from sanic_streamplus.machine import Write
    from sanic_streamplus.sse import ServerSentEvent

    fed, told = (StreamMachine(get_dialect("openai"), get_format("sse")) for _ in range(2))
    first = ServerSentEvent(json.dumps(chunk("a")))
    assert fed.feed(first, EventKind.OTHER) is None  # waiting: the commit is event()'s
    fed.event(first, EventKind.OTHER)
    told.event(first, EventKind.OTHER)
    for kind in (EventKind.OTHER, EventKind.TEXT_DELTA, EventKind.USAGE):
        event = ServerSentEvent(json.dumps(chunk(kind.value)))
        assert told.event(event, kind) == [Write(fed.feed(event, kind) or b"", event)]
    assert fed.events == told.events == 4
    for kind in (EventKind.TERMINAL, EventKind.UPSTREAM_ERROR, EventKind.START, EventKind.FINISH):
        assert fed.feed(ServerSentEvent("x"), kind) is None
    assert fed.events == 4 and fed.phase is Phase.COMMITTED


class Classified(Source):
    """A source that classifies its own events in one dialect (as ``UpstreamEvents`` does)."""

    def __init__(self, items: list[Any], dialect: str, kinds: list[EventKind]) -> None:
        super().__init__(items)
        self.dialect, self.kinds = dialect, kinds

    def classified(
        self, dialect: str
    ) -> AsyncIterator[list[tuple[ServerSentEvent, EventKind]]] | None:
        if dialect != self.dialect:
            return None
        return self._batches()

    async def _batches(self) -> AsyncIterator[list[tuple[ServerSentEvent, EventKind]]]:
        try:  # one event per batch, as from an upstream that writes one event per read
            for item, kind in zip(self.items, self.kinds, strict=True):
                self.pulled += 1
                yield [(ServerSentEvent(item), kind)]
        finally:
            self.closed += 1


async def test_a_source_that_classifies_in_the_stream_dialect_is_not_classified_again() -> None:
    # "b" would be OTHER to the openai dialect: the source's own TERMINAL kind ends the stream
    items = ["a", "b", "c"]
    kinds = [EventKind.OTHER, EventKind.TERMINAL, EventKind.OTHER]
    the_pump, downstream = pump()
    source = Classified(items, "openai", kinds)
    await the_pump.run(source)
    assert the_pump.machine.ending is not None
    assert the_pump.machine.ending.outcome is Outcome.COMPLETED
    assert source.pulled == 2 and source.closed == 1
    assert [event.data for event in SSEDecoder().feed(bytes(downstream.body))] == ["a", "b"]
    # in another dialect its kinds are not the stream's: the pump classifies (plain: all OTHER)
    the_pump, downstream = pump("plain")
    other = Classified(items, "openai", kinds)
    await the_pump.run(other)
    assert [event.data for event in SSEDecoder().feed(bytes(downstream.body))] == items
