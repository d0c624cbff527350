"""An upstream that refuses the request before its stream starts: the client gets the upstream's
status (4xx kept, 429 with Retry-After, 5xx as 502) and message, in the route's dialect's error
shape, so that the openai and anthropic SDKs raise their own classes and do not retry a 4xx."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from conftest import app_name
from sanic import Request, Sanic

from sanic_streamplus import StreamPlus, stream_post, upstream_events
from sanic_streamplus.testing import FakeUpstream, serve_app

KEY = "sk-upstream-secret-123"
WAIT = 20.0  # seconds: a loose bound on one SDK call (loopback answers in milliseconds)
ROUTES = {
    "plain": "/plain",
    "openai": "/v1/chat/completions",
    "anthropic": "/v1/messages",
    "openai-responses": "/v1/responses",
}
RESUMABLE = "/resumable"  # the same routes, resumable, under this prefix


def openai_error(message: str, kind: str, code: str | None, param: str | None = None) -> Any:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def anthropic_error(kind: str, message: str) -> Any:
    return {"type": "error", "error": {"type": kind, "message": message}}


@contextlib.asynccontextmanager
async def refusing_proxy() -> AsyncIterator[tuple[str, FakeUpstream]]:
    """A fake upstream, and a proxy relaying it on one route per dialect (the body's ``fake``
    knobs say how the upstream refuses)."""
    async with FakeUpstream(tokens=3, delay=0.001) as upstream:
        app: Sanic[Any, Any] = Sanic(app_name("refusals"))
        app.config.STREAMPLUS_UPSTREAM_URL = upstream.url
        app.config.STREAMPLUS_UPSTREAM_API_KEY = KEY
        app.extend(extensions=[StreamPlus])

        async def relay(request: Request) -> Any:
            body = request.json
            return upstream_events(request, "/chat/completions", json={"fake": body.get("fake")})

        for dialect, path in ROUTES.items():
            app.post(path, name=f"relay_{dialect}")(stream_post(dialect=dialect)(relay))
            resumable = stream_post(dialect=dialect, resumable=True)(relay)
            app.post(RESUMABLE + path, name=f"resumable_{dialect}")(resumable)
        async with serve_app(app) as proxy:
            yield proxy, upstream


@pytest.fixture
async def refusing() -> AsyncIterator[tuple[str, FakeUpstream]]:
    async with refusing_proxy() as pair:
        yield pair


async def openai_call(
    base_url: str, fake: dict[str, Any], retries: int, api: str = "chat"
) -> Exception | None:
    """Stream one answer through the openai SDK (``api``: ``chat`` completions or
    ``responses``); the exception it raised, or None."""
    async with openai.AsyncOpenAI(
        base_url=base_url + "/v1", api_key="client-key", max_retries=retries, timeout=WAIT
    ) as sdk:
        try:
            if api == "responses":
                stream: Any = await sdk.responses.create(
                    model="fake", input="hi", stream=True, extra_body={"fake": fake}
                )
            else:
                stream = await sdk.chat.completions.create(
                    model="fake",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    extra_body={"fake": fake},
                )
            async for _ in stream:
                pass
        except Exception as exc:
            return exc
    return None


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (403, openai.PermissionDeniedError),
        (404, openai.NotFoundError),
        (422, openai.UnprocessableEntityError),
    ],
)
@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("prefix", ["", RESUMABLE], ids=["live", "resumable"])
async def test_openai_sdk_raises_its_own_class_for_an_upstream_4xx_and_does_not_retry(
    refusing: tuple[str, FakeUpstream],
    status: int,
    kind: type[openai.APIStatusError],
    api: str,
    prefix: str,
) -> None:
    proxy, upstream = refusing
    body = openai_error(
        "The model `gpt-9` does not exist", "invalid_request_error", "model_not_found", "model"
    )
    fake = {"error_status": status, "error_body": body}
    error = await openai_call(proxy + prefix, fake, retries=2, api=api)
    assert isinstance(error, kind), repr(error)
    assert error.status_code == status
    assert error.message.endswith("The model `gpt-9` does not exist")
    assert error.code == "model_not_found"
    assert error.type == "invalid_request_error"
    assert error.param == "model"
    assert len(upstream.requests) == 1  # the SDK's two retries were not spent on a 4xx


async def test_a_409_keeps_its_status(refusing: tuple[str, FakeUpstream]) -> None:
    proxy, _ = refusing  # the openai SDK retries a 409 (a lock): retries=0 reads it once
    body = openai_error("Conflict", "conflict_error", None)
    error = await openai_call(proxy, {"error_status": 409, "error_body": body}, retries=0)
    assert isinstance(error, openai.ConflictError), repr(error)
    assert error.status_code == 409


async def test_an_upstream_5xx_is_a_502_the_sdk_may_retry(
    refusing: tuple[str, FakeUpstream],
) -> None:
    proxy, _ = refusing
    body = openai_error("The server had an error", "server_error", None)
    error = await openai_call(proxy, {"error_status": 500, "error_body": body}, retries=0)
    assert isinstance(error, openai.InternalServerError), repr(error)
    assert error.status_code == 502
    assert "The server had an error" in error.message


@pytest.mark.parametrize("prefix", ["", RESUMABLE], ids=["live", "resumable"])
async def test_a_429_keeps_its_retry_after(refusing: tuple[str, FakeUpstream], prefix: str) -> None:
    proxy, _ = refusing
    body = openai_error("Rate limit reached", "requests", "rate_limit_exceeded")
    fake = {"error_status": 429, "retry_after": "7", "error_body": body}
    error = await openai_call(proxy + prefix, fake, retries=0)
    assert isinstance(error, openai.RateLimitError), repr(error)
    assert error.response.headers["retry-after"] == "7"
    assert error.code == "rate_limit_exceeded"


@pytest.mark.parametrize(
    ("status", "kind", "error_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
    ],
)
@pytest.mark.parametrize("prefix", ["", RESUMABLE], ids=["live", "resumable"])
async def test_anthropic_sdk_raises_its_own_class_for_an_upstream_4xx(
    refusing: tuple[str, FakeUpstream],
    status: int,
    kind: type[anthropic.APIStatusError],
    error_type: str,
    prefix: str,
) -> None:
    proxy, upstream = refusing
    body = anthropic_error(error_type, "model: claude-9 not found")
    async with anthropic.AsyncAnthropic(
        base_url=proxy + prefix, api_key="client-key", max_retries=2, timeout=WAIT
    ) as sdk:
        with pytest.raises(kind) as raised:
            async with sdk.messages.stream(
                model="claude-9",
                max_tokens=16,
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"fake": {"error_status": status, "error_body": body}},
            ) as stream:
                await stream.get_final_message()
    assert raised.value.status_code == status
    assert raised.value.body == {
        "type": "error",
        "error": {"type": error_type, "message": "model: claude-9 not found"},
    }
    assert len(upstream.requests) == 1


async def test_a_plain_route_keeps_the_status_and_names_the_upstream_status(
    refusing: tuple[str, FakeUpstream],
) -> None:
    proxy, _ = refusing
    fake = {"error_status": 401, "error_body": openai_error("Invalid key", "auth", "bad_key")}
    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.post(proxy + ROUTES["plain"], json={"fake": fake})
    assert response.status_code == 401
    assert response.json() == {
        "error": {"type": "upstream_status", "message": "Invalid key", "upstream_status": 401}
    }


@pytest.mark.parametrize(
    "error_body",
    [
        openai_error(f"Incorrect API key provided: {KEY}", "invalid_request_error", "bad_key"),
        f"<html>denied for {KEY}</html>",  # not JSON: nothing of it reaches the client
        {"error": {"message": ["not", "a", "string"], "type": 5}},
        openai_error("x" * 5000, "invalid_request_error", None),
    ],
    ids=["key-echoed", "not-json", "odd-types", "too-long"],
)
async def test_what_of_the_upstream_error_reaches_the_client_is_bounded_and_keyless(
    refusing: tuple[str, FakeUpstream], error_body: Any
) -> None:
    proxy, _ = refusing
    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.post(
            proxy + ROUTES["openai"], json={"fake": {"error_status": 401, "error_body": error_body}}
        )
    assert response.status_code == 401
    assert KEY not in response.text
    assert "<html>" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    assert len(error["message"]) <= 1000
    if isinstance(error_body, str) or "odd" in str(error_body):
        assert error["message"] == "upstream answered HTTP 401"
