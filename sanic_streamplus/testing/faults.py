"""``FaultPlan``: what the fake upstream does on the wire, step by step, in stream order.

A plan is a sequence of steps, read as the story of one response::

    FaultPlan().events(3).stall(1.0).reset()     # three events, a second of silence, a TCP reset
    FaultPlan().status(429, retry_after="7")     # a refusal instead of a stream
    FaultPlan().headers().stall(5, comment_every=0.1)   # keep-alive comments, no event

The body the steps walk through is the fake model's event stream (``FakeModel.frames()`` without
a plan: the role chunk, the tokens, the stop chunk, the usage chunk, ``[DONE]``). ``events(n)``
writes its next ``n`` blocks; steps like :meth:`FaultPlan.error_event` or :meth:`FaultPlan.block`
put blocks of their own into it. When the steps run out the rest of the body follows and the
response ends properly (its terminating chunk), unless a step ended it first (:meth:`reset`,
:meth:`close`, :meth:`truncate`, :meth:`status`, :meth:`long_line`, :meth:`hang`). The response
head goes out with the first step that writes (or :meth:`headers`); a step that writes nothing,
such as a plain :meth:`stall` first, is silence before the head.

A plan also travels as JSON, in a request's ``"fake": {"plan": [...]}`` object: each step is its
name, or a one-key object ``{name: argument}`` where the argument is the step's first field or an
object of its fields (``[{"events": 3}, {"stall": 1.0}, "reset"]``); :meth:`FaultPlan.to_json`
writes that form and :meth:`FaultPlan.from_json` reads it.

This module knows no sockets: :func:`lay_out` turns a plan and the model's blocks into the body
and a list of primitive actions that the fake upstream's connection carries out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeAlias

__all__ = [
    "Block",
    "Close",
    "Comments",
    "ErrorEvent",
    "Events",
    "FaultPlan",
    "Hang",
    "Headers",
    "Hold",
    "LongLine",
    "OversizedEvent",
    "PartialEvent",
    "Reset",
    "Stall",
    "Status",
    "Step",
    "Truncate",
]


def _check_count(value: Any, what: str) -> None:
    """Raises ValueError unless ``value`` is an int, 0 or more (``what`` names it)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a whole number, 0 or more, not {value!r}")


@dataclass(frozen=True)
class Step:
    """A step of a :class:`FaultPlan`; ``name`` is its JSON name."""

    name: ClassVar[str] = ""
    ends: ClassVar[bool] = False  # nothing of the response follows it

    def to_json(self) -> Any:
        """The step as JSON: its name, ``{name: first_field}`` or ``{name: {field: value}}``."""
        values = {k: v for k, v in asdict(self).items() if v is not None}
        if not values:
            return self.name
        first = fields(self)[0].name
        return {self.name: values[first] if list(values) == [first] else values}


@dataclass(frozen=True)
class Headers(Step):
    """Send the response head (200, ``text/event-stream``, chunked) now, if it is not out yet."""

    name: ClassVar[str] = "headers"


@dataclass(frozen=True)
class Events(Step):
    """Write the next ``count`` blocks of the body (None: all the rest), the model's ``delay``
    before each but the first of the body; the rest of a block cut by :class:`PartialEvent`
    counts as one."""

    name: ClassVar[str] = "events"
    count: int | None = None

    def __post_init__(self) -> None:
        if self.count is not None:
            _check_count(self.count, "events: count")


@dataclass(frozen=True)
class PartialEvent(Step):
    """Write the first half of the next block (cut in the middle of its data line); the next
    writing step writes the rest of it."""

    name: ClassVar[str] = "partial_event"


@dataclass(frozen=True)
class Stall(Step):
    """Go silent for ``seconds`` (``math.inf``: for good), keeping the connection open; with
    ``comment_every`` (seconds), send the comment ``: keep-alive`` and a blank line that often
    meanwhile (the head goes out first). Keep it off in the middle of a block: a byte sent there
    would change the event."""

    name: ClassVar[str] = "stall"
    seconds: float = math.inf
    comment_every: float | None = None

    def __post_init__(self) -> None:
        if not self.seconds >= 0:
            raise ValueError("stall: seconds must be 0 or more")
        if self.comment_every is not None and not self.comment_every > 0:
            raise ValueError("stall: comment_every must be a positive number of seconds")


