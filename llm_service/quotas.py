"""Per-key quotas: requests and tokens per minute, requests in flight.

Exact across workers and instances when ``LLM_SERVICE_RATE_LIMIT_STORAGE_URI``
is Redis: one Lua script per request checks and takes all three at once, with
Redis's own clock, so two gateways never both take the last unit.

- Requests and tokens per minute are **moving windows** (sorted sets of the
  last 60 s): no 60-second span, wherever it starts, admits more than the
  limit; there is no boundary at which a fixed window would let 2x through.
- Tokens are reserved before the upstream call (prompt estimate +
  ``max_tokens``) and settled after it with the real usage (or the counted
  stream chunks), keeping the reservation's time.
- Concurrency slots are **leases**: a sorted set of lease ids scored by expiry,
  renewed every third of ``LLM_SERVICE_QUOTA_LEASE_SECONDS`` while the request
  runs, so the slots of a gateway killed mid-request come back within one lease
  time. They count requests between admission and the end of the answer, i.e.
  in flight at the upstream (there is no admission queue yet).

Without Redis (``memory://``), or while it is unreachable, each worker counts
alone: a key can then get up to workers x instances times its limits. ``/health``
says which is in force.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import redis
from flask import Flask, Response, current_app, g, request

from . import store
from .auth import Caller, identity
from .errors import APIError
from .ids import new_uuid
from .pipeline import update_headers
from .usage import METERED_BLUEPRINTS, meter, usage_log

log = logging.getLogger("llm_service.quotas")

EXTENSION = "llm_service.quotas"
WINDOW_MS = 60_000
#: After a Redis failure, per-process counters are used this long before retrying.
REDIS_RETRY_SECONDS = 5.0
#: What a caller over its concurrency is told to wait.
CONCURRENCY_RETRY_MS = 1000
REFUSALS = {
    1: (
        "rate_limited",
        "This API key is over its requests per minute; retry later.",
    ),
    2: (
        "token_quota_exceeded",
        "This API key is over its tokens per minute; retry later.",
    ),
    3: (
        "concurrency_limit_exceeded",
        "This API key has as many requests in flight as it may; retry when one ends.",
    ),
}

# KEYS: requests (zset of ids by time), tokens (zset of "id:tokens" by time),
# leases (zset of ids by expiry), tokens total (the tokens zset's sum, kept so
# an admission costs O(log n), not a walk of the window).
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, id = tonumber(ARGV[4]), ARGV[5]
local lease, window = tonumber(ARGV[6]), tonumber(ARGV[7])
local reqs, used, req_reset, tok_reset = 0, 0, 0, 0
local function amount(member) return tonumber(string.match(member, ':(%d+)$')) end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  reqs = redis.call('ZCARD', KEYS[1])
  if reqs > 0 then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    req_reset = tonumber(oldest[2]) + window - now
  end
  if reqs >= rpm then return {0, 1, req_reset, reqs, 0, req_reset, 0} end
end
if tpm > 0 then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - window)
  if #expired > 0 then
    local gone = 0
    for i = 1, #expired do gone = gone + amount(expired[i]) end
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
    redis.call('DECRBY', KEYS[4], gone)
  end
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('DEL', KEYS[4])
  else
    used = tonumber(redis.call('GET', KEYS[4]) or '0')
    tok_reset = tonumber(first[2]) + window - now
  end
  if used + tokens > tpm then
    local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
    local need, freed, wait = used + tokens - tpm, 0, window
    for i = 1, #entries, 2 do
      freed = freed + amount(entries[i])
      if freed >= need then
        wait = tonumber(entries[i + 1]) + window - now
        break
      end
    end
    return {0, 2, wait, reqs, used, req_reset, tok_reset}
  end
end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc then
    return {0, 3, tonumber(ARGV[8]), reqs, used, req_reset, tok_reset}
  end
  redis.call('ZADD', KEYS[3], now + lease, id)
  redis.call('PEXPIRE', KEYS[3], lease + window)
end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('PEXPIRE', KEYS[1], window)
  if reqs == 0 then req_reset = window end
end
if tpm > 0 and tokens > 0 then
  redis.call('ZADD', KEYS[2], now, id .. ':' .. tokens)
  redis.call('INCRBY', KEYS[4], tokens)
  redis.call('PEXPIRE', KEYS[2], window)
  redis.call('PEXPIRE', KEYS[4], window)
  if used == 0 then tok_reset = window end
end
return {1, 0, 0, reqs + 1, used + tokens, req_reset, tok_reset}
"""

