"""Real server processes for integration and live tests: the gateway under gunicorn."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """Return a loopback port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GatewayServer:
    """The gateway run by gunicorn with the shipped ``gunicorn.conf.py``.

    ``settings`` are ``LLM_SERVICE_*`` names without the prefix. The process gets
    a clean environment: none of the developer's ``LLM_SERVICE_*`` variables and
    no ``.env`` file.
    """

    def __init__(self, settings: dict[str, object], **gunicorn: object) -> None:
        self.database: str | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SERVICE_")}
        env.update({f"LLM_SERVICE_{k}": str(v) for k, v in settings.items()})
        env.update({f"GUNICORN_{k.upper()}": str(v) for k, v in gunicorn.items()})
        env["GUNICORN_BIND"] = f"127.0.0.1:{self.port}"
        env["LLM_SERVICE_ENV_FILE"] = os.devnull
        if "DATABASE_URL" not in settings:
            # Never the developer's instance/ database: a fresh one per server.
            self.database = tempfile.mkdtemp(prefix="gateway-db-")
            env["LLM_SERVICE_DATABASE_URL"] = f"sqlite:///{self.database}/gateway.db"
        self.env = env
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix="gateway-", suffix=".log", delete=False
        )
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> GatewayServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited early:\n{self.logs()}")
            try:
                # Any answer means the app is serving (a trusted-hosts setting
                # may make it a 400 for this Host).
                requests.get(f"{self.url}/health/live", timeout=1)
            except (requests.ConnectionError, requests.Timeout):
                # Not listening yet, or too slow to answer on a loaded machine.
                pass
            else:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"gunicorn did not answer within {timeout} s:\n{self.logs()}"
        )

    def terminate(self) -> None:
        """Send SIGTERM (graceful shutdown) without waiting."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Stop gracefully; kill if it overstays. Return the exit code."""
        code = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait(5)
        elif self.process is not None:
            code = self.process.returncode
        self.log.close()
        if self.database is not None:
            shutil.rmtree(self.database, ignore_errors=True)
        return code

    def logs(self) -> str:
        """Everything the gateway wrote; while it runs, after its lines are out.

        Lines below WARNING wait up to ``LOG_FLUSH_SECONDS`` to be written in
        a batch, so a running gateway gets that long (and a margin) first.
        """
        if self.process is not None and self.process.poll() is None:
            flush = float(self.env.get("LLM_SERVICE_LOG_FLUSH_SECONDS", 0.1))
            time.sleep(flush + 0.4)
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def import_wsgi(env: dict[str, str], timeout: float = 60.0):
    """Run ``import wsgi`` in a fresh interpreter with exactly ``env``.

    What the gateway does at start-up before gunicorn serves: load ``.env``,
    warn about unknown settings, build the app or exit 3 on a bad setting.
    """
    return subprocess.run(
        [sys.executable, "-c", "import wsgi"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
