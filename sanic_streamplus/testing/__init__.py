"""The test kit: a fake OpenAI-compatible upstream whose faults follow an ordered plan, a real
server for an app, and a raw-socket streaming client.

Modules, one job each (every public name is importable from ``sanic_streamplus.testing``):

- :mod:`~sanic_streamplus.testing.upstream`: :class:`FakeUpstream`, a real HTTP/1.1 server on
  127.0.0.1 (h11 framing) that answers ``POST .../chat/completions`` with an OpenAI-style
  ``chat.completion.chunk`` event stream and records each request (:class:`UpstreamRequest`);
  ``GET .../models`` lists its one model, ``fake-model``.
- :mod:`~sanic_streamplus.testing.model`: :class:`FakeModel`, what the stream is (its tokens,
  their encoding, its blocks: ``frames()``), and the old fault knobs, translated into a plan.
- :mod:`~sanic_streamplus.testing.faults`: :class:`FaultPlan`, what happens on the wire, step by
  step in stream order: ``FaultPlan().events(3).stall(1.0).reset()``.
- :mod:`~sanic_streamplus.testing.client`: :func:`stream_request` and :class:`StreamResult`, a
  client that reads slowly, stops reading or vanishes on purpose, and reports how it ended.
- :mod:`~sanic_streamplus.testing.servers`: :func:`serve_app`, a Sanic app on 127.0.0.1 port 0.

A plan is given to the fake as ``FakeUpstream(plan=...)``, or per request in the JSON body,
``{"fake": {"plan": plan.to_json()}}``; the per-request ``"fake"`` object also takes the model's
content settings (``tokens``, ``delay``, ``line_ending``, ...) and, for compatibility, the old
fault knobs (``fail_after``, ``stall``, ``error_status``, ...; ``FAULT_KNOBS``).
"""

from .client import StreamResult, stream_request
from .faults import (
    Block,
    Close,
    Comments,
    ErrorEvent,
    Events,
    FaultPlan,
    Hang,
    Headers,
    Hold,
    LongLine,
    OversizedEvent,
    PartialEvent,
    Reset,
    Stall,
    Status,
    Step,
    Truncate,
)
from .model import (
    ERROR_EVENT,
    FAKE_USAGE,
    FAULT_KNOBS,
    MALFORMED_BYTES,
    MALFORMED_TOKEN,
    U2028_TOKEN,
    FakeModel,
    fake_tokens,
    text_tokens,
)
from .servers import serve_app
from .upstream import FakeUpstream, UpstreamRequest

__all__ = [
    "ERROR_EVENT",
    "FAKE_USAGE",
    "FAULT_KNOBS",
    "MALFORMED_BYTES",
    "MALFORMED_TOKEN",
    "U2028_TOKEN",
    "Block",
    "Close",
    "Comments",
    "ErrorEvent",
    "Events",
    "FakeModel",
    "FakeUpstream",
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
    "StreamResult",
    "Truncate",
    "UpstreamRequest",
    "fake_tokens",
    "serve_app",
    "stream_request",
    "text_tokens",
]
