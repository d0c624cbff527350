"""The splice (``sanic_streamplus.splice``): a committed stream continued on a second upstream
reads as one answer. Sans-IO, like the codec: event lists in, event lists out.

Each dialect has table tests (one cut, the seams looked at one by one) and a hypothesis property
(the first upstream cut after every event, a second one continuing: the client's text is the
delivered prefix plus the continuation, one start, one id, consistent indices); the spliced
events then go through the official SDK's own stream accumulator (openai's
``ChatCompletionStreamState`` / ``ResponseStreamState``, anthropic's ``accumulate_event``),
which must give one message with the whole text and raise nothing.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event, build_events
from anthropic.types import RawMessageStreamEvent
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import omit
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from sanic_streamplus.framing import get_dialect
from sanic_streamplus.splice import CONTINUE_INSTRUCTION, Splice
from sanic_streamplus.sse import ServerSentEvent, SSEDecoder
from sanic_streamplus.testing import FakeModel

DONE = ServerSentEvent("[DONE]")
QUESTION = {"role": "user", "content": "Tell me a story."}


def spliced(
    dialect: str,
    first: list[ServerSentEvent],
    cut: int,
    second: list[ServerSentEvent],
    body: dict[str, Any],
    **options: Any,
) -> tuple[list[ServerSentEvent], dict[str, Any]]:
    """What the client gets when the first upstream fails after ``cut`` of its events and the
    second one continues: (the client's events, the second upstream's request body)."""
    splice = Splice(get_dialect(dialect), **options)
    client = []
    for event in first[:cut]:
        splice.delivered(event)
        client.append(event)
    assert splice.can_continue
    continued = splice.continuation_body(body)
    for event in second:
        out = splice.rewrite(event)
        if out is not None:
            splice.delivered(out)
            client.append(out)
    return client, continued


# ------------------------------------------------------------------------ OpenAI chat completions


def chat_stream(
    tokens: list[str],
    *,
    ident: str = "chatcmpl-first",
    model: str = "gpt-first",
    created: int = 1700000000,
    fingerprint: str | None = "fp_first",
    usage: dict[str, Any] | None = None,
) -> list[ServerSentEvent]:
    """A Chat Completions stream (API reference "The chat completion chunk object"): a role
    chunk, one chunk per token, a finish chunk, a usage chunk when ``usage``, ``[DONE]``."""

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> ServerSentEvent:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created}
        body |= {"model": model, "system_fingerprint": fingerprint, "choices": choices, **extra}
        return ServerSentEvent(json.dumps(body))

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    events = [chunk(choice({"role": "assistant", "content": "", "refusal": None}))]
    events += [chunk(choice({"content": token})) for token in tokens]
    events.append(chunk(choice({}, "stop")))
    if usage is not None:
        events.append(chunk([], usage=usage))
    return [*events, DONE]


def chat_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def chunks(events: list[ServerSentEvent]) -> list[dict[str, Any]]:
    return [json.loads(event.data) for event in events if event.data != "[DONE]"]


def chat_text(events: list[ServerSentEvent]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks(events) if c["choices"]
    )


def roles(events: list[ServerSentEvent]) -> int:
    return sum("role" in c["choices"][0]["delta"] for c in chunks(events) if c["choices"])


def chat_sdk_message(events: list[ServerSentEvent]) -> Any:
    """The completion openai-python's accumulator makes of ``events`` (each chunk validated
    as its ``ChatCompletionChunk`` model)."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for value in chunks(events):
        state.handle_chunk(ChatCompletionChunk.model_validate(value))
    return state.get_final_completion()


SECOND = {"ident": "chatcmpl-second", "model": "gpt-second", "created": 1800000000}


def test_chat_the_client_sees_one_answer_from_two_upstreams() -> None:
    first = chat_stream(["Once", " upon", " a", " time"])
    second = chat_stream([",", " a", " fox."], fingerprint="fp_second", **SECOND)
    client, _ = spliced("openai", first, 3, second, {"messages": [QUESTION], "stream": True})

    assert chat_text(client) == "Once upon, a fox."
    assert roles(client) == 1
    heads = {(c["id"], c["model"], c["created"], c["system_fingerprint"]) for c in chunks(client)}
    assert heads == {("chatcmpl-first", "gpt-first", 1700000000, "fp_first")}
    assert client[-1] == DONE and client.count(DONE) == 1
    assert len(client) == 3 + len(second) - 1  # only the second role chunk is dropped
    completion = chat_sdk_message(client)
    assert completion.id == "chatcmpl-first"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Once upon, a fox."
    assert completion.choices[0].finish_reason == "stop"


