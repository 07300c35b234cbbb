"""The edge of the app: who the client is (trusted proxies), rate limits and CORS."""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, current_app, g, request
from flask_cors import CORS
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from limits.storage import RedisStorage, Storage
from limits.strategies import FixedWindowRateLimiter
from werkzeug.middleware.proxy_fix import ProxyFix

from . import store
from .config import UNIX_PEER
from .pipeline import CORRELATION_HEADER

log = logging.getLogger("llm_service.limits")

EXPOSED_HEADERS = [
    CORRELATION_HEADER,
    "X-Process-Time",
    "X-Queue-Time",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
]
#: Blueprints whose routes are never rate limited: monitoring must always work,
#: and the API's documentation costs nothing to serve.
UNLIMITED_BLUEPRINTS = frozenset({"health", "docs", "monitoring"})
#: The methods some route accepts (HEAD with every GET): CORS advertises no other.
CORS_METHODS = ["GET", "HEAD", "POST", "OPTIONS"]
#: Longest wait, in seconds, for the shared limit store to connect or answer;
#: after it the request is counted in this process instead (see init_app).
#: The shared store's own bound: Redis is the same client and pool.
STORAGE_TIMEOUT = store.TIMEOUT
#: The limit's window: a client told to wait without the exact count waits this.
WINDOW_SECONDS = 60
EXTENSION = "llm_service.limiter"
#: The tests that exempt a request from the per-address limit (see exempt_when).
EXEMPTIONS = "llm_service.limiter.exemptions"


class WindowCounterStorage(Storage):
    """In-process fixed-window counters, for ``memory://``.

    limits' own MemoryStorage starts a timer thread to expire keys, anew on
    each hit once the last one has fired: at a modest request rate that is a
    thread per request, measured at 0.3 ms of p50 latency. Here an expired
    window is simply reset on its next hit, and windows nobody hits any more
    are swept at most once per ``SWEEP_SECONDS``.
    """

    STORAGE_SCHEME = ["llm-service-memory"]
    SWEEP_SECONDS = 10.0

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **_):
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        self._lock = threading.Lock()
        self._windows: dict[str, list[float]] = {}  # key -> [count, expires_at]
        self._swept_at = time.time()

    @property
    def base_exceptions(self) -> type[Exception]:
        return ValueError  # nothing here fails the way a network store does

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        now = time.time()
        with self._lock:
            if now - self._swept_at >= self.SWEEP_SECONDS:
                self._sweep(now)
            window = self._windows.get(key)
            if window is None or window[1] <= now:
                window = self._windows[key] = [0, now + expiry]
            window[0] += amount
            return int(window[0])

    def get(self, key: str) -> int:
        window = self._windows.get(key)
        return int(window[0]) if window and window[1] > time.time() else 0

    def get_expiry(self, key: str) -> float:
        window = self._windows.get(key)
        return window[1] if window else time.time()

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        with self._lock:
            count = len(self._windows)
            self._windows.clear()
        return count

    def clear(self, key: str) -> None:
        with self._lock:
            self._windows.pop(key, None)

    def _sweep(self, now: float) -> None:
        self._swept_at = now
        for key in [k for k, (_, expires) in self._windows.items() if expires <= now]:
            del self._windows[key]


class HitStatsRedisStorage(RedisStorage):
    """Redis counters whose hit also answers the window's count and end.

    The rate-limit headers need the window's count and reset after the hit;
    limits' own Redis storage asks for them with two more round trips (GET,
    TTL). Here the hit's script returns both, and the thread that hit reads
    them back once, with no round trip: one trip per limited request, not
    three. Another thread, or a second read, asks Redis as before. The hit
    takes the shared store's lean command path (:func:`store.run`).
    """

    STORAGE_SCHEME = ["llm-service-redis", "llm-service-rediss"]
    PREFIX_OWN = "llm-service-"
    SCRIPT_HIT = """
local current = redis.call('INCRBY', KEYS[1], ARGV[2])
if tonumber(current) == tonumber(ARGV[2]) then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return {current, redis.call('PTTL', KEYS[1])}
"""

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri.removeprefix(self.PREFIX_OWN), **options)
        self._hit = self.get_connection().register_script(self.SCRIPT_HIT)
        self._last = threading.local()

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        prefixed = self.prefixed_key(key)
        # The shared store's lean path: this client shares the store's pool,
        # and so its free list of connections (store.connections).
        count, ttl_ms = store.run(
            self.get_connection(), self._hit, [prefixed], [expiry, amount]
        )
        expires_at = time.time() + max(0, int(ttl_ms)) / 1000
        self._last.hit = [prefixed, int(count), expires_at]
        return int(count)

    def _take(self, key: str, field: int) -> float | None:
        hit = getattr(self._last, "hit", None)
        if hit is None or hit[0] != self.prefixed_key(key) or hit[field] is None:
            return None
        value, hit[field] = hit[field], None
        return value

    def get(self, key: str) -> int:
        count = self._take(key, 1)
        return int(count) if count is not None else super().get(key)

    def get_expiry(self, key: str) -> float:
        expires_at = self._take(key, 2)
        return expires_at if expires_at is not None else super().get_expiry(key)


