"""Backpressure: a slow client reading a 100 MB stream keeps the proxy's memory flat, under the
`block` and `coalesce` policies.

The proxy runs in its own process (the example, one command), so its RSS is its own.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import completions_body, run_example

from sanic_streamplus.testing import FakeUpstream

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "chat_proxy.py"
TOKEN_SIZE = 64 * 1024
TOKENS = 1600  # about 105 MB of upstream events
END = b"data: [DONE]\n\n\r\n0\r\n\r\n"  # the last event, then the chunked terminator


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.usefixtures("transport")
@pytest.mark.parametrize("policy", ["block", "coalesce"])
async def test_slow_client_on_a_100_mb_stream_keeps_proxy_memory_bounded(
    policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANIC_STREAMPLUS_SLOW_CLIENT", policy)
    async with (
        FakeUpstream(tokens=TOKENS, delay=0, token_size=TOKEN_SIZE) as upstream,
        run_example("--upstream", upstream.url) as (proxy, url),
    ):
        async with httpx.AsyncClient() as client:
            warm = await client.post(
                url + "/v1/chat/completions", json=completions_body(tokens=50, token_size=1024)
            )
            assert warm.text.endswith("data: [DONE]\n\n")
        baseline = peak = rss_bytes(proxy.pid)

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_bytes(proxy.pid))
                await asyncio.sleep(0.02)

        sampler = asyncio.ensure_future(sample())
        body = json.dumps(completions_body(tokens=TOKENS, delay=0, token_size=TOKEN_SIZE))
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 16)
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        started = time.monotonic()
        received, tail = 0, b""
        while time.monotonic() - started < 120:
            chunk = await reader.read(128 * 1024)
            if not chunk:
                break
            received += len(chunk)
            tail = (tail + chunk)[-64:]
            if tail.endswith(END):
                break
            await asyncio.sleep(0.004)  # a client slower than the upstream
        sampler.cancel()
        writer.close()
    growth = peak - baseline
    print(f"\nreceived {received / 1e6:.1f} MB; proxy RSS growth {growth / 1e6:.1f} MB")
    assert received > TOKENS * TOKEN_SIZE, "the slow client did not get the whole stream"
    assert tail.endswith(END)
    assert growth < 32 * 1024 * 1024
