"""Spreading connections evenly over gunicorn's worker processes.

The workers share one listening socket, and a worker takes up to
``server.ACCEPTS_PER_EVENT`` connections each time it wakes for it (so that a
flood of slow sockets is taken in fast; see :mod:`llm_service.server`). A client
that opens a burst of keep-alive connections (wrk, any connection pool) so
lands all of them on the worker that woke first, and the others idle for the
connections' whole life: two workers served no more than one.

Here each worker publishes, in a small table shared by the workers of one
gunicorn master, its open connection count and a heartbeat. When the listener
is readable, a worker holding ``SLACK`` connections or more than the least
loaded live other worker *defers*: it stops listening for a moment, so the
other, woken by the same connection, takes it. It looks again every
``QUANTUM`` and listens again as soon as it is no longer ahead. A worker that
is stalled (stopped, dead but not reaped yet, its loop starved of the GIL or
of the CPU) cannot hold accepting up: after ``BOUND`` (10 ms) the deferring
worker accepts anyway, ``SLACK`` connections the first time and twice as
many each time in a row the others still have not caught up (2, 4, 8 ... 64:
full speed within 60 ms), so a sibling that was only slow to run costs a few
connections of spread, and one that is stuck costs new connections at most
tens of milliseconds. A worker whose heartbeat is older than ``STALE`` is not
waited for at all. With one worker (or ``reuse_port``) nothing of this runs.

Races. Workers read and write the table without locks, so a read may see a
count a moment old or a slot half written. That only makes one spread less
even; it never loses a connection (only the worker that accepts it touches it)
and never keeps a worker from accepting for longer than ``BOUND`` at a time.

Why not ``SO_REUSEPORT`` (gunicorn's ``reuse_port``: a listening socket per
worker, the kernel spreading connections over them). The kernel spreads by a
hash of the addresses, not by load, so a stalled worker keeps receiving its
share; and when a worker stops (restart, ``max_requests``, shutdown), the
connections waiting in its socket's backlog are reset, unless
``net.ipv4.tcp_migrate_req`` (Linux 5.14+, a host setting the gateway cannot
rely on) moves them to another listener. The one shared socket keeps every
waiting connection whatever worker comes and goes.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

#: A worker defers while it holds this many connections more than the least
#: loaded live other worker (so a burst ends within 1 of even either way).
SLACK = 2
#: How often a deferring worker looks again whether it is still ahead (s).
QUANTUM = 0.001
#: The longest a worker defers before it accepts anyway (s). Two of CPython's
#: GIL switch intervals (5 ms): a healthy worker whose request threads hold
#: the GIL turns its loop only every 5 to 15 ms, and 5 ms took such a worker
#: for a stalled one (measured: a burst of 64 then split 46/18 as often as
#: not). The allowance that follows grows when the bound runs out again, so a
#: sibling slow to be scheduled on a busy machine costs little either.
BOUND = 0.01
#: Each time in a row a deferral runs out, the allowance is this many times
#: the last (``SLACK`` the first time).
GROWTH = 2
#: A worker whose heartbeat is older than this is not waited for (s). An idle
#: worker beats at least once a second (gthread's loop wakes every second).
STALE = 2.0
#: Slots in the table: more worker processes than this at once (old and new
#: during a reload count together) are left out of the spreading.
MAX_SLOTS = 1024

_HEADER = struct.Struct("q")  # slots in use: every slot ever claimed is below
_SLOT = struct.Struct("dq")  # heartbeat (CLOCK_MONOTONIC, 0 = not accepting), conns


def ahead(conns: int, own: int, slots: Iterable[tuple[float, int]], now: float) -> bool:
    """Whether a worker with ``conns`` connections should let another accept.

    ``slots`` are every worker's (heartbeat, connections), ``own`` this
    worker's index among them. Workers that do not beat (stopping, not booted
    yet, stalled or dead) are left out; with none left, the answer is no.
    """
    least = min(
        (
            count
            for index, (beat, count) in enumerate(slots)
            if index != own and now - beat < STALE
        ),
        default=None,
    )
    return least is not None and conns - least >= SLACK


def _exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited (without reaping it: the arbiter does)."""
    try:
        return (
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        )
    except ChildProcessError:  # reaped already
        return True


