"""A test kit: a fake OpenAI-compatible upstream with fault knobs, a real server for an app, and a
raw-socket streaming client.

``FakeUpstream`` is a real HTTP/1.1 server on 127.0.0.1 (plain asyncio, no framework) that answers
``POST .../chat/completions`` with an OpenAI-style ``chat.completion.chunk`` event stream of
deterministic tokens, and records what it saw: each request's headers and body, when its
connection closed, how much of the stream it sent. Knobs (constructor defaults, overridable per
request with a ``"fake": {...}`` object in the JSON body; ``FakeModel`` holds them):

- ``tokens`` (int): how many tokens to stream; ``delay`` (s): pause before each token;
- ``text`` (str or None): stream this text instead, cut into word tokens (:func:`text_tokens`;
  ``tokens`` is then ignored). ``FakeUpstream(answer=...)`` computes it from each request;
- ``token_size`` (bytes, or None): pad each token to this size (for large-volume tests);
- ``fail_after`` (int or None): reset the connection after that many events;
- ``reset_at_byte`` (int or None): write exactly that many bytes of the event-stream body (maybe
  in the middle of an event or of a line ending), then reset the connection; a body shorter than
  that is written whole and the reset replaces its terminating chunk;
- ``stall`` (s, ``math.inf`` for good): silence before the response headers; ``stall_after``
  (int or None): instead, go silent (keeping the connection open) before event number N, for
  ``stall`` seconds; ``stall_mid_frame`` (int or None): instead, write the first half of event
  number N (its bytes cut in the middle of its data line), then go silent for ``stall`` seconds;
- ``comment_every`` (s, or None): while stalled, send the comment ``: keep-alive`` and a blank line
  every that many seconds. With a plain ``stall`` the headers then go out at once and the stall
  (with its comments) sits between them and the first event. Not during a ``stall_mid_frame``:
  any byte sent in the middle of a line would change the event;
- ``error_status`` (int or None) and ``retry_after`` (str or None): answer that status with an
  OpenAI-style JSON error instead of a stream; ``error_body``: that answer's body instead, as
  JSON (a str: written as it is, with Content-Type ``text/plain``);
- ``content_type`` (str): the stream's Content-Type; ``bom`` (bool): start the body with a BOM;
- ``line_ending`` (``"lf"``, ``"crlf"`` or ``"cr"``): every line ending of the body;
- ``malformed_utf8`` (bool): the content of token 1 (``MALFORMED_TOKEN``, the second token) ends
  with ``MALFORMED_BYTES``: two bytes that are never UTF-8 and a truncated 3-byte sequence, which a
  decoder with replacement turns into three U+FFFD;
- ``u2028`` (bool): the content of token 2 (``U2028_TOKEN``) ends with ``"\\u2028line\\u2029para"``,
  raw in the JSON (not escaped): U+2028 and U+2029 are not line endings in an event stream;
- ``id_only_block`` (bool): right after the first event, a block ``id: 42`` with no data;
- ``oversized_event`` (bytes, or None): right after the first token's event, one more event whose
  data line is that many bytes (at least about 130): a chunk with no content, padded with an
  ``x_padding`` field;
- ``long_line`` (bytes, or None): right after the first token's event, a line of that many bytes
  (``data: xxx...``) that never ends; nothing follows and the connection stays open;
- ``hold_before`` (int or None): go silent (keeping the connection open) before event number N
  until :meth:`FakeUpstream.release` is called; the request's ``held`` is True meanwhile. For a test
  that must see a stream still open (first tokens shown, the end not yet sent), then let it finish;
- ``finish_reason`` (bool): send the stop chunk (``"finish_reason": "stop"``) after the tokens;
  with neither it nor ``done`` the stream is cut short (``upstream_truncated``);
- ``usage`` (bool): after the stop chunk, a usage chunk (``"choices": []``, ``"usage"``:
  ``FAKE_USAGE`` with the token count), as OpenAI sends for ``stream_options: {"include_usage":
  true}``; a request that asks so gets it without the knob;
- ``error_event_after`` (int or None): instead of block number N and what follows, one error
  event ``ERROR_EVENT`` (``data: {"error": {...}}``, as LiteLLM sends mid-stream), then the end;
- ``done`` (bool): end with ``data: [DONE]``; ``hold_after_done`` (bool): after the last event,
  never end the body: the connection stays open until the client closes it;
- ``trickle`` (bytes, or None): write the body in pieces of that many bytes, each its own chunk and
  its own write, with ``delay`` between pieces instead of between tokens;
- ``set_cookie`` (str, or None): send this ``Set-Cookie`` header with the stream.

Event numbers (``fail_after``, ``stall_after``, ``stall_mid_frame``, ``hold_before``,
``error_event_after``) count the blocks of the body from 0: the role chunk, then the extra blocks
above where they are enabled, the tokens, the stop chunk, the usage chunk, ``[DONE]``.
``FakeModel.frames()`` gives those blocks as written, to compute byte offsets, and
``FakeModel.expected_tokens()`` the token texts as a correct client decodes them.

``GET .../models`` answers an OpenAI-style model list with the one model, ``fake-model``.

``serve_app(app)`` runs a Sanic app on a socket bound to 127.0.0.1 port 0 and yields its base
URL: streams need a real server (``app.test_client`` buffers whole bodies).

``stream_request(url, path, body)`` is a streaming client on a raw socket that can read slowly,
stop reading, or vanish after a given number of events, and reports exactly what arrived and how
the response ended (:class:`StreamResult`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from .sse import ServerSentEvent, SSEDecoder

__all__ = [
    "ERROR_EVENT",
    "FAKE_USAGE",
    "MALFORMED_BYTES",
    "MALFORMED_TOKEN",
    "U2028_TOKEN",
    "FakeModel",
    "FakeUpstream",
    "StreamResult",
    "UpstreamRequest",
    "fake_tokens",
    "serve_app",
    "stream_request",
    "text_tokens",
]

_WORDS = ("Hello", " from", " the", " fake", " model", ",", " token", " by", " token", ".")
MALFORMED_TOKEN = 1  # the token whose content malformed_utf8 spoils (index into fake_tokens())
MALFORMED_BYTES = b"\xff\xfe\xe2\x82"  # never UTF-8 twice, then a 3-byte sequence cut short
U2028_TOKEN = 2  # the token whose content u2028 extends
_U2028_SUFFIX = "\u2028line\u2029para"
_MALFORMED_MARK = "{malformed}"  # ASCII placeholder swapped for MALFORMED_BYTES once encoded
_LINE_ENDINGS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}
_FOREVER = 1e9  # seconds: asyncio.sleep() does not take math.inf
ERROR_EVENT = {  # the data of the error_event_after event
    "error": {"message": "fake upstream error event", "type": "server_error", "code": "fake_error"}
}
FAKE_USAGE = {"prompt_tokens": 7}  # the usage chunk's, plus completion_tokens and total_tokens


def fake_tokens(count: int, token_size: int | None = None) -> list[str]:
    """The deterministic tokens the fake model streams: ``count`` strings, each padded with
    ``"~"`` to ``token_size`` characters when given. ``"".join()`` them for the full text."""
    tokens = [f"{_WORDS[i % len(_WORDS)]}{i // len(_WORDS) or ''}" for i in range(count)]
    if token_size:
        tokens = [t.ljust(token_size, "~")[:token_size] for t in tokens]
    return tokens


def text_tokens(text: str) -> list[str]:
    """``text`` cut into tokens as the fake model streams it: each word with the white space
    before it (line breaks included); trailing white space goes with the last token.
    ``"".join()`` them gives ``text`` back."""
    tokens = re.findall(r"\s*\S+", text)
    tail = text[sum(map(len, tokens)):]
    if tokens:
        tokens[-1] += tail
    elif tail:
        tokens = [tail]
    return tokens


@dataclass(frozen=True)
class FakeModel:
    """The fake model's knobs (see the module docstring); seconds for times, bytes for sizes.

    Raises:
        ValueError: ``line_ending`` is not ``"lf"``, ``"crlf"`` or ``"cr"``, or ``trickle`` is
            not positive.
    """

    tokens: int = 12
    delay: float = 0.05
    text: str | None = None
    token_size: int | None = None
    fail_after: int | None = None
    reset_at_byte: int | None = None
    stall: float = 0.0
    stall_after: int | None = None
    stall_mid_frame: int | None = None
    comment_every: float | None = None
    hold_before: int | None = None
    error_status: int | None = None
    retry_after: str | None = None
    error_body: Any = None
    content_type: str = "text/event-stream"
    bom: bool = False
    line_ending: str = "lf"
    malformed_utf8: bool = False
    u2028: bool = False
    id_only_block: bool = False
    oversized_event: int | None = None
    long_line: int | None = None
    finish_reason: bool = True
    usage: bool = False
    error_event_after: int | None = None
    done: bool = True
    hold_after_done: bool = False
    trickle: int | None = None
    set_cookie: str | None = None

    def __post_init__(self) -> None:
        if self.line_ending not in _LINE_ENDINGS:
            raise ValueError(f"line_ending must be one of {sorted(_LINE_ENDINGS)}")
        if self.trickle is not None and self.trickle <= 0:
            raise ValueError("trickle must be a positive number of bytes")
        if self.text is not None and not isinstance(self.text, str):
            raise ValueError("text must be a string")

    def _tokens(self) -> list[str]:
        if self.text is not None:
            return text_tokens(self.text)
        return fake_tokens(self.tokens, self.token_size)

    def override(self, values: Any) -> FakeModel:
        """A copy with the known keys of ``values`` (a dict from a request body) applied.

        Raises:
            ValueError: a value is out of range (see the class).
        """
        if not isinstance(values, dict):
            return self
        names = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in values.items() if k in names})

    def expected_tokens(self) -> list[str]:
        """The token contents as a correct client sees them: :func:`fake_tokens`, with the
        ``malformed_utf8`` token's bytes decoded with replacement and the ``u2028`` suffix."""
        tokens = self._tokens()
        if self.malformed_utf8 and len(tokens) > MALFORMED_TOKEN:
            tokens[MALFORMED_TOKEN] += MALFORMED_BYTES.decode("utf-8", "replace")
        if self.u2028 and len(tokens) > U2028_TOKEN:
            tokens[U2028_TOKEN] += _U2028_SUFFIX
        return tokens

    def frames(self) -> list[bytes]:
        """The blocks of the event-stream body, in the order written, exactly as written (line
        endings applied, the BOM before the first): ``b"".join()`` them for the whole body.

        The ``long_line`` block has no line ending, and nothing follows it."""
        tokens = self._tokens()
        if self.malformed_utf8 and len(tokens) > MALFORMED_TOKEN:
            tokens[MALFORMED_TOKEN] += _MALFORMED_MARK
        if self.u2028 and len(tokens) > U2028_TOKEN:
            tokens[U2028_TOKEN] += _U2028_SUFFIX
        token_events = [
            _chunk_event({"content": token}, None).replace(
                _MALFORMED_MARK.encode(), MALFORMED_BYTES
            )
            for token in tokens
        ]
        blocks = [_chunk_event({"role": "assistant", "content": ""}, None)]
        if self.id_only_block:
            blocks.append(b"id: 42\n\n")
        blocks += token_events[:1]
        if self.oversized_event is not None:
            blocks.append(_padded_event(self.oversized_event))
        if self.long_line is not None:
            blocks.append((b"data: " + b"x" * self.long_line)[: self.long_line])
        else:
            blocks += token_events[1:]
            if self.finish_reason:
                blocks.append(_chunk_event({}, "stop"))
            if self.usage:
                blocks.append(_usage_event(len(tokens)))
            if self.done:
                blocks.append(b"data: [DONE]\n\n")
        if self.error_event_after is not None:
            error = json.dumps(ERROR_EVENT, separators=(",", ":")).encode()
            blocks[self.error_event_after :] = [b"data: " + error + b"\n\n"]
        ending = _LINE_ENDINGS[self.line_ending]
        if ending != b"\n":
            blocks = [block.replace(b"\n", ending) for block in blocks]
        if self.bom:
            blocks[0] = b"\xef\xbb\xbf" + blocks[0]
        return blocks

    def comment(self) -> bytes:
        """The keep-alive comment block ``comment_every`` sends, line endings applied."""
        return b": keep-alive\n\n".replace(b"\n", _LINE_ENDINGS[self.line_ending])


