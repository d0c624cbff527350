"""Real clients against the example proxy: ``examples/chat_proxy.py`` runs as its own process,
pointed with ``--upstream`` at a :class:`FakeUpstream` in this process, and is read by the
official ``openai`` SDK (sync and async), httpx-sse and ``curl -N``."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from conftest import chat_body, run_example
from httpx_sse import SSEError, aconnect_sse

from sanic_streamplus import SSEDecoder
from sanic_streamplus.testing import ERROR_EVENT, FAKE_USAGE, FakeUpstream, fake_tokens

TOKENS = 12
WAIT = 20.0  # seconds: a loose bound on any one wait (loopback answers in milliseconds)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(tokens=TOKENS, delay=0.005) as upstream:
        yield upstream


@pytest.fixture
async def example(fake: FakeUpstream) -> AsyncIterator[str]:
    """The example proxy's base URL, as its own process, relaying ``fake``."""
    async with run_example("--upstream", fake.url, "--api-key", "sk-test") as (_, url):
        yield url


def sdk_chat_sync(base_url: str, fake: dict[str, Any]) -> tuple[str, Exception | None]:
    """Stream a chat completion with ``openai.OpenAI``: the text that arrived, and what
    ``create()`` or the iteration raised (None when it ended normally)."""
    text = ""
    with openai.OpenAI(base_url=base_url, api_key="client-key", max_retries=0, timeout=WAIT) as sdk:
        try:
            stream = sdk.chat.completions.create(
                model="fake",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                extra_body={"fake": fake},
            )
            for chunk in stream:
                text += chunk.choices[0].delta.content or ""
        except Exception as exc:
            return text, exc
    return text, None


async def sdk_chat_async(base_url: str, fake: dict[str, Any]) -> tuple[str, Exception | None]:
    """The same with ``openai.AsyncOpenAI``."""
    text = ""
    async with openai.AsyncOpenAI(
        base_url=base_url, api_key="client-key", max_retries=0, timeout=WAIT
    ) as sdk:
        try:
            stream = await sdk.chat.completions.create(
                model="fake",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                extra_body={"fake": fake},
            )
            async for chunk in stream:
                text += chunk.choices[0].delta.content or ""
        except Exception as exc:
            return text, exc
    return text, None


async def sdk_chat(sync: bool, base_url: str, **fake: Any) -> tuple[str, Exception | None]:
    if sync:  # in a thread: the fake upstream lives on this test's event loop
        return await asyncio.wait_for(asyncio.to_thread(sdk_chat_sync, base_url, fake), WAIT)
    return await asyncio.wait_for(sdk_chat_async(base_url, fake), WAIT)


@pytest.mark.parametrize("sync", [True, False], ids=["OpenAI", "AsyncOpenAI"])
async def test_openai_sdk_streams_the_exact_text(
    example: str, fake: FakeUpstream, sync: bool
) -> None:
    text, error = await sdk_chat(sync, example + "/v1")
    assert error is None
    assert text == "".join(fake_tokens(TOKENS))
    seen = fake.requests[-1]
    assert seen.completed
    assert seen.headers["authorization"] == "Bearer sk-test"  # the proxy's key, not the client's


@pytest.mark.parametrize("sync", [True, False], ids=["OpenAI", "AsyncOpenAI"])
async def test_openai_sdk_raises_api_error_on_a_mid_stream_upstream_failure(
    example: str, fake: FakeUpstream, sync: bool
) -> None:
    text, error = await sdk_chat(sync, example + "/v1", fail_after=4)
    assert isinstance(error, openai.APIError)
    assert "upstream connection broke" in str(error)
    assert text == "".join(fake_tokens(3))  # events 1-3 were tokens; the reset came before 4
    assert fake.requests[-1].reset


@pytest.mark.parametrize("sync", [True, False], ids=["OpenAI", "AsyncOpenAI"])
@pytest.mark.parametrize(
    ("fault", "kind", "status"),
    [
        ({"error_status": 500}, openai.InternalServerError, 502),
        ({"error_status": 429, "retry_after": "7"}, openai.RateLimitError, 429),
    ],
    ids=["upstream-500", "upstream-429"],
)
async def test_openai_sdk_raises_a_status_error_on_a_failure_before_the_stream(
    example: str, sync: bool, fault: dict[str, Any], kind: type[openai.APIStatusError], status: int
) -> None:
    text, error = await sdk_chat(sync, example + "/v1", **fault)
    assert isinstance(error, kind)
    assert error.status_code == status
    assert text == ""
    if status == 429:
        assert error.response.headers["retry-after"] == "7"


