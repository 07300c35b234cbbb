"""Where conversations are remembered: this process's map, or Redis when shared.

With ``LLM_SERVICE_RATE_LIMIT_STORAGE_URI`` on Redis (``redis://`` or
``rediss://``), every worker and instance reads and writes the same keys
(``llm-service:affinity:<hash>``, expiring after ``AFFINITY_SECONDS``), so a
conversation keeps its host whichever worker takes its next turn. Otherwise,
and while Redis does not answer (each wait bounded by a short timeout, then
Redis is left alone for a few seconds), each process keeps its own bounded
:class:`~.placement.AffinityMap`: with several workers a conversation then
keeps its host only when its turns reach the same worker.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .. import store
from .placement import AffinityMap

log = logging.getLogger("llm_service.upstreams")

KEY_PREFIX = "llm-service:affinity:"
#: Longest wait for Redis on a request's path.
REDIS_TIMEOUT = 0.2
#: How long Redis is left alone after it failed to answer.
REDIS_RETRY_SECONDS = 5.0


class Affinity:
    """Conversation key -> host name, shared through Redis when configured."""

    def __init__(self, ttl: float, redis_client: Any = None) -> None:
        """Remember in ``redis_client`` (one with :data:`REDIS_TIMEOUT`) if given."""
        self.ttl = ttl
        self.local = AffinityMap(ttl)
        self._redis: Any = redis_client
        self._lock = threading.Lock()
        self._down_until = 0.0

    @property
    def shared(self) -> bool:
        """True while conversations are remembered in Redis."""
        return self._redis is not None and time.monotonic() >= self._down_until

    def get(self, key: str) -> str | None:
        if self.shared:
            try:
                value = store.call(self._redis, "GET", KEY_PREFIX + key)
            except Exception as err:  # redis errors, of many kinds
                self._lost(err)
            else:
                return value.decode() if value is not None else None
        return self.local.get(key)

    def put(self, key: str, host: str) -> None:
        self.local.put(key, host)
        if self.shared:
            try:
                store.call(
                    self._redis,
                    "SET",
                    KEY_PREFIX + key,
                    host,
                    "EX",
                    max(1, round(self.ttl)),
                )
            except Exception as err:
                self._lost(err)

    def _lost(self, error: Exception) -> None:
        with self._lock:
            self._down_until = time.monotonic() + REDIS_RETRY_SECONDS
        log.warning(
            "conversation affinity: Redis did not answer (%s); this process "
            "remembers conversations itself for %g s",
            type(error).__name__,
            REDIS_RETRY_SECONDS,
        )
