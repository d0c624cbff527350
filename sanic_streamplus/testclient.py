"""A streaming test client: the app served on a real socket, read incrementally with httpx.

``app.test_client`` and ``app.asgi_client`` (sanic-testing) are the right tools for the answers of
a stream route that are not streams (a 400/413/429/503 JSON answer, HEAD, the OpenAPI document),
but they buffer the whole body: an endless stream hangs them. :func:`stream_client` follows their
shape and reads as the bytes arrive::

    async with stream_client(app) as client:                      # or server="uvicorn"
        async with client.stream("POST", "/chat", json=body) as response:
            assert response.status == 200
            async for event in response.aiter_events():           # ServerSentEvent objects
                ...

The app runs in the running event loop on 127.0.0.1, on Sanic's own server
(:func:`~sanic_streamplus.testing.serve_app`) or as an ASGI app under uvicorn
(:func:`serve_uvicorn`) or granian (:func:`serve_granian`); a real ``httpx.AsyncClient`` talks to
it, and events are decoded by the package's own :class:`~sanic_streamplus.sse.SSEDecoder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator, Generator
from typing import Any, Literal

import httpx

from .sse import ServerSentEvent, SSEDecoder
from .testing import serve_app

__all__ = [
    "SERVERS",
    "StreamClient",
    "StreamResponse",
    "serve_granian",
    "serve_uvicorn",
    "stream_client",
    "streamplus_app",
]

Server = Literal["sanic", "uvicorn", "granian"]
SERVERS: tuple[Server, ...] = ("sanic", "uvicorn", "granian")
_app_names = itertools.count()


def streamplus_app(name: str = "app", **config: Any) -> Any:
    """A new Sanic app named ``<name>_<n>`` (unique in the process), each ``config`` item set
    on ``app.config`` (``STREAMPLUS_UPSTREAM_URL=...``, ``RESPONSE_TIMEOUT=...``), then
    ``StreamPlus`` extended. Sets ``Sanic.test_mode = True`` (as sanic-testing's clients do), so
    one process may build many apps.

    Raises:
        ValueError: a ``STREAMPLUS_*`` setting is invalid (the extension reads them).
    """
    from sanic import Sanic

    from .extension import StreamPlus

    Sanic.test_mode = True
    app: Sanic[Any, Any] = Sanic(f"{name}_{next(_app_names)}")
    for key, value in config.items():
        app.config[key] = value
    app.extend(extensions=[StreamPlus])
    return app


@contextlib.asynccontextmanager
async def serve_uvicorn(app: Any, **config: Any) -> AsyncIterator[str]:
    """Run the Sanic ``app`` as an ASGI app under uvicorn on a free port of 127.0.0.1, in the
    running loop, with the lifespan protocol on (Sanic's server listeners run from it).

    Args:
        app: the Sanic app (any ASGI app works).
        config: more ``uvicorn.Config`` options (``log_level`` is ``"warning"`` unless given).

    Yields:
        the base URL (str), e.g. ``http://127.0.0.1:PORT``.

    Raises:
        ImportError: uvicorn is not installed (it comes with the ``testing`` extra).
        RuntimeError: uvicorn stopped before it started serving (a startup listener failed, say).
    """
    import uvicorn

    app = _genuine_asgi(app)
    # made as uvicorn's own (loop.create_server(host, port)): asyncio sets TCP_NODELAY only on
    # the connections of a socket made with IPPROTO_TCP
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    options: dict[str, Any] = {"lifespan": "on", "log_level": "warning", "loop": "asyncio"}
    server = uvicorn.Server(uvicorn.Config(app, **{**options, **config}))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task  # its own error first, if it has one
                raise RuntimeError("uvicorn stopped before it started serving the app")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        if not task.done():
            await asyncio.wait_for(task, 10)
        sock.close()


@contextlib.asynccontextmanager
async def serve_granian(app: Any, **config: Any) -> AsyncIterator[str]:
    """Run the Sanic ``app`` as an ASGI app under granian's embedded server
    (``granian.server.embed``: its Rust workers in threads, the app in the running loop) on a
    free port of 127.0.0.1, with the ASGI lifespan protocol on (``Interfaces.ASGI``: Sanic's
    server listeners run from it).

    Args:
        app: the Sanic app (any ASGI app works).
        config: more ``granian.server.embed.Server`` options (``log_level`` is ``"warning"``
            unless given; granian's own log records propagate to the root logger).

    Yields:
        the base URL (str), e.g. ``http://127.0.0.1:PORT``, once a connection is accepted
        (within 10 s).

    Raises:
        ImportError: granian is not installed (it comes with the ``testing`` extra).
        RuntimeError: granian stopped, or accepted no connection within 10 s.
    """
    from granian.constants import Interfaces
    from granian.server.embed import Server as Granian

    with socket.socket() as probe:  # granian binds the port itself: take a free one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options: dict[str, Any] = {
        "log_level": "warning",
        "log_dictconfig": {"loggers": {"_granian": {"propagate": True}}},
    }
    options.update(config)
    server: Any = Granian(
        _genuine_asgi(app), address="127.0.0.1", port=port, interface=Interfaces.ASGI, **options
    )
    task = asyncio.ensure_future(server.serve())
    try:
        await _accepting(port, task, "granian")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        if not task.done():
            await asyncio.wait_for(task, 10)


async def _accepting(port: int, task: asyncio.Future[Any], name: str) -> None:
    """Wait until 127.0.0.1:``port`` accepts a connection (at most 10 s).

    Raises:
        RuntimeError: ``task`` (the server) ended first, or 10 s passed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while loop.time() < deadline:
        if task.done():
            await task  # its own error first, if it has one
            raise RuntimeError(f"{name} stopped before it started serving the app")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return
    raise RuntimeError(f"{name} accepted no connection on port {port} within 10 s")


def _genuine_asgi(app: Any) -> Any:
    """``app``, or, once sanic-testing's ``app.asgi_client`` has replaced ``Sanic.__call__``
    for every app of the process (its version runs no lifespan, so under uvicorn the app never
    starts), an ASGI callable doing what Sanic's own ``__call__`` does."""
    if getattr(type(app).__call__, "__module__", None) != "sanic_testing.testing":
        return app
    from sanic.asgi import ASGIApp, Lifespan

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            app.asgi = True
            app._asgi_lifespan = Lifespan(app, scope, receive, send)
            await app._asgi_lifespan()
        else:
            app._asgi_app = await ASGIApp.create(app, scope, receive, send)
            await app._asgi_app()

    return asgi


class StreamResponse:
    """One response of :meth:`StreamClient.stream`, its body read as it arrives.

    Attributes:
        response: the ``httpx.Response`` underneath (its ``aiter_*`` methods work too).
        events: every :class:`ServerSentEvent` :meth:`aiter_events` has given so far.
        raw: every body byte read so far through :meth:`aiter_events` or :meth:`aiter_bytes`
            (content-decoded), for assertions on the exact bytes (heartbeat comments, say).
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.events: list[ServerSentEvent] = []
        self.raw = bytearray()

    @property
    def status(self) -> int:
        """The HTTP status code (as sanic-testing's ``TestingResponse.status``)."""
        return self.response.status_code

    @property
    def headers(self) -> httpx.Headers:
        """The response headers (case-insensitive)."""
        return self.response.headers

    @property
    def content_type(self) -> str:
        """The Content-Type header, "" if none."""
        return str(self.response.headers.get("content-type", ""))

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (content-decoded), also kept in :attr:`raw`.

        Raises:
            httpx.HTTPError: the connection failed or was cut mid-body
                (``httpx.RemoteProtocolError`` for a chunked body with no terminating chunk).
        """
        async for chunk in self.response.aiter_bytes():
            self.raw += chunk
            yield chunk

    async def aiter_events(self) -> AsyncIterator[ServerSentEvent]:
        """The events of a ``text/event-stream`` body, each as soon as its blank line arrives,
        decoded by :class:`SSEDecoder` (an event not terminated when the body ends is dropped,
        as the spec says); each is also appended to :attr:`events`.

        Raises:
            ValueError: the response is not an event stream (a JSON error answer, say: check
                :attr:`status` first, then ``await response.aread()`` and ``response.json()``).
            httpx.HTTPError: as :meth:`aiter_bytes`.
        """
        if not self.content_type.startswith("text/event-stream"):
            raise ValueError(
                f"not an event stream: status {self.status}, Content-Type {self.content_type!r}"
            )
        decoder = SSEDecoder()
        async for chunk in self.aiter_bytes():
            for event in decoder.feed(chunk):
                self.events.append(event)
                yield event

    async def aread(self) -> bytes:
        """Read the rest of the body and return the whole body (bytes).

        Raises:
            httpx.HTTPError: as :meth:`aiter_bytes`.
        """
        async for _ in self.aiter_bytes():
            pass
        return bytes(self.raw)

    def json(self) -> Any:
        """The body read so far (:meth:`aread` it first), parsed as JSON.

        Raises:
            ValueError: it is not JSON.
        """
        import json

        return json.loads(self.raw)


class StreamClient:
    """The Sanic ``app`` served on 127.0.0.1 port 0 and an ``httpx.AsyncClient`` for it.

    Use ``async with StreamClient(app) as client:``, or ``client = await StreamClient(app)``
    and ``await client.aclose()`` at the end. :func:`stream_client` is the same.

    Args:
        app: the Sanic app.
        server: ``"sanic"`` (Sanic's own server, :func:`~sanic_streamplus.testing.serve_app`),
            ``"uvicorn"`` or ``"granian"`` (the app as an ASGI app, :func:`serve_uvicorn`,
            :func:`serve_granian`).
        timeout: the httpx client's timeout, in seconds (connect, each read, each write).
        server_options: more options for ``app.create_server``, ``uvicorn.Config`` or granian's
            embedded ``Server``.

    Raises:
        ValueError: an unknown ``server``.

    Attributes:
        app: the app.
        url: the base URL once started, e.g. ``http://127.0.0.1:PORT`` ("" before).
        http: the ``httpx.AsyncClient`` (its ``base_url`` is :attr:`url`) once started.
    """

    def __init__(
        self, app: Any, *, server: Server = "sanic", timeout: float = 10.0, **server_options: Any
    ) -> None:
        if server not in SERVERS:
            raise ValueError(f"server must be one of {SERVERS}, not {server!r}")
        self.app = app
        self.server: Server = server
        self.timeout = timeout
        self.server_options = server_options
        self.url = ""
        self._http: httpx.AsyncClient | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        """The httpx client.

        Raises:
            RuntimeError: the client is not started (or closed already).
        """
        if self._http is None:
            raise RuntimeError("the StreamClient is not started: use `async with` or `await` it")
        return self._http

    async def start(self) -> StreamClient:
        """Serve the app and open the httpx client; return self. Starting twice does nothing.

        Raises:
            Exception: whatever the server's startup raises (a listener's error, say).
        """
        if self._stack is not None:
            return self
        stack = contextlib.AsyncExitStack()
        try:
            serve = {"sanic": serve_app, "uvicorn": serve_uvicorn, "granian": serve_granian}[
                self.server
            ]
            self.url = await stack.enter_async_context(serve(self.app, **self.server_options))
            self._http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=self.url, timeout=self.timeout)
            )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def aclose(self) -> None:
        """Close the httpx client and stop the server (waiting for it); closing twice does
        nothing."""
        stack, self._stack, self._http = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    def __await__(self) -> Generator[Any, None, StreamClient]:
        return self.start().__await__()

    async def __aenter__(self) -> StreamClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[StreamResponse]:
        """Send a request and yield its :class:`StreamResponse` once the headers arrived; the
        body is read only as the caller iterates. Leaving the block closes the response (and
        so the connection, if the body was not read to its end: a client that goes away).

        Args:
            method: the HTTP method.
            path: the path (joined to :attr:`url`), or a full URL.
            kwargs: what ``httpx.AsyncClient.stream`` takes (``json``, ``content``, ``headers``,
                ``timeout``...).

        Raises:
            httpx.HTTPError: the request could not be sent, or no answer came within the
                timeout.
        """
        async with self.http.stream(method, path, **kwargs) as response:
            yield StreamResponse(response)

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request and read its whole answer (for answers that end: errors, HEAD).

        Raises:
            httpx.HTTPError: as :meth:`stream`.
        """
        return await self.http.request(method, path, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        """``request("GET", path, ...)``."""
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        """``request("POST", path, ...)``."""
        return await self.request("POST", path, **kwargs)

    async def head(self, path: str, **kwargs: Any) -> httpx.Response:
        """``request("HEAD", path, ...)``."""
        return await self.request("HEAD", path, **kwargs)


def stream_client(
    app: Any, *, server: Server = "sanic", timeout: float = 10.0, **server_options: Any
) -> StreamClient:
    """A :class:`StreamClient` for ``app`` (not started yet): ``async with stream_client(app)
    as client:``. See :class:`StreamClient` for the arguments and errors."""
    return StreamClient(app, server=server, timeout=timeout, **server_options)
