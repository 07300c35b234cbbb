"""Log set-up: JSON lines or text on stderr, each record with its correlation ID.

Prompts, completions and keys are never passed to a logger anywhere in the
package; records carry ids, sizes, statuses and timings only.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from flask import Flask, g, has_request_context

ROOT_LOGGER = "llm_service"
_HANDLER_NAME = "llm_service.stderr"
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "correlation_id", "taskName"}
)


class CorrelationIdFilter(logging.Filter):
    """Add ``correlation_id`` to every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        correlation_id = "-"
        if has_request_context():
            correlation_id = g.get("correlation_id", "-")
        record.correlation_id = correlation_id
        return True


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object per line."""

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
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Format a record for humans, extra fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)-7s %(name)s [%(correlation_id)s] %(message)s"
        )

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD_ATTRS and not key.startswith("_")
        ]
        return " ".join([line, *extras]) if extras else line


def init_app(app: Flask) -> None:
    """Send the package's records to stderr in the configured format."""
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in list(logger.handlers):
        if handler.get_name() == _HANDLER_NAME:
            logger.removeHandler(handler)  # a second app in the same process
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(CorrelationIdFilter())
    json_format = app.config["LOG_FORMAT"] == "json"
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(app.config["LOG_LEVEL"])
    # The package's records go to this handler only, not twice via the root.
    logger.propagate = False
