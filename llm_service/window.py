"""The last few minutes of traffic, summed over every worker, for ``/status``.

Prometheus counters only grow; a rate needs two readings some time apart, and
the status page is rendered by whichever worker takes the request. So each
worker also keeps a ring of short time slots (requests, errors, a latency
histogram) in a small file of its own in the metrics directory; the page sums
every worker's file. A worker only writes its own file, so no lock is shared
between processes, and a slot older than the window is simply skipped (and
reset by its owner when time comes round to it again).

Without a metrics directory (``flask run``, unit tests) the ring lives in
memory and covers this process only, which is then the whole service.
"""

from __future__ import annotations

import bisect
import contextlib
import glob
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass

from .ids import process_id

#: Seconds per slot, and slots kept: five minutes, and the slot being filled.
SLOT_SECONDS = 10
SLOTS = 31
#: Upper bounds (seconds) of the latency buckets; a last one takes the rest.
BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: Per slot: its number (time // SLOT_SECONDS), requests, errors, seconds, buckets.
_FIELDS = 4 + len(BOUNDS) + 1
_SLOT = struct.Struct(f"<{_FIELDS}d")
#: A slot's number, requests, errors and seconds; one of its buckets.
_HEAD = struct.Struct("<4d")
_FIELD = struct.Struct("<d")
_EMPTY = (0.0,) * (_FIELDS - 1)
_SIZE = _SLOT.size * SLOTS
FILE_PATTERN = "window-*.bin"


@dataclass(frozen=True)
class Summary:
    """Traffic over a span of time: counts, rates and latency quantiles."""

    seconds: float
    requests: int
    errors: int
    latency_p50: float | None
    latency_p95: float | None

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_rate(self) -> float:
        """Share of requests answered with a server error (5xx)."""
        return self.errors / self.requests if self.requests else 0.0


class Window:
    """This process's ring of slots, in a file under ``directory`` or in memory."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._pid = process_id()
        self._buffer: mmap.mmap | bytearray = bytearray(_SIZE)

    def _own_buffer(self) -> mmap.mmap | bytearray:
        """The buffer to write, opened anew in a forked child (a new file)."""
        if self.directory is None:
            return self._buffer
        pid = process_id()
        if isinstance(self._buffer, bytearray) or pid != self._pid:
            path = os.path.join(self.directory, f"window-{pid}.bin")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, _SIZE)
                self._buffer = mmap.mmap(fd, _SIZE)
            finally:
                os.close(fd)
            self._pid = pid
        return self._buffer

    def record(self, seconds: float, error: bool, now: float | None = None) -> None:
        """Count one request that took ``seconds`` (``error``: answered 5xx)."""
        number = int((time.time() if now is None else now) // SLOT_SECONDS)
        offset = (number % SLOTS) * _SLOT.size
        # The first bound >= seconds (len(BOUNDS): the last bucket).
        bucket = bisect.bisect_left(BOUNDS, seconds)
        # Only the fields that change are read and written, not the whole slot.
        with self._lock:
            buffer = self._own_buffer()
            slot, requests, errors, total = _HEAD.unpack_from(buffer, offset)
            if slot != number:
                _SLOT.pack_into(buffer, offset, float(number), *_EMPTY)
                requests = errors = total = 0.0
            _HEAD.pack_into(
                buffer,
                offset,
                number,
                requests + 1,
                errors + bool(error),
                total + seconds,
            )
            at = offset + (4 + bucket) * _FIELD.size
            _FIELD.pack_into(buffer, at, _FIELD.unpack_from(buffer, at)[0] + 1)

    def summary(self, seconds: float, now: float | None = None) -> Summary:
        """Sum every worker's slots of the last ``seconds`` (whole slots)."""
        now = time.time() if now is None else now
        newest = int(now // SLOT_SECONDS)
        oldest = newest - max(1, round(seconds / SLOT_SECONDS)) + 1
        totals = [0.0] * _FIELDS
        for buffer in self._buffers():
            for index in range(SLOTS):
                values = _SLOT.unpack_from(buffer, index * _SLOT.size)
                if oldest <= values[0] <= newest:
                    for field in range(1, _FIELDS):
                        totals[field] += values[field]
        # The slot being filled counts for the part of it that has passed.
        span = (newest - oldest) * SLOT_SECONDS + (now % SLOT_SECONDS)
        buckets = totals[4:]
        return Summary(
            seconds=max(span, 1.0),
            requests=int(totals[1]),
            errors=int(totals[2]),
            latency_p50=_quantile(buckets, 0.5),
            latency_p95=_quantile(buckets, 0.95),
        )

    def _buffers(self) -> list[bytes | bytearray | mmap.mmap]:
        if self.directory is None:
            return [self._buffer]
        buffers = []
        for path in glob.glob(os.path.join(self.directory, FILE_PATTERN)):
            with contextlib.suppress(OSError), open(path, "rb") as file:
                data = file.read(_SIZE)
                if len(data) == _SIZE:
                    buffers.append(data)
        return buffers


def _quantile(buckets: list[float], q: float) -> float | None:
    """Estimate a quantile from bucket counts, interpolating inside a bucket."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    seen = 0.0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            low = BOUNDS[index - 1] if index else 0.0
            high = BOUNDS[index] if index < len(BOUNDS) else BOUNDS[-1]
            return low + (high - low) * (rank - seen) / count
        seen += count
    return BOUNDS[-1]
