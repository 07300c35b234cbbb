"""The gunicorn worker (llm_service/server.py): slow clients and shutdown.

Real gunicorn with the shipped ``gunicorn.conf.py`` in front of the fake LM
Studio. Slow clients: a head must arrive within ``CLIENT_HEADER_TIMEOUT`` and
its body within as long again, and sockets that trickle bytes hold no thread.
Shutdown: streams end with a ``server_shutting_down`` error event before the
worker is stopped, and new connections are not left hanging.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from llm_service import server
from tests.integration.conftest import FAST_FAILURE
from tests.servers import ROOT, GatewayServer
from tests.support.sse import read_until_closed

HELLO = {"model": "fake-model-1", "messages": [{"role": "user", "content": "hi"}]}
HEADER_TIMEOUT = 2.0
#: How much later than its deadline a slow socket may be closed (the issue's bound).
CLOSE_SLACK = 2.0
TRICKLERS = 250


@pytest.fixture(scope="module")
def slow_gateway(fake):
    """Few threads and connections, so a few hundred slow sockets would exhaust
    both under gunicorn's own gthread worker."""
    settings = {
        "LM_STUDIO_URL": fake.url,
        **FAST_FAILURE,
        "CLIENT_HEADER_TIMEOUT": HEADER_TIMEOUT,
    }
    with GatewayServer(settings, threads=16, worker_connections=200) as server:
        yield server


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (EOF or reset); never blocks."""
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Tricklers:
    """Sockets that send a request head one byte at a time and never finish it."""

    def __init__(self, port: int, count: int, interval: float = 0.25) -> None:
        self.port = port
        self.count = count
        self.interval = interval
        self.opened: dict[socket.socket, float] = {}
        self.closed_after: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Tricklers:
        for _ in range(self.count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            sock.setblocking(False)
            self.opened[sock] = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for sock in self.opened:
            selector.register(sock, selectors.EVENT_READ)
        next_byte = time.monotonic()
        while self.opened and not self._stop.is_set():
            for key, _ in selector.select(timeout=0.05):
                sock = key.fileobj
                if closed_by_peer(sock):
                    self.closed_after.append(time.monotonic() - self.opened.pop(sock))
                    selector.unregister(sock)
                    sock.close()
            if time.monotonic() >= next_byte:
                next_byte += self.interval
                for sock in self.opened:
                    # A closed socket fails here; the selector reports it.
                    with contextlib.suppress(OSError):
                        sock.send(b"a")
        selector.close()

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.opened:
            sock.close()


def test_trickling_sockets_hold_no_thread_and_are_closed_in_time(slow_gateway):
    with Tricklers(slow_gateway.port, TRICKLERS) as attack:
        time.sleep(0.5)  # every socket has sent its first bytes
        health = []
        for _ in range(5):
            started = time.monotonic()
            response = requests.get(f"{slow_gateway.url}/health/live", timeout=5)
            health.append((response.status_code, time.monotonic() - started))
        message = requests.post(
            f"{slow_gateway.url}/llm/message", json=HELLO, timeout=10
        )
        attack.wait(HEADER_TIMEOUT + CLOSE_SLACK + 5)
        still_open = len(attack.opened)
        closed_after = sorted(attack.closed_after)
    assert [status for status, _ in health] == [200] * 5
    assert max(seconds for _, seconds in health) < 1.0, health
    assert message.status_code == 200
    assert still_open == 0
    assert len(closed_after) == TRICKLERS
    assert closed_after[-1] < HEADER_TIMEOUT + CLOSE_SLACK, closed_after[-5:]
    # A socket sending a byte every 0.25 s is not closed before its deadline
    # (unless the worker had to make room: 250 sockets, 200 connections).
    assert sum(after >= HEADER_TIMEOUT - 0.1 for after in closed_after) >= 100


def test_a_slow_body_is_cut_at_the_deadline(slow_gateway):
    with socket.create_connection(("127.0.0.1", slow_gateway.port), timeout=10) as sock:
        sock.sendall(
            b"POST /llm/message HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        started = time.monotonic()
        try:
            answer = sock.recv(65536)
        except ConnectionResetError:
            answer = b""
        elapsed = time.monotonic() - started
    assert answer == b""
    assert HEADER_TIMEOUT - 0.1 <= elapsed < HEADER_TIMEOUT + CLOSE_SLACK


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_heads_over_gunicorns_limits_are_refused_at_once(slow_gateway):
    started = time.monotonic()
    long_line = raw_exchange(slow_gateway.port, b"GET /" + b"a" * 9000)
    long_header = raw_exchange(
        slow_gateway.port,
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 40_000 + b"\r\n\r\n",
    )
    # One byte more than gunicorn.conf.py's limits let a head have (its request
    # line, then 100 fields of 32 KiB), never finished. Exactly that many: bytes
    # left unread when the server closes would turn its answer into a reset.
    head_limit = 8190 + 4 + 100 * (32768 + 2) + 4
    start = b"GET / HTTP/1.1\r\nX: "
    endless = raw_exchange(
        slow_gateway.port, start + b"c" * (head_limit + 1 - len(start))
    )
    assert time.monotonic() - started < HEADER_TIMEOUT
    assert long_line.startswith(b"HTTP/1.1 414 ")
    assert long_header.startswith(b"HTTP/1.1 431 ")
    assert endless.startswith(b"HTTP/1.1 431 ")


def test_pipelined_and_kept_alive_requests_are_served(slow_gateway):
    answer = raw_exchange(
        slow_gateway.port,
        b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert answer.count(b"HTTP/1.1 200 ") == 2
    with requests.Session() as session:
        for _ in range(3):
            assert session.get(f"{slow_gateway.url}/health/live", timeout=5).ok


def _read_to_eof(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def _reset_when_written(sock: socket.socket) -> bool:
    """Whether bytes sent on ``sock`` are answered with a reset (peer gone)."""
    try:
        sock.sendall(b"x")
        time.sleep(0.2)
        sock.sendall(b"x")
        sock.recv(1)
    except ConnectionResetError:
        return True
    except BrokenPipeError:
        return True
    return False


def test_clients_that_keep_closed_connections_open_stall_nobody(slow_gateway):
    """``Connection: close`` answered, the client keeps its socket: others go on.

    gthread lingers on such a socket (RFC 9112 9.6) on the worker's loop, up to
    2 s each: three of them held every other client ~6 s.
    """
    request = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    held = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", slow_gateway.port), timeout=10)
        sock.sendall(request)
        held.append(sock)
    try:
        for sock in held:
            # The answer, then the server's FIN (the socket is not reset).
            assert _read_to_eof(sock).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        assert requests.get(f"{slow_gateway.url}/health/live", timeout=10).ok
        assert time.monotonic() - started < 1.0
        # The lingering ends by its bound: then the server's side is gone, and
        # bytes sent to it are answered with a reset.
        time.sleep(server.LINGER_SECONDS + 1.0)
        assert all(_reset_when_written(sock) for sock in held)
    finally:
        for sock in held:
            sock.close()


def test_server_settings_come_from_the_env_file(tmp_path):
    """gunicorn's timeouts follow LM_STUDIO_RETRY_BUDGET set in .env, not only
    in the environment."""
    env_file = tmp_path / "gateway.env"
    env_file.write_text("LLM_SERVICE_LM_STUDIO_RETRY_BUDGET=7\n")
    command = ["-m", "gunicorn", "-c", "gunicorn.conf.py", "--print-config", "wsgi:app"]
    result = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "LLM_SERVICE_ENV_FILE": str(env_file)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    lines = (line.partition("=") for line in result.stdout.splitlines())
    printed = {name.strip(): value.strip() for name, _, value in lines}
    assert printed["timeout"] == "67"
    assert printed["graceful_timeout"] == "17"


def test_header_timeout_from_the_env_file_reaches_the_worker(tmp_path, fake):
    env_file = tmp_path / "gateway.env"
    env_file.write_text("LLM_SERVICE_CLIENT_HEADER_TIMEOUT=1\n")
    gateway = GatewayServer({"LM_STUDIO_URL": fake.url})
    gateway.env["LLM_SERVICE_ENV_FILE"] = str(env_file)
    with gateway, socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\n")
        sock.settimeout(10)
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""
        elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 1 + CLOSE_SLACK


# -- Shutdown ------------------------------------------------------------------

CHAT = {**HELLO, "stream": True}
MESSAGE = {"messages": HELLO["messages"], "stream": True}
#: The worker is stopped this long after SIGTERM; streams end 2 s before.
GRACE = 4


@pytest.mark.parametrize(
    ("path", "body"), [("/v1/chat/completions", CHAT), ("/llm/message", MESSAGE)]
)
def test_sigterm_ends_open_streams_with_an_error_event(fake, path, body):
    fake.stream_interval = 0.1
    fake.reply = " ".join(["word"] * 600)  # a minute of tokens
    gateway = GatewayServer({"LM_STUDIO_URL": fake.url}, graceful_timeout=GRACE)
    gateway.start()
    try:
        with requests.post(
            f"{gateway.url}{path}", json=body, stream=True, timeout=30
        ) as response:
            assert response.raw.read1(65536)
            gateway.terminate()
            signalled = time.monotonic()
            events = read_until_closed(response)
    finally:
        code = gateway.stop()
    assert code == 0
    ended_at, last = events[-1]
    payload = json.loads(last.split("data: ", 1)[1])
    assert payload["error"]["code"] == "server_shutting_down"
    if path == "/llm/message":
        assert last.startswith("event: error")
    assert not any("[DONE]" in e or e.startswith("event: done") for _, e in events)
    # Shortly before the worker would be killed, not at once.
    assert GRACE - 2 - 0.5 <= ended_at - signalled < GRACE, ended_at - signalled


def test_during_the_drain_new_connections_are_refused_and_new_requests_get_503(
    fake,
):
    fake.stream_interval = 0.1
    fake.reply = " ".join(["word"] * 600)
    gateway = GatewayServer({"LM_STUDIO_URL": fake.url}, graceful_timeout=GRACE)
    gateway.start()
    try:
        with (
            requests.Session() as idle,
            requests.post(
                f"{gateway.url}/v1/chat/completions", json=CHAT, stream=True, timeout=30
            ) as stream,
        ):
            assert idle.get(f"{gateway.url}/health/live", timeout=5).ok  # kept alive
            assert stream.raw.read1(65536)
            gateway.terminate()
            time.sleep(0.3)  # the worker has the signal; the stream keeps it busy
            started = time.monotonic()
            with pytest.raises(requests.ConnectionError):
                requests.get(f"{gateway.url}/health/live", timeout=3)
            refused_after = time.monotonic() - started
            again = idle.get(f"{gateway.url}/health/live", timeout=3)
            read_until_closed(stream)
    finally:
        gateway.stop()
    assert refused_after < 0.5
    assert again.status_code == 503
    assert again.json()["error"]["code"] == "server_shutting_down"
    assert again.headers["Retry-After"] == "1"
    assert again.headers["Connection"] == "close"
