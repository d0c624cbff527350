"""Fuzzing the SSE decoder with hypothesis: arbitrary bytes, arbitrary chunking, a spec oracle.

Streams are arbitrary bytes weighted toward the format's alphabet (field names, ``:``, spaces,
CR, LF, CRLF, NUL, the BOM and its pieces, invalid and truncated UTF-8, multi-byte characters,
U+2028, ...), fed whole, in random chunks (empty ones included), cut at some of its line ends,
one byte at a time and cut after every CR. Checked:

- the decoder raises nothing but ``EventTooLarge`` (or its subclass ``LineTooLong``);
- events, ``last_event_id`` and ``retry`` are the same under every chunking, and after every
  ``feed()`` they are what the spec algorithm gives for the bytes fed so far;
- they equal the literal transcription of the spec algorithm in ``test_sse.reference``;
- with a small ``max_event_size`` (and ``max_line_length``, when the decoder has one), it raises
  exactly when an event's bytes (a line's) pass the limit, with the error of the limit passed
  first, having delivered exactly the events the spec dispatches before that point;
- ``encode()`` then decode round-trips any ``ServerSentEvent`` the format can carry, and
  ``encode()`` refuses (``ValueError``) exactly the ones it cannot.

The example budget per test comes from ``STREAMPLUS_FUZZ_EXAMPLES`` (default 300: about 10 s for
the file, so the default suite stays fast). CI sets a large one: 3000 took 75 s on 2 cores::

    STREAMPLUS_FUZZ_EXAMPLES=3000 .venv/bin/pytest tests/test_sse_fuzz.py -q -p no:cacheprovider

``bench/fuzz_atheris.py`` runs the same checks coverage-guided, for longer hunts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sse import Outcome, bytewise, reference, split_at

from sanic_streamplus import errors
from sanic_streamplus.sse import (
    DEFAULT_MAX_EVENT_SIZE,
    ServerSentEvent,
    SSEDecoder,
    encode,
    encode_comment,
)

EventTooLarge = errors.EventTooLarge
LineTooLong = errors.LineTooLong
ALLOWED: tuple[type[Exception], ...] = (EventTooLarge, LineTooLong)

EXAMPLES = int(os.environ.get("STREAMPLUS_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# pyproject's pytest-timeout of 120 s per test would cut a large budget short
pytestmark = pytest.mark.timeout(max(120, EXAMPLES // 25))

BOM = b"\xef\xbb\xbf"
_LINE = re.compile(rb"\r\n|\r|\n")


# ------------------------------------------------------------------------------ strategies

_FIELDS = [b"data", b"event", b"id", b"retry", b"Data", b"ID", b"foo", b"dat\xe1", BOM + b"data"]
_EOLS = [b"\n", b"\r", b"\r\n"]
_ATOMS = [
    *_FIELDS,
    *_EOLS,
    b":",
    b": ",
    b" ",
    b"  ",
    b"\t",
    b"\n\n",
    b"\r\r",
    b"\r\n\r\n",
    b"\n\r",
    b"\x00",
    BOM,
    b"\xef",
    b"\xbb",
    b"\xbf",
    b"\xef\xbb",
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xc3",
    b"\xa9",
    "é".encode(),
    "日本".encode(),
    "日".encode()[:2],  # a truncated 3-byte character
    "🎉".encode(),
    "🎉".encode()[:3],
    b"\xed\xa0\x80",  # an encoded surrogate: invalid UTF-8
    b"\xc0\xaf",  # an overlong encoding
    "\u2028".encode(),
    "\u2029".encode(),
    "\x85".encode(),
    b"\x85",
    b"\x0b",
    b"\x0c",
    b"0",
    b"1",
    b"42",
    b"007",
    b"-1",
    b"1.5",
    "١".encode(),  # ARABIC-INDIC DIGIT ONE: not an ASCII digit
    b"x",
    b"[DONE]",
    b'{"a":1}',
    b"data: ",
    b"data:",
    b"event: ",
    b"id: ",
    b"retry: ",
    b"data: x\n\n",  # blocks the decoder's bulk path takes
    b"data: \xc3\xa9\n\n",
    b": comment\n",
]
atoms = st.sampled_from(_ATOMS)
values = st.lists(st.one_of(atoms.filter(lambda a: not _LINE.search(a)), st.binary(max_size=3)))
lines = st.tuples(
    st.sampled_from([*_FIELDS, b"", b":"]),
    st.sampled_from([b":", b": ", b":  ", b"", b" :"]),
    values.map(lambda parts: b"".join(parts[:6])),
    st.sampled_from([*_EOLS, b"\n\n", b"\r\n\r\n", b"\r\r", b""]),
).map(b"".join)

streams = st.one_of(
    st.binary(max_size=600),
    st.lists(st.one_of(atoms, st.binary(max_size=4)), max_size=200).map(b"".join),
    st.lists(lines, max_size=40).map(b"".join),
    st.tuples(
        st.sampled_from([b"", BOM, b"\xef\xbb", BOM + BOM]), st.lists(lines, max_size=20)
    ).map(lambda t: t[0] + b"".join(t[1])),
)


def line_ends(stream: bytes) -> list[int]:
    """The offsets just after each line ending of ``stream`` (a CRLF is one)."""
    return [m.end() for m in _LINE.finditer(stream)]


def chunkings(stream: bytes) -> st.SearchStrategy[list[bytes]]:
    """Ways to cut ``stream``: random cuts (repeats make empty chunks), fixed-size pieces, or
    cuts at some of its line ends (as a server that flushes per line or per event would)."""
    cuts = st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=40).map(sorted)
    sizes = st.integers(min_value=1, max_value=max(1, len(stream))).map(
        lambda n: [stream[i : i + n] for i in range(0, len(stream), n)]
    )
    ways = [cuts.map(lambda c: split_at(stream, c)), sizes]
    if ends := line_ends(stream):
        at_lines = st.lists(st.sampled_from(ends), max_size=40).map(sorted)
        ways.append(at_lines.map(lambda c: split_at(stream, c)))
    return st.one_of(ways)


def after_every_cr(stream: bytes) -> list[bytes]:
    """Cut right after every CR: a CRLF is always split between two feeds."""
    return split_at(stream, [m.end() for m in re.finditer(rb"\r", stream)])


def with_empty_feeds(chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = [b""]
    for chunk in chunks:
        out += [chunk, b""]
    return out


# -------------------------------------------------------------------------------- harness


@dataclass
class Decoded:
    """What a decoder did with one stream: every event it delivered (those carried by the
    error included), its final state, and the type of the error it raised (or None)."""

    events: list[ServerSentEvent]
    last_event_id: str
    retry: int | None
    error: type[Exception] | None

    @property
    def outcome(self) -> Outcome:
        return self.events, self.last_event_id, self.retry


def decode(
    chunks: Iterable[bytes],
    max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
    max_line_length: int | None = None,
    after_feed: Callable[[bytes, Outcome], None] | None = None,
) -> Decoded:
    """Feed ``chunks`` to a fresh decoder. Any exception other than those in ``ALLOWED``
    propagates and fails the test. ``after_feed(bytes so far, state)`` checks each step."""
    if max_line_length is None:
        decoder = SSEDecoder(max_event_size)
    else:
        decoder = SSEDecoder(max_event_size, max_line_length)  # type: ignore[call-arg,unused-ignore]
    events: list[ServerSentEvent] = []
    fed = b""
    for chunk in chunks:
        try:
            events += decoder.feed(chunk)
        except ALLOWED as error:
            events += getattr(error, "events", None) or []
            return Decoded(events, decoder.last_event_id, decoder.retry, type(error))
        if after_feed is not None:
            fed += chunk
            after_feed(fed, (events, decoder.last_event_id, decoder.retry))
    return Decoded(events, decoder.last_event_id, decoder.retry, None)


def reference_with_limits(
    stream: bytes, event_limit: int, line_limit: int | None = None
) -> tuple[list[ServerSentEvent], type[Exception] | None]:
    """The spec's events for ``stream`` under the decoder's limits: (the events dispatched before
    a limit was passed, the error that says which, or None).

    An event's size is the bytes of its lines, each line ending counted as one byte, plus the
    unterminated line it ends with; a line's length excludes its ending. Where one line passes
    both limits, the error names the one it passed first as it grew (the line limit on a tie).
    Up to two bytes that may still be the start of a BOM are not yet part of anything."""
    if len(stream) < 3 and BOM.startswith(stream):
        return reference(stream)[0], None
    body = stream[3:] if stream.startswith(BOM) else stream
    pieces = _LINE.split(body)
    block = 0  # bytes of the current event so far
    dispatched = 0  # bytes of ``body`` up to the end of the last blank line
    offset = 0
    for number, piece in enumerate(pieces):
        terminated = number < len(pieces) - 1
        size = len(piece)
        too_long = line_limit is not None and size > line_limit
        if too_long or ((piece or not terminated) and block + size + terminated > event_limit):
            line_first = too_long and line_limit is not None and line_limit <= event_limit - block
            error = LineTooLong if line_first else EventTooLarge
            return reference(stream[: len(stream) - len(body) + dispatched])[0], error
        if not terminated:
            break
        ending = _LINE.match(body, offset + size)
        assert ending is not None
        offset += size + len(ending.group())
        if piece:
            block += size + 1
        else:
            block, dispatched = 0, offset
    return reference(stream)[0], None


# ------------------------------------------------------------------------------ properties


@FUZZ
@given(stream=streams, data=st.data())
def test_any_chunking_gives_the_reference_outcome(stream: bytes, data: st.DataObject) -> None:
    expected = reference(stream)
    whole = decode([stream])
    assert whole.error is None  # far below the default limits
    assert whole.outcome == expected

    def prompt(fed: bytes, state: Outcome) -> None:
        assert state == reference(fed), f"after feeding {fed!r}"

    chunks = data.draw(chunkings(stream), label="chunks")
    assert decode(chunks, after_feed=prompt).outcome == expected
    assert decode(with_empty_feeds(chunks)).outcome == expected
    assert decode(bytewise(stream)).outcome == expected
    assert decode(after_every_cr(stream)).outcome == expected


def check_limits(
    stream: bytes, chunks: list[bytes], event_limit: int, line_limit: int | None
) -> None:
    events, error = reference_with_limits(stream, event_limit, line_limit)
    for way in ([stream], chunks, bytewise(stream), after_every_cr(stream)):
        got = decode(way, event_limit, line_limit)
        assert (got.error, got.events) == (error, events), way


@FUZZ
@given(stream=streams, limit=st.integers(min_value=1, max_value=64), data=st.data())
def test_event_size_limit_is_exact_under_any_chunking(
    stream: bytes, limit: int, data: st.DataObject
) -> None:
    check_limits(stream, data.draw(chunkings(stream), label="chunks"), limit, None)


@FUZZ
@given(
    stream=streams,
    limit=st.one_of(st.integers(min_value=1, max_value=80), st.just(DEFAULT_MAX_EVENT_SIZE)),
    line_limit=st.integers(min_value=1, max_value=40),
    data=st.data(),
)
def test_both_limits_are_exact_under_any_chunking(
    stream: bytes, limit: int, line_limit: int, data: st.DataObject
) -> None:
    check_limits(stream, data.draw(chunkings(stream), label="chunks"), limit, line_limit)


@FUZZ
@given(stream=streams, data=st.data())
def test_decoded_events_survive_encode_and_decode(stream: bytes, data: st.DataObject) -> None:
    """Whatever the decoder produced, the encoder can carry: decode, encode, decode again."""
    events = decode([stream]).events
    again = decode(data.draw(chunkings(b"".join(map(encode, events))), label="chunks")).events
    assert [(e.data, e.event, e.id, e.retry) for e in again] == [
        (e.data, e.event, e.id, e.retry) for e in events
    ]


# ------------------------------------------------------------------------------ round trip

_SPECIAL_TEXT = st.sampled_from(
    ["\r", "\n", "\r\n", " ", ":", "\x00", "\ufeff", "\u2028", "\u2029", "\x85", "\ud800", "é"]
)
_ANY_CHAR = st.one_of(st.characters(), _SPECIAL_TEXT)  # lone surrogates included: sent as "?"
any_text = st.lists(_ANY_CHAR, max_size=60).map("".join)
event_types = st.one_of(st.sampled_from(["message", "", "error", "done"]), any_text)
ids = st.one_of(st.none(), any_text)
retries = st.one_of(st.none(), st.integers(min_value=-3, max_value=2**70))
arbitrary_events = st.builds(
    ServerSentEvent, data=any_text, event=event_types, id=ids, retry=retries
)
_LINE_CHAR = _ANY_CHAR.filter(lambda c: "\r" not in c and "\n" not in c)
line_text = st.lists(_LINE_CHAR, max_size=30).map("".join)
carriable_events = st.builds(
    ServerSentEvent,
    data=any_text,
    event=st.one_of(st.sampled_from(["message", ""]), line_text),
    id=st.one_of(st.none(), line_text.map(lambda t: t.replace("\x00", ""))),
    retry=st.one_of(st.none(), st.integers(min_value=0, max_value=2**70)),
)


def carriable(event: ServerSentEvent) -> bool:
    """Whether the format can carry ``event`` as it is."""
    bad_type = event.event not in ("message", "") and bool(re.search("[\r\n]", event.event))
    bad_id = event.id is not None and bool(re.search("[\r\n\x00]", event.id))
    return not bad_type and not bad_id and (event.retry is None or event.retry >= 0)


def as_utf8(text: str) -> str:
    """``text`` as it comes back from UTF-8 on the wire (a lone surrogate becomes ``?``)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def expected_events(events: list[ServerSentEvent]) -> Outcome:
    out: list[ServerSentEvent] = []
    last = ""
    retry: int | None = None
    for event in events:
        if event.id is not None:
            last = as_utf8(event.id)
        if event.retry is not None:
            retry = event.retry
        data = as_utf8(re.sub("\r\n|\r", "\n", event.data))
        out.append(
            ServerSentEvent(
                data,
                as_utf8(event.event) or "message",
                None if event.id is None else as_utf8(event.id),
                event.retry,
                last,
            )
        )
    return out, last, retry