def test_chat_the_test_kits_fake_upstream_streams_splice() -> None:
    # the exact bytes FakeUpstream writes (the over-the-socket failover tests use it), decoded
    first = SSEDecoder().feed(b"".join(FakeModel(tokens=6).frames()))
    second = SSEDecoder().feed(b"".join(FakeModel(text="and more.", usage=True).frames()))
    client, body = spliced("openai", first, 4, second, {"messages": [QUESTION]})
    assert body["messages"][1] == {"role": "assistant", "content": "Hello from the"}
    assert chat_text(client) == "Hello from theand more."
    assert roles(client) == 1 and client[-1] == DONE
    assert chunks(client)[-1]["usage"]["completion_tokens"] == 2  # the fake's own count
    assert chat_sdk_message(client).choices[0].message.content == "Hello from theand more."


def test_chat_continuation_body_is_the_original_plus_the_partial_answer() -> None:
    body = {"model": "gpt-x", "messages": [QUESTION], "stream": True, "temperature": 0.2}
    original = json.loads(json.dumps(body))
    splice = Splice(get_dialect("openai"))
    for event in chat_stream(["Once", " upon"])[:3]:
        splice.delivered(event)

    continued = splice.continuation_body(body)

    assert body == original  # not mutated
    assert continued == {
        **original,
        "messages": [
            QUESTION,
            {"role": "assistant", "content": "Once upon"},
            {"role": "user", "content": CONTINUE_INSTRUCTION},
        ],
    }


@pytest.mark.parametrize("instruction", ["Go on.", None])
def test_chat_the_instruction_is_overridable_or_none(instruction: str | None) -> None:
    first = chat_stream(["Once"])
    _, body = spliced("openai", first, 2, [], {"messages": [QUESTION]}, instruction=instruction)
    expected = [QUESTION, {"role": "assistant", "content": "Once"}]
    if instruction is not None:
        expected.append({"role": "user", "content": instruction})
    assert body["messages"] == expected


def test_chat_with_only_the_role_delivered_the_request_is_asked_again_as_is() -> None:
    body = {"messages": [QUESTION], "stream": True}
    client, continued = spliced("openai", chat_stream(["A"]), 1, chat_stream(["B"]), body)
    assert continued == body
    assert chat_text(client) == "B" and roles(client) == 1


def test_chat_a_role_chunk_with_text_keeps_its_text() -> None:
    second = chat_stream([" fox"], **SECOND)
    role = json.loads(second[0].data)
    role["choices"][0]["delta"]["content"] = "a"
    second[0] = ServerSentEvent(json.dumps(role))
    client, _ = spliced("openai", chat_stream(["Once", " upon"]), 2, second, {"messages": []})
    assert chat_text(client) == "Oncea fox" and roles(client) == 1


