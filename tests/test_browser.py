"""The example's chat page in a real headless Chromium (Debian's ``/usr/bin/chromium``, driven by
Playwright through ``executable_path``: no browser download). ``examples/chat_proxy.py`` runs as its
own process, pointed with ``--upstream`` at a :class:`FakeUpstream` in this process, which the tests
hold open (``hold_before``) and release. The page talks to the resumable route
(``POST /resumable/v1/chat/completions``, then ``GET /streams/<id>`` with ``Last-Event-ID``).

Skipped only where ``/usr/bin/chromium`` is missing (CI installs it). The docs' screenshots are
made by ``examples/screenshots.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import run_example
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from sanic_streamplus.testing import FakeUpstream, UpstreamRequest, fake_tokens

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 10_000  # a loose bound on any one wait in the page (loopback answers in milliseconds)
WAIT = WAIT_MS / 1000
ANSWER = "#log .turn.assistant"


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium; the browser tests are skipped without it, and only then."""
    if not CHROMIUM.exists():
        pytest.skip(f"needs {CHROMIUM}: apt-get install chromium (.ci/run does)")
    return CHROMIUM


@contextlib.asynccontextmanager
async def launch(
    chromium: Path, profile: Path, **options: Any
) -> AsyncIterator[BrowserContext]:
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            headless=True,
            args=FLAGS,
            timeout=WAIT_MS * 3,
            **{"viewport": {"width": 900, "height": 700}, **options},
        )
        context.set_default_timeout(WAIT_MS)
        try:
            yield context
        finally:
            await context.close()


