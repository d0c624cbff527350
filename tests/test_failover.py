"""Failover: several upstreams per route, tried in order (``docs/failover.md``).

Every test runs real servers on 127.0.0.1: two or three ``FakeUpstream``s (or the scripted
Anthropic upstream of ``test_dialects``), the proxy app, and the official SDK as the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from conftest import app_name, free_port, run_example
from sanic import Request, Sanic
from sanic.response import json as json_response
from test_dialects import ROUTES, SCRIPTS, TOKENS, openai_sdk, script_app

from sanic_streamplus import StreamInfo, StreamPlus, stream_post, upstream_events
from sanic_streamplus.failover import Breaker
from sanic_streamplus.splice import CONTINUE_INSTRUCTION
from sanic_streamplus.sse import ServerSentEvent, encode
from sanic_streamplus.testing import FakeUpstream, fake_tokens, serve_app

WAIT = 10.0  # seconds: the bound of every client call
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
PRIMARY_TEXT = "the primary answers in five words"
BACKUP_TEXT = "the backup answers this one"


def answering(text: str) -> Any:
    return lambda body: text


@contextlib.asynccontextmanager
async def proxy(
    upstreams: list[tuple[str, str]], infos: list[StreamInfo] | None = None, **config: Any
) -> AsyncIterator[str]:
    """A proxy whose ``/v1/chat/completions`` (dialect openai) relays to ``upstreams``
    (``(name, base URL)``, in order); ``STREAMPLUS_*`` ``config`` on top of no heartbeat.
    Each stream's :class:`StreamInfo` goes to ``infos``. Yields the proxy's base URL."""
    app: Sanic[Any, Any] = Sanic(app_name("failover"))
    app.config.STREAMPLUS_UPSTREAMS = [{"name": name, "url": url} for name, url in upstreams]
    app.config.STREAMPLUS_HEARTBEAT = 0
    for key, value in config.items():
        app.config[key] = value
    app.extend(extensions=[StreamPlus])
    hooks = [] if infos is None else [infos.append]

    @app.post("/v1/chat/completions")
    @stream_post(dialect="openai", on_finish=hooks)
    async def chat(request: Request) -> Any:
        return upstream_events(request, "/chat/completions", json=request.json)

    async with serve_app(app) as url:
        yield url


async def chat(url: str) -> tuple[str, list[Any]]:
    """One streamed chat completion through the openai SDK: its text and its chunks."""
    async with openai_sdk(url) as sdk:
        stream = await sdk.chat.completions.create(
            model="fake-model", messages=MESSAGES, stream=True
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def dead_url() -> str:
    """The base URL of a port nothing listens on: connecting is refused."""
    return f"http://127.0.0.1:{free_port()}/v1"


def outcomes(info: StreamInfo) -> list[tuple[str, str]]:
    return [(attempt.upstream, attempt.outcome) for attempt in info.attempts]


@pytest.mark.usefixtures("transport")
async def test_a_dead_primary_is_replaced_by_the_backup() -> None:
    infos: list[StreamInfo] = []
    async with FakeUpstream(answer=answering(BACKUP_TEXT)) as backup:
        async with proxy([("primary", dead_url()), ("backup", backup.url)], infos) as url:
            text, chunks = await chat(url)
    assert text == BACKUP_TEXT
    assert len(backup.requests) == 1
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    assert outcomes(infos[0]) == [("primary", "upstream_unreachable"), ("backup", "completed")]
    assert infos[0].outcome == "completed"
    assert infos[0].attempts[1].time_to_first_event is not None


@pytest.mark.parametrize("status", [500, 503, 529])
async def test_a_5xx_primary_is_replaced_by_the_backup(status: int) -> None:
    infos: list[StreamInfo] = []
    async with (
        FakeUpstream(error_status=status) as primary,
        FakeUpstream(answer=answering(BACKUP_TEXT)) as backup,
    ):
        async with proxy([("primary", primary.url), ("backup", backup.url)], infos) as url:
            text, _ = await chat(url)
    assert text == BACKUP_TEXT
    assert len(primary.requests) == 1 and len(backup.requests) == 1
    assert outcomes(infos[0]) == [("primary", "upstream_status"), ("backup", "completed")]


async def test_a_429_fails_over_and_its_retry_after_keeps_the_primary_out() -> None:
    infos: list[StreamInfo] = []
    async with (
        FakeUpstream(error_status=429, retry_after="30") as primary,
        FakeUpstream(answer=answering(BACKUP_TEXT)) as backup,
    ):
        async with proxy([("primary", primary.url), ("backup", backup.url)], infos) as url:
            first, _ = await chat(url)
            second, _ = await chat(url)  # within the 30 s: the primary is not asked
    assert first == second == BACKUP_TEXT
    assert len(primary.requests) == 1 and len(backup.requests) == 2
    assert outcomes(infos[0]) == [("primary", "rate_limited"), ("backup", "completed")]
    assert outcomes(infos[1]) == [("primary", "circuit_open"), ("backup", "completed")]


async def test_a_400_does_not_fail_over_and_keeps_its_status() -> None:
    infos: list[StreamInfo] = []
    async with (
        FakeUpstream(error_status=400) as primary,
        FakeUpstream(answer=answering(BACKUP_TEXT)) as backup,
    ):
        async with proxy([("primary", primary.url), ("backup", backup.url)], infos) as url:
            with pytest.raises(openai.BadRequestError) as raised:
                await chat(url)
    assert raised.value.status_code == 400
    assert len(primary.requests) == 1 and backup.requests == []
    assert outcomes(infos[0]) == [("primary", "refused")]


async def test_every_upstream_refusing_is_the_last_refusal() -> None:
    async with (
        FakeUpstream(error_status=503) as primary,
        FakeUpstream(error_status=429, retry_after="7") as backup,
    ):
        async with proxy([("primary", primary.url), ("backup", backup.url)]) as url:
            with pytest.raises(openai.RateLimitError) as raised:
                await chat(url)
    assert raised.value.response.headers["retry-after"] == "7"
    assert len(primary.requests) == 1 and len(backup.requests) == 1


async def test_the_breaker_opens_after_failures_and_then_every_upstream_cooling_is_a_503() -> None:
    infos: list[StreamInfo] = []
    config = {"STREAMPLUS_BREAKER_FAILURES": 2, "STREAMPLUS_BREAKER_COOLDOWN": 60}
    async with (
        FakeUpstream(error_status=502) as primary,
        FakeUpstream(answer=answering(BACKUP_TEXT)) as backup,
    ):
        upstreams = [("primary", primary.url), ("backup", backup.url)]
        async with proxy(upstreams, infos, **config) as url:
            for _ in range(3):
                text, _ = await chat(url)
                assert text == BACKUP_TEXT
            assert len(primary.requests) == 2  # the third request skipped it
            assert outcomes(infos[2])[0] == ("primary", "circuit_open")
            backup.model = backup.model.override({"error_status": 500})
            async with httpx.AsyncClient(timeout=WAIT) as client:
                for _ in range(2):  # the backup fails twice: its breaker opens too
                    answer = await client.post(url + "/v1/chat/completions", json={"a": 1})
                    assert answer.status_code == 502
                answer = await client.post(url + "/v1/chat/completions", json={"a": 1})
    assert len(backup.requests) == 5 and len(primary.requests) == 2
    assert answer.status_code == 503
    assert answer.json()["error"]["type"] == "upstreams_unavailable"
    assert 1 <= int(answer.headers["retry-after"]) <= 60


@pytest.mark.parametrize(
    "knobs",
    [
        {"fail_after": 1},  # reset after the role delta
        {"tokens": 0, "finish_reason": False, "done": False},  # the role delta, then the end
        {"error_event_after": 1},  # the role delta, then its in-band error
        {"stall": 10},  # no first event within the first-event timeout
    ],
    ids=["reset", "truncated", "error_event", "stall"],
)
async def test_a_primary_that_fails_before_its_first_content_is_replaced(
    knobs: dict[str, Any],
) -> None:
    """The primary's role delta is held until it streams content: the client gets one role
    delta, the backup's, and the backup's answer alone."""
    infos: list[StreamInfo] = []
    async with (
        FakeUpstream(
            answer=None if "tokens" in knobs else answering(PRIMARY_TEXT), **knobs
        ) as primary,
        FakeUpstream(answer=answering(BACKUP_TEXT)) as backup,
    ):
        upstreams = [("primary", primary.url), ("backup", backup.url)]
        async with proxy(upstreams, infos, STREAMPLUS_FIRST_EVENT_TIMEOUT=0.3) as url:
            text, chunks = await chat(url)
    assert text == BACKUP_TEXT
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    assert len({c.id for c in chunks}) == 1
    assert [a.upstream for a in infos[0].attempts] == ["primary", "backup"]
    assert infos[0].attempts[0].events == 0  # nothing of the primary reached the client


async def test_after_the_first_content_a_failure_is_the_error_frame_without_continue() -> None:
    """``failover="fallback"`` (the default): once the primary streamed, its failure ends the
    stream with the error frame, and the backup is not asked."""
    infos: list[StreamInfo] = []
    async with (
        FakeUpstream(answer=answering(PRIMARY_TEXT), fail_after=3) as primary,
        FakeUpstream(answer=answering(BACKUP_TEXT)) as backup,
    ):
        async with proxy([("primary", primary.url), ("backup", backup.url)], infos) as url:
            with pytest.raises(openai.APIError):
                await chat(url)
    assert backup.requests == []
    assert outcomes(infos[0]) == [("primary", "upstream_disconnected")]
    assert infos[0].attempts[0].events == 3
    assert infos[0].outcome == "upstream_error"


async def test_the_upstreams_argument_picks_and_orders_them() -> None:
    async with (
        FakeUpstream(answer=answering(PRIMARY_TEXT)) as primary,
        FakeUpstream(answer=answering(BACKUP_TEXT)) as backup,
    ):
        app: Sanic[Any, Any] = Sanic(app_name("failover_pick"))
        app.config.STREAMPLUS_UPSTREAMS = f"primary={primary.url},backup={backup.url}"
        app.extend(extensions=[StreamPlus])

        @app.post("/v1/chat/completions")
        @stream_post(dialect="openai")
        async def reversed_order(request: Request) -> Any:
            names = ["backup", "primary"]
            return upstream_events(request, "/chat/completions", json=request.json, upstreams=names)

        async with serve_app(app) as url:
            text, _ = await chat(url)
    assert text == BACKUP_TEXT
    assert primary.requests == []


async def test_each_upstream_gets_its_own_key_from_config_never_the_clients() -> None:
    async with (
        FakeUpstream(error_status=503) as primary,
        FakeUpstream(answer=answering(BACKUP_TEXT)) as backup,
    ):
        app: Sanic[Any, Any] = Sanic(app_name("failover_keys"))
        app.config.STREAMPLUS_UPSTREAMS = f"primary={primary.url}, backup={backup.url}"
        app.config.STREAMPLUS_UPSTREAM_PRIMARY_API_KEY = "sk-primary"
        app.config.STREAMPLUS_UPSTREAM_BACKUP_API_KEY = "sk-backup"
        app.extend(extensions=[StreamPlus])

        @app.post("/v1/chat/completions")
        @stream_post(dialect="openai")
        async def relay(request: Request) -> Any:
            return upstream_events(request, "/chat/completions", json=request.json)

        async with serve_app(app) as url:
            await chat(url)
    assert primary.requests[0].headers["authorization"] == "Bearer sk-primary"
    assert backup.requests[0].headers["authorization"] == "Bearer sk-backup"


async def test_an_upstream_that_echoes_its_key_gives_it_to_no_one() -> None:
    echo = {"error": {"message": "key sk-backup-secret is not valid", "type": "auth"}}
    async with (
        FakeUpstream(error_status=503) as primary,
        FakeUpstream(error_status=401, error_body=echo) as backup,
    ):
        app: Sanic[Any, Any] = Sanic(app_name("failover_echo"))
        app.config.STREAMPLUS_UPSTREAMS = [
            {"name": "primary", "url": primary.url, "api_key": "sk-primary-secret"},
            {"name": "backup", "url": backup.url, "api_key": "sk-backup-secret"},
        ]
        app.extend(extensions=[StreamPlus])

        @app.post("/v1/chat/completions")
        @stream_post(dialect="openai")
        async def relay(request: Request) -> Any:
            return upstream_events(request, "/chat/completions", json=request.json)

        async with serve_app(app) as url, httpx.AsyncClient(timeout=WAIT) as client:
            answer = await client.post(url + "/v1/chat/completions", json={"stream": True})
    assert answer.status_code == 401
    assert answer.json()["error"]["message"] == "key *** is not valid"


async def test_failovers_are_counted_by_route_and_reason() -> None:
    async with FakeUpstream(answer=answering(BACKUP_TEXT)) as backup:
        upstreams = [("primary", dead_url()), ("backup", backup.url)]
        async with proxy(upstreams, STREAMPLUS_METRICS=True) as url:
            await chat(url)
            async with httpx.AsyncClient(timeout=WAIT) as client:
                metrics = (await client.get(url + "/metrics")).text
    counted = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith("streamplus_failovers_total{")
    }
    route = next(name for name in counted if 'reason="upstream_unreachable"' in name)
    assert 'route="' in route and "chat" in route
    assert counted[route] >= 1  # the registry is the process', shared with other tests


def test_several_upstreams_in_config_are_checked_at_startup() -> None:
    from sanic_streamplus.config import Settings

    with pytest.raises(ValueError, match=r"upstream 'b'.*http://"):
        Settings.from_config({"STREAMPLUS_UPSTREAMS": "a=http://x/v1,b=localhost:1"})
    with pytest.raises(ValueError, match="'a' twice"):
        Settings.from_config({"STREAMPLUS_UPSTREAMS": "a=http://x,a=http://y"})
    with pytest.raises(ValueError, match="STREAMPLUS_UPSTREAMS: unknown key") as raised:
        Settings.from_config(
            {"STREAMPLUS_UPSTREAMS": [{"name": "a", "url": "http://x", "key": "sk-s"}]}
        )
    assert "sk-s" not in str(raised.value)
    settings = Settings.from_config(
        {"STREAMPLUS_UPSTREAMS": "a=http://x/v1", "STREAMPLUS_UPSTREAM_A_API_KEY": "sk-a"}
    )
    assert settings.upstreams[0].api_key == "sk-a" and "sk-a" not in repr(settings)


def test_the_upstreams_and_their_keys_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As Sanic reads ``SANIC_*`` variables into ``app.config``."""
    from sanic_streamplus.config import Settings

    monkeypatch.setenv(
        "SANIC_STREAMPLUS_UPSTREAMS", "main=https://a.example/v1,spare-1=http://b:8/v1"
    )
    monkeypatch.setenv("SANIC_STREAMPLUS_UPSTREAM_SPARE_1_API_KEY", "sk-spare")
    monkeypatch.setenv("SANIC_STREAMPLUS_FAILOVER", "continue")
    app: Sanic[Any, Any] = Sanic(app_name("failover_env"))
    settings = Settings.from_config(app.config)
    assert [(u.name, u.url, u.api_key) for u in settings.upstreams] == [
        ("main", "https://a.example/v1", None),
        ("spare-1", "http://b:8/v1", "sk-spare"),
    ]
    assert settings.failover == "continue" and settings.max_continuations == 1


