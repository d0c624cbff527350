"""Lifecycle hooks and observability: ``on_finish`` hooks (and ``before_final_frame`` ones),
Sanic signals, Prometheus metrics and OpenTelemetry spans, over a real server and upstream."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import app_name, completions_body
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client.parser import text_string_to_metric_families
from sanic import Request, Sanic

from sanic_streamplus import ServerSentEvent, StreamPlus, stream_post, upstream_events
from sanic_streamplus.config import Settings
from sanic_streamplus.machine import Outcome
from sanic_streamplus.observe import StreamInfo, before_final_frame
from sanic_streamplus.testing import FakeUpstream, serve_app

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


class Finished:
    """Records the ``StreamInfo`` of every finished stream; :meth:`wait` for the next ones."""

    def __init__(self) -> None:
        self.infos: list[StreamInfo] = []
        self.arrived = asyncio.Event()

    def __call__(self, info: StreamInfo) -> None:
        self.infos.append(info)
        self.arrived.set()

    async def wait(self, count: int = 1, timeout: float = 5) -> list[StreamInfo]:
        async with asyncio.timeout(timeout):
            while len(self.infos) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.infos


def observed_app(upstream_url: str, finished: Finished | None = None, **config: Any) -> Sanic:
    """``/s`` relays the upstream (openai dialect); ``/usage`` yields chunks that end with a
    usage block; ``/bug`` fails before its first event; ``/r`` is resumable."""
    app: Sanic[Any, Any] = Sanic(app_name("observe"))
    app.config.STREAMPLUS_UPSTREAM_URL = upstream_url
    for key, value in config.items():
        app.config[key] = value
    app.extend(extensions=[StreamPlus])
    hooks = [finished] if finished is not None else []

    @app.post("/s")
    @stream_post(dialect="openai", on_finish=hooks)
    async def relayed(request: Request) -> Any:
        return upstream_events(request, "/chat/completions", json=request.json)

    @app.post("/r")
    @stream_post(dialect="openai", resumable=True, on_finish=hooks)
    async def resumable(request: Request) -> Any:
        return upstream_events(request, "/chat/completions", json=request.json)

    @app.post("/usage")
    @stream_post(dialect="openai", on_finish=hooks)
    async def with_usage(request: Request) -> AsyncIterator[Any]:
        for text in ("a", "b", "c"):
            yield chunk({"choices": [{"index": 0, "delta": {"content": text}}]})
        yield chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        yield chunk({"choices": [], "usage": USAGE})  # complete: a finish_reason went by

    @app.post("/bug")
    @stream_post(on_finish=hooks)
    async def bug(request: Request) -> AsyncIterator[Any]:
        raise RuntimeError("a bug in the handler")
        yield  # an async generator

    return app


async def one_stream(
    app: Sanic, finished: Finished, path: str, body: Any
) -> tuple[httpx.Response, StreamInfo]:
    """Serve ``app``, POST ``body`` to ``path``, and return the answer and the stream's info."""
    async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
        response = await client.post(url + path, json=body)
        [info] = await finished.wait()
    return response, info


def chunk(fields: dict[str, Any]) -> ServerSentEvent:
    body = {"id": "c1", "object": "chat.completion.chunk", "model": "fake", **fields}
    return ServerSentEvent(json.dumps(body))


async def test_on_finish_reports_a_completed_stream_and_its_stats() -> None:
    finished, everywhere = Finished(), Finished()
    order: list[int] = []
    async with FakeUpstream(tokens=5, delay=0.01) as upstream:
        app = observed_app(upstream.url, finished)
        app.ctx.streamplus.on_finish(lambda info: order.append(len(finished.infos)))
        app.ctx.streamplus.on_finish(everywhere)
        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            response = await client.post(url + "/s", json=completions_body())
            [info] = await finished.wait()
            await everywhere.wait()
    body = response.text
    assert body.endswith("data: [DONE]\n\n")
    assert everywhere.infos[0] is info  # one StreamInfo per stream, for every hook
    assert info.outcome == "completed" and info.error is None and info.status == 200
    assert info.route.endswith(".relayed") and info.method == "POST" and info.path == "/s"
    assert (info.format, info.dialect, info.stream_id) == ("sse", "openai", None)
    assert info.events == body.count("data: ") - 1  # every event but the [DONE] marker
    assert info.bytes == len(body.encode())
    assert info.time_to_first_byte is not None and info.time_to_first_event is not None
    assert 0 < info.time_to_first_event <= info.duration < 5
    assert 0 < info.time_to_first_byte <= info.duration
    assert info.usage is None  # this upstream sent no usage block
    assert order == [1]  # the route's hook ran before the app-wide ones


