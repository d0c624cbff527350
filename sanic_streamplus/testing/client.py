"""``stream_request``: a streaming HTTP/1.1 client on a raw TCP socket (framing by h11) that can
be a bad client on purpose: read slowly, stop reading (and see, without reading, when the server
gives up: Linux ``TCP_INFO``), vanish after a given number of events with a FIN or a TCP reset
(``SO_LINGER`` 0); it reports exactly what arrived and how the response ended
(:class:`StreamResult`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import h11

from ..sse import ServerSentEvent, SSEDecoder

__all__ = ["StreamResult", "stream_request"]


_COMMENT_LINE = re.compile(rb"(?:^|\r\n|\r|\n):")  # a line that starts with a colon
_TCP_ESTABLISHED = 1  # Linux tcp_info.tcpi_state


@dataclass
class StreamResult:
    """What :func:`stream_request` received, and how the exchange ended.

    Attributes:
        status: the HTTP status (int).
        headers: the response headers, names lower-cased (a repeated header keeps its last value).
        events: the :class:`ServerSentEvent` objects decoded from a ``text/event-stream`` body, in
            order (empty for any other Content-Type).
        comments: comment lines (``: ping`` heartbeats, say) in a ``text/event-stream`` body.
        body: the body bytes, de-chunked.
        chunks: how many chunks a chunked body had (its terminating chunk not counted).
        json: the body parsed as JSON when the Content-Type is JSON (an error answer), else None.
        end: how the exchange ended: ``"complete"`` (the terminating chunk, or the whole
            Content-Length, arrived), ``"closed"`` (the server closed the connection before the
            body was complete), ``"reset"`` (the connection was reset), ``"disconnected"`` (the
            client left, as ``disconnect_after`` asked) or ``"timeout"``.
        elapsed: seconds from connecting to the end.
        event_times: for each event, seconds from connecting to the read that completed it.
    """

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    events: list[ServerSentEvent] = field(default_factory=list)
    comments: int = 0
    body: bytes = b""
    chunks: int = 0
    json: Any = None
    end: Literal["complete", "closed", "reset", "disconnected", "timeout"] = "timeout"
    elapsed: float = 0.0
    event_times: list[float] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """The server ended the response properly (``end == "complete"``)."""
        return self.end == "complete"


class _ResponseReader:
    """An incremental HTTP/1.1 response parser (h11): the status line, the headers, then a
    chunked body, a Content-Length body, or a body that runs until the connection closes."""

    def __init__(self) -> None:
        self.http = h11.Connection(h11.CLIENT)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks = 0  # whole chunks of a chunked body (the terminating chunk not counted)
        self.done = False  # the whole response arrived

    def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> bytes:
        """The bytes of the request, as h11 frames them."""
        start = h11.Request(method=method, target=target, headers=headers)
        return b"".join(
            self.http.send(event) or b""
            for event in (start, h11.Data(data=body), h11.EndOfMessage())
        )

    def feed(self, data: bytes) -> bytes:
        """Take the next bytes read (``b""``: the server closed); return the body bytes they
        complete.

        Raises:
            ValueError: the response is not well-formed HTTP/1.1, or the server closed before
                its end.
        """
        self.http.receive_data(data)
        body = bytearray()
        while not self.done:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as exc:
                raise ValueError(f"not a well-formed HTTP/1.1 response: {exc}") from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Response):
                self.status = event.status_code
                self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
                self.chunks += event.chunk_end  # (chunk_start is lost on a split read)
            elif isinstance(event, h11.EndOfMessage):
                self.done = True
            elif isinstance(event, h11.ConnectionClosed):
                break
            # an h11.InformationalResponse (1xx): the real answer follows
        return bytes(body)


def _tcp_state(sock: socket.socket) -> int | None:
    """The kernel's TCP state of ``sock`` (Linux ``TCP_INFO``), or None where unavailable."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return None
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, option, 1)[0]
    except OSError:
        return None


async def _peer_gone(sock: socket.socket, deadline: float) -> bool:
    """Wait, without reading, until the peer closes or resets the connection (True) or the
    loop's clock reaches ``deadline`` (False). Where the TCP state cannot be read (not Linux),
    waits for the deadline."""
    loop = asyncio.get_running_loop()
    while (left := deadline - loop.time()) > 0:
        state = _tcp_state(sock)
        if state is not None and state != _TCP_ESTABLISHED:
            return True
        await asyncio.sleep(min(0.01, left))
    return False


