"""Server-sent events in tests: frame them, split them, read them as they come."""

from __future__ import annotations

import json
import time
from typing import Any

import requests


def frame(data: Any, event: str | None = None) -> bytes:
    """One event's bytes; ``data`` is JSON-encoded unless a string."""
    text = data if isinstance(data, str) else json.dumps(data)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {text}\n\n".encode()


def split_events(buffer: bytes) -> tuple[list[str], bytes]:
    """The complete events at the start of ``buffer``, and what is left."""
    events = []
    while b"\n\n" in buffer:
        event, buffer = buffer.split(b"\n\n", 1)
        events.append(event.decode())
    return events, buffer


def events_of(text: str) -> list[str]:
    """The events of a whole SSE body, as text (comments included)."""
    return [event for event in text.split("\n\n") if event]


def data(event: str) -> str:
    """The payload of an event's first ``data:`` line."""
    return event.split("data: ", 1)[1]


def data_of(events: list[tuple[float, str]]) -> list[str]:
    """The payloads of timed events (see :func:`read_events`) that carry data."""
    return [data(event) for _, event in events if "data: " in event]


def read_until_closed(response: requests.Response) -> list[tuple[float, str]]:
    """Every event until the server closes: [(monotonic arrival, event), ...]."""
    events, buffer = [], b""
    while chunk := response.raw.read1(65536):
        complete, buffer = split_events(buffer + chunk)
        events += [(time.monotonic(), event) for event in complete]
    return events


def read_events(url, body, *, stop_after=None):
    """POST and read the SSE answer as it arrives: [(seconds, raw_event), ...]."""
    started = time.monotonic()
    events = []
    with requests.post(url, json=body, stream=True, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        buffer = b""
        while True:
            chunk = response.raw.read1(65536)
            if not chunk:
                break
            complete, buffer = split_events(buffer + chunk)
            events += [(time.monotonic() - started, event) for event in complete]
            if stop_after and len(events) >= stop_after:
                break
    return events
