"""A chat proxy in front of any OpenAI-compatible API, in one command.

    python examples/chat_proxy.py [--host 127.0.0.1] [--port 8000] [--upstream URL ...]
        [--api-key KEY] [--model NAME] [--heartbeat SECONDS] [--first-event-timeout SECONDS]
        [--failover continue|fallback] [--workers N]

Without ``--upstream`` (or ``UPSTREAM_URL``) it starts an embedded fake model that streams
deterministic tokens, so it works offline. ``--upstream`` given more than once: the upstreams
are tried in order (``STREAMPLUS_UPSTREAMS``, named ``upstream1``, ``upstream2``, ...), and one
that dies in the middle of an answer is continued by the next (``--failover continue``, the
default; ``fallback``: only before the first token; see ``docs/failover.md``). ``--api-key`` goes
to every upstream. It prints ``chat page: http://HOST:PORT/`` once it
listens; a bad ``--upstream`` (not http:// or https:// with a host) or a port in use is one line
on stderr and exit status 1. ``--workers N`` (N > 1) runs N Sanic worker processes on the port
(the kernel spreads connections over them), each answer with an ``X-Worker-Pid`` header: with
the Redis store, a stream started on one worker resumes on any other. Routes:

- ``POST /v1/chat/completions``: OpenAI-compatible pass-through (point the ``openai`` SDK's
  ``base_url`` at ``http://HOST:PORT/v1``);
- ``POST /chat``: ``{"messages": [...]}`` in, ``event: token`` ``{"text"}`` events out, then
  ``event: done`` with stats; errors as ``event: error``;
- ``POST /resumable/v1/chat/completions``: the same pass-through, resumable: the answer has
  an ``X-Stream-Id``, every event an ``id``; resume with ``Last-Event-ID`` on this route or on
  ``GET /streams/<id>``, cancel with ``DELETE /streams/<id>``, retry safely with an
  ``Idempotency-Key`` (events kept in memory, or in Redis with
  ``SANIC_STREAMPLUS_RESUME_STORE=redis`` and ``SANIC_STREAMPLUS_REDIS_URL``);
- ``GET /``: the chat page (``chat.html``, its script and styles in ``static/``, the markdown
  and sanitizer libraries vendored in ``static/vendor/``: it loads with no network);
- ``GET /v1/models``: the upstream's model list (the page's model picker);
- ``GET /docs``: the OpenAPI document in Swagger UI, served from ``static/vendor/`` too.

The embedded fake model answers with a few sentences made from the prompt (:func:`fake_answer`),
with a markdown list or a code block when the prompt asks for one; a request that carries
``"fake"`` knobs gets the test kit's numbered tokens instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, NoReturn

import httpx
from sanic import HTTPResponse, Request, Sanic, html, raw
from sanic.response import BaseHTTPResponse
from sanic.response import json as json_response
from sanic.server.socket import bind_socket
from sanic.worker.loader import AppLoader

from sanic_streamplus import ServerSentEvent, StreamPlus, stream_post, upstream_events
from sanic_streamplus.errors import UpstreamBadResponse
from sanic_streamplus.testing import FakeUpstream

PAGE = Path(__file__).with_name("chat.html")
STATIC = Path(__file__).with_name("static")
SWAGGER_PAGE = STATIC / "swagger.html"

_OPENERS = (
    "You wrote “{echo}”, and here is my answer.",
    "“{echo}”: a fine thing to ask a fake model.",
    "Let me think about “{echo}” for a moment.",
    "So the question is “{echo}”.",
)
_MIDDLES = (
    "I am the model built into the sanic-streamplus example: each word you see came as its own "
    "server-sent event, relayed as soon as it was made.",
    "Nothing here leaves this machine; the answer is made from your prompt alone, so the same "
    "prompt always gets the same answer.",
    "Press **Stop** (or Esc) while I type: the proxy closes its upstream request at once, so a "
    "real model would stop generating, and billing, too.",
    "If the network drops halfway, the page reconnects with `Last-Event-ID` and the answer goes "
    "on where it broke, with no gap and no repeat.",
    "Your message has {words} and {chars} characters; its longest word is *{longest}*.",
)
_CLOSERS = (
    "Ask for a *list* or some *code* to see the markdown rendered.",
    "Try a prompt with the word *list* or *code* in it.",
    "That is all I know; I am only a fake.",
)


def fake_answer(body: Any) -> str:
    """The embedded fake model's answer to a chat completion request ``body`` (its parsed
    JSON): a few sentences made from the last user message, picked by a checksum of it (so
    the answer is deterministic), plus a markdown list when the prompt says ``list`` and a
    fenced code block when it says ``code``, ``python`` or ``example``."""
    messages = body.get("messages") if isinstance(body, dict) else None
    prompt = ""
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            prompt = content if isinstance(content, str) else json.dumps(content)
            break
    prompt = " ".join(prompt.split()) or "nothing at all"
    words = prompt.split()
    seed = zlib.crc32(prompt.encode())
    echo = prompt if len(prompt) <= 80 else prompt[:77].rstrip() + "…"
    facts = {
        "echo": echo,
        "words": f"{len(words)} word{'s' * (len(words) != 1)}",
        "chars": len(prompt),
        "longest": max(words, key=len),
    }
    first = seed % len(_MIDDLES)
    second = (first + 1 + seed // 7 % (len(_MIDDLES) - 1)) % len(_MIDDLES)  # never first
    middles = [_MIDDLES[first], _MIDDLES[second]]
    parts = [" ".join([_OPENERS[seed % len(_OPENERS)], *middles]).format(**facts)]
    lowered = prompt.lower()
    if re.search(r"\blists?\b", lowered):
        parts.append(
            "Here is your prompt, taken apart:\n\n"
            + f"- **{facts['words']}**, {len(prompt)} characters\n"
            + f"- first word: *{words[0]}*, last word: *{words[-1]}*\n"
            + f"- in capitals: `{prompt.upper()[:60]}`"
        )
    if re.search(r"\b(code|python|example)\b", lowered):
        parts.append(
            "The same prompt, counted in Python:\n\n```python\n"
            + f"prompt = {json.dumps(echo, ensure_ascii=False)}\n"
            + "words = prompt.split()\n"
            + 'print(len(words), "words, longest:", max(words, key=len))\n```'
        )
    parts.append(_CLOSERS[seed // 3 % len(_CLOSERS)])
    return "\n\n".join(parts)


def bad_request(message: str) -> HTTPResponse:
    body = {"error": {"type": "invalid_request", "message": message, "upstream_status": None}}
    return json_response(body, status=400)


def create_app(
    upstream: str | Sequence[str] | None = None,
    *,
    api_key: str | None = None,
    model: str = "gpt-4o-mini",
    heartbeat: float = 15.0,
    first_event_timeout: float = 120.0,
    failover: str = "continue",
    name: str = "chat_proxy",
) -> Sanic[Any, Any]:
    """Build the proxy app. ``upstream`` is an OpenAI-compatible base URL, several of them
    (tried in order, with ``failover``: ``continue`` or ``fallback``), or None for the embedded
    fake model."""
    app: Sanic[Any, Any] = Sanic(name)
    upstreams = [upstream] if isinstance(upstream, str) else list(upstream or ())
    if len(upstreams) > 1:
        app.config.STREAMPLUS_UPSTREAMS = [
            {"name": f"upstream{n}", "url": url, "api_key": api_key}
            for n, url in enumerate(upstreams, 1)
        ]
        app.config.STREAMPLUS_FAILOVER = failover
    else:
        app.config.STREAMPLUS_UPSTREAM_URL = upstreams[0] if upstreams else None
        app.config.STREAMPLUS_UPSTREAM_API_KEY = api_key
    app.config.STREAMPLUS_HEARTBEAT = heartbeat
    app.config.STREAMPLUS_FIRST_EVENT_TIMEOUT = first_event_timeout
    # /docs: Swagger UI from static/vendor (sanic-ext's default pages load it from CDNs)
    app.config.OAS_UI_DEFAULT = "swagger"
    app.config.OAS_UI_REDOC = False
    app.config.OAS_PATH_TO_SWAGGER_HTML = str(SWAGGER_PAGE)

    if not upstreams:

        @app.before_server_start(priority=100)  # before StreamPlus opens its client
        async def start_fake_model(app: Sanic[Any, Any]) -> None:
            fake = FakeUpstream(tokens=40, delay=0.04, answer=fake_answer)
            app.ctx.fake_model = await fake.start()
            app.config.STREAMPLUS_UPSTREAM_URL = app.ctx.fake_model.url

        @app.after_server_stop
        async def stop_fake_model(app: Sanic[Any, Any]) -> None:
            await app.ctx.fake_model.close()

    app.extend(extensions=[StreamPlus])

    @app.get("/")
    async def index(request: Request) -> HTTPResponse:
        return html(PAGE.read_text(encoding="utf-8"))

    app.static("/static", STATIC, name="static")
    app.static("/favicon.ico", STATIC / "favicon.svg", name="favicon", content_type="image/svg+xml")

    @app.get("/v1/models")
    async def models(request: Request) -> HTTPResponse:
        """The first upstream's ``GET /models`` that answers, passed through (502 if none can
        be reached)."""
        error: Exception | None = None
        for member in request.app.ctx.streamplus.pool.members:
            try:
                answer = await member.client.get(
                    "/models", headers={"Accept": "application/json"}, timeout=10
                )
            except httpx.HTTPError as exc:
                error = exc
                continue
            content_type = answer.headers.get("content-type", "application/json")
            return raw(answer.content, status=answer.status_code, content_type=content_type)
        message = f"the upstream's model list is out of reach: {type(error).__name__}"
        body = {"error": {"type": "upstream_unavailable", "message": message}}
        return json_response(body, status=502)

    def completions(request: Request) -> Any:
        body = request.json
        if not isinstance(body, dict) or not body.get("stream"):
            return bad_request('this proxy only streams: send a JSON object with "stream": true')
        return upstream_events(request, "/chat/completions", json=body)

    @app.post("/v1/chat/completions")
    @stream_post(dialect="openai")
    async def chat_completions(request: Request) -> Any:
        return completions(request)

    @app.post("/resumable/v1/chat/completions")
    @stream_post(dialect="openai", resumable=True)
    async def resumable_completions(request: Request) -> Any:
        return completions(request)

    @app.post("/chat")
    @stream_post(dialect="plain")
    async def chat(request: Request) -> Any:
        messages = request.json.get("messages") if isinstance(request.json, dict) else None
        if not isinstance(messages, list) or not messages:
            return bad_request('send {"messages": [{"role": "user", "content": ...}]}')
        fake = request.json.get("fake")  # knobs of the embedded fake model, for tests
        payload = {"model": model, "messages": messages, "stream": True}
        payload["stream_options"] = {"include_usage": True}  # the last chunk: usage, for done
        if fake is not None:
            payload["fake"] = fake
        return tokens(request, payload)

    async def tokens(request: Request, payload: dict[str, Any]) -> AsyncIterator[ServerSentEvent]:
        started, count, usage = time.monotonic(), 0, None
        # dialect="openai": the upstream's error event raises UpstreamErrorEvent, and a stream
        # cut short (no finish_reason, no [DONE]) UpstreamTruncated: either ends this stream
        # with event: error (the relay's frame, the upstream's message), never with done
        upstream = upstream_events(request, "/chat/completions", json=payload, dialect="openai")
        async with aclosing(upstream) as events:
            async for event in events:
                if event.data == "[DONE]":
                    break
                try:
                    chunk = json.loads(event.data)
                except ValueError:
                    raise UpstreamBadResponse("upstream sent an event that is not JSON") from None
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        count += 1
                        yield ServerSentEvent(json.dumps({"text": text}), event="token")
                usage = chunk.get("usage") or usage
        stats = {"tokens": count, "seconds": round(time.monotonic() - started, 3), "usage": usage}
        yield ServerSentEvent(json.dumps(stats), event="done")

    return app


def worker_app(options: dict[str, Any]) -> Sanic[Any, Any]:
    """The app of one worker of ``--workers N``: :func:`create_app` with ``options``, every
    answer marked with the worker's pid (``X-Worker-Pid``), its log lines on stderr."""
    log()
    app = create_app(**options)

    def mark(request: Request, response: BaseHTTPResponse) -> None:
        response.headers["X-Worker-Pid"] = str(os.getpid())

    app.register_middleware(mark, "response")
    return app


