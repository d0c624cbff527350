"""Settings: the ``STREAMPLUS_*`` keys of ``app.config``, their defaults, and their parsing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .sse import DEFAULT_MAX_EVENT_SIZE

__all__ = ["FORMATS", "TRANSPORTS", "Settings"]

FORMATS = ("sse", "ndjson", "text")
TRANSPORTS = ("aiohttp", "httpcore")


def _seconds(value: Any) -> float | None:
    """A duration in seconds; None, 0 or a negative number means "no limit"."""
    if value is None or value == "":
        return None
    seconds = float(value)
    return seconds if seconds > 0 else None


@dataclass(frozen=True)
class Settings:
    """Every setting of the extension, read from ``app.config`` keys ``STREAMPLUS_<NAME>``.

    Durations are in seconds (float; None or 0 disables the limit), sizes in bytes (int).

    Attributes:
        upstream_url: base URL of the upstream the shared client talks to (str), or None.
        upstream_api_key: sent upstream as ``Authorization: Bearer <key>`` when set.
        connect_timeout: connecting to the upstream.
        first_event_timeout: from sending the upstream request to its first event.
        idle_timeout: from asking for the next upstream event to receiving it.
        total_timeout: a whole upstream stream.
        heartbeat: interval of heartbeat comments while the stream is idle; kept below half of
            Sanic's ``RESPONSE_TIMEOUT``, which cuts a stream that writes nothing for that long.
        high_water_mark: the client transport's write-buffer high-water mark in bytes, and the
            most bytes queued for one write; the next upstream read waits until they drain.
        max_event_size: largest upstream event accepted, in bytes.
        max_connections: size of the shared client's connection pool.
        format: default output format: ``sse``, ``ndjson`` or ``text``.
        dialect: default dialect for termination and error frames: ``plain`` or ``openai``.
        transport: what carries the shared ``httpx.AsyncClient``'s requests: ``aiohttp``
            (httpx-aiohttp's ``AiohttpTransport``, the default: about a fifth of the CPU per
            upstream read, see docs/benchmarks.md) or ``httpcore`` (httpx's stock transport).
            The client's API, timeouts and errors are httpx's either way.
    """

    upstream_url: str | None = None
    upstream_api_key: str | None = None
    connect_timeout: float | None = 10.0
    first_event_timeout: float | None = 120.0
    idle_timeout: float | None = 60.0
    total_timeout: float | None = 1800.0
    heartbeat: float | None = 15.0
    high_water_mark: int = 64 * 1024
    max_event_size: int = DEFAULT_MAX_EVENT_SIZE
    max_connections: int = 1000
    format: str = "sse"
    dialect: str = "plain"
    transport: str = "aiohttp"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        """Read ``STREAMPLUS_*`` keys from a Sanic ``app.config`` (any mapping).

        Raises:
            ValueError: a value has the wrong type or is out of range; the message names the key.
        """
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = f"STREAMPLUS_{field.name.upper()}"
            if key not in config:
                continue
            raw = config[key]
            try:
                if field.name.endswith("timeout") or field.name == "heartbeat":
                    values[field.name] = _seconds(raw)
                elif field.name in ("high_water_mark", "max_event_size", "max_connections"):
                    values[field.name] = int(raw)
                    if values[field.name] <= 0:
                        raise ValueError("must be positive")
                else:
                    values[field.name] = None if raw in (None, "") else str(raw)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{key}={raw!r}: {exc}") from None
        settings = cls(**values)
        if settings.format not in FORMATS:
            raise ValueError(f"STREAMPLUS_FORMAT must be one of {FORMATS}, not {settings.format!r}")
        if settings.transport not in TRANSPORTS:
            raise ValueError(
                f"STREAMPLUS_TRANSPORT must be one of {TRANSPORTS}, not {settings.transport!r}"
            )
        return settings
