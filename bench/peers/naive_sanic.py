"""Naive Sanic SSE relay: the straightforward hand-written streaming proxy.

The handler opens the downstream stream with ``request.respond()``, forwards the request
body to the upstream on one shared ``httpx.AsyncClient`` (httpx's default transport) via
``client.stream()``, reads the upstream body with ``aiter_lines()``, and sends each event whole
(its lines joined, up to the blank line that ends it) with one ``response.send()``. On client
disconnect Sanic cancels the handler task, and the ``async with`` block closes the
upstream response.
"""

from __future__ import annotations

import argparse

import httpx
from sanic import Request, Sanic

app = Sanic("naive_sanic_peer")
app.config.AUTO_EXTEND = False  # plain Sanic: no sanic-ext even though it is installed
app.config.REQUEST_TIMEOUT = 3600
app.config.RESPONSE_TIMEOUT = 3600
app.config.KEEP_ALIVE_TIMEOUT = 3600


@app.before_server_start
async def open_client(app: Sanic) -> None:
    app.ctx.client = httpx.AsyncClient(
        timeout=httpx.Timeout(30.0, read=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    )


@app.after_server_stop
async def close_client(app: Sanic) -> None:
    await app.ctx.client.aclose()


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> None:
    response = await request.respond(
        content_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
    async with request.app.ctx.client.stream(
        "POST",
        request.app.config.UPSTREAM_URL,
        content=request.body,
        headers={"content-type": "application/json", "accept": "text/event-stream"},
    ) as upstream:
        lines: list[str] = []
        async for line in upstream.aiter_lines():
            if line:
                lines.append(line)
            elif lines:  # a blank line ends the event
                await response.send("\n".join(lines) + "\n\n")
                lines.clear()
        if lines:  # a last event the upstream did not end
            await response.send("\n".join(lines) + "\n\n")
    await response.eof()


def main() -> None:
    parser = argparse.ArgumentParser(description="Naive Sanic SSE relay peer")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9001/v1")
    args = parser.parse_args()
    app.config.UPSTREAM_URL = args.upstream.rstrip("/") + "/chat/completions"
    app.run(
        host="127.0.0.1",
        port=args.port,
        single_process=True,
        access_log=False,
        motd=False,
        backlog=2048,  # default 100 is too small for 1,200 clients connecting at once
    )


if __name__ == "__main__":
    main()
