"""Several gunicorn workers share a burst of connections (llm_service/balance.py).

Real gunicorn with two workers. Which worker holds a connection is read from
``/proc``: the worker whose file descriptors include the connection's socket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import FAST_FAILURE
from tests.servers import GatewayServer

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc"
)

REQUEST = b"GET /health/live HTTP/1.1\r\nHost: x\r\n%s\r\n"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def tcp_inodes(port: int, state: str) -> set[str]:
    """Inodes of TCP sockets on ``port`` in ``state`` (01 established, 0A listen)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == state:
            inodes.add(fields[9])
    return inodes


def socket_fds(pid: int) -> dict[str, int]:
    """A process's sockets: inode -> file descriptor."""
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                fds[link[8:-1]] = int(fd)
    return fds


def listening(pid: int, port: int) -> bool:
    """Whether worker ``pid`` waits on the listening socket (its loop runs)."""
    listeners = tcp_inodes(port, "0A")
    fds = [fd for inode, fd in socket_fds(pid).items() if inode in listeners]
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventpoll]":
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                if any(f"tfd: {listener:8d}" in info for listener in fds):
                    return True
    return False


def held(workers: list[int], port: int) -> list[int]:
    """How many established connections on ``port`` each worker holds."""
    established = tcp_inodes(port, "01")
    return [len(established & socket_fds(pid).keys()) for pid in workers]


@pytest.fixture
def two_workers(fake):
    settings = {"LM_STUDIO_URL": fake.url, **FAST_FAILURE}
    with GatewayServer(settings, workers=2) as server:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = children(server.process.pid)
            if len(workers) == 2 and all(listening(w, server.port) for w in workers):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"two workers did not start listening:\n{server.logs()}")
        yield server, workers


def burst(port: int, count: int, headers: bytes = b"") -> list[socket.socket]:
    """Open ``count`` connections at once (as wrk or a pool does), then use each."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        socks.append(sock)
    for sock in socks:
        sock.settimeout(10)
        sock.sendall(REQUEST % headers)
    for sock in socks:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    return socks


@pytest.mark.parametrize("count", [16, 64])
def test_a_burst_of_keepalive_connections_is_spread_over_the_workers(
    two_workers, count
):
    server, workers = two_workers
    spreads = []
    for _ in range(3):
        socks = burst(server.port, count)
        spreads.append(held(workers, server.port))
        for sock in socks:
            sock.close()
        time.sleep(0.3)  # the workers see the closes
    # Within 2 of even each time (before: nearly all on one worker).
    assert all(sum(s) == count for s in spreads), spreads
    assert all(abs(a - b) <= 4 for a, b in spreads), spreads


def test_a_stalled_worker_does_not_hold_up_accepting(two_workers):
    server, workers = two_workers
    os.kill(workers[1], signal.SIGSTOP)
    try:
        started = time.monotonic()
        socks = burst(server.port, 16)
        elapsed = time.monotonic() - started
        spread = held(workers, server.port)
    finally:
        os.kill(workers[1], signal.SIGCONT)
    for sock in socks:
        sock.close()
    assert spread == [16, 0]
    assert elapsed < 1.0, elapsed


def test_no_connection_is_lost_while_workers_restart(fake):
    """Workers restarting (max_requests) free their slots and drop nothing."""
    settings = {"LM_STUDIO_URL": fake.url, **FAST_FAILURE}
    gunicorn = {"workers": 2, "cmd_args": "--max-requests 12"}
    with GatewayServer(settings, **gunicorn) as server:
        for _ in range(12):
            for sock in burst(server.port, 16, b"Connection: close\r\n"):
                sock.close()  # each was answered 200 (burst checks)
        restarts = server.logs().count("Autorestarting worker")
    assert restarts >= 8