def encoded(event: ServerSentEvent) -> bytes | None:
    """``encode(event)``, or None when ``encode()`` rightly refuses an event the format cannot
    carry (``ValueError``).

    Raises:
        AssertionError: ``encode()`` accepted an event it cannot carry.
    """
    if carriable(event):
        return encode(event)
    try:
        encode(event)
    except ValueError:
        return None
    raise AssertionError(f"encode() accepted {event!r}")


@FUZZ
@given(event=arbitrary_events, data=st.data())
def test_encode_refuses_exactly_what_the_format_cannot_carry(
    event: ServerSentEvent, data: st.DataObject
) -> None:
    raw = encoded(event)
    if raw is None:
        return
    expected = expected_events([event])
    assert decode([raw]).outcome == expected
    assert decode(data.draw(chunkings(raw), label="chunks")).outcome == expected
    assert decode(bytewise(raw)).outcome == expected


@FUZZ
@given(
    events=st.lists(carriable_events, max_size=8),
    comments=st.lists(any_text, max_size=8),
    bom=st.booleans(),
    data=st.data(),
)
def test_round_trip_of_event_sequences_with_comments(
    events: list[ServerSentEvent], comments: list[str], bom: bool, data: st.DataObject
) -> None:
    parts = [BOM] if bom else []
    for number, event in enumerate(events):
        if number < len(comments):
            parts.append(encode_comment(comments[number]))
        parts.append(encode(event))
    parts += [encode_comment(text) for text in comments[len(events) :]]
    raw = b"".join(parts)
    expected = expected_events(events)
    assert decode([raw]).outcome == expected
    assert decode(data.draw(chunkings(raw), label="chunks")).outcome == expected
    assert decode(after_every_cr(raw)).outcome == expected
    assert reference(raw) == expected