async def test_httpx_sse_reads_token_events_then_done(example: str) -> None:
    async with httpx.AsyncClient(timeout=WAIT) as client, aconnect_sse(
        client, "POST", example + "/chat", json=chat_body()
    ) as source:
        assert source.response.status_code == 200
        events = [event async for event in source.aiter_sse()]
    assert [e.event for e in events] == ["token"] * TOKENS + ["done"]
    text = "".join(json.loads(e.data)["text"] for e in events[:-1])
    assert text == "".join(fake_tokens(TOKENS))
    assert json.loads(events[-1].data)["tokens"] == TOKENS


async def test_httpx_sse_reads_an_error_event_on_a_mid_stream_failure(example: str) -> None:
    async with httpx.AsyncClient(timeout=WAIT) as client, aconnect_sse(
        client, "POST", example + "/chat", json=chat_body(fail_after=4)
    ) as source:
        assert source.response.status_code == 200
        events = [event async for event in source.aiter_sse()]
    assert [e.event for e in events] == ["token"] * 3 + ["error"]
    error = json.loads(events[-1].data)["error"]
    assert error["type"] == "upstream_disconnected"
    assert error["message"]


async def test_httpx_sse_sees_a_failure_before_the_stream_as_a_json_status(example: str) -> None:
    async with httpx.AsyncClient(timeout=WAIT) as client, aconnect_sse(
        client, "POST", example + "/chat", json=chat_body(error_status=500)
    ) as source:
        assert source.response.status_code == 502
        with pytest.raises(SSEError):  # not an event stream: httpx-sse refuses to parse it
            [event async for event in source.aiter_sse()]
        await source.response.aread()
        assert source.response.json()["error"]["upstream_status"] == 500


async def read_until(stream: asyncio.StreamReader, done: Any) -> bytes:
    """Read ``stream`` line by line until ``done(bytes_so_far)`` or EOF, bounded by WAIT."""
    seen = bytearray()

    async def reading() -> None:
        while not done(bytes(seen)):
            line = await stream.readline()
            if not line:
                return
            seen.extend(line)

    await asyncio.wait_for(reading(), WAIT)
    return bytes(seen)