@pytest.fixture
async def browser(chromium: Path, tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """A fresh headless Chromium (its own profile in ``tmp_path``), closed afterwards."""
    async with launch(chromium, tmp_path / "profile") as context:
        yield context


async def open_chat(browser: BrowserContext, url: str) -> tuple[Page, list[str]]:
    """Open the chat page; also return the list its uncaught JavaScript errors go to."""
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    response = await page.goto(url + "/")
    assert response is not None and response.ok
    await expect(page.locator("#model option")).to_have_count(1)  # the model list is in
    return page, errors


async def send(page: Page, prompt: str) -> None:
    await page.fill("#prompt", prompt)
    await page.press("#prompt", "Enter")


def chats(fake: FakeUpstream) -> list[UpstreamRequest]:
    """The chat completion requests the fake upstream saw (not the model list's)."""
    return [r for r in fake.requests if r.path.endswith("/chat/completions")]


async def held(fake: FakeUpstream, count: int = 1) -> UpstreamRequest:
    """The ``count``-th chat request, once the fake holds it open at ``hold_before``."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        requests = chats(fake)
        if len(requests) >= count and requests[count - 1].held:
            return requests[count - 1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no held chat request number {count}: {fake.requests}")


async def test_the_first_tokens_are_on_screen_while_the_stream_is_still_open(
    browser: BrowserContext,
) -> None:
    async with FakeUpstream(tokens=14, delay=0.01, hold_before=11) as fake, run_example(
        "--upstream", fake.url
    ) as (_, url):
        page, errors = await open_chat(browser, url)
        await expect(page.locator("#model")).to_have_value("fake-model")  # GET /v1/models
        await send(page, "Say hello, token by token")
        answer = page.locator(ANSWER)
        before_hold = "".join(fake_tokens(10))  # events 1-10; the upstream holds before 11
        await expect(answer.locator(".bubble")).to_have_text(before_hold)
        await expect(answer).to_be_visible()
        # the stream is open at both ends: the page still streams, the upstream holds
        await expect(answer).to_have_attribute("data-state", "streaming")
        await expect(page.locator("#stop")).to_be_visible()
        request = await held(fake)
        assert not request.completed and request.closed is None
        assert request.json["model"] == "fake-model"
        assert request.json["messages"] == [
            {"role": "user", "content": "Say hello, token by token"}
        ]
        assert await page.locator("#log .stats").count() == 0
        fake.release()
        await expect(answer).to_have_attribute("data-state", "done")
        await expect(answer.locator(".bubble")).to_have_text("".join(fake_tokens(14)))
        await expect(page.locator("#log .stats")).to_have_text(
            re.compile(r"^first token [0-9.]+ (ms|s) · [0-9.]+ tokens/s · 14 tokens$")
        )
        assert await page.locator("#log .error").count() == 0
        assert request.completed
        assert errors == []


async def test_an_upstream_that_dies_mid_answer_is_continued_on_the_next_one(
    browser: BrowserContext,
) -> None:
    """The failover demo: ``chat_proxy.py --upstream A --upstream B``; A dies after three
    tokens and the page shows one uninterrupted answer (A's three tokens, then B's
    continuation), ending ``done``, with no error."""
    async with (
        FakeUpstream(tokens=12, delay=0.01, fail_after=4) as primary,
        FakeUpstream(tokens=12, delay=0.01) as backup,
        run_example("--upstream", primary.url, "--upstream", backup.url) as (_, url),
    ):
        page, errors = await open_chat(browser, url)
        await send(page, "Say hello, token by token")
        answer = page.locator(ANSWER)
        await expect(answer).to_have_attribute("data-state", "done")
        so_far = "".join(fake_tokens(12)[:3])
        await expect(answer.locator(".bubble")).to_have_text(so_far + "".join(fake_tokens(12)))
        assert await page.locator("#log .error").count() == 0
        continued = chats(backup)[-1].json["messages"]
        assert continued[:2] == [
            {"role": "user", "content": "Say hello, token by token"},
            {"role": "assistant", "content": so_far},
        ]
        assert errors == []


@pytest.mark.parametrize(
    ("fault", "shown", "message"),
    [
        ({"fail_after": 4}, "".join(fake_tokens(3)), "upstream connection broke mid-stream"),
        ({"error_status": 500}, "", "fake upstream error"),
    ],
    ids=["mid-stream", "before-the-stream"],
)
async def test_a_server_error_shows_in_place_with_retry_and_leaves_the_history(
    browser: BrowserContext, fault: dict[str, Any], shown: str, message: str
) -> None:
    async with FakeUpstream(tokens=12, delay=0.01, **fault) as fake, run_example(
        "--upstream", fake.url
    ) as (_, url):
        page, errors = await open_chat(browser, url)
        await send(page, "hello")
        error = page.locator("#log .error")
        await expect(error).to_be_visible()
        await expect(error).to_have_attribute("role", "alert")
        await expect(error).to_contain_text(message)
        answer = page.locator(ANSWER)
        await expect(answer).to_have_attribute("data-state", "error")
        # what arrived before the failure stays on the page
        await expect(answer.locator(".bubble")).to_have_text(shown)
        assert await page.locator("#log .stats").count() == 0
        assert len(chats(fake)) == 1  # the failure came from the upstream, not from the page
        # Retry asks again for the same prompt, in place of the failed answer
        fake.model = replace(fake.model, fail_after=None, error_status=None)
        await error.locator(".retry").click()
        await expect(answer).to_have_attribute("data-state", "done")
        await expect(answer.locator(".bubble")).to_have_text("".join(fake_tokens(12)))
        await expect(error).to_have_count(0)
        assert chats(fake)[-1].json["messages"] == [{"role": "user", "content": "hello"}]
        # a failed turn is not sent as history: fail once more, then ask something else
        fake.model = replace(fake.model, **fault)
        await send(page, "again")
        await expect(page.locator(ANSWER).last).to_have_attribute("data-state", "error")
        fake.model = replace(fake.model, fail_after=None, error_status=None)
        await send(page, "third")
        await expect(page.locator(ANSWER).last).to_have_attribute("data-state", "done")
        assert [m["content"] for m in chats(fake)[-1].json["messages"]] == [
            "hello", "".join(fake_tokens(12)), "third"
        ]
        assert errors == []


@pytest.mark.parametrize("how", ["button", "escape"])
async def test_stop_closes_the_upstream_request(browser: BrowserContext, how: str) -> None:
    async with FakeUpstream(tokens=12, delay=0.01, hold_before=3) as fake, run_example(
        "--upstream", fake.url
    ) as (_, url):
        page, errors = await open_chat(browser, url)
        await send(page, "hello")
        answer = page.locator(ANSWER)
        await expect(answer.locator(".bubble")).to_have_text("".join(fake_tokens(2)))
        request = await held(fake)  # open, and would stay open
        stopping = time.monotonic()
        if how == "button":
            await page.click("#stop")
        else:
            await page.keyboard.press("Escape")
        closed = await fake.wait_closed(request, WAIT)
        assert closed is not None, "the upstream request is still open"
        assert closed - stopping < 2.0
        assert not request.completed
        await expect(answer).to_have_attribute("data-state", "stopped")
        await expect(answer.locator(".bubble")).to_have_text("".join(fake_tokens(2)))
        await expect(page.locator("#send")).to_be_visible()
        assert len(chats(fake)) == 1
        assert errors == []


async def test_closing_the_page_closes_the_upstream_request(browser: BrowserContext) -> None:
    async with FakeUpstream(tokens=12, delay=0.01, hold_before=3) as fake, run_example(
        "--upstream", fake.url
    ) as (_, url):
        page, errors = await open_chat(browser, url)
        await send(page, "hello")
        await expect(page.locator(ANSWER + " .bubble")).to_have_text("".join(fake_tokens(2)))
        request = await held(fake)
        closing = time.monotonic()
        await page.close(run_before_unload=True)
        closed = await fake.wait_closed(request, WAIT)
        assert closed is not None, "the upstream request is still open"
        assert closed - closing < 2.0
        assert not request.completed
        assert errors == []


MARKDOWN = """Some **bold** text and `inline code`.

- one
- two

```python
print("hi")
```

<script>window.pwned = "script"</script><img src="x" onerror="window.pwned = 'onerror'">
"""


async def test_markdown_renders_and_html_in_an_answer_does_not_run(
    browser: BrowserContext,
) -> None:
    await browser.grant_permissions(["clipboard-read", "clipboard-write"])
    async with FakeUpstream(text=MARKDOWN, delay=0.005) as fake, run_example(
        "--upstream", fake.url
    ) as (_, url):
        page, errors = await open_chat(browser, url)
        await send(page, "markdown please")
        answer = page.locator(ANSWER)
        await expect(answer).to_have_attribute("data-state", "done")
        bubble = answer.locator(".bubble")
        await expect(bubble.locator("strong")).to_have_text("bold")
        await expect(bubble.locator("li")).to_have_text(["one", "two"])
        await expect(bubble.locator("pre code")).to_have_text('print("hi")\n')
        await page.wait_for_timeout(300)  # the image's error would have fired by now
        assert await page.evaluate("window.pwned") is None
        assert await bubble.locator("script, img, [onerror]").count() == 0
        await bubble.locator(".codeblock .copy").click()
        await expect(bubble.locator(".codeblock .copy")).to_have_text("Copied")
        assert await page.evaluate("navigator.clipboard.readText()") == 'print("hi")\n'
        assert errors == []


async def test_a_reload_keeps_the_conversation(browser: BrowserContext) -> None:
    async with FakeUpstream(tokens=6, delay=0.005) as fake, run_example(
        "--upstream", fake.url
    ) as (_, url):
        page, errors = await open_chat(browser, url)
        await send(page, "first question")
        await expect(page.locator(ANSWER)).to_have_attribute("data-state", "done")
        await page.reload()
        await expect(page.locator("#log .turn.user .bubble")).to_have_text(["first question"])
        answer = page.locator(ANSWER)
        await expect(answer.locator(".bubble")).to_have_text("".join(fake_tokens(6)))
        await expect(answer).to_have_attribute("data-state", "done")
        await expect(page.locator("#log .stats")).to_have_count(1)
        await expect(page.locator("#chats .chat-item")).to_have_text(["first question×"])
        await send(page, "second question")  # the history goes with it
        await expect(page.locator(ANSWER).last).to_have_attribute("data-state", "done")
        assert [m["role"] for m in chats(fake)[-1].json["messages"]] == [
            "user", "assistant", "user"
        ]
        await page.click("#new-chat")  # a new chat starts empty; the old one is kept
        await expect(page.locator("#log .turn")).to_have_count(0)
        await expect(page.locator("#welcome")).to_be_visible()
        await page.click("#chats .chat-item:has-text('first question') .open")
        await expect(page.locator("#log .turn")).to_have_count(4)
        assert errors == []


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 in front of ``port``; :meth:`cut` resets every connection
    open through it (as a network drop does to the browser), new ones go through again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pipes: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.sent = bytearray()  # everything the browser sent
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.accept, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        pipe = (writer, up_writer)
        self.pipes.add(pipe)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, log: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    if log:
                        self.sent += data
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(reader, up_writer, True), copy(up_reader, writer, False))
        self.pipes.discard(pipe)

    def cut(self) -> None:
        for browser_side, server_side in list(self.pipes):
            for writer in (browser_side, server_side):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
        self.pipes.clear()


async def test_a_connection_cut_mid_answer_resumes_with_the_full_text_once(
    browser: BrowserContext,
) -> None:
    async with FakeUpstream(tokens=30, delay=0.005, hold_before=10) as fake, run_example(
        "--upstream", fake.url
    ) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        proxy = CuttableProxy(port)
        async with proxy as proxied:
            page, errors = await open_chat(browser, proxied)
            await send(page, "a long answer")
            answer = page.locator(ANSWER)
            await expect(answer.locator(".bubble")).to_have_text("".join(fake_tokens(9)))
            await held(fake)
            proxy.cut()  # the browser's connection is reset mid-answer
            await expect(page.locator("#conn")).to_have_text(re.compile("reconnecting"))
            fake.release()  # the producer goes on while the page is away
            await expect(answer).to_have_attribute("data-state", "done")
            await expect(answer.locator(".bubble")).to_have_text("".join(fake_tokens(30)))
            await expect(answer).to_have_attribute("data-resumed", "1")
            await expect(answer.locator(".badge.resumed")).to_have_text(
                "resumed after 1 network drop"
            )
            await expect(page.locator("#log .stats")).to_contain_text("30 tokens")
            sent = bytes(proxy.sent).lower()
            assert b"get /streams/" in sent and b"last-event-id: " in sent
        assert len(chats(fake)) == 1  # resumed, not generated again
        assert chats(fake)[0].completed
        assert errors == []


async def test_a_phone_has_the_input_on_screen_after_five_turns(
    chromium: Path, tmp_path: Path
) -> None:
    phone = {"viewport": {"width": 390, "height": 700}, "is_mobile": True, "has_touch": True}
    async with FakeUpstream(tokens=40, delay=0.001) as fake, run_example(
        "--upstream", fake.url
    ) as (_, url), launch(chromium, tmp_path / "profile", **phone) as context:
        page, errors = await open_chat(context, url)
        width = await page.evaluate("document.documentElement.clientWidth")
        assert width == 390  # the viewport meta tag: no 980 px desktop layout
        for turn in range(5):
            await send(page, f"question {turn}")
            await expect(page.locator(ANSWER).nth(turn)).to_have_attribute("data-state", "done")
        await expect(page.locator("#prompt")).to_be_in_viewport(ratio=1)
        await expect(page.locator("#send")).to_be_in_viewport(ratio=1)
        await expect(page.locator(ANSWER).last.locator(".stats")).to_be_in_viewport()
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        assert errors == []


async def test_auto_scroll_stops_when_the_user_scrolls_up(browser: BrowserContext) -> None:
    async with FakeUpstream(tokens=400, delay=0.005) as fake, run_example(
        "--upstream", fake.url
    ) as (_, url):
        page, errors = await open_chat(browser, url)
        await page.set_viewport_size({"width": 700, "height": 400})
        await send(page, "a long one")
        await expect(page.locator("#jump")).to_be_hidden()
        log = page.locator("#log")
        await page.wait_for_function("document.querySelector('#log').scrollTop > 100")
        await log.evaluate("log => log.scrollTo(0, 0)")
        await expect(page.locator("#jump")).to_be_visible()
        grown = await log.evaluate("log => log.scrollHeight")
        await page.wait_for_function(f"document.querySelector('#log').scrollHeight > {grown}")
        assert await log.evaluate("log => log.scrollTop") == 0  # it stayed where the user is
        await page.click("#jump")
        await expect(page.locator("#jump")).to_be_hidden()
        await expect(page.locator(ANSWER)).to_have_attribute("data-state", "done")
        at_bottom = "log => log.scrollHeight - log.scrollTop - log.clientHeight"
        assert await log.evaluate(at_bottom) < 40
        assert len(chats(fake)) == 1
        assert errors == []
