"""Micro-benchmark: ``sanic_streamplus.sse.SSEDecoder`` against httpx-sse's decoding pipeline.

Only decoding work is measured: every body is built and cut into chunks (``bytes`` objects, as a
socket would deliver them) before the clock starts, and there is no I/O, no event loop.

The two decoders:

- **ours**: ``SSEDecoder(max_event_size, max_line_length).feed(chunk)`` for each chunk, events
  collected in a list.
- **httpx-sse**: exactly what ``EventSource.aiter_sse()`` does per response chunk, run
  synchronously with httpx's and httpx-sse's own classes: ``Response.aiter_text()`` decodes the
  chunk with ``httpx._decoders.TextDecoder("utf-8")`` (and ``TextChunker(None)`` drops empty
  text), ``_aiter_sse_lines()`` splits it with ``httpx_sse._decoders.SSELineDecoder``, and
  ``aiter_sse()`` strips ``"\\n"`` off each line and calls
  ``httpx_sse._decoders.SSEDecoder.decode``; at the end of the stream the text decoder and the
  line decoder are flushed. The identity content decoder and ``ByteChunker(None)`` are
  pass-throughs and are left out.

What is measured:

1. Throughput (MB/s, 1 MB = 10**6 bytes of body) on OpenAI-style ``chat.completion.chunk`` events
   ending with ``data: [DONE]``: a ~5 MB body (``--quick``: ~1 MB), fed in 4 KiB and 64 KiB
   chunks cut at fixed offsets, which fall anywhere inside events (the events have varying
   lengths). Both decoders must give the same events (count, type and data). Ratio ours/httpx-sse.
2. Linear time: one event made of a single ``data:`` line of N bytes, then ``\\n\\n``, fed in
   1 KiB chunks (N = 1 MB and 10 MB) and in 1-byte chunks (N = 1 MB and 10 MB; ``--quick``:
   100 KB and 1 MB), with ``max_event_size`` = 32 MiB. Reported: seconds per size and the ratio
   t(large)/t(small), ~10 when linear, ~100 when quadratic, from best and from median times.
   Also measured: a pilot at a tenth of the smaller N and, for 1 KiB chunks, a check at twice the
   larger N (t(20 MB)/t(10 MB): ~2 linear, ~4 quadratic), which tells a one-off step in the cost
   per byte (glibc serving big buffers from fresh mmap'd pages above its mmap threshold, which
   earlier runs move) from growth. A run whose time, extrapolated from the growth seen so far
   (quadratic growth assumed from a single point), would exceed a budget is skipped with a note.

Timing: ``time.perf_counter``, best of several repeats (5; 3 or 2 for the runs with millions of
``feed()`` calls), with the garbage collector disabled during each timed run, as ``timeit`` does.

Usage::

    .venv/bin/python bench/decoder.py [--quick] [--json PATH]

``run(quick)`` returns the figures as a JSON-serialisable dict, for a harness to import.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any

from httpx._decoders import TextDecoder
from httpx_sse._decoders import SSEDecoder as HttpxSSEDecoder
from httpx_sse._decoders import SSELineDecoder

from sanic_streamplus.sse import SSEDecoder

MB = 1_000_000
MAX_EVENT_SIZE = 32 * 1024 * 1024
THROUGHPUT_CHUNKS = (4096, 65536)
LINEAR_CHUNK = 1024
REPEATS = 5
LINEAR_BUDGET_S = {True: 5.0, False: 20.0}  # --quick or not: the longest one timed run may take
_ONE_BYTE = [bytes((i,)) for i in range(256)]  # bytes of length 1, shared like CPython's cache

Decoder = Callable[[Sequence[bytes]], list[Any]]


# --------------------------------------------------------------------------- decoders under test


def decode_ours(chunks: Sequence[bytes]) -> list[Any]:
    """Feed ``chunks`` to one ``sanic_streamplus`` decoder; return all the events."""
    decoder = SSEDecoder(MAX_EVENT_SIZE, MAX_EVENT_SIZE)  # the 20 MB line of the linear check
    feed = decoder.feed
    events: list[Any] = []
    extend = events.extend
    for chunk in chunks:
        extend(feed(chunk))
    return events


def decode_httpx_sse(chunks: Sequence[bytes]) -> list[Any]:
    """Run httpx-sse's ``aiter_sse()`` pipeline on ``chunks``, synchronously; return the events."""
    text_decoder = TextDecoder(encoding="utf-8")  # Response.aiter_text()
    line_decoder = SSELineDecoder()  # _aiter_sse_lines()
    sse_decoder = HttpxSSEDecoder()  # EventSource.aiter_sse()
    decode_text = text_decoder.decode
    decode_lines = line_decoder.decode
    decode_line = sse_decoder.decode
    events: list[Any] = []
    append = events.append
    for chunk in chunks:
        text = decode_text(chunk)
        if not text:  # TextChunker(chunk_size=None).decode() yields nothing for ""
            continue
        for line in decode_lines(text):
            sse = decode_line(line.rstrip("\n"))
            if sse is not None:
                append(sse)
    # End of stream: aiter_text() flushes its text decoder, _aiter_sse_lines() its line decoder.
    text = text_decoder.flush()
    tail = (decode_lines(text) if text else []) + line_decoder.flush()
    for line in tail:
        sse = decode_line(line.rstrip("\n"))
        if sse is not None:
            append(sse)
    return events


