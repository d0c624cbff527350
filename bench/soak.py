"""A bounded soak: many streams through the example proxy, with random client and upstream faults.

    .venv/bin/python bench/soak.py [--streams 1000] [--concurrency 50] [--seconds 60] [--seed 1]
        [--json PATH]

Starts two processes on free 127.0.0.1 ports: the test kit's ``FakeUpstream``
(``sanic_streamplus.testing``), wrapped by this script with a small control endpoint, and the
example proxy ``examples/chat_proxy.py`` pointed at it, with short timeouts. Then, after a warm-up
of 50 streams, it starts ``--streams`` streams spread over ``--seconds`` (at most
``--concurrency`` at once), each with a seeded random plan: a normal stream (some with CR or CRLF
line endings, a BOM, invalid UTF-8, U+2028, an id-only block or a body written a few bytes at a
time), a client that leaves after k events or before the first, a client that stops reading, an
upstream reset (after k events, or at an arbitrary byte), an upstream error status or a body that
is not an event stream, an upstream stall before the first event or mid-stream (some with
keep-alive comments, some in the middle of a frame), an event or line over the proxy's limits.
Half the streams use the proxy's OpenAI pass-through route, half its ``/chat`` route.

Every stream is checked against what its plan expects, over a raw socket, body included:

- **completed**: status 200, the whole token sequence in order, the route's end (``[DONE]`` once
  and last; ``event: done`` with the right token count), the chunked terminator;
- **failed as expected**: the plan's error (HTTP status and JSON ``type`` before the commit point;
  after it, an error frame of that type, then ``[DONE]`` for the OpenAI route, then the
  terminator) after exactly the tokens the upstream completed before the fault; or, for a client
  that leaves, the tokens it read were right and the upstream stream was closed before its end;
- **lost**: anything else (a stream past its time bound, a body cut without an error frame, a
  wrong token, the wrong error, an upstream left streaming for a client that is gone).

Timeouts are matched by phase: ``first_event_timeout`` or ``idle_timeout`` (the older
``upstream_timeout`` is accepted for either). At the end (after up to 5 s to settle) the upstream
reports the streams it is still serving (must be 0) and the connections open (idle ones in the
proxy's keep-alive pool); after the proxy is stopped, the connections still open (must be 0).
The proxy's RSS (``VmRSS``) is read after the warm-up, each second of the soak, and at the end.
Figures go out as Markdown tables (``--json PATH`` for a file). The exit status is 1 when a stream
was lost or an upstream stream or connection was left open.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from run import wait_port  # bench/run.py: this folder is on sys.path when run as a script

from sanic_streamplus.sse import ServerSentEvent, SSEDecoder
from sanic_streamplus.testing import FakeModel, FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SCRIPT = str(Path(__file__).resolve())
CHAT, OPENAI = "/chat", "/v1/chat/completions"

# the proxy's limits for the soak (seconds, bytes); stalls last well past the timeouts. A first
# event timeout shorter than the heartbeat gives 504s before the commit point; an idle timeout
# longer than it gives heartbeats, then error frames after the commit point.
FIRST_EVENT_TIMEOUT = 0.6
HEARTBEAT = 0.75
IDLE_TIMEOUT = 1.0
SEND_TIMEOUT = 1.5
MAX_LINE_LENGTH = 64 * 1024
MAX_EVENT_SIZE = 128 * 1024
STALL = 4.0
STUCK = 3 * SEND_TIMEOUT  # seconds a stuck client reads nothing, then it reads what is left
STREAM_BOUND = 15.0  # seconds one stream may take before it counts as hung
TIMEOUT_TYPES = {"first_event": {"first_event_timeout", "upstream_timeout"}}
TIMEOUT_TYPES["idle"] = {"idle_timeout", "upstream_timeout"}
TOO_LARGE = {"event_too_large", "line_too_long"}

# kind of plan: weight
KINDS: dict[str, int] = {
    "normal": 24,
    "variant": 14,
    "hold_after_done": 5,
    "keepalive_first": 4,
    "client_disconnect": 12,
    "client_gone_early": 3,
    "stuck_client": 2,
    "upstream_reset": 12,
    "error_status": 7,
    "bad_content_type": 2,
    "first_event_stall": 5,
    "idle_stall": 7,
    "too_large": 3,
}
CLASSES = ("completed", "failed as expected", "lost")


# --- plans ------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one stream does, and what it must get.

    Attributes:
        number: the stream's number (negative for the warm-up), sent upstream as ``soak_id``.
        kind: a key of ``KINDS``; route: ``CHAT`` or ``OPENAI``; knobs: the fake upstream's.
        expect: ``"complete"``, ``"error"`` or ``"leave"`` (the client leaves on purpose).
        errors: the error types accepted; statuses: the HTTP statuses accepted before the
            commit point (an error frame after it is accepted too, where events may precede it).
        tokens: the token texts of a complete stream; before: how many the client must get
            before the error (None: any correct prefix).
        events_before: upstream events completed before the fault (0: no commit is forced).
        disconnect_after: the client closes after this many events (``rst``: with a reset).
        leave_after: the client closes this many seconds after sending, whatever arrived.
        stop_reading_after: the client stops reading after this many events (a stuck client).
        upstream_must_close: the upstream stream must end closed before its end, not complete.
    """

    number: int
    kind: str
    route: str
    knobs: dict[str, Any]
    expect: str = "complete"
    errors: frozenset[str] = frozenset()
    statuses: frozenset[int] = frozenset()
    tokens: list[str] = field(default_factory=list)
    before: int | None = None
    events_before: int = 0
    disconnect_after: int | None = None
    rst: bool = False
    leave_after: float | None = None
    stop_reading_after: int | None = None
    upstream_must_close: bool = False


