"""Log lines written to stderr in batches (llm_service/logs.py BatchedStream)."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from llm_service.logs import BatchedStream


class CountingStream:
    """A stream that records each write (each one a system call on stderr)."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.written = threading.Event()

    def write(self, text: str) -> None:
        self.writes.append(text)
        self.written.set()

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        return "".join(self.writes).splitlines()


def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.makeLogRecord(
        {"name": "llm_service.access", "levelno": level, "msg": message}
    )


@pytest.fixture
def stream():
    return CountingStream()


@pytest.fixture
def handler(stream):
    made = BatchedStream(stream, flush_seconds=0.05)
    yield made
    made.close()


def test_lines_below_warning_go_out_together(handler, stream):
    for n in range(20):
        handler.handle(record(f"line {n}"))
    assert stream.writes == []  # held, not yet written
    assert stream.written.wait(2)
    time.sleep(0.05)
    assert len(stream.writes) == 1
    assert stream.lines() == [f"line {n}" for n in range(20)]


def test_a_warning_goes_out_at_once_after_what_waits(handler, stream):
    handler.handle(record("first"))
    handler.handle(record("trouble", logging.WARNING))
    assert stream.lines() == ["first", "trouble"]
    assert len(stream.writes) == 1


def test_no_write_is_larger_than_a_pipe_keeps_whole(handler, stream):
    line = "x" * 300
    for _ in range(100):
        handler.handle(record(line))
    handler.flush()
    assert len(stream.writes) >= 100 * 301 // BatchedStream.BATCH_BYTES
    for text in stream.writes:
        assert len(text.encode()) <= BatchedStream.BATCH_BYTES
        assert text.endswith("\n")  # never a torn line
    assert stream.lines() == [line] * 100


def test_a_line_longer_than_a_batch_goes_alone(handler, stream):
    handler.handle(record("small"))
    handler.handle(record("y" * (2 * BatchedStream.BATCH_BYTES)))
    handler.flush()
    assert stream.writes[0] == "small\n"
    assert stream.lines()[1] == "y" * (2 * BatchedStream.BATCH_BYTES)


def test_zero_seconds_writes_every_line_at_once(stream):
    handler = BatchedStream(stream, flush_seconds=0)
    for n in range(3):
        handler.handle(record(f"line {n}"))
        assert stream.lines()[-1] == f"line {n}"
    assert len(stream.writes) == 3
    handler.close()


def test_closing_writes_what_is_held(stream):
    handler = BatchedStream(stream, flush_seconds=60)
    handler.handle(record("last words"))
    assert stream.writes == []
    handler.close()
    assert stream.lines() == ["last words"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_held_lines_are_written_once_across_a_fork(tmp_path):
    path = tmp_path / "stderr.log"
    with path.open("a") as out:
        handler = BatchedStream(out, flush_seconds=60)
        handler.handle(record("before the fork"))
        pid = os.fork()
        if pid == 0:  # the child: what the parent held is not its to write
            handler.handle(record("child"))
            handler.flush()
            os._exit(0)
        os.waitpid(pid, 0)
        handler.handle(record("parent"))
        handler.close()
    lines = path.read_text().splitlines()
    assert lines.count("before the fork") == 1
    assert sorted(lines) == ["before the fork", "child", "parent"]
