"""The README's demo command: the example runs offline with its embedded fake model, says where
its chat page is, its page and ``/docs`` load nothing from another host, the model list comes
from the upstream, and a bad option or a busy port is one clear line and exit status 1."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys

import httpx
import pytest
from chat_proxy import fake_answer
from conftest import EXAMPLES, chat_body, free_port, run_example

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


async def run_to_exit(*args: str) -> tuple[int, str]:
    """Run the example with ``args``, expecting it to exit; its status and its stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "chat_proxy.py"), *args,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, err.decode()


@pytest.mark.parametrize("bad", ["ftp://127.0.0.1:9000/v1", "localhost:8741", ""])
async def test_a_bad_upstream_is_one_clear_line_and_exit_1(bad: str) -> None:
    status, err = await run_to_exit("--port", str(free_port()), "--upstream", bad)
    assert status == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("chat_proxy: error: ")
    assert (f"'{bad}'" in err and "http:// or https://" in err) if bad else "empty" in err


async def test_a_busy_port_is_one_clear_line_and_exit_1() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status, err = await run_to_exit("--port", str(port))
    assert status == 1
    assert err.splitlines() == [f"chat_proxy: error: cannot listen on 127.0.0.1:{port}: "
                                "Address already in use"], err


async def test_the_example_prints_the_chat_page_url_on_start() -> None:
    async with run_example(output=True) as (process, url):
        assert process.stdout is not None
        seen = []
        while not any(line.startswith("chat page: ") for line in seen):
            line = await asyncio.wait_for(process.stdout.readline(), 20)
            assert line, f"the example said no chat page URL: {seen}"
            seen.append(line.decode().strip())
        async with httpx.AsyncClient(timeout=10) as client:
            page = await client.get(url + "/")
    assert f"chat page: {url}/" in seen
    assert page.status_code == 200 and "<html" in page.text.lower()


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