@dataclass(frozen=True)
class Comments(Step):
    """Send ``count`` keep-alive comments (``: keep-alive`` and a blank line) now."""

    name: ClassVar[str] = "comments"
    count: int = 1

    def __post_init__(self) -> None:
        _check_count(self.count, "comments: count")


@dataclass(frozen=True)
class Hold(Step):
    """Go silent, the connection open, until :meth:`FakeUpstream.release` is called (at once if
    it was); the request's ``held`` is True meanwhile."""

    name: ClassVar[str] = "hold"


@dataclass(frozen=True)
class Block(Step):
    """Put ``data``, exact bytes (its line endings as given), into the body here, and write it.
    In JSON, ``data`` is a string whose characters are the bytes (Latin-1)."""

    name: ClassVar[str] = "block"
    data: bytes = b""

    def __post_init__(self) -> None:
        if isinstance(self.data, str):  # from JSON
            object.__setattr__(self, "data", self.data.encode("latin-1"))
        if not isinstance(self.data, bytes):
            raise ValueError(f"block: data must be bytes, not {self.data!r}")

    def to_json(self) -> Any:
        return {self.name: self.data.decode("latin-1")}


@dataclass(frozen=True)
class OversizedEvent(Step):
    """Put one more event into the body here, and write it: a chunk with no content whose data
    line is ``size`` bytes (at least about 130), padded with an ``x_padding`` field."""

    name: ClassVar[str] = "oversized_event"
    size: int = 0

    def __post_init__(self) -> None:
        _check_count(self.size, "oversized_event: size")


@dataclass(frozen=True)
class ErrorEvent(Step):
    """Instead of the rest of the body, one error event ``data: {"error": {...}}`` (``error``,
    or the kit's ``ERROR_EVENT``), as LiteLLM sends mid-stream; the body then ends properly
    unless a later step says otherwise (:class:`Hang`)."""

    name: ClassVar[str] = "error_event"
    error: Any = None


@dataclass(frozen=True)
class LongLine(Step):
    """Instead of the rest of the body, a line of ``size`` bytes (``data: xxx...``) that never
    ends: the connection stays open, silent, until the client leaves."""

    name: ClassVar[str] = "long_line"
    ends: ClassVar[bool] = True
    size: int = 0

    def __post_init__(self) -> None:
        _check_count(self.size, "long_line: size")


@dataclass(frozen=True)
class Reset(Step):
    """Break the connection with a TCP reset (``SO_LINGER`` 0), once what was written has left.
    With ``at_byte``: first write the body on (paced as :class:`Events`) until exactly that many
    of its bytes are out, maybe in the middle of an event or of a line ending; a body shorter
    than that is written whole and the reset replaces its terminating chunk."""

    name: ClassVar[str] = "reset"
    ends: ClassVar[bool] = True
    at_byte: int | None = None

    def __post_init__(self) -> None:
        if self.at_byte is not None:
            _check_count(self.at_byte, "reset: at_byte")


@dataclass(frozen=True)
class Close(Step):
    """Close the connection (a FIN) without ending the body: the response is cut short."""

    name: ClassVar[str] = "close"
    ends: ClassVar[bool] = True


@dataclass(frozen=True)
class Truncate(Step):
    """End the body properly (its terminating chunk) now, without the rest of the stream: no
    stop chunk, no ``[DONE]``, an ``upstream_truncated`` stream to the proxy."""

    name: ClassVar[str] = "truncate"
    ends: ClassVar[bool] = True


@dataclass(frozen=True)
class Hang(Step):
    """Never end the body: silent, the connection open, until the client closes it."""

    name: ClassVar[str] = "hang"
    ends: ClassVar[bool] = True


@dataclass(frozen=True)
class Status(Step):
    """Answer ``status`` instead of a stream, with ``body``: JSON (a dict or list; None: an
    OpenAI-style error), or a str written as it is with Content-Type ``text/plain``; with
    ``retry_after``, a ``Retry-After`` header. Only before anything is written."""

    name: ClassVar[str] = "status"
    ends: ClassVar[bool] = True
    status: int = 500
    body: Any = None
    retry_after: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.status, int) or not 200 <= self.status <= 599:
            raise ValueError("status: an HTTP status from 200 to 599")


_STEPS: dict[str, type[Step]] = {
    kind.name: kind
    for kind in (
        Headers, Events, PartialEvent, Stall, Comments, Hold, Block, OversizedEvent, ErrorEvent,
        LongLine, Reset, Close, Truncate, Hang, Status,
    )
}  # fmt: skip


