"""How events become bytes on the downstream wire: output formats and dialects.

A *format* turns one event into bytes (``sse``, ``ndjson``, ``text``). A *dialect* says how a
stream of that kind ends, how it reports an error once the response has started, what it writes
while idle, which of its events are text deltas and where its token usage is:

================ ================================== =========================================
dialect          normal end                         error after the commit point
================ ================================== =========================================
plain            the body ends                      ``event: error`` with data
                                                    ``{"error": {"type", "message",
                                                    "upstream_status"}}``
openai           ``data: [DONE]`` (once, even if    ``data: {"error": {"message", "type",
                 the upstream sent it), then the    "code"}}`` then ``data: [DONE]``
                 body ends at once
anthropic        the ``message_stop`` event, then   ``event: error`` with data ``{"type":
                 the body ends at once              "error", "error": {"type", "message"}}``
openai-responses ``response.completed``,            ``event: response.failed`` (after a
                 ``response.incomplete`` or         ``response.created`` when none was seen)
                 ``response.failed``, then the body
                 ends at once
================ ================================== =========================================

The ``ndjson`` and ``text`` formats carry no end marker: only ``sse`` writes ``[DONE]``. The
``anthropic`` and ``openai-responses`` dialects synthesize no end: a source that ends without
its terminal event just ends (a ``message_stop`` or ``response.completed`` made up by the proxy
would tell the client that a truncated answer is complete). In the ``sse`` format the
``anthropic`` heartbeat is Anthropic's ``event: ping`` (data ``{"type": "ping"}``); every other
heartbeat is the format's own (``: ping`` in ``sse``).

A dialect also knows its *text deltas* (events that each carry the next piece of a text), so the
``coalesce`` slow-client policy can merge consecutive ones, and its *usage* blocks (token counts),
found without parsing events that carry none. See ``docs/dialects.md``.

:func:`get_dialect` returns a new dialect object per call: one per stream, as
``openai-responses`` remembers what its error frame must repeat (the response's ``id``, the next
``sequence_number``).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, TypeVar

from .errors import StreamPlusError, error_body
from .sse import ServerSentEvent, encode, encode_comment

__all__ = [
    "DIALECTS",
    "AnthropicDialect",
    "Dialect",
    "EventKind",
    "Format",
    "OpenAIDialect",
    "OpenAIResponsesDialect",
    "get_dialect",
    "get_format",
    "to_event",
]

T = TypeVar("T")
_DONE = ServerSentEvent("[DONE]")
_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_USAGE = re.compile(r'"usage"\s*:\s*\{')  # a usage object, not "usage": null
_FINISH = re.compile(r'"finish_reason"\s*:\s*"')  # a finish reason, not "finish_reason": null
_CONTENT = re.compile(r'"content"\s*:\s*"')  # a text piece, not "content": null


class EventKind(Enum):
    """What one event of a stream is, as far as its end is concerned
    (:meth:`Dialect.classify`). One kind per event; when several fit, the first of this list.

    Attributes:
        UPSTREAM_ERROR: the upstream's own error report (OpenAI ``{"error": ...}``, Anthropic
            ``event: error``, Responses ``response.failed`` / ``error``, plain ``event: error``):
            it goes through as sent and ends the stream.
        TERMINAL: the dialect's end marker (``[DONE]``, ``message_stop``,
            ``response.completed`` / ``response.incomplete``): the answer is complete.
        FINISH: the answer is complete but the stream may go on (an OpenAI chunk with a
            ``finish_reason``; a usage chunk may follow): the end without ``[DONE]`` is complete.
        START: the event that announces the answer (``message_start``, ``response.created``
            / ``in_progress`` / ``queued``); a dialect's error frame may repeat it.
        USAGE: a token-usage block (:meth:`Dialect.usage` finds it; START, FINISH and
            TERMINAL events may carry one too).
        TEXT_DELTA: the next piece of the answer's text (found without parsing: a hint).
        OTHER: anything else.
    """

    UPSTREAM_ERROR = "upstream_error"
    TERMINAL = "terminal"
    FINISH = "finish"
    START = "start"
    USAGE = "usage"
    TEXT_DELTA = "text_delta"
    OTHER = "other"


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


def _object(data: str) -> dict[str, Any] | None:
    """``data`` parsed as a JSON object, or None (not JSON, or not an object)."""
    if not data.startswith("{"):
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _delta_object(event: ServerSentEvent, marker: str) -> dict[str, Any] | None:
    """The JSON object of an event that may be merged: no ``id`` or ``retry`` (a merge would
    lose them), and ``marker`` in its data (tested before parsing)."""
    if event.id is not None or event.retry is not None or marker not in event.data:
        return None
    return _object(event.data)


def _event_type(event: ServerSentEvent, names: frozenset[str]) -> str | None:
    """The type of ``event`` if it is one of ``names``, else None: its event name, or for an
    unnamed event (``message``) the ``"type"`` of its JSON data, parsed only when one of the
    names occurs quoted in it."""
    if event.event != "message":
        return event.event if event.event in names else None
    data = event.data
    if not any(f'"{name}"' in data for name in names):
        return None
    value = _object(data)
    kind = value.get("type") if value is not None else None
    return kind if kind in names else None


def _usage_in(value: Any, paths: tuple[tuple[str, ...], ...]) -> dict[str, Any] | None:
    """The first usage object found in ``value`` (parsed JSON) along one of ``paths``."""
    for path in paths:
        found: Any = value
        for key in path:
            found = found.get(key) if isinstance(found, dict) else None
        if isinstance(found, dict):
            return found
    return None


def _status(error: StreamPlusError) -> int:
    """The HTTP status that says most about ``error``: the upstream's error status when there is
    one (a 529 stays a 529), else the error's own."""
    upstream = error.upstream_status
    return upstream if upstream is not None and upstream >= 400 else error.status


