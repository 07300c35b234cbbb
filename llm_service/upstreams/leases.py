"""Slots shared by every worker and instance: leases in Redis, Lua for atomicity.

Each host's slots in use are a sorted set ``llm_service:slots:<host>`` of lease
ids scored by their expiry (Redis' own clock, so gateways on machines with
different clocks agree). Taking a slot drops expired leases and adds one only
while fewer than the host's slots remain, in one script; a running request's
lease is renewed every third of ``lease_seconds``; a released slot is announced
on a channel so waiting gateways try again at once. A gateway that crashes
renews nothing: its slots come back when their leases expire.

While Redis is unreachable (or answers slower than the store's timeout),
:class:`SharedSlots` counts in this process instead, with each worker taking
its share of a host's slots (:func:`.admission.workers_share`); Redis is tried
again after 1, 2, 4 ... 32 s. Requests admitted during the outage hold no
lease, so for their lifetime after Redis returns the host may be over-admitted
by up to one worker's share.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .. import store
from .admission import Lease, LocalSlots

log = logging.getLogger("llm_service.admission")

PREFIX = "llm_service:slots"
CHANNEL = f"{PREFIX}:freed"
#: While requests wait, how often expired leases (a crashed gateway's) are
#: looked for, in case no release is announced.
POLL_SECONDS = 1.0
#: A process that has not asked for a slot this long is no longer waiting (one
#: whose waiters all left, or that died): it loses its place in the line.
FORGET_WAITER_MS = int(2.5 * POLL_SECONDS * 1000)
#: Longest pause before Redis is tried again after a failure.
MAX_BACKOFF_SECONDS = 32.0

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: KEYS: the host's leases, its waiting processes (by when they began to wait),
#: when each was last seen waiting. ARGV: slots, lease ms, lease id, process id,
#: ms after which a process not seen waiting is forgotten, and ``0`` (optional)
#: for an ask that must not join the line when refused. Returns 1 if taken.
#:
#: Free slots go to the processes that have waited longest first (one turn
#: each, then to the back of the line): without this, the process that just
#: released a slot would take it again before any other heard of it. An ask
#: made along the quota admission, while no request of the process waits
#: (:meth:`SharedSlots.ask_along`), keeps out of the line when refused: the
#: request asks again, from the door.
ACQUIRE = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[5]))
for _, process in ipairs(stale) do
  redis.call('ZREM', KEYS[2], process)
  redis.call('ZREM', KEYS[3], process)
end
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local since = redis.call('ZSCORE', KEYS[2], ARGV[4])
local ahead
if since then
  ahead = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. since)
else
  ahead = redis.call('ZCARD', KEYS[2])
end
if free <= ahead then
  if ARGV[6] == '0' then
    return 0
  end
  if not since then
    redis.call('ZADD', KEYS[2], now, ARGV[4])
  end
  redis.call('ZADD', KEYS[3], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], 2 * tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[3], 2 * tonumber(ARGV[2]))
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return 1
"""
)

#: KEYS: the host's set. ARGV: lease ms, lease ids... Returns how many were held.
RENEW = (
    _NOW_MS
    + """
local renewed = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
    renewed = renewed + 1
  end
end
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
return renewed
"""
)

#: KEYS: the host's set, the channel, its waiting processes. ARGV: lease id,
#: host. Returns 1 if held.
#:
#: The release is announced only while some process waits for the host: a
#: process that waits has tried ACQUIRE and is in that set (both scripts are
#: atomic, so no release falls between its try and its registration), and with
#: nobody waiting, an announcement would only wake every gateway's listener.
RELEASE = """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('PUBLISH', KEYS[2], ARGV[2])
end
return removed
"""


def slots_key(host: str) -> str:
    return f"{PREFIX}:{host}"


def _turn_keys(host: str) -> list[str]:
    return [f"{PREFIX}:{host}:waiting", f"{PREFIX}:{host}:seen"]


class RedisSlots:
    """Leases of host slots in one Redis; every method may raise Redis' errors."""

    def __init__(self, client: Any, lease_seconds: float) -> None:
        self.client = client
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self._acquire = client.register_script(ACQUIRE)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        #: This process in the line of processes waiting for a host's slots.
        self.process = uuid.uuid4().hex
        self._lock = threading.Lock()
        #: Leases held by this process: id -> host.
        self.held: dict[str, str] = {}

    def try_acquire(self, host: str, slots: int) -> Lease | None:
        lease = Lease(host, shared=True)
        return self.took(lease, store.run(*self.acquiring(lease, slots)))

    def acquiring(
        self, lease: Lease, slots: int, join: bool = True
    ) -> tuple[Any, Any, list[str], list[Any]]:
        """What asks Redis for ``lease`` (client, script, keys, arguments).

        ``join``: if refused, the process joins the line of those waiting.
        """
        args = [slots, self.lease_ms, lease.id, self.process, FORGET_WAITER_MS]
        if not join:
            args.append(0)
        return (
            self.client,
            self._acquire,
            [slots_key(lease.host), *_turn_keys(lease.host)],
            args,
        )

    def took(self, lease: Lease, taken: Any) -> Lease | None:
        """``lease`` if Redis' answer to :meth:`acquiring` says it was taken."""
        if not taken:
            return None
        with self._lock:
            self.held[lease.id] = lease.host
        return lease

    def release(self, lease: Lease, done: store.Done | None = None) -> None:
        """Give the lease back (with the request's other end-writes: :mod:`..store`)."""
        with self._lock:
            self.held.pop(lease.id, None)
        waiting, _ = _turn_keys(lease.host)
        store.write(
            self.client,
            self._release,
            [slots_key(lease.host), CHANNEL, waiting],
            [lease.id, lease.host],
            done,
        )

    def renew(self) -> int:
        """Extend every lease this process holds; return how many were lost."""
        with self._lock:
            by_host: dict[str, list[str]] = {}
            for lease_id, host in self.held.items():
                by_host.setdefault(host, []).append(lease_id)
        lost = 0
        for host, ids in by_host.items():
            renewed = self._renew(keys=[slots_key(host)], args=[self.lease_ms, *ids])
            lost += len(ids) - int(renewed)
        return lost


