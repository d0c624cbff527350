"""The SSE codec against the WHATWG HTML Living Standard, "Parsing an event stream".

Every conformance case is decoded whole, at every split into two chunks, at every split into three
chunks (empty chunks included) and one byte at a time; all must give the same events and the same
final decoder state. Hypothesis checks the encoder/decoder round trip, chunking invariance on
arbitrary bytes, and agreement with a literal transcription of the spec algorithm (``reference``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sanic_streamplus.errors import EventTooLarge, LineTooLong, StreamPlusError
from sanic_streamplus.sse import (
    DEFAULT_MAX_EVENT_SIZE,
    DEFAULT_MAX_LINE_LENGTH,
    ServerSentEvent,
    SSEDecoder,
    encode,
    encode_comment,
)

BOM = b"\xef\xbb\xbf"
Outcome = tuple[list[ServerSentEvent], str, int | None]


# --------------------------------------------------------------------------------------- helpers


def ev(
    data: str,
    event: str = "message",
    id: str | None = None,
    retry: int | None = None,
    last: str = "",
) -> ServerSentEvent:
    """An expected event; ``last`` is the last event ID in effect at dispatch."""
    return ServerSentEvent(data=data, event=event, id=id, retry=retry, last_event_id=last)


def run(chunks: Iterable[bytes], max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> Outcome:
    """Feed ``chunks`` to a fresh decoder: (events, final last_event_id, final retry)."""
    decoder = SSEDecoder(max_event_size)
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events, decoder.last_event_id, decoder.retry


def split_at(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``stream`` cut at the (sorted, possibly repeated) offsets ``cuts``."""
    chunks: list[bytes] = []
    start = 0
    for cut in cuts:
        chunks.append(stream[start:cut])
        start = cut
    chunks.append(stream[start:])
    return chunks


def bytewise(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def two_chunk_splits(stream: bytes) -> Iterator[list[bytes]]:
    for i in range(len(stream) + 1):
        yield split_at(stream, [i])


def three_chunk_splits(stream: bytes) -> Iterator[list[bytes]]:
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            yield split_at(stream, [i, j])


_LINE_END = re.compile(r"\r\n|\r|\n")


def reference(stream: bytes) -> Outcome:
    """The spec algorithm, transcribed literally: decode the whole stream (UTF-8 decode, which
    strips one leading BOM), split it into lines, interpret each line. The per-block ``id`` and
    ``retry`` of ServerSentEvent are this package's additions, tracked alongside."""
    text = stream.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _LINE_END.split(text)[:-1]  # the last piece is unterminated: never processed
    events: list[ServerSentEvent] = []
    data_buffer, event_type, id_buffer, last_event_id = "", "", "", ""
    retry: int | None = None
    block_id: str | None = None
    block_retry: int | None = None
    for line in lines:
        if line == "":
            last_event_id = id_buffer
            if data_buffer:
                if data_buffer.endswith("\n"):
                    data_buffer = data_buffer[:-1]
                events.append(
                    ev(data_buffer, event_type or "message", block_id, block_retry, last_event_id)
                )
            data_buffer, event_type, block_id, block_retry = "", "", None, None
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            event_type = value
        elif name == "data":
            data_buffer += value + "\n"
        elif name == "id":
            if "\x00" not in value:
                id_buffer = block_id = value
        elif name == "retry":
            if value and all(c in "0123456789" for c in value):
                retry = block_retry = int(value)
    return events, last_event_id, retry


# ------------------------------------------------------------------------ conformance table


@dataclass(frozen=True)
class Case:
    name: str
    stream: bytes
    events: list[ServerSentEvent]
    last_event_id: str = ""
    retry: int | None = None
    expected: Outcome = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "expected", (self.events, self.last_event_id, self.retry))


SPEC_EXAMPLE = (
    b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n"
)

