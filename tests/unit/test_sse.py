"""The SSE parser: every way bytes can be split, linear work, bounded lines."""

import pytest

from llm_service.lmstudio.sse import SSEEvent, SSELineTooLongError, SSEParser

STREAM = (
    b": comment\r\n"
    b"data: one\r\n\r\n"
    b"event: named\ndata: two\ndata: lines\n\n"
    b"data: three\r\r"
    b"data:four\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    ("one", None),
    ("two\nlines", "named"),
    ("three", None),
    ("four", None),
    ("[DONE]", None),
]


def parse(pieces, **options):
    parser = SSEParser(**options)
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.flush()
    return [(event.data, event.event) for event in events]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, len(STREAM)])
def test_same_events_however_the_bytes_are_split(size):
    pieces = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert parse(pieces) == EXPECTED


def test_crlf_split_between_pieces_is_one_line_end():
    assert parse([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]) == [("a\nb", None)]


def test_unfinished_event_is_dispatched_at_the_end():
    assert parse([b"data: last"]) == [("last", None)]


def test_a_long_line_in_small_pieces_costs_linear_work():
    """Each byte is searched once and copied once, however the line arrives.

    The quadratic parser re-joined and re-searched the whole unfinished line
    for every piece: ~40 MB in 64 KiB reads cost 12 s of CPU. Counting the
    bytes touched is exact, where timing it would be flaky.
    """
    parser = SSEParser()
    size, piece = 4 * 1024 * 1024, 1024
    data = b"x" * piece
    for _ in range(size // piece):
        assert parser.feed(data) == []
    events = parser.feed(b"\n\n")
    assert len(events) == 0  # "xxx..." is a field named x: ignored
    assert parser.work <= 2 * size + 16  # quadratic: ~size * size / piece / 2


def test_many_lines_in_one_piece_cost_linear_work():
    """Looking for CR must not rescan the piece for every LF-ended line."""
    body = b"data: {}\n\n" * 10_000
    parser = SSEParser()
    assert len(parser.feed(body)) == 10_000
    assert parser.work <= 2 * len(body)


def test_a_line_over_the_limit_fails_before_it_is_held():
    parser = SSEParser(max_line_bytes=1000)
    parser.feed(b"data: " + b"x" * 900)
    with pytest.raises(SSELineTooLongError):
        parser.feed(b"x" * 200)


def test_a_line_over_the_limit_in_one_piece():
    with pytest.raises(SSELineTooLongError):
        SSEParser(max_line_bytes=1000).feed(b"data: " + b"x" * 1000 + b"\n")


def test_an_event_over_the_limit_in_many_lines():
    parser = SSEParser(max_line_bytes=1000)
    with pytest.raises(SSELineTooLongError):
        parser.feed(b"data: " + b"x" * 100 + b"\n" * 1 + b"data: xx\n" * 500)


def test_lines_at_the_limit_pass():
    line = b"data: " + b"x" * 994  # 1000 bytes
    assert parse([line, b"\n\n"], max_line_bytes=1000) == [("x" * 994, None)]


@pytest.mark.parametrize(
    "data", ["[" * 100_000, '{"error": ' + "[" * 100_000, "nope", '{"a": 1']
)
def test_event_json_raises_value_error_only(data):
    """Even nesting too deep (a RecursionError) reads as "not JSON"."""
    with pytest.raises(ValueError):  # noqa: PT011 - json's own messages vary
        SSEEvent(data).json()


@pytest.mark.parametrize(
    "frame",
    [
        b"data: {}\n\n",
        b"event: note\ndata: one\ndata: two\n\n",
        b"id: 7\ndata: x\n\n",
        b'event: delta\nid: 8\ndata: {"a":\ndata:  1}\n\n',
    ],
)
def test_an_event_encodes_back_to_its_frame(frame):
    (event,) = SSEParser().feed(frame)
    assert event.encode() == frame
    assert SSEParser().feed(event.encode()) == [event]


def test_an_id_belongs_to_its_own_event_only():
    first, second = SSEParser().feed(b"id: 1\ndata: a\n\ndata: b\n\n")
    assert (first.id, second.id) == ("1", None)
