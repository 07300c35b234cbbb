"""Waiting for a slot, as a request sees it: caller, hang-ups, queue comments.

The door (:mod:`.pool`) takes a slot of the host before each generation call
or stream opens, and gives it back when the call ends or the stream closes.
With one host it may find the slot taken already (:class:`EarlySlot`: taken
in the script of the request's quota admission, if it admitted the request).
This module is the Flask side of :mod:`.admission`: who the caller is (the
API key's name and weight once keys exist, else the client address), a
hang-up while queued (the disconnect watcher cancels the ticket: the request
leaves the queue and nothing is sent upstream), the answers for a full queue
and for a wait past the deadline (503 ``queue_full`` / ``queue_timeout`` with a
``Retry-After`` from the recent service rate), and the time waited
(``g.queue_time``: the ``X-Queue-Time`` header, the access record, the
final event of a stream).

A stream that must wait answers at once with its headers and an SSE comment
``: queued position=N``, repeated every :data:`QUEUE_NOTICE_SECONDS`, so
proxies keep the connection and a UI can show the position; its upstream
stream opens once a slot is free. From then on a failure (the deadline too)
can only be an error event.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from flask import g, has_request_context, request

from .. import lifecycle, store
from ..errors import APIError
from ..lifecycle import ShuttingDownError, drain
from ..lmstudio.errors import LMStudioCancelledError
from ..lmstudio.stream import UpstreamStream
from ..lmstudio.watchdog import CallScope
from .admission import (
    Admission,
    AdmissionError,
    Lease,
    LeftQueueError,
    LocalSlots,
    QueueFullError,
    Ticket,
    workers_share,
)
from .hangups import disconnects

log = logging.getLogger("llm_service.admission")

#: Seconds between two ``: queued position=N`` comments on a waiting stream.
QUEUE_NOTICE_SECONDS = 2.0


class QueueNotice:
    """An SSE comment for a waiting stream: its place in the queue."""

    __slots__ = ("data",)

    def __init__(self, position: int) -> None:
        self.data = f": queued position={position}\n\n".encode()


def caller() -> tuple[str, float]:
    """Who the request counts for in the fair queue, and that caller's weight."""
    if not has_request_context():
        return "local", 1.0
    key = g.get("caller")
    if key is not None:
        if isinstance(key, dict):
            name, weight = key.get("name"), key.get("weight")
        else:
            name, weight = getattr(key, "name", None), getattr(key, "weight", None)
        return f"key:{name}", float(weight or 1)
    return f"addr:{request.remote_addr}", 1.0


def queue_failure(err: AdmissionError) -> APIError:
    """The 503 a refused or timed-out request gets, with its ``Retry-After``."""
    code = "queue_full" if isinstance(err, QueueFullError) else "queue_timeout"
    return APIError(503, code, str(err), headers={"Retry-After": str(err.retry_after)})


def enter(admission: Admission, host: str) -> Ticket:
    """A slot of ``host`` or a place in its queue; 503 ``queue_full`` if none."""
    name, weight = caller()
    try:
        return admission.enter(host, name, weight)
    except QueueFullError as err:
        log.warning(
            "request refused: the queue is full (%s)",
            err.scope,
            extra={"error_code": "queue_full"},
        )
        raise queue_failure(err) from None


def record_wait(ticket: Ticket) -> None:
    """Note the time the request waited for its slot (header, access record)."""
    if has_request_context():
        g.queue_time = ticket.waited


def wait(ticket: Ticket) -> None:
    """Wait until ``ticket`` holds a slot; leave at once if the client hangs up."""
    if not ticket.admitted:
        sock = request.environ.get("gunicorn.socket") if has_request_context() else None
        stop_watching = disconnects.watch(sock, ticket.cancel)
        try:
            ticket.wait()
        except AdmissionError as err:
            raise queue_failure(err) from None
        except LeftQueueError:
            raise LMStudioCancelledError(
                "The client went away while its request was queued."
            ) from None
        finally:
            stop_watching()
    record_wait(ticket)


@contextlib.contextmanager
def slot(admission: Admission, host: str) -> Iterator[Ticket]:
    """Hold a slot of ``host`` for the duration of a call."""
    ticket = enter(admission, host)
    try:
        wait(ticket)
        yield ticket
    finally:
        ticket.release()


