"""Log set-up: JSON lines or text on stderr, each record with its correlation ID.

Prompts, completions and keys are never passed to a logger anywhere in the
package; records carry ids, sizes, statuses and timings only. As a second line
of defence every formatted line, tracebacks included, is scrubbed of the
secrets held by the settings (URL credentials, tokens) and of any URL's
userinfo. Text lines escape control characters, so a request cannot forge a
line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from flask import Flask, g, has_request_context

from .config import REDACTED, secret_values

ROOT_LOGGER = "llm_service"
#: Third-party loggers whose records go through the same handler: flask-limiter
#: says there when the shared limit store is lost and found again.
LIBRARY_LOGGERS = ("flask-limiter",)
_HANDLER_NAME = "llm_service.stderr"
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "correlation_id", "taskName"}
)


#: A record's attribute names -> those of its extra fields: records made by
#: the same call have the same names, and sorting them out costs.
_EXTRA_NAMES: dict[tuple[str, ...], tuple[str, ...]] = {}
_EXTRA_NAMES_KEPT = 256


def _extra_names(attributes: dict[str, Any]) -> tuple[str, ...]:
    """Return the names of a record's extra fields (``extra=``, filters'), in order."""
    names = tuple(attributes)
    extra = _EXTRA_NAMES.get(names)
    if extra is None:
        extra = tuple(
            name
            for name in names
            if name not in _STANDARD_ATTRS and not name.startswith("_")
        )
        if len(_EXTRA_NAMES) >= _EXTRA_NAMES_KEPT:
            _EXTRA_NAMES.clear()  # bounded, whatever names records carry
        _EXTRA_NAMES[names] = extra
    return extra


#: ``scheme://userinfo@``: whatever URL a library puts in a message.
_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#@\"']+@")
#: C0 controls, DEL, C1 controls and the Unicode line separators: none may
#: reach a text line raw.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_TRACE_INDENT = "    "


def escape_control(text: str) -> str:
    """Replace control characters with visible escapes (``\\n``, ``\\u001b``)."""

    def escape(match: re.Match) -> str:
        char = match.group()
        return _NAMED_ESCAPES.get(char) or f"\\u{ord(char):04x}"

    return _CONTROL.sub(escape, text)


class Redactor:
    """Scrub known secret values and URL userinfo from formatted text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        variants: set[str] = set()
        for secret in secrets:
            # As they appear raw, and inside a JSON string.
            variants.update({secret, json.dumps(secret)[1:-1]})
        ordered = sorted(variants, key=len, reverse=True)
        pattern = "|".join(map(re.escape, ordered))
        self._secrets = re.compile(pattern) if ordered else None

    def __call__(self, text: str) -> str:
        # The substring test is exact (no userinfo without "://") and spares
        # most lines a regex scan.
        if "://" in text:
            text = _URL_USERINFO.sub(rf"\1{REDACTED}@", text)
        if self._secrets is not None:
            text = self._secrets.sub(REDACTED, text)
        return text


class CorrelationIdFilter(logging.Filter):
    """Add ``correlation_id`` to every record (``-`` outside a request).

    Inside a request, also its W3C trace context (``trace_id``, ``span_id``:
    see :mod:`.tracing`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context():
            state = g._get_current_object()  # once: each use of the proxy costs
            record.correlation_id = state.get("correlation_id", "-")
            trace = state.get("trace")
            if trace is not None:
                record.trace_id = trace.trace_id
                record.span_id = trace.span_id
        elif not hasattr(record, "correlation_id"):
            # Outside a request, unless the record names its request itself
            # (a stream's access record, written after its context is gone).
            record.correlation_id = "-"
        return True


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object per line."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__()
        self.redact = redact or Redactor()
        #: The last whole second written and its ISO-8601 text (up to the
        #: seconds): lines come many a second.
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": self._timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "correlation_id": getattr(record, "correlation_id", "-"),
        }
        # Fields passed with ``extra=`` (the access record's) go in as they are.
        attributes = vars(record)
        for key in _extra_names(attributes):
            entry[key] = attributes[key]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self.redact(_encode_json(entry))

    def _timestamp(self, created: float) -> str:
        """Write ``created`` as ``datetime.isoformat(timespec="milliseconds")`` does.

        Rounded to the microsecond first, as ``datetime.fromtimestamp`` rounds.
        """
        second = int(created)
        micros = round((created - second) * 1e6)
        if micros == 1_000_000:
            second, micros = second + 1, 0
        cached, text = self._second
        if second != cached:
            moment = datetime.fromtimestamp(second, UTC).replace(tzinfo=None)
            text = moment.isoformat(timespec="seconds")
            self._second = (second, text)
        return f"{text}.{micros // 1000:03d}+00:00"


#: ``json.dumps(entry, default=str)`` without making an encoder per line.
_encode_json = json.JSONEncoder(default=str).encode


def _text_value(value: object) -> str:
    """Show an extra field's value so it cannot pose as another field or line."""
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        text = json.dumps(text, ensure_ascii=False)
    return escape_control(text)


class TextFormatter(logging.Formatter):
    """Format a record for humans, extra fields as ``key=value``.

    Every field is one line: control characters are escaped (``\\n``, ``\\u001b``)
    and values with spaces, quotes or ``=`` are quoted. A traceback keeps its
    lines, each indented, so no line of it can pass for a record.
    """

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__()
        self.redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        fields = [
            self.formatTime(record),
            f"{record.levelname:<7}",
            escape_control(record.name),
            f"[{escape_control(str(getattr(record, 'correlation_id', '-')))}]",
            escape_control(record.getMessage()),
        ]
        attributes = vars(record)
        fields += [
            f"{escape_control(key)}={_text_value(attributes[key])}"
            for key in _extra_names(attributes)
        ]
        lines = [" ".join(fields)]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for block in (record.exc_text, record.stack_info):
            if block:
                lines += [
                    _TRACE_INDENT + escape_control(line) for line in block.splitlines()
                ]
        return self.redact("\n".join(lines))


