"""Incremental parsing of server-sent events, as LM Studio and llama.cpp send them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DONE = "[DONE]"


@dataclass
class SSEEvent:
    """One dispatched event: its ``data`` lines joined, and its ``event`` name."""

    data: str
    event: str | None = None
    _parsed: Any = field(default=None, repr=False)

    @property
    def is_done(self) -> bool:
        return self.data.strip() == DONE

    def json(self) -> Any:
        """The data parsed as JSON (cached); raises ValueError when it is not."""
        if self._parsed is None:
            self._parsed = json.loads(self.data)
        return self._parsed


class SSEParser:
    """Turn bytes, in whatever pieces they arrive, into complete events.

    Follows the WHATWG rules that matter here: lines end with LF, CRLF or CR;
    a blank line dispatches; ``:`` lines are comments; ``data`` lines accumulate.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add bytes; return the events they complete."""
        self._buffer += chunk
        events = []
        while True:
            line, separator, rest = self._split_line(self._buffer)
            if separator is None:
                break
            self._buffer = rest
            event = self._take_line(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    def flush(self) -> list[SSEEvent]:
        """Dispatch what is left when the stream ends without a final blank line."""
        events = []
        if self._buffer:
            line, self._buffer = self._buffer, b""
            self._take_line(line.decode("utf-8", errors="replace"))
        event = self._take_line("")
        if event is not None:
            events.append(event)
        return events

    @staticmethod
    def _split_line(buffer: bytes) -> tuple[bytes, bytes | None, bytes]:
        """Return ``(line, separator, rest)``; separator None: no full line yet."""
        lf = buffer.find(b"\n")
        cr = buffer.find(b"\r")
        if cr == -1 or (lf != -1 and lf < cr):
            if lf == -1:
                return buffer, None, b""
            return buffer[:lf], b"\n", buffer[lf + 1 :]
        if cr + 1 == len(buffer):
            return buffer, None, b""  # the next byte may be the LF of a CRLF
        end = cr + 2 if buffer[cr + 1 : cr + 2] == b"\n" else cr + 1
        return buffer[:cr], b"\r", buffer[end:]

    def _take_line(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data:
                self._event = None
                return None
            event = SSEEvent("\n".join(self._data), self._event)
            self._data, self._event = [], None
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None
