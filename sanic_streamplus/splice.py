"""Continuing a committed stream on another upstream, with no seam: a sans-IO splice.

When the upstream of a stream that has already sent events fails mid-answer, the stream can go
on from the next upstream (issue 14, "after the commit point, opt-in continuation"): that
upstream is asked the original request plus the text delivered so far as a partial assistant
message (prefill), and its events are rewritten so that the client sees one answer, as if one
upstream had sent it all. :class:`Splice` does both halves, one object per client stream; it
knows no sockets and no clock, like the codec in :mod:`sanic_streamplus.sse`::

    splice = Splice(get_dialect("openai"))
    for event in first_upstream_events:      # each one relayed to the client
        splice.delivered(event)
    # ... the first upstream fails ...
    if splice.can_continue:
        body = splice.continuation_body(original_body)
        for event in next_upstream_events(body):
            event = splice.rewrite(event)
            if event is not None:
                relay(event)                 # and splice.delivered(event)

The seams it hides, per dialect (``docs/dialects.md``, "Continuation: the seams hidden"):

- ``openai`` (Chat Completions): one ``role`` delta; the first upstream's ``id``, ``model``,
  ``created`` and ``system_fingerprint`` on every chunk; usage summed.
- ``anthropic`` (Messages): one ``message_start``; the open text block goes on (its index), the
  continuation's later blocks are numbered after the delivered ones; usage summed.
- ``openai-responses`` (Responses API): one ``response.created`` / ``in_progress``; the first
  response's ``id`` throughout, ``sequence_number`` increasing, the continued message item's
  ``item_id`` / ``output_index`` kept, the done events and ``response.completed`` carrying the
  whole text; usage summed.

A stream is not continued while a tool call is in flight (its arguments cannot be prefilled):
:attr:`Splice.can_continue` is then False, as it is before anything was delivered and for a
dialect it does not know (``plain``).
"""

from __future__ import annotations

import json
from typing import Any, TypeGuard

from .framing import _DUMPS, Dialect, _object
from .sse import ServerSentEvent

__all__ = ["CONTINUE_INSTRUCTION", "Splice"]

CONTINUE_INSTRUCTION = (
    "Your previous answer was cut off. Continue it exactly where it stops, as if it had never "
    "been interrupted: do not repeat any of it, do not start over and do not comment on the "
    "interruption."
)
"""The user message sent after the partial assistant message, for the OpenAI dialects (chat
completions and Responses), whose models do not continue a trailing assistant message by
themselves. Replace it with ``Splice(dialect, instruction=...)``; ``instruction=None`` sends
none (a server that continues a prefilled assistant message natively)."""

_ASCII_DUMPS = json.JSONEncoder(separators=(",", ":")).encode
_CHAT_HEAD = ("id", "model", "created", "system_fingerprint")  # kept from the first chunk