class Table:
    """Each worker's heartbeat and connection count, in memory shared by them.

    Made in the gunicorn master before it forks the workers (an anonymous
    shared mapping, inherited by each), which gives each worker its slot:
    :meth:`claim` runs in the master, when the arbiter makes the worker
    object, so two workers alive at once never share a slot.
    """

    def __init__(self, slots: int = MAX_SLOTS) -> None:
        self.size = slots
        self.memory = mmap.mmap(-1, _HEADER.size + slots * _SLOT.size)
        #: The master's record of each slot's worker (it has ``pid`` once forked).
        self.owners: list[Any] = [None] * slots

    def claim(self, owner: Any) -> int | None:
        """In the master: a slot for ``owner``, a worker object not forked yet.

        A slot is free when its worker was never forked or has exited; the
        lowest free one is taken, so the table's used part stays as small as
        the number of workers. None when every slot is held.
        """
        for index, held in enumerate(self.owners):
            pid = getattr(held, "pid", None)
            if held is None or not isinstance(pid, int) or _exited(pid):
                self.owners[index] = owner
                self.write(index, 0.0, 0)
                used = _HEADER.unpack_from(self.memory)[0]
                if index >= used:
                    _HEADER.pack_into(self.memory, 0, index + 1)
                return index
        return None

    # No lock between processes: a torn or late read only skews one spread.
    def write(self, index: int, beat: float, conns: int) -> None:
        _SLOT.pack_into(self.memory, _HEADER.size + index * _SLOT.size, beat, conns)

    def read(self) -> list[tuple[float, int]]:
        """Every slot in use: (heartbeat, connections)."""
        used = min(self.size, _HEADER.unpack_from(self.memory)[0])
        end = _HEADER.size + used * _SLOT.size
        return list(_SLOT.iter_unpack(self.memory[_HEADER.size : end]))


class Balancer:
    """One worker's side: publish its count, and say when to let others accept.

    The worker calls :meth:`publish` before each wait of its loop and after
    each accept, :meth:`defer` before each accept, :meth:`may_listen` on each
    turn of its loop while deferring, and :meth:`leave` when it stops
    listening. All on the worker's main thread.
    """

    def __init__(
        self, table: Table, slot: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.table = table
        self.slot = slot
        self.clock = clock
        #: When the current deferral began; None when not deferring.
        self.since: float | None = None
        #: Until when (a deferral having run out) a wake-up accepts regardless,
        #: and how many connections; deferrals run out in a row.
        self.forced_until = 0.0
        self.allowance = 0
        self.streak = 0

    @property
    def deferring(self) -> bool:
        return self.since is not None

    def publish(self, conns: int) -> None:
        self.table.write(self.slot, self.clock(), conns)

    def leave(self) -> None:
        """No longer accepting (stopping): others stop waiting for this worker."""
        self.table.write(self.slot, 0.0, 0)

    def take_forced(self) -> int:
        """How many connections this wake-up accepts without asking.

        Right after a deferral ran out (what waits then has waited ``BOUND``
        for the others), once; else 0: a connection that comes later is asked for.
        """
        forced = self.allowance if self.clock() < self.forced_until else 0
        self.forced_until = 0.0
        return forced

    def defer(self, conns: int) -> bool:
        """Before an accept: whether to stop listening and let another take it."""
        now = self.clock()
        if not ahead(conns, self.slot, self.table.read(), now):
            self.streak = 0
            return False
        if self.since is None:
            self.since = now
        return True

    def may_listen(self, conns: int) -> bool:
        """While deferring: whether to listen again (no longer ahead, or time's up)."""
        now = self.clock()
        assert self.since is not None
        if ahead(conns, self.slot, self.table.read(), now):
            if now - self.since < BOUND:
                return False
            # Still ahead after BOUND: the others are stalled (or nothing came).
            self.streak = min(self.streak + 1, 8)
            self.allowance = SLACK * GROWTH ** (self.streak - 1)
            self.forced_until = now + BOUND
        else:
            self.streak = 0
        self.since = None
        return True

    def timeout(self, timeout: float) -> float:
        """The loop's wait, shortened while deferring to look again soon."""
        return min(timeout, QUANTUM) if self.since is not None else timeout


#: The master's table, made when it makes its first worker (before any fork).
_table: Table | None = None


def for_worker(worker: Any) -> Balancer | None:
    """In the master, as the arbiter makes ``worker``: its balancer, or None.

    None with one worker configured (nothing to spread over, nothing to pay),
    with ``reuse_port`` (each worker has its own listener: deferring would
    only delay its connections), or when every slot is held.
    """
    global _table
    cfg = worker.cfg
    if cfg.workers <= 1 or cfg.reuse_port:
        return None
    if _table is None:
        _table = Table()
    slot = _table.claim(worker)
    return None if slot is None else Balancer(_table, slot)
