"""Who is calling: API keys become ``g.caller``; model patterns; the open-bind guard.

Keys look like ``sk-llm-<lookup>_<secret>``: the lookup part (48 bits, not
secret) finds the key's row, the secret part carries 192 random bits, and only
the SHA-256 of the whole key is stored (a slow hash buys nothing for random
secrets); the comparison is constant-time. Each worker keeps the key set in
memory for ``LLM_SERVICE_AUTH_CACHE_SECONDS`` and refreshes it in the
background, so a request costs a dict lookup and one hash; while the database
is down the last set stays in use.

``LLM_SERVICE_AUTH``: ``auto`` requires a key once one has ever been created
(revoked keys stay in the table, so revoking the last one keeps the gateway
closed), ``required`` always, ``off`` never.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import translate
from http import HTTPStatus
from typing import Any

from flask import Flask, current_app, g, request
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import db
from .errors import APIError

log = logging.getLogger("llm_service.auth")

KEY_PREFIX = "sk-llm-"
EXTENSION = "llm_service.auth"
#: Blueprints whose routes need a key once keys are required.
PROTECTED_BLUEPRINTS = frozenset({"message", "openai", "usage"})
DOCS_BLUEPRINT = "docs"
BEARER = {"WWW-Authenticate": 'Bearer realm="llm-service"'}
#: Longest model name quoted back in a refusal.
_MODEL_SHOWN = 128


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: a key's name, limits and rights, or nobody."""

    name: str | None = None
    key_id: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    weight: int = 1
    models: tuple[str, ...] = ()
    admin: bool = False
    _pattern: re.Pattern | None = field(default=None, compare=False, repr=False)

    @property
    def anonymous(self) -> bool:
        return self.key_id is None

    def may_use(self, model: str) -> bool:
        """Tell whether the key's model globs allow ``model`` (no globs: all)."""
        if self._pattern is None:
            return True
        return self._pattern.fullmatch(model.lower()) is not None


ANONYMOUS = Caller()


def split_patterns(text: str | None) -> tuple[str, ...]:
    """``"qwen*, llama-3*"`` -> ``("qwen*", "llama-3*")``."""
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def _compile(patterns: tuple[str, ...]) -> re.Pattern | None:
    if not patterns:
        return None
    return re.compile("|".join(translate(p.lower()) for p in patterns))


