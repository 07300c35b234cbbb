"""Usage records: what each request used, buffered, written by a background thread.

Every request on the model routes leaves one record (key, model, upstream,
prompt and completion tokens, status, latency, time to first token,
correlation ID, time); never its prompt or answer. Records go into a bounded
in-memory buffer and a writer thread stores them in batches, so the database is
never on a request's path: while it is slow or down, records wait (and are
written once it is back); past ``LLM_SERVICE_USAGE_BUFFER_SIZE`` new records
are dropped, counted and logged. Each record has its own id (ordered by
time), so a batch written twice (a commit whose answer was lost) is stored once.

Tokens come from the upstream's ``usage``; a stream without one (llama.cpp)
counts relayed content chunks as completion tokens and the prompt estimate as
prompt tokens, and the record says ``usage_estimated``. A relayed answer
(:mod:`.relayed`) is read as the client parsed it, never parsed again.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from flask import Flask, Request, Response, current_app, g, request
from flask.ctx import _AppCtxGlobals
from sqlalchemy import func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, Engine

from . import db, store
from .auth import model_named
from .ids import new_uuid7_hex
from .models import UsageRecord, utcnow
from .relayed import answer_of

log = logging.getLogger("llm_service.usage")

EXTENSION = "llm_service.usage"
#: Blueprints whose requests are metered (and may be charged to a key).
METERED_BLUEPRINTS = frozenset({"message", "openai"})
#: Records per INSERT.
BATCH_SIZE = 500
#: Longest wait between two tries while the database is down.
MAX_BACKOFF_SECONDS = 5.0
#: At most one "records dropped" line per this many seconds.
DROP_LOG_SECONDS = 10.0
#: Characters per token in the prompt estimate (a common rule of thumb).
CHARS_PER_TOKEN = 4

_CONTENT = re.compile(rb'"content"\s*:\s*"[^"]')
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


# -- what one request used ---------------------------------------------------


@dataclass
class Meter:
    """One request's consumption, filled in as the request goes."""

    model: str | None
    prompt_estimate: int
    max_tokens: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    chunks: int = 0
    first_byte_at: float | None = None
    streamed: bool = False
    #: Called with the tokens used once the answer has ended (quota settling).
    on_finish: list[Callable[[int], None]] = field(default_factory=list)

    @property
    def reservation(self) -> int:
        """Tokens to reserve before sending: prompt estimate + ``max_tokens``."""
        return self.prompt_estimate + self.max_tokens

    def take_usage(self, usage: Any) -> None:
        """Read an OpenAI ``usage`` object (or /llm/message's short one)."""
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens", usage.get("prompt"))
        completion = usage.get("completion_tokens", usage.get("completion"))
        if isinstance(prompt, int) and prompt >= 0:
            self.prompt_tokens = prompt
        if isinstance(completion, int) and completion >= 0:
            self.completion_tokens = completion
        elif isinstance(prompt, int):
            self.completion_tokens = 0  # embeddings: prompt tokens only

    def take_answer(self, answer: Any) -> None:
        """Read a JSON answer's ``usage``, and its ``model`` if none was asked for."""
        if isinstance(answer, dict):
            self.take_usage(answer.get("usage"))
            if self.model is None and isinstance(answer.get("model"), str):
                self.model = answer["model"]

    def measured(self) -> tuple[int, int, bool]:
        """``(prompt, completion, estimated)`` as best known now."""
        if self.prompt_tokens is not None and self.completion_tokens is not None:
            return self.prompt_tokens, self.completion_tokens, False
        if not self.streamed and self.chunks == 0:
            return 0, 0, False  # no answer: nothing generated
        return self.prompt_estimate, self.chunks, True


def _text_length(value: Any, depth: int = 0) -> int:
    if isinstance(value, str):
        return len(value)
    if depth > 8:
        return 0
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return 0
    total = 0
    for item in value:
        total += len(item) if isinstance(item, str) else _text_length(item, depth + 1)
    return total


def _new_meter(current: Request) -> Meter:
    posted = current.method == "POST"
    body = None
    if posted:
        try:
            # None unless a JSON body (get_json asks is_json itself).
            body = current.get_json(silent=True)
        except RecursionError:
            body = None
    if not isinstance(body, dict):
        body = {}
    text = 0
    for name in ("messages", "prompt", "input"):
        value = body.get(name)
        if value is not None:
            text += _text_length(value)
    messages = body.get("messages")
    overhead = 4 * len(messages) if isinstance(messages, list) else 0
    prompt = math.ceil(text / CHARS_PER_TOKEN) + overhead
    max_tokens = 0
    if posted and current.endpoint != "openai.embeddings":  # it generates
        asked = body.get("max_tokens", body.get("max_completion_tokens"))
        valid = isinstance(asked, int) and not isinstance(asked, bool) and asked > 0
        max_tokens = asked if valid else current_app.config["DEFAULT_MAX_TOKENS"]
    return Meter(model_named(body), prompt, max_tokens)


