"""Admission: slots per model host, and a bounded fair queue across callers.

A model host runs a handful of generations at once (its *slots*); the gateway
never has more requests in flight there. A request that finds every slot taken
waits here, in a queue with a bound (``queue_max`` requests in all,
``max_per_key`` per caller) and a deadline (``queue_timeout``). When a slot
frees, the next request is chosen by deficit round robin across callers
(weighted by each caller's ``weight``), not by arrival order: a caller with
500 requests waiting delays a caller with one by about one service time.

Where slots are counted is a :class:`SlotStore`'s business: :class:`LocalSlots`
in this process (a share of each host's slots when several processes serve),
or a shared store (:mod:`.leases`, Redis) that all workers and instances use.
The fair choice among waiting requests is always this process's.

Plain Python: no Flask, no sockets; the clock is a parameter, so the queue is
tested alone with a fake one. A waiting request costs one
:class:`threading.Event` wait (made when it joins the queue: a request
admitted at once never needs one), woken when it is admitted, when its client
leaves (:meth:`Ticket.cancel`) or at its deadline; nothing polls.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..ids import new_uuid, process_id

#: Slots of a host whose count is neither configured nor discovered.
DEFAULT_SLOTS = 4
#: Service time assumed before any request of a host has finished.
DEFAULT_SERVICE_SECONDS = 5.0
#: Weight of the newest service time in the running mean.
SERVICE_EWMA_ALPHA = 0.2
#: Bounds of the ``Retry-After`` a refused or timed-out request is given.
RETRY_AFTER_MIN = 1
RETRY_AFTER_MAX = 600
#: Weights outside these bounds are clamped (a zero weight would never be served).
WEIGHT_MIN = 0.01
WEIGHT_MAX = 1000.0

WAITING = "waiting"
ADMITTED = "admitted"
DONE = "done"


class AdmissionError(Exception):
    """A request was not admitted; ``retry_after`` is when to try again (s)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFullError(AdmissionError):
    """The queue (``scope="queue"``) or the caller's share of it (``"key"``) is full."""

    def __init__(self, message: str, retry_after: int, scope: str) -> None:
        super().__init__(message, retry_after)
        self.scope = scope


class QueueTimeoutError(AdmissionError):
    """The request waited ``queue_timeout`` seconds without getting a slot."""


class LeftQueueError(Exception):
    """The request was cancelled (its client hung up) before it was served."""


@dataclass(frozen=True)
class Lease:
    """One slot of one host, held by one request; ``shared`` if a store's lease."""

    host: str
    id: str = field(default_factory=lambda: new_uuid().hex)
    shared: bool = False


class SlotStore(Protocol):
    """Counts the slots of each host in use; never blocks for long, never raises."""

    def try_acquire(self, host: str, slots: int) -> Lease | None:
        """Take one of ``host``'s ``slots`` if one is free."""

    def release(self, lease: Lease, then: Callable[[], None] | None = None) -> None:
        """Give a slot back, then call ``then`` (once it is back in the store).

        A shared store's write may wait for the end of the request
        (:mod:`llm_service.store`).
        """

    def attach(
        self, on_freed: Callable[[], None], has_waiters: Callable[[], bool]
    ) -> None:
        """Call ``on_freed`` when slots may have freed elsewhere (other processes).

        Called in each process that uses the store, before its first request.
        """

    def ask_along(
        self,
        host: str,
        slots: Callable[[], int | None],
        then: Callable[[Lease | None], None],
    ) -> None:
        """Ask for a slot in the request's quota admission, if it admits.

        At the admission's trip to a shared store, ``slots()`` gives the
        host's slots (None: ask nothing), and ``then`` hears the lease, or
        None (refused by the quota, no slot free, the store failing). A store
        with no trips to share asks nothing (``then`` is never called).
        """


