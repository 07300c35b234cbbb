"""The shared store (Redis): one client per process, and request-end writes at once.

Limits, quotas, slot leases and conversation affinity keep their shared state
in the Redis of ``LLM_SERVICE_RATE_LIMIT_STORAGE_URI``. They share one client
(one connection pool), built here with one set of bounds: a connect or a read
waits at most :data:`TIMEOUT` (affinity asks for its shorter one, and gets a
pool of its own), and nothing is retried: each owner falls back to counting in
this process instead.

A request ends with writes whose answer nobody waits for: the slot lease of
its upstream call is given back and its quota settled. :func:`write` runs such
a write at once, or, inside :func:`request_end`, holds it until the block ends
and sends every held write in one round trip (a pipeline); each write's
``done`` callback (a logged error, local waiters woken) runs after that trip.
The door hands the release of a finished call to :func:`defer`: while the
request that made it is :func:`held <hold>`, it runs in that request's
:func:`request_end`, so the release and the settling share the trip.

The scopes are per thread (a request is served by one thread, its stream
too); the request layers open and close them, this module knows no Flask
request.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask

log = logging.getLogger("llm_service.store")

EXTENSION = "llm_service.store"
#: Longest wait for the shared store to connect or answer, in seconds.
TIMEOUT = 0.5

#: ``done(error)``: called once a write ran (``None``) or failed.
Done = Callable[[Exception | None], None]

_local = threading.local()


# -- one client ---------------------------------------------------------------


def is_redis(uri: str) -> bool:
    """True for the URIs this module builds a client for (``redis``, ``rediss``)."""
    return uri.partition("://")[0] in ("redis", "rediss")


def _build(uri: str, timeout: float) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # Connects lazily, on first use: nothing happens here at start-up.
    return redis.Redis.from_url(
        uri,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def redis_for(app: Flask, timeout: float = TIMEOUT) -> Any:
    """The app's Redis client with ``timeout``; None unless the store is Redis."""
    clients: dict[float, Any] | None = app.extensions[EXTENSION]
    if clients is None:
        return None
    client = clients.get(timeout)
    if client is None:
        uri = app.config["RATE_LIMIT_STORAGE_URI"]
        client = clients[timeout] = _build(uri, timeout)
    return client


def init_app(app: Flask) -> None:
    """Build the shared client (before the modules that use it)."""
    uri = app.config["RATE_LIMIT_STORAGE_URI"]
    app.extensions[EXTENSION] = {} if is_redis(uri) else None
    if is_redis(uri):
        redis_for(app)
    app.before_request(_begin)


# -- writes sent together ------------------------------------------------------


def write(
    client: Any,
    script: Any,
    keys: list[str],
    args: list[Any],
    done: Done | None = None,
) -> None:
    """Run ``script`` (a registered Lua script) for its effect.

    Inside :func:`request_end` it is held until the block ends; otherwise it
    runs now. ``done`` hears how it went; without one, a failure now raises
    (a held write's is logged).
    """
    held = getattr(_local, "writes", None)
    if held is not None:
        held.append((client, script, keys, args, done or _logged))
        return
    try:
        script(keys=keys, args=args)
    except Exception as err:  # the store's failure is the owner's to handle
        if done is None:
            raise
        done(err)
    else:
        if done is not None:
            done(None)


def _logged(error: Exception | None) -> None:
    if error is not None:
        log.warning("a write to the shared store failed: %s", type(error).__name__)


def hold() -> None:
    """Keep what :func:`defer` gets on this thread for its :func:`request_end`."""
    run_deferred()
    _local.deferred = []


def defer(work: Callable[[], None]) -> None:
    """Run ``work`` at this request's end if it is held, else now."""
    deferred = getattr(_local, "deferred", None)
    if deferred is None or getattr(_local, "writes", None) is not None:
        work()
    else:
        deferred.append(work)


@contextlib.contextmanager
def request_end() -> Iterator[None]:
    """End the request: its deferred work and the block's writes, in one trip.

    The deferred work runs first; the writes it and the block make go out
    when the block ends, even if it raised. Nested, it joins the outer one.
    """
    if getattr(_local, "writes", None) is not None:
        yield
        return
    deferred = getattr(_local, "deferred", None) or []
    _local.deferred = None
    writes: list[tuple[Any, Any, list[str], list[Any], Done]] = []
    _local.writes = writes
    try:
        for work in deferred:
            _run(work)
        yield
    finally:
        _local.writes = None
        _send(writes)


def run_deferred() -> None:
    """Run the work deferred on this thread so far, now (it stays held)."""
    deferred = getattr(_local, "deferred", None)
    while deferred:
        _run(deferred.pop(0))


def _begin() -> None:
    # Whatever an earlier request on this thread left (it should leave
    # nothing) runs now rather than waiting for this one's end.
    run_deferred()
    _local.deferred = None


def _run(work: Callable[[], None]) -> None:
    try:
        work()
    except Exception:  # one failure must not keep the others from running
        log.exception("work deferred to the end of a request failed")


def _send(writes: list[tuple[Any, Any, list[str], list[Any], Done]]) -> None:
    """Send held writes: one pipeline per client, then each ``done``."""
    by_client: dict[int, list[tuple[Any, Any, list[str], list[Any], Done]]] = {}
    for held in writes:
        by_client.setdefault(id(held[0]), []).append(held)
    for group in by_client.values():
        for (_, _, _, _, done), error in zip(group, _execute(group), strict=True):
            try:
                done(error)
            except Exception:
                log.exception("a store write's follow-up failed")


def _execute(
    group: list[tuple[Any, Any, list[str], list[Any], Done]],
) -> list[Exception | None]:
    """Run one client's writes in one round trip; each one's error or None."""
    if len(group) == 1:
        _, script, keys, args, _ = group[0]
        try:
            script(keys=keys, args=args)
        except Exception as err:
            return [err]
        return [None]
    import redis

    # The commands written at once on one pooled connection, then each reply
    # read: a pipeline's round trip without redis-py's Pipeline, which costs
    # as much CPU again, and asks first whether Script objects are loaded.
    pool = group[0][0].connection_pool
    errors: list[Exception | None] = []
    try:
        connection = pool.get_connection()
    except Exception as err:  # the store is unreachable: every write failed
        return [err] * len(group)
    try:
        connection.send_packed_command(
            connection.pack_commands(
                [
                    ("EVALSHA", script.sha, len(keys), *keys, *args)
                    for _, script, keys, args, _ in group
                ]
            )
        )
        for _ in group:
            try:
                connection.read_response()
            except redis.ResponseError as err:  # this write's own failure
                errors.append(err)
            else:
                errors.append(None)
    except Exception as err:  # the connection: the writes not heard of failed
        connection.disconnect()
        errors += [err] * (len(group) - len(errors))
    finally:
        pool.release(connection)
    for n, (_, script, keys, args, _) in enumerate(group):
        if isinstance(errors[n], redis.exceptions.NoScriptError):
            # Redis restarted or flushed its scripts: the Script loads it.
            try:
                script(keys=keys, args=args)
            except Exception as err:
                errors[n] = err
            else:
                errors[n] = None
    return errors