def log() -> None:
    """The package's INFO lines on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logging.getLogger("sanic_streamplus").addHandler(handler)
    logging.getLogger("sanic_streamplus").setLevel(logging.INFO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--upstream",
        action="append",
        help="base URL of an OpenAI-compatible API, http:// or https://, e.g. "
        "http://127.0.0.1:9000/v1; more than once: tried in order (env UPSTREAM_URL; default: "
        "an embedded fake model, offline)",
    )
    parser.add_argument(
        "--failover",
        choices=("continue", "fallback"),
        default="continue",
        help="with several upstreams: continue an answer cut mid-stream on the next one "
        "(continue, the default), or only fall back before its first token (fallback)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("UPSTREAM_API_KEY"),
        help="sent upstream as Authorization: Bearer (env UPSTREAM_API_KEY)",
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("UPSTREAM_MODEL", "gpt-4o-mini"),
        help="model name for POST /chat (env UPSTREAM_MODEL)",
    )
    parser.add_argument("--heartbeat", type=float, default=15.0, help="seconds (default 15)")
    parser.add_argument(
        "--workers", type=int, default=1, help="Sanic worker processes (default 1)"
    )
    parser.add_argument(
        "--first-event-timeout", type=float, default=120.0, help="seconds (default 120)"
    )
    args = parser.parse_args()
    if args.upstream is None and os.environ.get("UPSTREAM_URL"):
        args.upstream = [os.environ["UPSTREAM_URL"]]
    if args.upstream is not None and not all(url.strip() for url in args.upstream):
        fail(
            "--upstream is empty: give an http:// or https:// URL, or leave it out for the "
            "embedded fake model"
        )
    options = {
        "upstream": args.upstream,
        "api_key": args.api_key,
        "model": args.model,
        "heartbeat": args.heartbeat,
        "first_event_timeout": args.first_event_timeout,
        "failover": args.failover,
    }
    if args.workers > 1:  # each worker process builds its own app with the loader
        loader = AppLoader(factory=functools.partial(worker_app, options))
        try:
            app = loader.load()
        except ValueError as exc:  # a bad STREAMPLUS_* value, as below
            fail(str(exc))
        app.prepare(
            host=args.host, port=args.port, workers=args.workers, access_log=False, motd=False
        )
        Sanic.serve(primary=app, app_loader=loader)
        return
    log()
    try:
        app = create_app(**options)
    except ValueError as exc:  # a bad STREAMPLUS_* value, e.g. --upstream localhost:8741
        fail(str(exc))
    try:
        sock = bind_socket(args.host, args.port, backlog=2048)  # a burst of streams: no overflow
    except OSError as exc:
        fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(args.host, args.host)
    page = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}/"

    @app.after_server_start
    def announce(app: Sanic[Any, Any]) -> None:
        print(f"chat page: {page}", flush=True)

    app.run(
        sock=sock,
        single_process=True,
        access_log=False,
        motd=False,
    )


def fail(message: str) -> NoReturn:
    """Print one line to stderr and exit with status 1."""
    print(f"chat_proxy: error: {message}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
