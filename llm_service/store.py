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

A request's first trip can also carry a script for another owner, run only
if the trip's own script allows it, in one atomic script: one that
:func:`ride` registered goes with this thread's next :func:`run` that says
when riders may run (the door asks for its slot lease with the quota
admission: the lease is taken only if the request was admitted).

The scopes are per thread (a request is served by one thread, its stream
too); the request layers open and close them, this module knows no Flask
request.

The calls a request makes (the rate limit's hit, quota admission, a slot
lease, conversation affinity, the request-end trip) take the lean path:
:func:`run` and :func:`call` send on a connection of the client pool's own
free list (:class:`Connections`), a pop and an append, where redis-py's pool takes locks
and polls the socket at every checkout and its command layers cost as much CPU
again as the round trip.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis
from flask import Flask

log = logging.getLogger("llm_service.store")

EXTENSION = "llm_service.store"
#: Longest wait for the shared store to connect or answer, in seconds.
TIMEOUT = 0.5

#: ``done(error)``: called once a write ran (``None``) or failed.
Done = Callable[[Exception | None], None]
#: ``prepare()``, at the trip: the script to send along (a registered Lua
#: script, its body run inside another), its keys and its arguments, or None
#: to send nothing.
Prepare = Callable[[], tuple[Any, Sequence[Any], Sequence[Any]] | None]
#: ``answer(reply)``: the script's reply, None if it did not run (the trip's
#: own script did not allow it), or the error (an Exception) it or its trip met.
Answer = Callable[[Any], None]

_local = threading.local()


# -- one client ---------------------------------------------------------------


def is_redis(uri: str) -> bool:
    """True for the URIs this module builds a client for (``redis``, ``rediss``)."""
    return uri.partition("://")[0] in ("redis", "rediss")


def _build(uri: str, timeout: float) -> Any:
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
        run(client, script, keys, args)
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
    _local.riders = None
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
    _local.riders = None


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
    # The commands written at once on one connection, then each reply read: a
    # pipeline's round trip without redis-py's Pipeline, which costs as much
    # CPU again, and asks first whether Script objects are loaded.
    try:
        replies = connections(group[0][0]).run(
            [_evalsha(script, keys, args) for _, script, keys, args, _ in group],
            [script for _, script, _, _, _ in group],
        )
    except Exception as err:  # the store is unreachable: every write failed
        return [err] * len(group)
    return [r if isinstance(r, Exception) else None for r in replies]


# -- scripts sent along ----------------------------------------------------------


def ride(client: Any, prepare: Prepare, answer: Answer) -> None:
    """Send a script with this thread's next :func:`run` on ``client``'s pool
    that takes riders (``riders_if``), inside its script.

    Only while this thread's request is :func:`held <hold>` (its end, where
    the owner gives back what the script took, is to come) and not ending:
    ``prepare`` is called at that trip, ``answer`` right after it (before
    :func:`run` returns), both on this thread. A script never sent (no such
    trip came before the request ended) is forgotten: its owner finds
    ``prepare`` was never called.
    """
    riders = getattr(_local, "riders", None)
    if riders is None:
        riders = _local.riders = []
    riders.append((connections(client), prepare, answer))


def _boarding(
    lean: Connections,
) -> list[tuple[Any, Sequence[Any], Sequence[Any], Answer]]:
    """What goes along with a trip on ``lean`` now: script, keys, args, answer."""
    riders = _local.riders
    held = getattr(_local, "deferred", None) is not None
    if not held or getattr(_local, "writes", None) is not None:
        return []  # no request held, or its end: nowhere to give back
    boarding = []
    for rider in [r for r in riders if r[0] is lean]:
        riders.remove(rider)
        _, prepare, answer = rider
        try:
            prepared = prepare()
        except Exception:  # the trip's own script must still go
            log.exception("preparing a script to send along failed")
            continue
        if prepared is not None:
            boarding.append((*prepared, answer))
    return boarding


def _answer(answer: Answer, reply: Any) -> None:
    try:
        answer(reply)
    except Exception:
        log.exception("a script sent along could not take its reply")


