"""sanic-streamplus: streaming POST endpoints for Sanic that relay a Server-Sent Events stream.

The public API::

    StreamPlus          the sanic-ext extension: app.extend(extensions=[StreamPlus])
    stream_post         the decorator for streaming POST handlers
    upstream_events     stream the events of an upstream request on the shared httpx client
    ServerSentEvent     one event; SSEDecoder / encode / encode_comment: the sans-IO codec
    EventStore          the event store of resumable streams: MemoryEventStore, RedisEventStore
    StreamInfo          what a finished stream did, for on_finish hooks; before_final_frame
    errors              StreamPlusError and its subclasses (sanic_streamplus.errors has them all)

The names are imported when first used (PEP 562), so ``import sanic_streamplus.sse`` (the codec)
or ``sanic_streamplus.errors`` loads nothing of Sanic, sanic-ext, httpx or aiohttp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .decorators import stream_post
    from .errors import (
        EventTooLarge,
        ExtensionMissing,
        InvalidRequest,
        StreamPlusError,
        UpstreamBadResponse,
        UpstreamDisconnected,
        UpstreamError,
        UpstreamStatusError,
        UpstreamTimeout,
        UpstreamUnreachable,
    )
    from .extension import StreamPlus
    from .observe import StreamInfo, before_final_frame
    from .sse import ServerSentEvent, SSEDecoder, encode, encode_comment
    from .store import EventStore, MemoryEventStore, RedisEventStore
    from .upstream import stream_events, upstream_events

__version__ = "0.1.0"

_MODULE_OF = {
    "stream_post": "decorators",
    "StreamPlus": "extension",
    "StreamInfo": "observe",
    "before_final_frame": "observe",
    "ServerSentEvent": "sse",
    "SSEDecoder": "sse",
    "encode": "sse",
    "encode_comment": "sse",
    "EventStore": "store",
    "MemoryEventStore": "store",
    "RedisEventStore": "store",
    "stream_events": "upstream",
    "upstream_events": "upstream",
    **dict.fromkeys(
        [
            "EventTooLarge",
            "ExtensionMissing",
            "InvalidRequest",
            "StreamPlusError",
            "UpstreamBadResponse",
            "UpstreamDisconnected",
            "UpstreamError",
            "UpstreamStatusError",
            "UpstreamTimeout",
            "UpstreamUnreachable",
        ],
        "errors",
    ),
}

__all__ = [
    "EventStore",
    "EventTooLarge",
    "ExtensionMissing",
    "InvalidRequest",
    "MemoryEventStore",
    "RedisEventStore",
    "SSEDecoder",
    "ServerSentEvent",
    "StreamInfo",
    "StreamPlus",
    "StreamPlusError",
    "UpstreamBadResponse",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "before_final_frame",
    "encode",
    "encode_comment",
    "stream_events",
    "stream_post",
    "upstream_events",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562).

    Raises:
        AttributeError: ``name`` is not part of the public API.
    """
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
