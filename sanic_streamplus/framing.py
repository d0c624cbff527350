"""How events become bytes on the downstream wire: output formats and dialects.

A *format* turns one event into bytes (``sse``, ``ndjson``, ``text``). A *dialect* says how a
stream of that kind ends and how it reports an error once the response has started:

======== ============================================ ==============================================
dialect  normal end                                   error after the commit point
======== ============================================ ==============================================
plain    the body ends                                ``event: error`` with data
                                                      ``{"error": {"type", "message",
                                                      "upstream_status"}}``
openai   ``data: [DONE]`` (once, even if the upstream ``data: {"error": {"message", "type",
         sent it), then the body ends at once         "code"}}`` then ``data: [DONE]``
======== ============================================ ==============================================

The ``ndjson`` and ``text`` formats carry no end marker: only ``sse`` writes ``[DONE]``.

A dialect also knows its *text deltas* (events that each carry the next piece of a text), so the
``coalesce`` slow-client policy can merge consecutive ones: ``plain`` events whose data is the
JSON object ``{"text": str}``, ``openai`` ``chat.completion.chunk`` events whose one choice's
delta is only ``content`` (no role, tool call, finish reason, logprobs or usage).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import StreamPlusError, error_body
from .sse import ServerSentEvent, encode, encode_comment

__all__ = ["DIALECTS", "Dialect", "Format", "get_dialect", "get_format", "to_event"]

T = TypeVar("T")
_DONE = ServerSentEvent("[DONE]")
_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def to_event(item: Any) -> ServerSentEvent:
    """Turn what a handler yields into an event.

    ``ServerSentEvent`` as is; ``str`` becomes its data; ``dict`` or ``list`` becomes compact
    JSON data; ``bytes`` are decoded as UTF-8 (with replacement) into data.

    Raises:
        TypeError: any other type.
    """
    if isinstance(item, ServerSentEvent):
        return item
    if isinstance(item, str):
        return ServerSentEvent(item)
    if isinstance(item, (dict, list)):
        return ServerSentEvent(_DUMPS(item))
    if isinstance(item, (bytes, bytearray)):
        return ServerSentEvent(bytes(item).decode("utf-8", "replace"))
    raise TypeError(
        f"a stream handler yielded {type(item).__name__}; yield ServerSentEvent, str, dict or list"
    )


class Dialect:
    """The ``plain`` dialect: no end marker; errors as ``event: error`` with a JSON body."""

    name = "plain"

    def is_end(self, event: ServerSentEvent) -> bool:
        """True if ``event`` is the stream's end marker (nothing may follow it)."""
        return False

    def end_events(self) -> list[ServerSentEvent]:
        """Events that end a stream that completed normally."""
        return []

    def error_events(self, error: StreamPlusError) -> list[ServerSentEvent]:
        """Events that report ``error`` after the commit point, and end the stream."""
        return [ServerSentEvent(_DUMPS(error_body(error)), event="error")]

    def text_delta(self, event: ServerSentEvent) -> tuple[str, Any, str] | None:
        """Split a text-delta event into (shape, template, text), or None if it is not one.

        Two consecutive deltas of the same ``shape`` (str) merge into one:
        ``with_text(template, text1 + text2)``.
        """
        if event.id is not None or event.retry is not None or not event.data.startswith("{"):
            return None
        try:
            value = json.loads(event.data)
        except ValueError:
            return None
        if not isinstance(value, dict) or len(value) != 1 or not isinstance(value.get("text"), str):
            return None
        return event.event, event.event, value["text"]

    def with_text(self, template: Any, text: str) -> ServerSentEvent:
        """The text-delta event of ``template`` (from :meth:`text_delta`) carrying ``text``."""
        return ServerSentEvent(_DUMPS({"text": text}), event=template)


