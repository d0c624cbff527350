"""Stream routes in sanic-ext's OpenAPI document, and where sanic-ext's ``validate`` may go.

- :func:`document` (called by ``@stream_post``): the route answers 200 in its format's content
  type (``text/event-stream`` by default), with the schema of each event's data when the route
  declares one (``event_schema``), and the JSON errors it can answer before its first event
  (400, 401, 403, 404, 409, 413, 422, 429, 502, 503, 504), in the route's dialect's error
  shape (``#/components/schemas/StreamPlusError``, ``OpenAIError`` or ``AnthropicError``).
- :func:`prepare_stream_routes` (a ``before_server_start`` listener of the extension): refuses
  ``@validate`` *above* ``@stream_post``, where the body is not read yet (below, it works: a
  failure is a 400 ``invalid_request`` before the handler runs), and carries the docs of
  decorators above ``@stream_post`` to the route's handler, where sanic-ext looks for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sanic import Request, Sanic
from sanic_ext import validate
from sanic_ext.extensions.openapi import openapi
from sanic_ext.extensions.openapi.builders import OperationStore, SpecificationBuilder
from sanic_ext.extensions.openapi.definitions import Component, Reference

from .framing import get_format

__all__ = ["document", "prepare_stream_routes"]

_STRING = {"type": "string"}
_NULLABLE_STRING = {"type": "string", "nullable": True}
# the JSON error body of each dialect (Dialect.refusal_body), by component name
_ERROR_SCHEMAS: dict[str, dict[str, Any]] = {
    "StreamPlusError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "message", "upstream_status"],
                "properties": {
                    "type": {**_STRING, "description": "machine-readable, e.g. body_too_large"},
                    "message": {**_STRING, "description": "human-readable, no stack trace"},
                    "upstream_status": {
                        "type": "integer",
                        "nullable": True,
                        "description": "the upstream's HTTP status, when it answered one",
                    },
                },
            }
        },
    },
    "OpenAIError": {  # OpenAI's error object (chat completions and the Responses API)
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": _STRING,
                    "type": {**_STRING, "description": "e.g. invalid_request_error"},
                    "param": _NULLABLE_STRING,
                    "code": {"nullable": True, "description": "a string or an integer"},
                },
            }
        },
    },
    "AnthropicError": {  # Anthropic's error object
        "type": "object",
        "required": ["type", "error"],
        "properties": {
            "type": {"type": "string", "enum": ["error"]},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {
                    "type": {**_STRING, "description": "e.g. invalid_request_error"},
                    "message": _STRING,
                },
            },
        },
    },
}
_ERROR_COMPONENTS = {  # dialect -> its error body's component
    "plain": "StreamPlusError",
    "openai": "OpenAIError",
    "openai-responses": "OpenAIError",
    "anthropic": "AnthropicError",
}
# the answers a stream route can give before its first event (docs/errors.md has them all)
_ERROR_ANSWERS = {
    400: "Not JSON, refused by the route's validation (`invalid_request`), or by the upstream "
    "(`upstream_status`, with the upstream's message)",
    401: "The upstream refused the request's credentials (`upstream_status`)",
    403: "The upstream refused the request (`upstream_status`)",
    404: "The upstream has no such model or route (`upstream_status`)",
    409: "The upstream answered 409 (`upstream_status`)",
    413: "Body larger than `STREAMPLUS_MAX_BODY_SIZE` (`body_too_large`), or than the "
    "upstream takes (`upstream_status`)",
    422: "The upstream could not process the request (`upstream_status`)",
    429: "The upstream answered 429 (`rate_limited`, with its `Retry-After`)",
    502: "The upstream failed before the first event (unreachable, 5xx or another status, "
    "not an event stream)",
    503: "Too many streams in this worker (`too_many_streams`, with `Retry-After`), or the "
    "server is stopping (`shutdown`)",
    504: "An upstream timeout expired before the first event (`connect_timeout`, ...)",
}


def _carry_docs(handler: Any, wrapper: Any) -> None:
    """Give ``wrapper`` the sanic-ext OpenAPI docs of ``handler`` and of every function it wraps
    (``__wrapped__``), merged, the outer ones first: decorators that do not carry docs over,
    such as sanic-ext's ``validate``, split them (``@openapi.body`` above ``@validate``,
    ``@openapi.summary`` below it, say)."""
    store = OperationStore()  # type: ignore[no-untyped-call]
    found: list[Any] = []
    seen: set[int] = set()  # a __wrapped__ chain may loop
    fn = handler
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        if fn in store and all(store[fn] is not builder for builder in found):
            found.append(store[fn])
        fn = getattr(fn, "__wrapped__", None)
    if not found:
        return
    builder = found[0]
    mine = vars(builder)
    for inner in found[1:]:
        for key, value in vars(inner).items():
            if isinstance(mine.get(key), list):
                mine[key].extend(item for item in value if item not in mine[key])
            elif isinstance(mine.get(key), dict):
                mine[key] = {**value, **mine[key]}
            elif mine.get(key) is None:
                mine[key] = value
    store[wrapper] = builder


def _event_content(event_schema: Any) -> Any:
    """The OpenAPI content for a stream's events: ``str`` without a schema, a dict schema as
    given, a model class as sanic-ext renders a body model (a ``$ref`` if it was declared with
    ``@openapi.component``, else inline)."""
    if event_schema is None:
        return str
    if isinstance(event_schema, Mapping):
        return {"schema": dict(event_schema)}
    if SpecificationBuilder().has_component("schemas", event_schema.__name__):
        return Component(event_schema)
    return event_schema


def _error_reference(dialect: str) -> Any:
    """A ``$ref`` to the schema of ``dialect``'s JSON error body, registered in components on
    first use."""
    name = _ERROR_COMPONENTS.get(dialect, "StreamPlusError")
    spec = SpecificationBuilder()
    if not spec.has_component("schemas", name):
        spec.add_component("schemas", name, _ERROR_SCHEMAS[name])
    return Reference(f"#/components/schemas/{name}")  # type: ignore[no-untyped-call]


def document(wrapper: Any, handler: Any, format: str | None, event_schema: Any) -> None:
    """Document the stream route ``wrapper`` in sanic-ext's OpenAPI: the handler's own docs,
    and a 200 in the format's content type (with ``event_schema`` as the schema of each event's
    data). Its JSON errors are documented at server start (:func:`prepare_stream_routes`),
    when the default dialect, and so their shape, is known."""
    _carry_docs(handler, wrapper)
    content_type = get_format(format or "sse").content_type.split(";")[0]
    description = "A stream of events" + (
        "; the schema is that of each event's data" if event_schema is not None else ""
    )
    openapi.response(200, {content_type: _event_content(event_schema)}, description)(wrapper)


def _document_errors(handler: Any, dialect: str) -> None:
    """The JSON errors a stream route answers before its first event, in ``dialect``'s error
    shape, on the route's ``handler``, unless the route declares those statuses itself."""
    declared = OperationStore()[handler].responses  # type: ignore[no-untyped-call]
    for status, answer in _ERROR_ANSWERS.items():
        if status not in declared:
            content = {"application/json": _error_reference(dialect)}
            openapi.response(status, content, answer)(handler)