class FusedScript:
    """One Lua script that runs a first script, then riders if its reply allows.

    Each script's body becomes a local function of ``(KEYS, ARGV)``, given its
    own slices of the fused script's keys and arguments, so it runs as it
    would alone. ARGV begins with each part's number of keys and of arguments
    (the first's, then each rider's); the reply is ``{first's reply}``, or,
    when ``condition`` (Lua, over the first's ``reply``) holds,
    ``{first's reply, each rider's reply}``. A rider that fails leaves the
    first's work and reply as they are: its reply is its error. The first
    must reply with a value (a Lua table ends at its first nil). Run by its
    sha as a registered script is (``script``, ``sha``), and loaded again when
    Redis forgot it. Every key is still declared in KEYS (one Redis, not a
    Cluster's slots: the parts' keys need not share a hash tag).
    """

    def __init__(self, first: str, riders: Sequence[str], condition: str) -> None:
        parts = [first, *riders]
        lines = [
            f"local function part_{n}(KEYS, ARGV)\n{body}\nend"
            for n, body in enumerate(parts)
        ]
        lines.append(
            _FUSED_RUN.replace("%PARTS%", str(len(parts)))
            .replace("%RIDERS%", ", ".join(f"part_{n}" for n in range(1, len(parts))))
            .replace("%CONDITION%", condition)
        )
        self.script = "\n".join(lines)
        self.sha = hashlib.sha1(self.script.encode(), usedforsecurity=False).hexdigest()


_FUSED_RUN = """
local function slice(from, at, count)
  local part = {}
  for i = 1, count do part[i] = from[at + i] end
  return part
end
local key_at, arg_at = 0, 2 * %PARTS%
local function next_part(n)
  local keys, args = tonumber(ARGV[2 * n - 1]), tonumber(ARGV[2 * n])
  local sliced = {slice(KEYS, key_at, keys), slice(ARGV, arg_at, args)}
  key_at, arg_at = key_at + keys, arg_at + args
  return sliced
end
local first = next_part(1)
local reply = part_0(first[1], first[2])
local replies = {reply}
if not (%CONDITION%) then return replies end
for n, rider in ipairs({%RIDERS%}) do
  local sliced = next_part(n + 1)
  local ok, answer = pcall(rider, sliced[1], sliced[2])
  if not ok then
    if type(answer) ~= 'table' then answer = redis.error_reply(tostring(answer)) end
  elseif answer == nil then
    answer = false
  end
  replies[n + 1] = answer
end
return replies
"""

#: The fused scripts made so far, by their parts' sha and their condition.
_fused: dict[tuple[str, ...], FusedScript] = {}


def fused(first: Any, riders: Sequence[Any], condition: str) -> FusedScript:
    """The script that runs ``first``, then ``riders`` if ``condition`` holds."""
    key = (first.sha, *(rider.sha for rider in riders), condition)
    found = _fused.get(key)
    if found is None:
        found = _fused[key] = FusedScript(
            _text(first), [_text(rider) for rider in riders], condition
        )
    return found


def _text(script: Any) -> str:
    body = script.script
    return body.decode() if isinstance(body, bytes) else body


# -- the lean command path -------------------------------------------------------


def _evalsha(script: Any, keys: Sequence[Any], args: Sequence[Any]) -> tuple:
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def run(
    client: Any,
    script: Any,
    keys: Sequence[Any],
    args: Sequence[Any],
    riders_if: str | None = None,
) -> Any:
    """Run ``script`` (registered on ``client``) in one round trip; its reply.

    As ``script(keys=keys, args=args)``, raising what it would, on the lean
    path. A script Redis forgot is loaded and run again.

    ``riders_if``: the scripts that :func:`ride` along may go with this one,
    in the same atomic script (:class:`FusedScript`), and run after it only
    when this Lua condition over its ``reply`` holds (``"reply[1] == 1"``).
    Without it, none goes.
    """
    lean = connections(client)
    if riders_if is not None and getattr(_local, "riders", None):
        riders = _boarding(lean)
        if riders:
            reply = _run_fused(lean, script, keys, args, riders_if, riders)
            if isinstance(reply, Exception):
                raise reply
            return reply
    reply = lean.run([_evalsha(script, keys, args)], [script])[0]
    if isinstance(reply, Exception):
        raise reply
    return reply


