"""The example's chat page in a real headless Chromium (Debian's ``/usr/bin/chromium``, driven by
Playwright through ``executable_path``: no browser download). ``examples/chat_proxy.py`` runs as its
own process, pointed with ``--upstream`` at a :class:`FakeUpstream` in this process, which the tests
hold open (``hold_before``) and release.

Skipped only where ``/usr/bin/chromium`` is missing (CI installs it). With
``STREAMPLUS_SCREENSHOT=docs/img/chat-midstream.png``, the first-token test also saves a
screenshot of the page mid-stream (first tokens shown, the stream still open) to that path.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_example
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from sanic_streamplus.testing import FakeUpstream, fake_tokens

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


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium; the browser tests are skipped without it, and only then."""
    if not CHROMIUM.exists():
        pytest.skip(f"needs {CHROMIUM}: apt-get install chromium (.ci/run does)")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path, tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """A fresh headless Chromium (its own profile in ``tmp_path``), closed afterwards."""
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            tmp_path / "profile",
            executable_path=chromium,
            headless=True,
            args=FLAGS,
            viewport={"width": 760, "height": 240},
            timeout=WAIT_MS * 3,
        )
        context.set_default_timeout(WAIT_MS)
        try:
            yield context
        finally:
            await context.close()


async def open_chat(browser: BrowserContext, url: str) -> tuple[Page, list[str]]:
    """Open the chat page; also return the list its uncaught JavaScript errors go to."""
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    response = await page.goto(url + "/")
    assert response is not None and response.ok
    return page, errors


async def send(page: Page, prompt: str) -> None:
    await page.fill("#prompt", prompt)
    await page.click("#send")


async def test_the_first_tokens_are_on_screen_while_the_stream_is_still_open(
    browser: BrowserContext,
) -> None:
    async with FakeUpstream(tokens=14, delay=0.01, hold_before=11) as fake, run_example(
        "--upstream", fake.url
    ) as (_, url):
        page, errors = await open_chat(browser, url)
        await send(page, "Say hello, token by token")
        answer = page.locator("#log .assistant")
        before_hold = "".join(fake_tokens(10))  # events 1-10; the upstream holds before 11
        await expect(answer).to_have_text(before_hold, timeout=WAIT_MS)
        await expect(answer).to_be_visible(timeout=WAIT_MS)
        # the stream is open at both ends: the page still streams, the upstream holds
        await expect(answer).to_have_attribute("data-state", "streaming", timeout=WAIT_MS)
        request = fake.requests[-1]
        assert request.held and not request.completed and request.closed is None
        assert await page.locator("#log .stats").count() == 0
        if screenshot := os.environ.get("STREAMPLUS_SCREENSHOT"):
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=screenshot)
        fake.release()
        await expect(answer).to_have_attribute("data-state", "done", timeout=WAIT_MS)
        await expect(answer).to_have_text("".join(fake_tokens(14)), timeout=WAIT_MS)
        await expect(page.locator("#log .stats")).to_have_text(
            re.compile(r"^14 tokens in [0-9.]+ s$"), timeout=WAIT_MS
        )
        assert await page.locator("#log .error").count() == 0
        assert request.completed
        assert errors == []


@pytest.mark.parametrize(
    ("fault", "shown", "message"),
    [
        ({"fail_after": 4}, "".join(fake_tokens(3)), "upstream connection broke mid-stream"),
        ({"error_status": 500}, "", "upstream answered HTTP 500"),
    ],
    ids=["mid-stream", "before-the-stream"],
)
async def test_a_server_error_shows_as_an_error_in_the_page(
    browser: BrowserContext, fault: dict[str, Any], shown: str, message: str
) -> None:
    async with FakeUpstream(tokens=12, delay=0.01, **fault) as fake, run_example(
        "--upstream", fake.url
    ) as (_, url):
        page, errors = await open_chat(browser, url)
        await send(page, "hello")
        error = page.locator("#log .error")
        await expect(error).to_be_visible(timeout=WAIT_MS)
        await expect(error).to_have_attribute("role", "alert", timeout=WAIT_MS)
        await expect(error).to_contain_text(message, timeout=WAIT_MS)
        answer = page.locator("#log .assistant")
        await expect(answer).to_have_attribute("data-state", "error", timeout=WAIT_MS)
        # what arrived before the failure stays on the page
        await expect(answer).to_have_text(shown, timeout=WAIT_MS)
        assert await page.locator("#log .stats").count() == 0
        assert fake.requests  # the failure came from the upstream, not from the page
        assert errors == []


async def test_closing_the_page_closes_the_upstream_request(browser: BrowserContext) -> None:
    async with FakeUpstream(tokens=12, delay=0.01, hold_before=3) as fake, run_example(
        "--upstream", fake.url
    ) as (_, url):
        page, errors = await open_chat(browser, url)
        await send(page, "hello")
        await expect(page.locator("#log .assistant")).to_have_text(
            "".join(fake_tokens(2)), timeout=WAIT_MS
        )
        request = fake.requests[-1]
        assert request.held and request.closed is None  # open, and would stay open
        closing = time.monotonic()
        await page.close()
        closed = await fake.wait_closed(request, WAIT)
        assert closed is not None, "the upstream request is still open"
        assert closed - closing < 2.0
        assert not request.completed
        assert errors == []