def new_key() -> tuple[str, str, str]:
    """Return a new ``(key, lookup_id, secret_hash)``; the key is shown once."""
    lookup = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{lookup}_{secrets.token_urlsafe(24)}"
    return key, lookup, hash_key(key)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _lookup_id(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    lookup, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    return lookup if sep and secret else None


class AuthUnavailableError(Exception):
    """No key set could be read: never loaded, and the database is unreachable."""


@dataclass(frozen=True)
class _Entry:
    caller: Caller
    digest: bytes
    expires_at: float | None
    revoked: bool


@dataclass(frozen=True)
class KeySet:
    """The keys one worker knows, by lookup id; ``ever``: a key has existed."""

    entries: dict[str, _Entry]
    ever: bool

    def check(self, presented: str, now: float) -> Caller:
        """Return the key's caller, or raise the :class:`APIError` to answer."""
        entry = self.entries.get(_lookup_id(presented) or "")
        digest = hashlib.sha256(presented.encode()).digest()
        if entry is None or not hmac.compare_digest(digest, entry.digest):
            raise _refusal("invalid_api_key", "The API key is not valid.")
        if entry.revoked:
            raise _refusal("api_key_revoked", "The API key has been revoked.")
        if entry.expires_at is not None and now >= entry.expires_at:
            raise _refusal("api_key_expired", "The API key has expired.")
        return entry.caller


def _refusal(code: str, message: str) -> APIError:
    return APIError(401, code, message, headers=BEARER)


def _epoch(moment: datetime | None) -> float | None:
    return None if moment is None else moment.replace(tzinfo=UTC).timestamp()


def load_key_set(bind: Engine) -> KeySet:
    """Read every key from the database (an empty set before the first upgrade)."""
    from .models import ApiKey

    try:
        with bind.connect() as connection:
            rows = connection.execute(select(ApiKey.__table__)).all()
    except SQLAlchemyError as err:
        try:
            missing = not db.has_schema(bind)
        except SQLAlchemyError:
            raise AuthUnavailableError(str(err)) from err
        if missing:
            return KeySet({}, ever=False)
        raise AuthUnavailableError(str(err)) from err
    entries: dict[str, _Entry] = {}
    for row in rows:
        patterns = split_patterns(row.models)
        caller = Caller(
            name=row.name,
            key_id=row.id,
            rpm=row.rpm,
            tpm=row.tpm,
            concurrency=row.concurrency,
            weight=row.weight or 1,
            models=patterns,
            admin=bool(row.admin),
            _pattern=_compile(patterns),
        )
        expires = _epoch(row.expires_at)
        revoked = row.revoked_at is not None
        entries[row.lookup_id] = _Entry(
            caller, bytes.fromhex(row.secret_hash), expires, revoked
        )
        if row.previous_lookup_id and row.previous_secret_hash:
            grace = _epoch(row.previous_expires_at) or 0.0
            entries[row.previous_lookup_id] = _Entry(
                caller,
                bytes.fromhex(row.previous_secret_hash),
                grace if expires is None else min(grace, expires),
                revoked,
            )
    return KeySet(entries, ever=bool(rows))


class KeyCache:
    """One worker's key set, read again when older than ``ttl`` seconds.

    While the database is down the last set stays in use and is retried in
    the background, so no request waits for a database that does not answer.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._keys: KeySet | None = None
        self._loaded_at = 0.0
        self._refreshing = False
        self._ever = False  # sticky: once keys existed, they stay required
        self._reload = False
        self._failing = False

    def current(self, engine: Callable[[], Engine]) -> KeySet:
        """The key set; ``engine()``, the database's, is asked for only to read it."""
        keys = self._keys
        fresh = time.monotonic() - self._loaded_at < self.ttl
        if keys is not None and fresh and not self._reload:
            return keys
        bind = engine()
        if keys is None or self.ttl == 0 or self._reload:
            with self._lock:
                if self._keys is None or self.ttl == 0 or self._reload:
                    self._reload = False
                    try:
                        self._store(load_key_set(bind))
                    except AuthUnavailableError:
                        if self._keys is None:
                            raise
                return self._keys
        if not self._failing:
            # Stale: one request reads the keys again (a revocation holds from
            # now on); the others go on with the set they have meanwhile.
            if self._lock.acquire(blocking=False):
                try:
                    self._store(load_key_set(bind))
                except AuthUnavailableError as err:
                    log.warning(
                        "could not read API keys (keeping the last set): %s", err
                    )
                    self._failing = True
                finally:
                    self._lock.release()
            return self._keys
        # While the database is down, retry in the background: no request waits.
        with self._lock:
            start = not self._refreshing
            self._refreshing = True
        if start:
            threading.Thread(
                target=self._refresh, args=(bind,), name="key-refresh", daemon=True
            ).start()
        return keys

    def invalidate(self) -> None:
        """Read the keys again on next use (``flask keys`` in this process)."""
        self._reload = True

    def _store(self, keys: KeySet) -> None:
        self._ever = self._ever or keys.ever
        if self._ever and not keys.ever:
            keys = KeySet(keys.entries, ever=True)
        self._keys = keys
        self._loaded_at = time.monotonic()

    def _refresh(self, bind: Engine) -> None:
        try:
            keys = load_key_set(bind)
        except AuthUnavailableError:
            pass  # keep the last set; try again at the next stale use
        else:
            with self._lock:
                self._store(keys)
                self._failing = False
            log.info("API keys read again after a database outage")
        finally:
            self._refreshing = False


# -- per request -----------------------------------------------------------


@dataclass(frozen=True)
class _Identity:
    caller: Caller
    required: bool
    presented: bool
    failure: APIError | None


def presented_key() -> str | None:
    """The key sent as ``Authorization: Bearer ...`` or ``x-api-key``.

    HTTP Basic works too (any user name, the key as password), so a browser
    can open the status page.
    """
    current = request._get_current_object()  # once: each use of the proxy costs
    header = current.headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        if scheme.lower() == "basic" and current.authorization is not None:
            return (current.authorization.password or "").strip() or None
    value = current.headers.get("x-api-key", "").strip()
    return value or None


def _identify() -> _Identity:
    config = current_app.config
    if config["AUTH"] == "off":
        return _Identity(ANONYMOUS, False, False, None)
    presented = presented_key()
    cache: KeyCache = current_app.extensions[EXTENSION]
    try:
        keys = cache.current(db.engine)
    except AuthUnavailableError:
        failure = APIError(
            503,
            "auth_unavailable",
            "API keys cannot be checked right now; retry shortly.",
            headers={"Retry-After": "5"},
        )
        return _Identity(ANONYMOUS, True, presented is not None, failure)
    required = config["AUTH"] == "required" or keys.ever
    if not required:
        return _Identity(ANONYMOUS, False, False, None)
    if presented is None:
        failure = _refusal(
            "invalid_api_key",
            "An API key is required: send `Authorization: Bearer <key>`.",
        )
        return _Identity(ANONYMOUS, True, False, failure)
    try:
        return _Identity(keys.check(presented, time.time()), True, True, None)
    except APIError as failure:
        return _Identity(ANONYMOUS, True, True, failure)


def identity() -> _Identity:
    """This request's identity, decided once (the rate limiter asks first)."""
    state = g._get_current_object()  # once: each use of the proxy costs
    found = state.get("_identity")
    if found is None:
        found = state._identity = _identify()
        state.caller = found.caller
    return found


def current_caller() -> Caller:
    """The caller of this request (:data:`ANONYMOUS` without a key)."""
    return identity().caller


def keys_required() -> bool:
    return identity().required


def health_details_allowed() -> bool:
    """``/health`` details: for everyone until keys exist, then admin keys only."""
    found = identity()
    return not found.required or found.caller.admin


def require_admin(challenge: str = "Bearer") -> None:
    """Monitoring: anyone until keys exist, then admin keys only.

    ``challenge`` is the scheme a 401 asks for (``Basic`` for pages a browser
    opens, so it prompts for the key as password).
    """
    found = identity()
    if not found.required:
        return
    asked = {"WWW-Authenticate": f'{challenge} realm="llm-service"'}
    if found.failure is not None:
        failure = found.failure.failure
        raise APIError(
            failure.status,
            failure.code,
            failure.message,
            headers={**failure.headers, **asked},
        )
    if found.caller.anonymous:
        raise APIError(
            401, "invalid_api_key", "An admin API key is required.", headers=asked
        )
    if not found.caller.admin:
        raise APIError(
            403, "admin_key_required", "This page is for admin API keys only."
        )


def _exempt_from_address_limit() -> bool:
    # A valid key has its own quotas; everyone else (wrong keys included)
    # counts against the per-address limit.
    if presented_key() is None:
        return False
    try:
        return not identity().caller.anonymous
    except Exception:  # the limiter would take an error for a storage outage
        log.exception("identifying the caller failed")
        return False


def _is_protected() -> bool:
    blueprint = request.blueprint
    if blueprint in PROTECTED_BLUEPRINTS:
        return True
    return blueprint == DOCS_BLUEPRINT and not current_app.config["DOCS_PUBLIC"]


def _count_failure_on_public_route() -> None:
    """Wrong keys sent to unlimited routes still spend the address's budget."""
    import limits as limits_lib

    for limiter in current_app.extensions.get("limiter", ()):
        try:
            item = limits_lib.parse(
                f"{current_app.config['RATE_LIMIT_REQUESTS']} per minute"
            )
            allowed = limiter.limiter.hit(item, "auth-failures", request.remote_addr)
        except Exception:  # a storage outage must not make auth fail
            log.warning("could not count a failed authentication", exc_info=True)
            return
        if not allowed:
            raise APIError(
                429,
                "rate_limited",
                "Too many failed authentications from this address; retry later.",
                headers={"Retry-After": "60"},
            )


def requested_model() -> str | None:
    """The ``model`` named in a JSON body, if any (the view validates the rest)."""
    if request.method != "POST" or not request.is_json:
        return None
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        return None
    return model_named(body)


def model_named(body: Any) -> str | None:
    """The ``model`` a parsed JSON body names: a non-empty string, else None."""
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) and model else None