async def stream_request(
    url: str,
    path: str,
    json_body: Any = None,
    *,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    read_size: int = 65536,
    read_delay: float = 0.0,
    stop_reading_after: int | None = None,
    disconnect_after: int | None = None,
    reset_on_disconnect: bool = False,
    recv_buffer: int | None = None,
    timeout: float = 10.0,
) -> StreamResult:
    """POST to a streaming endpoint over a raw TCP socket and report what arrived, and how.

    For testing handlers over a real server (see :func:`serve_app`): unlike ``app.test_client``
    it never buffers a whole body before returning, and it can read slowly, stop reading or
    vanish at a given event. The request is HTTP/1.1 with ``Content-Length`` and
    ``Connection: close``; the response may be chunked, have a Content-Length, or run until the
    server closes. A ``text/event-stream`` body is decoded with :class:`SSEDecoder`.

    Args:
        url: the server's base URL, ``http://HOST:PORT`` (as :func:`serve_app` yields).
        path: the request path, e.g. ``"/v1/chat/completions"``.
        json_body: sent as the JSON body (ignored when ``content`` is given).
        content: the raw request body (bytes) instead, sent as ``application/json`` unless
            ``headers`` says otherwise.
        headers: extra request headers.
        read_size: the most bytes taken per read.
        read_delay: seconds to sleep after each read (a slow reader).
        stop_reading_after: stop reading once this many events have arrived, keeping the socket
            open, until the server closes or resets it (then read what is left, to see how the
            response ended) or ``timeout`` expires. Detecting the close without reading needs
            Linux (``TCP_INFO``); elsewhere it waits for ``timeout``.
        disconnect_after: close the socket once this many events have arrived.
        reset_on_disconnect: with ``disconnect_after``, close with a TCP reset instead of a FIN.
        recv_buffer: ``SO_RCVBUF`` in bytes, set before connecting, so a client that stops
            reading fills the server's buffers sooner.
        timeout: seconds for the whole exchange. Once the request is sent, its expiry is not an
            exception: the result says ``end == "timeout"``.

    Returns:
        a :class:`StreamResult`.

    Raises:
        ValueError: ``url`` is not ``http://HOST[:PORT]``, or the response is not HTTP/1.1.
        OSError: the connection could not be made or the request not sent
            (``ConnectionRefusedError``, ``TimeoutError`` after ``timeout``, ...).
        sanic_streamplus.errors.EventTooLarge: an event of the body exceeds 1 MiB.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected http://HOST[:PORT], not {url!r}")
    host, port = parts.hostname, parts.port or 80
    if content is None:
        content = json.dumps(json_body).encode()
    head = {
        "Host": f"{host}:{port}",
        "Content-Type": "application/json",
        "Content-Length": str(len(content)),
        "Connection": "close",
        **(headers or {}),
    }
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout
    result = StreamResult()
    reader = _ResponseReader()
    request = reader.request("POST", path, list(head.items()), content)
    decoder = SSEDecoder()
    body = bytearray()
    with await _connect(host, port, recv_buffer, request, timeout) as sock:
        while not reader.done:
            try:
                left = deadline - loop.time()
                if left <= 0:
                    raise asyncio.TimeoutError
                data = await asyncio.wait_for(loop.sock_recv(sock, read_size), left)
            except asyncio.TimeoutError:
                break
            except ConnectionResetError:
                result.end = "reset"
                break
            if not data:
                with contextlib.suppress(ValueError):  # a body cut short: "closed"
                    body += reader.feed(b"")  # the end of a body that runs until the close
                result.end = "complete" if reader.done else "closed"
                break
            part = reader.feed(data)
            body += part
            if part and reader.headers.get("content-type", "").startswith("text/event-stream"):
                events = decoder.feed(part)
                result.events += events
                result.event_times += [loop.time() - started] * len(events)
            if reader.done:
                break
            count = len(result.events)
            if disconnect_after is not None and count >= disconnect_after:
                if reset_on_disconnect:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                result.end = "disconnected"
                break
            if stop_reading_after is not None and count >= stop_reading_after:
                stop_reading_after = None
                if not await _peer_gone(sock, deadline):
                    break  # timeout
            if read_delay:
                await asyncio.sleep(read_delay)
        if reader.done:
            result.end = "complete"
    result.status = reader.status
    result.headers = reader.headers
    result.body = bytes(body)
    result.chunks = reader.chunks
    result.elapsed = loop.time() - started
    content_type = reader.headers.get("content-type", "")
    if content_type.startswith("text/event-stream"):
        result.comments = len(_COMMENT_LINE.findall(result.body.removeprefix(b"\xef\xbb\xbf")))
    elif "json" in content_type:
        with contextlib.suppress(ValueError):
            result.json = json.loads(result.body)
    return result


async def _connect(
    host: str, port: int, recv_buffer: int | None, request: bytes, timeout: float
) -> socket.socket:
    """A non-blocking socket connected to ``host``:``port`` that has sent ``request``.

    Raises:
        OSError: connecting or sending failed; ``TimeoutError`` after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, address = addresses[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        if recv_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
        await asyncio.wait_for(loop.sock_sendall(sock, request), timeout)
    except BaseException:
        sock.close()
        raise
    return sock
