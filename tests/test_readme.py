"""The app of the README's Usage section (and of docs/quickstart.md), run as written.

The snippet is read from the file itself, so the test fails when the docs drift: saved as
``app.py`` and run with ``python app.py`` in its own process, pointed at a fake upstream through
the environment variables it reads (``UPSTREAM_URL``, ``UPSTREAM_API_KEY``, ``PORT``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import completions_body, free_port

from sanic_streamplus import SSEDecoder
from sanic_streamplus.testing import FakeUpstream, fake_tokens

ROOT = Path(__file__).resolve().parent.parent


def snippet(path: Path, heading: str) -> str:
    """The first ``python`` code block after ``heading`` in the Markdown file ``path``."""
    text = path.read_text(encoding="utf-8")
    found = re.search(rf"^{re.escape(heading)}\n.*?^```python\n(.*?)^```$", text, re.M | re.S)
    assert found, f"{path.name} has no python block under {heading!r}"
    return found.group(1)


@pytest.mark.parametrize(
    ("doc", "heading"), [("README.md", "## Usage"), ("docs/quickstart.md", "## Your own app")]
)
async def test_the_usage_snippet_runs_as_written(
    doc: str, heading: str, tmp_path: Path
) -> None:
    code = snippet(ROOT / doc, heading)
    (tmp_path / "app.py").write_text(code, encoding="utf-8")
    port = free_port()
    async with FakeUpstream(tokens=6, delay=0.001) as upstream:
        env = {**os.environ, "UPSTREAM_URL": upstream.url, "UPSTREAM_API_KEY": "sk-readme"}
        env["PORT"] = str(port)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        process = await asyncio.create_subprocess_exec(
            sys.executable, "app.py", cwd=tmp_path, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                for _ in range(400):  # up to 20 s for the process to listen
                    try:
                        await client.get(url + "/")
                        break
                    except httpx.TransportError:
                        assert process.returncode is None, f"python app.py ({doc}) exited"
                        await asyncio.sleep(0.05)
                relayed = await client.post(url + "/v1/chat/completions", json=completions_body())
                chat = await client.post(url + "/chat", json=completions_body())
        finally:
            if process.returncode is None:
                process.terminate()
            await asyncio.wait_for(process.wait(), 10)
    assert relayed.status_code == 200, relayed.text
    events = SSEDecoder().feed(relayed.content)
    assert events[-1].data == "[DONE]"
    text = "".join(
        json.loads(e.data)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
    )
    assert text == "".join(fake_tokens(6))
    assert chat.status_code == 200, chat.text
    chunks = [json.loads(e.data)["chunk"] for e in SSEDecoder().feed(chat.content)]
    assert len(chunks) >= 6 and all(chunk.startswith("{") for chunk in chunks)
    assert {r.headers.get("authorization") for r in upstream.requests} == {"Bearer sk-readme"}
