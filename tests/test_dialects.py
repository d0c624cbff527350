"""Dialects over real sockets: how each one ends, fails after the commit point, beats while
idle and merges text deltas for a slow reader; where each one's token usage is; and the
official ``openai`` (Responses API) and ``anthropic`` (Messages API) SDKs reading the proxy.

The upstream is a real Sanic app (:func:`script_app`) that streams a canned event stream of
each API, with a few fault knobs in the request body's ``"fake"`` object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest
from conftest import app_name
from sanic import Request, Sanic

from sanic_streamplus import ServerSentEvent, StreamPlus, encode, stream_post, upstream_events
from sanic_streamplus.config import Settings
from sanic_streamplus.errors import (
    IdleTimeout,
    InvalidRequest,
    ServerShutdown,
    StreamPlusError,
    UpstreamDisconnected,
    UpstreamErrorEvent,
    UpstreamStatusError,
    UpstreamTruncated,
)
from sanic_streamplus.framing import get_dialect, get_format
from sanic_streamplus.testing import StreamResult, fake_tokens, serve_app, stream_request

TOKENS = 8
WAIT = 20.0  # seconds: a loose bound on any one wait (loopback answers in milliseconds)
ROUTES = {  # dialect -> the path of its route, on the proxy and on the upstream alike
    "plain": "/v1/plain",
    "openai": "/v1/chat/completions",
    "anthropic": "/v1/messages",
    "openai-responses": "/v1/responses",
}
JUNK = ServerSentEvent('{"after":"the end"}')  # what a holding upstream writes after its end
RESPONSE_ID, MESSAGE_ID = "resp_fake", "msg_fake"
ANTHROPIC_PING = b'event: ping\ndata: {"type": "ping"}\n\n'


def named(kind: str, **data: Any) -> ServerSentEvent:
    """An event named by its data's ``type``, as Anthropic and OpenAI's Responses API send."""
    return ServerSentEvent(json.dumps({"type": kind, **data}), event=kind)


def plain_events(tokens: list[str], end: bool) -> list[ServerSentEvent]:
    return [ServerSentEvent(json.dumps({"text": token})) for token in tokens]


def chat_events(tokens: list[str], end: bool) -> list[ServerSentEvent]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> ServerSentEvent:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0}
        return ServerSentEvent(json.dumps({**body, "model": "fake", "choices": [choice]}))

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": token}) for token in tokens]
    events.append(chunk({}, "stop"))
    return [*events, ServerSentEvent("[DONE]")] if end else events


def anthropic_events(tokens: list[str], end: bool) -> list[ServerSentEvent]:
    """A Messages API stream (API reference "Messages, streaming"): one text block."""
    message = {
        "id": MESSAGE_ID,
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-fake",
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 1},
    }
    events = [
        named("message_start", message=message),
        named("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    ]
    for token in tokens:
        delta = {"type": "text_delta", "text": token}
        events.append(named("content_block_delta", index=0, delta=delta))
    events.append(named("content_block_stop", index=0))
    stop = {"stop_reason": "end_turn", "stop_sequence": None}
    events.append(named("message_delta", delta=stop, usage={"output_tokens": len(tokens)}))
    return [*events, named("message_stop")] if end else events


def responses_events(tokens: list[str], end: bool) -> list[ServerSentEvent]:
    """A Responses API stream (API reference "Responses, streaming events"): one message with
    one output_text part; every event valid for the openai SDK's strict validation."""
    text = "".join(tokens)
    response: dict[str, Any] = {
        "id": RESPONSE_ID,
        "object": "response",
        "created_at": 1700000000,
        "status": "in_progress",
        "model": "gpt-fake",
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "error": None,
        "incomplete_details": None,
        "usage": None,
    }
    where = {"item_id": MESSAGE_ID, "output_index": 0, "content_index": 0}
    item = {"id": MESSAGE_ID, "type": "message", "role": "assistant", "status": "in_progress"}
    part = {"type": "output_text", "text": "", "annotations": []}
    done_part = {**part, "text": text}
    done_item = {**item, "status": "completed", "content": [done_part]}
    steps: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": response}),
        ("response.in_progress", {"response": response}),
        ("response.output_item.added", {"output_index": 0, "item": {**item, "content": []}}),
        ("response.content_part.added", {**where, "part": part}),
    ]
    steps += [
        ("response.output_text.delta", {**where, "delta": token, "logprobs": []})
        for token in tokens
    ]
    steps += [
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": done_part}),
        ("response.output_item.done", {"output_index": 0, "item": done_item}),
    ]
    if end:
        usage = {
            "input_tokens": 10,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": len(tokens),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 10 + len(tokens),
        }
        completed = {**response, "status": "completed", "output": [done_item], "usage": usage}
        steps.append(("response.completed", {"response": completed}))
    return [named(kind, sequence_number=n, **data) for n, (kind, data) in enumerate(steps)]


UPSTREAM_MESSAGE = "the fake upstream is overloaded"


def upstream_error(dialect: str, number: int) -> ServerSentEvent:
    """The upstream's own error event in ``dialect``, as event number ``number`` of its stream:
    plain and Anthropic ``event: error``, OpenAI chat's ``data: {"error": ...}`` (as LiteLLM
    sends), the Responses API's ``response.failed`` of the announced response."""
    if dialect == "openai":
        error = {"message": UPSTREAM_MESSAGE, "type": "server_error", "code": "overloaded"}
        return ServerSentEvent(json.dumps({"error": error}))
    if dialect == "anthropic":
        return named("error", error={"type": "overloaded_error", "message": UPSTREAM_MESSAGE})
    if dialect == "openai-responses":
        response = json.loads(responses_events([], True)[0].data)["response"]
        failed = {**response, "status": "failed"}
        failed["error"] = {"code": "server_error", "message": UPSTREAM_MESSAGE}
        return named("response.failed", sequence_number=number, response=failed)
    body = {"error": {"type": "overloaded", "message": UPSTREAM_MESSAGE}}
    return ServerSentEvent(json.dumps(body), event="error")


