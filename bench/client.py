"""The benchmark's load client: one POST stream over a raw socket, timed and verified.

Every stream is checked when it ends: status 200, a complete HTTP body, the token sequence numbers
``t0 … t<n-1>`` all present and in order, and the stream's own end (``data: [DONE]`` exactly once
and last for pass-through routes, an ``event: done`` last for the transform route). A peer that
loses, reorders or mangles an event fails verification and is flagged, not timed.

Timing uses ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process of the machine),
so the latency of a paced event is its arrival time minus the upstream's send stamp.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

_SEQ = re.compile(rb'"(?:content|text)": ?"t(\d+)')
_COMMENT = re.compile(rb"(?m)^:[^\n]*\n")
_BLANKS = re.compile(rb"\n{3,}")
_STAMP = re.compile(rb"@(\d+\.\d+)[^\r\n]*\r?\n\r?\n")


@dataclass
class Result:
    """What one stream did. Times are seconds (``time.monotonic()``)."""

    ok: bool = False
    error: str = ""
    status: int = 0
    sent_at: float = 0.0
    first_byte_at: float | None = None
    ended_at: float | None = None
    events: int = 0
    bytes: int = 0
    latencies: list[float] = field(default_factory=list)
    disconnected_at: float | None = None

    @property
    def ttfb(self) -> float | None:
        return None if self.first_byte_at is None else self.first_byte_at - self.sent_at


class _Dechunker:
    """Incremental HTTP/1.1 chunked body decoder."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.body = bytearray()
        self.done = False

    def feed(self, data: bytes) -> None:
        raw = self.raw
        raw += data
        pos = 0
        while not self.done:
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(raw[pos:eol].split(b";")[0], 16)
            if size == 0:
                if raw.find(b"\r\n", eol + 2) < 0:
                    break
                self.done = True
                pos = len(raw)
                break
            end = eol + 2 + size
            if len(raw) < end + 2:
                break
            self.body += raw[eol + 2 : end]
            pos = end + 2
        del raw[:pos]


def request_bytes(port: int, path: str, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def payload(knobs: dict[str, Any]) -> dict[str, Any]:
    """A chat-completions request body carrying the upstream's knobs."""
    return {
        "model": "bench",
        "stream": True,
        "messages": [{"role": "user", "content": "benchmark"}],
        "fake": knobs,
    }


async def stream(
    port: int,
    path: str,
    knobs: dict[str, Any],
    *,
    transform: bool = False,
    stamps: bool = False,
    read_size: int = 65536,
    read_pause: float = 0.0,
    disconnect_after: int | None = None,
    hold: Callable[[], Awaitable[Any]] | None = None,
) -> Result:
    """POST one stream to 127.0.0.1:``port`` ``path`` and read it to its end.

    Args:
        knobs: the upstream's ``fake`` knobs: ``events``, ``interval``, ``size``, ``hold``,
            ``tag``.
        transform: verify the transform route's output (``event: token``, then ``event: done``).
        stamps: record the latency of each paced event (arrival minus upstream send stamp).
        read_size, read_pause: read at most ``read_size`` bytes, then sleep ``read_pause``
            seconds: a slow client.
        disconnect_after: close the connection once this many events arrived (no verification).
        hold: after the first event, await this, then close (an idle stream; no verification).
    """
    result = Result()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    except OSError as exc:
        result.error = f"connect: {exc}"
        return result
    try:
        result.sent_at = time.monotonic()
        writer.write(request_bytes(port, path, payload(knobs)))
        head = await reader.readuntil(b"\r\n\r\n")
        result.status = int(head.split(b" ", 2)[1])
        headers = head.lower()
        chunked = b"transfer-encoding: chunked" in headers
        length_match = re.search(rb"content-length: *(\d+)", headers)
        length = int(length_match.group(1)) if length_match else None
        decoder = _Dechunker()
        body = decoder.body if chunked else bytearray()
        scanned = 0
        while True:
            data = await reader.read(read_size)
            now = time.monotonic()
            if not data:
                break
            if result.first_byte_at is None:
                result.first_byte_at = now
            result.bytes += len(data)
            if chunked:
                decoder.feed(data)
            else:
                body += data
            if stamps:
                for match in _STAMP.finditer(body, scanned):
                    result.latencies.append(now - float(match.group(1)))
                    scanned = match.end()
            if disconnect_after is not None and events_in(body) >= disconnect_after:
                result.disconnected_at = time.monotonic()
                result.ok = True
                return result
            if hold is not None and events_in(body):
                await hold()
                result.ok = True
                return result
            if (chunked and decoder.done) or (length is not None and len(body) >= length):
                break
            if read_pause:
                await asyncio.sleep(read_pause)
        result.ended_at = time.monotonic()
        if result.status != 200:
            result.error = f"status {result.status}: {bytes(body[:200])!r}"
            return result
        if chunked and not decoder.done:
            result.error = "body ended before the chunked terminator"
            return result
        result.error = verify(bytes(body), int(knobs.get("events", 0)), transform)
        result.events = int(knobs.get("events", 0)) if not result.error else 0
        result.ok = not result.error
        return result
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        writer.close()


def events_in(body: bytes | bytearray) -> int:
    """Blank lines so far (LF or CRLF line endings)."""
    return body.count(b"\n\n") + body.count(b"\r\n\r\n")


def verify(body: bytes, events: int, transform: bool) -> str:
    """Check one whole stream body; return "" when it is right, else what is wrong."""
    # heartbeats may come anywhere; a comment-only block leaves its blank line behind
    text = _BLANKS.sub(b"\n\n", _COMMENT.sub(b"", body.replace(b"\r\n", b"\n")))
    seqs = [int(seq) for seq in _SEQ.findall(text)]
    if seqs != list(range(events)):
        missing = len(set(range(events)) - set(seqs))
        return f"token sequence wrong: {len(seqs)} tokens, {missing} missing, expected {events}"
    if transform:
        last = text.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        if not last.startswith(b"event: done\n"):
            return f"does not end with event: done (ends {text[-80:]!r})"
    else:
        if text.count(b"[DONE]") != 1 or not text.endswith(b"data: [DONE]\n\n"):
            return f"[DONE] not exactly once and last (ends {text[-80:]!r})"
    return ""


async def get_json(port: int, path: str) -> Any:
    """A small GET to the bench upstream (``/stats``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: *(\d+)", head.lower()).group(1))  # type: ignore[union-attr]
        return json.loads(await reader.readexactly(length))
    finally:
        writer.close()