def meter() -> Meter:
    """This request's meter (made on first use from the request body)."""
    context = g._get_current_object()
    found = context.get("usage_meter")
    if found is None:
        found = context.usage_meter = _new_meter(request._get_current_object())
    return found


def _read_event_usage(chunk: bytes, found: Meter) -> None:
    for line in chunk.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                event = json.loads(line[5:])
            except ValueError:
                return
            if isinstance(event, dict):
                found.take_usage(event.get("usage"))
                if found.model is None and isinstance(event.get("model"), str):
                    found.model = event["model"]
            return


class MeteredStream:
    """A stream's body passed on as it is, counted on the way; finished once.

    Flask runs teardown functions when the view returns, before a stream is
    sent, and again when it ends; the end of the answer is known here instead.
    The relay ends it (:func:`end_stream`) right before it yields the stream's
    final event, so the client cannot read that event before the stream's
    slot and quota are given back; a stream that never gets there (the client
    hung up, a write failed) ends when its body is closed.
    """

    def __init__(
        self, body: Iterable[bytes], found: Meter, finish: Callable[[], None]
    ) -> None:
        self._body = body
        self._found = found
        self._finish = finish
        self._done = False
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._body:
                if not self._done:  # the final event was counted by end()
                    self._count(chunk)
                yield chunk
        finally:
            self.close()

    def _count(self, chunk: bytes) -> None:
        found = self._found
        if chunk and not chunk.startswith(b":"):  # keep-alive comments
            if found.first_byte_at is None:
                found.first_byte_at = time.perf_counter()
            if _USAGE_OBJECT.search(chunk):
                _read_event_usage(chunk, found)
            if _CONTENT.search(chunk):
                found.chunks += 1

    def end(self, last: bytes = b"") -> None:
        """Finish before ``last``, the stream's final event, is sent (once)."""
        if self._done:
            return
        self._count(last)  # /llm/message's final event carries its usage
        # The stream's slot release (deferred by the door, which the relay
        # closed first) and the settling go to the shared store together.
        with store.request_end():
            self._end()

    def close(self) -> None:
        """Close the body; finish if the stream ended without its final event."""
        if self._closed:
            return
        self._closed = True
        with store.request_end():
            try:
                close = getattr(self._body, "close", None)
                if close is not None:
                    close()
            finally:
                self._end()

    def _end(self) -> None:
        if not self._done:
            self._done = True
            self._finish()


def end_stream(last: bytes = b"") -> None:
    """End this request's metered stream before ``last``, its final event, is sent.

    Its usage is recorded and its quota settled, with the release its upstream
    stream deferred (close that first), so a caller that sends its next request
    the moment it reads ``last`` finds its concurrency unit and the slot free.
    Called inside the stream's request context; does nothing for a request
    that is not metered, or a stream already ended.
    """
    stream: MeteredStream | None = g.get("usage_stream")
    if stream is not None:
        stream.end(last)


def _observe(response: Response) -> Response:
    context = g._get_current_object()
    found = context.get("usage_meter")
    if found is None:
        return response
    current = request._get_current_object()
    if current.blueprint not in METERED_BLUEPRINTS:
        return response
    if response.is_streamed and response.mimetype == "text/event-stream":
        found.streamed = True
        finish = _finisher(context, current, found, response.status_code)
        response.response = context.usage_stream = MeteredStream(
            response.response, found, finish
        )
    elif response.status_code == 200 and response.is_json:
        answer = answer_of(response)  # a relayed answer: parsed already
        if answer is not None:
            found.take_answer(answer)
        else:
            with contextlib.suppress(ValueError):  # not JSON after all
                found.take_answer(json.loads(response.get_data()))
    return response


