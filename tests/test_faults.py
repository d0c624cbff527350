"""Every fault of the shipped kit, end to end over real sockets: FakeUpstream -> the example proxy
-> ``stream_request``. Each test tells the upstream's story as a ``FaultPlan`` sent with the
request, and checks what the client receives and what became of the upstream connection; the last
ones check the kit itself (the fake's exact bytes, the client's reports, the old knobs' plans)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
from conftest import app_name, chat_body, completions_body

from sanic_streamplus import SSEDecoder
from sanic_streamplus.testing import (
    FakeModel,
    FakeUpstream,
    FaultPlan,
    Headers,
    StreamResult,
    UpstreamRequest,
    serve_app,
    stream_request,
)
from sanic_streamplus.testing.faults import Write

ROUTES = ["/chat", "/v1/chat/completions"]


def body(route: str, plan: FaultPlan | list[Any] | None = None, **fake: Any) -> dict[str, Any]:
    """The route's request body; ``plan`` and the model's ``fake`` settings in its ``"fake"``."""
    if plan is not None:
        fake["plan"] = FaultPlan.from_json(plan).to_json()
    return chat_body(**fake) if route == "/chat" else completions_body(**fake)


@contextlib.asynccontextmanager
async def proxy_with(upstream: FakeUpstream, **config: Any) -> AsyncIterator[str]:
    """The example proxy with ``STREAMPLUS_*`` settings of a test, serving on 127.0.0.1."""
    from chat_proxy import create_app

    app = create_app(upstream.url, api_key="sk-test", name=app_name("faults"))
    app.config.update(config)
    async with serve_app(app) as url:
        yield url


async def relay(
    url: str,
    upstream: FakeUpstream,
    route: str,
    plan: FaultPlan | list[Any] | None = None,
    **fake: Any,
) -> tuple[StreamResult, UpstreamRequest]:
    """POST ``plan`` and the ``fake`` settings through the proxy; return what the client got and
    the upstream's record of the request."""
    before = len(upstream.requests)
    result = await stream_request(url, route, body(route, plan, **fake), timeout=5)
    assert len(upstream.requests) == before + 1
    return result, upstream.requests[-1]


def texts(result: StreamResult, route: str) -> list[str]:
    """The token texts the client received, in order."""
    if route == "/chat":
        return [json.loads(e.data)["text"] for e in result.events if e.event == "token"]
    chunks = [json.loads(e.data) for e in result.events if e.data != "[DONE]"]
    return [
        c["choices"][0]["delta"]["content"]
        for c in chunks
        if "choices" in c and c["choices"][0]["delta"].get("content")
    ]


def error_frame(result: StreamResult, route: str) -> dict[str, Any]:
    """The stream is a 200 that ended cleanly with one error frame in the route's dialect, after
    nothing but ordinary events; return the frame's error object."""
    assert result.status == 200
    assert result.complete, f"the body ended with {result.end}, not its terminating chunk"
    if route == "/chat":
        assert [e.event for e in result.events[:-1]] == ["token"] * (len(result.events) - 1)
        assert result.events[-1].event == "error"
        error: dict[str, Any] = json.loads(result.events[-1].data)["error"]
    else:
        assert result.events[-1].data == "[DONE]"
        assert [e.data for e in result.events].count("[DONE]") == 1
        error = json.loads(result.events[-2].data)["error"]
        assert all("error" not in json.loads(e.data) for e in result.events[:-2])
    assert b"Traceback" not in result.body
    return error


def completed(result: StreamResult, route: str) -> None:
    """The stream is a 200 that ended normally: ``[DONE]`` or ``event: done``, no error frame."""
    assert result.status == 200
    assert result.complete, f"the body ended with {result.end}, not its terminating chunk"
    if route == "/chat":
        assert result.events[-1].event == "done"
        assert "error" not in [e.event for e in result.events]
    else:
        assert result.events[-1].data == "[DONE]"
        assert [e.data for e in result.events].count("[DONE]") == 1
        assert all("error" not in json.loads(e.data) for e in result.events[:-1])


async def upstream_closed(upstream: FakeUpstream, record: UpstreamRequest) -> None:
    assert await upstream.wait_closed(record, 2) is not None, "upstream still open after 2 s"
    assert not record.completed