#: Lua, over _ADMIT's ``reply``: the request was admitted. A script riding
#: along with the admission (:func:`.store.ride`: the door's slot lease) runs
#: in the same script, and only then: a refused request takes nothing else.
ADMITTED = "reply[1] == 1"

# KEYS: tokens, leases, tokens total. ARGV: id, reserved, actual, release lease.
_FINISH = """
if ARGV[4] == '1' then redis.call('ZREM', KEYS[2], ARGV[1]) end
local old = ARGV[1] .. ':' .. ARGV[2]
local score = redis.call('ZSCORE', KEYS[1], old)
if score then
  redis.call('ZREM', KEYS[1], old)
  local actual = tonumber(ARGV[3])
  if actual > 0 then
    redis.call('ZADD', KEYS[1], score, ARGV[1] .. ':' .. actual)
  end
  redis.call('INCRBY', KEYS[3], actual - tonumber(ARGV[2]))
end
return 1
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
"""


@dataclass
class Verdict:
    """The answer of one admission: allowed or which limit, and the counters."""

    allowed: bool
    refusal: int  # 0, or a key of REFUSALS
    retry_ms: int
    requests: int  # in the window, this one included when allowed
    tokens: int
    requests_reset_ms: int
    tokens_reset_ms: int


@dataclass
class Admission:
    """What one admitted request holds until it ends."""

    key_id: int
    request_id: str
    reserved: int
    lease: bool
    backend: Any
    caller: Caller
    verdict: Verdict


def _keys(key_id: int) -> tuple[str, str, str, str]:
    # One hash tag per key: its keys live on one Redis Cluster slot.
    base = f"llm_service:quota:{{{key_id}}}"
    return (
        f"{base}:requests",
        f"{base}:tokens",
        f"{base}:leases",
        f"{base}:tokens-total",
    )


