"""A coverage-guided fuzz target for the SSE decoder (atheris / libFuzzer), outside the unit suite.

    .venv/bin/pip install atheris
    .venv/bin/python bench/fuzz_atheris.py -max_total_time=300 [CORPUS_DIR ...] [libFuzzer flags]

The same checks as ``tests/test_sse_fuzz.py``, whose helpers it uses, on inputs that libFuzzer
evolves toward new branches of ``sanic_streamplus/sse.py`` (the only module instrumented):

- the first input byte picks the check, the next ones a ``max_event_size`` (1-80), a
  ``max_line_length`` (1-40, or the default) and up to 16 cut offsets (bytes, or line ends of
  the stream); the rest is the stream;
- the decoder raises nothing but ``EventTooLarge`` (or ``LineTooLong``, if ``errors`` has it);
- the stream decodes to the spec algorithm's outcome (``tests/test_sse.py``'s ``reference``) fed
  whole, cut at the offsets, one byte at a time and cut after every CR, and after every feed it
  is the outcome of the bytes fed so far;
- under small limits, it raises exactly when the spec's event size or line length passes one,
  with the error of the limit passed first, having delivered exactly the events dispatched
  before;
- decoded events survive encode then decode; an event built from the input's text round-trips
  when the format can carry it, and ``encode()`` raises ``ValueError`` when it cannot.

Unless ``-dict=`` is given, a libFuzzer dictionary of the format's tokens (field names, ``:``,
CR, LF, the BOM, invalid UTF-8, ...) is written to a temporary file and used. A failure raises
``AssertionError`` with the input saved as ``crash-<sha1>`` in the working directory; replay it
with ``.venv/bin/python bench/fuzz_atheris.py crash-<sha1>``.
"""

from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path

import atheris  # type: ignore[import-untyped,unused-ignore]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_sse import Outcome, bytewise, reference, split_at  # noqa: E402
from test_sse_fuzz import (  # noqa: E402
    _ATOMS,
    ALLOWED,
    LineTooLong,
    after_every_cr,
    decode,
    encoded,
    expected_events,
    line_ends,
    reference_with_limits,
)

import sanic_streamplus.sse as sse  # noqa: E402
from sanic_streamplus.sse import DEFAULT_MAX_EVENT_SIZE, ServerSentEvent, encode  # noqa: E402


def instrument() -> None:
    """Instrument the codec's functions, and nothing else, for coverage feedback."""
    for value in vars(sse).values():
        if isinstance(value, types.FunctionType) and value.__module__ == sse.__name__:
            atheris.instrument_func(value)
    for value in vars(sse.SSEDecoder).values():
        if isinstance(value, types.FunctionType):
            atheris.instrument_func(value)


def check_stream(stream: bytes, chunks: list[bytes]) -> None:
    expected = reference(stream)
    whole = decode([stream])
    assert whole.error is None, whole.error  # far below the default limits
    assert whole.outcome == expected, (whole.outcome, expected)

    def prompt(fed: bytes, state: Outcome) -> None:
        assert state == reference(fed), f"after feeding {fed!r}"

    for way in (chunks, bytewise(stream), after_every_cr(stream)):
        got = decode(way, after_feed=prompt if way is chunks else None).outcome
        assert got == expected, (way, got, expected)
    again = decode([b"".join(map(encode, whole.events))]).events
    assert [(e.data, e.event, e.id, e.retry) for e in again] == [
        (e.data, e.event, e.id, e.retry) for e in whole.events
    ]


def check_limits(
    stream: bytes, chunks: list[bytes], event_limit: int, line_limit: int | None
) -> None:
    expected = reference_with_limits(stream, event_limit, line_limit)
    for way in ([stream], chunks, bytewise(stream), after_every_cr(stream)):
        got = decode(way, event_limit, line_limit)
        assert (got.events, got.error) == expected, (way, got, expected)


def check_event(provider: atheris.FuzzedDataProvider) -> None:
    event = ServerSentEvent(
        data=provider.ConsumeUnicode(provider.ConsumeIntInRange(0, 80)),
        event=provider.ConsumeUnicode(provider.ConsumeIntInRange(0, 20)) or "message",
        id=provider.ConsumeUnicode(20) if provider.ConsumeBool() else None,
        retry=provider.ConsumeIntInRange(-2, 1 << 40) if provider.ConsumeBool() else None,
    )
    raw = encoded(event)
    if raw is None:
        return
    expected = expected_events([event])
    for way in ([raw], bytewise(raw), after_every_cr(raw)):
        got = decode(way).outcome
        assert got == expected, (way, got, expected)


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    check = provider.ConsumeIntInRange(0, 3)
    if check == 3:
        check_event(provider)
        return
    limit = provider.ConsumeIntInRange(1, 80) if check == 2 else DEFAULT_MAX_EVENT_SIZE
    line_limit = provider.ConsumeIntInRange(0, 40) or None if check == 2 else None
    if LineTooLong is None:
        line_limit = None
    at_line_ends = provider.ConsumeBool()
    cuts = [provider.ConsumeIntInRange(0, 1024) for _ in range(provider.ConsumeIntInRange(0, 16))]
    stream = provider.ConsumeBytes(provider.remaining_bytes())
    ends = line_ends(stream)
    if at_line_ends and ends:  # the cuts pick line ends, as a server flushing per line would
        cuts = [ends[cut % len(ends)] for cut in cuts]
    chunks = split_at(stream, sorted(min(cut, len(stream)) for cut in cuts))
    try:
        if check == 2:
            check_limits(stream, chunks, limit, line_limit)
        else:
            check_stream(stream, chunks)
    except ALLOWED as error:  # decode() catches these: one escaping here is a harness bug
        raise AssertionError(f"{type(error).__name__} escaped the harness") from error


def dictionary() -> str:
    """The format's tokens as a libFuzzer dictionary file; returns its path."""
    lines = ['"' + "".join(f"\\x{byte:02x}" for byte in atom) + '"' for atom in _ATOMS]
    with tempfile.NamedTemporaryFile("w", suffix=".dict", delete=False) as out:
        out.write("\n".join(lines) + "\n")
    return out.name


def main() -> None:
    argv = list(sys.argv)
    if not any(arg.startswith("-dict=") for arg in argv):
        argv.append(f"-dict={dictionary()}")
    instrument()
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