def _per_minute_limit() -> str:
    # Read at request time, so the limit is the app's config, not an import constant.
    return f"{current_app.config['RATE_LIMIT_REQUESTS']} per minute"


def _is_exempt() -> bool:
    return request.blueprint in UNLIMITED_BLUEPRINTS or request.method == "OPTIONS"


def _storage_uri(configured: str) -> str:
    if configured.startswith("memory://"):
        return "llm-service-memory://"
    if configured.startswith(("redis://", "rediss://")):
        return HitStatsRedisStorage.PREFIX_OWN + configured
    return configured


def _storage_options(configured: str) -> dict[str, Any]:
    """Bound every wait on a shared store: a frozen Redis must cost ≤ 0.5 s.

    redis-py waits forever by default and retries three times with backoff, so
    a stopped Redis held each request for seconds. Here one connect or read
    waits ``STORAGE_TIMEOUT`` at most and is not retried: the in-memory fallback
    takes over instead.
    """
    scheme = configured.partition("://")[0]
    if scheme.startswith("redis"):
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        timeouts = {
            "socket_timeout": STORAGE_TIMEOUT,
            "socket_connect_timeout": STORAGE_TIMEOUT,
        }
        options: dict[str, Any] = {**timeouts, "retry": Retry(NoBackoff(), 0)}
        if scheme == "redis+sentinel":
            options["sentinel_kwargs"] = dict(timeouts)
        return options
    if scheme == "memcached":  # pymemcache's names
        return {"connect_timeout": STORAGE_TIMEOUT, "timeout": STORAGE_TIMEOUT}
    return {}


def _peer_filter(trusted: Iterable[str]) -> Callable[[str | None], bool]:
    """Return a test for "this direct peer is one of the trusted proxies"."""
    allow_unix = UNIX_PEER in trusted
    networks = [ipaddress.ip_network(t) for t in trusted if t != UNIX_PEER]

    def is_trusted(remote_addr: str | None) -> bool:
        if not remote_addr:
            return allow_unix  # gunicorn on a Unix socket gives no address
        try:
            address = ipaddress.ip_address(remote_addr.partition("%")[0])
        except ValueError:
            return allow_unix
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in networks)

    return is_trusted