# ------------------------------------------------------- Anthropic and the Responses API

PREAMBLE = {"anthropic": 2, "openai-responses": 4}  # events before the first text delta


def cutting_app(events: int, extra: ServerSentEvent | None = None) -> Sanic[Any, Any]:
    """An upstream that sends the first ``events`` events of each dialect's script (the
    scripted upstream's, of ``test_dialects``), then ``extra`` if given, then resets the
    connection."""
    app: Sanic[Any, Any] = Sanic(app_name("cutting"))
    dialects = {path: dialect for dialect, path in ROUTES.items()}

    @app.post("/v1/<name:path>")
    async def cut(request: Request, name: str) -> None:
        script = SCRIPTS[dialects["/v1/" + name]](fake_tokens(TOKENS), True)
        response = await request.respond(content_type="text/event-stream")
        for event in [*script[:events], *([extra] if extra else [])]:
            await response.send(encode(event))
        request.transport.abort()

    return app


def refusing_app(status: int) -> Sanic[Any, Any]:
    """An upstream that refuses every request with ``status`` (``Retry-After: 5`` on a 429),
    an Anthropic-shaped JSON error."""
    app: Sanic[Any, Any] = Sanic(app_name(f"refusing{status}"))

    @app.post("/v1/<name:path>")
    async def refuse(request: Request, name: str) -> Any:
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
        headers = {"Retry-After": "5"} if status == 429 else {}
        return json_response(error, status=status, headers=headers)

    return app


