"""The benchmark's upstream: an OpenAI-style event stream fast enough never to be the bottleneck.

    python bench/upstream.py --port PORT

A plain asyncio HTTP/1.1 server (uvloop) on 127.0.0.1. ``POST .../chat/completions`` answers a
chunked ``text/event-stream`` of ``chat.completion.chunk`` events whose content is ``t<seq> ``
(``t<seq>@<send time> `` when paced), then ``data: [DONE]``. The JSON body's ``"fake"`` object
(the same key as the test kit's ``FakeUpstream`` knobs, which the example's ``/chat`` route
forwards) chooses the stream:

- ``events`` (int): how many events before ``[DONE]``;
- ``interval`` (s, 0 = as fast as the socket takes them): pause between events; a paced event is
  one write, stamped with ``time.monotonic()`` when it is written (CLOCK_MONOTONIC is one clock
  for every process of the machine, so a client can subtract);
- ``size`` (bytes): pad each event's content to about this size;
- ``hold`` (bool): after the events, keep the connection open and silent instead of ending;
- ``tag`` (str): a name under which the connection's close time is recorded.

Unpaced streams are written in 64 KB chunks, built once per shape and cached, with the transport's
flow control (``pause_writing``): the cost per event is a fraction of a microsecond.
``GET /stats`` answers ``{"open": streams in flight, "closed": {tag: monotonic close time}}``;
``POST /reset`` forgets the recorded tags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_DONE = b"data: [DONE]\n\n"
_CHUNK = 65536


def event(seq: int, pad: str = "", stamp: float | None = None) -> bytes:
    """One ``chat.completion.chunk`` event, content ``t<seq>[@<stamp>]<pad> ``."""
    content = f"t{seq}" if stamp is None else f"t{seq}@{stamp:.6f}"
    return (
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,'
        b'"model":"bench","choices":[{"index":0,"delta":{"content":"'
        + f"{content}{pad} ".encode()
        + b'"},"finish_reason":null}]}\n\n'
    )


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


_bodies: dict[tuple[int, int], list[bytes]] = {}


def body_chunks(events: int, size: int) -> list[bytes]:
    """The whole unpaced body for a shape, as HTTP chunks of about 64 KB (cached)."""
    key = (events, size)
    if key not in _bodies:
        pad = "x" * max(0, size - 150)
        out: list[bytes] = []
        part: list[bytes] = []
        length = 0
        for seq in range(events):
            data = event(seq, pad)
            part.append(data)
            length += len(data)
            if length >= _CHUNK:
                out.append(chunked(b"".join(part)))
                part, length = [], 0
        part.append(_DONE)
        out.append(chunked(b"".join(part)))
        _bodies[key] = out
    return _bodies[key]


class Stats:
    def __init__(self) -> None:
        self.open = 0
        self.closed: dict[str, float] = {}


class Connection(asyncio.Protocol):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.arrived = asyncio.Event()
        self.tag: str | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server = asyncio.ensure_future(self.serve())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tag is not None:
            self.stats.closed[self.tag] = time.monotonic()
        if self.streaming:
            self.stats.open -= 1
            self.streaming = False
        self.can_write.set()
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    async def read_request(self) -> tuple[str, str, bytes] | None:
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
                length = 0
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if len(self.buffer) >= end + 4 + length:
                    body = bytes(self.buffer[end + 4 : end + 4 + length])
                    del self.buffer[: end + 4 + length]
                    method, path = head[0].split(" ")[:2]
                    return method, path, body
            if self.lost.done():
                return None
            self.arrived.clear()
            waiter = asyncio.ensure_future(self.arrived.wait())
            await asyncio.wait([waiter, self.lost], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def write(self, data: bytes) -> bool:
        assert self.transport is not None
        if self.lost.done():
            return False
        self.transport.write(data)
        if not self.can_write.is_set():
            await self.can_write.wait()
        return not self.lost.done()

    async def serve(self) -> None:
        assert self.transport is not None
        while (request := await self.read_request()) is not None:
            method, path, body = request
            if path.startswith("/stats"):
                payload = json.dumps({"open": self.stats.open, "closed": self.stats.closed})
                self.answer(payload.encode())
            elif path.startswith("/reset"):
                self.stats.closed.clear()
                self.answer(b"{}")
            elif method == "POST" and path.endswith("/chat/completions"):
                if not await self.stream(json.loads(body or b"{}").get("fake") or {}):
                    return
            else:
                self.answer(b'{"error": "not found"}', b"404 Not Found")

    def answer(self, payload: bytes, status: bytes = b"200 OK") -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
            % (status, len(payload), payload)
        )

    async def stream(self, knobs: dict[str, Any]) -> bool:
        """Write one stream; False when the connection is gone or held."""
        events, interval = int(knobs.get("events", 100)), float(knobs.get("interval", 0))
        size, hold = int(knobs.get("size", 0)), bool(knobs.get("hold", False))
        self.tag = knobs.get("tag")
        self.streaming = True
        self.stats.open += 1
        if not await self.write(_HEAD):
            return False
        if interval > 0 or hold:
            pad = "x" * max(0, size - 170)
            loop = asyncio.get_running_loop()
            next_at = loop.time()
            for seq in range(events):
                if not await self.write(chunked(event(seq, pad, time.monotonic()))):
                    return False
                next_at += interval
                delay = next_at - loop.time()
                if delay > 0:
                    await asyncio.wait([self.lost], timeout=delay)
            if hold:
                await self.lost
                return False
            if not await self.write(chunked(_DONE)):
                return False
        else:
            for data in body_chunks(events, size):
                if not await self.write(data):
                    return False
        if not await self.write(b"0\r\n\r\n"):
            return False
        self.streaming = False
        self.stats.open -= 1
        self.tag = None
        return True


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    server = await loop.create_server(
        lambda: Connection(stats), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.port))
    except ImportError:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
