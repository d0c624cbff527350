"""The example chat proxy end to end: real fake upstream, real Sanic server, real httpx client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from conftest import chat_body, completions_body

from sanic_streamplus import ServerSentEvent, SSEDecoder
from sanic_streamplus.testing import FakeUpstream, fake_tokens


async def read_stream(
    client: httpx.AsyncClient, url: str, body: object
) -> tuple[httpx.Response, bytes, list[ServerSentEvent]]:
    """POST and read the whole body; the body must end with a proper chunked terminator
    (httpx raises RemoteProtocolError otherwise)."""
    raw = bytearray()
    async with client.stream("POST", url, json=body) as response:
        async for chunk in response.aiter_raw():
            raw += chunk
    decoder = SSEDecoder()
    return response, bytes(raw), decoder.feed(bytes(raw))


async def test_pass_through_keeps_every_event_in_order_and_ends_after_done(
    proxy: str, upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    response, raw, events = await read_stream(
        client, proxy + "/v1/chat/completions", completions_body()
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache, no-transform"
    assert response.headers["x-accel-buffering"] == "no"
    assert events[-1].data == "[DONE]"
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(e.data) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "".join(fake_tokens(12))
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(events) == 12 + 3  # role chunk, 12 tokens, stop chunk, [DONE]
    assert [e.data for e in events].count("[DONE]") == 1


async def test_api_key_goes_upstream_and_client_authorization_does_not(
    proxy: str, upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    async with client.stream(
        "POST",
        proxy + "/v1/chat/completions",
        json=completions_body(),
        headers={"Authorization": "Bearer client-secret", "Cookie": "session=1"},
    ) as response:
        await response.aread()
    seen = upstream.requests[-1].headers
    assert seen["authorization"] == "Bearer sk-test"
    assert "cookie" not in seen


async def test_chat_route_streams_token_events_then_done(
    proxy: str, client: httpx.AsyncClient
) -> None:
    response, _, events = await read_stream(client, proxy + "/chat", chat_body())
    assert response.status_code == 200
    tokens = [e for e in events if e.event == "token"]
    assert "".join(json.loads(e.data)["text"] for e in tokens) == "".join(fake_tokens(12))
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["tokens"] == 12


async def test_openai_sdk_streams_the_exact_upstream_text(proxy: str) -> None:
    sdk = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="anything", max_retries=0)
    stream = await sdk.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = ""
    async for chunk in stream:
        text += chunk.choices[0].delta.content or ""
    await sdk.close()
    assert text == "".join(fake_tokens(12))


async def test_sync_openai_sdk_streams_the_exact_upstream_text(proxy: str) -> None:
    def sync_chat() -> str:
        with openai.OpenAI(base_url=proxy + "/v1", api_key="anything", max_retries=0) as sdk:
            stream = sdk.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            return "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    assert await asyncio.to_thread(sync_chat) == "".join(fake_tokens(12))


async def test_openai_sdk_sees_a_mid_stream_failure_as_an_error(proxy: str) -> None:
    sdk = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="anything", max_retries=0)
    stream = await sdk.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"fake": {"fail_after": 4}},
    )
    text = ""
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
    await sdk.close()
    assert text == "".join(fake_tokens(3))
    assert "upstream connection broke" in str(caught.value)


@pytest.mark.parametrize("dialect_route", ["/chat", "/v1/chat/completions"])
async def test_upstream_reset_mid_stream_becomes_an_error_frame_and_a_clean_end(
    proxy: str, client: httpx.AsyncClient, dialect_route: str
) -> None:
    body = chat_body(fail_after=5) if dialect_route == "/chat" else completions_body(fail_after=5)
    response, raw, events = await read_stream(client, proxy + dialect_route, body)
    assert response.status_code == 200
    if dialect_route == "/chat":
        assert [e.event for e in events] == ["token"] * 4 + ["error"]
        error = json.loads(events[-1].data)["error"]
        assert error["type"] == "upstream_disconnected"
        assert error["upstream_status"] == 200
    else:
        assert events[-1].data == "[DONE]"
        error = json.loads(events[-2].data)["error"]
        assert error["type"] == "upstream_disconnected"
        assert set(error) == {"message", "type", "code"}
        assert len(events) == 5 + 2
    assert b"Traceback" not in raw


@pytest.mark.parametrize(
    ("fake", "status", "error_type", "upstream_status"),
    [
        ({"error_status": 500}, 502, "upstream_status", 500),
        ({"error_status": 401}, 401, "upstream_status", 401),
        ({"error_status": 403}, 403, "upstream_status", 403),
        ({"error_status": 503}, 502, "upstream_status", 503),
        ({"error_status": 429, "retry_after": "7"}, 429, "rate_limited", 429),
        ({"content_type": "text/html"}, 502, "upstream_bad_response", 200),
    ],
)
async def test_upstream_failure_before_the_first_event_is_a_real_status(
    proxy: str,
    client: httpx.AsyncClient,
    fake: dict[str, object],
    status: int,
    error_type: str,
    upstream_status: int,
) -> None:
    response = await client.post(proxy + "/chat", json=chat_body(**fake))
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == error_type
    assert error["upstream_status"] == upstream_status
    assert "Traceback" not in response.text
    if status == 429:
        assert response.headers["retry-after"] == "7"


@pytest.mark.parametrize("content", [b"not json", b"", b"{\"messages\": "])
async def test_a_body_that_is_not_json_is_a_400(
    proxy: str, client: httpx.AsyncClient, upstream: FakeUpstream, content: bytes
) -> None:
    for route in ("/chat", "/v1/chat/completions"):
        response = await client.post(proxy + route, content=content)
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request"
    assert upstream.requests == []


async def test_a_handler_can_answer_400_for_bad_input(
    proxy: str, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    response = await client.post(proxy + "/chat", json={"messages": "nope"})
    assert response.status_code == 400
    assert "messages" in response.json()["error"]["message"]
    assert upstream.requests == []


async def test_the_chat_page_is_served(proxy: str, client: httpx.AsyncClient) -> None:
    response = await client.get(proxy + "/")
    assert response.status_code == 200
    assert '<script src="/static/chat.js"' in response.text
    script = await client.get(proxy + "/static/chat.js")
    assert script.status_code == 200
    assert '"/resumable/v1/chat/completions"' in script.text and "getReader" in script.text
