"""``StreamPlus``: the sanic-ext extension. It only wires: settings, the shared client, checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from sanic import HTTPResponse, Request, Sanic
from sanic_ext import Extend
from sanic_ext.extensions.base import Extension

from .config import Settings
from .decorators import cancel_stream, resume_stream
from .errors import ExtensionMissing
from .failover import UpstreamPool
from .observe import H, Hook, Observer, metrics_response_body
from .openapi import prepare_stream_routes
from .relay import shutdown_streams
from .resume import Resumer
from .store import EventStore, MemoryEventStore

__all__ = ["StreamPlus", "StreamPlusState"]


@dataclass
class StreamPlusState:
    """What the extension keeps per worker at ``app.ctx.streamplus``.

    Attributes:
        settings: the :class:`~sanic_streamplus.config.Settings` read at server start.
        client: the shared ``httpx.AsyncClient`` (of the first upstream, with several); None
            outside ``before_server_start`` .. ``after_server_stop``.
        pool: the upstreams (:class:`~sanic_streamplus.failover.UpstreamPool`: one client and
            one circuit breaker each); None outside the server's life, like ``client``.
        streams: the streams open in this worker (their count is held under
            ``max_streams``; the server's stop ends them with a ``shutdown`` frame).
        resumer: the worker's :class:`~sanic_streamplus.resume.Resumer` (resumable streams:
            producers, readers, cancel); None outside the server's life, like ``client``.
        observer: the worker's :class:`~sanic_streamplus.observe.Observer` (hooks, signals,
            metrics, spans).
        hooks: the app-wide ``on_finish`` hooks (see :meth:`on_finish`).
    """

    settings: Settings
    client: httpx.AsyncClient | None = None
    pool: UpstreamPool | None = None
    streams: set[Any] = field(default_factory=set)
    resumer: Resumer | None = None
    observer: Observer = field(init=False)
    hooks: list[Hook] = field(default_factory=list)

    def on_finish(self, hook: H) -> H:
        """Call ``hook`` with a :class:`~sanic_streamplus.observe.StreamInfo` once for every
        stream of the app, after the route's own hooks (usable as a decorator:
        ``@app.ctx.streamplus.on_finish``). Mark it with
        :func:`~sanic_streamplus.observe.before_final_frame` to run before the terminating
        frame is written."""
        self.hooks.append(hook)
        return hook


class StreamPlus(Extension):  # type: ignore[no-untyped-call]
    """The sanic-streamplus extension: ``app.extend(extensions=[StreamPlus])``.

    Reads the ``STREAMPLUS_*`` keys of ``app.config`` (see
    :class:`~sanic_streamplus.config.Settings`) when the server starts, and owns one shared
    ``httpx.AsyncClient`` per worker and upstream (``STREAMPLUS_UPSTREAMS``, or the one
    ``STREAMPLUS_UPSTREAM_URL``), opened in ``before_server_start`` and closed in
    ``after_server_stop``. ``startup()`` does no I/O: it runs in every process that builds the app.
    It registers the resume and cancel routes of resumable streams (``GET`` and ``DELETE``
    ``<STREAMPLUS_RESUME_PATH>/<stream_id>``) and opens their event store with the client.
    When the server stops (``before_server_stop``), every open stream ends with a ``shutdown``
    error frame in its dialect and its upstream closed, within half of Sanic's
    ``GRACEFUL_SHUTDOWN_TIMEOUT`` (native server; ASGI servers run the lifespan shutdown only
    once their open responses ended: see :func:`~sanic_streamplus.relay.relay` for uvicorn).

    Raises:
        ValueError: at server start, for a malformed ``STREAMPLUS_*`` value.
        RuntimeError: at server start, for a ``@stream_post`` route that does not accept
            ``POST`` (``@app.get``, say) and needs a JSON body (``require_json``, the
            default); the message names the route.
    """

    name = "StreamPlus"

    def startup(self, bootstrap: Any) -> None:
        app = self.app
        settings = Settings.from_config(app.config)
        app.ctx.streamplus = state = StreamPlusState(settings)
        state.observer = Observer(app, state.hooks)  # metrics and spans from server start on
        if settings.metrics and settings.metrics_path:
            name = "streamplus_metrics"
            app.add_route(_metrics, settings.metrics_path, methods=["GET"], name=name)
        path = settings.resume_path.rstrip("/") + "/<stream_id:str>"
        app.add_route(resume_stream, path, methods=["GET"], name="streamplus_resume")
        app.add_route(cancel_stream, path, methods=["DELETE"], name="streamplus_cancel")
        app.before_server_start(_check_methods)
        app.before_server_start(_open_client, priority=-10)
        app.before_server_start(prepare_stream_routes)  # before sanic-ext's document
        app.before_server_stop(_end_streams)
        app.after_server_stop(_close_client)

    def label(self) -> str:
        return "upstream relay"


async def _open_client(app: Sanic[Any, Any]) -> None:
    state: StreamPlusState = app.ctx.streamplus
    state.settings = settings = Settings.from_config(app.config)
    state.observer = Observer(app, state.hooks, metrics=settings.metrics, otel=settings.otel)
    state.pool = UpstreamPool(settings)
    state.client = state.pool.members[0].client
    store: EventStore
    if settings.resume_store == "redis":
        from .store import RedisEventStore

        # one pooled connection per reader waiting in XREAD BLOCK: room for every stream
        store = RedisEventStore.from_url(
            settings.redis_url or "",
            max_connections=settings.max_streams + 64,
            cluster=settings.redis_cluster,
            max_events=settings.resume_max_events,
            ttl=settings.resume_ttl or 600.0,
        )
    else:
        store = MemoryEventStore(settings.resume_max_events, settings.resume_ttl or 600.0)
    state.resumer = Resumer(
        store,
        ttl=settings.resume_ttl or 600.0,
        grace=settings.resume_grace or float("inf"),
        window=max(1, settings.resume_max_events // 2),
        max_producers=settings.max_producers or settings.max_streams,
    )


def _check_methods(app: Sanic[Any, Any]) -> None:
    """Refuse to start with a ``@stream_post`` route that needs a JSON body but does not
    accept POST: its requests would all be refused as bodies that are not JSON."""
    for route in app.router.routes:
        handler = route.handler
        if getattr(handler, "__streamplus_json__", False) and "POST" not in route.methods:
            methods = ", ".join(sorted(route.methods))
            raise RuntimeError(
                f"route {route.name!r} ({methods} {route.uri}) has @stream_post, which reads a "
                "JSON body: register it with @app.post(...) (HEAD may go beside POST), or "
                "pass @stream_post(require_json=False) for a stream that takes no body"
            )


async def _end_streams(app: Sanic[Any, Any]) -> None:
    state: StreamPlusState = app.ctx.streamplus
    grace = float(app.config.get("GRACEFUL_SHUTDOWN_TIMEOUT") or 0) / 2
    await shutdown_streams(state.streams, grace or 1.0)
    await state.observer.close(grace or 1.0)  # the hooks of the streams just ended


async def _metrics(request: Request) -> HTTPResponse:
    """``GET <STREAMPLUS_METRICS_PATH>``: the Prometheus metrics, in its text format."""
    body, content_type = metrics_response_body()
    return HTTPResponse(body, content_type=content_type)


async def _close_client(app: Sanic[Any, Any]) -> None:
    state: StreamPlusState = app.ctx.streamplus
    if state.resumer is not None:
        await state.resumer.close()
        state.resumer = None
    if state.pool is not None:
        await state.pool.aclose()
        state.pool = None
    state.client = None


class StreamPlusGuard(Extension):  # type: ignore[no-untyped-call]
    """Fails the server start of an app that has ``@stream_post`` routes but not StreamPlus.

    Pre-registered with sanic-ext (``Extend.register``) for every app, so the mistake shows at
    startup with a message that says what to add, instead of as a 500 on the first request.
    """

    name = "StreamPlusGuard"

    def startup(self, bootstrap: Any) -> None:
        self.app.before_server_start(_check_routes, priority=100)

    def included(self) -> bool:
        return False


def _check_routes(app: Sanic[Any, Any]) -> None:
    if isinstance(getattr(app.ctx, "streamplus", None), StreamPlusState):
        return
    for route in app.router.routes:
        if getattr(route.handler, "__streamplus__", False):
            raise ExtensionMissing()


if StreamPlusGuard not in Extend._pre_registry:
    Extend.register(StreamPlusGuard)