SCRIPTS: dict[str, Callable[[list[str], bool], list[ServerSentEvent]]] = {
    "plain": plain_events,
    "openai": chat_events,
    "anthropic": anthropic_events,
    "openai-responses": responses_events,
}


def script_app() -> Sanic[Any, Any]:
    """The upstream: ``POST <ROUTES[dialect]>`` streams that dialect's canned events. Knobs in
    the body's ``"fake"``: ``tokens`` (int); ``end`` (bool, default true: send the end marker);
    ``cut`` (int: only the first that many events, then a clean end: a truncated stream);
    ``error_after`` (int: that many events, then the dialect's own error event
    (:func:`upstream_error`), then a clean end);
    ``delay`` (s between writes); ``stall`` (s before the first); ``batch`` (events per write);
    ``fail_after`` (int: abort the connection after that many events); ``hold`` (bool: after
    the events write :data:`JUNK`, then keep the connection open until the client leaves)."""
    app: Sanic[Any, Any] = Sanic(app_name("script"))
    dialects = {path: dialect for dialect, path in ROUTES.items()}

    @app.post("/v1/<name:path>")
    async def script(request: Request, name: str) -> None:
        fake = request.json.get("fake") or {}
        dialect = dialects["/v1/" + name]
        events = SCRIPTS[dialect](fake_tokens(fake.get("tokens", TOKENS)), fake.get("end", True))
        if fake.get("cut") is not None:
            events = events[: fake["cut"]]
        if fake.get("error_after") is not None:
            events = [*events[: fake["error_after"]], upstream_error(dialect, fake["error_after"])]
        if fake.get("hold"):
            events.append(JUNK)
        blocks = [encode(event) for event in events]
        response = await request.respond(content_type="text/event-stream")
        await asyncio.sleep(fake.get("stall", 0))
        batch, fail_after = fake.get("batch", 1), fake.get("fail_after")
        for start in range(0, len(blocks), batch):
            if fail_after is not None and start >= fail_after:
                request.transport.abort()  # no chunked terminator: a broken upstream
                return
            if start and fake.get("delay"):
                await asyncio.sleep(fake["delay"])
            await response.send(b"".join(blocks[start : start + batch]))
        if fake.get("hold"):
            await asyncio.Event().wait()  # until the proxy closes the connection
        await response.eof()

    return app


def relay_to(path: str) -> Callable[[Request], Any]:
    async def relay(request: Request) -> Any:
        return upstream_events(request, path, json=request.json)

    return relay


@contextlib.asynccontextmanager
async def dialect_proxy(resumable: bool = False, **config: Any) -> AsyncIterator[str]:
    """The scripted upstream, and a proxy that relays each ``ROUTES[dialect]`` in its dialect
    (``STREAMPLUS_*`` ``config`` on top of no heartbeat), resumable or not. Yields the proxy's
    base URL."""
    async with serve_app(script_app()) as upstream:
        app: Sanic[Any, Any] = Sanic(app_name("dialects"))
        app.config.STREAMPLUS_UPSTREAM_URL = upstream
        app.config.STREAMPLUS_HEARTBEAT = 0
        for key, value in config.items():
            app.config[key] = value
        app.extend(extensions=[StreamPlus])
        for dialect, path in ROUTES.items():
            app.post(path, name=f"relay_{dialect}".replace("-", "_"))(
                stream_post(dialect=dialect, resumable=resumable)(relay_to(path))
            )
        async with serve_app(app) as proxy:
            yield proxy


async def fetch(proxy: str, dialect: str, **fake: Any) -> StreamResult:
    return await stream_request(proxy, ROUTES[dialect], {"fake": fake}, timeout=WAIT)


def text_of(dialect: str, events: list[ServerSentEvent]) -> str:
    """The text the events of ``dialect`` carry."""
    text = ""
    for event in events:
        data = json.loads(event.data) if event.data.startswith("{") else {}
        if dialect == "plain":
            text += data.get("text", "")
        elif dialect == "openai":
            text += "".join(c["delta"].get("content") or "" for c in data.get("choices", ()))
        elif dialect == "anthropic" and data.get("type") == "content_block_delta":
            text += data["delta"]["text"]
        elif dialect == "openai-responses" and data.get("type") == "response.output_text.delta":
            text += data["delta"]
    return text


# what the stream's last event is: the end marker, or (no marker) the upstream's last event
ENDS = {
    "plain": lambda e: json.loads(e.data) == {"text": fake_tokens(TOKENS)[-1]},
    "openai": lambda e: e.data == "[DONE]",
    "anthropic": lambda e: e.event == "message_stop",
    "openai-responses": lambda e: e.event == "response.completed",
}


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("resumable", [False, True], ids=["live", "resumable"])
@pytest.mark.parametrize("dialect", list(ROUTES))
async def test_a_stream_ends_at_once_after_its_end_marker_and_nothing_follows(
    dialect: str, resumable: bool
) -> None:
    hold = dialect != "plain"  # the upstream stays open after its end marker (plain has none)
    async with dialect_proxy(resumable) as proxy:
        result = await fetch(proxy, dialect, hold=hold)
        if resumable:  # and a reader that resumes mid-stream gets the same end
            assert result.events[3].id is not None
            resumed = await stream_request(
                proxy, ROUTES[dialect], {}, headers={"Last-Event-ID": result.events[3].id}
            )
            assert resumed.status == 200 and resumed.complete
            assert resumed.events == result.events[4:]
    assert result.status == 200 and result.complete
    assert result.elapsed < 5  # not held open by the upstream
    assert ENDS[dialect](result.events[-1])
    assert b"the end" not in result.body
    assert text_of(dialect, result.events) == "".join(fake_tokens(TOKENS))


