"""Placement: which hosts a request should go to, best first. Plain Python.

:func:`rank` turns a request's model and a snapshot of every host
(:class:`HostState`) into the order in which to try them:

1. hosts where the model is **loaded** and that are up, least loaded first
   (in-flight requests relative to slots);
2. hosts that list the model but have not loaded it (they would load it on
   demand), those with nothing in flight first, so that loading it aborts no
   generation under way;
3. for a model that no host lists, every host that is up, least loaded first:
   that host's answer decides (llama.cpp serves any name; LM Studio may know
   an alias).

Among equally loaded hosts the order is random in proportion to ``weight``.
A conversation's host (:class:`AffinityMap`) goes first while it is in the best
tier and has a free slot. Hosts that are down or whose circuit is open come
last, as a last resort: a breaker steers traffic away from a failing host while
another can serve; it never leaves a request with no host at all.

Nothing here touches sockets, threads or Flask: it is tested alone, with a fake
clock and a seeded random generator.
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_RANDOM = random.Random()  # noqa: S311 - spreading load, not secrets
#: Slots assumed for a host that neither its settings nor discovery size.
DEFAULT_SLOTS = 4


@dataclass(frozen=True)
class HostState:
    """What placement knows of one host at the moment of a request."""

    name: str
    #: Reachable at the last probe, or not probed yet.
    up: bool = True
    #: Models the host lists (downloaded, or served).
    models: tuple[str, ...] = ()
    #: Models loaded now; None when the host cannot tell (then it serves what
    #: it lists, as llama.cpp's server does).
    loaded: tuple[str, ...] | None = None
    in_flight: int = 0
    slots: int = DEFAULT_SLOTS
    weight: float = 1.0
    #: Its circuit lets a call through now.
    available: bool = True

    @property
    def servable(self) -> tuple[str, ...]:
        """Models that answer without a load: the loaded ones when known."""
        return self.loaded if self.loaded is not None else self.models

    @property
    def load(self) -> float:
        return self.in_flight / max(1, self.slots)

    @property
    def full(self) -> bool:
        """Every slot is busy: a new request would wait behind another."""
        return self.in_flight >= self.slots


def rank(
    model: str,
    hosts: Sequence[HostState],
    *,
    affinity: str | None = None,
    rng: random.Random | None = None,
) -> list[str]:
    """Return the names of ``hosts`` in the order a request for ``model`` tries them.

    Only hosts that could serve ``model`` are returned: where it is loaded,
    else where it is listed, else (no host lists it) every host.
    """
    rng = rng or _RANDOM

    def share(host: HostState) -> float:
        # Efraimidis-Spirakis: sorting by this is a random order weighted by
        # weight, so equally suitable hosts each get their share.
        return rng.expovariate(host.weight)

    loaded = [h for h in hosts if model in h.servable]
    listed = [h for h in hosts if model in h.models and h not in loaded]
    if loaded or listed:
        best = sorted(
            (h for h in loaded if _usable(h)), key=lambda h: (h.load, share(h))
        )
        best = best or sorted(
            (h for h in listed if _usable(h)),
            key=lambda h: (h.in_flight > 0, h.load, share(h)),
        )
        ordered = best + sorted(
            (h for h in listed if _usable(h) and h not in best),
            key=lambda h: (h.in_flight > 0, h.load, share(h)),
        )
        eligible = loaded + listed
    else:
        best = sorted(
            (h for h in hosts if _usable(h)), key=lambda h: (h.load, share(h))
        )
        ordered = list(best)
        eligible = list(hosts)
    for host in best:
        if host.name == affinity and not host.full:
            ordered.remove(host)
            ordered.insert(0, host)
            break
    # Last resort: down (the probe may be stale), then open circuits.
    ordered += [h for h in eligible if not _usable(h) and h.available]
    ordered += [h for h in eligible if not h.available]
    return [h.name for h in ordered]


def _usable(host: HostState) -> bool:
    return host.up and host.available


def most_common_loaded(hosts: Iterable[HostState]) -> str | None:
    """The model loaded on the most hosts that are up (the first one on a tie)."""
    counts: collections.Counter[str] = collections.Counter()
    for host in hosts:
        if host.up:
            counts.update(dict.fromkeys(host.servable, 1))
    if not counts:
        return None
    return counts.most_common(1)[0][0]


def conversation_key(model: str, messages: Any) -> str | None:
    """A conversation's key: a hash of its model and leading messages.

    The leading messages are those up to and including the first user turn
    (system prompt included): every later turn of the conversation repeats
    them, so each turn gets the same key. None without a user turn.
    """
    if not isinstance(messages, list):
        return None
    leading = []
    for message in messages:
        leading.append(message)
        if isinstance(message, dict) and message.get("role") == "user":
            break
    else:
        return None
    text = json.dumps([model, leading], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class AffinityMap:
    """Conversation key -> host name, bounded in size and in time.

    Entries expire ``ttl`` seconds after their last use; past ``max_size``, the
    least recently used entry goes. Safe from any thread.
    """

    def __init__(
        self,
        ttl: float,
        max_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_size = max_size
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, tuple[str, float]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: str) -> str | None:
        """The host that last served ``key``, if that was under ``ttl`` ago."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            host, expires = entry
            if self._clock() >= expires:
                del self._entries[key]
                return None
            return host

    def put(self, key: str, host: str) -> None:
        """Remember that ``host`` served ``key`` now."""
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (host, self._clock() + self.ttl)
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)
