"""sanic-streamplus against the alternatives, side by side, in one run.

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python bench/run.py [--quick] [--json PATH] [--chart PATH] [--peers a,b,...]

Starts one upstream (``bench/upstream.py``) and every peer on its own 127.0.0.1 port, all
forwarding ``POST /v1/chat/completions`` to that upstream: ``direct`` (no proxy: the limit),
``nginx`` (``proxy_buffering off``, when nginx is installed), ``sse-starlette``, ``aiohttp``
(one write per event), ``naive-sanic`` (one send per event), ``sanic-httpx-raw`` (the stack's
floor: Sanic + httpx on httpx-aiohttp's transport, ``aiter_raw()`` chunks sent as they come)
and ``streamplus`` (the example proxy's pass-through route) with
``streamplus-transform`` (its ``/chat`` route: JSON parse of every chunk, re-emitted as token
events). Optional peers, only when named in ``--peers``: ``streamplus-httpcore`` (httpx's stock
transport), ``streamplus-resume-memory`` and ``streamplus-resume-redis`` (the example's
resumable route, ``POST /resumable/v1/chat/completions``, with its in-memory event store, or
with Redis Streams on a private ``redis-server`` that the run starts on a free port and stops),
``streamplus-observed`` (Prometheus metrics and OpenTelemetry spans switched on).
Each scenario runs its peers interleaved (A B C … then again in a rotated order) so that machine
noise hits all of them alike, and takes the median over rounds (``--rounds`` sets how many); the
JSON keeps every round, and the ratios of ``streamplus`` to each peer are taken round by round
(the peers of one round ran side by side) and given as median, min and max. Every stream is verified
(``bench/client.py``): a peer that loses or mangles an event is flagged, and not timed.

CPU is the proxy process tree's own run time (``/proc/<pid>/task/*/schedstat``, nanoseconds),
memory its resident set (``VmRSS``); the Redis peer's ``redis-server`` is counted apart
(``redis_cpu_us_per_event``). Ratios are the headline: absolute figures depend on the
machine. ``--quick`` runs in under a minute, the full run in under ten.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import client

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CHAT = "/v1/chat/completions"
RESUMABLE_CHAT = "/resumable/v1/chat/completions"
STARTED = time.monotonic()  # reset by main(); progress lines show the time since


def progress(message: str) -> None:
    """One progress line on stderr, stamped with the time since the run started (stdout is
    kept for the results)."""
    print(f"[{time.monotonic() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(child) for child in task.read_text().split())
    return pids


def cpu_seconds(pid: int) -> float:
    """Run time of the process tree of ``pid`` so far, in seconds (all threads)."""
    total = 0
    for member in tree(pid):
        for stat in Path(f"/proc/{member}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, ValueError):
                total += int(stat.read_text().split()[0])
    return total / 1e9


def rss_bytes(pid: int) -> int:
    """Resident set of the process tree of ``pid``, in bytes."""
    total = 0
    for member in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


async def wait_port(port: int, process: subprocess.Popen[bytes] | None, name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before listening")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on {port} within 30 s")


@dataclass
class Peer:
    """One way of serving the stream: a process (None for ``direct``), its port and route."""

    name: str
    port: int
    path: str = CHAT
    pid: int | None = None
    transform: bool = False
    helper_pid: int | None = None  # a process the peer needs, measured apart (redis-server)


@dataclass
class Fleet:
    upstream_port: int
    upstream_pid: int
    peers: list[Peer]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


PEER_SCRIPTS = {
    "sse-starlette": "bench/peers/starlette_sse.py",
    "aiohttp": "bench/peers/aiohttp_proxy.py",
    "naive-sanic": "bench/peers/naive_sanic.py",
    "sanic-httpx-raw": "bench/peers/sanic_httpx_raw.py",
}
ALL_PEERS = [
    "direct",
    "nginx",
    "sse-starlette",
    "aiohttp",
    "naive-sanic",
    "sanic-httpx-raw",
    "streamplus",
    "streamplus-transform",
]
OPTIONAL_PEERS = [
    "streamplus-httpcore",  # httpx's stock transport, for comparison
    "streamplus-resume-memory",  # the resumable route, events in the proxy's memory
    "streamplus-resume-redis",  # the resumable route, events in a private redis-server
    "streamplus-observed",  # Prometheus metrics and OpenTelemetry spans on (STREAMPLUS_METRICS)
]
STREAMPLUS_PEERS = ("streamplus", *OPTIONAL_PEERS)


async def start_redis(
    spawn: Callable[[list[str]], subprocess.Popen[bytes]], workdir: str
) -> tuple[subprocess.Popen[bytes], str] | None:
    """A private redis-server on a free 127.0.0.1 port, no persistence; None if not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    directory = tempfile.mkdtemp(dir=workdir)
    process = spawn(
        [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--dir", directory,
            "--daemonize", "no",
        ]
    )  # fmt: skip
    await wait_port(port, process, "redis-server")
    return process, f"redis://127.0.0.1:{port}/0"


