"""UpstreamStream: an upstream event stream read in the background, with deadlines.

A reader thread pulls bytes off the socket as they arrive and parses them into
events; the consumer waits on a queue with short ticks, so it can send keep-alives
or notice its own client leaving while the upstream is silent, and every limit
(first token, silence, total) is checked precisely without putting a timeout on
the socket read itself, which would leave the connection unusable.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator

import requests

from .errors import (
    LMStudioError,
    LMStudioStreamCutError,
    LMStudioStreamError,
    LMStudioStreamTimeoutError,
    error_message,
)
from .sse import SSEEvent, SSEParser

log = logging.getLogger("llm_service.lmstudio")

READ_SIZE = 65536
_END = object()
_CANCELLED = object()


def _stream_error(payload: object) -> str | None:
    """Return the message of an in-stream error payload, or None.

    Only an ``error`` key makes a chunk an error (a chunk may say "message").
    """
    if not isinstance(payload, dict) or "error" not in payload:
        return None
    return error_message(payload)[0] or "unknown error"


def _finishes(data: str) -> bool:
    """Tell whether a chunk carries a non-null ``finish_reason`` (no JSON parse).

    Content is JSON-escaped, so an unescaped ``"finish_reason":`` can only be
    the key itself.
    """
    compact = data.replace(" ", "")
    return '"finish_reason":' in compact and '"finish_reason":null' not in compact


class UpstreamStream:
    """Events of one streamed completion; :meth:`close` aborts it upstream."""

    def __init__(
        self,
        response: requests.Response,
        *,
        first_token_timeout: float,
        idle_timeout: float,
        total_timeout: float,
    ) -> None:
        self.response = response
        self.request_id = response.headers.get("x-request-id")
        self.first_token_timeout = first_token_timeout
        self.idle_timeout = idle_timeout
        self.started = time.monotonic()
        self.total_deadline = self.started + total_timeout
        self.saw_finish = False
        #: True once :meth:`cancel` was called (the consumer went away).
        self.cancelled = False
        self._events: queue.SimpleQueue = queue.SimpleQueue()
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
        received_any = False
        last_event = self.started
        try:
            while True:
                if received_any:
                    limit, kind = last_event + self.idle_timeout, "idle"
                else:
                    limit, kind = self.started + self.first_token_timeout, "first_token"
                if self.total_deadline < limit:
                    limit, kind = self.total_deadline, "total"
                wait = limit - time.monotonic()
                if wait <= 0:
                    raise self._timeout(kind)
                try:
                    arrived, item = self._events.get(timeout=min(tick, wait))
                except queue.Empty:
                    yield None
                    continue
                if item is _CANCELLED:
                    return
                if arrived > limit:
                    # Judged by when it arrived, not by when this thread got to
                    # look: a stalled process must not let a late event count.
                    raise self._timeout(kind)
                if item is _END:
                    if self.saw_finish:
                        return  # finished, only the [DONE] line was missing
                    raise LMStudioStreamCutError(
                        "The upstream closed the stream before it finished."
                    )
                if isinstance(item, LMStudioError):
                    raise item
                received_any = True
                last_event = arrived
                if item.is_done:
                    return
                self._check(item)
                yield item
        finally:
            self.close()

    def cancel(self) -> None:
        """Abort the stream from any thread and wake :meth:`events` to end."""
        self.cancelled = True
        self.close()
        self._put(_CANCELLED)

    def close(self) -> None:
        """Abort the stream: the upstream sees the socket close and stops work."""
        if self._closed.is_set():
            return
        self._closed.set()
        # shutdown() wakes the reader blocked in recv(); close() alone does not.
        with contextlib.suppress(Exception):
            self.response.raw.shutdown()
        with contextlib.suppress(Exception):
            self.response.close()

    def _check(self, event: SSEEvent) -> None:
        # Cheap test first: most chunks carry no error and skip the JSON parse.
        if '"error"' not in event.data:
            payload = None
        else:
            try:
                payload = event.json()
            except ValueError:
                payload = None
            message = _stream_error(payload)
            if message is not None:
                raise LMStudioStreamError(message[:500], request_id=self.request_id)
        if not self.saw_finish and _finishes(event.data):
            self.saw_finish = True

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

    def _put(self, item: object) -> None:
        """Queue ``item`` with the time it arrived, which the limits judge."""
        self._events.put((time.monotonic(), item))

    def _read(self) -> None:
        parser = SSEParser()
        raw = self.response.raw
        try:
            while not self._closed.is_set():
                data = raw.read1(READ_SIZE)
                if not data:
                    break
                for event in parser.feed(data):
                    self._put(event)
            for event in parser.flush():
                self._put(event)
            self._put(_END)
        except Exception as err:
            if not self._closed.is_set():
                log.debug("upstream stream read failed: %s", type(err).__name__)
                self._put(
                    LMStudioStreamCutError(
                        "The upstream connection broke during the stream.",
                        request_id=self.request_id,
                    )
                )