CASES = [
    # --- line endings
    Case("lf", b"data: a\n\n", [ev("a")]),
    Case("crlf", b"data: a\r\n\r\n", [ev("a")]),
    Case("cr-only", b"data: a\r\r", [ev("a")]),
    Case(
        "cr-only-stream",
        b"data: a\rdata: b\r\rid: 3\rdata: c\r\r",
        [ev("a\nb"), ev("c", id="3", last="3")],
        "3",
    ),
    Case("crlf-is-one-line-ending", b"data: a\r\ndata: b\r\n\r\n", [ev("a\nb")]),
    Case(
        "mixed-endings",
        b"data: a\r\ndata: b\rdata: c\ndata: d\r\n\ndata: e\n\r\n\r",
        [ev("a\nb\nc\nd"), ev("e")],
    ),
    Case("lf-then-cr-is-two-endings", b"data: a\n\rdata: b\n\n", [ev("a"), ev("b")]),
    Case("cr-then-crlf-is-two-endings", b"data: a\r\r\ndata: b\n\n", [ev("a"), ev("b")]),
    Case("blank-lines-only", b"\n\n\r\n\r\r\n", []),
    Case("empty-stream", b"", []),
    # --- byte order mark
    Case("bom-stripped", BOM + b"data: a\n\n", [ev("a")]),
    Case("bom-only", BOM, []),
    Case("bom-then-blank-line", BOM + b"\ndata: a\n\n", [ev("a")]),
    Case("second-bom-is-part-of-field-name", BOM + BOM + b"data: a\n\ndata: b\n\n", [ev("b")]),
    Case("bom-in-data-kept", BOM + b"data: " + BOM + b"a\n\n", [ev("\ufeffa")]),
    Case(
        "bom-not-at-start-kept",
        b"data: a\n\n" + BOM + b"data: b\n\ndata: c\n\n",
        [ev("a"), ev("c")],
    ),
    Case("bom-prefix-only-is-not-a-bom", b"\xef\xbbdata: a\n\ndata: b\n\n", [ev("b")]),
    Case("bom-prefix-as-data", b"data: \xef\xbb\n\n", [ev("\ufffd")]),
    # --- comments, field names, values
    Case("comments-ignored", b": hello\ndata: a\n:\n: data: b\n\n", [ev("a")]),
    Case("comment-only-block", b": keep-alive\n\n:\n\n", []),
    Case("field-without-colon", b"data\n\n", [ev("")]),
    Case("two-fields-without-colon", b"data\ndata\n\n", [ev("\n")]),
    Case("one-space-stripped", b"data:  a\n\n", [ev(" a")]),
    Case("no-space", b"data:a\n\n", [ev("a")]),
    Case("tab-not-stripped", b"data:\ta\n\n", [ev("\ta")]),
    Case("trailing-space-kept", b"data: a \n\n", [ev("a ")]),
    Case("colon-in-value", b"data: a: b:c\n\n", [ev("a: b:c")]),
    Case("empty-data", b"data:\n\n", [ev("")]),
    Case("empty-data-with-space", b"data: \n\n", [ev("")]),
    Case("trailing-empty-data-line", b"data: a\ndata:\n\n", [ev("a\n")]),
    Case("leading-empty-data-line", b"data:\ndata: a\n\n", [ev("\na")]),
    Case("unknown-field-ignored", b"foo: bar\ndata: a\nfoo\n\n", [ev("a")]),
    Case("field-names-case-sensitive", b"Data: a\nDATA: b\n\n", []),
    Case("case-sensitive-all-fields", b"ID: 1\nEvent: x\nRetry: 5\ndata: a\n\n", [ev("a")]),
    Case("space-before-colon-is-other-field", b"data : a\n\n", []),
    Case("space-before-field-is-other-field", b" data: a\n\n", []),
    # --- event type
    Case("event-type", b"event: add\ndata: 1\n\n", [ev("1", "add")]),
    Case("event-empty-is-message", b"event:\ndata: 1\n\n", [ev("1")]),
    Case("event-no-colon-is-message", b"event\ndata: 1\n\n", [ev("1")]),
    Case(
        "event-reset-after-dispatch",
        b"event: add\ndata: 1\n\ndata: 2\n\n",
        [ev("1", "add"), ev("2")],
    ),
    Case("event-without-data-does-not-leak", b"event: add\n\ndata: 2\n\n", [ev("2")]),
    Case("last-event-line-wins", b"event: a\nevent: b\ndata: x\n\n", [ev("x", "b")]),
    # --- id
    Case("id", b"id: 1\ndata: a\n\n", [ev("a", id="1", last="1")], "1"),
    Case("id-after-data", b"data: a\nid: 9\n\n", [ev("a", id="9", last="9")], "9"),
    Case(
        "id-carried",
        b"id: 1\ndata: a\n\ndata: b\n\n",
        [ev("a", id="1", last="1"), ev("b", last="1")],
        "1",
    ),
    Case("id-only-block-not-dispatched", b"id: 7\n\ndata: b\n\n", [ev("b", last="7")], "7"),
    Case("id-only-block-at-end", b"data: a\n\nid: 8\n\n", [ev("a")], "8"),
    Case(
        "id-with-nul-ignored",
        b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n",
        [ev("a", id="1", last="1"), ev("b", last="1")],
        "1",
    ),
    Case(
        "id-only-block-with-nul-ignored",
        b"id: 1\n\nid: \x00\n\ndata: b\n\n",
        [ev("b", last="1")],
        "1",
    ),
    Case(
        "id-empty-resets",
        b"id: 1\ndata: a\n\nid\ndata: b\n\ndata: c\n\n",
        [ev("a", id="1", last="1"), ev("b", id="", last=""), ev("c")],
        "",
    ),
    Case("id-colon-empty-resets", b"id: 1\n\nid:\n\n", [], ""),
    Case("last-id-line-wins", b"id: 1\nid: 2\ndata: a\n\n", [ev("a", id="2", last="2")], "2"),
    Case("id-utf8", b"id: \xc3\xa9\xe2\x82\xac\ndata: a\n\n", [ev("a", id="é€", last="é€")], "é€"),
    Case("id-unterminated-block-not-applied", b"data: a\n\nid: 5\n", [ev("a")], ""),
    # --- retry
    Case("retry-only-block", b"retry: 1500\n\n", [], retry=1500),
    Case(
        "retry-with-data",
        b"retry: 1500\ndata: a\n\ndata: b\n\n",
        [ev("a", retry=1500), ev("b")],
        retry=1500,
    ),
    Case("retry-zero", b"retry: 0\n\n", [], retry=0),
    Case("retry-leading-zeros", b"retry: 007\n\n", [], retry=7),
    Case(
        "retry-huge",
        b"retry: 123456789012345678901234567890\n\n",
        [],
        retry=123456789012345678901234567890,
    ),
    Case("retry-last-valid-wins", b"retry: 5\nretry: 6\nretry: x\n\n", [], retry=6),
    Case("retry-applies-without-blank-line", b"retry: 300\n", [], retry=300),
    *(
        Case(
            f"retry-ignored-{label}",
            b"retry: 100\n\nretry" + value + b"\ndata: a\n\n",
            [ev("a")],
            retry=100,
        )
        for label, value in [
            ("fraction", b": 1.5"),
            ("negative", b": -1"),
            ("plus", b": +5"),
            ("exponent", b": 1e3"),
            ("space-only", b": "),
            ("empty", b":"),
            ("no-colon", b""),
            ("two-spaces", b":  5"),
            ("trailing-space", b": 5 "),
            ("arabic-indic-digits", ": ١٢".encode()),
            ("fullwidth-digits", ": １２".encode()),
            ("superscript", ": ²".encode()),
        ]
    ),
    # --- unterminated events at end of stream
    Case("unterminated-no-newline", b"data: a", []),
    Case("unterminated-one-newline", b"data: a\n", []),
    Case("unterminated-cr", b"data: a\r", []),
    Case("unterminated-after-event", b"data: a\n\ndata: b\nid: 2\n", [ev("a")]),
    # --- UTF-8
    Case("utf8-multibyte", "data: héllo 日本 🎉\n\n".encode(), [ev("héllo 日本 🎉")]),
    Case("utf8-event-name", "event: ünï\ndata: x\n\n".encode(), [ev("x", "ünï")]),
    Case("utf8-invalid-byte", b"data: a\xffb\n\n", [ev("a\ufffdb")]),
    Case("utf8-truncated-before-lf", b"data: \xe6\x97\n\n", [ev("\ufffd")]),
    Case("utf8-surrogate-encoding", b"data: \xed\xa0\x80\n\n", [ev("\ufffd\ufffd\ufffd")]),
    Case("utf8-invalid-event-name", b"event: \xff\ndata: a\n\n", [ev("a", "\ufffd")]),
    Case("utf8-invalid-field-name-unknown", b"dat\xe1: a\n\n", []),
    # --- characters that are not line endings
    Case("u2028-u2029-in-data", "data: a\u2028b\u2029c\n\n".encode(), [ev("a\u2028b\u2029c")]),
    Case("nel-in-data", "data: a\x85b\n\n".encode(), [ev("a\x85b")]),
    Case(
        "vt-ff-fs-gs-rs-in-data",
        b"data: a\x0bb\x0cc\x1cd\x1de\x1ef\n\n",
        [ev("a\x0bb\x0cc\x1cd\x1de\x1ef")],
    ),
    Case("nul-in-data", b"data: a\x00b\n\n", [ev("a\x00b")]),
    # --- examples from the spec section
    Case("spec-yhoo", b"data: YHOO\ndata: +2\ndata: 10\n\n", [ev("YHOO\n+2\n10")]),
    Case(
        "spec-test-stream",
        SPEC_EXAMPLE,
        [ev("first event", id="1", last="1"), ev("second event", id="", last="")],
        "",
    ),
    Case(
        "spec-test-stream-terminated",
        SPEC_EXAMPLE + b"\n",
        [
            ev("first event", id="1", last="1"),
            ev("second event", id="", last=""),
            ev(" third event"),
        ],
        "",
    ),
    Case("spec-two-events-empty-and-lf", b"data\n\ndata\ndata\n\ndata:", [ev(""), ev("\n")]),
    Case("spec-space-optional", b"data:test\n\ndata: test\n\n", [ev("test"), ev("test")]),
    # --- a realistic stream
    Case(
        "openai-like",
        b': ping\n\ndata: {"a": 1}\n\n:\ndata: {"a": 2}\n\nevent: done\ndata: [DONE]\n\n',
        [ev('{"a": 1}'), ev('{"a": 2}'), ev("[DONE]", "done")],
    ),
]