class LocalSlots:
    """Slots counted in this process: ``share(slots)`` of each host's."""

    def __init__(self, share: Callable[[int], int] | None = None) -> None:
        self._share = share or (lambda slots: slots)
        self._lock = threading.Lock()
        self._used: collections.Counter[str] = collections.Counter()

    def limit(self, slots: int) -> int:
        """This process's part of a host's ``slots``."""
        return max(1, self._share(slots))

    def try_acquire(self, host: str, slots: int) -> Lease | None:
        with self._lock:
            if self._used[host] >= self.limit(slots):
                return None
            self._used[host] += 1
        return Lease(host, "")

    def release(self, lease: Lease, then: Callable[[], None] | None = None) -> None:
        with self._lock:
            if self._used[lease.host] > 0:
                self._used[lease.host] -= 1
        if then is not None:
            then()

    def ask_along(
        self,
        host: str,
        slots: Callable[[], int | None],
        then: Callable[[Lease | None], None],
    ) -> None:
        """No trip to share: the door takes its slot when it calls."""

    def in_use(self, host: str) -> int:
        with self._lock:
            return self._used[host]

    def attach(
        self, on_freed: Callable[[], None], has_waiters: Callable[[], bool]
    ) -> None:
        """Nothing frees slots here but this process's own releases."""


