"""What the fake model streams: its tokens, the blocks of its event-stream body, and the old fault
knobs of :class:`FakeModel` translated into a :class:`~sanic_streamplus.testing.faults.FaultPlan`.

``FakeModel`` holds two kinds of settings. The *content* ones say what the body is: ``tokens``,
``delay``, ``text``, ``token_size``, ``content_type``, ``bom``, ``line_ending``,
``malformed_utf8``, ``u2028``, ``finish_reason``, ``usage``, ``done``, ``trickle``,
``set_cookie``. ``plan`` says what happens on the wire, in order. The remaining fields are the
kit's first fault knobs, kept as a compatibility layer: :meth:`FakeModel.fault_plan` translates
them into a plan (a model with a ``plan`` takes none of them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from .faults import (
    Block,
    ErrorEvent,
    Events,
    FaultPlan,
    Hang,
    Headers,
    Hold,
    Layout,
    LongLine,
    OversizedEvent,
    PartialEvent,
    Reset,
    Stall,
    Status,
    Step,
    lay_out,
)

__all__ = [
    "ERROR_EVENT",
    "FAKE_USAGE",
    "FAULT_KNOBS",
    "MALFORMED_BYTES",
    "MALFORMED_TOKEN",
    "U2028_TOKEN",
    "FakeModel",
    "fake_tokens",
    "text_tokens",
]

_WORDS = ("Hello", " from", " the", " fake", " model", ",", " token", " by", " token", ".")
MALFORMED_TOKEN = 1  # the token whose content malformed_utf8 spoils (index into fake_tokens())
MALFORMED_BYTES = b"\xff\xfe\xe2\x82"  # never UTF-8 twice, then a 3-byte sequence cut short
U2028_TOKEN = 2  # the token whose content u2028 extends
_U2028_SUFFIX = "\u2028line\u2029para"
_MALFORMED_MARK = "{malformed}"  # ASCII placeholder swapped for MALFORMED_BYTES once encoded
_SLOT = "{slot}"  # a token's place in the template of its chunk
_SLOT_JSON = json.dumps(_SLOT).encode()
_LINE_ENDINGS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}
ERROR_EVENT = {  # the data of an error event (ErrorEvent, error_event_after)
    "error": {"message": "fake upstream error event", "type": "server_error", "code": "fake_error"}
}
FAKE_USAGE = {"prompt_tokens": 7}  # the usage chunk's, plus completion_tokens and total_tokens
FAULT_KNOBS = frozenset(
    {
        "fail_after", "reset_at_byte", "stall", "stall_after", "stall_mid_frame",
        "comment_every", "hold_before", "error_status", "retry_after", "error_body",
        "id_only_block", "oversized_event", "long_line", "error_event_after", "hold_after_done",
    }
)  # fmt: skip
"""The compat knobs that :meth:`FakeModel.fault_plan` translates (a ``plan`` replaces them)."""


def fake_tokens(count: int, token_size: int | None = None) -> list[str]:
    """The deterministic tokens the fake model streams: ``count`` strings, each padded with
    ``"~"`` to ``token_size`` characters when given. ``"".join()`` them for the full text."""
    tokens = [f"{_WORDS[i % len(_WORDS)]}{i // len(_WORDS) or ''}" for i in range(count)]
    if token_size:
        tokens = [t.ljust(token_size, "~")[:token_size] for t in tokens]
    return tokens


def text_tokens(text: str) -> list[str]:
    """``text`` cut into tokens as the fake model streams it: each word with the white space
    before it (line breaks included); trailing white space goes with the last token.
    ``"".join()`` them gives ``text`` back."""
    tokens = re.findall(r"\s*\S+", text)
    tail = text[sum(map(len, tokens)) :]
    if tokens:
        tokens[-1] += tail
    elif tail:
        tokens = [tail]
    return tokens


@dataclass(frozen=True)
class FakeModel:
    """The fake model: what it streams, and the faults on the way (see the module docstring
    and the package's; seconds for times, bytes for sizes).

    ``plan`` is a :class:`FaultPlan` (or its JSON form, a list). The fault knobs, for
    compatibility: ``fail_after`` (reset after N blocks), ``reset_at_byte``, ``stall`` with
    ``stall_after`` / ``stall_mid_frame`` / ``comment_every``, ``hold_before``,
    ``error_status`` / ``retry_after`` / ``error_body``, ``id_only_block``, ``oversized_event``,
    ``long_line``, ``error_event_after``, ``hold_after_done``.

    Raises:
        ValueError: ``line_ending`` is not ``"lf"``, ``"crlf"`` or ``"cr"``, ``trickle`` is not
            positive, ``text`` is not a string, ``plan`` is not a plan, or a plan is given
            with fault knobs.
    """

    tokens: int = 12
    delay: float = 0.05
    text: str | None = None
    token_size: int | None = None
    fail_after: int | None = None
    reset_at_byte: int | None = None
    stall: float = 0.0
    stall_after: int | None = None
    stall_mid_frame: int | None = None
    comment_every: float | None = None
    hold_before: int | None = None
    error_status: int | None = None
    retry_after: str | None = None
    error_body: Any = None
    content_type: str = "text/event-stream"
    bom: bool = False
    line_ending: str = "lf"
    malformed_utf8: bool = False
    u2028: bool = False
    id_only_block: bool = False
    oversized_event: int | None = None
    long_line: int | None = None
    finish_reason: bool = True
    usage: bool = False
    error_event_after: int | None = None
    done: bool = True
    hold_after_done: bool = False
    trickle: int | None = None
    set_cookie: str | None = None
    plan: FaultPlan | None = None

    def __post_init__(self) -> None:
        if self.line_ending not in _LINE_ENDINGS:
            raise ValueError(f"line_ending must be one of {sorted(_LINE_ENDINGS)}")
        if self.trickle is not None and self.trickle <= 0:
            raise ValueError("trickle must be a positive number of bytes")
        if self.text is not None and not isinstance(self.text, str):
            raise ValueError("text must be a string")
        if self.plan is not None:
            object.__setattr__(self, "plan", FaultPlan.from_json(self.plan))
            if self._knobs_set():
                raise ValueError(f"a plan replaces the fault knobs: {sorted(self._knobs_set())}")

    def _knobs_set(self) -> set[str]:
        default = _DEFAULT_KNOBS
        return {name for name in FAULT_KNOBS if getattr(self, name) != default[name]}

    def override(self, values: Any) -> FakeModel:
        """A copy with the known keys of ``values`` (a dict from a request body) applied. A
        ``plan`` among them replaces this model's faults (its plan or fault knobs), and a fault
        knob among them replaces its plan: a request chooses its own faults.

        Raises:
            ValueError: a value is out of range (see the class).
        """
        if not isinstance(values, dict):
            return self
        names = {f.name for f in fields(self)}
        changes = {k: v for k, v in values.items() if k in names}
        base = self
        if changes.get("plan") is not None:
            base = replace(self, plan=None, **_DEFAULT_KNOBS)
        elif FAULT_KNOBS & changes.keys():
            base = replace(self, plan=None)
        return replace(base, **changes)

    def _tokens(self) -> list[str]:
        if self.text is not None:
            return text_tokens(self.text)
        return fake_tokens(self.tokens, self.token_size)

    def expected_tokens(self) -> list[str]:
        """The token contents as a correct client sees them: :func:`fake_tokens`, with the
        ``malformed_utf8`` token's bytes decoded with replacement and the ``u2028`` suffix."""
        tokens = self._tokens()
        if self.malformed_utf8 and len(tokens) > MALFORMED_TOKEN:
            tokens[MALFORMED_TOKEN] += MALFORMED_BYTES.decode("utf-8", "replace")
        if self.u2028 and len(tokens) > U2028_TOKEN:
            tokens[U2028_TOKEN] += _U2028_SUFFIX
        return tokens

    def content(self) -> list[bytes]:
        """The blocks of the model's own body, before any fault puts in blocks of its own: the
        role chunk, the tokens, the stop chunk, the usage chunk, ``[DONE]`` (line endings
        applied, the BOM before the first)."""
        tokens = self._tokens()
        if self.malformed_utf8 and len(tokens) > MALFORMED_TOKEN:
            tokens[MALFORMED_TOKEN] += _MALFORMED_MARK
        if self.u2028 and len(tokens) > U2028_TOKEN:
            tokens[U2028_TOKEN] += _U2028_SUFFIX
        before, after = _chunk_event({"content": _SLOT}, None).split(_SLOT_JSON)
        blocks = [_chunk_event({"role": "assistant", "content": ""}, None)]
        blocks += [  # what _chunk_event() gives, without a dict and a dumps() per token
            before + json.dumps(token, ensure_ascii=False).encode() + after for token in tokens
        ]
        if self.malformed_utf8 and len(tokens) > MALFORMED_TOKEN:
            mark = _MALFORMED_MARK.encode()
            blocks[1 + MALFORMED_TOKEN] = blocks[1 + MALFORMED_TOKEN].replace(mark, MALFORMED_BYTES)
        if self.finish_reason:
            blocks.append(_chunk_event({}, "stop"))
        if self.usage:
            blocks.append(_usage_event(len(tokens)))
        if self.done:
            blocks.append(b"data: [DONE]\n\n")
        blocks = [self._endings(block) for block in blocks]
        if self.bom:
            blocks[0] = b"\xef\xbb\xbf" + blocks[0]
        return blocks

    def _endings(self, block: bytes) -> bytes:
        ending = _LINE_ENDINGS[self.line_ending]
        return block if ending == b"\n" else block.replace(b"\n", ending)

    def render(self, step: Step) -> bytes:
        """The block a plan step puts into the body, this model's line endings applied."""
        if isinstance(step, OversizedEvent):
            return self._endings(_padded_event(step.size))
        if isinstance(step, ErrorEvent):
            error = ERROR_EVENT if step.error is None else step.error
            data = json.dumps(error, separators=(",", ":")).encode()
            return self._endings(b"data: " + data + b"\n\n")
        if isinstance(step, LongLine):
            return (b"data: " + b"x" * step.size)[: step.size]
        raise TypeError(f"{step.name!r} puts no block in the body")

    def _bytes(self, step: Step) -> bytes:
        return step.data if isinstance(step, Block) else self.render(step)

    def layout(self) -> Layout:
        """:meth:`fault_plan` laid out over :meth:`content`.

        Raises:
            ValueError: the plan answers a status after writing.
        """
        content = self.content()
        return lay_out(self._plan(content), content, self.render)

    def frames(self) -> list[bytes]:
        """The blocks of the event-stream body, in the order written, exactly as written (line
        endings applied, the BOM before the first): ``b"".join()`` them for the whole body; the
        blocks a plan's steps put in included, a reset, close or hang stopping the writing early
        not counted. Byte offsets for ``Reset(at_byte=...)`` come from them.

        A ``long_line`` block has no line ending, and nothing follows it."""
        return self.layout().blocks

    def comment(self) -> bytes:
        """The keep-alive comment block, line endings applied."""
        return self._endings(b": keep-alive\n\n")

    def fault_plan(self) -> FaultPlan:
        """``plan``, or the fault knobs translated into a plan (event numbers count the blocks
        of the old body from 0: the role chunk, an ``id_only_block``, the first token, an
        ``oversized_event`` or ``long_line``, the other tokens, the stop and usage chunks,
        ``[DONE]``)."""
        return self._plan(self.content())

    def _plan(self, content: list[bytes]) -> FaultPlan:
        if self.plan is not None:
            return self.plan
        if not self._knobs_set():
            return FaultPlan()  # the whole stream
        first: list[Step] = []
        plain_stall = self.stall_after is None and self.stall_mid_frame is None
        if self.error_status:
            if self.stall:
                first.append(Stall(self.stall))
            status = Status(self.error_status, self.error_body, self.retry_after)
            return FaultPlan([*first, status])
        if plain_stall and self.stall and not self.comment_every:
            first.append(Stall(self.stall))
        first.append(Headers())
        if plain_stall and self.stall and self.comment_every:
            first.append(Stall(self.stall, self.comment_every))
        return FaultPlan(first + self._numbered_steps(content))

    def _numbered_steps(self, content: list[bytes]) -> list[Step]:
        """The knobs that name a block number, as steps, in the order of the old body."""
        marks = {self.fail_after, self.error_event_after, self.stall_after, self.hold_before}
        items: list[bytes | Step] = list(content[:2])
        if self.id_only_block:
            items.insert(1, Block(self._endings(b"id: 42\n\n")))
        if self.oversized_event is not None:
            items.append(OversizedEvent(self.oversized_event))
        if self.long_line is not None:
            items.append(LongLine(self.long_line))
        else:
            items += content[2:]
        steps: list[Step] = []
        end = 0  # byte offset of the end of the item
        run = 0  # the model's blocks in a row, not yet in steps

        def flush() -> list[Step]:
            nonlocal run
            if run:
                steps.append(Events(run))
            run = 0
            return steps

        for number, item in enumerate(items):
            if number in marks:
                flush()
            if number == self.fail_after:
                return [*steps, Reset()]
            if number == self.error_event_after:
                return [*steps, ErrorEvent(), *([Hang()] if self.hold_after_done else [])]
            if number == self.stall_after:
                steps.append(Stall(self.stall, self.comment_every))
            if number == self.hold_before:
                steps.append(Hold())
            end += len(item if isinstance(item, bytes) else self._bytes(item))
            if self.reset_at_byte is not None and end >= self.reset_at_byte:
                return [*flush(), Reset(at_byte=self.reset_at_byte)]
            if number == self.stall_mid_frame:
                flush().extend([PartialEvent(), Stall(self.stall)])
            if isinstance(item, bytes):
                run += 1
                continue
            flush().append(item)
            if isinstance(item, LongLine):
                return steps
        flush()
        if self.reset_at_byte is not None:
            return [*steps, Reset(at_byte=self.reset_at_byte)]
        if self.error_event_after is not None:
            steps.append(ErrorEvent())
        return [*steps, *([Hang()] if self.hold_after_done else [])]


_DEFAULT_KNOBS: dict[str, Any] = {
    f.name: f.default for f in fields(FakeModel) if f.name in FAULT_KNOBS
}


def _chunk_event(delta: dict[str, Any], finish_reason: str | None, **extra: Any) -> bytes:
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        **extra,
    }
    data = json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode()
    return b"data: " + data + b"\n\n"


def _usage_event(tokens: int) -> bytes:
    usage = {**FAKE_USAGE, "completion_tokens": tokens}
    usage["total_tokens"] = usage["prompt_tokens"] + tokens
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake-model",
        "choices": [],
        "usage": usage,
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _padded_event(line_size: int) -> bytes:
    """A chunk with no content whose data line (``data: ...``, no line ending) is ``line_size``
    bytes, or as short as it can be."""
    bare = len(_chunk_event({}, None, x_padding="")) - 2
    return _chunk_event({}, None, x_padding="x" * max(line_size - bare, 0))
