"""The edge of the app: who the client is (ProxyFix), rate limits and CORS."""

from __future__ import annotations

import math
import threading
import time

from flask import Flask, Response, current_app, request
from flask_cors import CORS
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from limits.storage import Storage
from werkzeug.middleware.proxy_fix import ProxyFix

from .pipeline import CORRELATION_HEADER

EXPOSED_HEADERS = [
    CORRELATION_HEADER,
    "X-Process-Time",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
]
#: Blueprints whose routes are never rate limited: monitoring must always work,
#: and the API's documentation costs nothing to serve.
UNLIMITED_BLUEPRINTS = frozenset({"health", "docs"})


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


def _per_minute_limit() -> str:
    # Read at request time, so the limit is the app's config, not an import constant.
    return f"{current_app.config['RATE_LIMIT_REQUESTS']} per minute"


def _is_exempt() -> bool:
    return request.blueprint in UNLIMITED_BLUEPRINTS or request.method == "OPTIONS"


def _storage_uri(configured: str) -> str:
    if configured.startswith("memory://"):
        return "llm-service-memory://"
    return configured


def init_app(app: Flask) -> None:
    """Trust the configured proxies, then limit per client and apply CORS."""
    proxies = app.config["TRUSTED_PROXIES"]
    if proxies:
        app.wsgi_app = ProxyFix(
            app.wsgi_app, x_for=proxies, x_proto=proxies, x_host=proxies
        )

    limiter = Limiter(
        get_remote_address,
        default_limits=[_per_minute_limit],
        default_limits_exempt_when=_is_exempt,
        storage_uri=_storage_uri(app.config["RATE_LIMIT_STORAGE_URI"]),
        strategy="fixed-window",
        key_prefix="llm_service",
        # A shared store (Redis) that goes down degrades to per-process limits
        # instead of failing every request.
        in_memory_fallback_enabled=True,
        # Flask-Limiter would put Retry-After on every answer, successes included,
        # and override the upstream's own; _add_rate_limit_headers is precise.
        headers_enabled=False,
    )
    limiter.init_app(app)

    @app.after_request
    def _add_rate_limit_headers(response: Response) -> Response:
        current = limiter.current_limit
        if current is None:
            return response
        response.headers["X-RateLimit-Limit"] = str(current.limit.amount)
        response.headers["X-RateLimit-Remaining"] = str(current.remaining)
        # The window's own end: flask-limiter's reset_at adds a second to it.
        reset_time = current.window.reset_time
        response.headers["X-RateLimit-Reset"] = str(math.ceil(reset_time))
        if response.status_code == 429:
            wait = max(1, math.ceil(reset_time - time.time()))
            response.headers["Retry-After"] = str(wait)
        return response

    origins = app.config["ALLOWED_ORIGINS"]
    if origins:
        CORS(
            app,
            origins=origins,
            expose_headers=EXPOSED_HEADERS,
            allow_headers=["Content-Type", "Authorization", CORRELATION_HEADER],
            max_age=600,
        )
