"""The README's two set-up commands, as written there, for .ci/run.

    python3 .ci/readme.py demo     print the first command (run the example)
    python3 .ci/readme.py test     print the second (run the tests)
    python3 .ci/readme.py smoke    run the first command as a user would, in this checkout (its
                                   .venv must not exist yet: a venv with no extras), and check the
                                   example streams: POST /v1/chat/completions with "stream": true
                                   reads to `data: [DONE]`, GET / serves the page; then stop it by
                                   its PID (its process group). Exit 1, with the log, if not.

Only the standard library: this runs before anything is installed.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST, PORT = "127.0.0.1", 8000  # the example's defaults: the README's command gives no flags
START_LIMIT = 600.0  # seconds for the venv, the install and the start (a loose bound)


def commands() -> tuple[str, str]:
    """The first two ``sh`` blocks of the README's "Quick start" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)\n```", section, re.S)
    if len(blocks) < 2:
        sys.exit("README.md: the Quick start section needs two ```sh blocks (demo, tests)")
    return blocks[0].strip(), blocks[1].strip()


def stream_once() -> str:
    """POST a streaming chat completion to the example; the body as text."""
    body = {"model": "any", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    conn = http.client.HTTPConnection(HOST, PORT, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    if response.status != 200 or "text/event-stream" not in response.getheader("content-type", ""):
        raise AssertionError(f"POST answered {response.status}: {text[:500]}")
    return text


def page() -> str:
    conn = http.client.HTTPConnection(HOST, PORT, timeout=30)
    conn.request("GET", "/")
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    if response.status != 200 or "<html" not in text.lower():
        raise AssertionError(f"GET / answered {response.status}: {text[:300]}")
    return text


def smoke() -> int:
    demo, _ = commands()
    if (ROOT / ".venv").exists():
        sys.exit("smoke: .venv exists already; the README's first command must make it bare")
    log = tempfile.NamedTemporaryFile("w+", prefix="demo-", suffix=".log", delete=False)
    print(f"smoke: running the README's first command: {demo}", flush=True)
    process = subprocess.Popen(["bash", "-c", demo], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    started = time.monotonic()
    try:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the command exited with {process.returncode}")
            try:
                text = stream_once()
                break
            except (ConnectionError, OSError):
                if time.monotonic() - started > START_LIMIT:
                    raise AssertionError("the example did not listen in time") from None
                time.sleep(0.5)
        if not text.rstrip().endswith("data: [DONE]"):
            raise AssertionError(f"the stream did not end with data: [DONE]: {text[-500:]}")
        page()
        print(f"smoke: streamed {text.count('data: ')} events to [DONE] and served the page, "
              f"{time.monotonic() - started:.0f} s after the command started", flush=True)
        return 0
    except AssertionError as failure:
        log.seek(0)
        print(f"smoke: FAILED: {failure}\n--- the command's output ---\n{log.read()[-5000:]}")
        return 1
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # its PID is its process group's
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "smoke":
        sys.exit(smoke())
    if what in ("demo", "test"):
        print(commands()[what == "test"])
    else:
        sys.exit(__doc__)