def offset(frames: list[bytes], number: int) -> int:
    """The byte offset in the body where block ``number`` starts."""
    return sum(len(frame) for frame in frames[:number])


# --- the upstream breaks the connection -----------------------------------------------------

RESETS: dict[str, tuple[Callable[[list[bytes]], int], int]] = {
    # where the reset falls: (byte offset from the blocks, blocks the client gets before it)
    "mid-event": (lambda frames: offset(frames, 5) + len(frames[5]) // 2, 5),
    "between-events": (lambda frames: offset(frames, 5), 5),
    "inside-the-blank-line": (lambda frames: offset(frames, 5) - 1, 4),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("where", RESETS)
async def test_reset_mid_stream_is_an_error_frame_after_the_tokens_before_it(
    proxy: str, upstream: FakeUpstream, route: str, where: str
) -> None:
    at, blocks = RESETS[where]
    cut = at(upstream.model.frames())
    result, record = await relay(proxy, upstream, route, FaultPlan().reset(at_byte=cut))
    assert record.sent == cut and record.reset
    error = error_frame(result, route)
    assert error["type"] == "upstream_disconnected"
    tokens = upstream.model.expected_tokens()
    assert texts(result, route) == tokens[: blocks - 1]  # block 0 is the role chunk
    if route == "/v1/chat/completions":
        assert len(result.events) == blocks + 2  # the blocks, the error, [DONE]
    await upstream_closed(upstream, record)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("cut", ["before-the-headers", "no-byte", "half-the-first-event"])
async def test_reset_before_any_event_is_a_502(
    proxy: str, upstream: FakeUpstream, route: str, cut: str
) -> None:
    plans = {
        "before-the-headers": FaultPlan().reset(),
        "no-byte": FaultPlan().headers().reset(),
        "half-the-first-event": FaultPlan().partial_event().reset(),
    }
    result, record = await relay(proxy, upstream, route, plans[cut])
    assert record.reset and record.events == 0
    assert result.status == 502 and result.complete
    assert result.headers["content-type"].startswith("application/json")
    no_answer = cut == "before-the-headers"  # the connection broke before any answer
    assert result.json["error"]["type"] == (
        "upstream_unreachable" if no_answer else "upstream_disconnected"
    )
    assert result.events == []
    await upstream_closed(upstream, record)


# --- the upstream goes silent ---------------------------------------------------------------

FIRST_EVENT_STALLS = {
    "before-the-headers": FaultPlan().stall(5),
    "keep-alives-after-the-headers": FaultPlan().headers().stall(5, comment_every=0.05),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("stall", FIRST_EVENT_STALLS)
async def test_no_first_event_in_time_is_a_504(
    upstream: FakeUpstream, route: str, stall: str
) -> None:
    async with proxy_with(upstream, STREAMPLUS_FIRST_EVENT_TIMEOUT=0.3) as url:
        result, record = await relay(url, upstream, route, FIRST_EVENT_STALLS[stall])
        await upstream_closed(upstream, record)
    assert result.status == 504 and result.complete
    assert result.json["error"]["type"] == "first_event_timeout"
    assert 0.25 <= result.elapsed < 3
    assert record.events == 0
    if stall.startswith("keep-alives"):
        assert record.comments >= 2, "the fake sent no keep-alive while the timer ran"


IDLE_STALLS = {
    "mid-frame": FaultPlan().events(3).partial_event().stall(5),
    "keep-alives-between-events": FaultPlan().events(3).stall(5, comment_every=0.05),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("stall", IDLE_STALLS)
async def test_silence_after_events_is_an_idle_timeout_frame_that_keep_alives_do_not_delay(
    upstream: FakeUpstream, route: str, stall: str
) -> None:
    async with proxy_with(upstream, STREAMPLUS_IDLE_TIMEOUT=0.3) as url:
        result, record = await relay(url, upstream, route, IDLE_STALLS[stall])
        await upstream_closed(upstream, record)
    error = error_frame(result, route)
    assert error["type"] == "idle_timeout"
    assert texts(result, route) == upstream.model.expected_tokens()[:2]  # blocks 1 and 2
    silence = result.event_times[-1] - result.event_times[-3 if route != "/chat" else -2]
    assert 0.25 <= silence < 3, f"the idle timeout fired after {silence:.2f} s of silence"
    if stall.startswith("keep-alives"):
        assert record.comments >= 2, "the fake sent no keep-alive while the timer ran"


# --- the upstream's bytes are odd but legal (or broken, but decodable) ----------------------

DECODING = {
    "malformed-utf8": {"malformed_utf8": True},
    "bom": {"bom": True},
    "cr-line-endings": {"line_ending": "cr"},
    "crlf-line-endings": {"line_ending": "crlf"},
    "u2028-u2029-in-json": {"u2028": True},
    "id-only-block": {"plan": FaultPlan().events(1).block(b"id: 42\n\n").to_json()},
}


def blocks_without_data(raw: bytes) -> list[bytes]:
    """The blocks of an event stream that have field lines but no ``data`` line: an OpenAI-style
    client dispatches those as empty events (and crashes)."""
    lines = raw.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    bad = []
    for block in lines.split(b"\n\n"):
        fields = [line for line in block.split(b"\n") if line and not line.startswith(b":")]
        if fields and not any(f == b"data" or f.startswith(b"data:") for f in fields):
            bad.append(block)
    return bad


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fault", DECODING)
async def test_odd_upstream_bytes_still_deliver_every_token(
    proxy: str, upstream: FakeUpstream, route: str, fault: str
) -> None:
    knobs = DECODING[fault]
    result, record = await relay(proxy, upstream, route, **knobs)
    completed(result, route)
    assert record.completed
    expected = upstream.model.override(knobs).expected_tokens()
    assert texts(result, route) == expected
    assert blocks_without_data(result.body) == []
    assert not result.body.startswith(b"\xef\xbb\xbf")
    if route == "/v1/chat/completions":
        assert len(result.events) == 12 + 3  # role chunk, tokens, stop chunk, [DONE]
    else:
        assert json.loads(result.events[-1].data)["tokens"] == 12


@pytest.mark.parametrize("fault", DECODING)
async def test_the_openai_sdk_reads_odd_upstream_bytes_through_the_proxy(
    proxy: str, upstream: FakeUpstream, fault: str
) -> None:
    sdk = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="anything", max_retries=0)
    try:
        stream = await sdk.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"fake": DECODING[fault]},
        )
        contents = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    finally:
        await sdk.close()
    assert [c for c in contents if c] == upstream.model.override(DECODING[fault]).expected_tokens()


@pytest.mark.parametrize("route", ROUTES)
async def test_an_oversized_event_is_an_event_too_large_frame(
    upstream: FakeUpstream, route: str
) -> None:
    async with proxy_with(upstream, STREAMPLUS_MAX_EVENT_SIZE=4096) as url:
        plan = FaultPlan().events(2).oversized_event(8192)
        result, record = await relay(url, upstream, route, plan)
        await upstream_closed(upstream, record)
    error = error_frame(result, route)
    assert error["type"] == "event_too_large"
    assert texts(result, route) == upstream.model.expected_tokens()[:1]


@pytest.mark.parametrize("route", ROUTES)
async def test_a_line_that_never_ends_is_a_line_too_long_frame(
    upstream: FakeUpstream, route: str
) -> None:
    # the idle timeout only bounds the test: the line limit must fire first
    config = {"STREAMPLUS_MAX_LINE_LENGTH": 1024, "STREAMPLUS_IDLE_TIMEOUT": 1}
    async with proxy_with(upstream, **config) as url:
        result, record = await relay(url, upstream, route, FaultPlan().events(2).long_line(16384))
        await upstream_closed(upstream, record)
    error = error_frame(result, route)
    assert error["type"] == "line_too_long"
    assert texts(result, route) == upstream.model.expected_tokens()[:1]
    assert result.elapsed < 0.9, "the line limit did not fire before the idle timeout"


@pytest.mark.parametrize("route", ROUTES)
async def test_the_stream_ends_at_done_when_the_upstream_holds_its_body_open(
    proxy: str, upstream: FakeUpstream, route: str
) -> None:
    result, record = await relay(proxy, upstream, route, FaultPlan().events().hang())
    completed(result, route)
    assert texts(result, route) == upstream.model.expected_tokens()
    assert result.elapsed < 2
    frames = upstream.model_for(record).frames()  # /chat asks for usage: one chunk more
    assert record.events == len(frames)  # [DONE] went out, the body never ended
    await upstream_closed(upstream, record)


TRICKLES = [(1, "lf"), (2, "lf"), (3, "lf"), (1, "crlf"), (2, "crlf"), (1, "cr")]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("piece", "line_ending"), TRICKLES)
async def test_a_body_trickled_a_few_bytes_at_a_time_arrives_intact(
    proxy: str, upstream: FakeUpstream, route: str, piece: int, line_ending: str
) -> None:
    knobs = {"tokens": 6, "delay": 0, "trickle": piece, "line_ending": line_ending}
    result, record = await relay(proxy, upstream, route, **knobs)
    completed(result, route)
    assert record.completed
    assert texts(result, route) == upstream.model.override(knobs).expected_tokens()