BACKUP_IDS = {"chatcmpl-fake": "chatcmpl-backup", "msg_fake": "msg_backup", "resp_fake": "resp_b"}


def backup_app(bodies: list[Any]) -> Sanic[Any, Any]:
    """The scripted upstream, with ids of its own (``BACKUP_IDS``), a model and a ``created``
    of its own; each request's JSON body goes to ``bodies``."""
    app: Sanic[Any, Any] = Sanic(app_name("backup"))
    dialects = {path: dialect for dialect, path in ROUTES.items()}

    @app.post("/v1/<name:path>")
    async def answer(request: Request, name: str) -> None:
        bodies.append(request.json)
        response = await request.respond(content_type="text/event-stream")
        for event in SCRIPTS[dialects["/v1/" + name]](fake_tokens(TOKENS), True):
            data = event.data.replace('"created": 0', '"created": 99')
            data = data.replace('"model": "fake"', '"model": "backup-model"')
            for ours, theirs in BACKUP_IDS.items():
                data = data.replace(ours, theirs)
            await response.send(encode(ServerSentEvent(data, event=event.event)))
        await response.eof()

    return app


@contextlib.asynccontextmanager
async def dialect_proxy(
    primary: str, backup: str, resumable: bool = False, **config: Any
) -> AsyncIterator[str]:
    """A proxy with the ``openai``, ``anthropic`` and ``openai-responses`` routes of
    ``test_dialects`` (``resumable`` or not), relaying to ``primary`` then ``backup``."""
    app: Sanic[Any, Any] = Sanic(app_name("failover_dialects"))
    app.config.STREAMPLUS_UPSTREAMS = f"primary={primary},backup={backup}"
    app.config.STREAMPLUS_HEARTBEAT = 0
    for key, value in config.items():
        app.config[key] = value
    app.extend(extensions=[StreamPlus])
    for dialect in ("openai", *PREAMBLE):
        path = ROUTES[dialect]

        async def relay(request: Request, path: str = path) -> Any:
            return upstream_events(request, path.removeprefix("/v1"), json=request.json)

        name = f"relay_{dialect}".replace("-", "_")
        app.post(path, name=name)(stream_post(dialect=dialect, resumable=resumable)(relay))
    async with serve_app(app) as url:
        yield url


