"""What each host serves, found in the background; never on a request's path.

A :class:`Host` is one model server as the gateway knows it: its client, its
circuit breaker, the requests in flight there and what its last probe found.
:class:`Discovery` is one thread per worker process that probes every host
every ``interval`` seconds, and a host at once after a call to it failed:

- every host: ``GET /v1/models`` (what it lists);
- LM Studio: ``/api/v0/models`` (``state: loaded``, through the client's probe);
- llama.cpp's server: ``/props`` (``total_slots``); llama-cpp-python's has no
  ``/props``, and is asked no more once it said so.

A probe that times out while the gateway has requests in flight at that host
means busy, not down (llama-cpp-python's server answers ``/v1/models`` only
between generations): the host keeps serving what it served. Probes never
count toward the circuit breaker.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..config import redact_url
from ..lmstudio.client import HealthReport, LMStudioClient
from ..lmstudio.errors import LMStudioError
from .breaker import CircuitBreaker
from .placement import DEFAULT_SLOTS, HostState

log = logging.getLogger("llm_service.upstreams")

#: Shortest time between two probes of one host that calls keep failing at.
MIN_KICK_SECONDS = 0.5


class Host:
    """One model server: client, breaker, in-flight count, last probe."""

    def __init__(
        self,
        name: str,
        client: LMStudioClient,
        *,
        breaker: CircuitBreaker,
        slots: int | None = None,
        weight: float = 1.0,
    ) -> None:
        self.name = name
        self.client = client
        self.breaker = breaker
        #: Slots from the settings; they beat what discovery reports.
        self.configured_slots = slots
        self.weight = weight
        self._probe_lock = threading.Lock()
        self._lock = threading.Lock()
        self._in_flight = 0
        self.report: HealthReport | None = None
        self.probed_at = 0.0
        self._last_models: list[str] = []
        self._last_server: str | None = None
        self._discovered_slots: int | None = None
        #: Where admission counts this host's slots (its address: shared by
        #: every gateway using it), and whom to tell of the slots it reports.
        self.slot_key = name
        self.on_slots: Callable[[int], None] | None = None
        self._has_props = True

    # -- requests in flight --------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Calls and streams of this process at this host right now."""
        return self._in_flight

    def acquire(self) -> Callable[[], None]:
        """Count a call or stream in flight here; return its (idempotent) release."""
        with self._lock:
            self._in_flight += 1
        held = [True]  # emptied by the first release (a flag, not an Event: cheaper)

        def release() -> None:
            with self._lock:
                if held:
                    held.clear()
                    self._in_flight -= 1

        return release

    @property
    def slots(self) -> int:
        """Generations it runs at once: settings, else discovery, else a default."""
        return self.configured_slots or self._discovered_slots or DEFAULT_SLOTS

    # -- probing -------------------------------------------------------------

    def refresh(self) -> HealthReport:
        """Probe now (one probe at a time; a caller waiting gets its result)."""
        asked_at = time.monotonic()
        with self._probe_lock:
            if self.report is not None and self.probed_at >= asked_at:
                return self.report  # probed while this caller waited
            report = self.client.probe()
            if report.busy:
                # Generating for a request of ours: it serves what it served.
                report.models = list(self._last_models)
                report.server = self._last_server
            elif report.reachable:
                self._last_models = report.servable_models
                self._last_server = report.server
                if report.server != "lmstudio" and self._has_props:
                    self._read_props()
            with self._lock:
                self.report = report
                self.probed_at = time.monotonic()
            return report

    def _read_props(self) -> None:
        try:
            props = self.client.props(timeout=self.client.health_timeout)
        except LMStudioError as err:
            if err.status is not None:
                self._has_props = False  # llama-cpp-python: no /props
            return
        slots = props.get("total_slots")
        if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0:
            self._discovered_slots = slots
            if self.on_slots is not None:
                self.on_slots(slots)

    def health(self, max_age: float) -> HealthReport:
        """The last probe if younger than ``max_age`` seconds, else a new one."""
        with self._lock:
            report, probed_at = self.report, self.probed_at
        if report is not None and time.monotonic() - probed_at < max_age:
            return report
        return self.refresh()

    def forget(self) -> None:
        """Drop the last probe (the host said no model is loaded)."""
        with self._lock:
            self.report = None

    # -- what placement and the views read -----------------------------------

    @property
    def known(self) -> bool:
        """True once a probe has answered (or failed)."""
        return self.report is not None

    def servable_models(self) -> list[str]:
        """Models that can answer: from the last probe, else the last good one."""
        report = self.report
        if report is not None and report.reachable:
            return report.servable_models
        return list(self._last_models)

    def sole_model(self) -> str | None:
        """The one model a non-LM Studio server serves, whatever a request names.

        llama.cpp's server answers every request with its one model but echoes
        the requested name; this is what really answered. None when unknown,
        several models, or LM Studio (which reports the answering model).
        """
        if self._last_server == "lmstudio" or len(self._last_models) != 1:
            return None
        return self._last_models[0]

    def state(self) -> HostState:
        """A snapshot for placement."""
        report = self.report
        up = report is None or report.reachable
        models: tuple[str, ...] = ()
        loaded: tuple[str, ...] | None = None
        if report is not None:
            models = tuple(report.models or self._last_models)
            loaded = tuple(report.loaded) if report.loaded is not None else None
        return HostState(
            name=self.name,
            up=up,
            models=models,
            loaded=loaded,
            in_flight=self._in_flight,
            slots=self.slots,
            weight=self.weight,
            available=self.breaker.available(),
        )

    def view(self) -> dict[str, Any]:
        """What ``/health`` shows of this host: never its URL's credentials."""
        report = self.report
        return {
            "name": self.name,
            "url": redact_url(self.client.base_url),
            "status": _status(report),
            "server": report.server if report else None,
            "models": list(report.models) if report else [],
            "loaded_models": (
                list(report.loaded) if report and report.loaded is not None else None
            ),
            "in_flight": self._in_flight,
            "slots": self.slots,
            "circuit": self.breaker.state,
            "error": report.error if report and not report.reachable else None,
        }