class UsageLog:
    """A bounded buffer of records and the thread that writes them in batches."""

    def __init__(self, capacity: int, flush_seconds: float) -> None:
        self.capacity = capacity
        self.flush_seconds = flush_seconds
        self._cond = threading.Condition()
        self._queue: deque[dict[str, Any]] = deque()
        self._pending: list[dict[str, Any]] = []  # a batch not yet written
        #: Where the records go (the engine given with the last one).
        self.engine: Engine | None = None
        self._thread: threading.Thread | None = None
        self.written = 0
        self.dropped = 0
        self.failing = False
        self._dropped_logged_at = 0.0
        self._stopped = False
        #: Told the records waiting after each change, and each drop (metrics).
        self.on_depth: Callable[[int], None] | None = None
        self.on_drop: Callable[[], None] | None = None

    def put(self, record: dict[str, Any], engine: Engine) -> None:
        """Queue one record; never blocks, never touches the database."""
        with self._cond:
            if len(self._queue) + len(self._pending) >= self.capacity:
                self.dropped += 1
                if self.on_drop is not None:
                    self.on_drop()
                now = time.monotonic()
                if now - self._dropped_logged_at >= DROP_LOG_SECONDS:
                    self._dropped_logged_at = now
                    log.error(
                        "usage buffer full (%d records): %d record(s) dropped so far",
                        self.capacity,
                        self.dropped,
                        extra={"usage_records_dropped": self.dropped},
                    )
                return
            self._queue.append(record)
            if self.on_depth is not None:
                self.on_depth(len(self._queue) + len(self._pending))
            self.engine = engine
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="usage-writer", daemon=True
                )
                self._thread.start()
                atexit.register(self.flush, 5.0)
            if len(self._queue) in (1, BATCH_SIZE):
                # Wake the writer: to start gathering a batch, or to write one.
                self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            buffered = len(self._queue) + len(self._pending)
        return {
            "buffered": buffered,
            "capacity": self.capacity,
            "written": self.written,
            "dropped": self.dropped,
            "database_reachable": not self.failing,
        }

    def flush(self, timeout: float) -> bool:
        """Wait until every queued record is written; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
            while self._queue or self._pending:
                remaining = deadline - time.monotonic()
                writer = self._thread
                if remaining <= 0 or writer is None or self._stopped:
                    return False
                if not writer.is_alive():
                    return False  # nothing left to write them
                self._cond.wait(min(remaining, 0.05))
                self._cond.notify_all()
        return True

    def stop(self) -> None:
        """End the writer thread without writing what is left (tests)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _take(self) -> list[dict[str, Any]]:
        with self._cond:
            while not self._queue and not self._pending and not self._stopped:
                self._cond.wait()  # idle: no wake-ups at all
            if not self._pending and len(self._queue) < BATCH_SIZE:
                # Let a batch gather (a flush() or a full batch cuts it short).
                self._cond.wait(self.flush_seconds)
            if not self._pending:
                count = min(BATCH_SIZE, len(self._queue))
                self._pending = [self._queue.popleft() for _ in range(count)]
            return list(self._pending)

    def _run(self) -> None:
        backoff = 0.25
        while not self._stopped:
            batch = self._take()
            if not batch or self._stopped:
                continue
            try:
                write_records(self.engine, batch)
            except Exception as err:  # any database failure: keep and retry
                if not self.failing:
                    log.warning(
                        "usage records not written yet (database: %s); %d waiting",
                        type(err).__name__,
                        self.stats()["buffered"],
                    )
                self.failing = True
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                continue
            with self._cond:
                self._pending = []
                self.written += len(batch)
                if self.on_depth is not None:
                    self.on_depth(len(self._queue))
                self._cond.notify_all()
            if self.failing:
                log.info("usage records written again after a database outage")
            self.failing = False
            backoff = 0.25