@pytest.mark.parametrize("primary", ["dead", "cut_in_preamble", "503", "429"])
async def test_anthropic_sdk_gets_one_message_from_the_backup(primary: str) -> None:
    ask: Any = {"model": "claude-fake", "max_tokens": 100, "messages": MESSAGES}
    first_app = refusing_app(int(primary)) if primary.isdigit() else cutting_app(2)
    async with serve_app(script_app()) as backup, serve_app(first_app) as cutting:
        first = dead_url() if primary == "dead" else cutting + "/v1"
        async with dialect_proxy(first, backup + "/v1") as url:
            sdk = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0, timeout=WAIT)
            async with sdk, sdk.messages.stream(**ask) as stream:
                kinds = [event.type async for event in stream]
                message = await stream.get_final_message()
    assert kinds.count("message_start") == 1 and kinds[-1] == "message_stop"
    assert message.content[0].type == "text"
    assert message.content[0].text == "".join(fake_tokens(TOKENS))


@pytest.mark.parametrize("primary", ["dead", "cut_in_preamble", "503", "429"])
async def test_openai_sdk_gets_one_response_from_the_backup(primary: str) -> None:
    first_app = refusing_app(int(primary)) if primary.isdigit() else cutting_app(4)
    async with serve_app(script_app()) as backup, serve_app(first_app) as cutting:
        first = dead_url() if primary == "dead" else cutting + "/v1"
        async with dialect_proxy(first, backup + "/v1") as url, openai_sdk(url) as sdk:
            async with sdk.responses.stream(model="gpt-fake", input="hi") as stream:
                events = [event async for event in stream]
                final = await stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds.count("response.created") == 1 and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "".join(fake_tokens(TOKENS))