class Dialect:
    """The ``plain`` dialect, and the interface of every dialect.

    No end marker; an error is ``event: error`` with data ``{"error": {"type", "message",
    "upstream_status"}}`` (:func:`~sanic_streamplus.errors.error_body`); heartbeat: the format's
    own; text deltas: events whose data is exactly the JSON object ``{"text": str}`` (same event
    name: merged); usage: a top-level ``"usage"`` object of the data.

    Attributes:
        name: the dialect's name (``STREAMPLUS_DIALECT``, ``@stream_post(dialect=...)``).
        heartbeat_event: the event written while idle in the ``sse`` format, or None for the
            format's comment heartbeat.
        usage_paths: where a usage object may be in an event's JSON data, as key paths tried in
            order (``("usage",)``: ``data["usage"]``).
        end_is_data: the end marker is an event with data of its own (``message_stop``,
            ``response.completed``), written in every format; False: a bare marker
            (``[DONE]``), written only where the format ``writes_end``.
    """

    name = "plain"
    heartbeat_event: ServerSentEvent | None = None
    end_is_data = False
    usage_paths: tuple[tuple[str, ...], ...] = (("usage",),)

    def end_events(self) -> list[ServerSentEvent]:
        """Events that end a stream whose source completed without an end marker."""
        return []

    def error_frame(
        self,
        error: StreamPlusError,
        started: ServerSentEvent | None,
        last: ServerSentEvent | None,
    ) -> list[ServerSentEvent]:
        """Events that report ``error`` after the commit point, and end the stream, in a
        stream whose last :attr:`EventKind.START` event was ``started`` and whose last event
        was ``last`` (None: none yet). Pure: the caller keeps those two (one per stream).
        Each call makes a new frame (the Responses dialect's carries a new id when none was
        announced): make it once per stream."""
        return [ServerSentEvent(_DUMPS(error_body(error)), event="error")]

    def refusal_body(self, error: StreamPlusError) -> dict[str, Any]:
        """The JSON body of the answer that refuses the stream with ``error`` before the commit
        point (its status is ``error.status``): here ``{"error": {"type", "message",
        "upstream_status"}}`` (:func:`~sanic_streamplus.errors.error_body`); each dialect gives
        its API's own error shape, so that its SDK reads the message and the error type."""
        return error_body(error)

    def answer(self, error: StreamPlusError) -> tuple[int, bytes, dict[str, str]]:
        """The JSON answer for ``error`` before the commit point: (HTTP status
        ``error.status``, the UTF-8 JSON of :meth:`refusal_body`, headers: ``Content-Type``,
        and the error's ``Retry-After`` for a 429 or 503)."""
        headers = {"Content-Type": "application/json"}
        if error.retry_after and error.status in (429, 503):
            headers["Retry-After"] = error.retry_after
        return error.status, _DUMPS(self.refusal_body(error)).encode(), headers

    def classify(self, event: ServerSentEvent) -> EventKind:
        """What ``event`` is (:class:`EventKind`). Pure (the dialect object is not changed),
        and its data is parsed at most once, only when a cheap test says it may matter.
        Plain: ``event: error`` is the upstream's error, a usage object is USAGE, data
        beginning ``{"text"`` a TEXT_DELTA; no end marker (any end is complete)."""
        if event.event == "error":
            return EventKind.UPSTREAM_ERROR
        data = event.data
        if _USAGE.search(data) is not None and _usage_in(_object(data), self.usage_paths):
            return EventKind.USAGE
        return EventKind.TEXT_DELTA if data.startswith('{"text"') else EventKind.OTHER

    def end_kind(self, event: ServerSentEvent) -> EventKind:
        """What ``event`` is to the stream machine, cheaply (once per event, on the hot path):
        :meth:`classify`'s kind when it is UPSTREAM_ERROR, TERMINAL, FINISH or START; for any
        other event, OTHER or the kind :meth:`classify` gives (USAGE and TEXT_DELTA are not
        looked for; the machine writes them as OTHER). Plain: ``event: error`` is the upstream's
        error, anything else OTHER."""
        return EventKind.UPSTREAM_ERROR if event.event == "error" else EventKind.OTHER

    def complete_without_end(self, finished: bool) -> bool:
        """Whether a source that ended without a :attr:`EventKind.TERMINAL` event gave a
        complete answer (``finished``: a :attr:`EventKind.FINISH` event went by). False:
        the stream is ``upstream_truncated``. Plain: always complete (it has no end marker)."""
        return True

    def heartbeat(self, fmt: Format) -> bytes | None:
        """The bytes written while the stream is idle in ``fmt``: :attr:`heartbeat_event`
        encoded in the ``sse`` format when the dialect has one, else ``fmt.heartbeat`` (None:
        the format has no way to say nothing)."""
        if self.heartbeat_event is not None and fmt.name == "sse":
            return fmt.encode(self.heartbeat_event)
        return fmt.heartbeat

    def usage(self, event: ServerSentEvent) -> dict[str, Any] | None:
        """The token-usage object ``event`` carries (the upstream's own keys, e.g.
        ``prompt_tokens`` / ``input_tokens``, as it sent them), or None.

        Cheap on events without one: the data is parsed only if it contains ``"usage"``
        followed by an object (``"usage": null`` is not parsed).
        """
        data = event.data
        if '"usage"' not in data or _USAGE.search(data) is None:
            return None
        return _usage_in(_object(data), self.usage_paths)

    def text_delta(self, event: ServerSentEvent) -> tuple[str, Any, str] | None:
        """Split a text-delta event into (shape, template, text), or None if it is not one.

        Two consecutive deltas of the same ``shape`` (str) merge into one:
        ``with_text(template, text1 + text2)``, the first delta with the joined text. The
        template is (event name, the data's JSON object, the object holding the text, its key).
        """
        value = _delta_object(event, '"text"')
        if value is None or len(value) != 1 or not isinstance(value.get("text"), str):
            return None
        return event.event, (event.event, value, value, "text"), value["text"]

    def with_text(self, template: Any, text: str) -> ServerSentEvent:
        """The text-delta event of ``template`` (from :meth:`text_delta`) carrying ``text``."""
        name, value, holder, key = template
        holder[key] = text
        return ServerSentEvent(_DUMPS(value), event=name)


