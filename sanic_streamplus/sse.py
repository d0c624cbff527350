"""A sans-IO Server-Sent Events codec: an incremental decoder and an encoder.

The decoder follows the WHATWG HTML Living Standard, section 9.2.6 "Parsing an event stream" and
9.2.5/9.2.6 "Interpreting an event stream", to the letter:

- lines end with CRLF, LF or CR; a CR at the end of one chunk and an LF at the start of the next are
  one line ending;
- one leading U+FEFF BOM is stripped, once, at the very start of the stream;
- a line starting with ``:`` is a comment; a line without ``:`` is a field name with an empty value;
  one space after the colon is stripped;
- ``data`` lines are joined with LF, and the final LF is removed;
- a blank line dispatches the event, unless the data buffer is empty (a block with only ``id``,
  ``event`` or ``retry`` dispatches nothing, but its ``id`` still becomes the last event ID);
- the event type defaults to ``message``; an ``id`` containing NUL is ignored; ``retry`` is taken
  only when it is all ASCII digits; unknown fields are ignored;
- an event not terminated by a blank line when the stream ends is discarded;
- the stream is UTF-8, decoded with replacement, and a character may be split across chunks.

The codec knows nothing of sockets, HTTP or Sanic: feed it bytes, it returns events.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import EventTooLarge, LineTooLong

__all__ = [
    "DEFAULT_MAX_EVENT_SIZE",
    "DEFAULT_MAX_LINE_LENGTH",
    "SSEDecoder",
    "ServerSentEvent",
    "encode",
    "encode_comment",
]

DEFAULT_MAX_EVENT_SIZE = 1 << 20  # bytes
DEFAULT_MAX_LINE_LENGTH = 1 << 19  # bytes
_BOM = b"\xef\xbb\xbf"
_EOL = re.compile(r"\r\n|\r|\n")  # the only three line endings of the format (not U+2028 etc.)


@dataclass(slots=True)
class ServerSentEvent:
    """One event of an event stream.

    Attributes:
        data: the event's data (str); lines are joined with LF.
        event: the event type (str); ``"message"`` unless the stream named another.
        id: the ``id`` field given in this event's own block (str), or None if it had none.
        retry: the ``retry`` field given in this event's own block, in milliseconds (int), or None.
        last_event_id: the last event ID in effect when the event was dispatched (str), as
            ``MessageEvent.lastEventId``; set by the decoder, ignored by the encoder.
    """

    data: str = ""
    event: str = "message"
    id: str | None = None
    retry: int | None = None
    last_event_id: str = ""


class SSEDecoder:
    """Incremental event-stream decoder (WHATWG HTML, "Parsing an event stream").

    Feed it the bytes of one stream, in chunks of any size; each call returns the events those
    bytes completed. Cost is O(bytes fed) whatever the chunking: bytes are searched for line
    endings once, when they arrive, and never again.

    Args:
        max_event_size: the most bytes one event may take before it is dispatched (its lines with
            their line endings, plus any unterminated line), in bytes. Default 1 MiB.
        max_line_length: the most bytes one line may take, without its line ending (an
            unterminated line counts as it grows). Default 512 KiB.

    Raises:
        ValueError: a limit is not a positive number of bytes.

    Attributes:
        last_event_id: the last event ID string of the stream (str), "" until an ``id`` is seen.
        retry: the reconnection time the stream asked for, in milliseconds (int), or None.
    """

    __slots__ = (
        "_block_id",
        "_block_retry",
        "_block_size",
        "_data",
        "_event",
        "_id_buffer",
        "_partial",
        "_skip_lf",
        "_started",
        "last_event_id",
        "max_event_size",
        "max_line_length",
        "retry",
    )

    def __init__(
        self,
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
    ) -> None:
        if max_event_size <= 0 or max_line_length <= 0:
            raise ValueError("max_event_size and max_line_length must be positive numbers of bytes")
        self.max_event_size = max_event_size
        self.max_line_length = max_line_length
        self.last_event_id = ""
        self.retry: int | None = None
        self._id_buffer = ""
        self._partial = bytearray()  # bytes of an unterminated line, already searched
        self._skip_lf = False  # the last chunk ended in CR: an LF now belongs to it
        self._started = False  # the BOM check is done
        self._data: list[str] = []
        self._event = ""
        self._block_id: str | None = None
        self._block_retry: int | None = None
        self._block_size = 0

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        """Take the next bytes of the stream; return the events they complete, in order.

        Args:
            data: the next chunk (bytes, any length, may split lines and UTF-8 characters).

        Returns:
            list of :class:`ServerSentEvent`, possibly empty.

        Raises:
            EventTooLarge: the current event exceeds ``max_event_size`` bytes (each line ending
                counted as one byte). Its ``events`` are the events this call completed before
                that, so none is lost. The decoder must not be fed again after that.
            LineTooLong: (a subclass of ``EventTooLarge``) a line exceeds ``max_line_length``
                bytes; the same rules apply.
        """
        if self._skip_lf and data:
            self._skip_lf = False
            if data[0] == 0x0A:
                data = data[1:]
        if not self._started:
            data = bytes(self._partial) + data
            if len(data) < 3 and _BOM.startswith(data):
                self._partial[:] = data  # could still be the start of a BOM
                return []
            self._started = True
            self._partial.clear()
            if data.startswith(_BOM):
                data = data[3:]
        end = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if end < 0:
            self._partial += data
            self._check_partial(self._partial, [])
            return []
        if end + 1 == len(data):
            complete, rest = data, b""
            self._skip_lf = data[end] == 0x0D
        else:
            complete, rest = data[: end + 1], data[end + 1 :]
        if self._partial:
            self._partial += complete
            complete = bytes(self._partial)
        events, used = self._fast_blocks(complete)
        if not used:
            events = self._lines(complete.splitlines())
        elif _only_data_lines(tail := complete[used:]):
            # the start of the next block waits, unparsed, so the next chunk starts at a block:
            # data lines have no effect before their blank line, so this changes nothing
            rest = tail + rest
        else:
            try:
                events += self._lines(tail.splitlines())
            except EventTooLarge as exc:
                exc.events = events + exc.events
                raise
        self._partial = bytearray(rest)
        if rest:
            self._check_partial(rest, events)
        return events

    def _check_partial(self, partial: bytes | bytearray, events: list[ServerSentEvent]) -> None:
        """Raise if the unterminated line ``partial`` already breaks a limit."""
        size = len(partial)
        if size > self.max_line_length or self._block_size + size > self.max_event_size:
            raise self._too_large(size, events)

    def _too_large(self, size: int, events: list[ServerSentEvent]) -> EventTooLarge:
        """The error for a line of ``size`` bytes that breaks a limit: the limit the line
        crossed first as it grew, so the error is the same whatever the chunking."""
        line_limit = self.max_line_length
        if size > line_limit and line_limit <= self.max_event_size - self._block_size:
            return LineTooLong(line_limit, events)
        return EventTooLarge(self.max_event_size, events)

    def _fast_blocks(self, complete: bytes) -> tuple[list[ServerSentEvent], int]:
        """The common case in a few passes of C code: blocks of exactly one ``data: `` line.

        Taken only at a block boundary, for the part of ``complete`` up to its last blank line,
        when that part has no CR, every block in it is one line starting with ``data: ``, and
        none exceeds ``max_event_size``: what it dispatches is exactly what :meth:`_lines`
        would. Returns the events and the number of bytes used (0: the part does not qualify).
        """
        if (
            self._block_size  # a block is under way (a comment or unknown field counts too)
            or self._data
            or self._event
            or self._block_id is not None
            or self._block_retry is not None
        ):
            return [], 0
        cut = complete.rfind(b"\n\n") + 2
        if cut < 2:
            return [], 0
        head = complete[:cut] if cut < len(complete) else complete
        blocks = head.count(b"\n\n")
        if (
            b"\r" in head
            or head.count(b"\n") != 2 * blocks
            or head.count(b"\ndata: ") + head.startswith(b"data: ") != blocks
        ):
            return [], 0
        limit = min(self.max_event_size, self.max_line_length)
        if len(head) > limit and max(map(len, head.split(b"\n\n"))) >= limit:
            return [], 0  # a block of ``limit`` bytes or more: _lines raises at the exact event
        parts = head.decode("utf-8", "replace").split("\n\n")
        del parts[-1]
        last_id = self.last_event_id = self._id_buffer
        return [ServerSentEvent(part[6:], "message", None, None, last_id) for part in parts], cut

    def _lines(self, lines: list[bytes]) -> list[ServerSentEvent]:
        events: list[ServerSentEvent] = []
        limit, line_limit = self.max_event_size, self.max_line_length
        for line in lines:
            if not line:
                event = self._dispatch()
                if event is not None:
                    events.append(event)
                continue
            size = len(line)
            if size > line_limit or self._block_size + size + 1 > limit:
                raise self._too_large(size, events)
            self._block_size += size + 1
            colon = line.find(b":")
            if colon == 0:
                continue  # comment
            if colon < 0:
                field, value = line, b""
            else:
                field, value = line[:colon], line[colon + 1 :]
                if value[:1] == b" ":
                    value = value[1:]
            if field == b"data":
                self._data.append(value.decode("utf-8", "replace"))
            elif field == b"event":
                self._event = value.decode("utf-8", "replace")
            elif field == b"id":
                if b"\x00" not in value:
                    self._id_buffer = self._block_id = value.decode("utf-8", "replace")
            elif field == b"retry":
                if value.isdigit():  # bytes.isdigit(): ASCII digits only, False when empty
                    self.retry = self._block_retry = int(value)
        return events

    def _dispatch(self) -> ServerSentEvent | None:
        self.last_event_id = self._id_buffer
        data = self._data
        event = None
        if data:
            event = ServerSentEvent(
                data[0] if len(data) == 1 else "\n".join(data),
                self._event or "message",
                self._block_id,
                self._block_retry,
                self.last_event_id,
            )
            self._data = []
        self._event = ""
        self._block_id = None
        self._block_retry = None
        self._block_size = 0
        return event


def _only_data_lines(lines: bytes) -> bool:
    """True if ``lines`` (LF-terminated) are all ``data: `` lines (True for none)."""
    return b"\r" not in lines and lines.count(b"\n") == lines.count(b"\ndata: ") + (
        lines.startswith(b"data: ")
    )


def _check_field(name: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ValueError(f"SSE {name} must not contain CR or LF: {value!r}")


def encode(event: ServerSentEvent) -> bytes:
    """Encode one event as UTF-8 event-stream bytes, ending with the blank line that dispatches it.

    Multi-line data (split at CRLF, CR or LF) becomes one ``data:`` line per line. An event type of
    ``"message"`` (or "") is left implicit. ``last_event_id`` is not written; ``id`` is.

    Args:
        event: the :class:`ServerSentEvent` to encode.

    Returns:
        bytes, e.g. ``b"data: hello\\n\\n"``.

    Raises:
        ValueError: ``event.event`` or ``event.id`` contains CR or LF (they would end the line),
            ``event.id`` contains NUL (a decoder ignores it), or ``event.retry`` is negative.
    """
    data = event.data
    if (
        event.id is None
        and event.retry is None
        and event.event in ("message", "")
        and "\n" not in data
        and "\r" not in data
    ):
        return b"data: " + data.encode("utf-8", "replace") + b"\n\n"
    out: list[str] = []
    if event.event not in ("message", ""):
        _check_field("event", event.event)
        out.append(f"event: {event.event}\n")
    if event.id is not None:
        _check_field("id", event.id)
        if "\x00" in event.id:
            raise ValueError("SSE id must not contain NUL: a decoder would ignore it")
        out.append(f"id: {event.id}\n")
    if event.retry is not None:
        if event.retry < 0:
            raise ValueError("SSE retry must be a non-negative number of milliseconds")
        out.append(f"retry: {int(event.retry)}\n")
    for line in _EOL.split(data):
        out.append(f"data: {line}\n")
    out.append("\n")
    return "".join(out).encode("utf-8", "replace")


def encode_comment(text: str = "") -> bytes:
    """Encode a comment (``: text``), one comment line per line of ``text``.

    No blank line follows it, so a comment between events can never form an empty block (which
    some clients, the OpenAI SDK among them, dispatch as an event with empty data).

    Args:
        text: the comment text (str); may be empty.

    Returns:
        bytes, e.g. ``b": ping\\n"``.
    """
    return "".join(f": {line}\n" if line else ":\n" for line in _EOL.split(text)).encode(
        "utf-8", "replace"
    )