async def test_the_usage_block_of_the_upstream_is_reported() -> None:
    finished = Finished()
    app = observed_app("http://127.0.0.1:9", finished)
    response, info = await one_stream(app, finished, "/usage", {})
    assert response.text.endswith("data: [DONE]\n\n")
    assert info.usage == USAGE
    assert info.events == 5


async def read_some(lines: AsyncIterator[str], events: int) -> None:
    """Read ``lines`` of a stream until ``events`` data lines went by."""
    seen = 0
    async for line in lines:
        seen += line.startswith("data: ")
        if seen >= events:
            return


@pytest.mark.parametrize(
    ("knobs", "config", "outcome", "error", "status"),
    [
        ({"fail_after": 3}, {}, "upstream_error", "upstream_disconnected", 200),
        ({"error_status": 503}, {}, "upstream_error", "upstream_status", 502),
        (
            {"stall_after": 2, "stall": 30},
            {"STREAMPLUS_IDLE_TIMEOUT": 0.3},
            "timeout",
            "idle_timeout",
            200,
        ),
        (
            {"stall": 30},
            {"STREAMPLUS_FIRST_EVENT_TIMEOUT": 0.3},
            "timeout",
            "first_event_timeout",
            504,
        ),
        ({"finish_reason": False, "done": False}, {}, "upstream_truncated", None, 200),
        ({"error_event_after": 3}, {}, "upstream_error", "upstream_error", 200),
        ({"error_status": 429}, {}, "rate_limited", "rate_limited", 429),
        ({"error_status": 401}, {}, "upstream_error", "upstream_status", 401),
    ],
    ids=["mid-stream", "refused", "idle", "first-event", "truncated", "in-band", "429", "401"],
)
async def test_each_failure_has_its_outcome_in_stream_info_and_the_log(
    knobs: dict[str, Any],
    config: dict[str, Any],
    outcome: str,
    error: str | None,
    status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "sanic_streamplus")
    finished = Finished()
    config.setdefault("STREAMPLUS_HEARTBEAT", 0)
    error = error or outcome
    async with FakeUpstream(tokens=50, delay=0.01, **knobs) as upstream:
        app = observed_app(upstream.url, finished, **config)
        response, info = await one_stream(app, finished, "/s", completions_body())
    assert response.status_code == status
    assert (info.outcome, info.error, info.status) == (outcome, error, status)
    assert isinstance(info.outcome, Outcome)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stream POST")]
    assert f" outcome={outcome} error={error} status={status} " in line


async def test_a_bug_in_the_handler_is_an_internal_error_outcome() -> None:
    finished = Finished()
    app = observed_app("http://127.0.0.1:9", finished)
    response, info = await one_stream(app, finished, "/bug", {})
    assert response.status_code == 500
    assert (info.outcome, info.error, info.status, info.events) == (
        "internal_error",
        "internal_error",
        500,
        0,
    )


async def test_a_client_that_leaves_is_reported_and_its_hooks_still_run() -> None:
    finished, early = Finished(), Finished()
    async with FakeUpstream(tokens=1000, delay=0.01) as upstream:
        app = observed_app(upstream.url, finished)
        app.ctx.streamplus.on_finish(before_final_frame(early))
        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            request = client.build_request("POST", url + "/s", json=completions_body())
            response = await client.send(request, stream=True)
            await read_some(response.aiter_lines(), 3)
            await response.aclose()
            [info] = await finished.wait()
            await early.wait()
    assert info.outcome == "client_disconnected" and info.error is None
    assert info.status == 200  # it was committed
    assert 3 <= info.events < 1000