def _step_from_json(item: Any) -> Step:
    """One step from its JSON form (see the module docstring).

    Raises:
        ValueError: an unknown step, or arguments it does not take.
    """
    if isinstance(item, Step):
        return item
    if isinstance(item, str):
        name, argument = item, None
    elif isinstance(item, dict) and len(item) == 1:
        [(name, argument)] = item.items()
    else:
        raise ValueError(f"a plan step is a name or a one-key object, not {item!r}")
    kind = _STEPS.get(name)
    if kind is None:
        raise ValueError(f"unknown plan step {name!r}: one of {sorted(_STEPS)}")
    try:
        if argument is None or argument is True:
            return kind()
        if isinstance(argument, dict):
            return kind(**argument)
        first = fields(kind)[0].name  # a scalar: the step's first field
        return kind(**{first: argument})
    except (TypeError, IndexError) as exc:
        raise ValueError(f"plan step {name!r}: {exc}") from None


@dataclass(frozen=True)
class FaultPlan:
    """An ordered list of :class:`Step` objects: what the fake upstream does, in stream order
    (see the module docstring). Build it with the methods, each returning a new plan with one
    step more, or from steps: ``FaultPlan([Events(3), Reset()])``; JSON forms are accepted too.

    Raises:
        ValueError: a step is unknown or out of range, or a step follows one that ends the
            response.
    """

    steps: tuple[Step, ...] = field(default_factory=tuple)

    def __init__(self, steps: Iterable[Step | Any] = ()) -> None:
        parsed = tuple(_step_from_json(step) for step in steps)
        for before, after in itertools.pairwise(parsed):
            if before.ends:
                raise ValueError(
                    f"nothing can follow {before.name!r} in a plan, not {after.name!r}"
                )
        object.__setattr__(self, "steps", parsed)

    def then(self, step: Step) -> FaultPlan:
        """This plan with ``step`` added at the end."""
        return FaultPlan((*self.steps, step))

    def headers(self) -> FaultPlan:
        """Send the response head now (:class:`Headers`)."""
        return self.then(Headers())

    def events(self, count: int | None = None) -> FaultPlan:
        """Write the next ``count`` blocks, None: all the rest (:class:`Events`)."""
        return self.then(Events(count))

    def partial_event(self) -> FaultPlan:
        """Write the first half of the next block (:class:`PartialEvent`)."""
        return self.then(PartialEvent())

    def stall(self, seconds: float = math.inf, comment_every: float | None = None) -> FaultPlan:
        """Silence for ``seconds``, maybe with keep-alive comments (:class:`Stall`)."""
        return self.then(Stall(seconds, comment_every))

    def comments(self, count: int = 1) -> FaultPlan:
        """``count`` keep-alive comments now (:class:`Comments`)."""
        return self.then(Comments(count))

    def hold(self) -> FaultPlan:
        """Wait for :meth:`FakeUpstream.release` (:class:`Hold`)."""
        return self.then(Hold())

    def block(self, data: bytes) -> FaultPlan:
        """These exact bytes into the body (:class:`Block`)."""
        return self.then(Block(data))

    def oversized_event(self, size: int) -> FaultPlan:
        """An event whose data line is ``size`` bytes (:class:`OversizedEvent`)."""
        return self.then(OversizedEvent(size))

    def error_event(self, error: Any = None) -> FaultPlan:
        """An in-band error event instead of the rest of the body (:class:`ErrorEvent`)."""
        return self.then(ErrorEvent(error))

    def long_line(self, size: int) -> FaultPlan:
        """A line of ``size`` bytes that never ends (:class:`LongLine`)."""
        return self.then(LongLine(size))

    def reset(self, at_byte: int | None = None) -> FaultPlan:
        """A TCP reset, now or at byte ``at_byte`` of the body (:class:`Reset`)."""
        return self.then(Reset(at_byte))

    def close(self) -> FaultPlan:
        """A FIN in the middle of the body (:class:`Close`)."""
        return self.then(Close())

    def truncate(self) -> FaultPlan:
        """End the body now, without the rest of the stream (:class:`Truncate`)."""
        return self.then(Truncate())

    def hang(self) -> FaultPlan:
        """Never end the body (:class:`Hang`)."""
        return self.then(Hang())

    def status(self, status: int, body: Any = None, retry_after: str | None = None) -> FaultPlan:
        """Answer ``status`` with ``body`` instead of a stream (:class:`Status`)."""
        return self.then(Status(status, body, retry_after))

    def to_json(self) -> list[Any]:
        """The plan as JSON, for a request's ``"fake": {"plan": ...}``."""
        return [step.to_json() for step in self.steps]

    @classmethod
    def from_json(cls, steps: Any) -> FaultPlan:
        """A plan from its JSON form (a list of steps), or ``steps`` if it is a plan already.

        Raises:
            ValueError: ``steps`` is not a list of known steps.
        """
        if isinstance(steps, FaultPlan):
            return steps
        if not isinstance(steps, list | tuple):
            raise ValueError(f"a plan is a list of steps, not {steps!r}")
        return cls(steps)