class OpenAIDialect(Dialect):
    """The OpenAI chat-completions dialect: ``data: [DONE]`` ends a stream; an error is a data
    event ``{"error": {"message", "type", "code"}}`` (``code`` is the upstream HTTP status or
    null), then ``[DONE]``. Never writes an event without data (the official SDK crashes on one).
    """

    name = "openai"

    def is_end(self, event: ServerSentEvent) -> bool:
        return event.data == "[DONE]"

    def end_events(self) -> list[ServerSentEvent]:
        return [_DONE]

    def error_events(self, error: StreamPlusError) -> list[ServerSentEvent]:
        code = error.upstream_status
        body = {"error": {"message": error.message, "type": error.type, "code": code}}
        return [ServerSentEvent(_DUMPS(body)), _DONE]

    def text_delta(self, event: ServerSentEvent) -> tuple[str, Any, str] | None:
        if event.event != "message" or event.id is not None or event.retry is not None:
            return None
        try:
            chunk = json.loads(event.data)
        except ValueError:
            return None
        if not isinstance(chunk, dict) or chunk.get("object") != "chat.completion.chunk":
            return None
        choices = chunk.get("choices")
        if chunk.get("usage") is not None or not isinstance(choices, list) or len(choices) != 1:
            return None
        choice = choices[0]
        if (
            not isinstance(choice, dict)
            or choice.get("finish_reason") is not None
            or choice.get("logprobs") is not None
        ):
            return None
        delta = choice.get("delta")
        if not isinstance(delta, dict) or list(delta) != ["content"]:
            return None
        text = delta["content"]
        if not isinstance(text, str):
            return None
        delta["content"] = ""
        return _DUMPS(chunk), chunk, text

    def with_text(self, template: Any, text: str) -> ServerSentEvent:
        template["choices"][0]["delta"]["content"] = text
        return ServerSentEvent(_DUMPS(template))


DIALECTS: dict[str, Dialect] = {"plain": Dialect(), "openai": OpenAIDialect()}


def encode_ndjson(event: ServerSentEvent) -> bytes:
    """One JSON value and LF: the data itself when it is a JSON object or array, else
    ``{"event": type, "data": data}`` (plus ``"id"`` when set)."""
    data = event.data
    if event.event == "message" and data[:1] in ("{", "[") and "\n" not in data:
        return data.encode("utf-8", "replace") + b"\n"
    obj: dict[str, str] = {"event": event.event, "data": data}
    if event.id is not None:
        obj["id"] = event.id
    return _DUMPS(obj).encode("utf-8", "replace") + b"\n"


def encode_text(event: ServerSentEvent) -> bytes:
    """The data alone, nothing between events."""
    return event.data.encode("utf-8", "replace")


@dataclass(frozen=True)
class Format:
    """An output format.

    Attributes:
        name: ``sse``, ``ndjson`` or ``text``.
        content_type: the response ``Content-Type``.
        encode: turns one event into its bytes (``sse``: :func:`sanic_streamplus.sse.encode`,
            ``ndjson``: :func:`encode_ndjson`, ``text``: :func:`encode_text`).
        heartbeat: the bytes written while idle, or None if the format has no way to say nothing.
        writes_end: whether the dialect's end events are written.
    """

    name: str
    content_type: str
    encode: Callable[[ServerSentEvent], bytes]
    heartbeat: bytes | None
    writes_end: bool


_FORMATS = {
    "sse": Format("sse", "text/event-stream; charset=utf-8", encode, encode_comment("ping"), True),
    "ndjson": Format("ndjson", "application/x-ndjson", encode_ndjson, b"\n", False),
    "text": Format("text", "text/plain; charset=utf-8", encode_text, None, False),
}


def get_format(name: str) -> Format:
    """The :class:`Format` called ``name``.

    Raises:
        ValueError: unknown format name.
    """
    return _lookup(_FORMATS, "format", name)


def get_dialect(name: str) -> Dialect:
    """The :class:`Dialect` called ``name``.

    Raises:
        ValueError: unknown dialect name.
    """
    return _lookup(DIALECTS, "dialect", name)


def _lookup(table: dict[str, T], kind: str, name: str) -> T:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; use one of {sorted(table)}") from None
