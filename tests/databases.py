"""Throwaway database servers on loopback for integration tests: PostgreSQL, Redis."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

from tests.servers import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
#: The non-root account the cluster runs as when the tests run as root.
PG_USER = "postgres"


class PostgresServer:
    """A fresh PostgreSQL cluster (initdb, pg_ctl) on a free port; removed after.

    PostgreSQL refuses to run as root, so as root it runs as ``postgres``
    through ``runuser``.
    """

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(
                f"{PG_BIN / 'initdb'} is missing: run `make system-packages`"
            )
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pg-"))
        self.data = self.root / "data"
        self.url = f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            account = pwd.getpwnam(PG_USER)
            os.chown(self.root, account.pw_uid, account.pw_gid)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(PG_BIN / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", PG_USER, "--", *command]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=check
        )

    def init(self) -> PostgresServer:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            PG_USER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        return self

    def start(self) -> PostgresServer:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.root} -c fsync=off"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.init().start()

    def __exit__(self, *exc: object) -> None:
        self.remove()


class RedisServer:
    """A private redis-server on a free loopback port, nothing persisted."""

    def __init__(self, port: int | None = None) -> None:
        """Start one, on ``port`` if given (a restart: the last one's port)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing: run `make system-packages`")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop it, frozen or not (a test may have sent it ``SIGSTOP``)."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


class RoundTrips:
    """A TCP relay in front of a server that counts its clients' round trips.

    A round trip is a client's send after the server last answered (or the
    first one): commands pipelined in one send are one trip, each command
    awaited before the next is one trip each. ``connections`` counts the
    connections clients opened.
    """

    def __init__(self, port: int) -> None:
        self.target = port
        self.trips = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def count(self) -> tuple[int, int]:
        """``(round trips, connections)`` so far."""
        with self._lock:
            return self.trips, self.connections

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target), 10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            state = {"answered": True}
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
                for args in ((client, server, True), (server, client, False)):
                    pump = threading.Thread(
                        target=self._pump, args=(*args, state), daemon=True
                    )
                    self._threads.append(pump)
                    pump.start()

    def _pump(self, source, sink, from_client: bool, state) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    if from_client:
                        if state["answered"]:
                            self.trips += 1
                        state["answered"] = False
                    else:
                        state["answered"] = True
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_RDWR)
            source.close()

    def stop(self) -> None:
        self._listener.close()
        self._accepting.join(10)
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(10)
