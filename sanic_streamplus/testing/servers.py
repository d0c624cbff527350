"""``serve_app``: a Sanic app on a real socket of 127.0.0.1, in the running event loop (streams
need a real server: ``app.test_client`` buffers whole bodies). The ASGI servers live in
:mod:`sanic_streamplus.testclient`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["serve_app"]


@contextlib.asynccontextmanager
async def serve_app(app: Any, **server_options: Any) -> AsyncIterator[str]:
    """Run the Sanic ``app`` on a free port of 127.0.0.1 in the running loop.

    Yields:
        the base URL (str), e.g. ``http://127.0.0.1:PORT``.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = await app.create_server(
        sock=sock, return_asyncio_server=True, access_log=False, **server_options
    )
    await server.startup()
    await server.before_start()
    await server.after_start()
    serving = asyncio.ensure_future(server.serve_forever())
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.before_stop()
        server.close()
        await server.wait_closed()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving
        await server.after_stop()