def truncation_frame(dialect: str, events: list[ServerSentEvent]) -> dict[str, Any]:
    """The error frame that ends a truncated stream of ``dialect`` (checked to be the last
    event(s): openai's then ``[DONE]``), as ``{"type", "message"}``."""
    if dialect == "openai":
        assert events[-1].data == "[DONE]"
        assert events[-2].event == "message"
        return dict(json.loads(events[-2].data)["error"])
    frame = json.loads(events[-1].data)
    if dialect == "anthropic":
        assert events[-1].event == "error" and frame["type"] == "error"
        return dict(frame["error"])
    assert events[-1].event == "response.failed" == frame["type"]
    failed = frame["response"]
    assert failed["id"] == RESPONSE_ID and failed["status"] == "failed"  # the announced one
    return {"type": failed["error"]["code"], "message": failed["error"]["message"]}


TRUNCATED_TYPE = {"openai": "upstream_truncated", "anthropic": "api_error"}
TRUNCATED_TYPE["openai-responses"] = "server_error"  # the Responses API's own error codes


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ``outcome=... [error=...]`` of each stream line logged so far."""
    lines = [r.getMessage() for r in caplog.records if r.name == "sanic_streamplus"]
    return [
        " ".join(w for w in line.split() if w.startswith(("outcome=", "error=")))
        for line in lines
        if line.startswith("stream ") and "outcome=" in line
    ]


async def wait_logged(caplog: pytest.LogCaptureFixture, count: int) -> list[str]:
    """:func:`logged`, once ``count`` lines are there (a line follows the stream's close)."""
    for _ in range(250):
        if len(found := logged(caplog)) >= count:
            return found
        await asyncio.sleep(0.02)
    return logged(caplog)


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("resumable", [False, True], ids=["live", "resumable"])
@pytest.mark.parametrize(
    ("dialect", "end"),
    [
        ("openai", False),  # no [DONE], but the finish_reason went by: complete
        ("openai", True),
        ("anthropic", True),
        ("openai-responses", True),
        ("plain", False),  # no end marker at all: any end is complete
    ],
)
async def test_a_complete_stream_ends_with_its_end_marker_never_an_error(
    dialect: str, end: bool, resumable: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sanic_streamplus")
    async with dialect_proxy(resumable) as proxy:
        result = await fetch(proxy, dialect, end=end)
        lines = await wait_logged(caplog, 1)
    assert result.status == 200 and result.complete
    assert ENDS[dialect](result.events[-1])  # openai: [DONE], written for the finish_reason
    assert not [e for e in result.events if e.event in ("error", "response.failed")]
    assert b"ended without its end event" not in result.body
    assert text_of(dialect, result.events) == "".join(fake_tokens(TOKENS))
    assert lines[-1] == "outcome=completed"


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("resumable", [False, True], ids=["live", "resumable"])
@pytest.mark.parametrize("dialect", ["openai", "anthropic", "openai-responses"])
async def test_a_stream_cut_short_ends_with_the_dialects_error_frame_never_its_end_marker(
    dialect: str, resumable: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream ends its body cleanly after 3 tokens, without its terminal event (openai:
    no finish_reason, no [DONE]): ``upstream_truncated``, an error frame in the dialect, then
    the end; never a ``[DONE]`` / ``message_stop`` / ``response.completed`` the proxy made up."""
    caplog.set_level(logging.INFO, "sanic_streamplus")
    cut = {"openai": 4, "anthropic": 5, "openai-responses": 7}[dialect]  # 3 tokens each
    async with dialect_proxy(resumable) as proxy:
        result = await fetch(proxy, dialect, cut=cut)
        if resumable:  # a reader that resumes mid-stream gets the same end (Responses: it
            resumed = await stream_request(  # saw response.in_progress, so the same response)
                proxy, ROUTES[dialect], {}, headers={"Last-Event-ID": result.events[0].id or ""}
            )
        lines = await wait_logged(caplog, 2 if resumable else 1)
    assert result.status == 200 and result.complete  # the error frame, then a clean end
    assert text_of(dialect, result.events) == "".join(fake_tokens(3))
    frame = truncation_frame(dialect, result.events)
    assert frame["type"] == TRUNCATED_TYPE[dialect]
    assert "ended without its end event" in frame["message"]
    extra = 2 if dialect == "openai" else 1  # the frame (openai: and [DONE]), nothing else
    assert len(result.events) == cut + extra
    assert result.body.count(b"[DONE]") == (1 if dialect == "openai" else 0)
    assert not [e for e in result.events if e.event in ("message_stop", "response.completed")]
    if resumable:
        assert resumed.status == 200 and resumed.complete
        assert [(e.event, e.data) for e in resumed.events[:-extra]] == [
            (e.event, e.data) for e in result.events[1:-extra]
        ]
        assert truncation_frame(dialect, resumed.events) == frame
    assert set(lines) == {"outcome=upstream_truncated error=upstream_truncated"}


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("resumable", [False, True], ids=["live", "resumable"])
@pytest.mark.parametrize("dialect", ["openai", "anthropic", "openai-responses"])
async def test_an_upstream_that_sends_no_event_is_a_502_in_the_dialects_shape(
    dialect: str, resumable: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sanic_streamplus")
    async with dialect_proxy(resumable) as proxy:
        result = await fetch(proxy, dialect, cut=0)
        lines = await wait_logged(caplog, 1)
    assert result.status == 502 and result.json is not None
    error = result.json["error"]
    if dialect == "anthropic":
        assert result.json["type"] == "error" and error["type"] == "api_error"
    else:
        assert error["type"] == "upstream_truncated"
    assert "ended without its end event" in error["message"]
    assert lines[-1] == "outcome=upstream_truncated error=upstream_truncated"


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("resumable", [False, True], ids=["live", "resumable"])
@pytest.mark.parametrize("at", [3, 0], ids=["mid-stream", "first"])
@pytest.mark.parametrize("dialect", list(ROUTES))
async def test_the_upstreams_own_error_event_passes_through_once_and_ends_the_stream(
    dialect: str, at: int, resumable: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Its own frame, as it came, exactly once; then ``[DONE]`` for openai and nothing else:
    no second error frame of ours, no end marker, nothing the upstream sent after it."""
    caplog.set_level(logging.INFO, "sanic_streamplus")
    async with dialect_proxy(resumable) as proxy:
        result = await fetch(proxy, dialect, error_after=at, hold=True)
        lines = await wait_logged(caplog, 1)
    assert result.status == 200 and result.complete
    assert result.elapsed < 5  # not held open by the upstream
    own = upstream_error(dialect, at)
    tail = result.events[at:]
    assert [(e.event, e.data) for e in tail] == [(own.event, own.data)] + (
        [("message", "[DONE]")] if dialect == "openai" else []
    )
    assert result.body.count(UPSTREAM_MESSAGE.encode()) == 1
    assert b"the end" not in result.body  # what the upstream wrote after its error
    assert lines[-1] == "outcome=upstream_error error=upstream_error"


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("dialect", list(ROUTES))
async def test_an_upstream_failure_after_the_commit_point_is_the_dialects_error_frame(
    dialect: str,
) -> None:
    async with dialect_proxy() as proxy:
        result = await fetch(proxy, dialect, fail_after=5)
    assert result.status == 200 and result.complete  # then a clean end
    events = result.events
    assert len(events) == 5 + (2 if dialect == "openai" else 1)  # the frame, and nothing else
    error = json.loads(events[5].data)
    if dialect == "plain":
        assert events[5].event == "error"
        assert error["error"]["type"] == "upstream_disconnected"
    elif dialect == "openai":
        assert error["error"]["type"] == "upstream_disconnected"
        assert events[6].data == "[DONE]"
    elif dialect == "anthropic":
        assert events[5].event == "error"
        assert error["type"] == "error"
        assert error["error"]["type"] == "api_error"
        assert "mid-stream" in error["error"]["message"]
    else:
        assert events[5].event == "response.failed" == error["type"]
        assert error["sequence_number"] == json.loads(events[4].data)["sequence_number"] + 1
        failed = error["response"]
        assert failed["id"] == RESPONSE_ID and failed["model"] == "gpt-fake"  # as announced
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "server_error"
        assert "mid-stream" in failed["error"]["message"]


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("dialect", ["anthropic", "openai-responses"])
async def test_heartbeats_are_anthropic_pings_or_comments(dialect: str) -> None:
    async with dialect_proxy(STREAMPLUS_HEARTBEAT=0.025) as proxy:
        result = await fetch(proxy, dialect, tokens=2, delay=0.1)
    assert result.complete and ENDS[dialect](result.events[-1])
    pings = [e for e in result.events if e.event == "ping"]
    if dialect == "anthropic":
        assert result.comments == 0
        assert len(pings) >= 3
        assert result.body.count(ANTHROPIC_PING) == len(pings)
    else:
        assert not pings
        assert result.comments >= 3
        assert b": ping\n" in result.body


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("dialect", ["anthropic", "openai-responses"])
async def test_coalesce_merges_the_text_deltas_of_a_slow_reader(dialect: str) -> None:
    tokens = 5000
    config = {"STREAMPLUS_SLOW_CLIENT": "coalesce", "STREAMPLUS_HIGH_WATER_MARK": 16 * 1024}
    async with dialect_proxy(**config) as proxy:
        result = await stream_request(
            proxy,
            ROUTES[dialect],
            {"fake": {"tokens": tokens, "batch": 500}},
            read_size=4096,
            read_delay=0.005,
            recv_buffer=4096,
            timeout=60,
        )
    assert result.complete and ENDS[dialect](result.events[-1])
    assert text_of(dialect, result.events) == "".join(fake_tokens(tokens))  # every character
    kind = "content_block_delta" if dialect == "anthropic" else "response.output_text.delta"
    deltas = [e for e in result.events if e.event == kind]
    assert len(deltas) < tokens // 2  # merged while the reader was behind
    if dialect == "openai-responses":
        numbers = [json.loads(e.data)["sequence_number"] for e in result.events]
        assert numbers == sorted(set(numbers))  # still increasing (with gaps)


# ---------------------------------------------------------------- the dialects, one event at a time


def responses_delta(text: str, **extra: Any) -> ServerSentEvent:
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    fields = {"sequence_number": len(text), **where, "delta": text, "logprobs": [], **extra}
    return named("response.output_text.delta", **fields)


def anthropic_delta(text: str, index: int = 1, kind: str = "text_delta") -> ServerSentEvent:
    return named("content_block_delta", index=index, delta={"type": kind, "text": text})


MERGES: dict[str, tuple[Callable[[str], ServerSentEvent], list[ServerSentEvent]]] = {
    # dialect: (a text delta with this text, events that are not text deltas)
    "plain": (
        lambda t: ServerSentEvent(json.dumps({"text": t})),
        [ServerSentEvent('{"x": 1}'), ServerSentEvent('{"text": "a", "more": 1}')],
    ),
    "openai": (lambda t: chat_events([t], True)[1], chat_events([], True)),  # role, stop, DONE
    "anthropic": (
        anthropic_delta,
        [
            anthropic_delta("a", kind="thinking_delta"),
            ServerSentEvent(anthropic_delta("a").data),  # unnamed: the SDK would skip it
        ],
    ),
    "openai-responses": (
        lambda t: responses_delta(t, obfuscation="x" * len(t)),
        [
            responses_delta("a", logprobs=[{"token": "a", "logprob": -0.1}]),
            responses_delta("a", unknown=1),
        ],
    ),
}


@pytest.mark.parametrize("name", list(MERGES))
def test_consecutive_text_deltas_merge(name: str) -> None:
    make, others = MERGES[name]
    dialect = get_dialect(name)
    first, second = dialect.text_delta(make("Hel")), dialect.text_delta(make("lo!"))
    assert first is not None and second is not None
    assert first[0] == second[0]  # the same shape: they merge
    assert (first[2], second[2]) == ("Hel", "lo!")
    merged = dialect.with_text(first[1], first[2] + second[2])
    assert merged.event == make("").event
    assert text_of(name, [merged]) == "Hello!"
    expected = json.loads(make("Hello!").data)
    if name == "openai-responses":  # it keeps the first delta's sequence_number, obfuscation
        expected.update(sequence_number=3, obfuscation="xxx")
    assert json.loads(merged.data) == expected
    for other in others:
        assert dialect.text_delta(other) is None, other
    with_id = make("x")
    with_id.id = "7"
    assert dialect.text_delta(with_id) is None  # a merge would lose the id


def test_merged_deltas_keep_their_place() -> None:
    anthropic = get_dialect("anthropic")
    one, two = (
        anthropic.text_delta(anthropic_delta("a", 1)),
        anthropic.text_delta(anthropic_delta("a", 2)),
    )
    assert one is not None and two is not None and one[0] != two[0]  # another block
    responses = get_dialect("openai-responses")
    first = responses.text_delta(responses_delta("abc", obfuscation="xyz"))
    other = responses.text_delta(responses_delta("abc", content_index=1))
    assert first is not None and other is not None and first[0] != other[0]
    merged = json.loads(responses.with_text(first[1], "abcdef").data)
    assert (merged["sequence_number"], merged["obfuscation"]) == (3, "xyz")  # the first's


USAGE = {"input_tokens": 3, "output_tokens": 5}


@pytest.mark.parametrize(
    ("dialect", "event", "usage"),
    [
        ("plain", ServerSentEvent(json.dumps({"text": "x", "usage": USAGE})), USAGE),
        ("plain", ServerSentEvent('{"text": "say \\"usage\\": {"}'), None),
        ("openai", ServerSentEvent(json.dumps({"choices": [], "usage": USAGE})), USAGE),
        ("openai", chat_events(["x"], True)[1], None),
        ("openai", ServerSentEvent('{"choices": [], "usage": null}'), None),
        ("openai", ServerSentEvent("[DONE]"), None),
        ("anthropic", anthropic_events([], True)[0], {"input_tokens": 25, "output_tokens": 1}),
        ("anthropic", anthropic_events(["a", "b"], True)[-2], {"output_tokens": 2}),
        ("anthropic", anthropic_events(["a"], True)[2], None),
        ("anthropic", ServerSentEvent('{"type": "ping"}', event="ping"), None),
        ("openai-responses", responses_events(["a"], True)[-1], None),  # filled in below
        ("openai-responses", responses_events(["a"], True)[0], None),  # "usage": null
        ("openai-responses", ServerSentEvent('{"usage": {"a": 1}}'), None),  # not response's
    ],
)
def test_usage_is_found_where_each_dialect_keeps_it(
    dialect: str, event: ServerSentEvent, usage: dict[str, Any] | None
) -> None:
    if event.event == "response.completed":
        usage = json.loads(event.data)["response"]["usage"]
        assert usage and usage["total_tokens"] == 11
    assert get_dialect(dialect).usage(event) == usage


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (IdleTimeout(60), "timeout_error"),
        (UpstreamDisconnected("broke", upstream_status=200), "api_error"),
        (UpstreamStatusError(529), "overloaded_error"),
        (UpstreamStatusError(429), "rate_limit_error"),
        (UpstreamStatusError(401), "authentication_error"),
        (ServerShutdown(), "overloaded_error"),
        (InvalidRequest("no"), "invalid_request_error"),
        (StreamPlusError("internal server error"), "api_error"),
    ],
)
def test_anthropic_error_types(error: StreamPlusError, kind: str) -> None:
    (frame,) = get_dialect("anthropic").error_frame(error, None, None)
    assert frame.event == "error"
    assert json.loads(frame.data) == {
        "type": "error",
        "error": {"type": kind, "message": error.message},
    }


def test_a_responses_failure_before_any_response_announces_one_first() -> None:
    dialect = get_dialect("openai-responses")
    created, failed = dialect.error_frame(UpstreamStatusError(429), None, None)
    assert (created.event, failed.event) == ("response.created", "response.failed")
    first, second = json.loads(created.data), json.loads(failed.data)
    assert (first["sequence_number"], second["sequence_number"]) == (0, 1)
    assert first["response"]["id"] == second["response"]["id"]
    assert first["response"]["id"].startswith("resp_")
    assert second["response"]["error"]["code"] == "rate_limit_exceeded"
    # after a response was announced: its response.failed only, numbered after the last event
    events = responses_events(["a"], False)
    (failed,) = dialect.error_frame(IdleTimeout(1), events[0], events[-1])
    announced = json.loads(events[0].data)["response"]["id"]
    last = json.loads(events[-1].data)["sequence_number"]
    body = json.loads(failed.data)
    assert (failed.event, body["response"]["id"]) == ("response.failed", announced)
    assert body["sequence_number"] == last + 1
    assert get_dialect("openai-responses") is dialect  # one object serves every stream


def test_heartbeat_bytes_per_dialect_and_format() -> None:
    sse, ndjson = get_format("sse"), get_format("ndjson")
    assert get_dialect("anthropic").heartbeat(sse) == ANTHROPIC_PING
    assert get_dialect("anthropic").heartbeat(ndjson) == b"\n"
    for name in ("plain", "openai", "openai-responses"):
        assert get_dialect(name).heartbeat(sse) == b": ping\n"


def test_unknown_dialect_is_an_error_at_decoration_and_in_config() -> None:
    with pytest.raises(ValueError, match="unknown dialect 'nope'"):
        stream_post(dialect="nope")
    with pytest.raises(ValueError, match="STREAMPLUS_DIALECT must be one of"):
        Settings.from_config({"STREAMPLUS_DIALECT": "nope"})
    for name in ROUTES:
        assert Settings.from_config({"STREAMPLUS_DIALECT": name}).dialect == name
    app: Sanic[Any, Any] = Sanic(app_name("nope"))
    app.config.STREAMPLUS_DIALECT = "nope"
    with pytest.raises(ValueError, match="STREAMPLUS_DIALECT"):
        app.extend(extensions=[StreamPlus])


# ---------------------------------------------------------------- the official SDKs


def openai_sdk(proxy: str) -> openai.AsyncOpenAI:
    """The openai SDK on the proxy, validating every event against its types."""
    return openai.AsyncOpenAI(
        base_url=proxy + "/v1",
        api_key="client-key",
        max_retries=0,
        timeout=WAIT,
        _strict_response_validation=True,
    )


@pytest.mark.usefixtures("transport")
async def test_openai_sdk_reads_a_responses_stream() -> None:
    async with dialect_proxy(STREAMPLUS_HEARTBEAT=0.02) as proxy, openai_sdk(proxy) as sdk:
        stream = await sdk.responses.create(
            model="gpt-fake", input="hi", stream=True, extra_body={"fake": {"delay": 0.03}}
        )
        events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "".join(fake_tokens(TOKENS))
    assert events[-1].response.usage is not None
    assert events[-1].response.usage.total_tokens == 10 + TOKENS


@pytest.mark.usefixtures("transport")
async def test_openai_sdk_sees_response_failed() -> None:
    async with dialect_proxy() as proxy, openai_sdk(proxy) as sdk:
        stream = await sdk.responses.create(
            model="gpt-fake", input="hi", stream=True, extra_body={"fake": {"fail_after": 6}}
        )
        events = [event async for event in stream]  # no exception: a failed response
        async with sdk.responses.stream(  # the helper checks the lifecycle's response id
            model="gpt-fake", input="hi", extra_body={"fake": {"fail_after": 6}}
        ) as helper:
            helped = [event async for event in helper]
    for seen in (events, helped):
        failed = seen[-1]
        assert failed.type == "response.failed"
        assert failed.sequence_number == 6
        assert failed.response.id == RESPONSE_ID and failed.response.status == "failed"
        assert failed.response.error is not None
        assert failed.response.error.code == "server_error"


@pytest.mark.usefixtures("transport")
async def test_openai_sdk_stream_helper_gets_created_then_failed_when_nothing_started() -> None:
    """A heartbeat commits the stream, then the upstream's first event is late: the frame
    announces a response before failing it, as the SDK's stream helper needs."""
    config = {"STREAMPLUS_HEARTBEAT": 0.05, "STREAMPLUS_FIRST_EVENT_TIMEOUT": 0.4}
    async with dialect_proxy(**config) as proxy, openai_sdk(proxy) as sdk:
        async with sdk.responses.stream(
            model="gpt-fake", input="hi", extra_body={"fake": {"stall": 5}}
        ) as helper:
            events = [event async for event in helper]
    assert [e.type for e in events] == ["response.created", "response.failed"]
    assert events[1].response.id == events[0].response.id
    assert events[1].response.error is not None
    assert "first event" in events[1].response.error.message


def anthropic_sdk(proxy: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=proxy, api_key="client-key", max_retries=0, timeout=WAIT
    )


MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


ASK: Any = {"model": "claude-fake", "max_tokens": 100, "messages": MESSAGES}  # one message


@pytest.mark.usefixtures("transport")
async def test_anthropic_sdk_reads_a_full_stream() -> None:
    """Pings between the events; the upstream stays open after message_stop, and the SDK
    reads until the connection ends: the proxy must end it at once."""
    fake = {"delay": 0.03, "hold": True}
    async with dialect_proxy(STREAMPLUS_HEARTBEAT=0.01) as proxy, anthropic_sdk(proxy) as sdk:
        async with sdk.messages.stream(**ASK, extra_body={"fake": fake}) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            message = await stream.get_final_message()
        raw = await sdk.messages.create(**ASK, stream=True, extra_body={"fake": fake})
        kinds = [event.type async for event in raw]
    assert text == "".join(fake_tokens(TOKENS))
    assert message.id == MESSAGE_ID and message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 25 and message.usage.output_tokens == TOKENS
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"


@pytest.mark.usefixtures("transport")
async def test_anthropic_sdk_raises_its_status_error_on_event_error() -> None:
    fake = {"fail_after": 5}
    async with dialect_proxy() as proxy, anthropic_sdk(proxy) as sdk:
        with pytest.raises(anthropic.APIStatusError) as raised:
            raw = await sdk.messages.create(**ASK, stream=True, extra_body={"fake": fake})
            async for _ in raw:
                pass
        text = ""
        with pytest.raises(anthropic.APIStatusError) as helped:
            async with sdk.messages.stream(**ASK, extra_body={"fake": fake}) as stream:
                async for piece in stream.text_stream:
                    text += piece
    for error in (raised.value, helped.value):
        assert error.type == "api_error"
        assert error.api_message is not None and "mid-stream" in error.api_message
    assert text == "".join(fake_tokens(TOKENS)[:3])  # what came before the error


@pytest.mark.parametrize(
    ("dialect", "last"),
    [("openai", "finish_reason"), ("anthropic", "message_stop"), ("openai-responses", "completed")],
)
async def test_ndjson_keeps_an_end_event_with_data_and_drops_a_bare_marker(
    dialect: str, last: str
) -> None:
    app: Sanic[Any, Any] = Sanic(app_name("ndjson"))
    app.extend(extensions=[StreamPlus])
    events = SCRIPTS[dialect](fake_tokens(3), True)

    @app.post("/n")
    @stream_post(dialect=dialect, format="ndjson")
    async def canned(request: Request) -> AsyncIterator[ServerSentEvent]:
        for event in events:
            yield event

    async with serve_app(app) as url, httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.post(url + "/n", json={})
    lines = response.text.splitlines()
    assert "[DONE]" not in response.text
    assert last in lines[-1]
    assert len(lines) == sum(event.data != "[DONE]" for event in events)


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("resumable", [False, True], ids=["live", "resumable"])
async def test_anthropic_sdk_raises_on_a_stream_cut_short(resumable: bool) -> None:
    """No message_stop: the SDK raises its status error on the proxy's error frame, instead of
    returning a message that looks finished."""
    fake = {"cut": 5}  # message_start, content_block_start, 3 deltas
    async with dialect_proxy(resumable) as proxy, anthropic_sdk(proxy) as sdk:
        text = ""
        with pytest.raises(anthropic.APIStatusError) as raised:
            async with sdk.messages.stream(**ASK, extra_body={"fake": fake}) as stream:
                async for piece in stream.text_stream:
                    text += piece
    assert raised.value.type == "api_error"
    assert raised.value.api_message is not None
    assert "ended without its end event" in raised.value.api_message
    assert text == "".join(fake_tokens(3))


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("resumable", [False, True], ids=["live", "resumable"])
async def test_anthropic_sdk_raises_the_upstreams_own_error_event(resumable: bool) -> None:
    async with dialect_proxy(resumable) as proxy, anthropic_sdk(proxy) as sdk:
        with pytest.raises(anthropic.APIStatusError) as raised:
            fake = {"error_after": 4}
            raw = await sdk.messages.create(**ASK, stream=True, extra_body={"fake": fake})
            async for _ in raw:
                pass
    assert raised.value.type == "overloaded_error"  # the upstream's own type and words
    assert raised.value.api_message == UPSTREAM_MESSAGE


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("resumable", [False, True], ids=["live", "resumable"])
async def test_openai_sdk_sees_a_responses_stream_cut_short_fail(resumable: bool) -> None:
    """No response.completed: the stream ends with response.failed of the announced response,
    so the SDK's stream helper has no final response to return."""
    fake = {"cut": 7}  # created, in_progress, item added, part added, 3 deltas
    async with dialect_proxy(resumable) as proxy, openai_sdk(proxy) as sdk:
        stream = await sdk.responses.create(
            model="gpt-fake", input="hi", stream=True, extra_body={"fake": fake}
        )
        events = [event async for event in stream]
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            async with sdk.responses.stream(
                model="gpt-fake", input="hi", extra_body={"fake": fake}
            ) as helper:
                await helper.get_final_response()
    failed = events[-1]
    assert failed.type == "response.failed" and failed.sequence_number == 7
    assert failed.response.id == RESPONSE_ID and failed.response.error is not None
    assert "ended without its end event" in failed.response.error.message
    assert [e.type for e in events].count("response.failed") == 1


@pytest.mark.usefixtures("transport")
async def test_openai_sdk_gets_the_upstreams_own_response_failed_once() -> None:
    async with dialect_proxy() as proxy, openai_sdk(proxy) as sdk:
        stream = await sdk.responses.create(
            model="gpt-fake", input="hi", stream=True, extra_body={"fake": {"error_after": 5}}
        )
        events = [event async for event in stream]
    assert [e.type for e in events][-2:] == ["response.output_text.delta", "response.failed"]
    failed = events[-1]
    assert failed.response.error is not None
    assert failed.response.error.message == UPSTREAM_MESSAGE
    assert failed.sequence_number == 5


# ------------------------------------------------ handlers that iterate upstream_events


def iterating_app(upstream: str) -> Sanic[Any, Any]:
    """Routes whose handlers iterate ``upstream_events`` themselves: ``/summary/<dialect>``
    (plain) yields one event saying how the iteration ended; ``/into/<dialect>`` returns the
    upstream of ``upstream_dialect`` (a query argument) on a route of ``dialect``."""
    app: Sanic[Any, Any] = Sanic(app_name("iterating"))
    app.config.STREAMPLUS_UPSTREAM_URL = upstream
    app.config.STREAMPLUS_HEARTBEAT = 0
    app.extend(extensions=[StreamPlus])

    @app.post("/summary/<dialect>")
    @stream_post(dialect="plain")
    async def summary(request: Request, dialect: str) -> AsyncIterator[Any]:
        seen: list[str] = []
        try:
            events = upstream_events(request, ROUTES[dialect], json=request.json, dialect=dialect)
            async for event in events:
                seen.append(event.event)
        except UpstreamErrorEvent as error:
            yield {
                "caught": type(error).__name__,
                "type": error.upstream_type,
                "code": error.upstream_code,
                "message": error.message,
                "raw": [error.event.event, error.event.data],
                "dialect": error.dialect,
                "seen": len(seen),
            }
            return
        except UpstreamTruncated as error:
            yield {"caught": type(error).__name__, "message": error.message, "seen": len(seen)}
            return
        yield {"caught": None, "seen": len(seen), "last": seen[-1]}

    for route_dialect in ROUTES:

        @app.post(f"/into/{route_dialect}", name=f"into_{route_dialect}".replace("-", "_"))
        @stream_post(dialect=route_dialect)
        async def into(request: Request) -> Any:
            dialect = request.args.get("upstream_dialect")
            return upstream_events(request, ROUTES[dialect], json=request.json, dialect=dialect)

    return app


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "openai-responses"])
async def test_a_handler_catches_the_upstreams_error_event_as_a_typed_exception(
    dialect: str,
) -> None:
    async with serve_app(script_app()) as upstream, serve_app(iterating_app(upstream)) as url:
        result = await stream_request(
            url, f"/summary/{dialect}", {"fake": {"error_after": 3}}, timeout=WAIT
        )
    [event] = result.events
    caught = json.loads(event.data)
    own = upstream_error(dialect, 3)
    assert caught["caught"] == "UpstreamErrorEvent" and caught["dialect"] == dialect
    assert caught["message"] == UPSTREAM_MESSAGE
    assert caught["raw"] == [own.event, own.data]  # the raw event, as it came
    assert caught["seen"] == 3  # not yielded: raised in its place
    if dialect == "openai":
        assert (caught["type"], caught["code"]) == ("server_error", "overloaded")
    elif dialect == "anthropic":
        assert caught["type"] == "overloaded_error"
    else:
        assert caught["code"] == "server_error"


