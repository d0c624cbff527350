"""aiohttp SSE relay: one aiohttp server + one shared ``ClientSession``, one write per event.

The handler posts the request body upstream with ``session.post()``, prepares a
``web.StreamResponse`` and reads the upstream body with the common readline idiom
(``async for line in upstream.content``). It gathers an event's lines until the blank line that
ends it, then writes the whole event with one ``await response.write()`` (not one write per
line: each write is a chunk and a send of its own). The server runs with
``handler_cancellation=True`` so a client disconnect cancels the handler (aiohttp's default only
notices on the next failed ``write()``), and the ``async with`` block closes the upstream.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM_URL = web.AppKey("upstream_url", str)


async def client_session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
    ) as session:
        app[SESSION] = session
        yield


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    async with request.app[SESSION].post(
        request.app[UPSTREAM_URL],
        data=body,
        headers={"content-type": "application/json", "accept": "text/event-stream"},
    ) as upstream:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        event: list[bytes] = []
        async for line in upstream.content:
            event.append(line)
            if line in (b"\n", b"\r\n"):  # a blank line ends the event
                await response.write(b"".join(event))
                event.clear()
        if event:  # a last event the upstream did not end
            await response.write(b"".join(event))
        await response.write_eof()
        return response


def main() -> None:
    parser = argparse.ArgumentParser(description="aiohttp SSE relay peer")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9001/v1")
    args = parser.parse_args()
    app = web.Application(client_max_size=100 * 2**20)  # default 1 MiB; Sanic's is 100 MB
    app[UPSTREAM_URL] = args.upstream.rstrip("/") + "/chat/completions"
    app.cleanup_ctx.append(client_session)
    app.router.add_post("/v1/chat/completions", chat_completions)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        keepalive_timeout=3600,  # idle keep-alive only; aiohttp has no response timeout
        backlog=2048,  # default 128 is too small for 1,200 clients connecting at once
        handler_cancellation=True,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