# --- the client goes away or stops reading (what the helper reports) -------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "reset"])
async def test_a_client_that_disconnects_at_event_n_closes_the_upstream(
    proxy: str, upstream: FakeUpstream, route: str, reset: bool
) -> None:
    result = await stream_request(
        proxy,
        route,
        body(route, tokens=1000, delay=0.01),
        disconnect_after=3,
        reset_on_disconnect=reset,
        timeout=5,
    )
    assert result.status == 200 and result.end == "disconnected" and not result.complete
    assert 3 <= len(result.events) < 1000
    await upstream_closed(upstream, upstream.requests[-1])


async def test_a_client_that_stops_reading_is_reported_and_closes_the_upstream_once_gone(
    proxy: str, upstream: FakeUpstream
) -> None:
    result = await stream_request(
        proxy,
        "/v1/chat/completions",
        completions_body(tokens=400, token_size=65536, delay=0),
        stop_reading_after=2,
        recv_buffer=4096,
        timeout=0.5,
    )
    assert result.status == 200 and not result.complete
    assert result.end in ("timeout", "reset", "closed")  # the latter two: a slow-client policy
    assert 2 <= len(result.events) < 400 + 3
    assert 0.4 <= result.elapsed < 5
    await upstream_closed(upstream, upstream.requests[-1])


