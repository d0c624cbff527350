"""sanic-streamplus: streaming POST endpoints for Sanic that relay a Server-Sent Events stream.

The public API::

    StreamPlus          the sanic-ext extension: app.extend(extensions=[StreamPlus])
    stream_post         the decorator for streaming POST handlers
    upstream_events     stream the events of an upstream request on the shared httpx client
    ServerSentEvent     one event; SSEDecoder / encode / encode_comment: the sans-IO codec
    EventStore          the event store of resumable streams: MemoryEventStore, RedisEventStore
    StreamInfo          what a finished stream did, for on_finish hooks; before_final_frame
    errors              StreamPlusError and its subclasses (sanic_streamplus.errors has them all)
"""

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