DECODERS: dict[str, Decoder] = {"ours": decode_ours, "httpx_sse": decode_httpx_sse}


# --------------------------------------------------------------------------- inputs


def chat_body(target_bytes: int) -> tuple[bytes, int]:
    """An OpenAI-style chat-completion stream of about ``target_bytes``; (body, event count)."""
    head = (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"tok'
    )
    tail = b' "},"finish_reason":null}]}\n\n'
    parts: list[bytes] = []
    size = 0
    i = 0
    while size < target_bytes:
        part = head + str(i).encode() + tail
        parts.append(part)
        size += len(part)
        i += 1
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts), i + 1


def split(body: bytes, size: int) -> list[bytes]:
    """Cut ``body`` into ``size``-byte chunks (the last one shorter)."""
    if size == 1:
        return list(map(_ONE_BYTE.__getitem__, body))
    return [body[i : i + size] for i in range(0, len(body), size)]


def one_big_event(data_bytes: int) -> bytes:
    """One event: a single ``data:`` line with ``data_bytes`` bytes of data, then a blank line."""
    return b"data: " + b"x" * data_bytes + b"\n\n"


# --------------------------------------------------------------------------- timing


def best_time(
    decode: Decoder, chunks: Sequence[bytes], repeats: int
) -> tuple[float, float, list[Any]]:
    """Best and median wall time of ``repeats`` runs of ``decode(chunks)``; last run's events."""
    times: list[float] = []
    events: list[Any] = []
    for _ in range(repeats):
        events = []
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            events = decode(chunks)
            elapsed = time.perf_counter() - start
        finally:
            gc.enable()
        times.append(elapsed)
    return min(times), statistics.median(times), events


def repeats_for(feeds: int) -> int:
    """Fewer repeats for runs with millions of ``feed()`` calls, to stay within the time budget."""
    if feeds <= 100_000:
        return REPEATS
    return 3 if feeds <= 2_000_000 else 2


def summary(events: list[Any]) -> list[tuple[str, str]]:
    """(event type, data) of each event, to compare the two decoders."""
    return [(e.event, e.data) for e in events]


# --------------------------------------------------------------------------- benchmarks


