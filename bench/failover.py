"""Time to first event through the proxy with several upstreams: a live primary, a dead one
(connection refused), a 503 one, and a dead one behind its open circuit breaker.

    PYTHONPATH=. python bench/failover.py [--requests 200]

Everything runs on 127.0.0.1 in one process (the fake upstreams of ``sanic_streamplus.testing``,
the Sanic proxy, an httpx client), requests one after the other; time to first event is from
sending the POST to the first text token the client decodes (milliseconds: median and p90;
the fakes stream without delay, so it is the proxy's own cost). With ``--continuation`` it
also measures the CPU time (process time) of streams cut after half their tokens and
continued on the backup, against the same streams uncut.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
from sanic import Request, Sanic

from sanic_streamplus import StreamPlus, stream_post, upstream_events
from sanic_streamplus.testing import FakeUpstream, serve_app

Sanic.test_mode = True  # several apps in one process (no touch-up of the second)
BODY = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def proxy_app(name: str, upstreams: list[str], **config: Any) -> Sanic[Any, Any]:
    app: Sanic[Any, Any] = Sanic(name)
    app.config.STREAMPLUS_UPSTREAMS = [
        {"name": f"u{n}", "url": url} for n, url in enumerate(upstreams)
    ]
    app.config.STREAMPLUS_HEARTBEAT = 0
    for key, value in config.items():
        app.config[key] = value
    app.extend(extensions=[StreamPlus])

    @app.post("/v1/chat/completions")
    @stream_post(dialect="openai")
    async def chat(request: Request) -> Any:
        return upstream_events(request, "/chat/completions", json=request.json)

    return app


def content(data: str) -> bool:
    """Whether an OpenAI chunk carries text (a role delta does not)."""
    if not data.startswith("{"):
        return False
    return any((c.get("delta") or {}).get("content") for c in json.loads(data)["choices"])


async def first_events(url: str, count: int) -> list[float]:
    """Seconds to the first text token of ``count`` sequential streams (each read to its
    end)."""
    times = []
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(count):
            began = time.perf_counter()
            first = None
            async with client.stream("POST", url + "/v1/chat/completions", json=BODY) as answer:
                assert answer.status_code == 200, answer.status_code
                async for line in answer.aiter_lines():
                    if first is None and line.startswith("data: ") and content(line[6:]):
                        first = time.perf_counter() - began
            assert first is not None
            times.append(first)
    return times


def summary(label: str, times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p90 = ms[int(len(ms) * 0.9) - 1]
    return f"{label:<44} median {statistics.median(ms):7.2f} ms   p90 {p90:7.2f} ms   n={len(ms)}"


async def main(requests: int, continuation: bool) -> None:
    async with FakeUpstream(tokens=4, delay=0) as live, FakeUpstream(error_status=503) as failing:
        cases: list[tuple[str, list[str], dict[str, Any]]] = [
            ("live primary", [live.url], {}),
            ("live primary, backup configured", [live.url, live.url], {}),
            (
                "dead primary (refused), breaker off",
                [dead_url(), live.url],
                {"STREAMPLUS_BREAKER_COOLDOWN": 0},
            ),
            (
                "503 primary, breaker off",
                [failing.url, live.url],
                {"STREAMPLUS_BREAKER_COOLDOWN": 0},
            ),
            ("dead primary, breaker (default: 5 in 30 s)", [dead_url(), live.url], {}),
            ("live primary (again: the drift of the run)", [live.url], {}),
        ]
        for n, (label, upstreams, config) in enumerate(cases):
            async with serve_app(proxy_app(f"bench_failover_{n}", upstreams, **config)) as url:
                await first_events(url, 5)  # warm up: connections, the breaker's failures
                print(summary(label, await first_events(url, requests)), flush=True)
    if continuation:
        await continuation_cpu(requests)


async def continuation_cpu(requests: int) -> None:
    """Process CPU per stream: 40 tokens from one upstream, against 20 tokens, a cut, and 20
    more from the backup (``failover="continue"``)."""
    tokens = 40
    async with (
        FakeUpstream(tokens=tokens, delay=0) as whole,
        FakeUpstream(tokens=tokens, delay=0, fail_after=1 + tokens // 2) as cut,
        FakeUpstream(tokens=tokens // 2, delay=0) as rest,
    ):
        runs: list[tuple[str, list[str]]] = [
            ("uncut, 40 tokens", [whole.url, rest.url]),
            ("cut after 20 tokens, continued (20 more)", [cut.url, rest.url]),
        ]
        for n, (label, upstreams) in enumerate(runs):
            config = {"STREAMPLUS_FAILOVER": "continue", "STREAMPLUS_BREAKER_COOLDOWN": 0}
            app = proxy_app(f"bench_continue_{n}", upstreams, **config)
            async with serve_app(app) as url:
                await first_events(url, 5)
                cpu: Callable[[], float] = time.process_time
                began = cpu()
                await first_events(url, requests)
                per = (cpu() - began) / requests * 1000
                print(f"{label:<44} {per:7.3f} ms CPU per stream (proxy + client + fakes)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--continuation", action="store_true")
    args = parser.parse_args()
    for logger in ("sanic_streamplus", "sanic.root", "sanic.access", "sanic.error"):
        logging.getLogger(logger).setLevel(logging.ERROR)  # a failover per request is a warning
    asyncio.run(main(args.requests, args.continuation))
