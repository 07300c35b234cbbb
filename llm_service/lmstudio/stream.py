"""UpstreamStream: an upstream event stream read in the background, with deadlines.

A reader thread pulls bytes off the socket as they arrive and parses them into
events; the consumer waits on a bounded buffer with short ticks, so it can send
keep-alives or notice its own client leaving while the upstream is silent, and
every limit (first token, silence, total) is checked precisely without putting
a timeout on the socket read itself, which would leave the connection unusable.

The buffer holds at most about :data:`BUFFER_BYTES` of events: when the client
reads slower than the upstream writes, the reader stops reading, the socket's
receive window fills and TCP slows the upstream down. Time spent so is not the
upstream's silence: the idle limit counts only while the reader waits for it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import requests

from .chunks import finishes, stream_error
from .errors import (
    LMStudioError,
    LMStudioResponseTooLargeError,
    LMStudioStreamCutError,
    LMStudioStreamError,
    LMStudioStreamTimeoutError,
    safe_excerpt,
)
from .sse import SSEEvent, SSELineTooLongError, SSEParser

log = logging.getLogger("llm_service.lmstudio")

READ_SIZE = 65536
#: Bytes of parsed events held for a client that reads slower than the upstream
#: writes. One event may overshoot it (an event is never split).
BUFFER_BYTES = 256 * 1024
_END = object()
_CLOSED = object()


class _Buffer:
    """Items from the reader thread to the consumer, bounded in bytes.

    ``put`` waits while the buffer holds ``limit`` bytes or more; items of size
    0 (the end, an error) never wait. Each item keeps the time it arrived, so
    the consumer judges deadlines by arrival, not by when it got to look.
    ``heard_at`` is when the upstream last gave an event: when one was added,
    or when the consumer made room for a reader that may have been waiting (the
    upstream was not silent then, the client was slow).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.heard_at: float | None = None
        self._items: collections.deque[tuple[object, int, float]] = collections.deque()
        self._size = 0
        self._closed = False
        self._changed = threading.Condition()

    def put(self, item: object, size: int = 0) -> bool:
        """Add ``item``; False when the buffer was closed (the item is dropped)."""
        with self._changed:
            while size and self._size >= self.limit and not self._closed:
                self._changed.wait()
            if self._closed:
                return False
            arrived = time.monotonic()
            self._items.append((item, size, arrived))
            self._size += size
            if size:
                self.heard_at = arrived
            self._changed.notify_all()
            return True

    def get(self, timeout: float) -> tuple[float, object]:
        """Return ``(arrived, item)`` or ``(now, _CLOSED)``.

        Raises queue.Empty after ``timeout`` seconds without an item.
        """
        with self._changed:
            if not self._items and not self._closed and timeout > 0:
                self._changed.wait(timeout)
            if self._closed:
                return time.monotonic(), _CLOSED
            if not self._items:
                raise queue.Empty
            item, size, arrived = self._items.popleft()
            if self._size >= self.limit:
                self.heard_at = time.monotonic()
            self._size -= size
            self._changed.notify_all()
            return arrived, item

    def close(self) -> None:
        """Drop every item and wake both sides for good."""
        with self._changed:
            self._closed = True
            self._items.clear()
            self._size = 0
            self._changed.notify_all()