def _case_ids() -> list[str]:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)), "conformance case names must be unique"
    return names


conformance = pytest.mark.parametrize("case", CASES, ids=_case_ids())


@conformance
def test_conformance_whole(case: Case) -> None:
    assert run([case.stream]) == case.expected


@conformance
def test_conformance_matches_reference_algorithm(case: Case) -> None:
    assert reference(case.stream) == case.expected


@conformance
def test_conformance_every_two_chunk_split(case: Case) -> None:
    for chunks in two_chunk_splits(case.stream):
        assert run(chunks) == case.expected, chunks


@conformance
def test_conformance_every_three_chunk_split(case: Case) -> None:
    for chunks in three_chunk_splits(case.stream):
        assert run(chunks) == case.expected, chunks


@conformance
def test_conformance_byte_at_a_time(case: Case) -> None:
    assert run(bytewise(case.stream)) == case.expected


@conformance
def test_conformance_with_empty_feeds_everywhere(case: Case) -> None:
    chunks: list[bytes] = [b""]
    for byte in bytewise(case.stream):
        chunks += [byte, b"", b""]
    assert run(chunks) == case.expected


def test_crlf_split_between_cr_and_lf_at_every_crlf() -> None:
    stream = b"id: 1\r\ndata: a\r\ndata: b\r\n\r\n: c\r\n\r\ndata: d\r\n\r\n"
    expected = ([ev("a\nb", id="1", last="1"), ev("d", last="1")], "1", None)
    crlfs = [m.start() for m in re.finditer(rb"\r\n", stream)]
    assert len(crlfs) == 8
    for at in crlfs:
        assert run(split_at(stream, [at + 1])) == expected
        assert run(split_at(stream, [at + 1, at + 1])) == expected  # empty chunk between
    assert run(split_at(stream, [at + 1 for at in crlfs])) == expected  # every CRLF split


