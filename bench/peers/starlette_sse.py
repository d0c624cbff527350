"""Starlette + sse-starlette + httpx-sse relay: the "parse and re-emit" idiom.

A Starlette app served by uvicorn (uvloop, httptools). The handler opens the upstream with
httpx-sse's ``aconnect_sse()`` on one shared ``httpx.AsyncClient``, parses each upstream event
with ``aiter_sse()`` and re-emits it through sse-starlette's ``EventSourceResponse``. When the
client disconnects, sse-starlette cancels the generator and its ``async with`` block closes
the upstream response.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from httpx_sse import aconnect_sse
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(30.0, read=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    ) as client:
        app.state.client = client
        yield


async def relay(client: httpx.AsyncClient, url: str, body: bytes) -> AsyncIterator[ServerSentEvent]:
    async with aconnect_sse(
        client,
        "POST",
        url,
        content=body,
        headers={"content-type": "application/json", "accept": "text/event-stream"},
    ) as source:
        async for sse in source.aiter_sse():
            yield ServerSentEvent(
                data=sse.data,
                event=sse.event if sse.event != "message" else None,
                id=sse.id or None,
            )


async def chat_completions(request: Request) -> EventSourceResponse:
    state = request.app.state
    events = relay(state.client, state.upstream_url, await request.body())
    return EventSourceResponse(events, headers={"Cache-Control": "no-cache"}, ping=15)


app = Starlette(
    routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])],
    lifespan=lifespan,
)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Starlette + sse-starlette relay peer")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9001/v1")
    args = parser.parse_args()
    app.state.upstream_url = args.upstream.rstrip("/") + "/chat/completions"
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
        timeout_keep_alive=3600,  # idle keep-alive only; uvicorn never times out a response
    )