class OpenAIDialect(Dialect):
    """The OpenAI chat-completions dialect (API reference: "Chat Completions, streaming").

    ``data: [DONE]`` ends a stream (written by the proxy when the source ends without it); an
    error is a data event ``{"error": {"message", "type", "code"}}`` (``code``: the upstream
    HTTP status or null), then ``[DONE]``: openai-python raises ``APIError`` on it. Never writes
    an event without data (the official SDK crashes on one). Text deltas: unnamed
    ``chat.completion.chunk`` events whose one choice's delta is only ``content`` (no role, tool
    call, finish reason, logprobs or usage). Usage: the chunk's ``usage`` (the last chunk, with
    ``stream_options: {"include_usage": true}``).
    """

    name = "openai"

    def end_events(self) -> list[ServerSentEvent]:
        return [_DONE]

    def error_frame(
        self,
        error: StreamPlusError,
        started: ServerSentEvent | None,
        last: ServerSentEvent | None,
    ) -> list[ServerSentEvent]:
        code = getattr(error, "upstream_code", None)  # the upstream's own, else its status
        kind = getattr(error, "upstream_type", None) or error.type
        body = {"error": {"message": error.message, "type": kind, "code": code}}
        if code is None:
            body["error"]["code"] = error.upstream_status
        return [ServerSentEvent(_DUMPS(body)), _DONE]

    def refusal_body(self, error: StreamPlusError) -> dict[str, Any]:
        """OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``: the
        upstream's own type, param and code when it sent them, else ours (``type``) and null."""
        return {"error": _openai_error(error)}

    def classify(self, event: ServerSentEvent) -> EventKind:
        """``[DONE]`` is TERMINAL; a JSON object with an ``error`` and no ``choices`` the
        upstream's error; a chunk with a choice's ``finish_reason`` FINISH; one with a
        ``usage`` object USAGE; one with a ``"content": "..."`` a TEXT_DELTA."""
        data = event.data
        if data == "[DONE]":
            return EventKind.TERMINAL
        if not data.startswith("{"):
            return EventKind.OTHER
        error = '"error"' in data
        finish = _FINISH.search(data) is not None
        usage = _USAGE.search(data) is not None
        if error or finish or usage:
            value = _object(data) or {}
            choices = value.get("choices")
            if error and value.get("error") is not None and choices is None:
                return EventKind.UPSTREAM_ERROR
            if finish and isinstance(choices, list) and any(_finished(c) for c in choices):
                return EventKind.FINISH
            if usage and isinstance(value.get("usage"), dict):
                return EventKind.USAGE
        return EventKind.TEXT_DELTA if _CONTENT.search(data) else EventKind.OTHER

    def end_kind(self, event: ServerSentEvent) -> EventKind:
        """:meth:`classify` for the events that may end the stream; a chunk with no
        ``"error"`` whose choice's ``"finish_reason"`` is ``null`` (as OpenAI writes it, with
        or without a space) is OTHER without a parse or a regex (a chunk of several choices,
        some finished and some not, is taken as not finished)."""
        data = event.data
        if data == "[DONE]":
            return EventKind.TERMINAL
        unfinished = '"finish_reason":null' in data or '"finish_reason": null' in data
        if unfinished and '"error"' not in data:
            return EventKind.OTHER
        return self.classify(event)

    def complete_without_end(self, finished: bool) -> bool:
        """Complete once a ``finish_reason`` went by (``[DONE]`` is then written for it)."""
        return finished

    def text_delta(self, event: ServerSentEvent) -> tuple[str, Any, str] | None:
        if event.event != "message":
            return None
        chunk = _delta_object(event, '"chat.completion.chunk"')
        if chunk is None:
            return None
        choices = chunk.get("choices")
        if (
            chunk.get("object") != "chat.completion.chunk"
            or chunk.get("usage") is not None
            or not isinstance(choices, list)
            or len(choices) != 1
        ):
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
        return _DUMPS(chunk), (event.event, chunk, delta, "content"), text