class RedisQuotas:
    """The shared, exact counters (in the process's shared Redis client)."""

    shared = True

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._admit = self.client.register_script(_ADMIT)
        self._finish = self.client.register_script(_FINISH)
        self._renew = self.client.register_script(_RENEW)

    def admit(self, caller: Caller, tokens: int, request_id: str, lease_ms: int):
        result = store.run(
            self.client,
            self._admit,
            _keys(caller.key_id),
            [
                caller.rpm or 0,
                caller.tpm or 0,
                caller.concurrency or 0,
                tokens,
                request_id,
                lease_ms,
                WINDOW_MS,
                CONCURRENCY_RETRY_MS,
            ],
            riders_if=ADMITTED,
        )
        return Verdict(bool(result[0]), *(int(v) for v in result[1:]))

    def finish(self, admission: Admission, actual: int) -> None:
        """Settle (with the request's other end-writes when it ends: :mod:`.store`)."""
        _, tokens_key, leases_key, total_key = _keys(admission.key_id)
        store.write(
            self.client,
            self._finish,
            [tokens_key, leases_key, total_key],
            [
                admission.request_id,
                admission.reserved,
                actual,
                "1" if admission.lease else "0",
            ],
            _settled,
        )

    def renew(self, leases: list[tuple[int, str]], lease_ms: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key_id, request_id in leases:
            self._renew(
                keys=[_keys(key_id)[2]], args=[request_id, lease_ms], client=pipe
            )
        pipe.execute()


def _settled(error: Exception | None) -> None:
    if error is not None:
        # The lease expires by itself; the reservation stays as charged.
        log.warning("could not settle a quota in Redis: %s", type(error).__name__)


@dataclass
class _KeyWindows:
    requests: deque = field(default_factory=deque)  # times (ms), oldest first
    tokens: deque = field(default_factory=deque)  # [time, id, tokens], oldest first
    by_id: dict = field(default_factory=dict)  # request id -> its tokens entry
    total: int = 0  # sum of the tokens entries
    leases: set = field(default_factory=set)


class MemoryQuotas:
    """Per-process counters with the same rules: exact for one process only."""

    shared = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[int, _KeyWindows] = {}

    def admit(self, caller: Caller, tokens: int, request_id: str, lease_ms: int):
        now = time.monotonic() * 1000
        with self._lock:
            windows = self._keys.setdefault(caller.key_id, _KeyWindows())
            while windows.requests and windows.requests[0] <= now - WINDOW_MS:
                windows.requests.popleft()
            while windows.tokens and windows.tokens[0][0] <= now - WINDOW_MS:
                _, gone, amount = windows.tokens.popleft()
                windows.by_id.pop(gone, None)
                windows.total -= amount
            reqs = len(windows.requests)
            req_reset = int(windows.requests[0] + WINDOW_MS - now) if reqs else 0
            if caller.rpm and reqs >= caller.rpm:
                return Verdict(False, 1, req_reset, reqs, 0, req_reset, 0)
            used = windows.total
            tok_reset = (
                int(windows.tokens[0][0] + WINDOW_MS - now) if windows.tokens else 0
            )
            if caller.tpm and used + tokens > caller.tpm:
                need, freed, wait = used + tokens - caller.tpm, 0, WINDOW_MS
                for at, _, amount in windows.tokens:
                    freed += amount
                    if freed >= need:
                        wait = int(at + WINDOW_MS - now)
                        break
                return Verdict(False, 2, wait, reqs, used, req_reset, tok_reset)
            if caller.concurrency:
                if len(windows.leases) >= caller.concurrency:
                    return Verdict(
                        False, 3, CONCURRENCY_RETRY_MS, reqs, used, req_reset, tok_reset
                    )
                windows.leases.add(request_id)
            if caller.rpm:
                windows.requests.append(now)
                req_reset = req_reset or WINDOW_MS
            if caller.tpm and tokens:
                entry = [now, request_id, tokens]
                windows.tokens.append(entry)
                windows.by_id[request_id] = entry
                windows.total += tokens
                tok_reset = tok_reset or WINDOW_MS
            return Verdict(True, 0, 0, reqs + 1, used + tokens, req_reset, tok_reset)

    def finish(self, admission: Admission, actual: int) -> None:
        with self._lock:
            windows = self._keys.get(admission.key_id)
            if windows is None:
                return
            windows.leases.discard(admission.request_id)
            entry = windows.by_id.get(admission.request_id)
            if entry is not None:
                windows.total += actual - entry[2]
                entry[2] = actual

    def renew(self, leases: list[tuple[int, str]], lease_ms: int) -> None:
        """Process-local leases end with the process: nothing to renew."""


class Quotas:
    """Redis when configured and reachable, else the per-process counters."""

    def __init__(self, client: redis.Redis | None, lease_seconds: float) -> None:
        self.lease_ms = int(lease_seconds * 1000)
        self.memory = MemoryQuotas()
        self.redis = RedisQuotas(client) if client is not None else None
        self._down_until = 0.0
        self._leases: dict[str, int] = {}  # live Redis leases: request id -> key id
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    @property
    def degraded(self) -> bool:
        return self.redis is not None and time.monotonic() < self._down_until

    def status(self) -> dict[str, Any]:
        shared = self.redis is not None and not self.degraded
        return {
            "storage": "redis" if shared else "memory",
            "shared": shared,
            "degraded": self.degraded,
            "note": None
            if shared
            else "per-process counters: a key may get up to workers x instances "
            "times its limits",
        }

    def admit(self, caller: Caller, tokens: int) -> Admission:
        request_id = new_uuid().hex
        backend = self.memory
        if self.redis is not None and not self.degraded:
            backend = self.redis
        try:
            verdict = backend.admit(caller, tokens, request_id, self.lease_ms)
        except redis.RedisError as err:
            self._down_until = time.monotonic() + REDIS_RETRY_SECONDS
            log.warning(
                "quota storage unreachable (%s): per-process counters for %.0f s",
                type(err).__name__,
                REDIS_RETRY_SECONDS,
            )
            backend = self.memory
            verdict = backend.admit(caller, tokens, request_id, self.lease_ms)
        admission = Admission(
            caller.key_id,
            request_id,
            tokens if caller.tpm else 0,
            bool(caller.concurrency) and verdict.allowed,
            backend,
            caller,
            verdict,
        )
        if admission.lease and backend is self.redis:
            self._hold(admission)
        return admission

    def finish(self, admission: Admission, actual: int) -> None:
        with self._lock:
            self._leases.pop(admission.request_id, None)
        admission.backend.finish(admission, actual if admission.reserved else 0)

    def _hold(self, admission: Admission) -> None:
        with self._lock:
            self._leases[admission.request_id] = admission.key_id
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._renew_forever, name="quota-leases", daemon=True
                )
                self._renewer.start()

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.lease_ms / 3000)
            with self._lock:
                leases = [(key_id, rid) for rid, key_id in self._leases.items()]
            if not leases or self.redis is None:
                continue
            try:
                self.redis.renew(leases, self.lease_ms)
            except redis.RedisError as err:
                log.warning("could not renew quota leases: %s", type(err).__name__)