def _run_fused(
    lean: Connections,
    script: Any,
    keys: Sequence[Any],
    args: Sequence[Any],
    condition: str,
    riders: list[tuple[Any, Sequence[Any], Sequence[Any], Answer]],
) -> Any:
    """Run ``script`` and, if ``condition`` holds, the riders; its reply (or error)."""
    together = fused(script, [rider[0] for rider in riders], condition)
    counts: list[int] = [len(keys), len(args)]
    every_key, every_arg = list(keys), list(args)
    for _, rider_keys, rider_args, _ in riders:
        counts += [len(rider_keys), len(rider_args)]
        every_key += rider_keys
        every_arg += rider_args
    try:
        reply = lean.run(
            [_evalsha(together, every_key, [*counts, *every_arg])], [together]
        )[0]
    except Exception as err:
        reply = err
    if isinstance(reply, Exception):
        for *_, answer in riders:
            _answer(answer, reply)
        return reply
    for n, (*_, answer) in enumerate(riders, start=1):
        _answer(answer, reply[n] if n < len(reply) else None)
    return reply[0]


def call(client: Any, *command: Any) -> Any:
    """Send one command (``"GET", key``) on the lean path; Redis' raw reply."""
    reply = connections(client).run([command])[0]
    if isinstance(reply, Exception):
        raise reply
    return reply


_made_lock = threading.Lock()


def connections(client: Any) -> Connections:
    """The free list of ``client``'s pool (made on first use).

    Kept on the pool, so clients that share a pool (the rate limiter's and
    the store's) share one free list, and its bound.
    """
    pool = client.connection_pool
    try:
        return pool._lean_connections
    except AttributeError:
        with _made_lock:
            if not hasattr(pool, "_lean_connections"):
                pool._lean_connections = Connections(pool)
        return pool._lean_connections


#: Every free list in this process, emptied in a forked child.
_every: weakref.WeakSet[Connections] = weakref.WeakSet()