# ------------------------------------------------------------ continuation after the commit


CUT = 3  # tokens the primary streams before it is cut
SO_FAR = "".join(fake_tokens(TOKENS)[:CUT])
WHOLE = "".join(fake_tokens(TOKENS))  # what the backup streams, as a continuation


def continuing(**config: Any) -> dict[str, Any]:
    return {"STREAMPLUS_FAILOVER": "continue", **config}


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("resumable", [False, True], ids=["live", "resumable"])
async def test_a_chat_stream_cut_mid_answer_is_continued_by_the_backup_with_no_seam(
    resumable: bool,
) -> None:
    """Resumable: the continuation happens in the producer, so the stored stream (what every
    reader replays) is the one answer too."""
    bodies: list[Any] = []
    async with serve_app(cutting_app(1 + CUT)) as primary, serve_app(backup_app(bodies)) as backup:
        proxied = dialect_proxy(primary + "/v1", backup + "/v1", resumable, **continuing())
        async with proxied as url:
            text, chunks = await chat(url)  # the SDK raises nothing
            if resumable:  # a second reader, from the store: the same answer
                async with openai_sdk(url) as sdk:
                    raw = await sdk.chat.completions.with_raw_response.create(
                        model="fake-model", messages=MESSAGES, stream=True
                    )
                    stream_id = raw.headers["x-stream-id"]
                async with httpx.AsyncClient(timeout=WAIT) as client:
                    replay = (await client.get(f"{url}/streams/{stream_id}")).text
                assert replay.count('"role"') == 1 and replay.endswith("data: [DONE]\n\n")
    assert text == SO_FAR + WHOLE
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    assert {c.id for c in chunks} == {"chatcmpl-fake"}
    assert {(c.model, c.created) for c in chunks} == {("fake", 0)}
    assert chunks[-1].choices[0].finish_reason == "stop"
    messages = bodies[0]["messages"]
    assert messages == [
        *MESSAGES,
        {"role": "assistant", "content": SO_FAR},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]