class ForwardedHeaders:
    """WSGI middleware: who the client is, and which host it asked for.

    ``X-Forwarded-For/-Proto/-Host`` are applied (by ProxyFix, ``proxies`` hops
    deep) only when the direct peer is a trusted proxy; from anyone else they
    are ignored, or any client could pick the address its limit is counted
    under. The ``Host`` is then lower-cased, so ``TRUSTED_HOSTS`` (lower-cased
    by the settings) matches case-insensitively, as host names do.
    """

    def __init__(self, app: Callable, proxies: int, trusted: Iterable[str]) -> None:
        self.app = app
        self.proxied = (
            ProxyFix(self._lower_host, x_for=proxies, x_proto=proxies, x_host=proxies)
            if proxies
            else None
        )
        self.is_trusted = _peer_filter(trusted)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if self.proxied is not None and self.is_trusted(environ.get("REMOTE_ADDR")):
            return self.proxied(environ, start_response)
        return self._lower_host(environ, start_response)

    def _lower_host(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        host = environ.get("HTTP_HOST")
        if host:
            environ["HTTP_HOST"] = host.lower()
        return self.app(environ, start_response)


def exempt_when(app: Flask, exempt: Callable[[], bool]) -> None:
    """Exempt the requests ``exempt()`` says yes to from the per-address limit.

    Asked before Flask-Limiter's hooks (see :func:`_skip_exempt_requests`),
    in the order given; an exempt request is not counted and carries no
    ``X-RateLimit-*`` headers. ``exempt`` must not raise.
    """
    app.extensions[EXEMPTIONS].append(exempt)


def _is_exempt_caller(exemptions: list[Callable[[], bool]]) -> bool:
    return any(exempt() for exempt in exemptions)


def _skip_exempt_requests(app: Flask, limiter: Limiter) -> None:
    """Run Flask-Limiter's hooks only for requests the limit may apply to.

    Flask-Limiter asks its request filters only after resolving the request's
    endpoint, view and limits, and then still evaluates an empty set of limits
    and sets up, reads and resets its per-request state: some 90 µs of CPU for
    a keyed request that the per-address limit never applies to. Here the
    exemptions (:func:`exempt_when`) are asked first, and an exempt request
    skips Flask-Limiter's three hooks, which would count nothing and add no
    header for it; every other request goes through them as before.
    """
    exemptions = app.extensions[EXEMPTIONS]
    check = limiter._check_request_limit
    release = getattr(limiter, "_Limiter__release_context", None)
    inject_headers = getattr(Limiter, "_Limiter__inject_headers", None)
    before = app.before_request_funcs.setdefault(None, [])
    teardown = app.teardown_request_funcs.setdefault(None, [])
    after = app.after_request_funcs.setdefault(None, [])
    inject = next(
        (
            hook
            for hook in after
            if isinstance(hook, functools.partial)
            and hook.func is inject_headers
            and hook.args == (limiter,)
        ),
        None,
    )
    if check not in before or release not in teardown or inject is None:
        # Hooks not registered (RATELIMIT_ENABLED=False), or not the ones this
        # was written for (another Flask-Limiter): it asks the exemptions
        # itself, after its own work.
        limiter.request_filter(lambda: _is_exempt_caller(exemptions))
        app.after_request(lambda response: _add_rate_limit_headers(limiter, response))
        return

    def check_unless_exempt() -> None:
        if _is_exempt_caller(exemptions):
            g.address_limit_exempt = True
            return
        check()

    def headers_unless_exempt(response: Response) -> Response:
        if g.get("address_limit_exempt"):
            return response
        return inject(_add_rate_limit_headers(limiter, response))

    def release_unless_exempt(error: BaseException | None = None) -> None:
        if not g.get("address_limit_exempt"):
            release(error)

    before[before.index(check)] = check_unless_exempt
    after[after.index(inject)] = headers_unless_exempt
    teardown[teardown.index(release)] = release_unless_exempt


def _add_rate_limit_headers(limiter: Limiter, response: Response) -> Response:
    """The limit's ``X-RateLimit-*`` headers (and ``Retry-After`` on a 429)."""
    current = limiter.current_limit
    if current is None:
        return response
    try:
        # The window's own end: flask-limiter's reset_at adds a second to it.
        remaining, reset_time = current.remaining, current.window.reset_time
    except Exception:  # whatever the store raised: answer without the counts
        # The store failed between the hit and now; the request was counted.
        log.warning("rate-limit headers skipped: the limit store failed")
        if response.status_code == 429:
            response.headers["Retry-After"] = str(WINDOW_SECONDS)
        return response
    response.headers["X-RateLimit-Limit"] = str(current.limit.amount)
    response.headers["X-RateLimit-Remaining"] = str(remaining)
    response.headers["X-RateLimit-Reset"] = str(math.ceil(reset_time))
    if response.status_code == 429:
        wait = max(1, math.ceil(reset_time - time.time()))
        response.headers["Retry-After"] = str(wait)
    return response


def storage_state() -> str:
    """Say where the limits are counted now: ``memory``, ``redis``, ``memcached``,
    or ``memory-fallback`` while the shared store is away."""
    configured = current_app.config["RATE_LIMIT_STORAGE_URI"]
    scheme = configured.partition("://")[0]
    if scheme == "memory":
        return "memory"
    # Flask-Limiter keeps no public flag for "the store is down, counting in
    # memory"; this is the one it switches on and off itself.
    if getattr(current_app.extensions[EXTENSION], "_storage_dead", False):
        return "memory-fallback"
    return "redis" if scheme.startswith("redis") else scheme


def init_app(app: Flask) -> None:
    """Trust the configured proxies, then limit per client and apply CORS."""
    app.wsgi_app = ForwardedHeaders(
        app.wsgi_app,
        app.config["TRUSTED_PROXIES"],
        app.config["TRUSTED_PROXY_ADDRESSES"],
    )

    configured = app.config["RATE_LIMIT_STORAGE_URI"]
    options = _storage_options(configured)
    shared = store.redis_for(app)
    if shared is not None:
        # The process's one pool (and its bounds), shared with the quotas and
        # the slot leases.
        options["connection_pool"] = shared.connection_pool
    limiter = Limiter(
        get_remote_address,
        # An application limit is one bucket per client across every limited
        # route (a default limit would be one bucket per client *per route*).
        application_limits=[_per_minute_limit],
        application_limits_exempt_when=_is_exempt,
        storage_uri=_storage_uri(configured),
        storage_options=options,
        strategy="fixed-window",
        key_prefix="llm_service",
        # A shared store (Redis) that is slow or down degrades to per-process
        # limits instead of failing or stalling requests; Flask-Limiter checks it
        # again after 1, 2, 4 ... 32 s and switches back when it answers.
        in_memory_fallback_enabled=True,
        # A request whose store call fails just after another thread switched to
        # the fallback would otherwise be a 500: it is let through (and logged).
        swallow_errors=True,
        # Flask-Limiter would put Retry-After on every answer, successes included,
        # and override the upstream's own; _add_rate_limit_headers is precise.
        headers_enabled=False,
    )
    limiter.init_app(app)
    if getattr(limiter, "_fallback_limiter", None) is not None:
        # The fallback would be limits' MemoryStorage: a timer thread per request.
        limiter._fallback_limiter = FixedWindowRateLimiter(WindowCounterStorage())
    app.extensions[EXTENSION] = limiter
    app.extensions[EXEMPTIONS] = []
    _skip_exempt_requests(app, limiter)

    origins = app.config["ALLOWED_ORIGINS"]
    if origins:
        CORS(
            app,
            origins=origins,
            methods=CORS_METHODS,
            expose_headers=EXPOSED_HEADERS,
            allow_headers=["Content-Type", "Authorization", CORRELATION_HEADER],
            max_age=600,
        )