def _status(report: HealthReport | None) -> str:
    if report is None:
        return "unknown"
    if report.busy:
        return "busy"
    return "up" if report.reachable else "down"


class Discovery:
    """The thread that keeps every host's probe fresh, one per worker process.

    Started lazily on first use in each process (:meth:`ensure_started`), so a
    thread started before gunicorn forks is never counted on; stopped by
    :meth:`stop`, or at the process's exit.
    """

    def __init__(self, hosts: Sequence[Host], interval: float) -> None:
        self.hosts = list(hosts)
        self.interval = interval
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._kicked: set[str] = set()
        self._kicked_at: dict[str, float] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    @property
    def running(self) -> bool:
        return (
            self._thread is not None
            and self._thread.is_alive()
            and self._pid == os.getpid()
        )

    def ensure_started(self) -> None:
        """Start this process's thread unless it runs already (cheap to call)."""
        if self.interval <= 0 or self.running:
            return
        with self._lock:
            if self.running or self._stopping:
                return
            self._pid = os.getpid()
            self._thread = threading.Thread(
                target=self._run, name="upstream-discovery", daemon=True
            )
            self._thread.start()
        atexit.register(self.stop)

    def kick(self, host: Host) -> None:
        """Probe ``host`` at once (a call to it just failed)."""
        with self._lock:
            self._kicked.add(host.name)
            self._wake.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; a probe under way ends within its own timeout."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        next_round = time.monotonic()
        while True:
            with self._lock:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    kicked = [n for n in self._kicked if self._kick_due(n) <= now]
                    if kicked or now >= next_round:
                        break
                    wake_at = min([next_round, *map(self._kick_due, self._kicked)])
                    self._wake.wait(max(0.01, wake_at - now))
                self._kicked -= set(kicked)
            if kicked:
                targets = [h for h in self.hosts if h.name in kicked]
                for host in targets:
                    self._kicked_at[host.name] = time.monotonic()
            else:
                targets = self.hosts
                next_round = time.monotonic() + self.interval
            for host in targets:
                try:
                    host.refresh()
                except Exception:  # a failed probe is a finding; this is a bug
                    log.exception("probing host %s failed", host.name)

    def _kick_due(self, name: str) -> float:
        """When a kicked host may be probed again: not more than every 0.5 s."""
        return self._kicked_at.get(name, 0.0) + MIN_KICK_SECONDS