# --- the upstream ends its body early, properly or not --------------------------------------


@pytest.mark.parametrize(
    ("plan", "end", "error"),
    [
        (FaultPlan().events(4).truncate(), "complete", "upstream_truncated"),
        (FaultPlan().events(4).close(), "closed", "upstream_disconnected"),
    ],
    ids=["truncated", "closed-mid-body"],
)
async def test_a_body_that_ends_before_its_done_is_an_error_frame(
    proxy: str, upstream: FakeUpstream, plan: FaultPlan, end: str, error: str
) -> None:
    route = "/v1/chat/completions"  # the openai dialect knows its end: finish_reason, [DONE]
    result, record = await relay(proxy, upstream, route, plan)
    assert error_frame(result, route)["type"] == error
    assert texts(result, route) == upstream.model.expected_tokens()[:3]  # blocks 1 to 3
    assert record.events == 4 and record.completed == (end == "complete") and not record.reset
    direct = await stream_request(
        f"http://127.0.0.1:{upstream.port}", route, {"fake": {"plan": plan.to_json()}}
    )
    assert direct.end == end and len(direct.events) == 4


# --- the kit itself: the fake's exact bytes, the client's reports ---------------------------

KIT: dict[str, tuple[dict[str, Any], FaultPlan, dict[str, Any], str]] = {
    # (the model's settings, the plan, stream_request's options, how the client says it ended)
    "complete": ({}, FaultPlan(), {}, "complete"),
    "reset-at-byte": ({}, FaultPlan().reset(at_byte=300), {}, "reset"),
    "hang-after-done": ({}, FaultPlan().events().hang(), {"timeout": 0.3}, "timeout"),
    "long-line": ({}, FaultPlan().events(2).long_line(1000), {"timeout": 0.3}, "timeout"),
    "stop-reading-then-reset": (
        {},
        FaultPlan().reset(at_byte=1000),
        {"stop_reading_after": 1},
        "reset",
    ),
    "stop-reading-then-end": ({}, FaultPlan(), {"stop_reading_after": 1}, "complete"),
    "trickle": ({"trickle": 3, "delay": 0, "line_ending": "crlf"}, FaultPlan(), {}, "complete"),
    "slow-reader": ({"delay": 0}, FaultPlan(), {"read_size": 7, "read_delay": 0.001}, "complete"),
    "stall-mid-frame": ({}, FaultPlan().events(2).partial_event().stall(0.1), {}, "complete"),
    "bom-malformed-u2028-id": (
        {"bom": True, "malformed_utf8": True, "u2028": True},
        FaultPlan().events(1).block(b"id: 42\n\n"),
        {},
        "complete",
    ),
    "oversized-event": (
        {"line_ending": "cr"},
        FaultPlan().events(2).oversized_event(5000),
        {},
        "complete",
    ),
}


