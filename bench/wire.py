"""HTTP on the wire: small blocking helpers and an asyncio SSE stream client.

The clients are deliberately plain (``http.client`` and asyncio sockets): their
own cost is the same for every contender, so it cancels out of every "added"
figure, and a thousand asyncio streams fit in one process.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

JSON_HEADERS = {"Content-Type": "application/json"}
#: The marker :mod:`bench.stream_upstream` puts in every content delta.
TOKEN = re.compile(rb"\[(\d+)\.(\d+)@(\d+)\]")


def request_json(
    host: str,
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """Send one request; return ``(status, parsed JSON body or None)``."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=JSON_HEADERS)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, None


@dataclass
class Probe:
    """What one request answered: status, content type and a body excerpt."""

    status: int | None
    content_type: str = ""
    excerpt: str = ""
    error: str | None = None


def probe(
    host: str,
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Probe:
    """POST ``body`` once and describe the answer (reads at most 2 KB of it)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(
            "POST", path, body=body, headers={**JSON_HEADERS, **(headers or {})}
        )
        response = conn.getresponse()
        content_type = response.getheader("Content-Type", "")
        # A stream's first bytes are enough (a slow one takes seconds to end).
        size = 2048
        raw = response.read1(size) if "event-stream" in content_type else b""
        raw = raw or response.read(size)
        return Probe(response.status, content_type, raw.decode("utf-8", "replace"))
    except (OSError, http.client.HTTPException) as err:
        return Probe(None, error=f"{type(err).__name__}: {err}")
    finally:
        conn.close()


class KeepAliveClient:
    """One keep-alive connection sending the same POST, timed in nanoseconds."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.host, self.port, self.path, self.body = host, port, path, body
        self.headers = {**JSON_HEADERS, **(headers or {})}
        self.conn: http.client.HTTPConnection | None = None

    def post(self) -> tuple[int | None, int]:
        """Send the request; return ``(status or None on error, elapsed_ns)``."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        started = time.perf_counter_ns()
        try:
            self.conn.request("POST", self.path, body=self.body, headers=self.headers)
            response = self.conn.getresponse()
            response.read()
            status: int | None = response.status
            if response.will_close:
                self.close()
        except (OSError, http.client.HTTPException):
            status = None
            self.close()
        return status, time.perf_counter_ns() - started

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# -- asyncio SSE ---------------------------------------------------------------


@dataclass
class Event:
    """One SSE event as it arrived: when, and the upstream chunks it carried."""

    arrived_ns: int
    tokens: list[tuple[int, int, int]]  # (stream id, chunk index, sent_ns)
    done: bool = False  # data: [DONE]


@dataclass
class StreamResult:
    """One streamed request, start to end, seen from the client."""

    started_ns: int = 0
    status: int | None = None
    content_type: str = ""
    events: list[Event] = field(default_factory=list)
    ended: bool = False  # the body ended cleanly
    error: str | None = None
    closed_ns: int | None = None  # when the client closed its socket

    @property
    def tokens(self) -> list[tuple[int, int, int, int]]:
        """Every chunk received: ``(stream id, index, sent_ns, arrived_ns)``.

        Only a chunk's first arrival counts: a final event may repeat the whole
        text (``/llm/message``'s ``done`` event does).
        """
        return [token for fresh in self.new_tokens() for token in fresh]

    def new_tokens(self) -> list[list[tuple[int, int, int, int]]]:
        """Per event, the chunks it was the first to carry."""
        seen: set[tuple[int, int]] = set()
        out = []
        for event in self.events:
            fresh = []
            for stream, index, sent in event.tokens:
                if (stream, index) not in seen:
                    seen.add((stream, index))
                    fresh.append((stream, index, sent, event.arrived_ns))
            out.append(fresh)
        return out

    @property
    def stream_id(self) -> int | None:
        tokens = self.tokens
        return tokens[0][0] if tokens else None

    @property
    def first_token_ns(self) -> int | None:
        tokens = self.tokens
        return tokens[0][3] if tokens else None


class SSEStream:
    """A streamed POST over one asyncio connection (``Connection: close``).

    Decodes a chunked or close-delimited body, splits it into SSE events and
    stamps each with ``time.monotonic_ns()`` when its last byte was read.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.host, self.port, self.path, self.body = host, port, path, body
        self.extra_headers = "".join(
            f"{name}: {value}\r\n" for name, value in (headers or {}).items()
        )
        self.result = StreamResult()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buffer = b""
        self._chunked = False
        self._remaining = 0  # bytes left in the current chunk
        self._body_done = False

    async def open(self) -> None:
        """Connect, send the request and read the status line and headers."""
        self.result.started_ns = time.monotonic_ns()
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._writer.write(
            (
                f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(self.body)}\r\nConnection: close\r\n"
                f"{self.extra_headers}\r\n"
            ).encode()
            + self.body
        )
        await self._writer.drain()
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.result.status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        self.result.content_type = headers.get("content-type", "")
        self._chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        if not self._chunked and "content-length" in headers:
            self._remaining = int(headers["content-length"])

    async def next_event(self) -> Event | None:
        """Return the next event, or None when the body has ended."""
        while True:
            event = self._pop_event()
            if event is not None:
                return event
            if self._body_done:
                if self._buffer.strip():
                    event = self._make_event(self._buffer)
                    self._buffer = b""
                    return event
                self.result.ended = True
                return None
            await self._read_more()

    async def run(self) -> StreamResult:
        """Read every event until the body ends; errors end up in the result."""
        try:
            await self.open()
            while await self.next_event() is not None:
                pass
        except (OSError, asyncio.IncompleteReadError, ValueError) as err:
            self.result.error = f"{type(err).__name__}: {err}"
        finally:
            self.close()
        return self.result

    def close(self) -> None:
        """Close the socket (a client going away); stamp when."""
        if self._writer is not None and self.result.closed_ns is None:
            self._writer.close()
            self.result.closed_ns = time.monotonic_ns()

    async def _read_more(self) -> None:
        assert self._reader is not None
        if not self._chunked:
            data = await self._reader.read(65536)
            if not data:
                self._body_done = True
                return
            self._remaining -= len(data)
            self._append(data)
            return
        if self._remaining == 0:
            line = await self._reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")
                self._body_done = True
                return
            self._remaining = size
        data = await self._reader.read(self._remaining)
        if not data:
            raise asyncio.IncompleteReadError(b"", self._remaining)
        self._remaining -= len(data)
        if self._remaining == 0:
            await self._reader.readexactly(2)  # the chunk's CRLF
        self._append(data)

    def _append(self, data: bytes) -> None:
        # Joined first: a CRLF may straddle two reads.
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")

    def _pop_event(self) -> Event | None:
        end = self._buffer.find(b"\n\n")
        if end < 0:
            return None
        raw, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
        return self._make_event(raw)

    def _make_event(self, raw: bytes) -> Event:
        tokens = [(int(s), int(i), int(t)) for s, i, t in TOKEN.findall(raw)]
        event = Event(time.monotonic_ns(), tokens, done=b"[DONE]" in raw)
        self.result.events.append(event)
        return event