def quotas() -> Quotas:
    return current_app.extensions[EXTENSION]


def health_details() -> dict[str, Any]:
    """What ``/health`` shows admins: quota storage, usage buffer."""
    return {"quotas": quotas().status(), "usage_records": usage_log().stats()}


def _duration(ms: int) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``1m0s``."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = math.ceil(ms / 1000)
    return f"{seconds // 60}m{seconds % 60}s" if seconds >= 60 else f"{seconds}s"


def _headers(caller: Caller, verdict: Verdict) -> dict[str, str]:
    headers = {}
    if caller.rpm:
        headers["x-ratelimit-limit-requests"] = str(caller.rpm)
        remaining = caller.rpm - verdict.requests
        headers["x-ratelimit-remaining-requests"] = str(max(0, remaining))
        headers["x-ratelimit-reset-requests"] = _duration(verdict.requests_reset_ms)
    if caller.tpm and verdict.refusal != 1:  # tokens are not counted past RPM
        headers["x-ratelimit-limit-tokens"] = str(caller.tpm)
        remaining = caller.tpm - verdict.tokens
        headers["x-ratelimit-remaining-tokens"] = str(max(0, remaining))
        headers["x-ratelimit-reset-tokens"] = _duration(verdict.tokens_reset_ms)
    return headers


def _admit() -> None:
    if request.blueprint not in METERED_BLUEPRINTS:
        return
    caller = identity().caller
    if caller.anonymous or not (caller.rpm or caller.tpm or caller.concurrency):
        return
    found = meter()
    reservation = found.reservation
    if caller.tpm and reservation > caller.tpm:
        raise APIError(
            429,
            "token_quota_exceeded",
            f"This request alone reserves {reservation} tokens (prompt estimate "
            f"+ max_tokens), more than this API key's {caller.tpm} tokens per "
            "minute: it can never be admitted. Lower max_tokens.",
            details={"reserved_tokens": reservation, "tokens_per_minute": caller.tpm},
        )
    service = quotas()
    admission = service.admit(caller, reservation)
    verdict = admission.verdict
    if not verdict.allowed:
        code, message = REFUSALS[verdict.refusal]
        headers = _headers(caller, verdict)
        headers["Retry-After"] = str(max(1, math.ceil(verdict.retry_ms / 1000)))
        raise APIError(429, code, message, headers=headers)
    g.quota_admission = admission
    found.on_finish.append(lambda used: service.finish(admission, used))


def _add_headers(response: Response) -> Response:
    admission: Admission | None = g.get("quota_admission")
    if admission is not None:
        headers = _headers(admission.caller, admission.verdict)
        update_headers(
            response.headers, [(name, value, True) for name, value in headers.items()]
        )
    return response


def init_app(app: Flask) -> None:
    """Admit keyed requests after auth; they settle when the answer has ended."""
    app.extensions[EXTENSION] = Quotas(
        store.redis_for(app), app.config["QUOTA_LEASE_SECONDS"]
    )
    app.before_request(_admit)
    app.after_request(_add_headers)