class SharedSlots:
    """Slots in Redis, or this process's share of them while Redis is away.

    A :class:`~.admission.SlotStore`: never raises, waits at most the Redis
    client's socket timeout per call. One thread per process (started when the
    admission first attaches, in the worker, not before gunicorn forks) renews
    the leases held and listens for slots freed by other processes.
    """

    def __init__(
        self,
        redis_slots: RedisSlots,
        local: LocalSlots,
        *,
        renew_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis_slots
        self.local = local
        self.renew_seconds = renew_seconds
        self.clock = clock
        self._down_until = 0.0
        self._backoff = 1.0
        self._on_freed: Callable[[], None] | None = None
        self._has_waiters: Callable[[], bool] = lambda: True
        self._pid: int | None = None
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        """``redis``, or ``local-fallback`` while Redis is away."""
        return "local-fallback" if self.clock() < self._down_until else "redis"

    def try_acquire(self, host: str, slots: int) -> Lease | None:
        if self.clock() >= self._down_until:
            try:
                lease = self.redis.try_acquire(host, slots)
            except Exception as err:  # any failure of the store: count here
                self._failed(err)
            else:
                self._backoff = 1.0
                return lease
        return self.local.try_acquire(host, slots)

    def ask_along(
        self,
        host: str,
        slots: Callable[[], int | None],
        then: Callable[[Lease | None], None],
    ) -> None:
        """Ask for a slot of ``host`` inside this request's quota admission.

        :meth:`try_acquire` without a trip of its own (:func:`..store.ride`):
        at the admission's trip, ``slots()`` gives the host's slots, or None
        to ask nothing; the ACQUIRE script runs in the admission's script,
        only if the request was admitted. ``then`` hears the lease taken, or
        None (not admitted, or no slot free: the process does not join the
        line; Redis away or failing: counted as a failure). Nothing is asked
        while Redis is away (slots are counted here then).
        """
        lease: Lease | None = None  # made at the trip, if one is asked for

        def prepare() -> tuple[Any, list[str], list[Any]] | None:
            nonlocal lease
            if self.clock() < self._down_until:
                return None
            count = slots()
            if count is None:
                return None
            lease = Lease(host, shared=True)
            _, script, keys, args = self.redis.acquiring(lease, count, join=False)
            return script, keys, args

        def answer(reply: Any) -> None:
            if isinstance(reply, Exception):
                self._failed(reply)
                then(None)
                return
            self._backoff = 1.0
            assert lease is not None  # answered: prepared
            # None: not run (the request was not admitted), nothing taken.
            then(self.redis.took(lease, reply))

        store.ride(self.redis.client, prepare, answer)

    def release(self, lease: Lease, then: Callable[[], None] | None = None) -> None:
        if not lease.shared:
            self.local.release(lease)
            # Another process may wait for the slot this one held in its share.
            if then is not None:
                then()
            return

        def done(error: Exception | None) -> None:
            if error is not None:  # the lease expires by itself
                self._failed(error)
            if then is not None:
                then()

        self.redis.release(lease, done)

    def _failed(self, err: Exception) -> None:
        with self._lock:
            if self.clock() < self._down_until:
                return
            self._down_until = self.clock() + self._backoff
            log.warning(
                "slot store unreachable (%s); counting slots in this process for %g s",
                type(err).__name__,
                self._backoff,
            )
            self._backoff = min(MAX_BACKOFF_SECONDS, self._backoff * 2)

    def attach(
        self, on_freed: Callable[[], None], has_waiters: Callable[[], bool]
    ) -> None:
        """Start this process's renewing and listening thread (once per process)."""
        with self._lock:
            self._on_freed = on_freed
            self._has_waiters = has_waiters
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
        threading.Thread(target=self._run, name="slot-leases", daemon=True).start()

    def _run(self) -> None:
        pubsub = None
        next_renewal = self.clock() + self.renew_seconds
        while True:
            wait = POLL_SECONDS if self._has_waiters() else self.renew_seconds
            wait = max(0.05, min(wait, next_renewal - self.clock()))
            freed = False
            try:
                if pubsub is None:
                    pubsub = self.redis.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(CHANNEL)
                freed = pubsub.get_message(timeout=wait) is not None
            except Exception as err:  # Redis away: wait, then subscribe again
                log.debug("slot channel unavailable: %s", type(err).__name__)
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # already broken
                        pubsub.close()
                pubsub = None
                time.sleep(wait)
            if self.clock() >= next_renewal:
                next_renewal = self.clock() + self.renew_seconds
                try:
                    lost = self.redis.renew()
                except Exception as err:
                    self._failed(err)
                else:
                    if lost:
                        log.warning("%d slot lease(s) expired before renewal", lost)
            if (freed or self._has_waiters()) and self._on_freed is not None:
                try:
                    self._on_freed()
                except Exception:  # the thread must outlive any one failure
                    log.exception("admitting waiting requests failed")


def redis_store(client: Any, lease_seconds: float, local: LocalSlots) -> SharedSlots:
    """Slots leased in Redis (``client``), this process's share while it is away."""
    return SharedSlots(
        RedisSlots(client, lease_seconds), local, renew_seconds=lease_seconds / 3
    )