async def test_shutdown_and_cancel_have_their_outcomes() -> None:
    finished = Finished()
    async with FakeUpstream(tokens=1000, delay=0.01) as upstream:
        app = observed_app(upstream.url, finished)
        async with httpx.AsyncClient(timeout=10) as client:
            async with serve_app(app) as url:
                resumable = await client.send(
                    client.build_request("POST", url + "/r", json=completions_body()),
                    stream=True,
                )
                reader = resumable.aiter_lines()  # kept: a dropped iterator closes the response
                await read_some(reader, 2)
                stream_id = resumable.headers["x-stream-id"]
                cancel = await client.delete(f"{url}/streams/{stream_id}")
                assert cancel.status_code == 202
                after_cancel = [line async for line in reader]
                [cancelled] = await finished.wait()
                running = await client.send(
                    client.build_request("POST", url + "/s", json=completions_body()),
                    stream=True,
                )
                lines = running.aiter_lines()
                await read_some(lines, 2)
            rest = [line async for line in lines]
            infos = await finished.wait(2)
    assert (cancelled.outcome, cancelled.error) == ("cancelled", "cancelled")
    assert cancelled.stream_id == stream_id
    assert '"type":"cancelled"' in "".join(after_cancel)
    assert (infos[1].outcome, infos[1].error) == ("shutdown", "shutdown")
    assert '"type":"shutdown"' in "".join(rest)  # the client got the shutdown frame


async def test_a_before_final_frame_hook_runs_before_the_terminating_frame() -> None:
    release, hooked = asyncio.Event(), asyncio.Event()
    seen: list[StreamInfo] = []
    written: list[int] = []

    @before_final_frame
    async def bill(info: StreamInfo) -> None:
        seen.append(info)
        written.append(info.bytes)  # as it stands now (the object is updated at the end)
        hooked.set()
        await release.wait()

    async with FakeUpstream(tokens=5, delay=0.01) as upstream:
        app = observed_app(upstream.url)
        app.ctx.streamplus.on_finish(bill)
        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            request = client.build_request("POST", url + "/s", json=completions_body())
            response = await client.send(request, stream=True)
            received = bytearray()

            async def read() -> None:
                async for data in response.aiter_raw():
                    received.extend(data)

            reading = asyncio.ensure_future(read())
            await asyncio.wait_for(hooked.wait(), 5)  # the events went; the hook holds the end
            await asyncio.sleep(0.3)
            held = bytes(received)
            release.set()
            await asyncio.wait_for(reading, 5)
    assert seen[0].outcome == "completed"
    assert held.count(b"data: ") == seen[0].events  # every event, but not the [DONE]
    assert b"[DONE]" not in held
    assert received.endswith(b"data: [DONE]\n\n")
    assert written == [len(held)]  # the final frame was not written yet
    assert seen[0].bytes == len(received)  # the same object, updated once the stream ended


async def test_a_before_final_frame_hook_runs_before_a_json_error_answer() -> None:
    statuses: list[int] = []

    @before_final_frame
    async def slow(info: StreamInfo) -> None:
        await asyncio.sleep(0.3)  # long enough that an answer not waiting for it comes first
        statuses.append(info.status)

    async with FakeUpstream(error_status=429, retry_after="3") as upstream:
        app = observed_app(upstream.url)
        app.ctx.streamplus.on_finish(slow)
        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            response = await client.post(url + "/s", json=completions_body())
            when_answered = list(statuses)
    assert response.status_code == 429
    assert when_answered == [429]  # it had run by the time the answer came