def _probe(request: Request) -> None:
    """Never called: wrapped once by sanic-ext's validating decorators to know theirs."""


_VALIDATE_CODE = validate()(_probe).__code__
_body_probe = openapi.body(str)(_probe)
OperationStore().pop(_body_probe, None)  # type: ignore[no-untyped-call]
_BODY_CODE = _body_probe.__code__
del _body_probe


def _validator_name(fn: Any) -> str | None:
    """The sanic-ext decorator that made the wrapper ``fn`` if it validates the request, else
    None (an ``openapi.body`` that only documents is harmless)."""
    code = getattr(fn, "__code__", None)
    if code is _VALIDATE_CODE:
        return "@validate"
    if code is _BODY_CODE:
        cells = dict(zip(code.co_freevars, fn.__closure__ or (), strict=False))
        if "validate" in cells and cells["validate"].cell_contents:
            return "@openapi.body(..., validate=True) (or @openapi.definition(..., validate=True))"
    return None


def prepare_stream_routes(app: Sanic[Any, Any]) -> None:
    """Check the decorators above each ``@stream_post`` and gather its OpenAPI docs (a
    ``before_server_start`` listener of the StreamPlus extension, run before sanic-ext builds
    the document).

    A stream route reads its request body itself, inside ``@stream_post`` (with its own size
    limit, after the ``max_streams`` check), so a decorator above it runs before there is a
    body: sanic-ext's ``validate`` there would refuse every request (below, it works). Any other
    decorator is fine above, and the docs of the functions it wraps (the stream's response,
    say) are carried to the route's handler, where sanic-ext looks for them.

    Raises:
        RuntimeError: a route has ``@validate`` (or ``@openapi.body``/``@openapi.definition``
            with ``validate=True``) above ``@stream_post``; the message says where to move it.
    """
    for route in app.router.routes:
        fn = route.handler
        while getattr(getattr(fn, "__wrapped__", None), "__streamplus__", False):
            name = _validator_name(fn)
            if name is not None:
                raise RuntimeError(
                    f"route {route.name!r}: {name} is above @stream_post, where the request "
                    "body is not read yet, so it would refuse every request; put it below "
                    "@stream_post (@app.post(...), then @stream_post, then the validation)"
                )
            fn = fn.__wrapped__
        if not getattr(fn, "__streamplus__", False):
            continue
        if fn is not route.handler:  # decorators above @stream_post
            _carry_docs(route.handler, route.handler)
        dialect = fn.__streamplus_dialect__ or app.ctx.streamplus.settings.dialect
        _document_errors(route.handler, dialect)
