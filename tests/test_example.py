"""The README's demo command: the example runs offline with its embedded fake model, its page
and ``/docs`` load nothing from another host, and the model list comes from the upstream."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import httpx
from chat_proxy import fake_answer
from conftest import EXAMPLES, chat_body, run_example

from sanic_streamplus import SSEDecoder
from sanic_streamplus.testing import FakeUpstream, fake_tokens, text_tokens


async def test_the_example_streams_offline_with_no_upstream_configured() -> None:
    async with run_example() as (_, url), httpx.AsyncClient(timeout=20) as client:
        response = await client.post(url + "/chat", json=chat_body(tokens=5, delay=0.01))
        page = await client.get(url + "/")
    assert response.status_code == 200
    events = SSEDecoder().feed(response.content)
    text = "".join(json.loads(e.data)["text"] for e in events if e.event == "token")
    assert text == "".join(fake_tokens(5))
    assert events[-1].event == "done"
    assert page.status_code == 200


async def test_help_lists_every_option() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "chat_proxy.py"), "--help", stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    for option in (
        "--host", "--port", "--upstream", "--api-key", "--heartbeat", "--first-event-timeout",
        "UPSTREAM_URL", "UPSTREAM_API_KEY",
    ):
        assert option in out.decode()


def same_origin_assets(page: str) -> list[str]:
    """The ``src`` of every script and the ``href`` of every stylesheet or icon of ``page``;
    asserts that each is a path on the same origin (no CDN, no other host)."""
    assets = re.findall(r'<script[^>]*\ssrc="([^"]+)"', page)
    assets += re.findall(r'<link[^>]*\shref="([^"]+)"', page)
    assert assets
    for asset in assets:
        assert asset.startswith("/") and not asset.startswith("//"), asset
    return assets


async def test_the_page_and_docs_load_everything_from_the_example_itself() -> None:
    async with run_example() as (_, url), httpx.AsyncClient(timeout=20) as client:
        for path in ("/", "/docs"):
            page = await client.get(url + path)
            assert page.status_code == 200
            assert '<meta name="viewport"' in page.text
            for asset in same_origin_assets(page.text):
                response = await client.get(url + asset)
                assert response.status_code == 200, asset
                assert response.content, asset
        swagger = "/static/vendor/swagger-ui/swagger-ui-bundle.js"
        assert swagger in (await client.get(url + "/docs")).text
        assert (await client.get(url + "/docs/openapi.json")).json()["paths"]
        icon = await client.get(url + "/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    for library in ("marked", "dompurify", "swagger-ui"):  # each vendored with its license
        assert (EXAMPLES / "static" / "vendor" / library / "LICENSE").stat().st_size > 500


async def test_the_model_list_is_the_upstreams() -> None:
    async with FakeUpstream() as fake, run_example("--upstream", fake.url) as (_, url):
        async with httpx.AsyncClient(timeout=20) as client:
            response = await client.get(url + "/v1/models")
        assert response.status_code == 200
        assert [m["id"] for m in response.json()["data"]] == ["fake-model"]
        assert fake.requests[-1].method == "GET" and fake.requests[-1].path == "/v1/models"
    # the upstream is gone (its port closed): a clear 502, not a 500 or a hang
    async with run_example("--upstream", fake.url) as (_, url):
        async with httpx.AsyncClient(timeout=20) as client:
            response = await client.get(url + "/v1/models")
    assert response.status_code == 502
    assert "out of reach" in response.json()["error"]["message"]


async def completion_text(client: httpx.AsyncClient, url: str, prompt: str) -> str:
    body = {"model": "fake-model", "stream": True,
            "messages": [{"role": "user", "content": prompt}]}
    response = await client.post(url + "/v1/chat/completions", json=body)
    assert response.status_code == 200
    events = SSEDecoder().feed(response.content)
    assert events[-1].data == "[DONE]"
    return "".join(
        choice["delta"].get("content") or ""
        for event in events[:-1]
        for choice in json.loads(event.data)["choices"]
    )


async def test_the_embedded_model_answers_the_prompt_readably_and_deterministically() -> None:
    async with run_example() as (_, url), httpx.AsyncClient(timeout=20) as client:
        plain = await completion_text(client, url, "What is a server-sent event?")
        again = await completion_text(client, url, "What is a server-sent event?")
        other = await completion_text(client, url, "Tell me about Redis")
        rich = await completion_text(client, url, "Give me a list and some code")
    assert plain == again == fake_answer({"messages": [
        {"role": "user", "content": "What is a server-sent event?"}
    ]})
    assert "“What is a server-sent event?”" in plain and "Redis" in other
    assert plain != other
    assert "```" not in plain and "\n- " not in plain
    assert "\n- first word: *Give*" in rich
    assert '```python\nprompt = "Give me a list and some code"\n' in rich
    assert "".join(text_tokens(rich)) == rich