@contextlib.asynccontextmanager
async def fleet(names: list[str], workdir: str, env: dict[str, str]) -> Any:
    processes: list[subprocess.Popen[bytes]] = []

    def spawn(args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **env, **(extra_env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        return process

    try:
        upstream_port = free_port()
        progress(f"starting the upstream and {len(names)} peers: {', '.join(names)}")
        up = spawn([PY, "bench/upstream.py", "--port", str(upstream_port)])
        await wait_port(upstream_port, up, "upstream")
        url = f"http://127.0.0.1:{upstream_port}/v1"
        peers: list[Peer] = []
        streamplus: Peer | None = None
        for name in names:
            if name == "direct":
                peers.append(Peer(name, upstream_port))
                continue
            if name == "streamplus-transform":
                if streamplus is None:
                    raise SystemExit("streamplus-transform needs the streamplus peer")
                peers.append(Peer(name, streamplus.port, "/chat", streamplus.pid, True))
                continue
            port = free_port()
            path, helper_pid = CHAT, None
            if name == "nginx":
                from peers import nginx

                if not nginx.nginx_available():
                    progress("nginx is not installed: its column is left out")
                    continue
                process = nginx.start_nginx(port, url, tempfile.mkdtemp(dir=workdir))
                processes.append(process)
            elif name in STREAMPLUS_PEERS:
                transport = "httpcore" if name.endswith("httpcore") else "aiohttp"
                settings = {
                    "SANIC_STREAMPLUS_MAX_CONNECTIONS": "4000",
                    "SANIC_STREAMPLUS_MAX_STREAMS": "4000",
                    "SANIC_STREAMPLUS_TRANSPORT": transport,
                }
                if name == "streamplus-observed":
                    settings["SANIC_STREAMPLUS_METRICS"] = "true"
                    settings["SANIC_STREAMPLUS_OTEL"] = "true"
                elif name == "streamplus-resume-memory":
                    path = RESUMABLE_CHAT
                    settings["SANIC_STREAMPLUS_RESUME_STORE"] = "memory"
                elif name == "streamplus-resume-redis":
                    path = RESUMABLE_CHAT
                    redis = await start_redis(spawn, workdir)
                    if redis is None:
                        progress(
                            "redis-server is not installed (apt-get install redis-server): "
                            "the streamplus-resume-redis column is left out"
                        )
                        continue
                    helper_pid = redis[0].pid
                    settings["SANIC_STREAMPLUS_RESUME_STORE"] = "redis"
                    settings["SANIC_STREAMPLUS_REDIS_URL"] = redis[1]
                process = spawn(
                    [PY, "examples/chat_proxy.py", "--port", str(port), "--upstream", url],
                    settings,
                )
            elif name in PEER_SCRIPTS:
                process = spawn([PY, PEER_SCRIPTS[name], "--port", str(port), "--upstream", url])
            else:
                known = ", ".join(ALL_PEERS + OPTIONAL_PEERS)
                raise SystemExit(f"unknown peer {name!r}; peers: {known}")
            await wait_port(port, process, name)
            peer = Peer(name, port, path, pid=process.pid, helper_pid=helper_pid)
            peers.append(peer)
            if name == "streamplus":
                streamplus = peer
        yield Fleet(upstream_port, up.pid, peers, processes)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- scenarios ------------------------------------------------------------------------------

Metrics = dict[str, float]


class Failed(Exception):
    """A peer lost or mangled a stream: its figures for this run are not kept."""


def checked(results: list[client.Result]) -> list[client.Result]:
    bad = [result for result in results if not result.ok]
    if bad:
        raise Failed(f"{len(bad)}/{len(results)} streams failed: {bad[0].error}")
    return results


@contextlib.contextmanager
def cpu(peer: Peer) -> Iterator[dict[str, float]]:
    """Measure the peer's CPU seconds over the block (0 for ``direct``)."""
    out: dict[str, float] = {}
    before = cpu_seconds(peer.pid) if peer.pid else 0.0
    helper_before = cpu_seconds(peer.helper_pid) if peer.helper_pid else 0.0
    yield out
    out["cpu"] = (cpu_seconds(peer.pid) - before) if peer.pid else 0.0
    if peer.helper_pid:
        out["helper_cpu"] = cpu_seconds(peer.helper_pid) - helper_before


def cpu_per_event(used: dict[str, float], events: int) -> Metrics:
    """CPU µs per event of the peer, and of its helper process apart when it has one."""
    metrics = {"cpu_us_per_event": used["cpu"] / events * 1e6}
    if "helper_cpu" in used:
        metrics["redis_cpu_us_per_event"] = used["helper_cpu"] / events * 1e6
    return metrics


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_stream(peer: Peer, fleet_: Fleet, quick: bool) -> Metrics:
    """One stream as fast as possible, repeated until enough time has passed to measure."""
    events, budget = (20_000, 0.4) if quick else (50_000, 1.5)
    total_events, elapsed = 0, 0.0
    with cpu(peer) as used:
        while elapsed < budget:
            (result,) = checked(
                [
                    await client.stream(
                        peer.port, peer.path, {"events": events}, transform=peer.transform
                    )
                ]
            )
            assert result.ended_at is not None
            elapsed += result.ended_at - result.sent_at
            total_events += events
    return {"events_per_s": total_events / elapsed} | cpu_per_event(used, total_events)


async def concurrent(peer: Peer, fleet_: Fleet, quick: bool) -> Metrics:
    """100 streams at once, each as fast as possible."""
    streams, events = 100, (200 if quick else 1000)
    with cpu(peer) as used:
        started = time.monotonic()
        results = checked(
            await asyncio.gather(
                *(
                    client.stream(
                        peer.port, peer.path, {"events": events}, transform=peer.transform
                    )
                    for _ in range(streams)
                )
            )
        )
        elapsed = time.monotonic() - started
    total = sum(result.events for result in results)
    return {"events_per_s": total / elapsed} | cpu_per_event(used, total)


async def paced(peer: Peer, fleet_: Fleet, quick: bool, streams: int = 200) -> Metrics:
    """``streams`` streams, each one event every 50 ms (one event per upstream write)."""
    interval = 0.05
    events = 30 if quick else 100
    knobs = {"events": events, "interval": interval}

    async def start(delay: float) -> client.Result:
        await asyncio.sleep(delay)
        return await client.stream(
            peer.port, peer.path, knobs, transform=peer.transform, stamps=True, read_size=16384
        )

    with cpu(peer) as used:
        results = checked(
            await asyncio.gather(*(start(interval * i / streams) for i in range(streams)))
        )
    latencies = [latency for result in results for latency in result.latencies]
    if len(latencies) < streams * events * 0.9:
        raise Failed(f"only {len(latencies)} of {streams * events} events carried a stamp")
    ttfbs = [result.ttfb for result in results if result.ttfb is not None]
    total = sum(result.events for result in results)
    return cpu_per_event(used, total) | {
        "latency_p50_ms": percentile(latencies, 0.5) * 1e3,
        "latency_p99_ms": percentile(latencies, 0.99) * 1e3,
        "ttfb_p50_ms": percentile(ttfbs, 0.5) * 1e3,
        "ttfb_p99_ms": percentile(ttfbs, 0.99) * 1e3,
    }


SUSTAINED = {"streams": 1000, "seconds": 60.0, "interval": 0.5}  # set by --sustained-*


async def sustained(peer: Peer, fleet_: Fleet, quick: bool) -> Metrics:
    """``SUSTAINED["streams"]`` streams at once for ``SUSTAINED["seconds"]`` (a tenth with
    ``--quick``), each one event every ``SUSTAINED["interval"]`` s, started over a ramp of 5 s
    (for 1,000; 200 a second): does the proxy keep up?
    The latency of the events of the first and of the last quarter of every stream (by
    sequence number, so by upstream send time), p50 and p99, and the growth of p50 between
    them (``lag_growth_ms``): a proxy that keeps up has none; one that falls behind has its
    lag grow with the run."""
    interval = SUSTAINED["interval"]
    streams = int(SUSTAINED["streams"])
    events = max(8, int(SUSTAINED["seconds"] * (0.1 if quick else 1.0) / interval))
    knobs = {"events": events, "interval": interval}

    async def start(delay: float) -> client.Result:
        await asyncio.sleep(delay)
        return await client.stream(
            peer.port, peer.path, knobs, transform=peer.transform, stamps=True, read_size=16384
        )

    ramp = max(interval, streams / 200)  # 200 new streams a second at most (accept backlog)
    with cpu(peer) as used:
        results = checked(
            await asyncio.gather(*(start(ramp * i / streams) for i in range(streams)))
        )
    quarter = max(1, events // 4)
    first = [lat for result in results for lat in result.latencies[:quarter]]
    last = [lat for result in results for lat in result.latencies[-quarter:]]
    if len(first) + len(last) < streams * 2 * quarter * 0.9:
        raise Failed(f"only {len(first) + len(last)} of {streams * 2 * quarter} stamps")
    total = sum(result.events for result in results)
    return cpu_per_event(used, total) | {
        "first_p50_ms": percentile(first, 0.5) * 1e3,
        "first_p99_ms": percentile(first, 0.99) * 1e3,
        "last_p50_ms": percentile(last, 0.5) * 1e3,
        "last_p99_ms": percentile(last, 0.99) * 1e3,
        "lag_growth_ms": (percentile(last, 0.5) - percentile(first, 0.5)) * 1e3,
    }


async def slow_client(peer: Peer, fleet_: Fleet, quick: bool) -> Metrics:
    """A client reading 128 KB every 4 ms from a fast upstream sending 64 KB events."""
    if peer.pid is None:
        return {}
    size = 65536
    events = (20 if quick else 100) * (1 << 20) // size
    before = rss_bytes(peer.pid)
    peak = before
    task = asyncio.ensure_future(
        client.stream(
            peer.port,
            peer.path,
            {"events": events, "size": size},
            transform=peer.transform,
            read_size=131072,
            read_pause=0.004,
        )
    )
    while not task.done():
        peak = max(peak, rss_bytes(peer.pid))
        await asyncio.sleep(0.02)
    checked([task.result()])
    return {"rss_growth_mb": (peak - before) / (1 << 20), "upstream_mb": events * size / (1 << 20)}


async def disconnects(peer: Peer, fleet_: Fleet, quick: bool) -> Metrics:
    """Clients that leave after 3 events: how long until the upstream sees its connection close."""
    if peer.path == RESUMABLE_CHAT:  # its producer outlives the client (resume_grace) by design
        return {}
    count = 20 if quick else 50
    prefix = f"{peer.name}-{time.monotonic_ns()}-"
    gone: dict[str, float] = {}
    for i in range(count):
        tag = f"{prefix}{i}"
        (result,) = checked(
            [
                await client.stream(
                    peer.port,
                    peer.path,
                    {"events": 10_000, "interval": 0.005, "tag": tag},
                    transform=peer.transform,
                    disconnect_after=3,
                )
            ]
        )
        assert result.disconnected_at is not None
        gone[tag] = result.disconnected_at
    deadline = time.monotonic() + 2.0
    while True:
        closed = (await client.get_json(fleet_.upstream_port, "/stats"))["closed"]
        if all(tag in closed for tag in gone) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    delays = [closed[tag] - at for tag, at in gone.items() if tag in closed]
    return {
        "close_p50_ms": percentile(delays, 0.5) * 1e3 if delays else float("nan"),
        "close_p99_ms": percentile(delays, 0.99) * 1e3 if delays else float("nan"),
        "leaked": float(count - len(delays)),
    }


async def idle(peer: Peer, fleet_: Fleet, quick: bool) -> Metrics:
    """Many open streams that got one event and then nothing: resident memory per stream."""
    if peer.pid is None or peer.transform:  # no proxy; or the same process as streamplus
        return {}
    count = 200 if quick else 1000
    release = asyncio.Event()
    arrived = 0
    all_arrived = asyncio.Event()

    async def held() -> None:
        nonlocal arrived
        arrived += 1
        if arrived == count:
            all_arrived.set()
        await release.wait()

    before = rss_bytes(peer.pid)
    tasks = [
        asyncio.ensure_future(
            client.stream(
                peer.port,
                peer.path,
                {"events": 1, "hold": True},
                transform=peer.transform,
                hold=held,
            )
        )
        for _ in range(count)
    ]
    try:
        await asyncio.wait_for(all_arrived.wait(), 60)
    except TimeoutError:
        release.set()
        await asyncio.gather(*tasks)
        raise Failed(f"only {arrived} of {count} idle streams got their first event") from None
    await asyncio.sleep(0.5)
    during = rss_bytes(peer.pid)
    release.set()
    checked(await asyncio.gather(*tasks))
    return {"rss_kb_per_stream": (during - before) / count / 1024}


Scenario = Callable[[Peer, Fleet, bool], Awaitable[Metrics]]
SCENARIOS: dict[str, tuple[Scenario, int]] = {  # name: (function, rounds in a full run)
    "idle": (idle, 1),  # first: before the other scenarios have grown every heap
    "one_stream": (one_stream, 3),
    "concurrent_100": (concurrent, 3),
    "paced_200x20": (paced, 3),
    "slow_client": (slow_client, 1),
    "disconnect": (disconnects, 1),
}
OPTIONAL_SCENARIOS: dict[str, tuple[Scenario, int]] = {  # run only when named in --scenarios
    # a light load: per-event costs without queueing, where a peer saturates under 200x20
    "paced_20x20": (functools.partial(paced, streams=20), 3),
    # many streams for a long run (--sustained-streams, --sustained-seconds, -interval)
    "sustained_1000": (sustained, 1),
}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    names = args.peers.split(",") if args.peers else ALL_PEERS
    chosen = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    known = SCENARIOS | OPTIONAL_SCENARIOS
    unknown = [name for name in chosen if name not in known and name != "decoder"]
    if unknown:
        raise SystemExit(f"unknown scenario {unknown[0]!r}; scenarios: {', '.join(known)}")
    scenarios = [name for name in chosen if name in known]
    report: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        async with fleet(names, workdir, {}) as fl:
            # warm every peer up (imports, pools, JIT-free but cache-warm)
            progress(f"warming up {len(fl.peers)} peers")
            for peer in fl.peers:
                checked(
                    await asyncio.gather(
                        *(
                            client.stream(
                                peer.port, peer.path, {"events": 200}, transform=peer.transform
                            )
                            for _ in range(4)
                        )
                    )
                )
            steps = len(fl.peers) * sum(
                args.rounds or (1 if args.quick else known[name][1]) for name in scenarios
            )
            step = 0
            for number, name in enumerate(scenarios, 1):
                function, full_rounds = known[name]
                rounds = args.rounds or (1 if args.quick else full_rounds)
                runs: dict[str, list[Metrics]] = {peer.name: [] for peer in fl.peers}
                numbers: dict[str, list[int]] = {peer.name: [] for peer in fl.peers}
                failures: dict[str, str] = {}
                started = time.monotonic()
                for round_ in range(rounds):
                    order = fl.peers[round_ % len(fl.peers) :] + fl.peers[: round_ % len(fl.peers)]
                    for peer in order:
                        step += 1
                        progress(
                            f"step {step}/{steps}: scenario {number}/{len(scenarios)} {name}, "
                            f"round {round_ + 1}/{rounds}, {peer.name}"
                        )
                        began = time.monotonic()
                        try:
                            metrics = await function(peer, fl, args.quick)
                        except Failed as exc:
                            failures[peer.name] = str(exc)
                            progress(f"  {peer.name} failed: {exc}")
                            continue
                        if metrics:
                            runs[peer.name].append(metrics)
                            numbers[peer.name].append(round_)
                        else:
                            progress(f"  {peer.name}: not measured in {name}")
                        if time.monotonic() - began >= 10:
                            progress(f"  {peer.name}: {time.monotonic() - began:.1f} s")
                report["scenarios"][name] = {
                    "seconds": round(time.monotonic() - started, 1),
                    "peers": {
                        peer: {
                            key: statistics.median(run_[key] for run_ in peer_runs)
                            for key in peer_runs[0]
                        }
                        | {"runs": len(peer_runs)}
                        for peer, peer_runs in runs.items()
                        if peer_runs
                    },
                    "rounds": {
                        peer: [
                            {"round": n} | m
                            for n, m in zip(numbers[peer], peer_runs, strict=True)
                        ]
                        for peer, peer_runs in runs.items()
                        if peer_runs
                    },
                    "failures": failures,
                }
                print("\n" + scenario_markdown(name, report["scenarios"][name]), file=sys.stderr)
    if not args.scenarios or "decoder" in chosen:
        import decoder

        progress("decoder: ours vs httpx-sse (bench/decoder.py)")
        report["decoder"] = decoder.run(args.quick)
        progress(f"decoder: done in {report['decoder']['elapsed_s']:.1f} s")
    report["headline"] = headline(report["scenarios"], report.get("decoder"))
    report["ratios"] = paired_ratios(report["scenarios"])
    cost = resume_cost(report["scenarios"])
    if cost:
        report["resume_cost"] = cost
    return report


# --- reporting ------------------------------------------------------------------------------


def ratio(scenarios: dict[str, Any], scenario: str, metric: str, a: str, b: str) -> float | None:
    peers = scenarios.get(scenario, {}).get("peers", {})
    if a not in peers or b not in peers or not peers[b].get(metric):
        return None
    return float(peers[a][metric] / peers[b][metric])


def added(scenarios: dict[str, Any], metric: str, peer: str) -> float | None:
    """Latency a peer adds over ``direct`` in the paced scenario (ms)."""
    peers = scenarios.get("paced_200x20", {}).get("peers", {})
    if peer not in peers or "direct" not in peers:
        return None
    return float(peers[peer][metric] - peers["direct"][metric])


def headline(scenarios: dict[str, Any], decoding: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's targets, each as a measured ratio against its bound."""
    rows: list[dict[str, Any]] = []

    def target(what: str, value: float | None, bound: float) -> None:
        rows.append(
            {
                "target": what,
                "measured": None if value is None else round(value, 3),
                "bound": bound,
                "met": None if value is None else value <= bound,
            }
        )

    sp, tr = "streamplus", "streamplus-transform"
    cpu = "cpu_us_per_event"
    target(
        "one stream: CPU/event vs aiohttp", ratio(scenarios, "one_stream", cpu, sp, "aiohttp"), 0.2
    )
    target(
        "one stream: CPU/event vs sse-starlette",
        ratio(scenarios, "one_stream", cpu, sp, "sse-starlette"),
        0.05,
    )
    events_ratio = ratio(scenarios, "one_stream", "events_per_s", "aiohttp", sp)
    target("one stream: aiohttp events/s vs ours", events_ratio, 0.25)
    target(
        "transform: CPU/event vs aiohttp pass-through",
        ratio(scenarios, "one_stream", cpu, tr, "aiohttp"),
        0.5,
    )
    target(
        "200x20: CPU/event vs aiohttp", ratio(scenarios, "paced_200x20", cpu, sp, "aiohttp"), 0.6
    )
    target("200x20: CPU/event vs nginx", ratio(scenarios, "paced_200x20", cpu, sp, "nginx"), 1.5)
    ours, theirs = (
        added(scenarios, "latency_p99_ms", sp),
        added(scenarios, "latency_p99_ms", "nginx"),
    )
    target(
        "200x20: added latency p99 vs nginx's",
        None if ours is None or theirs is None else ours / max(theirs, 0.01),
        1.5,
    )
    target(
        "200x20: TTFB p99 vs aiohttp",
        ratio(scenarios, "paced_200x20", "ttfb_p99_ms", sp, "aiohttp"),
        1.0,
    )
    disconnect = scenarios.get("disconnect", {}).get("peers", {}).get(sp, {})
    target("disconnect: close p99 (ms)", disconnect.get("close_p99_ms"), 10.0)
    target("disconnect: leaks", disconnect.get("leaked"), 0.0)
    slow = scenarios.get("slow_client", {}).get("peers", {}).get(sp, {})
    target("slow client: RSS growth (MB)", slow.get("rss_growth_mb"), 2.0)
    target(
        "idle: RSS/stream vs aiohttp",
        ratio(scenarios, "idle", "rss_kb_per_stream", sp, "aiohttp"),
        1.0,
    )
    if decoding is not None:
        chunks = decoding["throughput"]["chunks"]
        target(
            "decoder: httpx-sse MB/s vs ours (4 KB chunks)",
            1 / chunks["4096"]["ratio_ours_over_httpx_sse"],
            round(1 / 3, 3),
        )
        for size, linear in decoding["linear"]["chunks"].items():
            target(
                f"decoder: 10x bigger event, time x ({size} B chunks)",
                linear.get("ours_median_ratio"),
                15.0,
            )
    return rows


COMPARED = [  # (scenario, metric, column title) of the ratio table
    ("one_stream", "cpu_us_per_event", "one stream CPU/event"),
    ("concurrent_100", "cpu_us_per_event", "100 streams CPU/event"),
    ("paced_200x20", "cpu_us_per_event", "200×20 CPU/event"),
    ("paced_200x20", "latency_p99_ms", "200×20 latency p99"),
    ("paced_200x20", "ttfb_p99_ms", "200×20 TTFB p99"),
    ("paced_20x20", "cpu_us_per_event", "20×20 CPU/event"),
    ("idle", "rss_kb_per_stream", "idle RSS/stream"),
]


def paired_ratios(
    scenarios: dict[str, Any], ours: str = "streamplus"
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``ours`` over every other peer, round by round, for each metric of :data:`COMPARED`.

    The peers of one round ran side by side, so a round's ratio shares that round's machine
    noise; each ratio is given as ``median``, ``min`` and ``max`` over the rounds both peers
    completed (``rounds``). Peers with a zero figure (``direct``'s CPU) are left out."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for scenario, metric, _ in COMPARED:
        rounds = scenarios.get(scenario, {}).get("rounds", {})
        mine = {run_["round"]: run_.get(metric) for run_ in rounds.get(ours, [])}
        rows: dict[str, dict[str, float]] = {}
        for peer, peer_rounds in rounds.items():
            if peer == ours:
                continue
            values = [
                mine[run_["round"]] / run_[metric]
                for run_ in peer_rounds
                if run_.get(metric) and mine.get(run_["round"]) is not None
            ]
            if values:
                rows[peer] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "rounds": len(values),
                }
        if rows:
            out.setdefault(scenario, {})[metric] = rows
    return out


def ratios_markdown(ratios: dict[str, Any], ours: str = "streamplus") -> str:
    """:func:`paired_ratios` as one Markdown table: a row per peer, a column per figure, each
    cell ``median (min–max)`` of ``ours ÷ peer`` over the rounds (below 1: ``ours`` is lower)."""
    columns = [c for c in COMPARED if c[1] in ratios.get(c[0], {})]
    if not columns:
        return ""
    peers = list(dict.fromkeys(p for s, m, _ in columns for p in ratios[s][m]))
    lines = [f"**{ours} ÷ peer** (median over rounds, min–max; below 1: {ours} is lower)", ""]
    lines.append("| peer | " + " | ".join(title for _, _, title in columns) + " |")
    lines.append("|---|" + "---:|" * len(columns))
    for peer in peers:
        cells = []
        for scenario, metric, _ in columns:
            cell = ratios[scenario][metric].get(peer)
            if cell is None:
                cells.append("-")
            elif cell["rounds"] > 1:
                cells.append(f"{cell['median']:.2f} ({cell['min']:.2f}–{cell['max']:.2f})")
            else:
                cells.append(f"{cell['median']:.2f}")
        lines.append(f"| {peer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


RESUME_PEERS = {"memory": "streamplus-resume-memory", "redis": "streamplus-resume-redis"}


def resume_cost(scenarios: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """What resumption adds over ``streamplus`` (resumption off), per scenario and metric.

    For each store measured: its median, minus off's median (``<store>_minus_off``) and over
    it (``<store>_over_off``). Empty unless ``streamplus`` and a resumable peer both ran."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, scenario in scenarios.items():
        peers = scenario.get("peers", {})
        off = peers.get("streamplus")
        stores = {store: peers[peer] for store, peer in RESUME_PEERS.items() if peer in peers}
        if off is None or not stores:
            continue
        rows: dict[str, dict[str, float]] = {}
        for metric, base in off.items():
            if metric == "runs" or not isinstance(base, int | float):
                continue
            row = {"off": float(base)}
            for store, metrics in stores.items():
                if metric in metrics:
                    row[store] = float(metrics[metric])
                    row[f"{store}_minus_off"] = row[store] - base
                    row[f"{store}_over_off"] = row[store] / base if base else float("nan")
            rows[metric] = row
        out[name] = rows
    return out


def resume_markdown(cost: dict[str, dict[str, dict[str, float]]]) -> str:
    """:func:`resume_cost` as Markdown tables: off, then each store with − off and ÷ off."""
    parts = []
    for name, rows in cost.items():
        stores = [store for store in RESUME_PEERS if any(store in row for row in rows.values())]
        head = ["metric", "off"]
        for store in stores:
            head += [store, f"{store} − off", f"{store} ÷ off"]
        lines = [f"**resumption: {name}**", "", "| " + " | ".join(head) + " |"]
        lines.append("|---|" + "---:|" * (len(head) - 1))
        for metric, row in rows.items():
            cells = [metric, f"{row['off']:.2f}"]
            for store in stores:
                if store not in row:
                    cells += ["-", "-", "-"]
                    continue
                cells += [
                    f"{row[store]:.2f}",
                    f"{row[f'{store}_minus_off']:+.2f}",
                    f"{row[f'{store}_over_off']:.2f}×",
                ]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def headline_markdown(rows: list[dict[str, Any]]) -> str:
    """The targets as a Markdown table (streamplus; ratio = ours / theirs unless stated)."""
    lines = ["| target | measured | bound | |", "|---|---:|---:|---|"]
    for row in rows:
        met = {True: "met", False: "**missed**", None: "n/a"}[row["met"]]
        value = "-" if row["measured"] is None else f"{row['measured']:.3f}"
        lines.append(f"| {row['target']} | {value} | ≤ {row['bound']} | {met} |")
    return "\n".join(lines)


def scenario_markdown(name: str, scenario: dict[str, Any]) -> str:
    """One scenario's medians as a Markdown table, each with its rounds' min–max when there
    were several, failed peers last."""
    peers = scenario["peers"]
    keys = [key for key in dict.fromkeys(k for m in peers.values() for k in m) if key != "runs"]
    lines = [f"**{name}** ({scenario['seconds']} s)", ""]
    lines.append("| peer | " + " | ".join(keys) + " | runs |")
    lines.append("|---|" + "---:|" * (len(keys) + 1))

    def cell(peer: str, key: str) -> str:
        if key not in peers[peer]:
            return "-"
        values = [run_[key] for run_ in scenario.get("rounds", {}).get(peer, []) if key in run_]
        if len(values) < 2:
            return f"{peers[peer][key]:.2f}"
        return f"{peers[peer][key]:.2f} ({min(values):.2f}–{max(values):.2f})"

    for peer, metrics in peers.items():
        cells = " | ".join(cell(peer, key) for key in keys)
        lines.append(f"| {peer} | {cells} | {metrics['runs']} |")
    for peer, why in scenario["failures"].items():
        lines.append(f"| {peer} | failed: {why} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """The headline and every scenario's table, as Markdown (medians over rounds)."""
    parts = [headline_markdown(report["headline"])]
    if report.get("ratios"):
        parts.append(ratios_markdown(report["ratios"]))
    parts += [scenario_markdown(name, scenario) for name, scenario in report["scenarios"].items()]
    if report.get("resume_cost"):
        parts.append(resume_markdown(report["resume_cost"]))
    return "\n\n".join(parts) + "\n"


def chart(report: dict[str, Any], path: str) -> None:
    """Bar charts of CPU per event and idle memory per stream, one panel per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("one_stream", "cpu_us_per_event", "one stream: CPU µs per event"),
        ("paced_200x20", "cpu_us_per_event", "200 streams × 20 ev/s: CPU µs per event"),
        ("paced_200x20", "latency_p99_ms", "200 × 20: latency p99 (ms)"),
        ("idle", "rss_kb_per_stream", "idle streams: RSS KB per stream"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for axis, (scenario, metric, title) in zip(axes, panels, strict=True):
        peers = report["scenarios"].get(scenario, {}).get("peers", {})
        names = [name for name in peers if metric in peers[name] and name != "direct"]
        values = [peers[name][metric] for name in names]
        colors = ["#d62728" if name.startswith("streamplus") else "#7f7f7f" for name in names]
        axis.barh(names, values, color=colors)
        axis.set_title(title, fontsize=9)
        axis.invert_yaxis()
        axis.tick_params(labelsize=8)
    figure.suptitle(f"sanic-streamplus vs alternatives ({report['mode']} run, lower is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--chart", help="write a PNG chart here (needs matplotlib)")
    parser.add_argument("--markdown", help="write the tables here as Markdown")
    parser.add_argument(
        "--peers", help=f"comma-separated, of {','.join(ALL_PEERS + OPTIONAL_PEERS)}"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds of every chosen scenario (default: 1 with --quick, else each scenario's own)",
    )
    parser.add_argument(
        "--scenarios",
        help=f"comma-separated, of {','.join([*SCENARIOS, 'decoder', *OPTIONAL_SCENARIOS])}",
    )
    parser.add_argument(
        "--sustained-seconds",
        type=float,
        default=SUSTAINED["seconds"],
        help="length of the sustained_1000 scenario's streams, in seconds (default 60)",
    )
    parser.add_argument(
        "--sustained-streams",
        type=int,
        default=int(SUSTAINED["streams"]),
        help="concurrent streams of the sustained_1000 scenario (default 1000)",
    )
    parser.add_argument(
        "--sustained-interval",
        type=float,
        default=SUSTAINED["interval"],
        help="seconds between two events of one sustained_1000 stream (default 0.5)",
    )
    args = parser.parse_args()
    SUSTAINED.update(
        seconds=args.sustained_seconds,
        streams=args.sustained_streams,
        interval=args.sustained_interval,
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 16384), hard), hard))
    random.seed(0)
    global STARTED
    started = STARTED = time.monotonic()
    progress(f"{'quick' if args.quick else 'full'} run; progress goes to stderr, results to stdout")
    try:
        import uvloop

        report = uvloop.run(run(args))
    except ImportError:
        report = asyncio.run(run(args))
    report["seconds"] = round(time.monotonic() - started, 1)
    print("\n" + headline_markdown(report["headline"]))
    if report.get("ratios"):
        print("\n" + ratios_markdown(report["ratios"]))
    if report.get("resume_cost"):
        print("\n" + resume_markdown(report["resume_cost"]))
    print(f"\n{report['mode']} run: {report['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        progress(f"wrote {args.json}")
    if args.chart:
        chart(report, args.chart)
        progress(f"wrote {args.chart}")
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
        progress(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
