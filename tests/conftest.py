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

from sanic_streamplus import pytest_plugin
from sanic_streamplus.config import TRANSPORTS
from sanic_streamplus.testing import FakeUpstream, serve_app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

Sanic.test_mode = True
_names = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    """Our fixtures come from the package's pytest plugin: pytest loads it by itself (entry
    point ``streamplus``) where the package is installed with it; register it if not."""
    if not config.pluginmanager.has_plugin("streamplus"):
        config.pluginmanager.register(pytest_plugin, "streamplus")


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


@pytest.fixture(scope="session")
def redis_url(redis_server: str) -> str:
    """The plugin's session ``redis_server`` (its URL, ``redis://127.0.0.1:<port>/0``)."""
    return redis_server


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