def content_of(event: ServerSentEvent) -> str | None:
    """The text of an OpenAI ``chat.completion.chunk`` event, or None."""
    try:
        chunk = json.loads(event.data)
        return chunk["choices"][0]["delta"].get("content") or None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def dispatched(prefix: bytes) -> list[ServerSentEvent]:
    """The events a decoder dispatches from the first bytes of an upstream body."""
    return SSEDecoder(max_event_size=1 << 30, max_line_length=1 << 30).feed(prefix)


def make_plan(number: int, rng: random.Random) -> Plan:
    """A random plan, and what it must get."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    route = rng.choice([CHAT, OPENAI])
    knobs: dict[str, Any] = {
        "soak_id": number,
        "tokens": rng.randint(10, 40),
        "delay": rng.uniform(0.01, 0.05),
    }
    plan = Plan(number, kind, route, knobs)
    if kind == "variant":
        variant = rng.choice(
            ["crlf", "cr", "bom", "malformed_utf8", "u2028", "id_only_block", "trickle"]
        )
        if variant in ("crlf", "cr"):
            knobs["line_ending"] = variant
        elif variant == "trickle":
            knobs["trickle"] = rng.randint(8, 64)
            knobs["delay"] = rng.uniform(0.0, 0.001)
        else:
            knobs[variant] = True
        if rng.random() < 0.3:  # a second one on top
            knobs["line_ending"] = rng.choice(["lf", "crlf", "cr"])
            knobs["bom"] = rng.random() < 0.5
    elif kind == "hold_after_done":
        knobs["hold_after_done"] = True
        plan.upstream_must_close = True
    elif kind == "keepalive_first":
        knobs.update(stall=FIRST_EVENT_TIMEOUT * 0.5, comment_every=0.1)
    elif kind == "client_disconnect":
        knobs.update(tokens=40, delay=rng.uniform(0.03, 0.06))
        knobs["hold_after_done"] = rng.random() < 0.5
        plan.expect, plan.disconnect_after = "leave", rng.randint(1, 5)
        plan.rst = rng.random() < 0.3
        plan.upstream_must_close = True
    elif kind == "client_gone_early":
        knobs["stall"] = STALL
        plan.expect, plan.leave_after = "leave", rng.uniform(0.1, FIRST_EVENT_TIMEOUT * 0.8)
        plan.upstream_must_close = True
    elif kind == "stuck_client":
        # 20 MB, more than every buffer on the way, and no end: the proxy must cut the client
        knobs.update(tokens=600, token_size=32768, delay=0.0, hold_after_done=True)
        plan.expect, plan.stop_reading_after = "error", rng.randint(1, 3)
        plan.errors = frozenset({"send_timeout"})
        plan.upstream_must_close = True
    elif kind == "error_status":
        status = rng.choice([400, 401, 404, 429, 500, 502, 503])
        knobs["error_status"] = status
        if status == 429:
            knobs["retry_after"] = "7"
        plan.expect = "error"
        plan.errors = frozenset({"rate_limited" if status == 429 else "upstream_status"})
        plan.statuses = frozenset({429 if status == 429 else 502})
    elif kind == "bad_content_type":
        knobs["content_type"] = rng.choice(["application/json", "text/plain"])
        plan.expect, plan.errors, plan.statuses = (
            "error",
            frozenset({"upstream_bad_response"}),
            frozenset({502}),
        )
    elif kind == "first_event_stall":
        knobs["stall"] = STALL
        if rng.random() < 0.5:
            knobs["comment_every"] = 0.2  # the headers go out; comments are not events
        plan.expect, plan.errors, plan.statuses = (
            "error",
            frozenset(TIMEOUT_TYPES["first_event"]),
            frozenset({504}),
        )
        plan.upstream_must_close = True
    model = FakeModel().override(knobs)
    frames = model.frames()
    plan.tokens = model.expected_tokens()
    if kind == "upstream_reset":
        plan.expect, plan.errors, plan.statuses = (
            "error",
            frozenset({"upstream_disconnected"}),
            frozenset({502}),
        )
        body = b"".join(frames)
        if rng.random() < 0.5:
            knobs["fail_after"] = rng.randint(0, len(frames) - 1)
            prefix = b"".join(frames[: knobs["fail_after"]])
        else:
            knobs["reset_at_byte"] = rng.randint(0, len(body) - 1)
            prefix = body[: knobs["reset_at_byte"]]
        plan.before, plan.events_before = _before(prefix)
    elif kind == "idle_stall":
        at = rng.randint(1, len(frames) - 2)
        knobs["stall"] = STALL
        if rng.random() < 0.5:
            knobs["stall_mid_frame"] = at
        else:
            knobs["stall_after"] = at
            if rng.random() < 0.5:
                knobs["comment_every"] = 0.2
        plan.expect, plan.errors, plan.statuses = (
            "error",
            frozenset(TIMEOUT_TYPES["idle"]),
            frozenset({504}),
        )
        plan.before, plan.events_before = _before(b"".join(frames[:at]))
        plan.upstream_must_close = True
    elif kind == "too_large":
        if rng.random() < 0.5:
            knobs["long_line"] = rng.randint(MAX_LINE_LENGTH + 1, 2 * MAX_LINE_LENGTH)
        else:
            knobs["oversized_event"] = rng.randint(MAX_LINE_LENGTH + 1, 2 * MAX_EVENT_SIZE)
        plan.expect, plan.errors, plan.statuses = "error", frozenset(TOO_LARGE), frozenset({502})
        plan.before, plan.events_before = _before(b"".join(frames[:2]))  # role, first token
        plan.upstream_must_close = "long_line" in knobs  # it never ends the body itself
    elif plan.expect == "error" and kind not in ("stuck_client",):
        plan.before = 0
    if route == CHAT:
        plan.events_before = plan.before or 0  # the /chat route's events are its tokens
    return plan


def _before(prefix: bytes) -> tuple[int, int]:
    """(tokens, events) the upstream completed in ``prefix``."""
    events = dispatched(prefix)
    return sum(content_of(event) is not None for event in events), len(events)


# --- one stream -------------------------------------------------------------------------------


@dataclass
class Seen:
    """What the client got."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    events: list[ServerSentEvent] = field(default_factory=list)
    body: bytes = b""
    end: str = "open"  # complete, closed, reset, left, hung
    seconds: float = 0.0