def log_fields(
    logger: logging.Logger, level: int, msg: str, args: tuple, fields: dict[str, Any]
) -> None:
    """Log as ``logger.log(level, msg, *args, extra=fields)`` does, for less.

    For a record made on every request: the record names the caller's frame
    without a search of the stack, and is built by the record factory and
    handled by ``logger``'s handlers (filters, formatter) as any other.
    """
    if not logger.isEnabledFor(level):
        return
    caller = sys._getframe(1)
    code = caller.f_code
    factory = logging.getLogRecordFactory()
    record = factory(
        logger.name,
        level,
        code.co_filename,
        caller.f_lineno,
        msg,
        args,
        None,
        code.co_name,
    )
    record.__dict__.update(fields)
    logger.handle(record)


class BatchedStream(logging.StreamHandler):
    """Write lines to a stream in batches: fewer writes, none torn.

    Each write is a system call that hands the GIL over, and the access log
    writes a line per request. Lines below WARNING are held until
    :data:`BATCH_BYTES` of them are waiting or the oldest has waited
    ``flush_seconds``; a WARNING or worse goes out at once, with whatever is
    waiting before it. A batch is at most :data:`BATCH_BYTES` (``PIPE_BUF``):
    workers sharing one pipe for stderr never tear each other's lines. What
    is held is written when the handler is flushed (at exit: logging's own
    shutdown) or closed, and before the process forks.
    """

    #: The most one write carries: a write to a pipe up to ``PIPE_BUF`` is
    #: never interleaved with another process's.
    BATCH_BYTES = getattr(select, "PIPE_BUF", 4096)

    def __init__(self, stream: Any, flush_seconds: float) -> None:
        super().__init__(stream)
        self.flush_seconds = flush_seconds
        self._lines: list[str] = []
        self._size = 0
        self._due = threading.Condition(self.lock)
        self._flusher: threading.Thread | None = None
        self._closed = False
        _batched.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        # Called with the handler's lock held (``Handler.handle``).
        size = len(line) if line.isascii() else 4 * len(line)
        if self._size + size > self.BATCH_BYTES:
            self._write_held()
        self._lines.append(line)
        self._size += size
        if record.levelno >= logging.WARNING or self.flush_seconds <= 0:
            self._write_held()
        elif len(self._lines) == 1:
            self._wake_flusher()

    def flush(self) -> None:
        """Write what is held now."""
        with self.lock:
            self._write_held()

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self._write_held()
            self._due.notify_all()
        super().close()

    def _write_held(self) -> None:
        if not self._lines:
            return
        text = "".join(self._lines)
        self._lines.clear()
        self._size = 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # as StreamHandler: a broken stderr stops no request
            self.handleError(logging.makeLogRecord({"msg": "(batched lines)"}))

    def _wake_flusher(self) -> None:
        if self._flusher is None:
            # Started on first use, in the process that logs: threads do not
            # survive gunicorn's fork.
            self._flusher = threading.Thread(
                target=self._run, name="log-flusher", daemon=True
            )
            self._flusher.start()
        else:
            self._due.notify()

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self._lines and not self._closed:
                    self._due.wait()
                if self._closed:
                    return
            time.sleep(self.flush_seconds)
            self.flush()

    def _forget_flusher(self) -> None:
        # In a forked child: the parent's thread is not here, and the lines
        # were written before the fork.
        self._flusher = None
        self._due = threading.Condition(self.lock)
        self._lines.clear()
        self._size = 0


#: Every live batched handler: their held lines are written before a fork.
_batched: weakref.WeakSet[BatchedStream] = weakref.WeakSet()


def _before_fork() -> None:
    for handler in list(_batched):
        handler.flush()


def _after_fork_in_child() -> None:
    for handler in list(_batched):
        handler._forget_flusher()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def init_app(app: Flask) -> None:
    """Send the package's records to stderr in the configured format."""
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in list(logger.handlers):
        if handler.get_name() == _HANDLER_NAME:
            logger.removeHandler(handler)  # a second app in the same process
            handler.close()
    handler = BatchedStream(sys.stderr, app.config["LOG_FLUSH_SECONDS"])
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(CorrelationIdFilter())
    redact = Redactor(secret_values(app.config))
    json_format = app.config["LOG_FORMAT"] == "json"
    formatter = JsonFormatter(redact) if json_format else TextFormatter(redact)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    logger.setLevel(app.config["LOG_LEVEL"])
    # The package's records go to this handler only, not twice via the root.
    logger.propagate = False
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        for old in list(library.handlers):
            if old.get_name() == _HANDLER_NAME:
                library.removeHandler(old)
        library.addHandler(handler)
        library.setLevel(logger.level)
        library.propagate = False
    handler.addFilter(_library_filter)


def _library_filter(record: logging.LogRecord) -> bool:
    """Keep a library's warnings and its news about the limit store, nothing more.

    flask-limiter also logs every 429 at INFO, which the access record says.
    """
    if not record.name.startswith(LIBRARY_LOGGERS):
        return True
    return record.levelno >= logging.WARNING or "storage" in str(record.msg)
