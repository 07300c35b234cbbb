"""The client's transport: requests' adapter with its per-call work done once.

A client talks to one upstream, through one session whose settings are fixed
at start (see ``LMStudioClient.__init__``), yet ``HTTPAdapter.send`` parses
the URL three times per call to find the same connection pool and the same
request target, and fills a cookie jar from every answer. Here the pool and
the target are looked up once per URL (and settings), and answers carry no
cookies: the gateway never sends an upstream's cookie back (one caller's
cookie must never ride on another caller's call), so parsing them bought
nothing.

The headers of a request and of an answer are :class:`Headers`, which urllib3
copies and lists at the speed of a dict, and an answer's (empty) cookie jar is
made only if someone asks for it.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, ValuesView
from typing import Any

from requests.cookies import RequestsCookieJar
from requests.models import PreparedRequest, Response
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers

from .watchdog import ScopedAdapter

#: Most (URL, settings) entries remembered; a client uses a handful of paths.
CACHE_ENTRIES = 64


class LeanAdapter(ScopedAdapter):
    """A :class:`ScopedAdapter` that remembers pools and targets per URL."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pools: dict[tuple, Any] = {}
        self._targets: dict[tuple, str] = {}

    def get_connection_with_tls_context(
        self,
        request: PreparedRequest,
        verify: Any,
        proxies: dict[str, str] | None = None,
        cert: Any = None,
    ) -> Any:
        """The pool requests would pick, looked up once per URL and settings."""
        key = (request.url, verify, cert, _frozen(proxies))
        pool = self._pools.get(key)
        # A pool the manager closed (evicted, or the adapter was closed) is
        # never handed out again: look it up anew.
        if pool is None or pool.pool is None:
            pool = super().get_connection_with_tls_context(
                request, verify, proxies=proxies, cert=cert
            )
            _remember(self._pools, key, pool)
        return pool

    def request_url(self, request: PreparedRequest, proxies: Any) -> str:
        """The request target requests would send, computed once per URL."""
        key = (request.url, _frozen(proxies))
        target = self._targets.get(key)
        if target is None:
            target = super().request_url(request, proxies)
            _remember(self._targets, key, target)
        return target

    def build_response(self, req: PreparedRequest, resp: Any) -> Response:
        """requests' own response, without the cookies (see the module's docstring)."""
        response = LeanResponse()
        response.status_code = getattr(resp, "status", None)
        response.headers = Headers.merged(getattr(resp, "headers", {}))
        response.encoding = get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response

    def close(self) -> None:
        self._pools.clear()
        self._targets.clear()
        super().close()


class Headers(CaseInsensitiveDict):
    """requests' case-insensitive headers, copied and listed at a dict's speed.

    urllib3 copies a request's headers and lists them on every send; the
    inherited ``copy`` and ``items`` go key by key through ``MutableMapping``,
    lowering each key again.
    """

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str]]) -> Headers:
        """Headers holding ``pairs`` (names differing in case: the last wins)."""
        headers = cls.__new__(cls)
        headers._store = {name.lower(): (name, value) for name, value in pairs}
        return headers

    @classmethod
    def merged(cls, received: Any) -> Headers:
        """An answer's headers; a repeated one's values joined as requests does."""
        merge = getattr(received, "itermerged", None)
        if merge is None:
            return cls(received)
        return cls.of(merge())

    def copy(self) -> Headers:
        headers = Headers.__new__(Headers)
        headers._store = self._store.copy()
        return headers

    def items(self) -> ValuesView[tuple[str, str]]:  # type: ignore[override]
        """``(name, value)`` pairs, names as given (what ``items()`` yields)."""
        return self._store.values()


class LeanResponse(Response):
    """requests' :class:`Response`, its empty cookie jar made on first use.

    The adapter never fills it (see the module's docstring); making it on every
    answer (a jar, a cookie policy) cost more than the rest of the object.
    """

    def __init__(self) -> None:
        # What Response.__init__ sets, but the jar.
        self._content = False
        self._content_consumed = False
        self._next = None
        self.status_code = None  # type: ignore[assignment]
        self.headers = CaseInsensitiveDict()
        self.raw = None
        self.url = None  # type: ignore[assignment]
        self.encoding = None
        self.history = []
        self.reason = None  # type: ignore[assignment]
        self.elapsed = datetime.timedelta(0)
        self.request = None  # type: ignore[assignment]

    @property  # type: ignore[override]
    def cookies(self) -> RequestsCookieJar:
        jar = self.__dict__.get("_cookies")
        if jar is None:
            jar = self.__dict__["_cookies"] = RequestsCookieJar()
        return jar

    @cookies.setter
    def cookies(self, jar: RequestsCookieJar) -> None:
        self.__dict__["_cookies"] = jar


def _frozen(proxies: dict[str, str] | None) -> tuple:
    return tuple(sorted(proxies.items())) if proxies else ()


def _remember(cache: dict, key: tuple, value: Any) -> None:
    if len(cache) >= CACHE_ENTRIES:
        cache.clear()  # bounded; the few live entries come back on next use
    cache[key] = value
