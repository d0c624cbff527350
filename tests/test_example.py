"""The README's demo command: the example runs offline with its embedded fake model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
from conftest import EXAMPLES, chat_body, run_example

from sanic_streamplus import SSEDecoder
from sanic_streamplus.testing import fake_tokens


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