def test_cr_at_chunk_end_then_non_lf_is_a_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [ev("a")]  # CR CR: two line endings, so a blank line
    assert decoder.feed(b"\n") == []  # this LF belongs to the second CR, not a third line
    assert decoder.feed(b"data: b\n\n") == [ev("b")]


def test_bom_split_over_three_chunks() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"\xef") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\xbb") == []
    assert decoder.feed(b"\xbfdata: a\n\n") == [ev("a")]
    assert decoder.feed(BOM + b"data: b\n\ndata: c\n\n") == [ev("c")]


def test_events_are_returned_by_the_feed_that_completes_them() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\ndata: b\n\ndata") == [ev("a"), ev("b")]
    assert decoder.feed(b": c\n") == []
    assert decoder.feed(b"\n") == [ev("c")]


def test_decoder_state_is_updated_as_events_dispatch() -> None:
    decoder = SSEDecoder()
    assert (decoder.last_event_id, decoder.retry) == ("", None)
    decoder.feed(b"id: x\nretry: 10\n")
    assert (decoder.last_event_id, decoder.retry) == ("", 10)  # id waits for the blank line
    decoder.feed(b"\n")
    assert decoder.last_event_id == "x"


# --------------------------------------------------------------------------- event size limit


def test_default_max_event_size_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_EVENT_SIZE == 1 << 20
    assert SSEDecoder().max_event_size == 1 << 20


@pytest.mark.parametrize("bad", [0, -1])
def test_max_event_size_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError):
        SSEDecoder(bad)


def test_event_too_large_is_a_streamplus_error() -> None:
    error = EventTooLarge(100)
    assert isinstance(error, StreamPlusError)
    assert (error.limit, error.status, error.type) == (100, 502, "event_too_large")


def test_long_unterminated_line_fed_whole_raises() -> None:
    with pytest.raises(EventTooLarge) as info:
        SSEDecoder(100).feed(b"data: " + b"x" * 200)
    assert info.value.limit == 100


def test_long_unterminated_line_raises_once_past_the_limit() -> None:
    decoder = SSEDecoder(100)
    for byte in bytewise(b"data: " + b"x" * 94):  # 100 bytes: at the limit, not past it
        assert decoder.feed(byte) == []
    with pytest.raises(EventTooLarge):
        decoder.feed(b"x")