@pytest.mark.parametrize(
    ("dialect", "cut", "complete"),
    [
        ("openai", 4, False),  # 3 tokens, no finish_reason
        ("openai", 2 + TOKENS, True),  # the finish_reason chunk, no [DONE]: complete
        ("anthropic", 5, False),
        ("openai-responses", 7, False),
        ("plain", 3, True),  # no end marker at all
    ],
)
async def test_a_handler_gets_upstream_truncated_at_the_end_of_its_iteration(
    dialect: str, cut: int, complete: bool
) -> None:
    async with serve_app(script_app()) as upstream, serve_app(iterating_app(upstream)) as url:
        result = await stream_request(url, f"/summary/{dialect}", {"fake": {"cut": cut}})
        whole = await stream_request(url, f"/summary/{dialect}", {"fake": {}})
    caught = json.loads(result.events[0].data)
    assert caught["seen"] == cut  # every event came first
    if complete:
        assert caught["caught"] is None
    else:
        assert caught["caught"] == "UpstreamTruncated"
        assert caught["message"] == f"the upstream's {dialect} stream ended without its end event"
    ended = json.loads(whole.events[0].data)
    assert ended["caught"] is None
    if dialect in ("anthropic", "openai-responses"):  # its terminal event is the last one
        assert ended["last"] == ENDS_NAME[dialect]