def visible_models(listing: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI model list as this request's key may see it (its globs only)."""
    caller = current_caller()
    data = listing.get("data")
    if caller.models == () or not isinstance(data, list):
        return listing
    allowed = [
        entry
        for entry in data
        if isinstance(entry, dict)
        and isinstance(entry.get("id"), str)
        and caller.may_use(entry["id"])
    ]
    return {**listing, "data": allowed}


def check_model(caller: Caller, model: str | None) -> None:
    """Refuse (403) a model outside the key's globs, before the upstream sees it."""
    if caller.models == ():
        return
    if model is None:
        model = current_app.config["DEFAULT_MODEL"]
    if model is None:
        raise APIError(
            403,
            "model_not_allowed",
            "This API key is limited to some models: name one in `model` ("
            + ", ".join(caller.models)
            + ").",
        )
    if not caller.may_use(model):
        raise APIError(
            403,
            "model_not_allowed",
            f"This API key may not use the model {model[:_MODEL_SHOWN]!r}.",
        )


def _enforce() -> None:
    protected = _is_protected()
    if not protected and presented_key() is None:
        return  # public and anonymous: no key set needed (liveness never waits)
    found = identity()
    if found.failure is not None and found.presented and not protected:
        _count_failure_on_public_route()
    if not protected:
        return
    if found.failure is not None:
        raise found.failure
    if found.caller.models == ():
        return  # any model: no need to read the body here
    if request.blueprint in {"message", "openai"} and request.method == "POST":
        # A call names its model; a listing (GET /v1/models) is filtered instead.
        check_model(found.caller, requested_model())


def _caller_label() -> str | None:
    """The calling key's name for the metrics' ``key`` label (None: anonymous)."""
    caller = g.get("caller")
    return None if caller is None or caller.anonymous else caller.name


def init_app(app: Flask) -> None:
    """Identify callers before the per-address limit, enforce keys after it."""
    from . import limits, metrics

    app.extensions[EXTENSION] = KeyCache(app.config["AUTH_CACHE_SECONDS"])
    # tokens_total counts per key name (README, "Monitoring").
    metrics.hooks.caller_label = _caller_label
    if limits.EXEMPTIONS in app.extensions:
        limits.exempt_when(app, _exempt_from_address_limit)
    app.before_request(_enforce)


# -- documenting the scheme -------------------------------------------------

AUTH_CODES = {
    401: ("invalid_api_key", "api_key_expired", "api_key_revoked"),
    403: ("model_not_allowed",),
    429: ("token_quota_exceeded", "concurrency_limit_exceeded"),
    503: ("auth_unavailable",),
}


def document_security(document: dict[str, Any], protected_tags: Iterable[str]) -> None:
    """Declare the bearer scheme and the auth errors on the protected operations."""
    from .openapi import ERROR_CODES

    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearerAuth"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from `flask keys create` (`sk-llm-...`), as "
        "`Authorization: Bearer <key>` or `x-api-key: <key>`. Needed once a key "
        "exists (`LLM_SERVICE_AUTH=auto`), always (`required`) or never (`off`).",
    }
    tags = set(protected_tags)
    for operations in document.get("paths", {}).values():
        for method, operation in operations.items():
            if not set(operation.get("tags", ())) & tags:
                continue
            # Or none: until a key exists (`auto`), or with `off`, calls need
            # no key; whether one is needed is the gateway's state, not the
            # document's.
            operation["security"] = [{"bearerAuth": []}, {}]
            responses = operation["responses"]
            template = responses.get("400") or next(iter(responses.values()))
            for status, codes in AUTH_CODES.items():
                if status in (403, 429) and method != "post":
                    continue
                lines = "\n".join(f"- `{c}`: {ERROR_CODES[c][1]}." for c in codes)
                if str(status) in responses:
                    responses[str(status)]["description"] += "\n" + lines
                    continue
                phrase = HTTPStatus(status).phrase
                responses[str(status)] = {
                    "description": f"{phrase}.\n\n{lines}",
                    "headers": dict(template.get("headers", {})),
                    "content": template.get("content", {}),
                }