def test_long_unterminated_line_in_big_chunks_raises() -> None:
    decoder = SSEDecoder(1000)
    decoder.feed(b"data: ")
    with pytest.raises(EventTooLarge):
        for _ in range(100):
            decoder.feed(b"y" * 64)


def test_long_line_of_default_limit_raises() -> None:
    decoder = SSEDecoder(max_line_length=2 * DEFAULT_MAX_EVENT_SIZE)
    assert decoder.feed(b"data: " + b"z" * (DEFAULT_MAX_EVENT_SIZE - 6)) == []
    with pytest.raises(EventTooLarge) as caught:
        decoder.feed(b"z")
    assert type(caught.value) is EventTooLarge


def test_a_comment_before_a_bulk_block_counts_toward_its_size() -> None:
    """Found by the fuzzer: the bulk path took over mid-block, after a comment line fed alone."""
    decoder = SSEDecoder(max_event_size=7)
    decoder.feed(b":\n")
    with pytest.raises(EventTooLarge):
        decoder.feed(b"data: \n\n")  # 2 + 7 bytes: over the limit, as when fed in one chunk
    decoder = SSEDecoder(max_event_size=100)
    for _ in range(1000):  # heartbeat comments without a blank line, then an event, each alone
        assert decoder.feed(b": ping\n") == []
        assert decoder.feed(b"data: x\n\n") == [ServerSentEvent("x")]


def test_line_of_default_line_length_raises() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: " + b"z" * (DEFAULT_MAX_LINE_LENGTH - 6)) == []
    with pytest.raises(LineTooLong) as caught:
        decoder.feed(b"z")
    assert caught.value.limit == DEFAULT_MAX_LINE_LENGTH
    assert caught.value.type == "line_too_long"


@pytest.mark.parametrize(
    ("stream", "delivered"),
    [
        (b"data: a\n\ndata: " + b"y" * 20 + b"\n\n", ["a"]),  # in the bulk path
        (b"data: a\n\nevent: t\ndata: " + b"y" * 20 + b"\n\n", ["a"]),  # line by line
        (b"data: a\n\n: " + b"c" * 20, ["a"]),  # a comment that never ends
    ],
)
def test_long_line_raises_after_the_events_before_it(stream: bytes, delivered: list[str]) -> None:
    for chunks in ([stream], bytewise(stream)):
        decoder, events = SSEDecoder(max_line_length=16), []
        with pytest.raises(LineTooLong) as caught:
            for chunk in chunks:
                events += decoder.feed(chunk)
        assert [e.data for e in events + caught.value.events] == delivered


def test_many_data_lines_raise() -> None:
    line = b"data: x\n"  # 8 bytes, line ending included
    assert run([line * 12 + b"\n"], max_event_size=100)[0] == [ev("\n".join("x" * 12))]
    with pytest.raises(EventTooLarge):
        run([line * 13 + b"\n"], max_event_size=100)
    decoder = SSEDecoder(100)
    for _ in range(12):
        assert decoder.feed(line) == []
    with pytest.raises(EventTooLarge):
        decoder.feed(line)


def test_many_data_lines_byte_at_a_time_raise() -> None:
    with pytest.raises(EventTooLarge):
        run(bytewise(b"data: x\n" * 13), max_event_size=100)


def test_limit_boundary_counts_lines_with_their_line_endings() -> None:
    stream = b"data: 12345\n\n"  # one 12-byte line, then the dispatching blank line
    assert run([stream], max_event_size=12)[0] == [ev("12345")]
    assert run(bytewise(stream), max_event_size=12)[0] == [ev("12345")]
    with pytest.raises(EventTooLarge):
        run([stream], max_event_size=11)
    with pytest.raises(EventTooLarge):
        run(bytewise(stream), max_event_size=11)


def test_limit_is_per_event_not_per_stream() -> None:
    stream = b"id: 1\ndata: 0123456789\n\n" * 1000  # 25 kB in 25-byte events
    events, last_event_id, _ = run([stream], max_event_size=100)
    assert len(events) == 1000
    assert all(event.data == "0123456789" for event in events)
    assert last_event_id == "1"
    events, _, _ = run(split_at(stream, range(0, len(stream), 7)), max_event_size=100)
    assert len(events) == 1000


@pytest.mark.parametrize(
    "tail", [b"data: " + b"x" * 200, b"data: " + b"x" * 200 + b"\n", b"data: x\n" * 40]
)
def test_events_completed_before_the_limit_travel_with_the_error(tail: bytes) -> None:
    decoder = SSEDecoder(max_event_size=100)
    with pytest.raises(EventTooLarge) as caught:
        decoder.feed(b"data: a\n\nid: 2\ndata: b\n\n" + tail)
    assert [(e.data, e.last_event_id) for e in caught.value.events] == [("a", ""), ("b", "2")]