@pytest.mark.parametrize("case", KIT)
async def test_the_fake_writes_exactly_its_frames_and_the_client_reports_how_it_ended(
    case: str,
) -> None:
    settings, plan, options, end = KIT[case]
    async with FakeUpstream(tokens=5, delay=0.001) as fake:
        model = fake.model.override({**settings, "plan": plan})
        frames = model.frames()
        whole = b"".join(frames)
        fake_json = {**settings, "plan": plan.to_json()}
        result = await stream_request(
            f"http://127.0.0.1:{fake.port}", "/v1/chat/completions", {"fake": fake_json}, **options
        )
        record = fake.requests[-1]
        assert await fake.wait_closed(record, 2) is not None  # Connection: close, or we left
    reset = plan.steps[-1] if plan.steps and plan.steps[-1].name == "reset" else None
    assert result.status == 200
    assert result.headers["content-type"] == "text/event-stream"
    assert result.end == end
    expected = whole[: getattr(reset, "at_byte", None)]
    assert result.body == expected and record.sent == len(expected)
    assert record.reset == (reset is not None)
    assert record.completed == (end == "complete")
    assert [e.data for e in result.events] == [e.data for e in SSEDecoder().feed(expected)]
    assert result.comments == record.comments == 0
    if "trickle" in settings:
        assert result.chunks == math.ceil(len(whole) / settings["trickle"])
    elif case != "stall-mid-frame" and reset is None:
        assert result.chunks == len(frames)


async def test_the_client_reports_keep_alives_and_a_json_error_answer() -> None:
    async with FakeUpstream(tokens=3, delay=0.001) as fake:
        url = f"http://127.0.0.1:{fake.port}"

        async def ask(**fake_json: Any) -> StreamResult:
            return await stream_request(url, "/v1/chat/completions", {"fake": fake_json})

        stalled = await ask(plan=FaultPlan().events(1).stall(0.2, comment_every=0.03).to_json())
        refused = await ask(plan=FaultPlan().status(429, retry_after="7").to_json())
        bad_knob = await ask(trickle=0)
        bad_step = await ask(plan=[{"explode": 1}])
        late_status = await ask(plan=[{"events": 1}, {"status": 503}])
    assert stalled.complete and stalled.comments == fake.requests[0].comments >= 3
    assert len(stalled.events) == 3 + 3
    assert stalled.event_times[1] - stalled.event_times[0] >= 0.15
    assert refused.status == 429 and refused.complete and refused.events == []
    assert refused.headers["retry-after"] == "7"
    assert refused.json == {"error": {"message": "fake upstream error", "type": "fake_error"}}
    assert bad_knob.status == 400 and "trickle" in bad_knob.json["error"]["message"]
    assert bad_step.status == 400 and "explode" in bad_step.json["error"]["message"]
    assert late_status.status == 400 and "status" in late_status.json["error"]["message"]