def workers_share(workers: Callable[[], int]) -> Callable[[int], int]:
    """Split a host's slots between ``workers()`` processes (at least one each).

    With more processes than slots each still takes one, and the host may get
    up to ``workers()`` requests at once: documented, and logged at start.
    """
    return lambda slots: max(1, slots // max(1, workers()))


def _clamped(weight: float) -> float:
    # Outside the bounds, a weight is clamped (a zero one would never be served).
    return min(WEIGHT_MAX, max(WEIGHT_MIN, float(weight)))


class Ticket:
    """One request's place: waiting in the queue, then holding a slot.

    Thread-safe: :meth:`cancel` may come from any thread (the disconnect
    watcher); :meth:`release` is idempotent and also leaves the queue.
    """

    def __init__(
        self, admission: Admission, host: str, caller: str, weight: float
    ) -> None:
        self._admission = admission
        self.host = host
        self.caller = caller
        self.weight = weight
        self.entered_at = admission.clock()
        self.deadline = self.entered_at + admission.queue_timeout
        self.admitted_at: float | None = None
        self.lease: Lease | None = None
        self.state = WAITING
        self.cancelled = False
        #: What a waiting request sleeps on: made when it joins the queue (under
        #: the admission's lock), so a ticket admitted at once costs no Event.
        self._event: threading.Event | None = None

    @property
    def admitted(self) -> bool:
        return self.state == ADMITTED

    @property
    def waited(self) -> float:
        """Seconds spent in the queue (so far, while waiting)."""
        end = self.admitted_at if self.admitted_at is not None else None
        if end is None:
            end = self._admission.clock()
        return max(0.0, end - self.entered_at)

    @property
    def position(self) -> int:
        """Requests expected to be served before this one, plus one (0: admitted)."""
        return self._admission._position(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a slot: True once admitted, False when ``timeout`` passed first.

        Without ``timeout``, waits until admitted. Raises
        :class:`QueueTimeoutError` at the queue deadline and
        :class:`LeftQueueError` once cancelled (the slot, if just given, goes
        back).
        """
        waited = False
        while True:
            if self._admission._check(self):
                return True
            remaining = self.deadline - self._admission.clock()
            if timeout is not None:
                if waited:
                    return False
                remaining = min(remaining, timeout)
            waited = True
            # Not admitted, not cancelled: it joined the queue, so has its event.
            assert self._event is not None
            self._event.wait(max(0.0, remaining))

    def cancel(self) -> None:
        """The client left: leave the queue now (from any thread)."""
        self.cancelled = True
        self._admission._leave(self)
        self._wake()

    def release(self) -> None:
        """Give the slot back, or leave the queue; idempotent."""
        self._admission._release(self)
        self._wake()

    def _wake(self) -> None:
        """Wake the request if it sleeps in the queue (none sleeps otherwise)."""
        event = self._event
        if event is not None:
            event.set()


class _Flow:
    """One caller's waiting requests at one host, with its DRR deficit."""

    __slots__ = ("caller", "deficit", "has_turn", "tickets", "weight")

    def __init__(self, caller: str, weight: float) -> None:
        self.caller = caller
        self.weight = weight
        self.tickets: collections.deque[Ticket] = collections.deque()
        self.deficit = 0.0
        self.has_turn = False


class _Host:
    """A host's slots, in-flight count, waiting flows and service time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.configured: int | None = None
        self.discovered: int | None = None
        self.in_flight = 0
        self.flows: dict[str, _Flow] = {}
        #: Flows with requests waiting, in round-robin order.
        self.active: collections.deque[_Flow] = collections.deque()
        self.waiting = 0
        self.mean_service: float | None = None
        self.dispatching = False
        self.again = False

    def push(self, ticket: Ticket) -> None:
        flow = self.flows.get(ticket.caller)
        if flow is None:
            flow = self.flows[ticket.caller] = _Flow(ticket.caller, ticket.weight)
            self.active.append(flow)
        flow.weight = ticket.weight
        flow.tickets.append(ticket)
        self.waiting += 1

    def pop_next(self, quantum: float) -> Ticket | None:
        """The next request by deficit round robin (each request costs 1)."""
        while self.active:
            flow = self.active[0]
            if not flow.has_turn:
                flow.deficit += quantum * flow.weight
                flow.has_turn = True
            if flow.deficit >= 1.0:
                flow.deficit -= 1.0
                ticket = flow.tickets.popleft()
                self.waiting -= 1
                if not flow.tickets:
                    # An emptied flow keeps no credit (DRR): it rejoins at the back.
                    self.active.popleft()
                    del self.flows[flow.caller]
                return ticket
            flow.has_turn = False
            self.active.rotate(-1)
        return None

    def remove(self, ticket: Ticket) -> None:
        flow = self.flows[ticket.caller]
        flow.tickets.remove(ticket)
        self.waiting -= 1
        if not flow.tickets:
            self.active.remove(flow)
            del self.flows[flow.caller]

    def position(self, ticket: Ticket, quantum: float) -> int:
        """Requests served before ``ticket`` if nothing else arrives, plus one.

        Exact for equal weights; with weights, each other flow is counted for
        its weighted share of the rounds ``ticket``'s flow needs (capped by
        what it has waiting). O(flows), not O(queue).
        """
        flow = self.flows[ticket.caller]
        index = flow.tickets.index(ticket)
        order = list(self.active)
        head = order[0]
        if head.has_turn and head.deficit < 1.0:
            # Its turn is over: the next choice moves it to the back.
            order.append(order.pop(0))
        mine = order.index(flow)

        def rounds_to_serve(other: _Flow, count: float) -> float:
            """Rounds (the current one first) until ``other`` has ``count`` credit."""
            current = 1 if other is order[0] and other.has_turn else 0
            needed = max(0.0, count - other.deficit)
            return current + needed / (quantum * other.weight)

        # The round in which this ticket is served (1: the current one).
        rounds = max(1, math.ceil(rounds_to_serve(flow, index + 1) - 1e-9))
        if flow is order[0] and flow.has_turn and index + 1 <= flow.deficit:
            rounds = 1
        ahead = index
        for place, other in enumerate(order):
            if other is flow:
                continue
            # Flows before this one serve in this ticket's round too.
            full = rounds if place < mine else rounds - 1
            if other is order[0] and other.has_turn:
                credit = other.deficit + (full - 1) * quantum * other.weight
            else:
                credit = other.deficit + full * quantum * other.weight
            ahead += min(len(other.tickets), max(0, int(credit + 1e-9)))
        return ahead + 1


class Admission:
    """Slots per host and the fair queue in front of them, for one process."""

    def __init__(
        self,
        *,
        queue_max: int = 1000,
        queue_timeout: float = 60.0,
        max_per_key: int | None = None,
        store: SlotStore | None = None,
        default_slots: int = DEFAULT_SLOTS,
        quantum: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue_max = queue_max
        self.queue_timeout = queue_timeout
        self.max_per_key = (
            max_per_key if max_per_key is not None else max(1, queue_max // 4)
        )
        self.store: SlotStore = store if store is not None else LocalSlots()
        self.default_slots = default_slots
        self.quantum = quantum
        self.clock = clock
        self._lock = threading.Lock()
        self._hosts: dict[str, _Host] = {}
        self._queued = 0
        self._per_caller: collections.Counter[str] = collections.Counter()
        self._attached: int | None = None
        #: Told a host's waiting requests after each change (metrics).
        self.on_depth: Callable[[str, int], None] | None = None
        #: Told each admission: the host and the seconds it waited (metrics).
        self.on_admitted: Callable[[str, float], None] | None = None

    # -- slots -----------------------------------------------------------------

    def configure(self, host: str, slots: int | None) -> None:
        """Set a host's slots from its settings (beats what discovery reports)."""
        with self._lock:
            self._host(host).configured = slots
        self.poke(host)

    def discovered(self, host: str, slots: int | None) -> None:
        """Record the slot count a host reports (used unless one is configured)."""
        with self._lock:
            self._host(host).discovered = slots
        self.poke(host)

    def slots(self, host: str) -> int:
        """The host's slots: configured, else discovered, else the default."""
        with self._lock:
            return self._slots(self._host(host))

    def _slots(self, entry: _Host) -> int:
        for value in (entry.configured, entry.discovered):
            if value:
                return value
        return self.default_slots

    def _host(self, host: str) -> _Host:
        entry = self._hosts.get(host)
        if entry is None:
            entry = self._hosts[host] = _Host(host)
        return entry

    # -- entering --------------------------------------------------------------

    def enter(self, host: str, caller: str, weight: float = 1.0) -> Ticket:
        """Take a slot of ``host`` now, or a place in the queue for one.

        Returns a :class:`Ticket` (``admitted`` or waiting: then
        :meth:`Ticket.wait`). Raises :class:`QueueFullError` when the queue,
        or the caller's share of it, is full: the request never waited.
        """
        self._attach()
        ticket = Ticket(self, host, caller, _clamped(weight))
        with self._lock:
            entry = self._host(host)
            slots = self._slots(entry)
            nobody_waits = not entry.waiting
        if nobody_waits:
            lease = self.store.try_acquire(host, slots)
            if lease is not None:
                with self._lock:
                    self._admit(entry, ticket, lease)
                return ticket
        with self._lock:
            if self._queued >= self.queue_max:
                raise QueueFullError(
                    "The gateway's queue is full; retry later.",
                    self._retry_after(entry, entry.waiting + 1),
                    "queue",
                )
            if self._per_caller[caller] >= self.max_per_key:
                mine = sum(
                    len(flow.tickets)
                    for other in self._hosts.values()
                    for flow in other.flows.values()
                    if flow.caller == caller
                )
                raise QueueFullError(
                    "This caller already has as many requests waiting as it may; "
                    "retry later.",
                    self._retry_after(entry, mine + 1),
                    "key",
                )
            ticket._event = threading.Event()
            entry.push(ticket)
            self._queued += 1
            self._per_caller[caller] += 1
            if self.on_depth is not None:
                self.on_depth(host, entry.waiting)
        self._dispatch(entry)
        return ticket

    def first_slots(self, host: str) -> int | None:
        """``host``'s slots while no request waits for one, else None.

        A slot taken while this says so passes no waiting request: what
        :meth:`enter` checks before it asks the store, for a slot asked for
        elsewhere (with another trip to a shared store) and then given to
        :meth:`admit_taken`.
        """
        self._attach()
        with self._lock:
            entry = self._host(host)
            return None if entry.waiting else self._slots(entry)

    def admit_taken(
        self, host: str, caller: str, lease: Lease, weight: float = 1.0
    ) -> Ticket:
        """An admitted ticket holding ``lease``, taken as :meth:`first_slots` let."""
        ticket = Ticket(self, host, caller, _clamped(weight))
        with self._lock:
            self._admit(self._host(host), ticket, lease)
        return ticket

    def _attach(self) -> None:
        if self._attached != process_id():
            # In the process that serves (a thread does not survive a fork).
            self._attached = process_id()
            self.store.attach(self.poke, self.has_waiters)

    def poke(self, host: str | None = None) -> None:
        """Try to admit waiting requests (of ``host``, or of every host)."""
        with self._lock:
            entries = [
                entry
                for name, entry in self._hosts.items()
                if entry.waiting and (host is None or name == host)
            ]
        for entry in entries:
            self._dispatch(entry)

    def has_waiters(self) -> bool:
        """True while some request waits for a slot."""
        return self._queued > 0

    # -- the fair choice -------------------------------------------------------

    def _dispatch(self, entry: _Host) -> None:
        """Give free slots to waiting requests, fairly, until none is free.

        One thread dispatches a host at a time; a release that comes while it
        does sets ``again``, so no freed slot goes unnoticed. The store is
        asked outside the lock (a shared store is a network call).
        """
        with self._lock:
            if entry.dispatching:
                entry.again = True
                return
            entry.dispatching = True
            entry.again = False
        try:
            while True:
                with self._lock:
                    if not entry.waiting:
                        entry.dispatching = False
                        return
                    slots = self._slots(entry)
                lease = self.store.try_acquire(entry.name, slots)
                with self._lock:
                    if lease is None:
                        if entry.again:
                            entry.again = False
                            continue
                        entry.dispatching = False
                        return
                    ticket = entry.pop_next(self.quantum)
                    if ticket is not None:
                        self._unqueue(ticket)
                        self._admit(entry, ticket, lease)
                if ticket is None:  # everyone left meanwhile
                    self.store.release(lease)
        except BaseException:
            with self._lock:
                entry.dispatching = False
            raise

    def _admit(self, entry: _Host, ticket: Ticket, lease: Lease) -> None:
        ticket.state = ADMITTED
        ticket.lease = lease
        ticket.admitted_at = self.clock()
        entry.in_flight += 1
        ticket._wake()
        if self.on_admitted is not None:
            self.on_admitted(entry.name, ticket.admitted_at - ticket.entered_at)

    def _unqueue(self, ticket: Ticket) -> None:
        self._queued -= 1
        self._per_caller[ticket.caller] -= 1
        if self._per_caller[ticket.caller] <= 0:
            del self._per_caller[ticket.caller]
        if self.on_depth is not None:
            self.on_depth(ticket.host, self._hosts[ticket.host].waiting)

    # -- leaving ---------------------------------------------------------------

    def _check(self, ticket: Ticket) -> bool:
        """True once admitted; raise if cancelled or past the deadline."""
        with self._lock:
            if ticket.cancelled:
                pass
            elif ticket.state == ADMITTED:
                return True
            elif ticket.state == WAITING and self.clock() >= ticket.deadline:
                entry = self._hosts[ticket.host]
                entry.remove(ticket)
                self._unqueue(ticket)
                ticket.state = DONE
                raise QueueTimeoutError(
                    f"No slot of the model server freed within "
                    f"{self.queue_timeout:g} s; retry later.",
                    self._retry_after(entry, entry.waiting + 1),
                )
            elif ticket.state == WAITING:
                return False
        ticket.release()
        raise LeftQueueError("The client left while its request was queued.")

    def _leave(self, ticket: Ticket) -> None:
        """Leave the queue at once if still waiting (the slot is not wasted)."""
        with self._lock:
            if ticket.state != WAITING:
                return
            self._hosts[ticket.host].remove(ticket)
            self._unqueue(ticket)
            ticket.state = DONE

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.state == WAITING:
                self._hosts[ticket.host].remove(ticket)
                self._unqueue(ticket)
                ticket.state = DONE
                return
            if ticket.state != ADMITTED:
                return
            ticket.state = DONE
            entry = self._hosts[ticket.host]
            entry.in_flight -= 1
            served = self.clock() - (ticket.admitted_at or self.clock())
            if entry.mean_service is None:
                entry.mean_service = served
            else:
                entry.mean_service += SERVICE_EWMA_ALPHA * (served - entry.mean_service)
            lease = ticket.lease
        if lease is not None:
            # Waiting requests try for the slot once it is really back.
            self.store.release(lease, lambda: self._dispatch(entry))
        else:
            self._dispatch(entry)

    # -- what callers are told -------------------------------------------------

    def _position(self, ticket: Ticket) -> int:
        with self._lock:
            if ticket.state != WAITING:
                return 0
            return self._hosts[ticket.host].position(ticket, self.quantum)

    def _retry_after(self, entry: _Host, ahead: int) -> int:
        """Seconds until ``ahead`` requests are served at the recent service rate."""
        mean = entry.mean_service
        if mean is None or mean <= 0:
            mean = DEFAULT_SERVICE_SECONDS
        seconds = ahead * mean / self._slots(entry)
        return int(min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, math.ceil(seconds))))

    def retry_after(self, host: str, ahead: int = 1) -> int:
        """The ``Retry-After`` for a request ``ahead`` places from a slot."""
        with self._lock:
            return self._retry_after(self._host(host), ahead)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per host: slots, requests in flight from this process, waiting."""
        with self._lock:
            return {
                name: {
                    "slots": self._slots(entry),
                    "in_flight": entry.in_flight,
                    "queued": entry.waiting,
                }
                for name, entry in self._hosts.items()
            }
