"""A circuit breaker per host: stop sending to a host that keeps failing.

After ``failures`` consecutive failed calls the circuit opens and the host gets
no traffic while another host can serve; after ``cooldown`` seconds one trial
call is let through (half-open): its success closes the circuit, its failure
opens it again for another cooldown. Only calls count: discovery probes never
do (a probe that times out may only mean the host is busy).

Small and thread-safe on purpose: a lock, a counter and two timestamps. The
well-known libraries (pybreaker, circuitbreaker) wrap a function call and count
its exceptions, while here the pool decides what a failure is (a refused
connection or a 502, not a 400 or a client that hung up) and a stream's outcome
is known only after the call returned.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """The state of one host's circuit; every method is safe from any thread."""

    def __init__(
        self,
        failures: int = 5,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_at = 0.0

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (a trial call is under way)."""
        with self._lock:
            return self._state

    @property
    def opened_at(self) -> float:
        """When the circuit last opened (clock seconds; 0 if it never did)."""
        with self._lock:
            return self._opened_at

    def available(self) -> bool:
        """True when a call may go now, without taking the half-open trial.

        Placement asks this of every host; :meth:`allow` is asked of the one
        host a call is about to go to.
        """
        with self._lock:
            if self._state == CLOSED:
                return True
            return self._trial_due()

    def allow(self) -> bool:
        """True when a call may go now; after the cooldown, take the one trial."""
        with self._lock:
            if self._state == CLOSED:
                return True
            if not self._trial_due():
                return False
            # This call is the trial; another is let through only if its
            # outcome never comes (after one more cooldown).
            self._state = HALF_OPEN
            self._trial_at = self._clock()
            return True

    def succeeded(self) -> None:
        """A call worked (or the host answered for itself): close the circuit."""
        with self._lock:
            self._state = CLOSED
            self._failures = 0

    def failed(self) -> None:
        """A call failed because of the host; open at the threshold."""
        with self._lock:
            self._failures += 1
            if self._state == HALF_OPEN or self._failures >= self.threshold:
                self._state = OPEN
                self._opened_at = self._clock()

    def _trial_due(self) -> bool:
        now = self._clock()
        if self._state == OPEN:
            return now - self._opened_at >= self.cooldown
        return now - self._trial_at >= self.cooldown  # a trial that never ended