class EarlySlot:
    """A slot of one host asked for before the view, with another trip.

    Made before the view when the host is known already (one host): the slot
    is asked for in the script of the request's quota admission
    (:meth:`~.leases.SharedSlots.ask_along`), taken only if the quota
    admitted the request, and asked only if no request of this process waits
    for the host at that moment, so it passes nobody. The door takes the
    admitted ticket with :meth:`claim`; one still unclaimed when the request
    ends (an invalid body, a failure before its call) is given back then,
    with the request's other end-writes.
    """

    def __init__(self, admission: Admission, host: str) -> None:
        self.admission = admission
        self.host = host
        self.ticket: Ticket | None = None
        self.claimed = False
        admission.store.ask_along(host, self._slots, self._took)

    def _slots(self) -> int | None:
        if self.claimed:  # the door asked before any trip came
            return None
        return self.admission.first_slots(self.host)

    def _took(self, lease: Lease | None) -> None:
        if lease is None:
            return
        name, weight = caller()
        self.ticket = self.admission.admit_taken(self.host, name, lease, weight)
        store.defer(self._unclaimed)

    def claim(self, host: str) -> Ticket | None:
        """The admitted ticket if a slot of ``host`` was taken; none is asked after."""
        self.claimed = True
        ticket, self.ticket = self.ticket, None
        if ticket is not None and ticket.host != host:
            ticket.release()
            return None
        return ticket

    def _unclaimed(self) -> None:
        self.claimed = True
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            ticket.release()


class SlotStream:
    """An upstream stream that holds a slot until it closes.

    Made either around a stream already open (the slot was free), or around
    a ticket still waiting and the function that opens the stream once it is
    admitted: its :meth:`events` then yield :class:`QueueNotice` comments
    first. Offers what :func:`llm_service.streaming.relay` uses of an
    :class:`~llm_service.lmstudio.stream.UpstreamStream`.
    """

    def __init__(
        self,
        ticket: Ticket,
        stream: UpstreamStream | None = None,
        opener: Callable[[CallScope], UpstreamStream] | None = None,
    ) -> None:
        self.ticket = ticket
        self.stream = stream
        self._opener = opener
        self._scope = CallScope()
        self.cancelled = False
        # A response never iterated (so never closed) still gives its slot back.
        self._finalizer = weakref.finalize(self, ticket.release)

    @property
    def error(self) -> Any:
        """The opened stream's failure, for the call's record (metrics)."""
        return getattr(self.stream, "error", None)

    @error.setter
    def error(self, value: Any) -> None:
        if self.stream is not None:
            self.stream.error = value

    @property
    def total_deadline(self) -> float:
        if self.stream is not None:
            return self.stream.total_deadline
        return self.ticket.deadline

    def events(self, tick: float = 0.25) -> Iterator[Any]:
        """:class:`QueueNotice` while waiting, then the upstream's events."""
        try:
            if self.stream is None:
                yield from self._queue()
                if self.cancelled:
                    return
                assert self._opener is not None
                stream = self._opener(self._scope)
                self.stream = stream
                if self.cancelled:
                    stream.cancel()
            yield from self.stream.events(tick=tick)
        finally:
            self.close()

    def _queue(self) -> Iterator[QueueNotice]:
        ticket = self.ticket
        try:
            while not ticket.admitted:
                yield QueueNotice(ticket.position)
                pause = QUEUE_NOTICE_SECONDS
                ends_in = drain.streams_end_in()
                if ends_in is not None:
                    pause = min(pause, max(0.0, ends_in))
                if ticket.wait(timeout=pause):
                    break
                if drain.streams_must_end():
                    raise ShuttingDownError()
        except AdmissionError as err:
            raise queue_failure(err) from None
        except LeftQueueError:
            self.cancelled = True
            return
        record_wait(ticket)

    def cancel(self) -> None:
        """The client hung up: leave the queue, or abort the stream."""
        self.cancelled = True
        self.ticket.cancel()
        self._scope.cancel()
        if self.stream is not None:
            self.stream.cancel()

    def close(self) -> None:
        """Close the upstream stream and give the slot back."""
        if self.stream is not None:
            self.stream.close()
        store.defer(self._finalizer)


def build_admission(config: dict[str, Any], redis_client: Any = None) -> Admission:
    """The process's admission from the settings; Redis leases given a client."""
    local = LocalSlots(workers_share(lambda: lifecycle.workers))
    slots: Any = local
    if redis_client is not None:
        from .leases import redis_store

        slots = redis_store(redis_client, config["SLOT_LEASE_SECONDS"], local)
    return Admission(
        queue_max=config["QUEUE_MAX"],
        queue_timeout=config["QUEUE_TIMEOUT"],
        max_per_key=config["QUEUE_MAX_PER_KEY"],
        store=slots,
    )