async def test_a_held_stream_waits_for_release_then_ends() -> None:
    plan = FaultPlan().events(2).hold().comments(2)
    async with FakeUpstream(tokens=3, delay=0, plan=plan) as fake:
        url = f"http://127.0.0.1:{fake.port}"
        pending = asyncio.ensure_future(stream_request(url, "/v1/chat/completions", {}))
        record = await fake.wait_requests(1, 2)
        for _ in range(200):  # until the fake waits at its hold
            if record.held:
                break
            await asyncio.sleep(0.01)
        assert record.held and record.events == 2 and not pending.done()
        fake.release()
        result = await asyncio.wait_for(pending, 5)
    assert result.complete and len(result.events) == 3 + 3 and result.comments == 2
    assert not record.held and record.completed


# --- the old knobs: a thin translation into plans -------------------------------------------

COMPAT: dict[str, tuple[dict[str, Any], FaultPlan]] = {
    # (old knobs, the plan they mean) over tokens=5: blocks 0 role, 1-5 tokens, 6 stop, 7 [DONE]
    "fail_after": ({"fail_after": 3}, FaultPlan().headers().events(3).reset()),
    "reset_at_byte": ({"reset_at_byte": 250}, FaultPlan().reset(at_byte=250)),
    "stall_after": (
        {"stall": 0.1, "stall_after": 2, "comment_every": 0.02},
        FaultPlan().events(2).stall(0.1, comment_every=0.02),
    ),
    "stall_mid_frame": (
        {"stall": 0.1, "stall_mid_frame": 3},
        FaultPlan().events(3).partial_event().stall(0.1),
    ),
    "error_status": (
        {"error_status": 503, "retry_after": "2", "error_body": "busy"},
        FaultPlan().status(503, "busy", retry_after="2"),
    ),
    "id_only_block-oversized_event": (
        {"id_only_block": True, "oversized_event": 400},
        FaultPlan().events(1).block(b"id: 42\n\n").events(1).oversized_event(400),
    ),
    "error_event_after": ({"error_event_after": 4}, FaultPlan().events(4).error_event()),
    "long_line": ({"long_line": 300}, FaultPlan().events(2).long_line(300)),
}


def program(model: FakeModel) -> list[Any]:
    """The model's laid-out actions, the head left out (the first write sends it) and writes in
    a row merged: what is written where, and what happens between."""
    actions: list[Any] = []
    for action in model.layout().actions:
        if isinstance(action, Write) and actions and isinstance(actions[-1], Write):
            actions[-1] = action
        elif not isinstance(action, Headers):
            actions.append(action)
    return actions


@pytest.mark.parametrize("case", COMPAT)
async def test_an_old_knob_writes_the_bytes_of_its_plan(case: str) -> None:
    knobs, plan = COMPAT[case]
    old, new = FakeModel(tokens=5, **knobs), FakeModel(tokens=5, plan=plan)
    assert old.frames() == new.frames() and program(old) == program(new)
    results = []
    async with FakeUpstream(tokens=5, delay=0) as fake:
        url = f"http://127.0.0.1:{fake.port}"
        for fake_json in (knobs, {"plan": plan.to_json()}):
            result = await stream_request(
                url, "/v1/chat/completions", {"fake": fake_json}, timeout=1
            )
            record = fake.requests[-1]
            body = result.body.replace(b": keep-alive\n\n", b"")  # how many: a matter of time
            results.append((result.status, result.end, body, result.comments > 0))
            results.append((record.sent, record.events, record.reset, record.completed))
    assert results[:2] == results[2:]


def test_a_plan_reads_back_from_its_json_and_refuses_steps_after_its_end() -> None:
    plan = FaultPlan().headers().events(3).partial_event().stall(1.5, comment_every=0.5)
    plan = plan.comments(2).hold().block(b"id: 1\r\n\r\n").error_event().hang()
    assert FaultPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert (
        FaultPlan([{"events": 3}, {"stall": 1.0}, "reset"])
        == FaultPlan().events(3).stall(1.0).reset()
    )
    with pytest.raises(ValueError, match="nothing can follow 'reset'"):
        FaultPlan().reset().events(1)
    with pytest.raises(ValueError, match="plan replaces the fault knobs"):
        FakeModel(fail_after=2, plan=FaultPlan().reset())
    model = FakeModel(fail_after=2).override({"plan": [{"events": 1}]})  # a request's own
    assert model.fail_after is None and model.fault_plan() == FaultPlan().events(1)