def _sum_usage(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``more`` with each number (``int``, not ``bool``) that ``base`` has too replaced by the
    sum of both, nested objects (``prompt_tokens_details``...) summed the same way; a key only
    ``base`` has is added; anything else is ``more``'s."""
    summed = dict(more)
    for key, value in base.items():
        other = more.get(key)
        if key not in more:
            summed[key] = value
        elif _is_count(value) and _is_count(other):
            summed[key] = value + other
        elif isinstance(value, dict) and isinstance(other, dict):
            summed[key] = _sum_usage(value, other)
    return summed


def _counts(target: dict[str, Any], usage: Any) -> None:
    """Update ``target`` with the usage object ``usage``'s values that are not null (a null
    count in a later block does not unsay an earlier one)."""
    if isinstance(usage, dict):
        target.update((key, value) for key, value in usage.items() if value is not None)


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _like(event: ServerSentEvent, value: dict[str, Any]) -> ServerSentEvent:
    """``event`` with ``value`` (JSON) as its data: same event type, ``id`` and ``retry``.
    Data whose JSON escaped a UTF-16 surrogate (``"\\ud83d"``: half an emoji, cut between two
    deltas) is written escaped again, as a lone surrogate has no UTF-8."""
    escaped = "\\ud" in event.data or "\\uD" in event.data
    data = (_ASCII_DUMPS if escaped else _DUMPS)(value)
    return ServerSentEvent(data, event=event.event, id=event.id, retry=event.retry)


class _Splicer:
    """One dialect's splice (the interface :class:`Splice` delegates to)."""

    def __init__(self, instruction: str | None) -> None:
        self.instruction = instruction
        self.pieces: list[str] = []  # the text delivered, in pieces
        self.started = False  # an event of the answer was delivered
        self.blocked = False  # a tool call, a second choice, the end: not continuable
        self.made: tuple[ServerSentEvent, dict[str, Any]] | None = None  # the last rewrite

    @property
    def text(self) -> str:
        """The text delivered so far (joined once, kept joined)."""
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    def can_continue(self) -> bool:
        return self.started and not self.blocked

    def delivered(self, event: ServerSentEvent) -> None:
        raise NotImplementedError

    def continuation_body(self, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def rewrite(self, event: ServerSentEvent) -> ServerSentEvent | None:
        raise NotImplementedError

    def parse(self, event: ServerSentEvent) -> dict[str, Any] | None:
        """The JSON object of a delivered ``event``: the one :meth:`like` made it from when
        it is the last event rewritten (not parsed again), else its data parsed."""
        made, self.made = self.made, None
        return made[1] if made is not None and made[0] is event else _object(event.data)

    def like(self, event: ServerSentEvent, value: dict[str, Any]) -> ServerSentEvent:
        """:func:`_like`, remembered for :meth:`parse`."""
        out = _like(event, value)
        self.made = (out, value)
        return out

    def _instruction(self) -> list[dict[str, Any]]:
        return [] if self.instruction is None else [{"role": "user", "content": self.instruction}]


class _ChatSplicer(_Splicer):
    """OpenAI Chat Completions (API reference "Chat Completions, streaming": the chunk object).

    Delivered: the text is choice 0's ``delta.content``; the first chunk's ``id``, ``model``,
    ``created`` and ``system_fingerprint`` are the ones every later chunk carries; a
    ``delta.tool_calls`` / ``function_call`` / ``refusal``, a choice other than 0 (``n`` > 1)
    or a ``finish_reason`` (the answer is complete: nothing to continue) ends continuability.

    Usage: a continuation's usage is added to the last usage the client was sent, if any (most
    upstreams send usage once, in the chunk after the ``finish_reason``, so usually there is
    none and the counts are the continuation's alone). ``prompt_tokens`` are summed like the
    rest, not replaced: both upstreams read a prompt and bill for it, and the continuation's
    prompt includes the prefilled text, so the sum is what the answer cost; it is larger than
    a single upstream's prompt would have been.
    """

    def __init__(self, instruction: str | None) -> None:
        super().__init__(instruction)
        self.head: dict[str, Any] | None = None  # the first chunk's _CHAT_HEAD fields
        self.role = False  # a role delta was delivered
        self.usage: dict[str, Any] | None = None  # the last usage delivered
        self.base: dict[str, Any] | None = None  # self.usage when the continuation began

    def delivered(self, event: ServerSentEvent) -> None:
        chunk = self.parse(event)
        choices = chunk.get("choices") if chunk is not None else None
        if chunk is None or not isinstance(choices, list):
            self.blocked |= event.data == "[DONE]"
            return  # [DONE], an error object: not part of the answer
        self.started = True
        if self.head is None:
            self.head = {key: chunk[key] for key in _CHAT_HEAD if key in chunk}
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict) or choice.get("index", 0) != 0:
                self.blocked = True
                continue
            if choice.get("finish_reason") or any(
                delta.get(key) for key in ("tool_calls", "function_call", "refusal")
            ):
                self.blocked = True
            self.role |= "role" in delta
            content = delta.get("content")
            if isinstance(content, str) and content:
                self.pieces.append(content)

    def continuation_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with ``messages`` extended by the partial assistant message and the
        instruction (none when no text was delivered: the request is asked again as is)."""
        self.base = self.usage
        messages = list(body.get("messages") or [])
        if self.text:
            messages.append({"role": "assistant", "content": self.text})
            messages += self._instruction()
        return {**body, "messages": messages}

    def rewrite(self, event: ServerSentEvent) -> ServerSentEvent | None:
        chunk = _object(event.data)
        choices = chunk.get("choices") if chunk is not None else None
        if chunk is None or not isinstance(choices, list):
            return event  # [DONE], an error object: as they are
        head = self.head or {}
        for key in _CHAT_HEAD:
            if key in head:
                chunk[key] = head[key]
            else:
                chunk.pop(key, None)
        dropped_role = False
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if self.role and isinstance(delta, dict) and "role" in delta:
                del delta["role"]
                dropped_role = True
        usage = chunk.get("usage")
        if isinstance(usage, dict) and self.base is not None:
            chunk["usage"] = _sum_usage(self.base, usage)
        if dropped_role and usage is None and all(_empty_choice(c) for c in choices):
            return None  # the continuation's role chunk: the client has its role already
        return self.like(event, chunk)


def _empty_choice(choice: Any) -> bool:
    """A choice that says nothing: no finish reason, no logprobs, a delta of nulls and ""."""
    if not isinstance(choice, dict) or choice.get("finish_reason") or choice.get("logprobs"):
        return False
    delta = choice.get("delta")
    return isinstance(delta, dict) and all(value in (None, "") for value in delta.values())


_ANTHROPIC_USAGE = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _typed(event: ServerSentEvent, value: dict[str, Any] | None) -> str:
    """The type of ``event`` (whose JSON object is ``value``) in a dialect whose events are
    named by their data's ``"type"``: the event name, or for an unnamed event the data's."""
    kind = event.event
    if kind == "message" and value is not None and isinstance(value.get("type"), str):
        kind = value["type"]
    return kind


class _AnthropicSplicer(_Splicer):
    """Anthropic Messages (API reference "Messages, streaming"; prefill: "Prefill Claude's
    response"). Anthropic continues a final assistant message natively: no instruction.

    Delivered: the text is the ``text_delta`` s of the text blocks; a block of another type
    (``tool_use``, ``server_tool_use``, ``thinking``: a prefill cannot carry it, and extended
    thinking refuses a prefill), a ``stop_reason`` or ``message_stop`` ends continuability.

    The prefill must not end with white space (the API refuses it): it is sent stripped, and
    the white space the client already has is taken off the start of the continuation's text
    as far as the two agree (delivered ``"Hello "``, continuation ``" world"``: the client
    gets ``"world"``), so the client's text reads as one.

    Usage: ``message_delta.usage`` is cumulative per upstream; each count it carries becomes
    the client's last count plus the continuation's, and ``input_tokens`` (and the cache
    counts) of the dropped ``message_start`` are added to it, summed the same way, so the
    client's final usage counts both requests (see :class:`_ChatSplicer` for why input tokens
    are summed too). The first upstream's output count is the last one the client got, often
    only ``message_start``'s placeholder (1).

    A continuation whose first block is not text (it calls a tool at once) leaves the open
    text block without its ``content_block_stop``: rewrite makes one event of one event, and
    the SDKs need no stop to read the block.
    """

    def __init__(self, instruction: str | None) -> None:
        super().__init__(None)
        self.open: int | None = None  # the index of the text block delivered and not stopped
        self.next = 0  # the index the next new block gets
        self.usage: dict[str, Any] = {}  # the client's cumulative counts
        self.base: dict[str, Any] = {}  # self.usage when the continuation began
        self.more: dict[str, Any] = {}  # the continuation's cumulative counts
        self.offset: int | None = None  # client index - continuation index
        self.trim = ""  # delivered white space the continuation's text may repeat

    def delivered(self, event: ServerSentEvent) -> None:
        value = self.parse(event)
        kind = _typed(event, value)
        if value is None:
            return
        if kind == "message_start":
            self.started = True
            _counts(self.usage, (value.get("message") or {}).get("usage"))
        elif kind == "content_block_start":
            block, index = value.get("content_block") or {}, value.get("index")
            if not isinstance(index, int) or block.get("type") != "text":
                self.blocked = True
                return
            self.open, self.next = index, max(self.next, index + 1)
            self.pieces.append(block.get("text") or "")
        elif kind == "content_block_delta":
            delta = value.get("delta") or {}
            if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                self.pieces.append(delta["text"])
        elif kind == "content_block_stop":
            self.open = None if value.get("index") == self.open else self.open
        elif kind == "message_delta":
            _counts(self.usage, value.get("usage"))
            self.blocked |= bool((value.get("delta") or {}).get("stop_reason"))
        elif kind == "message_stop":
            self.blocked = True

    def continuation_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with ``messages`` extended by the partial assistant message (its trailing
        white space stripped; none when no text was delivered)."""
        # the counts so far: the client's, or after a continuation the sum it was building
        # (its message_start's counts, dropped, are not in the client's if it failed early)
        self.base = _sum_usage(self.base, self.more) if self.more else dict(self.usage)
        self.more, self.offset = {}, None
        prefill = self.text.rstrip()
        self.trim = self.text[len(prefill) :]
        messages = list(body.get("messages") or [])
        if prefill:
            messages.append({"role": "assistant", "content": prefill})
        return {**body, "messages": messages}

    def rewrite(self, event: ServerSentEvent) -> ServerSentEvent | None:
        value = _object(event.data)
        kind = _typed(event, value)
        if value is None:
            return event
        if kind == "message_start":
            _counts(self.more, (value.get("message") or {}).get("usage"))
            return None  # the client has its message_start: one message
        if kind == "message_delta" and isinstance(value.get("usage"), dict):
            value["usage"] = self._usage(value["usage"])
            return self.like(event, value)
        index = value.get("index")
        if not isinstance(index, int):
            return event  # ping, error, message_stop
        if kind == "content_block_start" and self.offset is None:
            return self._first_block(event, value, index)
        value["index"] = index + (self.offset or 0)
        delta = value.get("delta") or {}
        if kind == "content_block_delta" and delta.get("type") == "text_delta" and self.trim:
            text = delta.get("text")
            delta["text"] = self._trimmed(text) if isinstance(text, str) else text
            if text and not delta["text"]:
                return None  # white space the client has already
        return self.like(event, value)

    def _first_block(
        self, event: ServerSentEvent, value: dict[str, Any], index: int
    ) -> ServerSentEvent | None:
        """The continuation's first ``content_block_start``: a text block goes on in the
        client's open one (dropped, or its text as a delta of it), anything else is a new
        block numbered after the delivered ones."""
        block = value.get("content_block") or {}
        if self.open is None or block.get("type") != "text":
            self.offset, value["index"] = self.next - index, self.next
            if block.get("type") != "text":
                self.trim = ""
            elif isinstance(block.get("text"), str):
                block["text"] = self._trimmed(block["text"])
            return self.like(event, value)
        self.offset = self.open - index
        text = self._trimmed(block.get("text") or "")
        if not text:
            return None
        delta = {"type": "content_block_delta", "index": self.open}
        delta["delta"] = {"type": "text_delta", "text": text}
        name = "content_block_delta" if event.event == "content_block_start" else event.event
        return ServerSentEvent(_DUMPS(delta), event=name)

    def _trimmed(self, text: str) -> str:
        """``text`` without the start it shares with :attr:`trim` (what is left of it)."""
        same = 0
        while same < min(len(text), len(self.trim)) and text[same] == self.trim[same]:
            same += 1
        self.trim = self.trim[same:] if same == len(text) else ""
        return text[same:]

    def _usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        """A continuation's ``message_delta`` usage, summed with the client's counts."""
        _counts(self.more, usage)
        keys = [*usage, *(key for key in _ANTHROPIC_USAGE if key not in usage)]
        base = {key: self.base[key] for key in keys if key in self.base}
        return _sum_usage(base, {key: self.more[key] for key in keys if key in self.more})


_RESPONSE_STARTS = frozenset({"response.created", "response.in_progress", "response.queued"})
_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_RESPONSE_HEAD = ("id", "created_at", "model")  # kept from the first response announced


class _ResponsesSplicer(_Splicer):
    """OpenAI Responses API (API reference "Responses, streaming events"; input items: "Create
    a model response", ``input``).

    Delivered: the text is the ``response.output_text.delta`` s of the message items; the
    first announced response's ``id``, ``created_at`` and ``model`` are kept; an output item
    other than a message or a reasoning item (a ``function_call``, any ``*_call``), a
    ``refusal`` part, or the response's end ends continuability.

    Rewritten: each continuation output item gets the next client ``output_index``, except
    its first message item, which goes on in the client's open message item (its
    ``output_item.added`` dropped, its ``item_id`` and ``output_index`` the client's; the
    same for its first ``output_text`` part and the open part's ``content_index``). Every
    ``sequence_number`` is renumbered after the last one delivered. The done events of the
    continued part and item (``output_text.done``, ``content_part.done``,
    ``output_item.done``) carry the whole text the client got; the final ``response``'s
    ``output`` is the items the client saw done, whole; its usage is summed with any the
    client got (see :class:`_ChatSplicer`; the Responses API reports usage only at the end,
    so it is usually the continuation's alone).
    """

    def __init__(self, instruction: str | None) -> None:
        super().__init__(instruction)
        self.head: dict[str, Any] | None = None
        self.sequence = -1  # the last sequence_number the client got
        self.next = 0  # the output_index the next new item gets
        self.open: tuple[int, Any] | None = None  # (output_index, id) of an unfinished message
        self.part: int | None = None  # the content_index of its unfinished output_text part
        self.next_part = 0  # the content_index its next part gets
        self.texts: dict[int, list[str]] = {}  # its parts' text delivered, by content_index
        self.parts: dict[int, Any] = {}  # its parts delivered done, by content_index
        self.added: dict[int, Any] = {}  # the items delivered, as added, by output_index
        self.done: dict[int, Any] = {}  # the items delivered done, by output_index
        self.usage: dict[str, Any] | None = None
        self.base: dict[str, Any] | None = None  # self.usage when the continuation began
        self.items: dict[int, int] = {}  # the continuation's output_index -> the client's
        self.continued: tuple[int, Any, Any] | None = None  # its (index, id, the client's id)
        self.part_map: dict[int, int] = {}  # its content_index -> the client's
        # what the continuation numbers from: its events may be rewritten and never delivered
        # (an upstream that failed before its first content), so not the delivered counts
        self.number, self.fresh, self.fresh_part = -1, 0, 0

    def delivered(self, event: ServerSentEvent) -> None:
        value = self.parse(event)
        kind = _typed(event, value)
        if value is None:
            return
        number = value.get("sequence_number")
        if _is_count(number):
            self.sequence = max(self.sequence, number)
        where, index = value.get("output_index"), value.get("content_index")
        mine = self.open is not None and where == self.open[0]  # of the unfinished message
        if kind in _RESPONSE_STARTS:
            self.started = True
            if self.head is None:
                response = value.get("response") or {}
                self.head = {key: response[key] for key in _RESPONSE_HEAD if key in response}
        elif kind in _RESPONSE_ENDS:
            self.blocked = True
        elif kind == "response.output_item.added" and _is_count(where):
            item = value.get("item") or {}
            self.next, self.added[where] = max(self.next, where + 1), item
            if item.get("type") == "message":
                self.open, self.part, self.next_part = (where, item.get("id")), None, 0
                self.texts, self.parts = {}, {}
            self.blocked |= item.get("type") not in ("message", "reasoning")
        elif kind == "response.content_part.added" and mine and _is_count(index):
            part = value.get("part") or {}
            self.part, self.next_part = index, max(self.next_part, index + 1)
            self.texts[index] = [part.get("text") or ""]
            self.blocked |= part.get("type") != "output_text"
        elif kind == "response.output_text.delta" and isinstance(value.get("delta"), str):
            self.pieces.append(value["delta"])
            if mine and _is_count(index):
                self.texts.setdefault(index, []).append(value["delta"])
        elif kind == "response.content_part.done" and mine and _is_count(index):
            self.parts[index] = value.get("part")
            self.part = None if index == self.part else self.part
        elif kind == "response.output_item.done" and _is_count(where):
            self.done[where] = value.get("item")
            self.open = None if mine else self.open
        self.blocked |= kind == "response.refusal.delta"

    def continuation_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with ``input`` (a string becomes one user message) extended by the partial
        assistant message and the instruction (none when no text was delivered)."""
        self.base, self.items, self.continued, self.part_map = self.usage, {}, None, {}
        self.number, self.fresh, self.fresh_part = self.sequence, self.next, self.next_part
        given = body.get("input")
        items = (
            list(given or [])
            if not isinstance(given, str)
            else [{"role": "user", "content": given}]
        )
        if self.text:
            items.append({"type": "message", "role": "assistant", "content": self.text})
            items += self._instruction()
        return {**body, "input": items}

    def rewrite(self, event: ServerSentEvent) -> ServerSentEvent | None:
        value = _object(event.data)
        kind = _typed(event, value)
        if value is None:
            return event
        if kind in _RESPONSE_STARTS:
            return None  # the client's response was announced: one response
        where = value.get("output_index")
        if kind == "response.output_item.added" and _is_count(where):
            if not self._added(where, value.get("item") or {}):
                return None
        ours = self.continued is not None and where == self.continued[0]
        if kind == "response.content_part.added" and ours and not self._part(value):
            return None
        self._renumber(value, ours)
        if ours and kind.endswith(".done"):
            self._whole(kind, value)
        response = value.get("response")
        if isinstance(response, dict):
            self._response(kind, response)
        return self.like(event, value)

    def _added(self, where: int, item: dict[str, Any]) -> bool:
        """Map a continuation item to the client's: its first message item to the unfinished
        one (False: drop its ``output_item.added``), any other to the next new index."""
        if self.continued is None and self.open is not None and item.get("type") == "message":
            self.continued = (where, item.get("id"), self.open[1])
            self.items[where] = self.open[0]
            return False
        self.items[where] = self.fresh
        self.fresh += 1
        return True

    def _part(self, value: dict[str, Any]) -> bool:
        """Map a continued item's part to the client's: its first ``output_text`` part to the
        unfinished one (False: drop its ``content_part.added``), any other to the next."""
        index, part = value.get("content_index"), value.get("part") or {}
        if not _is_count(index):
            return True
        if not self.part_map and self.part is not None and part.get("type") == "output_text":
            self.part_map[index] = self.part
            return False
        self.part_map[index] = self.fresh_part
        self.fresh_part += 1
        return True

    def _renumber(self, value: dict[str, Any], ours: bool) -> None:
        """The client's sequence_number, output_index, item_id and content_index."""
        if "sequence_number" in value:
            self.number += 1
            value["sequence_number"] = self.number
        where, index = value.get("output_index"), value.get("content_index")
        if _is_count(where):
            value["output_index"] = self.items.get(where, where)
        if ours and self.continued is not None:
            _, theirs, client = self.continued
            if value.get("item_id") == theirs:
                value["item_id"] = client
            if _is_count(index):
                value["content_index"] = self.part_map.get(index, index)
            item = value.get("item")
            if isinstance(item, dict) and item.get("id") == theirs:
                item["id"] = client

    def _whole(self, kind: str, value: dict[str, Any]) -> None:
        """The continued item's done events with the whole text the client got."""
        index, part, item = value.get("content_index"), value.get("part"), value.get("item")
        if kind == "response.output_text.done" and _is_count(index):
            value["text"] = "".join(self.texts.get(index, []))
        elif kind == "response.content_part.done" and _is_count(index) and isinstance(part, dict):
            if part.get("type") == "output_text":
                part["text"] = "".join(self.texts.get(index, []))
        elif kind == "response.output_item.done" and isinstance(item, dict) and self.parts:
            item["content"] = [self.parts[key] for key in sorted(self.parts)]

    def _response(self, kind: str, response: dict[str, Any]) -> None:
        """The response object of a continuation event: the client's id (and created_at,
        model); at the end, the client's items as its output (done, or as added when the
        upstream that began one failed: a reasoning item cut short) and the usage summed."""
        response.update(self.head or {})
        if kind not in _RESPONSE_ENDS:
            return
        output = [
            self.done.get(key, self.added.get(key)) for key in sorted({*self.added, *self.done})
        ]
        known = {item.get("id") for item in output if isinstance(item, dict)}
        theirs = self.continued[1] if self.continued is not None else None
        for item in response.get("output") or []:
            if not isinstance(item, dict) or item.get("id") not in {*known, theirs}:
                output.append(item)  # an item the client was not sent done
        response["output"] = output
        usage = response.get("usage")
        if isinstance(usage, dict) and self.base is not None:
            response["usage"] = _sum_usage(self.base, usage)


_SPLICERS: dict[str, type[_Splicer]] = {
    "openai": _ChatSplicer,
    "anthropic": _AnthropicSplicer,
    "openai-responses": _ResponsesSplicer,
}


class Splice:
    """The splice of one client stream: what it delivered, and how a continuation goes on.

    Call :meth:`delivered` with every event relayed to the client, in order (the rewritten
    events of a continuation too, each one before the next is rewritten: the done events of
    the Responses API repeat the text delivered). When the upstream fails and
    :attr:`can_continue` is True, send the next upstream :meth:`continuation_body` (once per
    continuing upstream: it also starts that upstream's rewriting), and pass each event it
    sends through :meth:`rewrite`.
    Several continuations in a row work the same way.

    Args:
        dialect: the route's dialect (:func:`sanic_streamplus.framing.get_dialect`):
            ``openai``, ``anthropic`` and ``openai-responses`` are known; with any other,
            :attr:`can_continue` is always False.
        instruction: the user message that follows the partial assistant message for the
            OpenAI dialects (default :data:`CONTINUE_INSTRUCTION`; None: none). Anthropic
            continues a prefilled assistant message natively and is sent none.
    """

    def __init__(self, dialect: Dialect, *, instruction: str | None = CONTINUE_INSTRUCTION) -> None:
        kind = _SPLICERS.get(dialect.name)
        self._splicer = kind(instruction) if kind is not None else None
        self._continuing = False  # continuation_body() was called: rewrite() may be

    def delivered(self, event: ServerSentEvent) -> None:
        """Take note of ``event``, relayed to the client (its JSON data is parsed once)."""
        if self._splicer is not None:
            self._splicer.delivered(event)

    @property
    def can_continue(self) -> bool:
        """Whether another upstream can continue the stream: False before anything was
        delivered (the failover before the commit point starts over instead), after the
        answer's end, while a tool call / function call is in flight (or was delivered) and
        for a dialect the splice does not know."""
        return self._splicer is not None and self._splicer.can_continue()

    @property
    def text(self) -> str:
        """The answer's text delivered so far ("" for a dialect the splice does not know)."""
        return self._splicer.text if self._splicer is not None else ""

    def continuation_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The JSON body for the next upstream: ``body`` (the original request, not mutated)
        plus the text delivered so far as a partial assistant message; everything else
        (``stream``, ``model``, sampling options) as it was.

        Raises:
            RuntimeError: :attr:`can_continue` is False.
        """
        if self._splicer is None or not self._splicer.can_continue():
            raise RuntimeError("this stream cannot be continued (see Splice.can_continue)")
        self._continuing = True
        return self._splicer.continuation_body(body)

    def rewrite(self, event: ServerSentEvent) -> ServerSentEvent | None:
        """``event`` of the continuing upstream as the client must see it (a new event when
        something changed, else ``event`` itself), or None: drop it (a repeated start).
        Events it does not know (an error, a ping) pass unchanged.

        Raises:
            RuntimeError: :meth:`continuation_body` was not called first.
        """
        if self._splicer is None or not self._continuing:
            raise RuntimeError("call Splice.continuation_body() before rewriting its events")
        return self._splicer.rewrite(event)