# ------------------------------------------------------------------------------- linear cost


@pytest.mark.parametrize(
    ("stream", "chunk", "data_length", "bound"),
    [
        pytest.param(
            b"data: " + b"x" * 10_000_000 + b"\n\n", 1024, 10_000_000, 10, id="10MB-line"
        ),
        pytest.param(
            (b"data: " + b"y" * 93 + b"\n") * 100_000 + b"\n",  # 100-byte lines
            1024,
            100_000 * 94 - 1,
            10,
            id="10MB-of-lines",
        ),
        pytest.param(
            b"data: " + b"x" * 1_000_000 + b"\r\n\r\n", 1, 1_000_000, 20, id="1MB-bytewise"
        ),
    ],
)
def test_decoding_cost_is_linear_under_any_chunking(
    stream: bytes, chunk: int, data_length: int, bound: float
) -> None:
    """A decoder that rescans its buffer takes minutes here; a linear one well under a second.
    The bounds are 10x loose sanity limits, not benchmarks."""
    decoder = SSEDecoder(max_event_size=16 << 20, max_line_length=16 << 20)
    events: list[ServerSentEvent] = []
    started = time.perf_counter()
    for i in range(0, len(stream), chunk):
        events += decoder.feed(stream[i : i + chunk])
    elapsed = time.perf_counter() - started
    assert len(events) == 1
    assert len(events[0].data) == data_length
    assert elapsed < bound, f"{len(stream)} bytes in {chunk}-byte chunks took {elapsed:.1f} s"


# ------------------------------------------------------------------------------------ encoder


def test_encode_plain_event() -> None:
    assert encode(ServerSentEvent("x")) == b"data: x\n\n"
    assert encode(ServerSentEvent("")) == b"data: \n\n"
    assert encode(ServerSentEvent(" x")) == b"data:  x\n\n"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("a\nb", b"data: a\ndata: b\n\n"),
        ("a\r\nb\rc\nd", b"data: a\ndata: b\ndata: c\ndata: d\n\n"),
        ("a\n", b"data: a\ndata: \n\n"),
        ("\n", b"data: \ndata: \n\n"),
        ("a\r\r\nb", b"data: a\ndata: \ndata: b\n\n"),
    ],
    ids=["lf", "crlf-cr-lf", "trailing-lf", "lf-only", "cr-then-crlf"],
)
def test_encode_multiline_data(data: str, expected: bytes) -> None:
    assert encode(ServerSentEvent(data)) == expected


def test_encode_keeps_non_line_ending_characters_in_one_line() -> None:
    data = "a\u2028b\u2029c\x85d\x0be\x0cf"
    assert encode(ServerSentEvent(data)) == b"data: " + data.encode() + b"\n\n"


def test_encode_all_fields() -> None:
    raw = encode(ServerSentEvent("x\ny", "update", "42", 3000, last_event_id="ignored"))
    assert raw.endswith(b"\n\n")
    assert raw.count(b"\n\n") == 1
    lines = raw[:-2].split(b"\n")
    assert sorted(lines) == sorted(
        [b"event: update", b"id: 42", b"retry: 3000", b"data: x", b"data: y"]
    )
    assert lines.index(b"data: x") < lines.index(b"data: y")
    assert b"ignored" not in raw
    assert run([raw]) == ([ev("x\ny", "update", "42", 3000, "42")], "42", 3000)


@pytest.mark.parametrize("event_type", ["message", ""])
def test_encode_omits_default_event_type(event_type: str) -> None:
    assert encode(ServerSentEvent("x", event=event_type)) == b"data: x\n\n"
    assert encode(ServerSentEvent("x", event=event_type, id="1")) == b"id: 1\ndata: x\n\n"


def test_encode_writes_empty_id_and_zero_retry() -> None:
    raw = encode(ServerSentEvent("x", id="", retry=0))
    assert b"id: \n" in raw
    assert b"retry: 0\n" in raw
    assert run([b"id: 1\n\n" + raw]) == ([ev("x", id="", retry=0, last="")], "", 0)


def test_encode_does_not_write_last_event_id() -> None:
    assert encode(ServerSentEvent("x", last_event_id="7")) == b"data: x\n\n"


def test_encode_utf8() -> None:
    assert encode(ServerSentEvent("é🎉", "ünï", "€")) == "event: ünï\nid: €\ndata: é🎉\n\n".encode()


