"""Child processes of a benchmark run: start, wait until ready, always stop.

Every child runs in its own session (process group), so stopping it also stops
what it started (gunicorn's workers, LiteLLM's server). :class:`Processes`
keeps every child it started and stops them all on exit, on an error and on
Ctrl-C or SIGTERM; an ``atexit`` hook is the last resort.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


class ProcessError(RuntimeError):
    """A child did not start, or did not become ready in time."""


def free_port() -> int:
    """Return a loopback port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's open-file limit (inherited by children); return it.

    Holding a thousand streams takes two sockets each in a relay and one in the
    client, more than the usual soft limit of 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def http_status(
    host: str, port: int, path: str, timeout: float = 1.0, method: str = "GET"
) -> int | None:
    """Return the status of one request, or None when nothing answers."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


class Child:
    """One started child process and its log file."""

    def __init__(
        self,
        name: str,
        popen: subprocess.Popen,
        log_path: Path,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path
        self.stop_signal = stop_signal

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """Return the last lines of the child's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_http(
        self, host: str, port: int, path: str, timeout: float, ok=(200,)
    ) -> None:
        """Wait until ``GET path`` answers one of ``ok``; raise ProcessError if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ProcessError(
                    f"{self.name} exited with code {self.popen.returncode}:\n"
                    f"{self.log_tail()}"
                )
            if http_status(host, port, path) in ok:
                return
            time.sleep(0.1)
        raise ProcessError(
            f"{self.name} did not answer {path} within {timeout:g} s:\n"
            f"{self.log_tail()}"
        )

    def stop(self, grace: float = 5.0) -> None:
        """Signal the child's process group, SIGKILL it after ``grace`` seconds."""
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        # The leader may be gone while its group lives on (orphaned workers).
        _signal_group(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Processes:
    """Start children and stop every one of them on exit, error or signal."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self._previous_handlers: dict[int, object] = {}

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> Child:
        """Start ``argv`` in its own session, output to ``<log_dir>/<name>.log``.

        ``stop_signal`` ends it (gunicorn: SIGQUIT, its quick shutdown, since a
        graceful one waits for streams in flight).
        """
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = Child(name, popen, log_path, stop_signal)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        """Stop one child now."""
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        """Stop every child still registered, newest first."""
        while self.children:
            self.children.pop().stop()

    def __enter__(self) -> Processes:
        atexit.register(self.stop_all)
        # SIGTERM (CI cancelling a job) unwinds like Ctrl-C does.
        self._previous_handlers[signal.SIGTERM] = signal.signal(
            signal.SIGTERM, _raise_interrupt
        )
        return self

    def __exit__(self, *exc: object) -> None:
        # A second Ctrl-C during teardown must not leave children behind.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.stop_all()
        finally:
            signal.signal(signal.SIGINT, previous_int)
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)
            atexit.unregister(self.stop_all)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
