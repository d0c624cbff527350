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

from typing import Any

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


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _like(event: ServerSentEvent, value: dict[str, Any]) -> ServerSentEvent:
    """``event`` with ``value`` (JSON) as its data: same event type, ``id`` and ``retry``."""
    return ServerSentEvent(_DUMPS(value), event=event.event, id=event.id, retry=event.retry)


class _Splicer:
    """One dialect's splice (the interface :class:`Splice` delegates to)."""

    def __init__(self, instruction: str | None) -> None:
        self.instruction = instruction
        self.pieces: list[str] = []  # the text delivered, in pieces
        self.started = False  # an event of the answer was delivered
        self.blocked = False  # a tool call, a second choice, the end: not continuable

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
        chunk = _object(event.data)
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
        return _like(event, chunk)


def _empty_choice(choice: Any) -> bool:
    """A choice that says nothing: no finish reason, no logprobs, a delta of nulls and ""."""
    if not isinstance(choice, dict) or choice.get("finish_reason") or choice.get("logprobs"):
        return False
    delta = choice.get("delta")
    return isinstance(delta, dict) and all(value in (None, "") for value in delta.values())


_ANTHROPIC_USAGE = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _typed(event: ServerSentEvent) -> tuple[str, dict[str, Any] | None]:
    """(the event's type, its JSON object or None) for a dialect whose events are named by
    their data's ``"type"``: the event name, or for an unnamed event the data's ``"type"``."""
    value = _object(event.data)
    kind = event.event
    if kind == "message" and value is not None and isinstance(value.get("type"), str):
        kind = value["type"]
    return kind, value


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
        kind, value = _typed(event)
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
        self.base, self.more, self.offset = dict(self.usage), {}, None
        prefill = self.text.rstrip()
        self.trim = self.text[len(prefill) :]
        messages = list(body.get("messages") or [])
        if prefill:
            messages.append({"role": "assistant", "content": prefill})
        return {**body, "messages": messages}

    def rewrite(self, event: ServerSentEvent) -> ServerSentEvent | None:
        kind, value = _typed(event)
        if value is None:
            return event
        if kind == "message_start":
            _counts(self.more, (value.get("message") or {}).get("usage"))
            return None  # the client has its message_start: one message
        if kind == "message_delta" and isinstance(value.get("usage"), dict):
            value["usage"] = self._usage(value["usage"])
            return _like(event, value)
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
        return _like(event, value)

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
            return _like(event, value)
        self.offset = self.open - index
        text = self._trimmed(block.get("text") or "")
        if not text:
            return None
        delta = {"type": "content_block_delta", "index": self.open}
        delta["delta"] = {"type": "text_delta", "text": text}
        return ServerSentEvent(_DUMPS(delta), event="content_block_delta")

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


_SPLICERS: dict[str, type[_Splicer]] = {
    "openai": _ChatSplicer,
    "anthropic": _AnthropicSplicer,
}


class Splice:
    """The splice of one client stream: what it delivered, and how a continuation goes on.

    Call :meth:`delivered` with every event relayed to the client, in order (the rewritten
    events of a continuation too). When the upstream fails and :attr:`can_continue` is True,
    send the next upstream :meth:`continuation_body` (once per continuing upstream: it also
    starts that upstream's rewriting), and pass each event it sends through :meth:`rewrite`.
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
