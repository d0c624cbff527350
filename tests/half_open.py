"""A client that vanishes without a FIN, for ``test_half_open.py``; run in its own network
namespace (``unshare -n``), as root, so that its traffic control touches no other test.

The proxy, the fake upstream and the client all talk on this namespace's 127.0.0.1. Once the
client has its first events, every packet to or from the client's port is dropped (``tc``): to the
proxy the client is simply gone, as when a phone leaves coverage. Prints one JSON line: seconds
from the drop until the proxy logged the stream's end, its outcome, and whether the upstream
connection was closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from chat_proxy import create_app

from sanic_streamplus.testing import FakeUpstream, serve_app

SEND_TIMEOUT = 2.0  # seconds


class Ends(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.outcomes: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "outcome=" in message:
            self.outcomes.append((time.monotonic(), message.split("outcome=")[1].split()[0]))


def tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True)


async def main() -> dict[str, Any]:
    ends = Ends()
    logging.getLogger("sanic_streamplus").addHandler(ends)
    logging.getLogger("sanic_streamplus").setLevel(logging.INFO)
    async with FakeUpstream(tokens=100_000, delay=0.05) as upstream:
        app = create_app(upstream.url, name="half_open", heartbeat=0.5)
        app.config.STREAMPLUS_SEND_TIMEOUT = SEND_TIMEOUT
        async with serve_app(app) as url:
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
            writer.write(
                b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
            )
            seen = b""
            while seen.count(b"event: token") < 3:
                seen += await asyncio.wait_for(reader.read(65536), 5)
            client_port = str(writer.get_extra_info("sockname")[1])
            # a class that sends 8 bits a second: what enters it never arrives
            tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb")
            tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", "rate", "8bit")
            for direction in ("sport", "dport"):
                tc(
                    "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
                    "u32", "match", "ip", direction, client_port, "0xffff", "flowid", "1:1",
                )  # fmt: skip
            dropped = time.monotonic()
            record = upstream.requests[-1]
            closed = await upstream.wait_closed(record, SEND_TIMEOUT * 10)
            for _ in range(100):
                if ends.outcomes:
                    break
                await asyncio.sleep(0.05)
            writer.transport.abort()
    ended, outcome = ends.outcomes[0] if ends.outcomes else (None, None)
    return {
        "outcome": outcome,
        "ended_after": None if ended is None else ended - dropped,
        "upstream_closed_after": None if closed is None else closed - dropped,
    }


if __name__ == "__main__":
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # a new namespace's lo is down
    print(json.dumps(asyncio.run(main())))