def _finished(choice: Any) -> bool:
    return isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str)


_ANTHROPIC_KINDS = {
    "error": EventKind.UPSTREAM_ERROR,
    "message_stop": EventKind.TERMINAL,
    "message_start": EventKind.START,
    "message_delta": EventKind.USAGE,
    "content_block_delta": EventKind.TEXT_DELTA,
}
_ANTHROPIC_NAMES = frozenset(_ANTHROPIC_KINDS)
_ANTHROPIC_ERRORS = {  # HTTP status -> Anthropic error type (anthropic-sdk ErrorType)
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    410: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class _NamedDialect(Dialect):
    """A dialect whose events say what they are by name (or an unnamed event's data
    ``"type"``): Anthropic's and the Responses API's. :meth:`classify` looks the name up in
    :attr:`kinds`, which is cheap already, so :meth:`end_kind` is :meth:`classify`; and the
    answer is complete only with its terminal event."""

    names: ClassVar[frozenset[str]] = frozenset()  # the keys of kinds
    kinds: ClassVar[Mapping[str, EventKind]] = {}

    def _classify_by_name(self, event: ServerSentEvent) -> EventKind:
        kind = _event_type(event, self.names)
        return EventKind.OTHER if kind is None else self.kinds[kind]

    def end_kind(self, event: ServerSentEvent) -> EventKind:
        return self.classify(event)

    def complete_without_end(self, finished: bool) -> bool:
        """Never: without its terminal event the answer was cut."""
        return False


class AnthropicDialect(_NamedDialect):
    """The Anthropic Messages streaming dialect (API reference: "Messages, streaming").

    - End: the ``message_stop`` event (by event name, or an unnamed event whose data has
      ``"type": "message_stop"``) is written and the body ends at once: the anthropic SDK reads
      until the server closes. Nothing is synthesized when the source ends without it.
    - Error: ``event: error`` with data ``{"type": "error", "error": {"type", "message"}}``, the
      error type from the upstream's error status when there is one, else ours:
      400/413/422 ``invalid_request_error``, 401 ``authentication_error``, 402
      ``billing_error``, 403 ``permission_error``, 404/410 ``not_found_error``, 408/504
      (every timeout) ``timeout_error``, 429 ``rate_limit_error``, 503 (shutdown) and 529
      ``overloaded_error``, anything else ``api_error``. The anthropic SDK raises
      ``APIStatusError`` on it (``.type`` the error type, ``.api_message`` the message).
    - Heartbeat (``sse``): ``event: ping`` with data ``{"type": "ping"}``, as Anthropic sends
      (the SDK skips it).
    - Text deltas: ``content_block_delta`` events whose data is exactly ``{"type",
      "index", "delta": {"type": "text_delta", "text"}}``; same ``index``: merged.
    - Usage: ``message_start``'s ``message.usage`` (input tokens) and ``message_delta``'s
      ``usage`` (cumulative output tokens): a later block's counts supersede an earlier one's.
    """

    name = "anthropic"
    names, kinds = _ANTHROPIC_NAMES, _ANTHROPIC_KINDS
    end_is_data = True
    heartbeat_event = ServerSentEvent('{"type": "ping"}', event="ping")
    usage_paths = (("usage",), ("message", "usage"))

    def error_frame(
        self,
        error: StreamPlusError,
        started: ServerSentEvent | None,
        last: ServerSentEvent | None,
    ) -> list[ServerSentEvent]:
        return [ServerSentEvent(_DUMPS(self.refusal_body(error)), event="error")]

    def refusal_body(self, error: StreamPlusError) -> dict[str, Any]:
        """Anthropic's error object, ``{"type": "error", "error": {"type", "message"}}``: the
        upstream's own error type when it sent one, else the type of the status."""
        kind = getattr(error, "upstream_type", None)
        if not isinstance(kind, str):
            kind = _ANTHROPIC_ERRORS.get(_status(error), "api_error")
        return {"type": "error", "error": {"type": kind, "message": error.message}}

    def classify(self, event: ServerSentEvent) -> EventKind:
        """By event name (or an unnamed event's data ``"type"``): ``error`` the upstream's
        error, ``message_stop`` TERMINAL, ``message_start`` START, ``message_delta`` USAGE,
        ``content_block_delta`` TEXT_DELTA."""
        return self._classify_by_name(event)

    def text_delta(self, event: ServerSentEvent) -> tuple[str, Any, str] | None:
        if event.event != "content_block_delta":
            return None
        chunk = _delta_object(event, '"text_delta"')
        if chunk is None or len(chunk) != 3:
            return None
        delta = chunk.get("delta")
        if (
            chunk.get("type") != "content_block_delta"
            or not isinstance(chunk.get("index"), int)
            or not isinstance(delta, dict)
            or len(delta) != 2
            or delta.get("type") != "text_delta"
            or not isinstance(delta.get("text"), str)
        ):
            return None
        text = delta["text"]
        delta["text"] = ""
        return _DUMPS(chunk), (event.event, chunk, delta, "text"), text


_RESPONSE_START = frozenset({"response.created", "response.in_progress", "response.queued"})
_TEXT_DELTA = "response.output_text.delta"
_RESPONSE_KINDS = {
    "response.failed": EventKind.UPSTREAM_ERROR,
    "error": EventKind.UPSTREAM_ERROR,
    "response.completed": EventKind.TERMINAL,
    "response.incomplete": EventKind.TERMINAL,
    **dict.fromkeys(_RESPONSE_START, EventKind.START),
    _TEXT_DELTA: EventKind.TEXT_DELTA,
}
_RESPONSE_NAMES = frozenset(_RESPONSE_KINDS)
_TEXT_DELTA_KEYS = frozenset(
    "type item_id output_index content_index delta sequence_number logprobs obfuscation".split()
)


class OpenAIResponsesDialect(_NamedDialect):
    """The OpenAI Responses API streaming dialect (API reference: "Responses, streaming
    events"). One object per stream: it remembers the stream's last event and its last
    ``response.created`` / ``response.in_progress`` / ``response.queued`` event (references
    only; they are parsed only to build an error frame).

    - End: ``response.completed``, ``response.incomplete`` or ``response.failed`` (by event
      name, or an unnamed event's data ``"type"``) is written and the body ends at once: the
      openai SDK reads until the server closes. Nothing is synthesized without one.
    - Error: ``event: response.failed`` with data ``{"type": "response.failed",
      "sequence_number": <last + 1>, "response": {... "status": "failed", "error": {"code",
      "message"}}}``, the response object being the last one the stream announced (same
      ``id``: the SDK's ``responses.stream()`` refuses a lifecycle event whose id changed).
      ``code`` is ``rate_limit_exceeded`` for a 429, else ``server_error`` (the codes of
      ``ResponseError``). When no response was announced yet (a heartbeat committed the stream,
      then the upstream failed), a ``response.created`` with a new ``resp_...`` id (model ``""``)
      goes first, as the SDK's stream helper needs one; either way the frame validates as the
      SDK's ``ResponseStreamEvent``.
    - Heartbeat: the format's own (``: ping``; SSE comments are ignored by every parser).
    - Text deltas: ``response.output_text.delta`` events with no ``logprobs`` and no fields
      beyond ``item_id``, ``output_index``, ``content_index``, ``delta``, ``sequence_number``
      and ``obfuscation``; same ``item_id``, ``output_index`` and ``content_index``: merged.
      A merged delta keeps the first delta's ``sequence_number`` (and ``obfuscation``): the
      numbers of the deltas merged into it are skipped, so the sequence stays increasing,
      with gaps.
    - Usage: ``response.usage`` of the terminal events (``response.completed``, and
      ``response.incomplete`` / ``response.failed`` when the upstream counted tokens).
    """

    name = "openai-responses"
    names, kinds = _RESPONSE_NAMES, _RESPONSE_KINDS
    end_is_data = True
    usage_paths = (("response", "usage"),)

    def refusal_body(self, error: StreamPlusError) -> dict[str, Any]:
        """OpenAI's error object, as for chat completions (the SDK reads it the same way)."""
        return {"error": _openai_error(error)}

    def error_frame(
        self,
        error: StreamPlusError,
        started: ServerSentEvent | None,
        last: ServerSentEvent | None,
    ) -> list[ServerSentEvent]:
        """The ``response.failed`` of the response ``started`` announced, numbered after
        ``last`` (a ``response.created`` of a new response first, when none was)."""
        previous = _object(last.data) if last is not None else None
        number = previous.get("sequence_number") if previous is not None else None
        sequence = number + 1 if isinstance(number, int) and number >= 0 else 0
        announced = _object(started.data) if started is not None else None
        response = announced.get("response") if announced is not None else None
        events = []
        if not isinstance(response, dict):
            response = {
                "id": f"resp_{secrets.token_hex(16)}",
                "object": "response",
                "created_at": int(time.time()),
                "status": "in_progress",
                "model": "",
                "output": [],
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "error": None,
                "incomplete_details": None,
                "usage": None,
            }
            events.append(_response_event("response.created", sequence, response))
            sequence += 1
        code = "rate_limit_exceeded" if _status(error) == 429 else "server_error"
        failed = {**response, "status": "failed", "error": {"code": code, "message": error.message}}
        events.append(_response_event("response.failed", sequence, failed))
        return events

    def classify(self, event: ServerSentEvent) -> EventKind:
        """By event name (or an unnamed event's data ``"type"``): ``response.failed`` and
        ``error`` the upstream's error, ``response.completed`` / ``response.incomplete``
        TERMINAL, ``response.created`` / ``in_progress`` / ``queued`` START,
        ``response.output_text.delta`` TEXT_DELTA. Remembers nothing: the caller keeps the
        last START event and the last event for :meth:`error_frame`."""
        return self._classify_by_name(event)

    def text_delta(self, event: ServerSentEvent) -> tuple[str, Any, str] | None:
        if event.event not in ("message", _TEXT_DELTA):
            return None
        chunk = _delta_object(event, f'"{_TEXT_DELTA}"')
        if chunk is None:
            return None
        text = chunk.get("delta")
        if (
            chunk.get("type") != _TEXT_DELTA
            or not isinstance(text, str)
            or chunk.get("logprobs")
            or not _TEXT_DELTA_KEYS.issuperset(chunk)
        ):
            return None
        where = (event.event, chunk.get("item_id"), chunk.get("output_index"))
        shape = _DUMPS([*where, chunk.get("content_index")])
        return shape, (event.event, chunk, chunk, "delta"), text


def _openai_error(error: StreamPlusError) -> dict[str, Any]:
    """OpenAI's error fields for ``error``: the upstream's own type, param and code when an
    :class:`~sanic_streamplus.errors.UpstreamStatusError` carries them."""
    return {
        "message": error.message,
        "type": getattr(error, "upstream_type", None) or error.type,
        "param": getattr(error, "upstream_param", None),
        "code": getattr(error, "upstream_code", None),
    }


def _response_event(kind: str, sequence: int, response: dict[str, Any]) -> ServerSentEvent:
    """A Responses API lifecycle event ``kind`` carrying ``response``, named by its type."""
    body = {"type": kind, "sequence_number": sequence, "response": response}
    return ServerSentEvent(_DUMPS(body), event=kind)


DIALECTS: dict[str, type[Dialect]] = {
    "plain": Dialect,
    "openai": OpenAIDialect,
    "anthropic": AnthropicDialect,
    "openai-responses": OpenAIResponsesDialect,
}


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
        heartbeat: the bytes written while idle, or None if the format has no way to say nothing
            (a dialect may replace it: :meth:`Dialect.heartbeat`).
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
    """The :class:`Dialect` called ``name`` (``plain``, ``openai``, ``anthropic`` or
    ``openai-responses``): one object per dialect class, shared by every stream (a dialect
    keeps no state of its own).

    Raises:
        ValueError: unknown dialect name.
    """
    kind = _lookup(DIALECTS, "dialect", name)
    dialect = _SHARED.get(kind)
    if dialect is None:
        dialect = _SHARED[kind] = kind()
    return dialect


_SHARED: dict[type[Dialect], Dialect] = {}


def _lookup(table: dict[str, T], kind: str, name: str) -> T:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; use one of {sorted(table)}") from None