def request_bytes(port: int, plan: Plan) -> bytes:
    messages = [{"role": "user", "content": "soak"}]
    if plan.route == CHAT:
        payload: dict[str, Any] = {"messages": messages, "fake": plan.knobs}
    else:
        payload = {"model": "soak", "stream": True, "messages": messages, "fake": plan.knobs}
    body = json.dumps(payload).encode()
    return (
        f"POST {plan.route} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


async def run_stream(port: int, plan: Plan) -> Seen:
    """Send ``plan``'s request and read the response as the plan says."""
    seen = Seen()
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    if plan.stop_reading_after is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer: asyncio.StreamWriter | None = None
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        limit = 1 << 16 if plan.stop_reading_after is not None else 1 << 20
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        writer.write(request_bytes(port, plan))
        if plan.leave_after is not None:
            await asyncio.sleep(plan.leave_after)
            seen.end = "left"
            return seen
        await read_response(reader, writer, plan, seen)
    except asyncio.IncompleteReadError:
        seen.end = "closed"
    except ConnectionResetError:
        seen.end = "reset"
    except OSError as exc:
        seen.end = f"error: {exc}"
    finally:
        seen.seconds = time.monotonic() - started
        if writer is not None:
            if plan.rst and seen.end == "left":
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
        else:
            sock.close()
    return seen


async def read_response(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, plan: Plan, seen: Seen
) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    seen.status = int(lines[0].split(" ", 2)[1])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            seen.headers[name.strip().lower()] = value.strip()
    body = bytearray()
    if "chunked" not in seen.headers.get("transfer-encoding", ""):
        body += await reader.readexactly(int(seen.headers.get("content-length", "0")))
        seen.body, seen.end = bytes(body), "complete"
        return
    decoder = SSEDecoder(max_event_size=1 << 30, max_line_length=1 << 30)
    stop_after = plan.stop_reading_after
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            seen.end = "complete"
            break
        chunk = (await reader.readexactly(size + 2))[:-2]
        body += chunk
        seen.events += decoder.feed(chunk)
        if plan.disconnect_after is not None and len(seen.events) >= plan.disconnect_after:
            seen.end = "left"
            break
        if stop_after is not None and len(seen.events) >= stop_after:
            stop_after = None
            await asyncio.sleep(STUCK)  # the transport stops reading once its buffer is full
    seen.body = bytes(body)


# --- classification -------------------------------------------------------------------------


def parse(plan: Plan, events: list[ServerSentEvent]) -> tuple[list[str], str | None, bool, str]:
    """(tokens, error type, end marker seen, what is wrong in the order of events or "")."""
    try:
        return _parse(plan, events)
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        return [], None, False, f"malformed event: {type(exc).__name__}: {exc}"


def _parse(plan: Plan, events: list[ServerSentEvent]) -> tuple[list[str], str | None, bool, str]:
    tokens: list[str] = []
    error: str | None = None
    ended = False
    for number, event in enumerate(events):
        if ended:
            return tokens, error, ended, f"event {number} after the end: {event.data[:80]!r}"
        if plan.route == CHAT:
            try:
                value = json.loads(event.data)
            except ValueError:
                return tokens, error, ended, f"not JSON: {event.data[:80]!r}"
            if event.event == "token" and error is None:
                tokens.append(value["text"])
            elif event.event == "done" and error is None:
                if value.get("tokens") != len(tokens):
                    return tokens, error, ended, f"done says {value.get('tokens')} tokens"
                ended = True
            elif event.event == "error" and error is None:
                error, ended = value["error"]["type"], True
            else:
                return tokens, error, ended, f"unexpected event {event.event!r}"
        elif event.data == "[DONE]":
            ended = True
        elif error is not None:
            return tokens, error, ended, "an event between the error frame and [DONE]"
        else:
            try:
                value = json.loads(event.data)
            except ValueError:
                return tokens, error, ended, f"not JSON: {event.data[:80]!r}"
            if isinstance(value, dict) and "error" in value:
                error = value["error"]["type"]
            elif (text := content_of(event)) is not None:
                tokens.append(text)
    return tokens, error, ended, ""


def classify(plan: Plan, seen: Seen, upstream: dict[str, Any] | None) -> tuple[str, str]:
    """(class, why) for one stream; for a stream not lost, "why" says how it ended."""
    if seen.end in ("hung", "not started"):
        return "lost", f"{seen.end}: no end within {STREAM_BOUND:g} s, or the bound passed"
    if plan.upstream_must_close:
        if upstream is None:
            return "lost", "the upstream never saw the request"
        if upstream["completed"] or not upstream["closed"]:
            return "lost", f"the upstream stream was not closed before its end: {upstream}"
    if plan.expect == "leave":
        tokens, _, _, wrong = parse(plan, seen.events)
        if seen.end != "left":
            return "lost", f"ended {seen.end} before the client left"
        if wrong or tokens != plan.tokens[: len(tokens)]:
            return "lost", wrong or "wrong tokens before leaving"
        return "failed as expected", "the client left"
    if seen.status != 200:
        error = _json_error(seen.body)
        if plan.expect != "error":
            return "lost", f"status {seen.status}: {seen.body[:200]!r}"
        if seen.end != "complete":
            return "lost", f"status {seen.status}, body {seen.end}"
        if seen.status not in plan.statuses or error not in plan.errors:
            return "lost", f"status {seen.status} {error!r}, expected {sorted(plan.errors)}"
        if plan.events_before:
            return "lost", f"an error status after {plan.events_before} events were due"
        if plan.kind == "error_status" and error == "rate_limited":
            if seen.headers.get("retry-after") != "7":
                return "lost", f"Retry-After {seen.headers.get('retry-after')!r}"
        return "failed as expected", f"HTTP {seen.status} {error}"
    tokens, error, ended, wrong = parse(plan, seen.events)
    if wrong:
        return "lost", wrong
    if plan.expect == "complete":
        if seen.end != "complete" or not ended or error is not None:
            return "lost", f"end {seen.end}, end marker {ended}, error {error!r}"
        if len(tokens) != len(plan.tokens):
            return "lost", f"{len(tokens)} tokens, {len(plan.tokens)} expected"
        if tokens != plan.tokens:
            return "lost", "wrong tokens"
        return "completed", ""
    if tokens != plan.tokens[: len(tokens)]:
        return "lost", "wrong tokens before the error"
    if plan.kind == "stuck_client":  # cut: with or without its frame and terminator
        if len(tokens) == len(plan.tokens) and ended:
            return "lost", "a client that stopped reading was never cut"
        if error is not None and error not in plan.errors:
            return "lost", f"error {error!r}"
        return "failed as expected", f"cut: frame {error or 'none'}, body {seen.end}"
    if seen.end != "complete" or error is None or not ended:
        return "lost", f"end {seen.end}, error frame {error!r}, end marker {ended}"
    if error not in plan.errors:
        return "lost", f"error {error!r}, expected {sorted(plan.errors)}"
    if plan.before is not None and len(tokens) != plan.before:
        return "lost", f"{len(tokens)} tokens before the error, {plan.before} expected"
    return "failed as expected", f"frame {error}"


def _json_error(body: bytes) -> str | None:
    try:
        return str(json.loads(body)["error"]["type"])
    except (ValueError, KeyError, TypeError):
        return None


# --- the upstream process -----------------------------------------------------------------------


def upstream_stats(fake: FakeUpstream) -> dict[str, Any]:
    """Connections open, streams in flight (by soak id), and what happened to each request."""
    busy = []
    for connection in list(fake.connections):
        current = getattr(connection, "current", None)
        if current is not None:
            knobs = (current.json or {}).get("fake") or {}
            busy.append(knobs.get("soak_id"))
    requests: dict[str, Any] = {}
    for request in fake.requests:
        knobs = ((request.json or {}) if isinstance(request.json, dict) else {}).get("fake") or {}
        if "soak_id" in knobs:
            requests[str(knobs["soak_id"])] = {
                "completed": request.completed,
                "closed": request.closed is not None,
                "reset": getattr(request, "reset", False),
                "events": request.events,
            }
    return {"connections": len(fake.connections), "busy": busy, "requests": requests}


async def serve_upstream(port: int, control_port: int) -> None:
    """Run a FakeUpstream on ``port`` and a control endpoint (``GET /stats``) on
    ``control_port`` until SIGTERM; then print the final stats as JSON on stdout."""
    fake = await FakeUpstream(tokens=12, delay=0.01).start(port=port)

    async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            data = json.dumps(upstream_stats(fake)).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(data), data)
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(control, "127.0.0.1", control_port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    stats = upstream_stats(fake)
    print(json.dumps({"connections": stats["connections"], "busy": stats["busy"]}), flush=True)
    server.close()
    await fake.close()


# --- the driver -------------------------------------------------------------------------------


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``PY args...`` in the repository root, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen([PY, *args], cwd=ROOT, env=env, stdout=out, stderr=out)


def stop(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM ``process``; SIGKILL it if it is still there after ``grace`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    """``VmRSS`` of ``pid`` in MB (0 if it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def get_stats(control_port: int) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", control_port)
    try:
        writer.write(b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        result: dict[str, Any] = json.loads(await reader.readexactly(length))
        return result
    finally:
        writer.close()


@dataclass
class Outcome:
    plan: Plan
    seen: Seen
    klass: str = ""
    why: str = ""


async def drive(
    port: int, plans: list[Plan], concurrency: int, spread: float, bound: float
) -> list[Outcome]:
    """Run ``plans``, starting them evenly over ``spread`` seconds, at most ``concurrency`` at
    once; whatever is still running ``bound`` seconds after the start counts as hung."""
    slots = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    start = loop.time()
    step = spread / max(len(plans), 1)
    outcomes = [Outcome(plan, Seen(end="not started")) for plan in plans]

    async def one(index: int) -> None:
        await asyncio.sleep(max(0.0, start + index * step - loop.time()))
        async with slots:
            outcome = outcomes[index]
            outcome.seen = Seen(end="hung", seconds=STREAM_BOUND)
            with contextlib.suppress(asyncio.TimeoutError):
                outcome.seen = await asyncio.wait_for(run_stream(port, outcome.plan), STREAM_BOUND)

    tasks = [asyncio.ensure_future(one(index)) for index in range(len(plans))]
    _, pending = await asyncio.wait(tasks, timeout=bound)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return outcomes


async def sample_rss(pid: int, samples: list[float], stop: asyncio.Event) -> None:
    """Append the RSS of ``pid`` (MB) to ``samples`` each second until ``stop``."""
    while not stop.is_set():
        samples.append(rss_mb(pid))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    upstream_port, control_port, proxy_port = free_port(), free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    env = {
        **os.environ,
        "SANIC_STREAMPLUS_IDLE_TIMEOUT": str(IDLE_TIMEOUT),
        "SANIC_STREAMPLUS_SEND_TIMEOUT": str(SEND_TIMEOUT),
        "SANIC_STREAMPLUS_MAX_LINE_LENGTH": str(MAX_LINE_LENGTH),
        "SANIC_STREAMPLUS_MAX_EVENT_SIZE": str(MAX_EVENT_SIZE),
        "SANIC_STREAMPLUS_MAX_STREAMS": str(4 * args.concurrency),
    }
    processes: list[subprocess.Popen[bytes]] = []
    try:
        upstream = spawn(
            [SCRIPT, "--serve-upstream", f"{upstream_port},{control_port}"],
            env,
            workdir / "upstream.log",
        )
        processes.append(upstream)
        await wait_port(control_port, upstream, "upstream")
        proxy = spawn(
            [
                "examples/chat_proxy.py",
                "--port",
                str(proxy_port),
                "--upstream",
                f"http://127.0.0.1:{upstream_port}/v1",
                "--heartbeat",
                str(HEARTBEAT),
                "--first-event-timeout",
                str(FIRST_EVENT_TIMEOUT),
            ],
            env,
            workdir / "proxy.log",
        )
        processes.append(proxy)
        await wait_port(proxy_port, proxy, "proxy")

        warm = [make_plan(-1 - number, rng) for number in range(args.warmup)]
        warm_outcomes = await drive(proxy_port, warm, args.concurrency, 0.0, 60.0)
        await asyncio.sleep(1.0)
        rss_before = rss_mb(proxy.pid)

        plans = [make_plan(number, rng) for number in range(args.streams)]
        samples = [rss_before]
        sampled = asyncio.Event()
        sampler = asyncio.ensure_future(sample_rss(proxy.pid, samples, sampled))
        started = time.monotonic()
        outcomes = await drive(
            proxy_port, plans, args.concurrency, args.seconds * 0.9, args.seconds + 30
        )
        took = time.monotonic() - started
        sampled.set()
        await sampler

        settle_until = time.monotonic() + 5
        stats = await get_stats(control_port)
        while stats["busy"] and time.monotonic() < settle_until:
            await asyncio.sleep(0.2)
            stats = await get_stats(control_port)
        await asyncio.sleep(1.0)
        stats = await get_stats(control_port)
        rss_after = rss_mb(proxy.pid)

        for outcome in warm_outcomes + outcomes:
            record = stats["requests"].get(str(outcome.plan.number))
            outcome.klass, outcome.why = classify(outcome.plan, outcome.seen, record)

        await asyncio.to_thread(stop, proxy, 30.0)
        after_stop = await get_stats(control_port)
        for _ in range(30):
            if not after_stop["connections"]:
                break
            await asyncio.sleep(0.1)
            after_stop = await get_stats(control_port)
    finally:
        for process in reversed(processes):
            stop(process, 10.0)

    return report(
        args,
        outcomes,
        warm_outcomes,
        stats,
        after_stop,
        rss_before,
        rss_after,
        samples,
        took,
        workdir,
    )


def report(
    args: argparse.Namespace,
    outcomes: list[Outcome],
    warm: list[Outcome],
    stats: dict[str, Any],
    after_stop: dict[str, Any],
    rss_before: float,
    rss_after: float,
    rss_samples: list[float],
    took: float,
    workdir: Path,
) -> dict[str, Any]:
    counts = collections.Counter(outcome.klass for outcome in outcomes)
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for outcome in outcomes:
        by_kind[outcome.plan.kind][outcome.klass] += 1
    lost = [
        {
            "number": o.plan.number,
            "kind": o.plan.kind,
            "route": o.plan.route,
            "knobs": o.plan.knobs,
            "why": o.why,
            "status": o.seen.status,
            "end": o.seen.end,
            "seconds": round(o.seen.seconds, 3),
        }
        for o in warm + outcomes
        if o.klass == "lost"
    ]
    how: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for outcome in outcomes:
        if outcome.klass == "failed as expected":
            how[outcome.plan.kind][outcome.why] += 1
    seconds = sorted(o.seen.seconds for o in outcomes)
    return {
        "streams": len(outcomes),
        "concurrency": args.concurrency,
        "seconds_bound": args.seconds,
        "seed": args.seed,
        "warmup": len(warm),
        "warmup_lost": sum(o.klass == "lost" for o in warm),
        "classes": {name: counts.get(name, 0) for name in CLASSES},
        "by_kind": {kind: dict(by_kind[kind]) for kind in KINDS if kind in by_kind},
        "failures_seen": {kind: dict(how[kind]) for kind in KINDS if kind in how},
        "upstream_streams_in_flight_at_end": len(stats["busy"]),
        "upstream_connections_open_at_end": stats["connections"],
        "upstream_connections_open_after_proxy_stop": after_stop["connections"],
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_after": round(rss_after, 1),
        "rss_mb_peak": round(max(rss_samples), 1),
        "rss_mb_quartiles": [
            round(rss_samples[min(len(rss_samples) - 1, len(rss_samples) * q // 4)], 1)
            for q in (1, 2, 3, 4)
        ],
        "took_s": round(took, 1),
        "stream_seconds_p50": round(seconds[len(seconds) // 2], 3) if seconds else None,
        "stream_seconds_max": round(seconds[-1], 3) if seconds else None,
        "lost": lost,
        "logs": str(workdir),
    }


def markdown(result: dict[str, Any]) -> str:
    classes = result["classes"]
    rows = [
        ("streams", f"{result['streams']:,} (+ {result['warmup']} warm-up)"),
        ("completed", classes["completed"]),
        ("failed as expected", classes["failed as expected"]),
        ("lost", classes["lost"] + result["warmup_lost"]),
        (
            "upstream streams still in flight at the end",
            result["upstream_streams_in_flight_at_end"],
        ),
        (
            "upstream connections open at the end (idle, in the proxy's pool)",
            result["upstream_connections_open_at_end"],
        ),
        (
            "upstream connections open after the proxy stopped",
            result["upstream_connections_open_after_proxy_stop"],
        ),
        (
            "proxy RSS: after warm-up → at 1/4, 2/4, 3/4, 4/4 of the soak → end (peak)",
            f"{result['rss_mb_before']} → {' / '.join(map(str, result['rss_mb_quartiles']))}"
            f" → {result['rss_mb_after']} MB ({result['rss_mb_peak']} MB)",
        ),
        ("time taken", f"{result['took_s']} s (bound {result['seconds_bound']} s)"),
        (
            "stream duration p50 / max",
            f"{result['stream_seconds_p50']} / {result['stream_seconds_max']} s",
        ),
    ]
    out = ["| figure | value |", "|---|---:|"]
    out += [f"| {name} | {value} |" for name, value in rows]
    out += ["", "| plan | " + " | ".join(CLASSES) + " |", "|---|" + "---:|" * len(CLASSES)]
    for kind, counts in result["by_kind"].items():
        out.append(f"| {kind} | " + " | ".join(str(counts.get(c, 0)) for c in CLASSES) + " |")
    out += ["", "How the expected failures showed (frame: an error frame after the commit point):"]
    out += [""]
    for kind, counts in result["failures_seen"].items():
        shown = ", ".join(f"{name} × {count}" for name, count in sorted(counts.items()))
        out.append(f"- {kind}: {shown}")
    if result["lost"]:
        out += ["", "Lost streams (first 20):", ""]
        out += [f"- {json.dumps(item)}" for item in result["lost"][:20]]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="spread the streams over this long (bound)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--serve-upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        port, control_port = (int(part) for part in args.serve_upstream.split(","))
        asyncio.run(serve_upstream(port, control_port))
        return
    result = asyncio.run(soak(args))
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    leaked = (
        result["upstream_streams_in_flight_at_end"]
        or result["upstream_connections_open_after_proxy_stop"]
    )
    sys.exit(1 if result["classes"]["lost"] or result["warmup_lost"] or leaked else 0)


if __name__ == "__main__":
    main()