async def test_the_continue_instruction_is_the_configs() -> None:
    bodies: list[Any] = []
    async with serve_app(cutting_app(1 + CUT)) as primary, serve_app(backup_app(bodies)) as backup:
        config = continuing(STREAMPLUS_CONTINUE_INSTRUCTION="")  # none: a native prefill
        async with dialect_proxy(primary + "/v1", backup + "/v1", **config) as url:
            text, _ = await chat(url)
    assert text == SO_FAR + WHOLE
    assert bodies[0]["messages"] == [*MESSAGES, {"role": "assistant", "content": SO_FAR}]


@pytest.mark.parametrize(
    "knobs",
    [
        {"fail_after": 1 + CUT},
        {"tokens": CUT, "finish_reason": False, "done": False},
        {"error_event_after": 1 + CUT},
        {"stall_after": 1 + CUT, "stall": 10},
    ],
    ids=["reset", "truncated", "error_event", "idle_timeout"],
)
async def test_a_continuation_follows_a_reset_a_truncation_or_an_in_band_error(
    knobs: dict[str, Any],
) -> None:
    """Through ``@stream_post(failover="continue")`` (the route's option, the config's default
    being ``fallback``); the attempts and the failover metric say what happened."""
    infos: list[StreamInfo] = []
    bodies: list[Any] = []
    async with (
        FakeUpstream(**{"tokens": TOKENS, "delay": 0, **knobs}) as primary,
        serve_app(backup_app(bodies)) as backup,
    ):
        app: Sanic[Any, Any] = Sanic(app_name("failover_route"))
        app.config.STREAMPLUS_UPSTREAMS = f"primary={primary.url},backup={backup}/v1"
        app.config.STREAMPLUS_IDLE_TIMEOUT = 0.3
        app.extend(extensions=[StreamPlus])

        @app.post("/v1/chat/completions")
        @stream_post(dialect="openai", failover="continue", on_finish=infos.append)
        async def relay(request: Request) -> Any:
            return upstream_events(request, "/chat/completions", json=request.json)

        async with serve_app(app) as url:
            text, chunks = await chat(url)
    assert text == SO_FAR + WHOLE
    assert {c.id for c in chunks} == {"chatcmpl-fake"}
    reason = {
        "fail_after": "upstream_disconnected",
        "tokens": "upstream_truncated",
        "stall_after": "idle_timeout",
    }
    first = reason.get(next(iter(knobs)), "upstream_error")
    assert outcomes(infos[0]) == [("primary", first), ("backup", "completed")]
    assert [a.continuation for a in infos[0].attempts] == [False, True]
    assert infos[0].attempts[0].events == 1 + CUT  # the role delta and the tokens
    assert infos[0].outcome == "completed"