@pytest.mark.parametrize(
    "event",
    [
        ServerSentEvent("x", event="a\nb"),
        ServerSentEvent("x", event="a\rb"),
        ServerSentEvent("x", event="a\r\n"),
        ServerSentEvent("x", id="a\nb"),
        ServerSentEvent("x", id="\r"),
        ServerSentEvent("x", id="a\x00b"),
        ServerSentEvent("x", retry=-1),
    ],
    ids=["event-lf", "event-cr", "event-crlf", "id-lf", "id-cr", "id-nul", "retry-negative"],
)
def test_encode_rejects_invalid_fields(event: ServerSentEvent) -> None:
    with pytest.raises(ValueError):
        encode(event)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ping", b": ping\n"),
        ("", b":\n"),
        ("a\nb", b": a\n: b\n"),
        ("a\r\nb\rc", b": a\n: b\n: c\n"),
        ("a\n\nb", b": a\n:\n: b\n"),
        ("a\n", b": a\n:\n"),
        (" x\u2028y", ":  x\u2028y\n".encode()),
    ],
    ids=["plain", "empty", "two-lines", "crlf-cr", "blank-line-inside", "trailing-lf", "unicode"],
)
def test_encode_comment(text: str, expected: bytes) -> None:
    raw = encode_comment(text)
    assert raw == expected
    assert not raw.startswith(b"\n")
    assert b"\n\n" not in raw  # never a blank line, so never an empty block
    assert run([raw]) == ([], "", None)


def test_encode_comment_default_and_between_events() -> None:
    assert encode_comment() == b":\n"
    stream = (
        encode_comment("start")
        + encode(ServerSentEvent("a"))
        + encode_comment("ping\n\nping")
        + encode_comment()
        + encode(ServerSentEvent("b", id="2"))
        + encode_comment("end")
    )
    assert run([stream]) == ([ev("a"), ev("b", id="2", last="2")], "2", None)


# ------------------------------------------------------------------------ hypothesis: round trip

_SPECIAL = st.sampled_from(["\n", " ", ":", "\u2028", "\u2029", "\x85", "\x0b", "\x00", "\ufeff"])
_DATA_CHARS = st.one_of(st.characters(exclude_categories=["Cs"], exclude_characters="\r"), _SPECIAL)
_FIELD_CHARS = st.one_of(
    st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"),
    st.sampled_from([" ", ":", "\u2028", "\x85", "\ufeff"]),
)
_ID_CHARS = _FIELD_CHARS.filter(lambda c: c != "\x00")

events_strategy = st.builds(
    ServerSentEvent,
    data=st.text(_DATA_CHARS, max_size=40),
    event=st.one_of(st.just("message"), st.text(_FIELD_CHARS, max_size=12)),
    id=st.one_of(st.none(), st.text(_ID_CHARS, max_size=12)),
    retry=st.one_of(st.none(), st.integers(min_value=0, max_value=2**64)),
)


def random_chunks(draw: st.DataObject, stream: bytes) -> list[bytes]:
    cuts = draw.draw(
        st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=12).map(sorted),
        label="cuts",
    )
    return split_at(stream, cuts)


def expected_round_trip(events: list[ServerSentEvent]) -> list[ServerSentEvent]:
    out: list[ServerSentEvent] = []
    last = ""
    for event in events:
        if event.id is not None:
            last = event.id
        out.append(ev(event.data, event.event or "message", event.id, event.retry, last))
    return out


@settings(max_examples=300, deadline=None)
@given(event=events_strategy, data=st.data())
def test_round_trip_one_event(event: ServerSentEvent, data: st.DataObject) -> None:
    raw = encode(event)
    (expected,) = expected_round_trip([event])
    assert run([raw])[0] == [expected]
    assert run(random_chunks(data, raw))[0] == [expected]


@settings(max_examples=200, deadline=None)
@given(events=st.lists(events_strategy, max_size=6), data=st.data())
def test_round_trip_several_events(events: list[ServerSentEvent], data: st.DataObject) -> None:
    raw = b"".join(encode(event) for event in events)
    expected = expected_round_trip(events)
    last = expected[-1].last_event_id if expected else ""
    retries = [event.retry for event in events if event.retry is not None]
    final = (expected, last, retries[-1] if retries else None)
    assert run([raw]) == final
    assert run(random_chunks(data, raw)) == final


@settings(max_examples=100, deadline=None)
@given(event=events_strategy)
def test_round_trip_byte_at_a_time(event: ServerSentEvent) -> None:
    raw = encode(event)
    assert run(bytewise(raw)) == run([raw])
    assert run([raw])[0] == expected_round_trip([event])


# -------------------------------------------------------------- hypothesis: arbitrary bytes

