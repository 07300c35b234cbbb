"""Text log lines cannot be forged: control characters are escaped in every field."""

import logging
import re

import pytest

from llm_service.logs import escape_control
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
