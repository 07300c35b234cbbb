"""Client sockets switch between blocking and not only when the mode changes."""

from __future__ import annotations

import socket

import pytest
from gunicorn.config import Config

from llm_service.server import Connection


@pytest.fixture
def switches(monkeypatch):
    """Count the real mode switches (each an ioctl that hands the GIL over)."""
    made: list[bool] = []
    real = socket.socket.setblocking

    def counted(self, flag):
        made.append(flag)
        real(self, flag)

    monkeypatch.setattr(socket.socket, "setblocking", counted)
    return made


@pytest.fixture
def connection():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        sock, addr = listener.accept()
        yield Connection(Config(), sock, addr, listener.getsockname())
        client.close()
        sock.close()


def test_a_kept_alive_request_switches_twice_not_four_times(connection, switches):
    sock = connection.sock
    switches.clear()
    # The loop takes the connection back, then gathers its next head (both
    # ask for non-blocking); a thread serves it (ours and gthread's ask for
    # blocking).
    for flag in (False, False, True, True):
        sock.setblocking(flag)
        assert sock.gettimeout() == (None if flag else 0.0)
    assert switches == [True]  # it was non-blocking already: one real switch
    for flag in (False, False, True, True):
        sock.setblocking(flag)
    assert switches == [True, False, True]


def test_a_socket_with_a_timeout_still_switches(connection, switches):
    sock = connection.sock
    sock.settimeout(2.0)
    switches.clear()
    sock.setblocking(True)
    assert sock.gettimeout() is None
    sock.settimeout(2.0)
    sock.setblocking(False)
    assert sock.gettimeout() == 0.0
    assert switches == [True, False]