@dataclass
class UpstreamRequest:
    """What the fake upstream saw of one request.

    Attributes:
        method, path: of the request line; headers: lower-cased names; body: raw bytes.
        received: ``time.monotonic()`` when the request was complete.
        closed: ``time.monotonic()`` when its connection closed (either side), or None.
        completed: the whole stream (with its terminating chunk) was written.
        events: blocks of the body written in full (see "event numbers" in the module docstring).
        sent: bytes of the event-stream body written (keep-alive comments not counted).
        comments: keep-alive comments written (``comment_every``).
        reset: the fake broke the connection with a TCP reset (``fail_after``, ``reset_at_byte``).
        held: the stream is waiting at ``hold_before`` for :meth:`FakeUpstream.release` now.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received: float = field(default_factory=time.monotonic)
    closed: float | None = None
    completed: bool = False
    events: int = 0
    sent: int = 0
    comments: int = 0
    reset: bool = False
    held: bool = False
    closed_event: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def json(self) -> Any:
        """The body parsed as JSON, or None."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class _Reset(ConnectionError):
    """The fake reset the connection on purpose: the response ends here."""


class _Connection(asyncio.Protocol):
    def __init__(self, server: FakeUpstream) -> None:
        self.server = server
        self.buffer = bytearray()
        self.arrived = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.lost = False
        self.current: UpstreamRequest | None = None
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self.task = asyncio.ensure_future(self.serve())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.arrived.set()

    def eof_received(self) -> bool | None:
        self.lost = True
        self.arrived.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        if self.current is not None and self.current.closed is None:
            self.current.closed = time.monotonic()
            self.current.closed_event.set()
        self.arrived.set()
        self.writable.set()
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    async def read_request(self) -> UpstreamRequest | None:
        while b"\r\n\r\n" not in self.buffer:
            if self.lost:
                return None
            self.arrived.clear()
            await self.arrived.wait()
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            if self.lost:
                return None
            self.arrived.clear()
            await self.arrived.wait()
            rest = bytes(self.buffer).partition(b"\r\n\r\n")[2]
        self.buffer = bytearray(rest[length:])
        return UpstreamRequest(method, path, headers, rest[:length])

    async def write(self, data: bytes) -> None:
        await self.writable.wait()
        if self.lost or self.transport is None:
            raise ConnectionResetError
        self.transport.write(data)

    async def serve(self) -> None:
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            while not self.lost:
                request = await self.read_request()
                if request is None:
                    return
                self.current = request
                self.server.requests.append(request)
                self.server.arrived.set()
                await self.respond(request)
                if request.headers.get("connection", "").lower() == "close":
                    assert self.transport is not None
                    self.transport.close()  # its closing time is this request's
                    return
                self.current = None

    async def respond(self, request: UpstreamRequest) -> None:
        if request.method == "GET" and request.path.rstrip("/").endswith("/models"):
            await self.simple(200, _MODELS)
            return
        try:
            model = self.server.model_for(request)
        except (TypeError, ValueError) as exc:
            await self.simple(400, {"error": {"message": str(exc), "type": "bad_fake_knob"}})
            return
        path = request.path.partition("?")[0]  # a query string (an API key, say) is no route
        if request.method != "POST" or not path.endswith("/chat/completions"):
            await self.simple(404, {"error": {"message": "not found", "type": "not_found"}})
            return
        plain_stall = model.stall_after is None and model.stall_mid_frame is None
        stall_first = model.stall if plain_stall else 0.0
        keep_alive_first = bool(stall_first and model.comment_every and not model.error_status)
        if stall_first and not keep_alive_first:
            await asyncio.sleep(min(stall_first, _FOREVER))
        if model.error_status:
            extra = f"Retry-After: {model.retry_after}\r\n" if model.retry_after else ""
            error = model.error_body
            if error is None:
                error = {"error": {"message": "fake upstream error", "type": "fake_error"}}
            await self.simple(model.error_status, error, extra)
            return
        await self.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: " + model.content_type.encode() + b"\r\n"
            + (f"Set-Cookie: {model.set_cookie}\r\n".encode() if model.set_cookie else b"")
            + b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        if keep_alive_first:
            await self.pause(request, model)
        await self.stream(request, model)

    async def stream(self, request: UpstreamRequest, model: FakeModel) -> None:
        """Write the body: the blocks of ``model.frames()``, with the faults applied on the way."""
        frames = model.frames()
        body = _BodyWriter(self, request, model, frames)
        for number, block in enumerate(frames):
            if model.fail_after is not None and number >= model.fail_after:
                await body.write(b"", flush=True)
                await self.reset(request)
                return
            if number == model.stall_after:
                await body.write(b"", flush=True)
                await self.pause(request, model)
            if number == model.hold_before and not self.server.released.is_set():
                await body.write(b"", flush=True)
                request.held = True
                try:
                    await self.server.released.wait()
                finally:
                    request.held = False
            if model.delay and number and not model.trickle:
                await asyncio.sleep(model.delay)
            if number == model.stall_mid_frame:
                half = len(block) // 2
                await body.write(block[:half], flush=True)
                await self.pause(request, model, comments=False)
                block = block[half:]
            await body.write(block)
        await body.write(b"", flush=True)
        if model.reset_at_byte is not None:
            await self.reset(request)  # the body was shorter than reset_at_byte
            return
        if model.long_line is not None or model.hold_after_done:
            await asyncio.get_running_loop().create_future()  # until the connection is lost
        await self.write(b"0\r\n\r\n")
        request.completed = True

    async def pause(
        self, request: UpstreamRequest, model: FakeModel, comments: bool = True
    ) -> None:
        """Go silent for ``model.stall`` seconds (with ``comments``, a keep-alive comment every
        ``model.comment_every`` seconds)."""
        every = model.comment_every if comments else None
        if not every:
            await asyncio.sleep(min(model.stall, _FOREVER))
            return
        loop = asyncio.get_running_loop()
        end = loop.time() + model.stall
        while (left := end - loop.time()) > 0:
            await asyncio.sleep(min(every, left, _FOREVER))
            if loop.time() < end:
                comment = model.comment()
                await self.write(b"%x\r\n%b\r\n" % (len(comment), comment))
                request.comments += 1

    async def simple(self, status: int, payload: Any, extra: str = "") -> None:
        raw = isinstance(payload, str)
        data = payload.encode() if raw else json.dumps(payload).encode()
        kind = "text/plain" if raw else "application/json"
        await self.write(
            f"HTTP/1.1 {status} Fake\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(data)}\r\n{extra}\r\n".encode()
            + data
        )

    async def reset(self, request: UpstreamRequest) -> None:
        """Break the connection with a TCP reset, after what was written has left."""
        assert self.transport is not None
        await self.writable.wait()
        await asyncio.sleep(0.05)
        request.reset = True
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class _BodyWriter:
    """Writes one response body as chunks: in ``trickle``-sized pieces cut from the whole body,
    and only up to ``reset_at_byte``, after which it resets the connection. Keeps the request's
    ``sent`` and ``events`` (blocks whose last byte is written) up to date."""

    def __init__(
        self,
        connection: _Connection,
        request: UpstreamRequest,
        model: FakeModel,
        frames: list[bytes],
    ) -> None:
        self.connection = connection
        self.request = request
        self.model = model
        self.ends = list(itertools.accumulate(len(frame) for frame in frames))
        self.pending = bytearray()  # less than a trickle piece, waiting for more

    async def write(self, data: bytes, flush: bool = False) -> None:
        """Write ``data``; with ``trickle``, a last piece shorter than that waits for the next
        call unless ``flush``.

        Raises:
            _Reset: the connection was reset at ``reset_at_byte``.
        """
        self.pending += data
        step = self.model.trickle or max(len(self.pending), 1)
        while len(self.pending) >= step or (flush and self.pending):
            piece = bytes(self.pending[:step])
            del self.pending[:step]
            if self.model.trickle and self.request.sent:
                await asyncio.sleep(self.model.delay)  # sleep(0) still lets the reader see it
            cut = self.model.reset_at_byte
            if cut is not None and self.request.sent + len(piece) >= cut:
                await self._chunk(piece[: max(cut - self.request.sent, 0)])
                await self.connection.reset(self.request)
                raise _Reset
            await self._chunk(piece)

    async def _chunk(self, piece: bytes) -> None:
        if piece:
            await self.connection.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.request.sent += len(piece)
            self.request.events = bisect.bisect_right(self.ends, self.request.sent)