def test_chat_usage_is_added_to_what_the_client_was_sent() -> None:
    # the first upstream reports usage on every chunk (vLLM's continuous_usage_stats), so the
    # client had counts already; the continuation's final usage is added to them
    first = chat_stream(["Once", " upon"])
    with_usage = []
    for number, event in enumerate(first[:3]):
        value = json.loads(event.data) | {"usage": chat_usage(10, number)}
        with_usage.append(ServerSentEvent(json.dumps(value)))
    second = chat_stream([" a", " time"], usage=chat_usage(14, 2), **SECOND)

    client, _ = spliced("openai", with_usage, 3, second, {"messages": []})

    usage = chunks(client)[-1]["usage"]
    assert usage == {
        "prompt_tokens": 24,
        "completion_tokens": 4,
        "total_tokens": 28,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert chat_sdk_message(client).usage.completion_tokens == 4


def test_chat_usage_without_earlier_counts_is_the_continuations() -> None:
    second = chat_stream([" a"], usage=chat_usage(14, 1), **SECOND)
    client, _ = spliced("openai", chat_stream(["Once"]), 2, second, {"messages": []})
    assert chunks(client)[-1]["usage"] == chat_usage(14, 1)


def test_chat_an_error_event_of_the_continuation_passes_unchanged() -> None:
    error = ServerSentEvent(json.dumps({"error": {"message": "overloaded", "type": "x"}}))
    splice = Splice(get_dialect("openai"))
    splice.delivered(chat_stream(["Once"])[1])
    splice.continuation_body({"messages": []})
    assert splice.rewrite(error) is error
    assert splice.rewrite(DONE) is DONE


def test_chat_half_an_emoji_stays_escaped() -> None:
    # a JSON escape of one UTF-16 surrogate (some upstreams cut an emoji between two deltas):
    # decoded it has no UTF-8, so the rewritten chunk must escape it again
    second = chat_stream(["\ud83d", "\ude00"], **SECOND)  # json.dumps escapes them
    assert "\\ud83d" in second[1].data
    client, _ = spliced("openai", chat_stream(["Hi"]), 2, second, {"messages": []})
    for event in client:
        event.data.encode("utf-8")  # strict: raises on a lone surrogate
    assert chat_text(client) == "Hi\ud83d\ude00"


def tool_call_chunk() -> ServerSentEvent:
    call = {"index": 0, "id": "call_1", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": '{"ci'}
    choice = {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}
    body = {"id": "chatcmpl-first", "object": "chat.completion.chunk", "created": 1}
    return ServerSentEvent(json.dumps({**body, "model": "m", "choices": [choice]}))


def two_choices() -> ServerSentEvent:
    value = json.loads(chat_stream(["a"])[1].data)
    value["choices"].append({**value["choices"][0], "index": 1})
    return ServerSentEvent(json.dumps(value))


@pytest.mark.parametrize(
    ("name", "delivered"),
    [
        ("openai", []),  # nothing delivered: the failover before the commit point's job
        ("openai", [*chat_stream(["a"])[:2], tool_call_chunk()]),  # a tool call in flight
        ("openai", chat_stream(["a"])[:3]),  # the finish reason: the answer is complete
        ("openai", chat_stream(["a"])),  # [DONE]
        ("openai", [two_choices()]),  # n > 1
        ("plain", [ServerSentEvent('{"text": "a"}')]),  # a dialect the splice does not know
    ],
)
def test_what_cannot_be_continued(name: str, delivered: list[ServerSentEvent]) -> None:
    splice = Splice(get_dialect(name))
    for event in delivered:
        splice.delivered(event)
    assert not splice.can_continue
    with pytest.raises(RuntimeError):
        splice.continuation_body({"messages": []})


def test_rewrite_before_the_continuation_body_is_an_error() -> None:
    splice = Splice(get_dialect("openai"))
    splice.delivered(chat_stream(["a"])[1])
    with pytest.raises(RuntimeError):
        splice.rewrite(chat_stream(["b"])[1])


# white space often (it is the hard part); no lone surrogate: a decoded event stream has none
CHARS = st.sampled_from(" \n\tab") | st.characters(codec="utf-8")
TOKENS = st.lists(st.text(CHARS, min_size=1, max_size=4), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(first_tokens=TOKENS, second_tokens=TOKENS, data=st.data())
def test_chat_cut_anywhere_and_continued_reads_as_one_answer(
    first_tokens: list[str], second_tokens: list[str], data: st.DataObject
) -> None:
    first = chat_stream(first_tokens)
    cut = data.draw(st.integers(0, len(first)), label="cut")
    splice = Splice(get_dialect("openai"))
    for event in first[:cut]:
        splice.delivered(event)
    # continuable from the role chunk up to the last token, not before, not once finished
    assert splice.can_continue == (1 <= cut <= 1 + len(first_tokens))
    if not splice.can_continue:
        return
    second = chat_stream(second_tokens, usage=chat_usage(9, len(second_tokens)), **SECOND)
    client, _ = spliced("openai", first, cut, second, {"messages": [QUESTION]})

    whole = "".join(first_tokens[: cut - 1] + second_tokens)
    assert chat_text(client) == whole
    assert roles(client) == 1
    assert {c["id"] for c in chunks(client)} == {"chatcmpl-first"}
    assert client[-1] == DONE
    assert chat_sdk_message(client).choices[0].message.content == whole


# ------------------------------------------------------------------------------ Anthropic Messages


def named(kind: str, **data: Any) -> ServerSentEvent:
    """An event named by its data's ``type``, as Anthropic and OpenAI's Responses API send."""
    return ServerSentEvent(json.dumps({"type": kind, **data}), event=kind)


def text_block(index: int, tokens: list[str]) -> list[ServerSentEvent]:
    start = named("content_block_start", index=index, content_block={"type": "text", "text": ""})
    deltas = [
        named("content_block_delta", index=index, delta={"type": "text_delta", "text": token})
        for token in tokens
    ]
    return [start, *deltas, named("content_block_stop", index=index)]


def tool_block(index: int) -> list[ServerSentEvent]:
    block = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    json_delta = {"type": "input_json_delta", "partial_json": '{"city": "Paris"}'}
    return [
        named("content_block_start", index=index, content_block=block),
        named("content_block_delta", index=index, delta=json_delta),
        named("content_block_stop", index=index),
    ]


def message_stream(
    blocks: list[list[ServerSentEvent]],
    *,
    ident: str = "msg_first",
    model: str = "claude-first",
    input_tokens: int = 25,
    output_tokens: int = 9,
    stop: str = "end_turn",
) -> list[ServerSentEvent]:
    """A Messages API stream (API reference "Messages, streaming"), with pings as sent."""
    message = {"id": ident, "type": "message", "role": "assistant", "content": [], "model": model}
    message |= {"stop_reason": None, "stop_sequence": None}
    message["usage"] = {"input_tokens": input_tokens, "output_tokens": 1}
    events = [named("message_start", message=message), named("ping")]
    events += [event for block in blocks for event in block]
    delta = {"stop_reason": stop, "stop_sequence": None}
    events.append(named("message_delta", delta=delta, usage={"output_tokens": output_tokens}))
    return [*events, named("message_stop")]


MESSAGE_EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)


def anthropic_sdk_message(events: list[ServerSentEvent]) -> Any:
    """The message anthropic-python's accumulator makes of ``events`` (each validated as its
    ``RawMessageStreamEvent``; ``build_events`` looks each block up by its index)."""
    snapshot = None
    for event in events:
        if event.event == "ping":
            continue
        raw = MESSAGE_EVENT.validate_json(event.data)
        snapshot = accumulate_event(event=raw, current_snapshot=snapshot, json_bufs={})
        build_events(event=raw, message_snapshot=snapshot)
    return snapshot


def anthropic_text(events: list[ServerSentEvent]) -> str:
    return "".join(
        value["delta"].get("text", "")
        for value in map(json.loads, (e.data for e in events))
        if value["type"] == "content_block_delta"
    )


def kinds(events: list[ServerSentEvent]) -> list[str]:
    return [event.event for event in events]


def indices(events: list[ServerSentEvent]) -> list[tuple[str, int]]:
    values = [json.loads(event.data) for event in events]
    return [(v["type"].split("_")[-1], v["index"]) for v in values if "index" in v]


MESSAGES = {"model": "claude-x", "max_tokens": 100, "messages": [QUESTION], "stream": True}
CONTINUATION = {"ident": "msg_second", "model": "claude-second", "input_tokens": 40}


def test_anthropic_the_client_sees_one_message_from_two_upstreams() -> None:
    first = message_stream([text_block(0, ["Once", " upon", " a", " time"])])
    second = message_stream([text_block(0, [",", " a", " fox."])], output_tokens=3, **CONTINUATION)
    client, body = spliced("anthropic", first, 5, second, MESSAGES)  # after " upon"

    assert body == {
        **MESSAGES,
        "messages": [QUESTION, {"role": "assistant", "content": "Once upon"}],
    }
    assert anthropic_text(client) == "Once upon, a fox."
    assert kinds(client).count("message_start") == 1
    assert kinds(client).count("content_block_start") == 1
    assert indices(client) == [("start", 0)] + [("delta", 0)] * 5 + [("stop", 0)]
    assert kinds(client)[-2:] == ["message_delta", "message_stop"]
    usage = json.loads(client[-2].data)["usage"]
    assert usage == {"output_tokens": 1 + 3, "input_tokens": 25 + 40}
    message = anthropic_sdk_message(client)
    assert message.id == "msg_first" and message.model == "claude-first"
    assert [block.text for block in message.content] == ["Once upon, a fox."]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (65, 4)


def test_anthropic_later_blocks_are_numbered_after_the_delivered_ones() -> None:
    first = message_stream([text_block(0, ["Intro."]), text_block(1, ["Once", " upon"])])
    second = message_stream([text_block(0, [" a time."]), tool_block(1)], stop="tool_use")
    cut = 2 + 3 + 3  # message_start, ping, block 0 whole, block 1 started with "Once"
    client, body = spliced("anthropic", first, cut, second, MESSAGES)

    assert body["messages"][-1] == {"role": "assistant", "content": "Intro.Once upon"}
    assert [i for kind, i in indices(client) if kind == "start"] == [0, 1, 2]
    assert indices(client)[-4:] == [("stop", 1), ("start", 2), ("delta", 2), ("stop", 2)]
    message = anthropic_sdk_message(client)
    assert [block.type for block in message.content] == ["text", "text", "tool_use"]
    assert message.content[1].text == "Once upon a time."
    assert message.content[2].input == {"city": "Paris"}


def test_anthropic_a_failure_between_blocks_continues_with_a_new_block() -> None:
    first = message_stream([text_block(0, ["Once", " upon"])])
    second = message_stream([text_block(0, [" a time."])])
    client, _ = spliced("anthropic", first, 2 + 4, second, MESSAGES)  # block 0 stopped
    assert [i for kind, i in indices(client) if kind == "start"] == [0, 1]
    message = anthropic_sdk_message(client)
    assert [block.text for block in message.content] == ["Once upon", " a time."]


@pytest.mark.parametrize(
    ("delivered", "continuation", "expected"),
    [
        (["Hello", " "], [" world"], "Hello world"),  # the repeated space is the client's
        (["Hello", "\n"], ["\n\n", "World"], "Hello\n\nWorld"),  # only what it repeats
        (["Hello", " \n", "\n"], [" ", "\n", "\nWorld"], "Hello \n\nWorld"),  # over deltas
        (["Hello", "\n\n"], ["World"], "Hello\n\nWorld"),  # nothing repeated
        (["Hello", " "], ["\tWorld"], "Hello \tWorld"),  # another white space: kept
    ],
)
def test_anthropic_the_prefill_has_no_trailing_white_space_and_the_text_is_exact(
    delivered: list[str], continuation: list[str], expected: str
) -> None:
    first = message_stream([text_block(0, [*delivered, "unsent"])])
    second = message_stream([text_block(0, continuation)])
    client, body = spliced("anthropic", first, 3 + len(delivered), second, MESSAGES)
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello"}
    assert anthropic_text(client) == expected
    assert anthropic_sdk_message(client).content[0].text == expected


def test_anthropic_only_white_space_delivered_sends_no_prefill() -> None:
    first = message_stream([text_block(0, ["\n", "Hi"])])
    second = message_stream([text_block(0, ["\nHi there"])])
    client, body = spliced("anthropic", first, 4, second, MESSAGES)
    assert body == MESSAGES
    assert anthropic_text(client) == "\nHi there"


def test_anthropic_the_continuations_error_and_pings_pass_unchanged() -> None:
    splice = Splice(get_dialect("anthropic"))
    for event in message_stream([text_block(0, ["Once"])])[:4]:
        splice.delivered(event)
    splice.continuation_body(MESSAGES)
    error = named("error", error={"type": "overloaded_error", "message": "Overloaded"})
    ping = named("ping")
    assert splice.rewrite(error) is error and splice.rewrite(ping) is ping


@pytest.mark.parametrize(
    "delivered",
    [
        [],
        message_stream([tool_block(0)])[:3],  # a tool_use block started
        message_stream([text_block(0, ["a"]), tool_block(1)])[:8],  # a tool_use delta
        message_stream([text_block(0, ["a"])])[:-1],  # the stop_reason
        message_stream([text_block(0, ["a"])]),  # message_stop
        [
            *message_stream([])[:2],
            named("content_block_start", index=0, content_block={"type": "thinking"}),
        ],
    ],
)
def test_anthropic_what_cannot_be_continued(delivered: list[ServerSentEvent]) -> None:
    splice = Splice(get_dialect("anthropic"))
    for event in delivered:
        splice.delivered(event)
    assert not splice.can_continue


def pieces_of(text: str, data: st.DataObject) -> list[str]:
    """``text`` cut at points hypothesis draws (empty pieces included: a provider may send
    one)."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=4), label="cuts"))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@settings(max_examples=80, deadline=None)
@given(answer=TOKENS, data=st.data())
def test_anthropic_cut_anywhere_and_continued_exactly_reads_as_the_answer(
    answer: list[str], data: st.DataObject
) -> None:
    """The continuing model is perfect: it goes on exactly from the prefill it is sent (in
    other tokens), so the client must get the whole answer back, white space included."""
    first = message_stream([text_block(0, answer)])
    cut = data.draw(st.integers(0, len(first)), label="cut")
    splice = Splice(get_dialect("anthropic"))
    for event in first[:cut]:
        splice.delivered(event)
    assert splice.can_continue == (1 <= cut <= 4 + len(answer))  # up to block 0's stop
    if not splice.can_continue:
        return
    whole = "".join(answer)
    rest = whole[len(splice.text.rstrip()) :]
    second = message_stream([text_block(0, pieces_of(rest, data))], **CONTINUATION)

    client, _ = spliced("anthropic", first, cut, second, MESSAGES)

    assert anthropic_text(client) == whole
    assert kinds(client).count("message_start") == 1
    starts = [i for kind, i in indices(client) if kind == "start"]
    assert starts == list(range(len(starts)))  # 0, and 1 when block 0 had stopped
    stops = [i for kind, i in indices(client) if kind == "stop"]
    assert stops == starts
    message = anthropic_sdk_message(client)
    assert message.id == "msg_first"
    assert "".join(block.text for block in message.content) == whole


# ---------------------------------------------------------------------------- OpenAI Responses API


def response_stream(
    tokens: list[str],
    *,
    ident: str = "resp_first",
    item: str = "msg_first",
    model: str = "gpt-first",
    created: int = 1700000000,
    reasoning: bool = False,
    call: bool = False,
    input_tokens: int = 10,
) -> list[ServerSentEvent]:
    """A Responses API stream (API reference "Responses, streaming events"): an optional
    reasoning item, one message with one output_text part, an optional function call, then
    ``response.completed``; every event valid for the openai SDK's strict validation."""
    text = "".join(tokens)
    response: dict[str, Any] = {"id": ident, "object": "response", "created_at": created}
    response |= {"status": "in_progress", "model": model, "output": [], "error": None}
    response |= {"parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
    response |= {"incomplete_details": None, "usage": None}
    steps: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": response}),
        ("response.in_progress", {"response": response}),
    ]
    done: list[dict[str, Any]] = []
    if reasoning:
        thought = {"id": "rs_" + ident, "type": "reasoning", "summary": []}
        steps.append(("response.output_item.added", {"output_index": 0, "item": thought}))
        steps.append(("response.output_item.done", {"output_index": 0, "item": thought}))
        done.append(thought)
    where = {"item_id": item, "output_index": len(done), "content_index": 0}
    message = {"id": item, "type": "message", "role": "assistant", "status": "in_progress"}
    part = {"type": "output_text", "text": "", "annotations": []}
    done_part = {**part, "text": text}
    done_message = {**message, "status": "completed", "content": [done_part]}
    steps += [
        (
            "response.output_item.added",
            {"output_index": len(done), "item": {**message, "content": []}},
        ),
        ("response.content_part.added", {**where, "part": part}),
        *(
            ("response.output_text.delta", {**where, "delta": token, "logprobs": []})
            for token in tokens
        ),
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": done_part}),
        ("response.output_item.done", {"output_index": len(done), "item": done_message}),
    ]
    done.append(done_message)
    if call:
        function = {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "f"}
        function |= {"arguments": "", "status": "in_progress"}
        ids = {"item_id": "fc_1", "output_index": len(done)}
        finished = {**function, "arguments": "{}", "status": "completed"}
        steps += [
            ("response.output_item.added", {"output_index": len(done), "item": function}),
            ("response.function_call_arguments.delta", {**ids, "delta": "{}"}),
            ("response.function_call_arguments.done", {**ids, "arguments": "{}"}),
            ("response.output_item.done", {"output_index": len(done), "item": finished}),
        ]
        done.append(finished)
    usage = {"input_tokens": input_tokens, "output_tokens": len(tokens)}
    usage |= {"input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}}
    usage |= {"output_tokens_details": {"reasoning_tokens": 0}}
    usage["total_tokens"] = input_tokens + len(tokens)
    completed = {**response, "status": "completed", "output": done, "usage": usage}
    steps.append(("response.completed", {"response": completed}))
    return [named(kind, sequence_number=n, **data) for n, (kind, data) in enumerate(steps)]


RESPONSE_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def responses_sdk_response(events: list[ServerSentEvent]) -> Any:
    """The final response openai-python's ``responses.stream()`` accumulator makes of
    ``events`` (each validated as its ``ResponseStreamEvent``; it refuses a lifecycle event of
    another response id, a duplicate output index, an unfinished item at the end)."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    final = None
    for event in events:
        for out in state.handle_event(RESPONSE_EVENT.validate_json(event.data)):
            if out.type == "response.completed":
                final = out.response
    return final


def values(events: list[ServerSentEvent]) -> list[dict[str, Any]]:
    return [json.loads(event.data) for event in events]


def responses_text(events: list[ServerSentEvent]) -> str:
    return "".join(v["delta"] for v in values(events) if v["type"] == "response.output_text.delta")


RESPONSES = {"model": "gpt-x", "input": "Tell me a story.", "stream": True, "store": False}
NEXT = {"ident": "resp_second", "item": "msg_second", "model": "gpt-second", "created": 1}


def test_responses_the_client_sees_one_response_from_two_upstreams() -> None:
    first = response_stream(["Once", " upon", " a", " time"])
    second = response_stream([",", " a", " fox."], input_tokens=30, **NEXT)
    client, body = spliced("openai-responses", first, 6, second, RESPONSES)  # after " upon"

    assert body["input"] == [
        {"role": "user", "content": "Tell me a story."},
        {"type": "message", "role": "assistant", "content": "Once upon"},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]
    assert {k: v for k, v in body.items() if k != "input"} == {
        k: v for k, v in RESPONSES.items() if k != "input"
    }
    assert responses_text(client) == "Once upon, a fox."
    types = [v["type"] for v in values(client)]
    for once in ("response.created", "response.in_progress", "response.output_item.added"):
        assert types.count(once) == 1, once
    assert types.count("response.content_part.added") == 1
    numbers = [v["sequence_number"] for v in values(client)]
    assert numbers == list(range(len(client)))
    ids = {v["response"]["id"] for v in values(client) if "response" in v}
    assert ids == {"resp_first"}
    assert {v["item_id"] for v in values(client) if "item_id" in v} == {"msg_first"}
    assert {v["output_index"] for v in values(client) if "output_index" in v} == {0}
    done = values(client)[-4]
    assert done["type"] == "response.output_text.done" and done["text"] == "Once upon, a fox."
    response = responses_sdk_response(client)
    assert response.id == "resp_first" and response.model == "gpt-first"
    assert response.output_text == "Once upon, a fox."
    assert [item.id for item in response.output] == ["msg_first"]
    assert response.usage.input_tokens == 30  # the first upstream reported none


def test_responses_a_list_input_is_extended_and_not_mutated() -> None:
    given = [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}]
    body = {**RESPONSES, "input": given}
    first = response_stream(["Hel", "lo"])
    _, continued = spliced("openai-responses", first, 5, [], body, instruction=None)
    assert body["input"] == [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}]
    assert continued["input"] == [
        *given,
        {"type": "message", "role": "assistant", "content": "Hel"},
    ]


def test_responses_reasoning_items_of_either_upstream_keep_their_own_indices() -> None:
    # the first upstream reasoned (item 0) then wrote; the continuation reasons again before
    # it writes: its reasoning is a new item (2), its message goes on in the client's (1)
    first = response_stream(["Once", " upon"], reasoning=True)
    second = response_stream([" a time."], reasoning=True, call=True, **NEXT)
    client, _ = spliced("openai-responses", first, 7, second, RESPONSES)  # after "Once"

    items = [(v["output_index"], v["item"]["type"]) for v in values(client) if "item" in v]
    assert items == [
        (0, "reasoning"),  # added
        (0, "reasoning"),  # done
        (1, "message"),  # added
        (2, "reasoning"),
        (2, "reasoning"),
        (1, "message"),  # done: the continued one
        (3, "function_call"),
        (3, "function_call"),
    ]
    response = responses_sdk_response(client)
    assert [item.type for item in response.output] == [
        "reasoning",
        "message",
        "reasoning",
        "function_call",
    ]
    assert response.output[1].id == "msg_first"
    assert response.output_text == "Once a time."


def test_responses_a_failure_after_the_message_was_done_adds_a_new_message() -> None:
    first = response_stream(["Once", " upon"], call=False)
    second = response_stream([" More."], **NEXT)
    client, _ = spliced("openai-responses", first, 9, second, RESPONSES)  # item 0 done
    response = responses_sdk_response(client)
    assert [item.id for item in response.output] == ["msg_first", "msg_second"]
    assert response.output_text == "Once upon More."


def test_responses_an_attempt_rewritten_but_never_delivered_leaves_no_gap() -> None:
    # the next upstream failed before its first content: its preamble went through rewrite()
    # (held, never delivered); the one after it numbers items and events from the client's
    first = response_stream(["Once", " upon"])
    splice = Splice(get_dialect("openai-responses"))
    for event in first[:5]:
        splice.delivered(event)
    splice.continuation_body(RESPONSES)
    for event in response_stream(["x"], reasoning=True, **NEXT)[:4]:  # reasoning added, done
        splice.rewrite(event)
    splice.continuation_body(RESPONSES)
    client = first[:5]
    for event in response_stream([" upon a time."], reasoning=True, **NEXT):
        out = splice.rewrite(event)
        if out is not None:
            splice.delivered(out)
            client.append(out)
    assert [v["sequence_number"] for v in values(client)] == list(range(len(client)))
    added = [v["output_index"] for v in values(client) if v["type"].endswith("item.added")]
    assert added == [0, 1]
    assert responses_sdk_response(client).output_text == "Once upon a time."


@pytest.mark.parametrize(
    "delivered",
    [
        [],
        response_stream(["a"], call=True)[:-3],  # a function call in flight
        response_stream(["a"], call=True)[:-1],  # a function call delivered
        response_stream(["a"]),  # response.completed
    ],
)
def test_responses_what_cannot_be_continued(delivered: list[ServerSentEvent]) -> None:
    splice = Splice(get_dialect("openai-responses"))
    for event in delivered:
        splice.delivered(event)
    assert not splice.can_continue


@settings(max_examples=60, deadline=None)
@given(first_tokens=TOKENS, second_tokens=TOKENS, reasoning=st.booleans(), data=st.data())
def test_responses_cut_anywhere_and_continued_reads_as_one_response(
    first_tokens: list[str], second_tokens: list[str], reasoning: bool, data: st.DataObject
) -> None:
    first = response_stream(first_tokens, reasoning=reasoning)
    cut = data.draw(st.integers(0, len(first)), label="cut")
    splice = Splice(get_dialect("openai-responses"))
    for event in first[:cut]:
        splice.delivered(event)
    assert splice.can_continue == (1 <= cut < len(first))  # until response.completed
    if not splice.can_continue:
        return
    second = response_stream(second_tokens, reasoning=data.draw(st.booleans()), **NEXT)
    client, _ = spliced("openai-responses", first, cut, second, RESPONSES)

    whole = splice.text + "".join(second_tokens)
    assert responses_text(client) == whole
    types = [v["type"] for v in values(client)]
    assert types.count("response.created") == 1 and types[-1] == "response.completed"
    numbers = [v["sequence_number"] for v in values(client)]
    assert numbers == sorted(set(numbers))  # strictly increasing
    assert {v["response"]["id"] for v in values(client) if "response" in v} == {"resp_first"}
    added = [v["output_index"] for v in values(client) if v["type"].endswith("item.added")]
    assert added == list(range(len(added)))
    response = responses_sdk_response(client)
    assert response.id == "resp_first"
    assert response.output_text == whole


# ------------------------------------------------------------------ several continuations in a row


def chained(
    dialect: str, parts: list[tuple[list[ServerSentEvent], int]], body: dict[str, Any]
) -> tuple[list[ServerSentEvent], list[dict[str, Any]]]:
    """Each upstream of ``parts`` sends its first ``cut`` events then fails, the next one
    continues (the budget of several continuations): the client's events, the bodies sent."""
    splice = Splice(get_dialect(dialect))
    client, bodies = [], []
    for number, (events, cut) in enumerate(parts):
        if number:
            assert splice.can_continue
            bodies.append(splice.continuation_body(body))
        for event in events[:cut]:
            out = splice.rewrite(event) if number else event
            if out is not None:
                splice.delivered(out)
                client.append(out)
    return client, bodies


def test_chat_a_continuation_can_itself_be_continued() -> None:
    third = {"ident": "chatcmpl-third", "model": "gpt-third", "created": 3}
    parts = [
        (chat_stream(["Once", " upon"]), 3),
        (chat_stream([" a", " time", " long"], **SECOND), 3),
        (chat_stream([" ago."], usage=chat_usage(30, 1), **third), 99),
    ]
    client, bodies = chained("openai", parts, {"messages": [QUESTION]})
    assert [b["messages"][1]["content"] for b in bodies] == ["Once upon", "Once upon a time"]
    assert chat_text(client) == "Once upon a time ago." and roles(client) == 1
    assert {c["id"] for c in chunks(client)} == {"chatcmpl-first"}
    assert chat_sdk_message(client).choices[0].message.content == "Once upon a time ago."


def test_anthropic_a_continuation_can_itself_be_continued() -> None:
    parts = [
        (message_stream([text_block(0, ["Once", " upon "])]), 5),
        (message_stream([text_block(0, ["a", " time "])], **CONTINUATION), 5),
        (message_stream([text_block(0, ["ago."])], ident="msg_third", input_tokens=50), 99),
    ]
    client, bodies = chained("anthropic", parts, MESSAGES)
    assert [b["messages"][-1]["content"] for b in bodies] == ["Once upon", "Once upon a time"]
    assert anthropic_text(client) == "Once upon a time ago."
    assert kinds(client).count("message_start") == 1
    assert {i for _, i in indices(client)} == {0}
    message = anthropic_sdk_message(client)
    assert [block.text for block in message.content] == ["Once upon a time ago."]
    assert message.usage.input_tokens == 25 + 40 + 50  # each upstream's prompt counted


def test_responses_a_continuation_can_itself_be_continued() -> None:
    parts = [
        (response_stream(["Once", " upon"]), 6),
        (response_stream([" a", " time"], **NEXT), 6),
        (response_stream([" ago."], ident="resp_third", item="msg_third"), 99),
    ]
    client, bodies = chained("openai-responses", parts, RESPONSES)
    assert [b["input"][1]["content"] for b in bodies] == ["Once upon", "Once upon a time"]
    assert responses_text(client) == "Once upon a time ago."
    numbers = [v["sequence_number"] for v in values(client)]
    assert numbers == list(range(len(client)))
    response = responses_sdk_response(client)
    assert response.id == "resp_first" and [item.id for item in response.output] == ["msg_first"]
    assert response.output_text == "Once upon a time ago."