@pytest.mark.parametrize("budget", [None, 2])
async def test_the_budget_spent_is_the_error_frame(budget: int | None) -> None:
    """``max_continuations`` 1 (the default): the backup is cut too, and the third upstream is
    not asked; 2 (the route's option): the third continues the backup's continuation."""
    infos: list[StreamInfo] = []
    async with (
        serve_app(cutting_app(1 + CUT)) as primary,
        serve_app(cutting_app(1 + CUT)) as backup,
        FakeUpstream(tokens=TOKENS, delay=0) as third,
    ):
        app: Sanic[Any, Any] = Sanic(app_name("failover_budget"))
        app.config.STREAMPLUS_UPSTREAMS = (
            f"primary={primary}/v1,backup={backup}/v1,third={third.url}"
        )
        app.config.STREAMPLUS_FAILOVER = "continue"
        app.extend(extensions=[StreamPlus])

        @app.post("/v1/chat/completions")
        @stream_post(dialect="openai", max_continuations=budget, on_finish=infos.append)
        async def relay(request: Request) -> Any:
            return upstream_events(request, "/chat/completions", json=request.json)

        async with serve_app(app) as url, openai_sdk(url) as sdk:
            stream = await sdk.chat.completions.create(
                model="fake-model", messages=MESSAGES, stream=True
            )
            text = ""
            with (
                pytest.raises(openai.APIError, match="broke mid-stream")
                if not budget
                else contextlib.nullcontext()
            ):
                async for chunk in stream:
                    text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    if budget is None:
        assert text == SO_FAR + SO_FAR  # the primary's, then the backup's continuation
        assert third.requests == [] and infos[0].outcome == "upstream_error"
    else:
        assert text == SO_FAR + SO_FAR + WHOLE and infos[0].outcome == "completed"
        assert len(third.requests) == 1
        assert [a.continuation for a in infos[0].attempts] == [False, True, True]


async def test_a_tool_call_in_flight_is_not_continued() -> None:
    tool = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}
    choice = {"index": 0, "delta": {"tool_calls": [tool]}, "finish_reason": None}
    chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0}
    call = ServerSentEvent(json.dumps({**chunk, "model": "fake", "choices": [choice]}))
    bodies: list[Any] = []
    async with serve_app(cutting_app(1, call)) as primary, serve_app(backup_app(bodies)) as backup:
        async with dialect_proxy(primary + "/v1", backup + "/v1", **continuing()) as url:
            with pytest.raises(openai.APIError, match="broke mid-stream"):
                await chat(url)
    assert bodies == []


async def test_an_anthropic_stream_cut_mid_answer_is_continued() -> None:
    ask: Any = {"model": "claude-fake", "max_tokens": 100, "messages": MESSAGES}
    bodies: list[Any] = []
    async with serve_app(cutting_app(2 + CUT)) as primary, serve_app(backup_app(bodies)) as backup:
        async with dialect_proxy(primary + "/v1", backup + "/v1", **continuing()) as url:
            sdk = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0, timeout=WAIT)
            async with sdk, sdk.messages.stream(**ask) as stream:
                kinds = [event.type async for event in stream]
                message = await stream.get_final_message()
    assert kinds.count("message_start") == 1 and kinds[-1] == "message_stop"
    assert message.id == "msg_fake" and len(message.content) == 1
    assert message.content[0].type == "text" and message.content[0].text == SO_FAR + WHOLE
    assert bodies[0]["messages"][-1]["role"] == "assistant"  # the prefill, continued natively


async def test_a_responses_stream_cut_mid_answer_is_continued() -> None:
    bodies: list[Any] = []
    async with serve_app(cutting_app(4 + CUT)) as primary, serve_app(backup_app(bodies)) as backup:
        async with dialect_proxy(primary + "/v1", backup + "/v1", **continuing()) as url:
            async with (
                openai_sdk(url) as sdk,
                sdk.responses.stream(model="gpt-fake", input="hi") as stream,
            ):
                events = [event async for event in stream]
                final = await stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds.count("response.created") == 1 and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.id == "resp_fake" and final.output_text == SO_FAR + WHOLE
    assert len(bodies) == 1