_TOKENS = st.sampled_from(
    [
        b"data",
        b"event",
        b"id",
        b"retry",
        b":",
        b": ",
        b" ",
        b"\n",
        b"\r",
        b"\r\n",
        b"\n\n",
        b"x",
        b"1",
        b"42",
        b"\x00",
        BOM,
        b"\xef",
        b"\xbb",
        b"\xbf",
        b"\xff",
        b"\xc3",
        b"\xa9",
        "\u2028".encode(),
        b"\x85",
        b"Data",
        b"-",
        b"data: ",  # these three build the blocks the decoder's fast path takes
        b"data: x\n\n",
        "data: \u00e9\n\n".encode(),
    ]
)
streams = st.one_of(
    st.binary(max_size=200),
    st.lists(st.one_of(_TOKENS, st.binary(max_size=4)), max_size=60).map(b"".join),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams, data=st.data())
def test_chunking_invariance_on_arbitrary_bytes(stream: bytes, data: st.DataObject) -> None:
    whole = run([stream])  # never raises: far under the default limit
    assert run(random_chunks(data, stream)) == whole
    assert run(bytewise(stream)) == whole


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams, data=st.data())
def test_decoder_agrees_with_reference_algorithm(stream: bytes, data: st.DataObject) -> None:
    expected = reference(stream)
    assert run([stream]) == expected
    assert run(random_chunks(data, stream)) == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams, limit=st.integers(min_value=1, max_value=40), data=st.data())
def test_small_limit_only_raises_event_too_large_and_chunking_agrees(
    stream: bytes, limit: int, data: st.DataObject
) -> None:
    outcomes: list[Outcome | None] = []
    for chunks in ([stream], random_chunks(data, stream), bytewise(stream)):
        try:
            outcomes.append(run(chunks, max_event_size=limit))
        except EventTooLarge as error:  # anything else fails the test
            assert error.limit == limit
            outcomes.append(None)
    assert outcomes[0] == outcomes[1] == outcomes[2]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=streams,
    limit=st.integers(min_value=1, max_value=60),
    line_limit=st.integers(min_value=1, max_value=30),
    data=st.data(),
)
def test_both_limits_give_the_same_error_and_events_whatever_the_chunking(
    stream: bytes, limit: int, line_limit: int, data: st.DataObject
) -> None:
    outcomes = []
    for chunks in ([stream], random_chunks(data, stream), bytewise(stream)):
        decoder = SSEDecoder(limit, line_limit)
        events: list[ServerSentEvent] = []
        error: type[EventTooLarge] | None = None
        try:
            for chunk in chunks:
                events += decoder.feed(chunk)
        except EventTooLarge as exc:  # LineTooLong is one; anything else fails the test
            error, events = type(exc), events + exc.events
        outcomes.append((error, events))
    assert outcomes[0] == outcomes[1] == outcomes[2]


_BLOCKS = st.sampled_from(
    [
        b"data: x\n\n",
        "data: \u00e9\n\n".encode(),
        b"data: [DONE]\n\n",
        b"data: \xc3",
        b"data: a",
        b"\n",
        b"\n\n",
        b"\r\n",
        b"event: e\n",
        b": comment\n",
        b"id: 1\n",
        b"data:y\n\n",
        BOM,
    ]
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=st.lists(_BLOCKS, max_size=40).map(b"".join), data=st.data())
def test_fast_path_blocks_agree_with_reference_algorithm(
    stream: bytes, data: st.DataObject
) -> None:
    """Streams made mostly of one-``data:``-line blocks, which the decoder takes in bulk."""
    expected = reference(stream)
    assert run([stream]) == expected
    assert run(random_chunks(data, stream)) == expected
    assert run(bytewise(stream)) == expected


@pytest.mark.parametrize(
    "stream",
    [
        b"data: x\n\nid: 1\n\r\n",  # a CRLF blank line after a bulk block still dispatches now
        b"data: x\n\ndata: y\r\n\r\n",
        b"data: x\n\nretry: 5\n",  # retry takes effect at once, not at the next blank line
        b"data: x\n\ndata: y\n",
    ],
)
def test_lines_after_a_bulk_block_take_effect_in_the_same_feed(stream: bytes) -> None:
    decoder = SSEDecoder()
    events = decoder.feed(stream)
    expected = reference(stream)
    assert (events, decoder.last_event_id, decoder.retry) == expected


def test_the_bulk_path_counts_the_event_size_in_bytes_not_characters() -> None:
    """120 bytes of data in 60 two-byte characters passes a 100-byte limit by neither count."""
    stream = ("data: " + "\u00e9" * 60 + "\n\n").encode()
    for chunks in ([stream], bytewise(stream)):
        with pytest.raises(EventTooLarge):
            run(chunks, max_event_size=100)
