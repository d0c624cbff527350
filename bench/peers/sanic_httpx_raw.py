"""Sanic + httpx ``aiter_raw()`` relay: the floor of the stack sanic-streamplus is built on.

A plain Sanic handler (no sanic-ext) on one shared ``httpx.AsyncClient`` that runs on
httpx-aiohttp's ``AiohttpTransport``, as sanic-streamplus's client does by default. It opens the
downstream stream with ``request.respond()``, forwards the request body with
``client.stream()``, and sends every chunk ``aiter_raw()`` yields as it comes, with one
``response.send()`` per chunk: no decoding, no event framing, no timeouts beyond httpx's, no
error events. Whatever a relay on this stack does on top of moving bytes costs what it adds over
this peer. On client disconnect Sanic cancels the handler task, and the ``async with`` block
closes the upstream response.
"""

from __future__ import annotations

import argparse

import httpx
from httpx_aiohttp import AiohttpTransport
from sanic import Request, Sanic

app = Sanic("sanic_httpx_raw_peer")
app.config.AUTO_EXTEND = False  # plain Sanic: no sanic-ext even though it is installed
app.config.REQUEST_TIMEOUT = 3600
app.config.RESPONSE_TIMEOUT = 3600
app.config.KEEP_ALIVE_TIMEOUT = 3600


@app.before_server_start
async def open_client(app: Sanic) -> None:
    # AiohttpTransport takes its pool size from these limits (None would mean aiohttp's 100)
    limits = httpx.Limits(max_connections=4000, max_keepalive_connections=100)
    app.ctx.client = httpx.AsyncClient(
        timeout=httpx.Timeout(30.0, read=None),
        limits=limits,
        transport=AiohttpTransport(limits=limits),
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
        async for chunk in upstream.aiter_raw():
            await response.send(chunk)
    await response.eof()


def main() -> None:
    parser = argparse.ArgumentParser(description="Sanic + httpx aiter_raw floor peer")
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