@dataclass(frozen=True)
class _Insert:
    """The records' INSERT compiled for one database, and how to pass a row."""

    sql: str
    positional: bool
    names: tuple[str, ...]
    #: Per parameter: the row's key, the column's default, the type's converter.
    columns: tuple[tuple[str, Any, Callable[[Any], Any] | None], ...]

    def parameters(self, row: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        """One row's parameters, converted as SQLAlchemy converts them."""
        values = [
            row.get(key, default) if convert is None else convert(row.get(key, default))
            for key, default, convert in self.columns
        ]
        return (
            tuple(values)
            if self.positional
            else dict(zip(self.names, values, strict=True))
        )


@functools.lru_cache(maxsize=8)
def _insert_for(dialect: Dialect) -> _Insert:
    """Compile the INSERT once per database (rows already stored are skipped)."""
    table = UsageRecord.__table__
    if dialect.name == "postgresql":
        statement = postgresql.insert(table).on_conflict_do_nothing()
    elif dialect.name == "sqlite":
        statement = sqlite.insert(table).on_conflict_do_nothing()
    else:
        statement = insert(table)
    compiled = statement.compile(dialect=dialect, column_keys=list(table.c.keys()))
    names = compiled.positiontup if compiled.positional else list(compiled.binds)
    columns = []
    for name in names:
        bind = compiled.binds[name]
        default = table.c[bind.key].default
        columns.append(
            (
                bind.key,
                # A key a row lacks gets the column's default, as in SQLAlchemy.
                default.arg if default is not None and default.is_scalar else None,
                bind.type.dialect_impl(dialect).bind_processor(dialect),
            )
        )
    return _Insert(
        compiled.string, bool(compiled.positional), tuple(names), tuple(columns)
    )


def write_records(engine: Engine, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` in one transaction; rows already stored are skipped.

    One ``executemany`` of an INSERT compiled once: SQLAlchemy's ``execute``
    builds and converts each row's parameters through several layers, a
    fifth of the writer's CPU per record.
    """
    statement = _insert_for(engine.dialect)
    parameters = [statement.parameters(row) for row in rows]
    with engine.begin() as connection:
        connection.exec_driver_sql(statement.sql, parameters)


def usage_log() -> UsageLog:
    return current_app.extensions[EXTENSION]


def _finisher(
    context: _AppCtxGlobals, current: Request, found: Meter, status: int
) -> Callable[[], None]:
    """What to do when the answer has ended, with this request's facts bound.

    ``context`` and ``current``: the request's ``g`` and request (each use of
    their proxies costs a lookup).
    """
    caller = context.get("caller")
    started = context.get("started", time.perf_counter())
    facts = {
        "key_id": caller.key_id if caller is not None else None,
        "key_name": caller.name if caller is not None else None,
        "route": (current.endpoint or "")[:64],
        # The host's name (never its URL: it may hold credentials); None when
        # the request never reached a host.
        "upstream": context.get("upstream_host"),
        "status": status,
        "correlation_id": context.get("correlation_id", "-"),
    }
    log_ = usage_log()
    engine = log_.engine or db.engine()

    def finish() -> None:
        prompt, completion, estimated = found.measured()
        for settle in found.on_finish:
            try:
                settle(prompt + completion)
            except Exception:  # settling must never fail a request
                log.exception("could not settle a quota")
        ttft = None
        if found.first_byte_at is not None:
            ttft = round((found.first_byte_at - started) * 1000, 3)
        record = {
            **facts,
            "id": new_uuid7_hex(),
            "created_at": utcnow(),
            "model": found.model[:256] if found.model else None,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "usage_estimated": estimated,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "ttft_ms": ttft,
        }
        try:
            log_.put(record, engine)
        except Exception:  # accounting must never fail a request
            log.exception("could not queue a usage record")

    return finish


def _record(_error: BaseException | None) -> None:
    context = g._get_current_object()
    found: Meter | None = context.get("usage_meter")
    if found is None or found.streamed or context.get("usage_recorded"):
        return  # not metered, or a stream (recorded when it ends)
    context.usage_recorded = True
    # Before the answer is sent: the call's slot release (deferred by the
    # door) and the settling go to the shared store together.
    status = context.get("response_status", 500)
    current = request._get_current_object()
    with store.request_end():
        _finisher(context, current, found, status)()


def _start() -> None:
    current = request._get_current_object()
    if current.blueprint in METERED_BLUEPRINTS:
        context = g._get_current_object()
        if "usage_meter" not in context:
            context.usage_meter = _new_meter(current)
        # Its end (_record, or the stream's close) sends what the door defers.
        store.hold()


def init_app(app: Flask) -> None:
    """Meter the model routes (after auth has let a request in); one writer."""
    app.extensions[EXTENSION] = UsageLog(
        app.config["USAGE_BUFFER_SIZE"], app.config["USAGE_FLUSH_SECONDS"]
    )
    app.before_request(_start)
    app.after_request(_observe)
    app.teardown_request(_record)


# -- questions asked of the records -----------------------------------------

_UNSET = object()


def day_start() -> datetime:
    """Midnight UTC today (naive, as stored)."""
    return utcnow().replace(hour=0, minute=0, second=0, microsecond=0)


def summarize(
    session: Any,
    since: datetime,
    until: datetime,
    *,
    key_id: Any = _UNSET,
    all_keys: bool = False,
) -> list[dict[str, Any]]:
    """Counts per key and model between ``since`` and ``until``.

    ``all_keys``: every key (and anonymous callers); else ``key_id`` only
    (``None``: anonymous callers).
    """
    table = UsageRecord.__table__.c
    estimated = func.sum(func.cast(table.usage_estimated, UsageRecord.status.type))
    query = (
        select(
            table.key_name,
            table.model,
            func.count().label("requests"),
            func.coalesce(func.sum(table.prompt_tokens), 0).label("prompt"),
            func.coalesce(func.sum(table.completion_tokens), 0).label("completion"),
            func.coalesce(estimated, 0).label("estimated"),
        )
        .where(table.created_at >= since, table.created_at < until)
        .group_by(table.key_name, table.model)
        .order_by(table.key_name, table.model)
    )
    if not all_keys:
        query = query.where(
            table.key_id.is_(None) if key_id is None else table.key_id == key_id
        )
    return [
        {
            "key": row.key_name,
            "model": row.model,
            "requests": row.requests,
            "prompt_tokens": int(row.prompt),
            "completion_tokens": int(row.completion),
            "total_tokens": int(row.prompt) + int(row.completion),
            "estimated_requests": int(row.estimated),
        }
        for row in session.execute(query)
    ]