def bench_throughput(quick: bool) -> dict[str, Any]:
    """MB/s of both decoders on a chat-completion stream, for each chunk size."""
    body, n_events = chat_body(1 * MB if quick else 5 * MB)
    result: dict[str, Any] = {
        "body_bytes": len(body),
        "events": n_events,
        "repeats": REPEATS,
        "chunks": {},
    }
    for chunk_size in THROUGHPUT_CHUNKS:
        chunks = split(body, chunk_size)
        row: dict[str, Any] = {"feeds": len(chunks)}
        decoded: dict[str, list[tuple[str, str]]] = {}
        for name, decode in DECODERS.items():
            seconds, _, events = best_time(decode, chunks, REPEATS)
            decoded[name] = summary(events)
            row[f"{name}_s"] = seconds
            row[f"{name}_mb_s"] = len(body) / MB / seconds
        ours, theirs = decoded["ours"], decoded["httpx_sse"]
        assert len(ours) == len(theirs) == n_events, (len(ours), len(theirs), n_events)
        assert ours == theirs, "the decoders disagree on the events"
        assert ours[-1] == ("message", "[DONE]"), ours[-1]
        row["ratio_ours_over_httpx_sse"] = row["ours_mb_s"] / row["httpx_sse_mb_s"]
        result["chunks"][str(chunk_size)] = row
    return result


