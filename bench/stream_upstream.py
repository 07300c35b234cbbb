"""A streaming OpenAI-compatible upstream that records when its streams end.

Run as its own process (``python -m bench.stream_upstream --port P``) so the
load generator and the contender never share its interpreter. Standard library
only (asyncio), one event loop, HTTP/1.1 with keep-alive.

``POST /v1/chat/completions`` with ``"stream": true`` answers ``--chunks``
``chat.completion.chunk`` events ``--interval`` seconds apart (the first one at
once), then a final chunk with ``finish_reason`` and ``data: [DONE]``, all in a
chunked body. Each content delta carries a marker ``[<stream>.<chunk>@<ns>]``:
the stream's id, the chunk's index and the ``time.monotonic_ns()`` at which it
was written. Content survives every relay (raw SSE passthrough, re-encoded
events, LiteLLM's re-chunking), so the client can tell, from the text alone,
when each chunk left the upstream and whether a relay merged two of them.
``CLOCK_MONOTONIC`` is system-wide on Linux, so the client's clock compares.

Without ``"stream": true`` it answers a fixed chat completion. ``GET /v1/models``
lists one model. ``GET /_bench/streams`` returns every stream's record (opened,
chunks sent, when the connection closed and whether the stream finished) and
``POST /_bench/reset`` forgets them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from dataclasses import asdict, dataclass

MODEL = "bench-stream"
MAX_BODY = 1 << 20


@dataclass
class StreamRecord:
    """One streamed answer, as this upstream saw it (``time.monotonic_ns``)."""

    id: int
    opened_ns: int
    chunks_sent: int = 0
    finished_ns: int | None = None  # [DONE] written
    closed_ns: int | None = None  # the peer closed (or reset) the connection


class StreamUpstream:
    """The server state: settings and the stream records."""

    def __init__(self, chunks: int, interval: float) -> None:
        self.chunks = chunks
        self.interval = interval
        self.records: dict[int, StreamRecord] = {}
        self._next_id = 1

    def new_record(self) -> StreamRecord:
        record = StreamRecord(id=self._next_id, opened_ns=time.monotonic_ns())
        self._next_id += 1
        self.records[record.id] = record
        return record

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one keep-alive connection until the peer leaves."""
        prefix = b""
        try:
            while True:
                method, path, body, close = await _read_request(reader, prefix)
                prefix = await self.dispatch(method, path, body, reader, writer)
                if prefix is None or close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def dispatch(
        self,
        method: str,
        path: str,
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bytes | None:
        """Answer one request.

        Return the bytes of the next request already read (usually none), or
        None when the connection is closed.
        """
        path = path.split("?", 1)[0]
        if method == "POST" and path == "/v1/chat/completions":
            try:
                data = json.loads(body or b"{}")
            except ValueError:
                data = {}
            if isinstance(data, dict) and data.get("stream"):
                return await self.stream(reader, writer)
            await _send_json(writer, 200, completion())
            return b""
        if method == "GET" and path == "/v1/models":
            models = {
                "object": "list",
                "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}],
            }
            await _send_json(writer, 200, models)
            return b""
        if method == "GET" and path == "/_bench/streams":
            records = {str(k): asdict(v) for k, v in self.records.items()}
            await _send_json(writer, 200, records)
            return b""
        if method == "POST" and path == "/_bench/reset":
            self.records.clear()
            await _send_json(writer, 200, {"ok": True})
            return b""
        await _send_json(writer, 404, {"error": {"message": "not found"}})
        return b""

    async def stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes | None:
        """Write the SSE answer; watch the socket to stamp the moment it closes."""
        record = self.new_record()
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"Connection: keep-alive\r\n\r\n"
        )
        # A request is never pipelined behind a stream here, so any read that
        # completes means the peer closed (EOF) or reset the connection.
        watcher = asyncio.ensure_future(reader.read(1))
        closed = False
        try:
            for index in range(self.chunks):
                if index:
                    done, _ = await asyncio.wait({watcher}, timeout=self.interval)
                    if done:
                        closed = True
                        break
                writer.write(_chunk(_sse(chunk_event(record.id, index))))
                record.chunks_sent += 1
                await writer.drain()
            if not closed:
                final = chunk_event(record.id, None)
                writer.write(_chunk(_sse(final)) + _chunk(b"data: [DONE]\n\n"))
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                record.finished_ns = time.monotonic_ns()
                # Keep watching: the relay's close after [DONE] is recorded
                # too; on a kept-alive connection the byte read is the first
                # of the next request.
                try:
                    first = await watcher
                except ConnectionError:
                    first = b""
                if first:
                    return first
        except ConnectionError:
            pass
        if not watcher.done():
            watcher.cancel()
        record.closed_ns = time.monotonic_ns()
        return None


def completion() -> dict:
    """Return the fixed non-streamed chat completion."""
    return {
        "id": "chatcmpl-bench-stream",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A fixed answer."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 27, "completion_tokens": 4, "total_tokens": 31},
    }


def chunk_event(stream_id: int, index: int | None) -> dict:
    """Return chunk ``index`` of a stream, or its final chunk when ``None``."""
    if index is None:
        delta: dict = {}
        finish = "stop"
    else:
        delta = {"content": f"[{stream_id}.{index}@{time.monotonic_ns()}] "}
        if index == 0:
            delta = {"role": "assistant", **delta}
        finish = None
    return {
        "id": f"chatcmpl-bench-{stream_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _sse(event: dict) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _read_request(
    reader: asyncio.StreamReader, prefix: bytes = b""
) -> tuple[str, str, bytes, bool]:
    """Read one request (``prefix``: its first bytes, already read).

    Returns ``(method, path, body, close)``, ``close`` when the client asked for
    ``Connection: close``. Raises :class:`asyncio.IncompleteReadError` when
    the peer closes first.
    """
    head = prefix + await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size + 2)
            body = body[:-2]
            if len(body) > MAX_BODY:
                raise ValueError("body too large")
    else:
        length = int(headers.get("content-length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        body = await reader.readexactly(length)
    close = headers.get("connection", "").lower() == "close"
    return method, path, body, close


async def _send_json(writer: asyncio.StreamWriter, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    reason = {200: "OK", 404: "Not Found"}.get(status, "Error")
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    await writer.drain()


async def serve(port: int, chunks: int, interval: float) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    upstream = StreamUpstream(chunks, interval)
    server = await asyncio.start_server(
        upstream.handle, "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    """Parse the arguments and serve."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.chunks, args.interval))


if __name__ == "__main__":
    main()
