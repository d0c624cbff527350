"""Shared fixtures: a real fake upstream, the example proxy on a real socket, an httpx client."""

from __future__ import annotations

import itertools
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sanic import Sanic

from sanic_streamplus.testing import FakeUpstream, serve_app

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

Sanic.test_mode = True
_names = itertools.count()


def app_name(prefix: str = "app") -> str:
    """A fresh Sanic app name (Sanic keeps a registry of names)."""
    return f"{prefix}_{next(_names)}"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
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