ENDS_NAME = {"anthropic": "message_stop", "openai-responses": "response.completed"}


@pytest.mark.parametrize(
    ("route", "upstream"),
    [("plain", "openai"), ("anthropic", "openai"), ("openai", "anthropic")],
)
async def test_an_upstream_error_event_of_another_dialect_is_the_routes_own_error_frame(
    route: str, upstream: str
) -> None:
    """Returned as it is from a route of another dialect: the route's error frame, carrying
    the upstream's message (and type and code where the route's shape has room)."""
    async with serve_app(script_app()) as up, serve_app(iterating_app(up)) as url:
        result = await stream_request(
            url, f"/into/{route}?upstream_dialect={upstream}", {"fake": {"error_after": 3}}
        )
    assert result.status == 200 and result.complete
    own = upstream_error(upstream, 3)
    assert own.data not in [e.data for e in result.events]  # not the upstream's own frame
    if route == "openai":
        error, done = result.events[-2:]
        assert done.data == "[DONE]"
        assert json.loads(error.data)["error"] == {
            "message": UPSTREAM_MESSAGE, "type": "overloaded_error", "code": None
        }
    elif route == "anthropic":
        assert result.events[-1].event == "error"
        assert json.loads(result.events[-1].data) == {
            "type": "error", "error": {"type": "server_error", "message": UPSTREAM_MESSAGE}
        }
    else:
        assert result.events[-1].event == "error"
        error = json.loads(result.events[-1].data)["error"]
        assert (error["type"], error["message"]) == ("upstream_error", UPSTREAM_MESSAGE)
    assert result.body.count(UPSTREAM_MESSAGE.encode()) == 1


async def test_an_upstream_error_event_of_another_dialect_before_anything_is_a_502() -> None:
    async with serve_app(script_app()) as up, serve_app(iterating_app(up)) as url:
        result = await stream_request(
            url, "/into/anthropic?upstream_dialect=openai", {"fake": {"error_after": 0}}
        )
    assert result.status == 502
    assert result.json == {
        "type": "error", "error": {"type": "server_error", "message": UPSTREAM_MESSAGE}
    }
