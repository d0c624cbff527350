"""Backpressure: a slow client reading a 100 MB stream keeps the proxy's memory flat.

The proxy runs in its own process (the example, one command), so its RSS is its own.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import completions_body

from sanic_streamplus.testing import FakeUpstream

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "chat_proxy.py"
TOKEN_SIZE = 64 * 1024
TOKENS = 1600  # about 105 MB of upstream events


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_slow_client_on_a_100_mb_stream_keeps_proxy_memory_bounded() -> None:
    async with FakeUpstream(tokens=TOKENS, delay=0, token_size=TOKEN_SIZE) as upstream:
        port = free_port()
        proxy = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLE),
            *("--port", str(port), "--upstream", upstream.url),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient() as client:
                for _ in range(200):
                    try:
                        await client.get(url + "/")
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
                warm = await client.post(
                    url + "/v1/chat/completions", json=completions_body(tokens=50, token_size=1024)
                )
                assert warm.text.endswith("data: [DONE]\n\n")
            baseline = rss_bytes(proxy.pid)
            peak = baseline
            received = 0

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, rss_bytes(proxy.pid))
                    await asyncio.sleep(0.02)

            sampler = asyncio.ensure_future(sample())
            body = json.dumps(completions_body(tokens=TOKENS, delay=0, token_size=TOKEN_SIZE))
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
            writer.write(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
            )
            started = time.monotonic()
            tail = b""
            while time.monotonic() - started < 120:
                chunk = await reader.read(128 * 1024)
                if not chunk:
                    break
                received += len(chunk)
                tail = (tail + chunk)[-64:]
                if tail.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
                    break
                await asyncio.sleep(0.004)  # a client slower than the upstream
            sampler.cancel()
            writer.close()
        finally:
            proxy.terminate()
            await asyncio.wait_for(proxy.wait(), 10)
    growth = peak - baseline
    print(f"received {received / 1e6:.1f} MB; proxy RSS growth {growth / 1e6:.1f} MB")
    assert received > TOKENS * TOKEN_SIZE, "the slow client did not get the whole stream"
    assert tail.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert growth < 32 * 1024 * 1024
