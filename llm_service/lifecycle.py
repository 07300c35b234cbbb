"""The process's shutdown state: set by the server on SIGTERM, read by the app.

When gunicorn is told to stop, a worker gets ``graceful_timeout`` seconds before
it is killed. The worker (:mod:`llm_service.server`) calls :meth:`Drain.begin`
at once; from then on the request pipeline answers new requests with 503
``server_shutting_down``, and streams still open at ``graceful_timeout`` minus
:data:`STREAM_END_MARGIN` end with an error event of that code, so no client
sees its stream cut without a word. Plain Python: no Flask, no sockets.
"""

from __future__ import annotations

import time

#: Streams end this many seconds before the worker would be killed, leaving
#: time to write the error event and close the connection cleanly.
STREAM_END_MARGIN = 2.0


class ShuttingDownError(Exception):
    """The server is stopping: the request is refused, or the stream ended."""


class Drain:
    """Whether this process is shutting down, and when its streams must end."""

    def __init__(self) -> None:
        self._streams_end_at: float | None = None

    def begin(self, grace: float) -> None:
        """Start draining: the worker will be stopped in ``grace`` seconds."""
        if self._streams_end_at is None:
            margin = min(STREAM_END_MARGIN, grace / 2)
            self._streams_end_at = time.monotonic() + grace - margin

    @property
    def draining(self) -> bool:
        return self._streams_end_at is not None

    def streams_end_in(self) -> float | None:
        """Seconds until open streams must end; None while not draining."""
        end = self._streams_end_at
        return None if end is None else end - time.monotonic()

    def streams_must_end(self) -> bool:
        """True once open streams must be ended with ``server_shutting_down``."""
        end = self._streams_end_at
        return end is not None and time.monotonic() >= end


#: The process's drain state (gunicorn workers are processes: one each).
drain = Drain()

#: Worker processes gunicorn runs for this app (set by the worker at start, 1
#: elsewhere): without a shared slot store, each takes its share of a host's
#: slots (:mod:`llm_service.upstreams.admission`).
workers = 1