# -- the open-bind guard ----------------------------------------------------


def is_loopback(bind: str) -> bool:
    """Tell whether a gunicorn bind address (``host:port``, ``unix:...``) is local."""
    if bind.startswith(("unix:", "fd://")):
        return True
    host = bind.rsplit(":", 1)[0] if ":" in bind else bind
    host = host.strip("[]")
    if host in {"localhost", "ip6-localhost"}:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve beyond this machine


def exposure_problem(app: Flask, binds: Iterable[str]) -> str | None:
    """The one-line reason to refuse listening on ``binds``, or None."""
    exposed = [bind for bind in binds if not is_loopback(bind)]
    if not exposed or app.config["AUTH"] != "auto":
        return None  # loopback, or keys always required, or explicitly off
    with app.app_context():
        try:
            keys = load_key_set(db.engine())
        except AuthUnavailableError as err:
            # Workers answer 503 auth_unavailable until it is back: closed.
            log.warning("cannot read API keys at start: %s", err)
            return None
        finally:
            db.engine().dispose()
    if keys.ever:
        return None
    return (
        f"llm-service: refusing to listen on {exposed[0]} with no API key: create "
        "one with `flask keys create NAME`, or set LLM_SERVICE_AUTH=off to serve "
        "without keys."
    )


def check_start(binds: Iterable[str]) -> None:
    """Before serving: bring the schema up to date, refuse an open bind.

    Called once by gunicorn's master (``on_starting``) and by ``make run``;
    settings come from ``.env``, ``instance/config.py`` and the environment,
    like the app's. Exits with one line naming the fix.
    """
    from dotenv import load_dotenv

    from . import create_app
    from .config import ConfigError

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    load_dotenv(os.environ.get("LLM_SERVICE_ENV_FILE") or os.path.join(root, ".env"))
    try:
        app = create_app()
    except ConfigError as err:
        raise SystemExit(f"llm-service: configuration error: {err}") from None
    try:
        db.prepare(app)
    except SQLAlchemyError as err:
        log.warning("database schema not upgraded at start: %s", err)
    problem = exposure_problem(app, binds)
    if problem:
        raise SystemExit(problem)
