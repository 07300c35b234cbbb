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
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

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
            record.correlation_id = g.get("correlation_id", "-")
            trace = g.get("trace")
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

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "correlation_id": getattr(record, "correlation_id", "-"),
        }
        # Fields passed with ``extra=`` (the access record's) go in as they are.
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(entry, default=str))


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
        fields += [
            f"{escape_control(key)}={_text_value(value)}"
            for key, value in vars(record).items()
            if key not in _STANDARD_ATTRS and not key.startswith("_")
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


def init_app(app: Flask) -> None:
    """Send the package's records to stderr in the configured format."""
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in list(logger.handlers):
        if handler.get_name() == _HANDLER_NAME:
            logger.removeHandler(handler)  # a second app in the same process
    handler = logging.StreamHandler(sys.stderr)
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