async def test_the_example_with_two_upstreams_continues_an_answer_cut_midway() -> None:
    """The black-box demo: ``chat_proxy.py --upstream A --upstream B``; A dies after three
    tokens; the page's ``/chat`` route shows one answer, then ``done``."""
    async with (
        FakeUpstream(tokens=TOKENS, delay=0, fail_after=1 + CUT) as primary,
        FakeUpstream(tokens=TOKENS, delay=0) as backup,
        run_example("--upstream", primary.url, "--upstream", backup.url) as (_, url),
    ):
        body = {"messages": MESSAGES}
        async with httpx.AsyncClient(timeout=WAIT) as client:
            answer = await client.post(url + "/chat", json=body)
    events = [block for block in answer.text.split("\n\n") if block.strip()]
    tokens = [json.loads(e.split("data: ", 1)[1])["text"] for e in events if "event: token" in e]
    assert "".join(tokens) == SO_FAR + WHOLE
    assert events[-1].startswith("event: done") and "event: error" not in answer.text
    prefill = backup.requests[0].json["messages"]
    assert {"role": "assistant", "content": SO_FAR} in prefill


# ------------------------------------------------------------------- the breaker, sans-IO


def test_the_breaker_counts_failures_in_its_window_and_reopens_on_a_failed_trial() -> None:
    breaker = Breaker(failures=3, window=10.0, cooldown=30.0)
    for at in (0.0, 5.0, 11.0):  # the first is out of the window by the third
        breaker.failed(at)
    assert not breaker.is_open(11.0)
    breaker.failed(12.0)  # three within 10 s: open for 30 s
    assert breaker.is_open(41.9) and breaker.remaining(12.0) == 30.0
    assert not breaker.is_open(42.0)  # half-open: one trial
    breaker.failed(43.0)  # the trial failed: open again at once
    assert breaker.is_open(72.9) and not breaker.is_open(73.0)
    breaker.succeeded()
    breaker.failed(80.0)
    assert not breaker.is_open(80.0)  # closed again: counting from zero


def test_a_half_open_breaker_admits_one_trial_at_a_time() -> None:
    breaker = Breaker(failures=1, window=None, cooldown=10.0)
    assert breaker.admits(0.0) and breaker.admits(0.0)  # closed: every request
    breaker.failed(1.0)
    assert not breaker.admits(10.9)
    assert breaker.admits(11.0)  # the trial
    assert not breaker.admits(11.0) and not breaker.admits(12.0)  # the others skip it meanwhile
    breaker.released()  # the trial was cancelled: no verdict
    assert breaker.admits(12.0) and not breaker.admits(12.0)
    breaker.failed(13.0)  # the trial failed: open again for the cooldown
    assert not breaker.admits(22.9) and breaker.admits(23.0)
    breaker.succeeded()  # the trial streamed: closed, every request again
    assert breaker.admits(23.0) and breaker.admits(23.0)


async def test_after_the_cooldown_one_request_tries_the_primary_the_others_fail_over() -> None:
    infos: list[StreamInfo] = []
    config = {"STREAMPLUS_BREAKER_FAILURES": 1, "STREAMPLUS_BREAKER_COOLDOWN": 0.5}
    async with (
        FakeUpstream(error_status=502) as primary,
        FakeUpstream(answer=answering(BACKUP_TEXT)) as backup,
    ):
        upstreams = [("primary", primary.url), ("backup", backup.url)]
        async with proxy(upstreams, infos, **config) as url:
            assert (await chat(url))[0] == BACKUP_TEXT  # the primary failed: its breaker opens
            await asyncio.sleep(0.6)  # the cooldown is over: half-open
            # the primary is back, slow to its first event: the trial is still running when
            # the other four requests come
            primary.model = primary.model.override({"error_status": None, "stall": 0.5})
            texts = await asyncio.gather(*(chat(url) for _ in range(5)))
    assert [text for text, _ in texts].count(BACKUP_TEXT) == 4
    assert len(primary.requests) == 2  # the first failure, then the one trial
    assert sorted(outcomes(info)[0][1] for info in infos[1:]) == ["circuit_open"] * 4 + [
        "completed"
    ]


def test_a_retry_after_opens_the_breaker_at_once_for_that_long_and_no_longer_than_an_hour() -> None:
    breaker = Breaker(failures=5, window=30.0, cooldown=None)  # no cooldown: only Retry-After
    for at in range(10):
        breaker.failed(float(at))
    assert not breaker.is_open(10.0)
    breaker.failed(10.0, retry_after=7.0)
    assert breaker.is_open(16.9) and not breaker.is_open(17.0)
    breaker.failed(20.0, retry_after=1e9)
    assert breaker.remaining(20.0) == 3600.0
