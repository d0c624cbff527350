"""The stream machine, tested like the codec: it is sans-IO, so these tests are pure.

- a transition table: every input in every phase, its outputs (by type) and the next phase,
  or the error;
- the ending rules per dialect, with their bytes: complete, truncated, the upstream's own
  error, before and after the commit point;
- ``Dialect.classify``: each dialect's event kinds, parsed at most once, the dialect unchanged;
- hypothesis: random input sequences never write after the end, never commit twice, close the
  source exactly once, keep the first ending, make the final frame at most once; random event
  streams of each dialect end as its integrity rule says.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dialects import anthropic_events, chat_events, named, responses_events

from sanic_streamplus import errors, framing
from sanic_streamplus.errors import (
    IdleTimeout,
    InvalidRequest,
    ProducerLost,
    SendTimeout,
    ServerShutdown,
    SlowClient,
    StreamCancelled,
    StreamNotFound,
    StreamPlusError,
    TooManyStreams,
    UpstreamStatusError,
    UpstreamTruncated,
)
from sanic_streamplus.framing import EventKind, get_dialect, get_format
from sanic_streamplus.machine import (
    CloseSource,
    Commit,
    Cut,
    Ending,
    FinalFrame,
    Outcome,
    Output,
    Phase,
    Refuse,
    StreamMachine,
    StreamStateError,
    Write,
    outcome_for,
)
from sanic_streamplus.sse import ServerSentEvent, SSEDecoder

EXAMPLES = int(os.environ.get("STREAMPLUS_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
pytestmark = pytest.mark.timeout(max(120, EXAMPLES // 25))

DONE = b"data: [DONE]\n\n"
TEXT = chat_events(["hi"], False)[1]  # an OpenAI chat chunk carrying text
FINISH = chat_events([], False)[-1]  # an OpenAI chat chunk with finish_reason "stop"
OPENAI_DONE = ServerSentEvent("[DONE]")
OPENAI_ERROR = ServerSentEvent('{"error": {"message": "overloaded", "type": "server_error"}}')


def machine(dialect: str = "openai", fmt: str = "sse") -> StreamMachine:
    return StreamMachine(get_dialect(dialect), get_format(fmt), {"Cache-Control": "no-cache"})


def send(m: StreamMachine, event: ServerSentEvent) -> list[Output]:
    return m.event(event, m.dialect.classify(event))


# ------------------------------------------------------------------------ the transition table

INPUTS: dict[str, Callable[[StreamMachine], list[Output]]] = {
    "event": lambda m: m.event(TEXT, EventKind.TEXT_DELTA),
    "terminal": lambda m: m.event(OPENAI_DONE, EventKind.TERMINAL),
    "upstream error": lambda m: m.event(OPENAI_ERROR, EventKind.UPSTREAM_ERROR),
    "source ended": StreamMachine.source_ended,
    "source failed": lambda m: m.source_failed(IdleTimeout(1)),
    "heartbeat due": StreamMachine.heartbeat_due,
    "send timed out": lambda m: m.send_timed_out(SendTimeout(1)),
    "client left": StreamMachine.client_left,
    "shutdown": StreamMachine.shutdown,
    "cancel": lambda m: m.cancel(StreamCancelled("s")),
    "finish": StreamMachine.finish,
    "drained": StreamMachine.drained,
}

# how to reach each phase (ending/unsent: the ending came before the commit point)
START: dict[str, Callable[[StreamMachine], Any]] = {
    "waiting": lambda m: None,
    "committed": INPUTS["event"],
    "ending": lambda m: (INPUTS["event"](m), m.source_failed(IdleTimeout(1))),
    "ending/unsent": lambda m: m.source_failed(IdleTimeout(1)),
    "closing": lambda m: (INPUTS["event"](m), m.source_ended(), m.finish()),
    "ended": lambda m: (INPUTS["event"](m), m.source_ended(), m.finish(), m.drained()),
}

E = StreamStateError
_ = ""  # no outputs, same phase
# phase -> input -> "outputs > next phase" (outputs by type; "> phase" left out: unchanged)
TABLE: dict[str, dict[str, str | type[Exception]]] = {
    "waiting": {
        "event": "Commit Write > committed",
        "terminal": "CloseSource > ending",
        "upstream error": "CloseSource > ending",
        "source ended": "CloseSource > ending",
        "source failed": "CloseSource > ending",
        "heartbeat due": "Commit Write > committed",
        "send timed out": E,
        "client left": "CloseSource > ended",
        "shutdown": "CloseSource > ending",
        "cancel": "CloseSource > ending",
        "finish": E,
        "drained": E,
    },
    "committed": {
        "event": "Write",
        "terminal": "CloseSource > ending",
        "upstream error": "CloseSource > ending",
        "source ended": "CloseSource > ending",
        "source failed": "CloseSource > ending",
        "heartbeat due": "Write",
        "send timed out": "CloseSource Cut > ended",
        "client left": "CloseSource > ended",
        "shutdown": "CloseSource > ending",
        "cancel": "CloseSource > ending",
        "finish": E,
        "drained": E,
    },
    "ending": {
        "event": _,
        "terminal": _,
        "upstream error": _,
        "source ended": _,
        "source failed": _,
        "heartbeat due": "Write",
        "send timed out": "Cut > ended",
        "client left": "> ended",
        "shutdown": _,
        "cancel": _,
        "finish": "FinalFrame > closing",
        "drained": E,
    },
    "ending/unsent": {
        "event": _,
        "terminal": _,
        "upstream error": _,
        "source ended": _,
        "source failed": _,
        "heartbeat due": _,  # sealed: a heartbeat may not commit an ending stream
        "send timed out": E,
        "client left": "> ended",
        "shutdown": _,
        "cancel": _,
        "finish": "Refuse > closing",
        "drained": E,
    },
    "closing": {
        **dict.fromkeys(INPUTS, _),
        "send timed out": "Cut > ended",
        "client left": "> ended",
        "finish": E,
        "drained": "> ended",
    },
    "ended": dict.fromkeys(INPUTS, _),
}


def test_the_table_has_every_input_in_every_phase() -> None:
    assert set(TABLE) == set(START)
    for row in TABLE.values():
        assert set(row) == set(INPUTS)


def _cases() -> list[tuple[str, str]]:
    return [(phase, name) for phase in TABLE for name in INPUTS]


@pytest.mark.parametrize(("phase", "name"), _cases())
def test_transition(phase: str, name: str) -> None:
    m = machine()
    START[phase](m)
    before = m.phase
    assert before.value == phase.split("/")[0]
    expected = TABLE[phase][name]
    if not isinstance(expected, str):
        ending, status = m.ending, m.status
        with pytest.raises(expected):
            INPUTS[name](m)
        assert (m.phase, m.ending, m.status) == (before, ending, status)  # nothing changed
        return
    outputs, _, target = expected.partition(">")
    got = INPUTS[name](m)
    assert [type(out).__name__ for out in got] == outputs.split()
    assert m.phase.value == (target.strip() or before.value)


# ------------------------------------------------------------------------ endings, with bytes


def finish(m: StreamMachine) -> list[Output]:
    """What a well-behaved pump does once the machine is ending: finish, drain."""
    if m.phase in (Phase.WAITING, Phase.COMMITTED):
        m.source_ended()
    out = m.finish()
    if m.phase is Phase.CLOSING:
        m.drained()
    return out


def written(outputs: list[Output]) -> bytes:
    return b"".join(out.data for out in outputs if isinstance(out, (Write, FinalFrame, Cut)))


def test_a_stream_commits_once_with_its_headers_then_writes_each_event() -> None:
    m = machine()
    commit, write = send(m, TEXT)
    assert commit == Commit(
        200,
        (("Cache-Control", "no-cache"), ("Content-Type", "text/event-stream; charset=utf-8")),
    )
    assert write == Write(f"data: {TEXT.data}\n\n".encode(), TEXT)
    assert send(m, TEXT) == [write]
    assert (m.events, m.status) == (2, 200)


def test_openai_done_is_written_once_and_completes() -> None:
    m = machine()
    send(m, TEXT)
    assert send(m, OPENAI_DONE) == [CloseSource()]
    assert send(m, TEXT) == []  # what a holding upstream sends after its end is dropped
    assert finish(m) == [FinalFrame(DONE, (OPENAI_DONE,))]
    assert m.ending is not None and m.ending.outcome is Outcome.COMPLETED


def test_openai_finish_reason_then_the_end_is_complete_and_gets_done() -> None:
    m = machine()
    send(m, TEXT)
    send(m, FINISH)
    assert finish(m) == [FinalFrame(DONE, (OPENAI_DONE,))]  # [DONE] earned by the finish
    assert m.ending is not None and m.ending.outcome is Outcome.COMPLETED


def test_openai_neither_finish_reason_nor_done_is_truncated() -> None:
    m = machine()
    send(m, TEXT)
    (frame,) = finish(m)
    assert isinstance(frame, FinalFrame)
    error, done = SSEDecoder().feed(frame.data)
    assert json.loads(error.data)["error"]["type"] == "upstream_truncated"
    assert done.data == "[DONE]"
    assert m.ending is not None and m.ending.outcome is Outcome.UPSTREAM_TRUNCATED
    assert isinstance(m.ending.error, UpstreamTruncated)


def test_a_truncated_stream_before_the_commit_point_is_a_502_answer() -> None:
    m = machine()
    assert m.source_ended() == [CloseSource()]
    (refuse,) = finish(m)
    assert isinstance(refuse, Refuse)
    assert refuse.status == m.status == 502
    assert json.loads(refuse.body)["error"]["type"] == "upstream_truncated"
    assert refuse.headers == (("Content-Type", "application/json"),)


def test_an_answer_before_the_commit_point_is_in_the_dialects_error_shape() -> None:
    m = machine("anthropic")
    m.source_failed(UpstreamStatusError(401, message="bad key"))
    (refuse,) = finish(m)
    assert isinstance(refuse, Refuse) and refuse.status == 401
    body = {"type": "error", "error": {"type": "authentication_error", "message": "bad key"}}
    assert json.loads(refuse.body) == body


def test_a_rate_limited_upstream_is_a_429_answer_with_retry_after() -> None:
    m = machine()
    m.source_failed(UpstreamStatusError(429, retry_after="7"))
    (refuse,) = finish(m)
    assert isinstance(refuse, Refuse) and refuse.status == 429
    assert ("Retry-After", "7") in refuse.headers
    assert m.ending is not None and m.ending.outcome is Outcome.RATE_LIMITED


def test_the_upstreams_own_openai_error_passes_once_then_done() -> None:
    m = machine()
    send(m, TEXT)
    assert send(m, OPENAI_ERROR) == [CloseSource()]
    (frame,) = finish(m)
    assert frame == FinalFrame(
        f"data: {OPENAI_ERROR.data}\n\n".encode() + DONE, (OPENAI_ERROR, OPENAI_DONE)
    )
    assert m.ending == Ending(Outcome.UPSTREAM_ERROR)  # no error of ours: the frame is theirs


def test_the_upstreams_own_error_as_first_event_commits_and_passes_through() -> None:
    m = machine("anthropic")
    error = named("error", error={"type": "overloaded_error", "message": "busy"})
    send(m, error)
    commit, frame = finish(m)
    assert isinstance(commit, Commit)
    assert frame == FinalFrame(get_format("sse").encode(error), (error,))


def test_anthropic_message_stop_completes_and_its_absence_truncates() -> None:
    events = anthropic_events(["a", "b"], True)
    m = machine("anthropic")
    for event in events:
        send(m, event)
    assert finish(m) == [FinalFrame(get_format("sse").encode(events[-1]), (events[-1],))]
    assert m.ending is not None and m.ending.outcome is Outcome.COMPLETED

    m = machine("anthropic")
    for event in events[:-1]:
        send(m, event)
    (frame,) = finish(m)
    assert isinstance(frame, FinalFrame)
    (error,) = SSEDecoder().feed(frame.data)
    assert error.event == "error"
    assert json.loads(error.data)["error"]["type"] == "api_error"
    assert m.ending is not None and m.ending.outcome is Outcome.UPSTREAM_TRUNCATED


@pytest.mark.parametrize(
    ("terminal", "outcome"),
    [
        ("response.completed", Outcome.COMPLETED),
        ("response.incomplete", Outcome.COMPLETED),
        ("response.failed", Outcome.UPSTREAM_ERROR),
    ],
)
def test_responses_terminal_events_end_the_stream(terminal: str, outcome: Outcome) -> None:
    m = machine("openai-responses")
    for event in responses_events(["a"], False):
        send(m, event)
    last = named(terminal, sequence_number=9, response={"id": "resp_fake", "status": "x"})
    assert send(m, last) == [CloseSource()]
    assert finish(m) == [FinalFrame(get_format("sse").encode(last), (last,))]  # once, alone
    assert m.ending is not None and m.ending.outcome is outcome


def test_a_truncated_responses_stream_fails_its_own_response_numbered_after_the_last() -> None:
    dialect = get_dialect("openai-responses")
    m = StreamMachine(dialect, get_format("sse"))
    events = responses_events(["a", "b"], False)
    for event in events:
        send(m, event)
    assert vars(dialect) == {}  # the machine keeps that state: the dialect keeps none
    (frame,) = finish(m)
    assert isinstance(frame, FinalFrame)
    (failed,) = SSEDecoder().feed(frame.data)
    body = json.loads(failed.data)
    assert failed.event == body["type"] == "response.failed"
    assert body["sequence_number"] == json.loads(events[-1].data)["sequence_number"] + 1
    assert body["response"]["id"] == "resp_fake"
    assert body["response"]["error"]["message"] == UpstreamTruncated("openai-responses").message


def test_plain_has_no_end_marker_so_any_end_is_complete() -> None:
    m = machine("plain")
    send(m, ServerSentEvent('{"text": "a"}'))
    assert finish(m) == [FinalFrame(b"", ())]
    assert m.ending is not None and m.ending.outcome is Outcome.COMPLETED


def test_ndjson_drops_the_bare_done_but_keeps_an_end_with_data() -> None:
    m = machine("openai", "ndjson")
    send(m, TEXT)
    send(m, OPENAI_ERROR)
    assert finish(m) == [FinalFrame(OPENAI_ERROR.data.encode() + b"\n", (OPENAI_ERROR,))]
    m = machine("anthropic", "ndjson")
    stop = named("message_stop")
    send(m, stop)
    assert finish(m)[-1] == FinalFrame(get_format("ndjson").encode(stop), (stop,))


def test_a_heartbeat_commits_and_then_an_error_is_a_frame_not_an_answer() -> None:
    m = machine()
    commit, beat = m.heartbeat_due()
    assert isinstance(commit, Commit) and commit.status == 200
    assert beat == Write(b": ping\n")
    m.shutdown()
    (frame,) = finish(m)
    assert isinstance(frame, FinalFrame) and b'"type":"shutdown"' in frame.data
    assert frame.data.endswith(DONE)


def test_the_text_format_has_no_heartbeat() -> None:
    m = machine("plain", "text")
    assert m.heartbeat_due() == []
    assert m.phase is Phase.WAITING


def test_heartbeats_go_on_while_ending_and_stop_at_the_final_frame() -> None:
    m = machine()
    send(m, TEXT)
    send(m, OPENAI_DONE)
    assert m.heartbeat_due() == [Write(b": ping\n")]  # before_final_frame hooks run
    m.finish()
    assert m.heartbeat_due() == []


def test_a_send_timeout_cuts_with_the_error_frame_as_last_word() -> None:
    m = machine("anthropic")
    send(m, named("message_start", message={}))
    close, cut = m.send_timed_out(SendTimeout(2))
    assert close == CloseSource()
    assert isinstance(cut, Cut) and cut.ending.outcome is Outcome.TIMEOUT
    (frame,) = SSEDecoder().feed(cut.data)
    assert json.loads(frame.data)["error"]["type"] == "timeout_error"
    assert m.finish() == [] and m.phase is Phase.ENDED  # no second frame


def test_a_send_timeout_while_ending_cuts_with_the_ending_frame_and_keeps_the_ending() -> None:
    m = machine()
    send(m, TEXT)
    send(m, OPENAI_DONE)
    (cut,) = m.send_timed_out(SlowClient(65536))
    assert cut == Cut(m.ending, DONE)  # type: ignore[arg-type]
    assert m.ending is not None and m.ending.outcome is Outcome.COMPLETED  # the first wins


def test_the_first_ending_wins() -> None:
    m = machine()
    send(m, TEXT)
    m.shutdown()
    first = m.ending
    assert m.cancel(StreamCancelled("s")) == []
    assert m.source_failed(IdleTimeout(1)) == []
    assert m.client_left() == []
    assert m.ending == first and first is not None and first.outcome is Outcome.SHUTDOWN


def test_a_client_that_left_before_anything_was_sent_is_a_499() -> None:
    m = machine()
    assert m.client_left() == [CloseSource()]
    assert m.status == 499
    assert m.ending is not None and m.ending.outcome is Outcome.CLIENT_DISCONNECTED
    assert m.finish() == []


def test_written_counts_bytes_and_only_after_a_commit() -> None:
    m = machine()
    with pytest.raises(StreamStateError):
        m.written(5)
    send(m, TEXT)
    m.written(5)
    m.written(7)
    assert m.bytes == 12


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (UpstreamStatusError(429), Outcome.RATE_LIMITED),
        (UpstreamStatusError(500), Outcome.UPSTREAM_ERROR),
        (TooManyStreams(10, 1), Outcome.RATE_LIMITED),
        (IdleTimeout(1), Outcome.TIMEOUT),
        (errors.ConnectTimeout(1), Outcome.TIMEOUT),
        (SendTimeout(1), Outcome.TIMEOUT),
        (SlowClient(1), Outcome.CLIENT_DISCONNECTED),
        (ServerShutdown(), Outcome.SHUTDOWN),
        (StreamCancelled("s"), Outcome.CANCELLED),
        (UpstreamTruncated("openai"), Outcome.UPSTREAM_TRUNCATED),
        (errors.LineTooLong(10), Outcome.UPSTREAM_ERROR),
        (ProducerLost("s"), Outcome.UPSTREAM_ERROR),
        (InvalidRequest("no", status=404), Outcome.INVALID_REQUEST),
        (StreamNotFound("s"), Outcome.INVALID_REQUEST),
        (StreamPlusError("internal server error"), Outcome.INTERNAL_ERROR),
    ],
)
def test_outcome_for(error: StreamPlusError, outcome: Outcome) -> None:
    assert outcome_for(error) is outcome


def test_outcomes_are_strings_in_logs() -> None:
    assert f"outcome={Outcome.CLIENT_DISCONNECTED}" == "outcome=client_disconnected"
    assert json.dumps({"outcome": Outcome.TIMEOUT}) == '{"outcome": "timeout"}'


def test_the_machine_imports_no_io() -> None:
    source = Path(framing.__file__).with_name("machine.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "collections", "dataclasses", "enum"}


# ------------------------------------------------------------------------ classify


def chunk(**fields: Any) -> ServerSentEvent:
    return ServerSentEvent(json.dumps({"object": "chat.completion.chunk", **fields}))


CLASSIFIED = [
    ("openai", OPENAI_DONE, EventKind.TERMINAL),
    ("openai", OPENAI_ERROR, EventKind.UPSTREAM_ERROR),
    ("openai", TEXT, EventKind.TEXT_DELTA),
    ("openai", chat_events([], False)[0], EventKind.TEXT_DELTA),  # role, "content": ""
    ("openai", FINISH, EventKind.FINISH),
    ("openai", chunk(choices=[], usage={"prompt_tokens": 1}), EventKind.USAGE),
    ("openai", chunk(choices=[{"delta": {}, "finish_reason": "stop"}], usage={}), EventKind.FINISH),
    ("openai", chunk(choices=[{"delta": {"content": None}}], usage=None), EventKind.OTHER),
    ("openai", chunk(choices=[{"delta": {"content": 'an "error"'}}]), EventKind.TEXT_DELTA),
    ("openai", chunk(choices=[{"delta": {"content": "x"}}], error=None), EventKind.TEXT_DELTA),
    ("openai", ServerSentEvent("not json"), EventKind.OTHER),
    ("anthropic", anthropic_events(["a"], True)[0], EventKind.START),
    ("anthropic", anthropic_events(["a"], True)[1], EventKind.OTHER),
    ("anthropic", anthropic_events(["a"], True)[2], EventKind.TEXT_DELTA),
    ("anthropic", anthropic_events(["a"], True)[-2], EventKind.USAGE),
    ("anthropic", named("message_stop"), EventKind.TERMINAL),
    ("anthropic", ServerSentEvent('{"type": "message_stop"}'), EventKind.TERMINAL),  # unnamed
    ("anthropic", named("error", error={"type": "api_error"}), EventKind.UPSTREAM_ERROR),
    ("anthropic", ServerSentEvent('{"type": "ping"}', event="ping"), EventKind.OTHER),
    ("openai-responses", responses_events([], False)[0], EventKind.START),
    ("openai-responses", responses_events([], False)[1], EventKind.START),
    ("openai-responses", responses_events(["a"], False)[4], EventKind.TEXT_DELTA),
    ("openai-responses", responses_events([], True)[-1], EventKind.TERMINAL),
    ("openai-responses", named("response.incomplete", response={}), EventKind.TERMINAL),
    ("openai-responses", named("response.failed", response={}), EventKind.UPSTREAM_ERROR),
    ("openai-responses", named("error", code="x", message="y"), EventKind.UPSTREAM_ERROR),
    ("openai-responses", named("response.output_item.added", item={}), EventKind.OTHER),
    ("plain", ServerSentEvent('{"text": "a"}'), EventKind.TEXT_DELTA),
    ("plain", ServerSentEvent('{"message": "x"}', event="error"), EventKind.UPSTREAM_ERROR),
    ("plain", ServerSentEvent('{"usage": {"tokens": 3}}'), EventKind.USAGE),
    ("plain", ServerSentEvent('{"usage": null}'), EventKind.OTHER),
    ("plain", ServerSentEvent("[DONE]"), EventKind.OTHER),
]


@pytest.mark.parametrize(("dialect", "event", "kind"), CLASSIFIED)
def test_classify(
    dialect: str, event: ServerSentEvent, kind: EventKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    parses = []
    parse = framing._object

    def counted(data: str) -> dict[str, Any] | None:
        parses.append(data)
        return parse(data)

    monkeypatch.setattr(framing, "_object", counted)
    d = get_dialect(dialect)
    before = dict(vars(d))
    assert d.classify(event) is kind
    assert len(parses) <= 1  # the data is parsed at most once
    assert vars(d) == before  # the dialect remembers nothing


def test_text_deltas_are_classified_without_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(data: str) -> None:
        raise AssertionError(f"parsed {data!r}")

    monkeypatch.setattr(framing, "_object", refuse)
    assert get_dialect("openai").classify(TEXT) is EventKind.TEXT_DELTA
    delta = anthropic_events(["a"], False)[2]
    assert get_dialect("anthropic").classify(delta) is EventKind.TEXT_DELTA


# ------------------------------------------------------------------------ hypothesis

OUTSIDE = ["heartbeat due", "send timed out", "client left", "shutdown", "cancel", "finish"]
ADAPTER = ["finish", "drained"]


class Trace:
    """A machine and every output it gave, with the invariants checked after each input."""

    def __init__(self, m: StreamMachine) -> None:
        self.m = m
        self.outputs: list[Output] = []
        self.endings: list[Any] = []

    def apply(self, step: Callable[[StreamMachine], list[Output]]) -> None:
        m = self.m
        before = (m.phase, m.ending, m.status)
        try:
            out = step(m)
        except StreamStateError:
            assert (m.phase, m.ending, m.status) == before
            return
        if before[0] is Phase.ENDED:
            assert out == []  # nothing after the end
        self.outputs += out
        if self.endings:
            assert m.ending is self.endings[0]  # the first ending wins
        elif m.ending is not None:
            self.endings.append(m.ending)
        self.check()

    def check(self) -> None:
        kinds = [type(out) for out in self.outputs]
        assert kinds.count(Commit) <= 1 and kinds.count(Refuse) <= 1
        assert not (Commit in kinds and Refuse in kinds)
        assert kinds.count(CloseSource) <= 1
        last_words = [
            out for out in self.outputs if isinstance(out, FinalFrame | Cut) and out.data
        ] + [out for out in self.outputs if isinstance(out, FinalFrame) and not out.data]
        assert len(last_words) <= 1  # the final frame is made once
        ended = False
        for out in self.outputs:
            if isinstance(out, (Write, Commit)):
                assert not ended, "a write after the end"
            ended = ended or isinstance(out, (FinalFrame, Refuse, Cut))
            if isinstance(out, Write) and out.event is not None:
                assert CloseSource() not in self.outputs[: self.outputs.index(out)]
        if Write in kinds:
            assert kinds.index(Commit) < kinds.index(Write)

    def end(self) -> None:
        """Drive to the end as a pump does, then check the source was closed exactly once."""
        for step in (StreamMachine.source_ended, StreamMachine.finish, StreamMachine.drained):
            self.apply(step)
        assert self.m.phase is Phase.ENDED
        assert [type(out) for out in self.outputs].count(CloseSource) == 1
        assert self.m.ending is not None and self.m.status is not None


DIALECT_NAMES = ["plain", "openai", "anthropic", "openai-responses"]
steps = st.sampled_from([name for name in INPUTS if name != "event"] + ["event"] * 4)


@FUZZ
@given(
    dialect=st.sampled_from(DIALECT_NAMES),
    fmt=st.sampled_from(["sse", "ndjson", "text"]),
    names=st.lists(steps, max_size=25),
)
def test_random_inputs_keep_the_invariants(dialect: str, fmt: str, names: list[str]) -> None:
    trace = Trace(machine(dialect, fmt))
    for name in names:
        trace.apply(INPUTS[name])
    trace.end()


# events of each dialect, labelled with what they mean for the end (the oracle's view)
POOLS: dict[str, list[tuple[str, ServerSentEvent]]] = {
    "plain": [
        ("text", ServerSentEvent('{"text": "a"}')),
        ("error", ServerSentEvent('{"error": {}}', event="error")),
        ("usage", ServerSentEvent('{"usage": {"n": 1}}')),
    ],
    "openai": [
        ("text", TEXT),
        ("text", chat_events([], False)[0]),
        ("finish", FINISH),
        ("usage", chunk(choices=[], usage={"prompt_tokens": 1})),
        ("terminal", OPENAI_DONE),
        ("error", OPENAI_ERROR),
    ],
    "anthropic": [
        *(("other", event) for event in anthropic_events(["a"], False)),
        ("terminal", named("message_stop")),
        ("error", named("error", error={"type": "overloaded_error", "message": "busy"})),
    ],
    "openai-responses": [
        *(("other", event) for event in responses_events(["a"], False)),
        ("terminal", named("response.completed", sequence_number=99, response={"id": "r"})),
        ("terminal", named("response.incomplete", sequence_number=99, response={"id": "r"})),
        ("error", named("response.failed", sequence_number=99, response={"id": "r"})),
        ("error", named("error", sequence_number=99, code="x", message="y")),
    ],
}


def expected_outcome(dialect: str, labels: list[str]) -> Outcome:
    for label in labels:
        if label == "terminal":
            return Outcome.COMPLETED
        if label == "error":
            return Outcome.UPSTREAM_ERROR
    if dialect == "plain" or (dialect == "openai" and "finish" in labels):
        return Outcome.COMPLETED
    return Outcome.UPSTREAM_TRUNCATED


@st.composite
def streams(draw: st.DrawFn) -> tuple[str, list[tuple[str, ServerSentEvent]]]:
    dialect = draw(st.sampled_from(DIALECT_NAMES))
    return dialect, draw(st.lists(st.sampled_from(POOLS[dialect]), max_size=12))


@FUZZ
@given(stream=streams(), beat_first=st.booleans())
def test_each_dialect_detects_truncation(
    stream: tuple[str, list[tuple[str, ServerSentEvent]]], beat_first: bool
) -> None:
    dialect, labelled = stream
    trace = Trace(machine(dialect))
    if beat_first:
        trace.apply(StreamMachine.heartbeat_due)
    for _, event in labelled:
        trace.apply(lambda m, event=event: send(m, event))  # type: ignore[misc]
    trace.end()
    labels = [label for label, _ in labelled]
    outcome = expected_outcome(dialect, labels)
    m = trace.m
    assert m.ending is not None and m.ending.outcome is outcome
    wire = written(trace.outputs)
    events = SSEDecoder().feed(wire)
    ours = UpstreamTruncated(dialect).message
    errors_of_ours = [e for e in events if ours in e.data]
    if dialect == "openai":
        assert wire.count(DONE) == (outcome is not Outcome.UPSTREAM_TRUNCATED or m.status == 200)
        assert wire.endswith(DONE) or m.status != 200
    if outcome is Outcome.UPSTREAM_TRUNCATED:
        refused = [out for out in trace.outputs if isinstance(out, Refuse)]
        assert len(errors_of_ours) == 1 or (refused and refused[0].status == 502)
    else:
        assert errors_of_ours == []
    if outcome is Outcome.UPSTREAM_ERROR:  # the upstream's own frame, once, nothing of ours
        assert m.ending.error is None
        first = labels.index("error")
        own = labelled[first][1]
        assert [e for e in events if e.data == own.data] == [own]
        assert events[-1] == own or (dialect == "openai" and events[-1].data == "[DONE]")