@dataclass(frozen=True)
class Write:
    """An action of a laid-out plan: write the body on up to byte ``end``."""

    end: int


@dataclass(frozen=True)
class End:
    """An action of a laid-out plan: end the body properly (its terminating chunk)."""


Action: TypeAlias = (
    "Write | End | Headers | Stall | Comments | Hold | Reset | Close | Hang | Status"
)


@dataclass
class Layout:
    """A plan laid out over a body: ``blocks`` (bytes, in order) and the ``actions`` to carry
    out; a :class:`Reset` action here never has ``at_byte`` (it became a :class:`Write`)."""

    blocks: list[bytes]
    actions: list[Action]


class _Builder:
    """A layout under way: the blocks laid out, the model's blocks left, the actions so far."""

    def __init__(self, content: Sequence[bytes]) -> None:
        self.blocks: list[bytes] = []
        self.actions: list[Action] = []
        self.left = list(content)  # the model's blocks not laid out yet
        self.size = 0  # bytes in blocks
        self.written = 0  # bytes the actions so far write
        self.head = False  # the actions so far send the response head

    def add(self, block: bytes) -> None:
        self.blocks.append(block)
        self.size += len(block)

    def take(self, count: int | None = None) -> None:
        """Lay out the model's next ``count`` blocks (None: all it has left)."""
        count = len(self.left) if count is None else count
        for block in self.left[:count]:
            self.add(block)
        del self.left[:count]

    def write(self, end: int) -> None:
        if end > self.written:
            self.actions.append(Write(end))
            self.written, self.head = end, True

    def end(self, action: Action) -> None:
        """The response head if it is not out yet, then ``action``."""
        if not self.head:
            self.actions.append(Headers())
        self.actions.append(action)


def lay_out(plan: FaultPlan, content: Sequence[bytes], render: Callable[[Step], bytes]) -> Layout:
    """The body and the actions of ``plan`` over the model's ``content`` blocks; ``render``
    gives the bytes of the blocks a step puts in (:class:`OversizedEvent`, :class:`ErrorEvent`,
    :class:`LongLine`), with the stream's line endings.

    Raises:
        ValueError: a :class:`Status` comes after something was written.
    """
    out = _Builder(content)
    for step in plan.steps:
        if isinstance(step, Events):
            count = step.count
            if out.written < out.size and count:  # the rest of a cut block is one
                count -= 1
            out.take(count)
            out.write(out.size)
        elif isinstance(step, PartialEvent):
            if out.written == out.size:
                out.take(1)
            out.write(out.written + (out.size - out.written) // 2)
        elif isinstance(step, (Block, OversizedEvent, ErrorEvent, LongLine)):
            if isinstance(step, (ErrorEvent, LongLine)):
                out.left.clear()  # instead of the rest of the body
            out.add(step.data if isinstance(step, Block) else render(step))
            out.write(out.size)
            if isinstance(step, LongLine):
                out.actions.append(Hang())
        elif isinstance(step, Reset) and step.at_byte is not None:
            out.take()
            out.write(min(step.at_byte, out.size))
            out.end(Reset())
        elif isinstance(step, Status):
            if out.head:
                raise ValueError("status: a plan answers a status before anything is written")
            out.actions.append(step)
        elif isinstance(step, Truncate):
            out.end(End())
        elif isinstance(step, (Reset, Close, Hang)):
            out.take()  # the body that would have come, for frames()
            out.actions.append(step)
        else:  # Headers, Stall, Comments, Hold
            out.head |= isinstance(step, (Headers, Comments)) or (
                isinstance(step, Stall) and step.comment_every is not None
            )
            out.actions.append(step)  # type: ignore[arg-type]
    if not (plan.steps and plan.steps[-1].ends):
        out.take()
        out.write(out.size)
        out.end(End())
    return Layout(out.blocks, out.actions)