class Connections:
    """A pool's connections for the lean path: a free list of its own.

    Connections are made as the client's pool makes them (its connection
    class and keyword arguments: the URI's host, TLS for ``rediss://``,
    password, db, the timeouts, no retries), lazily, in the process that uses
    them; a forked child (a gunicorn worker) starts with an empty list and
    never touches its parent's sockets (:func:`os.register_at_fork`, as
    redis-py's pool resets itself on a new pid). Taking one is a pop and
    giving it back an append, with no lock; only a thread that finds none
    free takes the lock, to make one while fewer than the pool's
    ``max_connections`` exist, or else to wait for one (as long as a read may
    take) and then fail as the pool does when full.

    redis-py's pool asks the socket at every checkout whether it can be read
    (a ``poll``, which also hands over the GIL), to find a connection left
    with an unread reply or closed by the server. Here the first cannot
    happen: a connection goes back to the free list only after every reply
    of its trip was read whole (an error *reply* is a whole reply); any other
    outcome (a timeout, a lost connection, a reply that could not be parsed,
    an exception in the middle) disconnects it and it is dropped. The second
    is found after the fact: a connection taken from the free list that fails
    with a ConnectionError before its first reply was closed by the server
    (Redis restarted, or dropped the idle client) before it read the command,
    which is what the poll would have found. It is dropped with every other
    idle connection (of the same server, so most likely closed too) and the
    trip is sent once more on a fresh one: the reconnect the pool made at
    checkout, not a retry of a command Redis may have run. (Had Redis died
    after running the command, the fresh connection is refused: no restart is
    that quick.) A timeout is never sent again.
    """

    def __init__(self, pool: Any) -> None:
        self.factory = pool.connection_class
        self.kwargs = dict(pool.connection_kwargs)
        #: Most connections in existence at once.
        self.limit = pool.max_connections or 2**31
        #: Longest wait for a free connection when ``limit`` are in use.
        self.wait = self.kwargs.get("socket_timeout") or TIMEOUT
        self._reset()
        _every.add(self)

    def _reset(self) -> None:
        self.free: deque[Any] = deque()
        self.made = 0
        self.waiting = 0
        self._changed = threading.Condition(threading.Lock())

    def take(self) -> tuple[Any, bool]:
        """A connection, and whether it served a trip already."""
        try:
            return self.free.pop(), True
        except IndexError:
            return self._take_slowly()

    def _take_slowly(self) -> tuple[Any, bool]:
        deadline = time.monotonic() + self.wait
        with self._changed:
            # Counted before looking: a connection given back from now on
            # sees a waiter and wakes it (``give`` reads ``waiting`` after
            # its append, without the lock).
            self.waiting += 1
            try:
                while True:
                    with contextlib.suppress(IndexError):
                        return self.free.pop(), True
                    if self.made < self.limit:
                        connection = self.factory(**self.kwargs)
                        self.made += 1
                        return connection, False
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise redis.exceptions.MaxConnectionsError(
                            "Too many connections"
                        )
                    self._changed.wait(left)
            finally:
                self.waiting -= 1

    def give(self, connection: Any) -> None:
        """Put back a connection whose every reply was read."""
        if connection.should_reconnect():  # the server said it moves
            connection.disconnect()
        self.free.append(connection)
        if self.waiting:
            with self._changed:
                self._changed.notify()

    def drop(self, connection: Any) -> None:
        """Close a connection in an unknown state and forget it."""
        with contextlib.suppress(Exception):
            connection.disconnect()
        with self._changed:
            self.made -= 1
            self._changed.notify()

    def run(
        self, commands: list[tuple], scripts: Sequence[Any] | None = None
    ) -> list[Any]:
        """Send ``commands`` at once, then read each reply: one round trip.

        Each command's reply, or the error Redis answered it with. If the
        connection fails, this raises before any reply was read, or else gives
        the error for the replies not read. ``scripts[n]``, when given, is the
        Script that ``commands[n]`` runs by its sha: Redis lost it (restarted,
        flushed), it is loaded and run again, once.
        """
        replies = self._trip(commands)
        if scripts is not None:
            lost = [
                n
                for n, reply in enumerate(replies)
                if isinstance(reply, redis.exceptions.NoScriptError)
            ]
            if lost:
                again = []
                for n in lost:
                    again += [("SCRIPT", "LOAD", scripts[n].script), commands[n]]
                try:
                    loaded = self._trip(again)
                except Exception as err:
                    loaded = [err] * len(again)
                for k, n in enumerate(lost):
                    load, reply = loaded[2 * k : 2 * k + 2]
                    replies[n] = load if isinstance(load, Exception) else reply
        return replies

    def _trip(self, commands: list[tuple], stale: bool = True) -> list[Any]:
        connection, reused = self.take()
        replies: list[Any] = []
        try:
            connection.send_packed_command(
                connection.pack_commands(commands), check_health=False
            )
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except redis.ResponseError as err:  # a whole reply: an error
                    replies.append(err)
        except BaseException as err:
            self.drop(connection)
            if (
                stale
                and reused
                and not replies
                and isinstance(err, redis.ConnectionError)
            ):
                # Closed by the server before it read the command: its idle
                # siblings most likely too (see the class's docstring).
                while True:
                    try:
                        idle = self.free.popleft()
                    except IndexError:
                        break
                    self.drop(idle)
                return self._trip(commands, stale=False)
            if not replies or not isinstance(err, Exception):
                raise
            return replies + [err] * (len(commands) - len(replies))
        self.give(connection)
        return replies


def _forget_every_connection() -> None:
    # In a forked child (a gunicorn worker): the parent's connections are the
    # parent's (closing them here would not shut the parent's sockets: redis-py
    # shuts a socket down only in the process that made it).
    for lean in list(_every):
        lean._reset()


os.register_at_fork(after_in_child=_forget_every_connection)
