"""Incremental parsing of server-sent events, as LM Studio and llama.cpp send them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

DONE = "[DONE]"
#: One line ending: CRLF, LF or CR (a CR alone at the end of a piece may still be
#: the first half of a CRLF: see ``SSEParser._after_cr``).
_LINE_END = re.compile(rb"\r\n?|\n")


class SSELineTooLongError(ValueError):
    """A line, or an event's data, is longer than the parser accepts."""


@dataclass
class SSEEvent:
    """One dispatched event: its ``data`` lines joined, its ``event`` and ``id``."""

    data: str
    event: str | None = None
    id: str | None = None
    _parsed: Any = field(default=None, repr=False)

    @property
    def is_done(self) -> bool:
        return self.data.strip() == DONE

    def encode(self) -> bytes:
        """The event framed again as it came: name, id, and each ``data`` line.

        Comments and ``retry`` lines are not kept; a relay sends its own
        keep-alives.
        """
        if self.event is None and self.id is None and "\n" not in self.data:
            return b"data: " + self.data.encode() + b"\n\n"  # nearly every chunk
        lines = [f"event: {self.event}"] if self.event is not None else []
        if self.id is not None:
            lines.append(f"id: {self.id}")
        lines.extend(f"data: {line}" for line in self.data.split("\n"))
        return ("\n".join(lines) + "\n\n").encode()

    def json(self) -> Any:
        """The data parsed as JSON (cached); raises ValueError when it is not."""
        if self._parsed is None:
            try:
                self._parsed = json.loads(self.data)
            except RecursionError as err:  # nested too deep: not JSON we can use
                raise ValueError("JSON nested too deep") from err
        return self._parsed


class SSEParser:
    """Turn bytes, in whatever pieces they arrive, into complete events.

    Follows the WHATWG rules that matter here: lines end with LF, CRLF or CR;
    a blank line dispatches; ``:`` lines are comments; ``data`` lines accumulate.

    Linear in the bytes fed: each byte is searched for a line ending once, and
    an unfinished line is kept as a list of pieces joined once it ends (never
    re-copied or re-searched as more of it arrives). ``max_line_bytes`` bounds
    one line and one event's data: past it :class:`SSELineTooLongError`.
    """

    def __init__(self, max_line_bytes: int | None = None) -> None:
        self.max_line_bytes = max_line_bytes
        self._pieces: list[bytes] = []  # the unfinished line
        self._pending = 0  # its length
        self._after_cr = False  # the last line ended with a CR: skip one LF
        self._data: list[str] = []
        self._data_size = 0
        self._event: str | None = None
        self._id: str | None = None
        #: Bytes searched or copied so far: a measure of the work done, which
        #: stays proportional to the bytes fed (tests and the bench read it).
        self.work = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add bytes; return the events they complete."""
        events: list[SSEEvent] = []
        start, end = 0, len(chunk)
        if self._after_cr and end:
            self._after_cr = False
            if chunk[0] == 0x0A:  # the LF of a CRLF split between two pieces
                start = 1
        while start < end:
            match = _LINE_END.search(chunk, start)
            if match is None:
                self.work += end - start
                self._keep(chunk[start:] if start else chunk)
                break
            self.work += match.end() - start
            line = chunk[start : match.start()]
            if self._pieces:
                self._keep(line)
                line = b"".join(self._pieces)
                self.work += len(line)
                self._pieces, self._pending = [], 0
            elif self.max_line_bytes is not None and len(line) > self.max_line_bytes:
                raise SSELineTooLongError(len(line))
            if match.group() == b"\r" and match.end() == end:
                self._after_cr = True
            start = match.end()
            event = self._take_line(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    def flush(self) -> list[SSEEvent]:
        """Dispatch what is left when the stream ends without a final blank line."""
        events = []
        if self._pieces:
            line = b"".join(self._pieces)
            self._pieces, self._pending = [], 0
            self._take_line(line.decode("utf-8", errors="replace"))
        event = self._take_line("")
        if event is not None:
            events.append(event)
        return events

    def _keep(self, piece: bytes) -> None:
        """Hold a piece of the unfinished line, within ``max_line_bytes``."""
        self._pending += len(piece)
        if self.max_line_bytes is not None and self._pending > self.max_line_bytes:
            raise SSELineTooLongError(self._pending)
        if piece:
            self._pieces.append(piece)

    def _take_line(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data:
                self._event = self._id = None
                return None
            event = SSEEvent("\n".join(self._data), self._event, self._id)
            self._data, self._data_size = [], 0
            self._event = self._id = None
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data_size += len(value) + 1
            if self.max_line_bytes is not None and (
                self._data_size > self.max_line_bytes
            ):
                raise SSELineTooLongError(self._data_size)
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None