def _chunk_event(delta: dict[str, Any], finish_reason: str | None, **extra: Any) -> bytes:
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        **extra,
    }
    data = json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode()
    return b"data: " + data + b"\n\n"


def _usage_event(tokens: int) -> bytes:
    usage = {**FAKE_USAGE, "completion_tokens": tokens}
    usage["total_tokens"] = usage["prompt_tokens"] + tokens
    chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
             "model": "fake-model", "choices": [], "usage": usage}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


_MODELS = {
    "object": "list",
    "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "sanic-streamplus"}],
}


def _padded_event(line_size: int) -> bytes:
    """A chunk with no content whose data line (``data: ...``, no line ending) is ``line_size``
    bytes, or as short as it can be."""
    bare = len(_chunk_event({}, None, x_padding="")) - 2
    return _chunk_event({}, None, x_padding="x" * max(line_size - bare, 0))


class FakeUpstream:
    """A fake OpenAI-compatible streaming upstream on 127.0.0.1 (see the module docstring).

    Use as ``async with FakeUpstream(tokens=5) as upstream: ... upstream.url ...``.

    Args:
        model: the default knobs; ``knobs`` (keyword arguments) override some of them.
        answer: a function of a request's parsed JSON body (any JSON value, or None) that
            returns the text to stream (the ``text`` knob), for requests that carry no
            ``"fake"`` knobs; it may raise ValueError (the request then gets a 400).

    Attributes:
        model: the default :class:`FakeModel` knobs.
        requests: every :class:`UpstreamRequest` seen, in arrival order.
        connections: the connections open now.
        released: set by :meth:`release`: streams no longer wait at ``hold_before``.
    """

    def __init__(
        self,
        model: FakeModel | None = None,
        *,
        answer: Callable[[Any], str] | None = None,
        **knobs: Any,
    ) -> None:
        self.model = (model or FakeModel()).override(knobs)
        self.answer = answer
        self.requests: list[UpstreamRequest] = []
        self.connections: set[_Connection] = set()
        self.arrived = asyncio.Event()
        self.released = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL of its OpenAI-compatible API, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeUpstream:
        """Listen on ``host``:``port`` (0: a free port)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
            for connection in list(self.connections):
                if connection.transport is not None:
                    connection.transport.abort()
            await self._server.wait_closed()
            self._server = None

    def model_for(self, request: UpstreamRequest) -> FakeModel:
        """The knobs ``request`` was answered with: :attr:`model`, its body's ``"fake"``
        object applied, and ``usage`` when it asked for ``stream_options.include_usage``.

        Raises:
            ValueError, TypeError: a knob of the body is out of range or unknown in type.
        """
        body = request.json
        if not isinstance(body, dict):
            return self.model
        model = self.model.override(body.get("fake"))
        if body.get("fake") is None and self.answer is not None:
            model = replace(model, text=self.answer(body))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            model = replace(model, usage=True)
        return model

    def release(self) -> None:
        """Let every stream waiting at ``hold_before`` go on, and any later one pass it
        without waiting."""
        self.released.set()

    async def wait_requests(self, count: int, timeout: float) -> UpstreamRequest:
        """Wait up to ``timeout`` seconds until ``count`` requests have arrived; return the last.

        Raises:
            TimeoutError: fewer than ``count`` requests arrived in time.
        """
        async def arrivals() -> None:
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()

        try:
            await asyncio.wait_for(arrivals(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{len(self.requests)} of {count} requests arrived") from None
        return self.requests[-1]

    async def wait_closed(self, request: UpstreamRequest, timeout: float) -> float | None:
        """Wait up to ``timeout`` seconds for ``request``'s connection to close; return the
        ``time.monotonic()`` at which it closed, or None if it is still open."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(request.closed_event.wait(), timeout)
        return request.closed

    async def __aenter__(self) -> FakeUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


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
    """An incremental HTTP/1.1 response parser: status line, headers, then a chunked body, a
    Content-Length body, or a body that runs until the connection closes."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.state = "head"  # head, size, data, data_end, trailers, length, until_close, done
        self.status = 0
        self.headers: dict[str, str] = {}
        self.left = 0  # bytes left in the current chunk, or of the Content-Length
        self.chunks = 0

    def feed(self, data: bytes) -> bytes:
        """Take the next bytes read; return the body bytes they complete.

        Raises:
            ValueError: the response is not well-formed HTTP/1.1.
        """
        self.buffer += data
        body = bytearray()
        while True:
            if self.state == "head":
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return bytes(body)
                self._head(bytes(self.buffer[:end]))
                del self.buffer[: end + 4]
            elif self.state in ("size", "trailers"):
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return bytes(body)
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                if self.state == "trailers":
                    self.state = "trailers" if line else "done"
                    continue
                self.left = int(line.split(b";")[0], 16)
                self.state = "data" if self.left else "trailers"
                self.chunks += bool(self.left)
            elif self.state in ("data", "length"):
                take = self.buffer[: self.left]
                body += take
                del self.buffer[: len(take)]
                self.left -= len(take)
                if self.left:
                    return bytes(body)
                self.state = "data_end" if self.state == "data" else "done"
            elif self.state == "data_end":
                if len(self.buffer) < 2:
                    return bytes(body)
                if self.buffer[:2] != b"\r\n":
                    raise ValueError("a chunk of the body does not end with CRLF")
                del self.buffer[:2]
                self.state = "size"
            elif self.state == "until_close":
                body += self.buffer
                self.buffer.clear()
                return bytes(body)
            else:  # done: anything more is not part of this response
                return bytes(body)

    def _head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            raise ValueError(f"not an HTTP/1.1 status line: {lines[0]!r}")
        self.status = int(rest[:3])
        if 100 <= self.status < 200:
            return  # an interim answer: the real one follows
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if self.status in (204, 304):
            self.state = "done"
        elif "chunked" in self.headers.get("transfer-encoding", "").lower():
            self.state = "size"
        elif "content-length" in self.headers:
            self.left = int(self.headers["content-length"])
            self.state = "length" if self.left else "done"
        else:
            self.state = "until_close"


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
    request = f"POST {path} HTTP/1.1\r\n".encode() + b"".join(
        f"{name}: {value}\r\n".encode("latin-1") for name, value in head.items()
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout
    result = StreamResult()
    reader = _ResponseReader()
    decoder = SSEDecoder()
    body = bytearray()
    with await _connect(host, port, recv_buffer, request + b"\r\n" + content, timeout) as sock:
        while reader.state != "done":
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
                result.end = "complete" if reader.state == "until_close" else "closed"
                break
            part = reader.feed(data)
            body += part
            if part and reader.headers.get("content-type", "").startswith("text/event-stream"):
                events = decoder.feed(part)
                result.events += events
                result.event_times += [loop.time() - started] * len(events)
            if reader.state == "done":
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
        if reader.state == "done":
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