def bench_linear(quick: bool) -> dict[str, Any]:
    """Time to decode one huge event at several sizes per chunk size, and the growth ratios."""
    budget_s = LINEAR_BUDGET_S[quick]
    # chunk size -> event data sizes: (pilot, small, large[, check]); check = 2 x large.
    plans: dict[int, tuple[int, ...]] = {
        LINEAR_CHUNK: (MB // 10, 1 * MB, 10 * MB, 20 * MB),
        1: (MB // 100, MB // 10, 1 * MB) if quick else (MB // 10, 1 * MB, 10 * MB),
    }
    result: dict[str, Any] = {"max_event_size": MAX_EVENT_SIZE, "budget_s": budget_s, "chunks": {}}
    for chunk_size, sizes in plans.items():
        pilot, small, large = sizes[:3]
        check = sizes[3] if len(sizes) > 3 else None
        row: dict[str, Any] = {
            "sizes": list(sizes),
            "pilot_size": pilot,
            "small_size": small,
            "large_size": large,
            "check_size": check,
            "repeats": {},
        }
        times: dict[str, dict[int, float]] = {name: {} for name in DECODERS}
        medians: dict[str, dict[int, float]] = {name: {} for name in DECODERS}
        notes: list[str] = []
        for i, size in enumerate(sizes):
            chunks = split(one_big_event(size), chunk_size)
            repeats = repeats_for(len(chunks))
            row["repeats"][str(size)] = repeats
            for name, decode in DECODERS.items():
                done = times[name]
                if len(done) < i:
                    continue  # a smaller size was skipped already
                predicted = _predict(done, size)
                if predicted > budget_s:
                    notes.append(
                        f"{name}: {_size(size)} skipped, about {predicted:.2g} s expected "
                        f"(budget {budget_s:g} s per run)"
                    )
                    continue
                seconds, median, events = best_time(decode, chunks, repeats)
                assert len(events) == 1 and len(events[0].data) == size, name
                done[size] = seconds
                medians[name][size] = median
            del chunks
        for name, done in times.items():
            med = medians[name]
            row[f"{name}_s"] = {str(size): t for size, t in done.items()}
            row[f"{name}_median_s"] = {str(size): t for size, t in med.items()}
            row[f"{name}_s_per_mb"] = {str(size): t / (size / MB) for size, t in done.items()}
            row[f"{name}_ratio"] = _ratio(done, large, small)
            row[f"{name}_median_ratio"] = _ratio(med, large, small)
            row[f"{name}_pilot_ratio"] = _ratio(done, small, pilot)
            row[f"{name}_check_ratio"] = _ratio(done, check, large)
        ours, theirs = times["ours"].get(large), times["httpx_sse"].get(large)
        row["ratio_ours_over_httpx_sse_large"] = ours / theirs if ours and theirs else None
        row["notes"] = notes
        result["chunks"][str(chunk_size)] = row
    return result


def _ratio(times: dict[int, float], top: int | None, bottom: int | None) -> float | None:
    """``times[top] / times[bottom]``, or None when either is missing (or zero)."""
    if top is None or bottom is None or not times.get(top) or not times.get(bottom):
        return None
    return times[top] / times[bottom]


def _predict(done: dict[int, float], size: int) -> float:
    """Expected seconds at ``size``, extrapolating the growth seen so far (else quadratic)."""
    if not done:
        return 0.0
    known = sorted(done)
    last = known[-1]
    growth = size / last
    exponent = 2.0
    if len(known) >= 2 and done[known[-2]] > 0 and done[last] > 0:
        exponent = max(1.0, math.log(done[last] / done[known[-2]]) / math.log(last / known[-2]))
    return done[last] * growth**exponent


def run(quick: bool) -> dict[str, Any]:
    """Run every benchmark; return the figures as a JSON-serialisable dict."""
    start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "sse_decoder",
        "quick": quick,
        "mb": MB,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "httpx": version("httpx"),
        "httpx_sse": version("httpx-sse"),
        "throughput": bench_throughput(quick),
        "linear": bench_linear(quick),
    }
    result["elapsed_s"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------- report


def _size(n: int) -> str:
    return f"{n / MB:.3g} MB"


def report(result: dict[str, Any]) -> str:
    """The figures of ``run()`` as a small text table."""
    tp = result["throughput"]
    out = [
        f"SSE decoder benchmark ({'quick' if result['quick'] else 'full'}), Python "
        f"{result['python']}, httpx-sse {result['httpx_sse']}, 1 MB = 10^6 bytes",
        "",
        f"Throughput: chat-completion stream, {_size(tp['body_bytes'])}, {tp['events']} events, "
        f"best of {tp['repeats']}",
        f"  {'chunk':>8}  {'ours MB/s':>10}  {'httpx-sse MB/s':>14}  {'ours/httpx-sse':>14}",
    ]
    for chunk, row in tp["chunks"].items():
        out.append(
            f"  {chunk + ' B':>8}  {row['ours_mb_s']:>10.1f}  {row['httpx_sse_mb_s']:>14.1f}"
            f"  {row['ratio_ours_over_httpx_sse']:>14.2f}"
        )
    lin = result["linear"]
    out += ["", "Linear time: one event, a single data: line; seconds, best of N"]
    for chunk, row in lin["chunks"].items():
        small, large, check = row["small_size"], row["large_size"], row["check_size"]
        sizes = row["sizes"]
        header = "".join(f"{_size(s):>10}" for s in sizes)
        header += " " * 10 * (4 - len(sizes))
        header += f"{_ratio_label(large, small):>11}{'(median)':>10}"
        if check is not None:
            header += f"{_ratio_label(check, large):>12}"
        out.append(f"  {'chunk ' + chunk + ' B':<14}{header}")
        for name in DECODERS:
            times = row[f"{name}_s"]
            line = "".join(
                f"{times[str(s)]:>10.4f}" if str(s) in times else f"{'skipped':>10}" for s in sizes
            )
            line += " " * 10 * (4 - len(sizes))
            line += f"{_fmt(row[f'{name}_ratio']):>11}{_fmt(row[f'{name}_median_ratio'], True):>10}"
            if check is not None:
                line += f"{_fmt(row[f'{name}_check_ratio']):>12}"
            out.append(f"    {name:<12}{line}")
        out.extend(f"    note: {note}" for note in row["notes"])
    out += [
        "  Ratios: about 10 (2 for the 2x check) when linear, 100 (4) when quadratic. A ratio",
        "  well above 10 with a 2x check near 2 is a step in the cost per byte (e.g. buffers",
        "  moving past malloc's mmap threshold), not quadratic growth: see *_s_per_mb in the JSON.",
    ]
    out += ["", f"Total {result['elapsed_s']:.1f} s"]
    return "\n".join(out)


def _ratio_label(top: int, bottom: int) -> str:
    return f"{top / MB:.3g}/{_size(bottom)}"


def _fmt(ratio: float | None, parenthesised: bool = False) -> str:
    text = "n/a" if ratio is None else f"{ratio:.1f}"
    return f"({text})" if parenthesised else text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs (~15 s at most)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    result = run(args.quick)
    print(report(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
