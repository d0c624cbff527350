"""``@stream_post``: turn a POST handler into a streaming endpoint."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar, overload

from sanic import Request
from sanic.response import HTTPResponse
from sanic_ext.extensions.openapi import openapi
from sanic_ext.extensions.openapi.builders import OperationStore

from .config import Settings
from .errors import ExtensionMissing, InvalidRequest
from .framing import get_dialect, get_format
from .relay import StreamOptions, error_response, relay, to_stream_error

__all__ = ["stream_post"]

logger = logging.getLogger("sanic_streamplus")

Handler = TypeVar("Handler", bound=Callable[..., Any])
_UNSET: Any = object()


def _options(request: Request, settings: Settings, overrides: dict[str, Any]) -> StreamOptions:
    heartbeat = overrides.get("heartbeat", _UNSET)
    if heartbeat is _UNSET:
        heartbeat = settings.heartbeat
    response_timeout = float(request.app.config.get("RESPONSE_TIMEOUT") or 0)
    if heartbeat and response_timeout > 0:
        heartbeat = min(heartbeat, response_timeout / 2)  # or Sanic cuts the idle stream
    return StreamOptions(
        format=get_format(overrides.get("format") or settings.format),
        dialect=get_dialect(overrides.get("dialect") or settings.dialect),
        heartbeat=heartbeat or None,
        high_water_mark=overrides.get("high_water_mark") or settings.high_water_mark,
    )


@overload
def stream_post(handler: Handler) -> Handler: ...


@overload
def stream_post(
    *,
    heartbeat: float | None = ...,
    format: str | None = ...,
    dialect: str | None = ...,
    high_water_mark: int | None = ...,
    require_json: bool = ...,
) -> Callable[[Handler], Handler]: ...


def stream_post(
    handler: Any = None,
    *,
    heartbeat: float | None = _UNSET,
    format: str | None = None,
    dialect: str | None = None,
    high_water_mark: int | None = None,
    require_json: bool = True,
) -> Any:
    """Make a POST handler answer with a stream (an SSE event stream by default).

    Use it under the route decorator, with or without arguments::

        @app.post("/chat")
        @stream_post(dialect="openai")
        async def chat(request):
            return upstream_events(request, "/chat/completions", json=request.json)

    The handler is either an async generator that yields events, or a coroutine that returns an
    async iterable of events or a normal ``HTTPResponse`` (e.g. a 400 for bad input). An event is
    a :class:`~sanic_streamplus.sse.ServerSentEvent`, a ``str`` (its data) or a ``dict``/``list``
    (JSON data). Anything raised before the first event is a JSON error response with a real
    status; after it, an error frame in the dialect, then a clean end (see ``docs/errors.md``).

    Args:
        heartbeat: seconds of silence before a heartbeat comment (float), None for none; default
            ``STREAMPLUS_HEARTBEAT``. Always kept below half of ``RESPONSE_TIMEOUT``.
        format: ``"sse"`` (default), ``"ndjson"`` or ``"text"`` (the data alone); default
            ``STREAMPLUS_FORMAT``.
        dialect: ``"plain"`` or ``"openai"``, for end and error frames; default
            ``STREAMPLUS_DIALECT``.
        high_water_mark: the client's write-buffer high-water mark in bytes; default
            ``STREAMPLUS_HIGH_WATER_MARK``.
        require_json: answer 400 before calling the handler if the body is not a JSON document.

    Raises:
        ValueError: at decoration time, for an unknown format or dialect name.
    """
    if format is not None:
        get_format(format)
    if dialect is not None:
        get_dialect(dialect)
    overrides: dict[str, Any] = {
        "format": format,
        "dialect": dialect,
        "high_water_mark": high_water_mark,
    }
    if heartbeat is not _UNSET:
        overrides["heartbeat"] = heartbeat

    def decorate(handler: Handler) -> Handler:
        is_generator = inspect.isasyncgenfunction(handler)

        @functools.wraps(handler)
        async def wrapper(request: Request, *args: Any, **kwargs: Any) -> HTTPResponse | None:
            state = getattr(request.app.ctx, "streamplus", None)
            if state is None:
                missing = ExtensionMissing()
                logger.error("%s", missing.message)
                return error_response(missing)
            if require_json:
                try:
                    body = request.json
                except Exception:
                    body = None
                if body is None:
                    return error_response(InvalidRequest("the request body must be JSON"))
            options = _options(request, state.settings, overrides)
            try:
                if is_generator:
                    source = handler(request, *args, **kwargs)
                else:
                    source = await handler(request, *args, **kwargs)
                    if isinstance(source, HTTPResponse):
                        return source
                    if not hasattr(source, "__aiter__"):
                        raise TypeError(
                            f"stream handler {handler.__name__} returned "
                            f"{type(source).__name__}; return an async iterable or a response"
                        )
            except Exception as exc:
                error = to_stream_error(exc)
                if error.outcome == "internal_error":
                    logger.exception("stream handler failed", exc_info=exc)
                return error_response(error)
            return await relay(request, source, options)

        wrapper.__streamplus__ = True  # type: ignore[attr-defined]
        store = OperationStore()  # type: ignore[no-untyped-call]
        if handler in store:  # docs attached by sanic-ext decorators below this one
            store[wrapper] = store[handler]
        content_type = get_format(format or "sse").content_type.split(";")[0]
        openapi.response(200, {content_type: str}, "A stream of events")(wrapper)
        return wrapper  # type: ignore[return-value]

    if handler is not None:
        return decorate(handler)
    return decorate
