"""The worker's close after an answer: FIN at once, the draining on its loop."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import time
from collections.abc import Iterator

import pytest
from gunicorn.config import Config

from llm_service import balance, server
from llm_service.server import Connection, Worker


@pytest.fixture
def worker(monkeypatch) -> Iterator[Worker]:
    monkeypatch.setattr(balance, "_table", None)
    worker = Worker(1, os.getpid(), [], None, 30, Config(), logging.getLogger("test"))
    worker.alive = True
    worker.poller = selectors.DefaultSelector()
    yield worker
    worker.poller.close()
    worker.tmp.close()


@pytest.fixture
def pairs():
    """(client, server-side Connection) pairs over real loopback sockets."""
    made = []
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def make(worker: Worker) -> tuple[socket.socket, Connection]:
            client = socket.create_connection(listener.getsockname(), timeout=5)
            sock, addr = listener.accept()
            conn = Connection(worker.cfg, sock, addr, listener.getsockname())
            conn.linger = worker._linger
            made.append((client, sock))
            return client, conn

        yield make
    for client, sock in made:
        client.close()
        sock.close()


def test_a_graceful_close_never_blocks_the_loop(worker, pairs):
    client, conn = pairs(worker)
    started = time.monotonic()
    conn.close(graceful=True)  # gthread's lingered here up to 2 s
    assert time.monotonic() - started < 0.1
    assert client.recv(1) == b""  # FIN sent
    assert conn in worker.lingering
    client.close()
    worker.wait_for_and_dispatch_events(1.0)  # the client's FIN ends it
    assert conn not in worker.lingering
    assert conn.sock.fileno() == -1


def test_the_drain_is_bounded_by_bytes(worker, pairs):
    client, conn = pairs(worker)
    conn.close(graceful=True)
    client.sendall(b"x" * (server.LINGER_MAX_DRAIN + server.READ_SIZE))
    for _ in range(20):
        if conn not in worker.lingering:
            break
        worker.wait_for_and_dispatch_events(0.1)
    assert conn not in worker.lingering
    assert conn.sock.fileno() == -1


def test_the_drain_is_bounded_by_time(worker, pairs, monkeypatch):
    monkeypatch.setattr(server, "LINGER_SECONDS", 0.05)
    _client, conn = pairs(worker)
    conn.close(graceful=True)
    time.sleep(0.1)
    worker.murder_pending()
    assert conn not in worker.lingering
    assert conn.sock.fileno() == -1


def test_lingering_connections_are_bounded_in_number(worker, pairs, monkeypatch):
    monkeypatch.setattr(server, "MAX_LINGERING", 2)
    conns = [pairs(worker)[1] for _ in range(3)]
    for conn in conns:
        conn.close(graceful=True)
    assert list(worker.lingering) == conns[1:]
    assert conns[0].sock.fileno() == -1