async def test_sanic_signals_tell_a_stream_start_and_finish() -> None:
    events: list[tuple[str, StreamInfo]] = []
    done = asyncio.Event()
    async with FakeUpstream(tokens=3, delay=0.01) as upstream:
        app = observed_app(upstream.url)

        @app.signal("streamplus.stream.start")
        async def started(stream_info: StreamInfo) -> None:
            events.append(("start", stream_info))

        @app.signal("streamplus.stream.finish")
        async def finished(stream_info: StreamInfo) -> None:
            events.append(("finish", stream_info))
            done.set()

        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            await client.post(url + "/s", json=completions_body())
            await asyncio.wait_for(done.wait(), 5)
    assert [name for name, _ in events] == ["start", "finish"]
    assert events[0][1] is events[1][1]
    assert events[1][1].outcome == "completed"


def samples(text: str, route: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of ``route`` in a Prometheus text exposition, by name and other labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("route", None) == route:
                found[sample.name, tuple(sorted(labels.items()))] = sample.value
    return found


async def test_prometheus_metrics_count_streams_by_outcome_on_the_chosen_route() -> None:
    finished = Finished()
    async with FakeUpstream(tokens=5, delay=0.01) as upstream:
        app = observed_app(
            upstream.url,
            finished,
            STREAMPLUS_METRICS="true",
            STREAMPLUS_METRICS_PATH="/ops/metrics",
        )
        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            for _ in range(3):
                await client.post(url + "/s", json=completions_body())
            await client.post(url + "/s", json=completions_body(fail_after=3))
            infos = await finished.wait(4)
            scraped = await client.get(url + "/ops/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    found = samples(scraped.text, infos[0].route)
    assert found["streamplus_streams_total", (("outcome", "completed"),)] == 3
    assert found["streamplus_streams_total", (("outcome", "upstream_error"),)] == 1
    assert found["streamplus_stream_duration_seconds_count", ()] == 4
    assert found["streamplus_time_to_first_byte_seconds_count", ()] == 4
    gaps = sum(info.events - 1 for info in infos)
    assert found["streamplus_inter_event_gap_seconds_count", ()] >= gaps
    assert found["streamplus_events_total", ()] == sum(info.events for info in infos)
    assert found["streamplus_bytes_total", ()] == sum(info.bytes for info in infos)
    assert found["streamplus_streams_open", ()] == 0


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """The process's OpenTelemetry SDK, exporting into memory (set once: OTel allows one)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another test set a tracer provider first"
    return exporter


async def test_an_opentelemetry_span_per_stream_under_the_callers_trace(
    spans: InMemorySpanExporter,
) -> None:
    finished = Finished()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = f"00-{trace_id}-00f067aa0ba902b7-01"
    async with FakeUpstream(tokens=3, delay=0.01) as upstream:
        app = observed_app(upstream.url, finished, STREAMPLUS_OTEL=True)
        async with serve_app(app) as url, httpx.AsyncClient(timeout=10) as client:
            await client.post(url + "/usage", json={}, headers={"traceparent": parent})
            await client.post(url + "/s", json=completions_body(fail_after=2))
            await finished.wait(2)
    ours = [span for span in spans.get_finished_spans() if span.name.startswith("stream ")]
    ok, failed = ours[-2:]
    assert format(ok.context.trace_id, "032x") == trace_id
    assert ok.parent is not None and format(ok.parent.span_id, "016x") == "00f067aa0ba902b7"
    attributes = dict(ok.attributes or {})
    assert attributes["streamplus.outcome"] == "completed"
    assert attributes["streamplus.events"] == 5
    assert attributes["gen_ai.usage.input_tokens"] == 7
    assert attributes["gen_ai.usage.output_tokens"] == 3
    assert [event.name for event in ok.events] == ["first_event"]
    assert ok.status.status_code is StatusCode.UNSET
    assert dict(failed.attributes or {})["streamplus.outcome"] == "upstream_error"
    assert failed.status.status_code is StatusCode.ERROR
    assert format(failed.context.trace_id, "032x") != trace_id  # no traceparent: a new trace


def test_observability_switches_are_checked_at_startup() -> None:
    assert Settings.from_config({"STREAMPLUS_METRICS": "on", "STREAMPLUS_OTEL": "0"}).metrics
    with pytest.raises(ValueError, match="STREAMPLUS_METRICS"):
        Settings.from_config({"STREAMPLUS_METRICS": "perhaps"})
