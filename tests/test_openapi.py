"""sanic-ext integration: stream routes in the OpenAPI document, request bodies validated by
sanic-ext's ``validate`` (dataclass, pydantic, msgspec) before the stream starts, decorator order.
Over real sockets: the document as a Sanic user fetches it (sanic-testing's ``app.test_client``,
a real server), streams with the kit's stream client, the fake upstream where one counts; apps
and upstreams come from the package's pytest plugin."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from pydantic import BaseModel
from sanic import Request, Sanic
from sanic_ext import openapi, validate

from sanic_streamplus import stream_post, upstream_events
from sanic_streamplus.testclient import StreamClient
from sanic_streamplus.testing import FakeUpstream, fake_tokens

MakeApp = Callable[..., Sanic[Any, Any]]
MakeClient = Callable[..., StreamClient]


@dataclass
class ChatDataclass:
    prompt: str
    max_tokens: int = 16


class ChatPydantic(BaseModel):
    prompt: str
    max_tokens: int = 16


class ChatMsgspec(msgspec.Struct):
    prompt: str
    max_tokens: int = 16


@dataclass
class DeltaDataclass:
    delta: str
    index: int = 0


class DeltaPydantic(BaseModel):
    delta: str
    index: int = 0


class DeltaMsgspec(msgspec.Struct):
    delta: str
    index: int = 0


@openapi.component
class DeltaComponent(BaseModel):
    delta: str


BODY_MODELS = [ChatDataclass, ChatPydantic, ChatMsgspec]
DELTA_SCHEMA = {
    "type": "object",
    "required": ["delta"],
    "properties": {"delta": {"type": "string"}, "index": {"type": "integer"}},
}


@pytest.fixture
def make_app(streamplus_app: MakeApp) -> MakeApp:
    """New apps with StreamPlus (the plugin's ``streamplus_app``), named ``openapi_<n>``."""
    return functools.partial(streamplus_app, "openapi")


def openapi_document(app: Sanic[Any, Any]) -> dict[str, Any]:
    """The app's OpenAPI document, fetched with sanic-testing's ``app.test_client``."""
    _, response = app.test_client.get("/docs/openapi.json")
    assert response.status == 200
    document: dict[str, Any] = response.json
    return document


@pytest.mark.parametrize(
    "event_schema",
    [DeltaDataclass, DeltaPydantic, DeltaMsgspec, DELTA_SCHEMA],
    ids=["dataclass", "pydantic", "msgspec", "dict"],
)
def test_document_has_the_stream_route_with_its_event_schema(
    event_schema: Any, make_app: MakeApp
) -> None:
    app = make_app()

    @app.post("/events")
    @stream_post(event_schema=event_schema)
    async def handler(request: Request) -> AsyncIterator[Any]:
        yield {"delta": "x"}

    document = openapi_document(app)
    ok = document["paths"]["/events"]["post"]["responses"]["200"]
    assert list(ok["content"]) == ["text/event-stream"]
    schema = ok["content"]["text/event-stream"]["schema"]
    if isinstance(event_schema, dict):
        assert schema == DELTA_SCHEMA
    else:  # as sanic-ext renders a body model of each kind
        assert schema["type"] == "object"
        assert schema["properties"]["delta"]["type"] == "string"
        assert schema["properties"]["index"]["type"] == "integer"
    assert "each event's data" in ok["description"]


def test_route_without_event_schema_and_other_formats(make_app: MakeApp) -> None:
    app = make_app()

    @app.post("/plain")
    @stream_post
    async def plain(request: Request) -> AsyncIterator[Any]:
        yield "x"

    @app.post("/lines")
    @stream_post(format="ndjson", event_schema=DeltaPydantic)
    async def lines(request: Request) -> AsyncIterator[Any]:
        yield {"delta": "x"}

    paths = openapi_document(app)["paths"]
    plain_ok = paths["/plain"]["post"]["responses"]["200"]["content"]
    assert plain_ok == {"text/event-stream": {"schema": {"type": "string"}}}
    lines_ok = paths["/lines"]["post"]["responses"]["200"]["content"]
    assert list(lines_ok) == ["application/x-ndjson"]
    assert lines_ok["application/x-ndjson"]["schema"]["properties"]["delta"]["type"] == "string"


def test_event_model_declared_as_a_component_is_referenced(make_app: MakeApp) -> None:
    app = make_app()

    @app.post("/component")
    @stream_post(event_schema=DeltaComponent)
    async def handler(request: Request) -> AsyncIterator[Any]:
        yield {"delta": "x"}

    document = openapi_document(app)
    content = document["paths"]["/component"]["post"]["responses"]["200"]["content"]
    assert content["text/event-stream"]["schema"] == {"$ref": "#/components/schemas/DeltaComponent"}
    assert document["components"]["schemas"]["DeltaComponent"]["required"] == ["delta"]


def test_answers_before_the_stream_are_documented_as_json_errors(make_app: MakeApp) -> None:
    app = make_app()

    @app.post("/errors")
    @stream_post
    @openapi.response(400, {"application/json": {"detail": str}}, "The route's own 400")
    async def handler(request: Request) -> AsyncIterator[Any]:
        yield "x"

    document = openapi_document(app)
    responses = document["paths"]["/errors"]["post"]["responses"]
    reference = {"$ref": "#/components/schemas/StreamPlusError"}
    for status in ("401", "403", "404", "409", "413", "422", "429", "502", "503", "504"):
        assert responses[status]["content"] == {"application/json": {"schema": reference}}
        assert responses[status]["description"]
    assert responses["400"]["description"] == "The route's own 400"  # declared: kept as is
    assert "detail" in responses["400"]["content"]["application/json"]["schema"]["properties"]
    error = document["components"]["schemas"]["StreamPlusError"]
    assert error["required"] == ["error"]
    inner = error["properties"]["error"]
    assert inner["required"] == ["type", "message", "upstream_status"]
    assert inner["properties"]["upstream_status"]["nullable"] is True


def test_each_route_documents_its_dialects_error_shape(make_app: MakeApp) -> None:
    """The errors before the stream are in the route's dialect's shape (what its SDK reads):
    OpenAI's error object for openai and openai-responses, Anthropic's for anthropic, ours for
    a route without a dialect, which takes ``STREAMPLUS_DIALECT``."""
    app = make_app(STREAMPLUS_DIALECT="anthropic")
    for dialect in ("plain", "openai", "openai-responses", "anthropic", None):

        async def handler(request: Request) -> AsyncIterator[Any]:
            yield "x"

        path = f"/{dialect or 'default'}"
        name = path.strip("/").replace("-", "_")
        app.post(path, name=name)(stream_post(dialect=dialect)(handler))
    document = openapi_document(app)
    references = {
        path: operation["post"]["responses"]["401"]["content"]["application/json"]["schema"]
        for path, operation in document["paths"].items()
        if "post" in operation
    }
    assert references == {
        "/plain": {"$ref": "#/components/schemas/StreamPlusError"},
        "/openai": {"$ref": "#/components/schemas/OpenAIError"},
        "/openai-responses": {"$ref": "#/components/schemas/OpenAIError"},
        "/anthropic": {"$ref": "#/components/schemas/AnthropicError"},
        "/default": {"$ref": "#/components/schemas/AnthropicError"},
    }
    schemas = document["components"]["schemas"]
    assert schemas["OpenAIError"]["properties"]["error"]["required"] == [
        "message", "type", "param", "code"
    ]
    assert schemas["AnthropicError"]["required"] == ["type", "error"]


@pytest.mark.parametrize("model", BODY_MODELS, ids=["dataclass", "pydantic", "msgspec"])
def test_request_body_and_docs_below_validate_reach_the_document(
    model: type, make_app: MakeApp
) -> None:
    """sanic-ext's ``validate`` documents nothing and does not carry the docs declared below
    it; ``openapi.body`` documents the body, and ``@stream_post`` collects the docs of every
    function it wraps."""
    app = make_app()

    @app.post("/documented")
    @stream_post(event_schema=DeltaPydantic)
    @openapi.body({"application/json": model}, required=True)
    @validate(json=model)
    @openapi.summary("Chat, streamed")
    @openapi.tag("chat")
    async def handler(request: Request, body: Any) -> AsyncIterator[Any]:
        yield {"delta": body.prompt}

    document = openapi_document(app)
    operation = document["paths"]["/documented"]["post"]
    assert operation["summary"] == "Chat, streamed"
    assert operation["tags"] == ["chat"]
    assert operation["requestBody"]["required"] is True
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["prompt"]["type"] == "string"
    assert "text/event-stream" in operation["responses"]["200"]["content"]


@pytest.mark.parametrize("model", BODY_MODELS, ids=["dataclass", "pydantic", "msgspec"])
@pytest.mark.fake_upstream(tokens=3)
async def test_validate_below_stream_post_refuses_bad_bodies_before_the_upstream(
    model: type,
    caplog: pytest.LogCaptureFixture,
    make_app: MakeApp,
    fake_upstream: FakeUpstream,
    stream_client: MakeClient,
) -> None:
    calls: list[Any] = []
    upstream = fake_upstream
    app = make_app(STREAMPLUS_UPSTREAM_URL=upstream.url)

    @app.post("/chat")
    @stream_post
    @validate(json=model)
    async def chat(request: Request, body: Any) -> Any:
        calls.append(body)
        messages = [{"role": "user", "content": body.prompt}]
        return upstream_events(request, "/chat/completions", json={"messages": messages})

    with caplog.at_level(logging.INFO):
        client = await stream_client(app)
        missing = await client.post("/chat", json={"max_tokens": 3})
        wrong = await client.post("/chat", json={"prompt": 5})
        not_object = await client.post("/chat", json=["hi"])
        assert (calls, upstream.requests) == ([], [])
        ok = await client.post("/chat", json={"prompt": "hi", "max_tokens": 3})

    assert ok.status_code == 200
    assert ok.headers["content-type"].startswith("text/event-stream")
    assert fake_tokens(1)[0] in ok.text
    assert len(calls) == 1 and isinstance(calls[0], model)
    assert len(upstream.requests) == 1  # only the valid body reached the upstream
    for refused, names in ((missing, "prompt"), (wrong, "str"), (not_object, "")):
        assert refused.status_code == 400
        assert refused.headers["content-type"] == "application/json"
        error = refused.json()["error"]
        assert error["type"] == "invalid_request"
        assert error["message"].startswith(f"Invalid request body: {model.__name__}")
        assert names in error["message"]
        assert error["upstream_status"] is None
        assert "Traceback" not in refused.text
    assert not [r for r in caplog.records if r.exc_info], "a refused body logged a traceback"


@pytest.mark.parametrize(
    "validation",
    [validate(json=ChatPydantic), openapi.body(ChatPydantic, validate=True)],
    ids=["validate", "openapi.body"],
)
async def test_validation_above_stream_post_fails_at_startup(
    validation: Any, make_app: MakeApp, stream_client: MakeClient
) -> None:
    """Above ``@stream_post`` the body is not read yet: the validation would refuse every
    request, so the server refuses to start and says where to put it."""
    app = make_app()

    @app.post("/above")
    @validation
    @stream_post
    async def handler(request: Request, body: Any) -> AsyncIterator[Any]:
        yield "x"

    with pytest.raises(RuntimeError, match=r"above @stream_post.*put it below @stream_post"):
        await stream_client(app)


async def test_documenting_decorators_above_stream_post_are_fine(
    make_app: MakeApp, stream_client: MakeClient
) -> None:
    """Only validation above ``@stream_post`` is refused: ``openapi.body`` without
    ``validate`` documents, and a decorator that does not read the body works there."""
    seen: list[str] = []

    def check_header(handler: Any) -> Any:
        @functools.wraps(handler)
        async def checked(request: Request, *args: Any, **kwargs: Any) -> Any:
            seen.append(request.headers.get("x-user", ""))
            return await handler(request, *args, **kwargs)

        return checked

    app = make_app()

    @app.post("/above-ok")
    @openapi.body({"application/json": ChatPydantic})
    @check_header
    @stream_post
    @validate(json=ChatPydantic)
    async def handler(request: Request, body: ChatPydantic) -> AsyncIterator[Any]:
        yield {"delta": body.prompt}

    client = await stream_client(app)
    ok = await client.post("/above-ok", json={"prompt": "hi"}, headers={"x-user": "u"})
    bad = await client.post("/above-ok", json={})
    document = (await client.get("/docs/openapi.json")).json()
    assert (ok.status_code, ok.text) == (200, 'data: {"delta":"hi"}\n\n')
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request"
    assert seen == ["u", ""]
    operation = document["paths"]["/above-ok"]["post"]
    assert (
        "prompt" in operation["requestBody"]["content"]["application/json"]["schema"]["properties"]
    )
    assert "text/event-stream" in operation["responses"]["200"]["content"]


def test_event_schema_must_be_a_class_or_a_dict() -> None:
    with pytest.raises(TypeError, match="event_schema"):
        stream_post(event_schema="delta")  # type: ignore[arg-type]