async def test_curl_shows_the_first_event_before_the_stream_ends(
    example: str, fake: FakeUpstream
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("needs curl: apt-get install curl (.ci/run does)")
    body = json.dumps(chat_body(hold_before=3))  # the role chunk and two tokens, then hold
    process = await asyncio.create_subprocess_exec(
        curl, "-N", "-sS", "--max-time", str(WAIT),
        "-H", "Content-Type: application/json", "--data", body, example + "/chat",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        # the two tokens sent before the hold (the upstream holds as it writes the second)
        first = await read_until(process.stdout, lambda seen: seen.count(b"\n\n") >= 2)
        events = SSEDecoder().feed(first)
        assert [e.event for e in events] == ["token", "token"]
        assert [json.loads(e.data)["text"] for e in events] == fake_tokens(2)
        # the stream is still open at both ends: curl runs, the upstream holds
        request = fake.requests[-1]
        assert request.held and not request.completed and request.closed is None
        assert process.returncode is None
        assert b"event: done" not in first
        fake.release()
        rest = await read_until(process.stdout, lambda seen: False)  # to EOF
        assert await asyncio.wait_for(process.wait(), WAIT) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    errors = await process.stderr.read()
    assert errors == b""
    events = SSEDecoder().feed(first + rest)
    assert [e.event for e in events] == ["token"] * TOKENS + ["done"]
    text = "".join(json.loads(e.data)["text"] for e in events[:-1])
    assert text == "".join(fake_tokens(TOKENS))
    assert request.completed


@pytest.mark.parametrize(
    ("fault", "shown", "code"),
    [
        ({"fail_after": 3}, b'event: error\ndata: {"error":{"type":"upstream_disconnected"', 0),
        ({"error_status": 500}, b'{"error":{"type":"upstream_status"', 22),
    ],
    ids=["mid-stream", "before-the-stream"],
)
async def test_curl_shows_a_failure(
    example: str, fault: dict[str, Any], shown: bytes, code: int
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("needs curl: apt-get install curl (.ci/run does)")
    process = await asyncio.create_subprocess_exec(
        curl, "-N", "-sS", "--fail-with-body", "--max-time", str(WAIT),
        "-H", "Content-Type: application/json", "--data", json.dumps(chat_body(**fault)),
        example + "/chat",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(process.communicate(), WAIT)
    assert process.returncode == code
    assert shown in out


@pytest.mark.parametrize("sync", [True, False], ids=["OpenAI", "AsyncOpenAI"])
async def test_openai_sdk_raises_api_error_on_a_stream_cut_short(
    example: str, fake: FakeUpstream, sync: bool
) -> None:
    """The upstream ends its body cleanly after the tokens, with neither a finish_reason nor
    [DONE]: the SDK raises on the proxy's error frame instead of returning the partial text as
    a complete answer."""
    text, error = await sdk_chat(sync, example + "/v1", finish_reason=False, done=False)
    assert isinstance(error, openai.APIError), error
    assert "ended without its end event" in str(error)
    assert text == "".join(fake_tokens(TOKENS))  # all that came: cut short, told so
    assert fake.requests[-1].completed  # the upstream's body did end cleanly


@pytest.mark.parametrize("sync", [True, False], ids=["OpenAI", "AsyncOpenAI"])
async def test_openai_sdk_reads_a_finish_reason_without_done_as_complete(
    example: str, sync: bool
) -> None:
    text, error = await sdk_chat(sync, example + "/v1", done=False)
    assert error is None
    assert text == "".join(fake_tokens(TOKENS))


@pytest.mark.parametrize("sync", [True, False], ids=["OpenAI", "AsyncOpenAI"])
async def test_openai_sdk_raises_the_upstreams_own_in_band_error(
    example: str, sync: bool
) -> None:
    text, error = await sdk_chat(sync, example + "/v1", error_event_after=4)
    assert isinstance(error, openai.APIError), error
    assert str(error) == ERROR_EVENT["error"]["message"]
    assert error.body == ERROR_EVENT["error"]  # the upstream's own object, type and code
    assert text == "".join(fake_tokens(3))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/resumable/v1/chat/completions"])
async def test_an_in_band_error_passes_through_once_then_done(example: str, path: str) -> None:
    body = {
        "model": "fake",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "fake": {"error_event_after": 4, "hold_after_done": True},  # then it holds the body open
    }
    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.post(example + path, json=body)
    events = SSEDecoder().feed(response.content)
    assert response.status_code == 200
    assert [e.data for e in events[4:]] == [
        json.dumps(ERROR_EVENT, separators=(",", ":")),  # as the upstream wrote it
        "[DONE]",
    ]
    assert response.content.count(b'"error"') == 1  # no second frame of ours
    assert response.elapsed.total_seconds() < 5  # ended at the error, not held open


async def test_the_chat_route_ends_with_an_error_event_on_a_stream_cut_short(
    example: str,
) -> None:
    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.post(
            example + "/chat", json=chat_body(finish_reason=False, done=False)
        )
    events = SSEDecoder().feed(response.content)
    assert response.status_code == 200
    assert [e.event for e in events] == ["token"] * TOKENS + ["error"]  # never done
    error = json.loads(events[-1].data)["error"]
    assert error["type"] == "upstream_truncated"
    assert "ended without its end event" in error["message"]


async def test_the_chat_route_ends_with_an_error_event_on_the_upstreams_error_event(
    example: str,
) -> None:
    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.post(example + "/chat", json=chat_body(error_event_after=4))
    events = SSEDecoder().feed(response.content)
    assert [e.event for e in events] == ["token"] * 3 + ["error"]  # never done
    error = json.loads(events[-1].data)["error"]
    assert error["type"] == "upstream_error"
    assert error["message"] == ERROR_EVENT["error"]["message"]  # the upstream's words


async def test_the_chat_routes_done_carries_the_usage_it_asked_for(
    example: str, fake: FakeUpstream
) -> None:
    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.post(example + "/chat", json=chat_body())
    events = SSEDecoder().feed(response.content)
    assert events[-1].event == "done"
    usage = json.loads(events[-1].data)["usage"]
    assert usage == {**FAKE_USAGE, "completion_tokens": TOKENS, "total_tokens": 7 + TOKENS}
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}