class UpstreamStream:
    """Events of one streamed completion; :meth:`close` aborts it upstream."""

    def __init__(
        self,
        response: requests.Response,
        *,
        first_token_timeout: float,
        idle_timeout: float,
        total_timeout: float,
        max_line_bytes: int | None = None,
        buffer_bytes: int = BUFFER_BYTES,
        on_close: Callable[[], None] | None = None,
        started: float | None = None,
    ) -> None:
        self.response = response
        self._on_close = on_close
        self.request_id = response.headers.get("x-request-id")
        self.first_token_timeout = first_token_timeout
        self.idle_timeout = idle_timeout
        #: When the request was sent: the first-token limit runs from here.
        self.started = started if started is not None else time.monotonic()
        #: When the stream must end (``time.monotonic``), whatever is happening.
        self.total_deadline = self.started + total_timeout
        self.max_line_bytes = max_line_bytes
        self.saw_finish = False
        #: When the first event reached the consumer (``time.monotonic``).
        self.first_event_at: float | None = None
        #: The ``usage`` object of the chunk that carried one, as sent.
        self.usage_data: object = None
        #: The failure that ended :meth:`events`, if one did.
        self.error: LMStudioError | None = None
        #: True once :meth:`cancel` was called (the consumer went away).
        self.cancelled = False
        self._events = _Buffer(buffer_bytes)
        self._closed = threading.Event()
        self._reader = threading.Thread(
            target=self._read, name="upstream-stream-reader", daemon=True
        )
        self._reader.start()

    # -- consumer side -------------------------------------------------------

    def events(self, tick: float = 0.25) -> Iterator[SSEEvent | None]:
        """Yield each data event; yield None after ``tick`` seconds of silence.

        Ends after ``[DONE]`` (not yielded), or at once after :meth:`cancel`
        (check ``cancelled``). Raises :class:`LMStudioStreamError`
        for an error the upstream sends inside the stream,
        :class:`LMStudioStreamCutError` when the stream ends unfinished, and
        :class:`LMStudioStreamTimeoutError` when a limit passes. The upstream
        connection is closed whenever the iteration stops, for any reason.
        """
        try:
            while True:
                heard_at = self._events.heard_at
                if heard_at is None:
                    limit, kind = self.started + self.first_token_timeout, "first_token"
                else:
                    limit, kind = heard_at + self.idle_timeout, "idle"
                if self.total_deadline < limit:
                    limit, kind = self.total_deadline, "total"
                now = time.monotonic()
                if now >= self.total_deadline:
                    raise self._timeout("total")
                try:
                    # Events already buffered are delivered whatever the time:
                    # the upstream sent them, only the client was slow.
                    arrived, item = self._events.get(timeout=min(tick, limit - now))
                except queue.Empty:
                    if time.monotonic() >= limit:
                        raise self._timeout(kind) from None
                    yield None
                    continue
                if arrived > limit and kind != "total" and item is not _CLOSED:
                    # Judged by when it arrived, not by when this thread got to
                    # look: a stalled process must not let a late event count.
                    raise self._timeout(kind)
                if item is _CLOSED:
                    if self.cancelled:
                        return
                    raise LMStudioStreamCutError("The stream was closed.")
                if item is _END:
                    if self.saw_finish:
                        return  # finished, only the [DONE] line was missing
                    raise LMStudioStreamCutError(
                        "The upstream closed the stream before it finished."
                    )
                if isinstance(item, LMStudioError):
                    raise item
                if item.is_done:
                    return
                self._check(item)
                if self.first_event_at is None:
                    self.first_event_at = time.monotonic()
                yield item
        except LMStudioError as err:
            self.error = err
            raise
        finally:
            self.close()

    def cancel(self) -> None:
        """Abort the stream from any thread and wake :meth:`events` to end."""
        self.cancelled = True
        self.close()

    def close(self) -> None:
        """Abort the stream: the upstream sees the socket close and stops work."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._events.close()  # wakes a reader waiting for room
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()
        # shutdown() wakes the reader blocked in recv(); close() alone does not.
        with contextlib.suppress(Exception):
            self.response.raw.shutdown()
        with contextlib.suppress(Exception):
            self.response.close()

    def _check(self, event: SSEEvent) -> None:
        """Raise for an in-stream error; note a finish (read by :mod:`.chunks`)."""
        message = stream_error(event)
        if message is not None:
            raise LMStudioStreamError(safe_excerpt(message), request_id=self.request_id)
        if not self.saw_finish and finishes(event):
            self.saw_finish = True
        if '"prompt_tokens"' in event.data:
            # The chunk with the token counts (usually the last): parsed once.
            with contextlib.suppress(ValueError):
                payload = event.json()
                if isinstance(payload, dict) and payload.get("usage"):
                    self.usage_data = payload["usage"]

    def _timeout(self, kind: str) -> LMStudioStreamTimeoutError:
        messages = {
            "first_token": f"The upstream sent nothing within "
            f"{self.first_token_timeout:g} s.",
            "idle": f"The upstream went silent for {self.idle_timeout:g} s.",
            "total": "The stream exceeded its total time limit.",
        }
        return LMStudioStreamTimeoutError(
            messages[kind], kind=kind, request_id=self.request_id
        )

    # -- reader thread -------------------------------------------------------

    def _read(self) -> None:
        parser = SSEParser(self.max_line_bytes)
        raw = self.response.raw
        put = self._events.put
        try:
            while not self._closed.is_set():
                data = raw.read1(READ_SIZE)
                if not data:
                    break
                for event in parser.feed(data):
                    # Waits while the buffer is full: the upstream is not read
                    # meanwhile, so TCP makes it wait too.
                    if not put(event, len(event.data) + 1):
                        return
            for event in parser.flush():
                put(event, len(event.data) + 1)
            put(_END)
        except SSELineTooLongError:
            put(
                LMStudioResponseTooLargeError(
                    "The upstream sent a stream line larger than the gateway accepts.",
                    request_id=self.request_id,
                )
            )
        except Exception as err:
            if not self._closed.is_set():
                log.debug("upstream stream read failed: %s", type(err).__name__)
                put(
                    LMStudioStreamCutError(
                        "The upstream connection broke during the stream.",
                        request_id=self.request_id,
                    )
                )
