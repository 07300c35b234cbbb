"""Text log lines cannot be forged: control characters are escaped in every field."""

import json
import logging
import random
import re
from datetime import UTC, datetime

import pytest

from llm_service.logs import (
    _EXTRA_NAMES,
    _EXTRA_NAMES_KEPT,
    JsonFormatter,
    escape_control,
    log_fields,
)
from tests.conftest import capture_logs

#: What the start of a real text record looks like: its timestamp.
RECORD_START = re.compile(r"^\d{4}-\d{2}-\d{2} ")
FORGED = "2030-01-01 00:00:00,000 CRITICAL llm_service [-] forged"


@pytest.fixture
def text_app(app_factory):
    return app_factory(LOG_FORMAT="text", RATE_LIMIT_REQUESTS=1000)


def assert_one_record_per_line(lines):
    for line in lines:
        physical = line.split("\n")
        assert RECORD_START.match(physical[0]), line
        for continuation in physical[1:]:
            assert continuation.startswith(" "), line  # a traceback line


@pytest.mark.parametrize(
    "path",
    [
        "/x%0a" + FORGED.replace(" ", "%20"),
        "/x%0d%0a" + FORGED.replace(" ", "%20"),
        "/x%0d" + FORGED.replace(" ", "%20"),
        "/x%c2%85" + FORGED.replace(" ", "%20"),  # NEL, a C1 line break
        "/x%e2%80%a8" + FORGED.replace(" ", "%20"),  # U+2028 line separator
    ],
)
def test_path_cannot_forge_a_line(text_app, path):
    with capture_logs() as handler:
        response = text_app.test_client().get(path)
    assert response.status_code == 404
    access = [line for line in handler.lines if "llm_service.access" in line]
    assert len(access) == 1
    assert_one_record_per_line(handler.lines)
    # The forged text is there, escaped, inside the one real record.
    assert "forged" in access[0]
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", access[0])


def test_every_field_is_escaped(text_app):
    logger = logging.getLogger("llm_service.test")
    with capture_logs() as handler:
        logger.warning(
            "message\nwith\r\x1b[31mcontrol\x7f\x85\x00chars",
            extra={"field": "value\n" + FORGED, "with space": "a b", "quoted": 'x"y'},
        )
    (line,) = handler.lines
    assert "\n" not in line
    assert "\r" not in line
    assert not re.search("[\x00-\x1f\x7f-\x9f]", line)
    assert "message\\nwith\\r\\u001b[31mcontrol\\u007f\\u0085\\u0000chars" in line
    # A value with a space is quoted, so it cannot pose as another key=value.
    assert 'field="value\\n2030-01-01' in line
    assert 'with space="a b"' in line
    assert 'quoted="x\\"y"' in line


def test_traceback_lines_are_indented_and_escaped(text_app):
    logger = logging.getLogger("llm_service.test")
    with capture_logs() as handler:
        try:
            raise ValueError("bad\n" + FORGED + "\r\x1b[2J")
        except ValueError:
            logger.exception("failed")
    (record,) = handler.lines
    assert_one_record_per_line(handler.lines)
    assert "Traceback (most recent call last):" in record
    assert "\r" not in record
    assert "\x1b" not in record
    assert "\n    " + FORGED in record  # the forged line is indented, not a record


def test_plain_text_is_left_alone(text_app):
    logger = logging.getLogger("llm_service.test")
    with capture_logs() as handler:
        logger.info("GET /v1/models 200", extra={"path": "/v1/models", "status": 200})
    assert handler.lines[0].endswith("GET /v1/models 200 path=/v1/models status=200")


def test_escape_control():
    assert escape_control("a\tb\nc\x1b\u2029é") == "a\\tb\\nc\\u001b\\u2029é"


@pytest.mark.parametrize(
    "created",
    [
        0.0,
        1.0005,
        1.0004999,
        1.9994999,
        1.9995,
        1.9999994,
        1.9999995,  # rounds up to the next second
        1_700_000_000.0,
        1_700_000_000.9999996,
        1_799_999_999.123456,
    ],
)
def test_json_timestamp_is_what_datetime_writes(created):
    formatter = JsonFormatter()
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    assert formatter._timestamp(created) == expected
    assert formatter._timestamp(created) == expected  # from the second it keeps


def test_json_timestamps_across_seconds_are_what_datetime_writes():
    formatter = JsonFormatter()
    draw = random.Random(17)
    moments = sorted(draw.uniform(1.6e9, 1.6e9 + 30) for _ in range(3000))
    for created in moments + moments[::-1]:
        expected = datetime.fromtimestamp(created, UTC).isoformat(
            timespec="milliseconds"
        )
        assert formatter._timestamp(created) == expected


def _record(**fields):
    record = logging.LogRecord("llm_service.x", logging.INFO, "", 0, "m", (), None)
    record.__dict__.update(fields)
    return record


def test_extra_fields_keep_their_order_whatever_the_record():
    formatter = JsonFormatter()
    for fields in ({"b": 1, "a": 2}, {"a": 2, "b": 1}, {}, {"_private": 1, "c": 3}):
        entry = json.loads(formatter.format(_record(**fields)))
        assert list(entry)[5:] == [name for name in fields if name != "_private"]


def test_the_memo_of_extra_field_names_is_bounded():
    formatter = JsonFormatter()
    for n in range(_EXTRA_NAMES_KEPT * 3):
        entry = json.loads(formatter.format(_record(**{f"field_{n}": n})))
        assert entry[f"field_{n}"] == n
        assert len(_EXTRA_NAMES) <= _EXTRA_NAMES_KEPT


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_secret_in_the_path_or_id_never_reaches_the_access_record(
    app_factory, log_format
):
    app = app_factory(
        LM_STUDIO_API_TOKEN="sk-lm-T0KEN", LOG_FORMAT=log_format, LOG_LEVEL="INFO"
    )
    with capture_logs() as handler:
        app.test_client().get(
            "/v1/sk-lm-T0KEN/https://someone:hunter22@elsewhere/x",
            headers={"X-Correlation-ID": "sk-lm-T0KEN"},
        )
    (access,) = [line for line in handler.lines if "llm_service.access" in line]
    assert "/v1/***/https://***@elsewhere/x" in access
    assert "sk-lm-T0KEN" not in access
    assert "hunter22" not in access


def test_log_fields_makes_the_record_logger_log_makes(app_factory):
    app_factory(LOG_LEVEL="INFO")
    logger = logging.getLogger("llm_service.test")
    fields = {"status": 200, "path": "/x"}
    with capture_logs() as handler:
        logger.info("%s %s", "GET", "/x", extra=fields)
        log_fields(logger, logging.INFO, "%s %s", ("GET", "/x"), fields)
        log_fields(logger, logging.DEBUG, "below the level", (), {})
    made, fast = (vars(record) for record in handler.records)
    moments = {"created", "msecs", "relativeCreated", "lineno"}
    assert list(fast) == list(made)
    assert {k: v for k, v in fast.items() if k not in moments} == {
        k: v for k, v in made.items() if k not in moments
    }
    assert fast["lineno"] == made["lineno"] + 1  # the caller's line
    first, second = (json.loads(line) for line in handler.lines)
    del first["timestamp"], second["timestamp"]
    assert first == second
