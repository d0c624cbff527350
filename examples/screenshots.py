"""Take the chat page's screenshots for the docs: desktop (light) and phone (dark), mid-stream.

    python examples/screenshots.py [--out docs/img] [--chromium /usr/bin/chromium]

Runs the example app on a free port of 127.0.0.1 against an embedded fake model (the
example's own :func:`chat_proxy.fake_answer`), drives an installed Chromium with Playwright
(nothing is downloaded), and holds the second answer's stream open partway so the pictures show
tokens arriving. Writes ``chat-desktop.png`` and ``chat-mobile.png`` to ``--out``. Offline and
deterministic apart from the timings shown under the first answer.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace
from pathlib import Path

from chat_proxy import create_app, fake_answer
from playwright.async_api import Page, async_playwright, expect

from sanic_streamplus.testing import FakeUpstream, serve_app

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIRST = "Give me a list of what you can do"
SECOND = "Show me some Python code for this, with a code example"
HOLD = 90  # the second answer holds before this block (0: the role chunk), in its code block


async def shoot(page: Page, fake: FakeUpstream, path: Path) -> None:
    """One conversation on ``page``: a first answer in full, a second held mid-stream; then the
    screenshot, then let the stream finish."""
    fake.model = replace(fake.model, hold_before=None)
    await page.fill("#prompt", FIRST)
    await page.press("#prompt", "Enter")
    await expect(page.locator(".turn.assistant").last).to_have_attribute("data-state", "done")
    fake.released.clear()
    fake.model = replace(fake.model, hold_before=HOLD)
    seen = len(fake.requests)
    await page.fill("#prompt", SECOND)
    await page.press("#prompt", "Enter")
    request = await fake.wait_requests(seen + 1, 10)
    for _ in range(100):  # until the fake model holds the stream open
        if request.held:
            break
        await asyncio.sleep(0.05)
    await page.wait_for_timeout(400)  # the last tokens drawn
    await page.screenshot(path=path)
    print(f"wrote {path}")
    fake.release()
    await expect(page.locator(".turn.assistant").last).to_have_attribute("data-state", "done")


async def main(out: Path, chromium: str) -> None:
    async with FakeUpstream(delay=0.01, answer=fake_answer) as fake:
        app = create_app(fake.url, name="screenshots")
        async with serve_app(app) as url, async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium, args=FLAGS)
            desktop = await browser.new_context(
                viewport={"width": 1280, "height": 800}, color_scheme="light"
            )
            page = await desktop.new_page()
            await page.goto(url + "/")
            await shoot(page, fake, out / "chat-desktop.png")
            phone = await browser.new_context(
                viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                has_touch=True, color_scheme="dark",
            )
            page = await phone.new_page()
            await page.goto(url + "/")
            await shoot(page, fake, out / "chat-mobile.png")
            await browser.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs" / "img")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(main(args.out, args.chromium))
