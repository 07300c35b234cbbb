"""Probing, starting, reusing and stopping the llama.cpp server process."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from .common import (
    CHAT_FORMAT,
    CONTEXT_SIZE,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_PROBE_TIMEOUT,
    DEFAULT_START_TIMEOUT,
    LLAMA_SERVER_SETTING_NAMES,
    MODEL_ALIAS,
    REUSE_PROBE_TIMEOUT,
    STOP_GRACE_SECONDS,
    CacheLayout,
    LocalBackendError,
    PortInUseError,
    ServerStartError,
    last_lines,
    last_meaningful_line,
)

# --------------------------------------------------------------------------
# Probing


def api_base_url(url: str) -> str:
    """Normalise ``url`` to ``scheme://host:port`` without a trailing ``/v1``.

    Accepts what people paste: ``127.0.0.1:1234``, ``http://host:1234/``,
    ``http://host:1234/v1``.
    """
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def _fetch_models(url: str, timeout: float) -> list[str]:
    """GET ``{url}/v1/models`` and return the model ids; raise if that fails.

    Raises OSError (connection refused/reset, timeouts; URLError is one),
    ValueError (not JSON, or no ``data`` list) or http.client.HTTPException.
    """
    base = api_base_url(url)
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    # Loopback probes must not go through an http_proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{base}/v1/models", timeout=timeout) as reply:
        payload = json.load(reply)
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise ValueError("GET /v1/models did not return a 'data' list")
    return [
        str(entry.get("id")) for entry in payload["data"] if isinstance(entry, dict)
    ]


def _describe_probe_failure(error: BaseException, timeout: float) -> str:
    """Say why a ``/v1/models`` probe failed, in a few words."""
    # urllib wraps connect timeouts in URLError; read timeouts come through bare.
    if isinstance(error, TimeoutError) or isinstance(
        getattr(error, "reason", None), TimeoutError
    ):
        return f"no answer within {timeout:g}s"
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, ValueError):
        return "no JSON model list"
    return f"{type(error).__name__}: {error}"


def list_models(url: str, timeout: float = DEFAULT_PROBE_TIMEOUT) -> list[str] | None:
    """Return the model ids served at ``url``, or None if no model server answers.

    "Answers" means ``GET {url}/v1/models`` returns JSON with a ``data`` list,
    as LM Studio and llama_cpp.server do.
    """
    try:
        return _fetch_models(url, timeout)
    except (OSError, ValueError, http.client.HTTPException):
        return None


def is_model_server_up(url: str, timeout: float = DEFAULT_PROBE_TIMEOUT) -> bool:
    """True if ``GET {url}/v1/models`` answers JSON with a ``data`` list."""
    return list_models(url, timeout) is not None


def port_is_free(host: str, port: int) -> bool:
    """True if nothing is listening on ``host:port`` (checked by binding it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR, as uvicorn uses: connections of a server that just
        # stopped (TIME_WAIT) must not count as "in use", a listener must.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str | None:
    """Name the process listening on TCP ``port``, e.g. ``"python3 -m x (pid 42)"``.

    Reads Linux's ``/proc``; None when nothing listens there or the system has
    no ``/proc``.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # fields: sl, local address (hex ip:port), remote, state (0A: LISTEN)...
            listening = len(fields) > 9 and fields[3] == "0A"
            if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            descriptors = list((process / "fd").iterdir())
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                target = os.readlink(descriptor)
            except OSError:
                continue
            if target in inodes:
                try:
                    raw = (process / "cmdline").read_bytes()
                except OSError:
                    raw = b""
                command = raw.replace(b"\0", b" ").decode(errors="replace").strip()
                return f"{command[:100] or 'a process'} (pid {process.name})"
    return "a process this user cannot see"


def require_loopback_host(host: str) -> str:
    """Return ``host`` if it is an IPv4 loopback address, else raise ValueError.

    The model server has no authentication, so it must never listen on a
    reachable interface.
    """
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(
            f"refusing to bind the model server to {host!r}: it has no "
            "authentication; use a loopback address such as 127.0.0.1"
        )
    return host


# --------------------------------------------------------------------------
# Running the server


def describe_exit(returncode: int) -> str:
    """``"exit code 1"`` or ``"signal SIGILL"`` (for a negative returncode),
    with a hint for crashes that have a known cause."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = str(-returncode)
    if name == "SIGILL":
        return (
            "signal SIGILL: llama.cpp was built for CPU instructions this "
            "machine does not run (see llama_cpp_cmake_args)"
        )
    return f"signal {name}"


#: Run by the venv's interpreter instead of ``-m llama_cpp.server``, with the
#: same options: that server, which also stops a non-streamed generation when
#: its client disconnects (see serve.py).
SERVE_SCRIPT = Path(__file__).resolve().with_name("serve.py")

# Handles of servers we detached from; see LocalModelServer.detach.
_detached_processes: list[subprocess.Popen[bytes]] = []


def default_thread_count() -> int:
    """CPU threads for the server: all cores but one (at least one).

    The server shares the machine with the gateway and its tests. Measured on
    2 cores under load from other processes, 1 thread gave a steady 12-16
    tokens/s while 2 threads ranged from 30 (idle machine) down to 1-2.
    """
    return max(1, (os.cpu_count() or 1) - 1)


def server_environment(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """The environment for llama_cpp.server: ours minus what it would read as
    settings (see LLAMA_SERVER_SETTING_NAMES)."""
    env = {
        name: value
        for name, value in environ.items()
        if name.lower() not in LLAMA_SERVER_SETTING_NAMES
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LocalModelServer:
    """A ``llama_cpp.server`` process on a loopback port, or one found running.

    It runs through SERVE_SCRIPT, so that a client that hangs up on a
    non-streamed request stops its generation.

    ``start()`` reuses whatever model server already answers ``/v1/models`` at
    ``host:port`` (``reused`` is then True and ``stop()`` leaves it alone),
    fails with PortInUseError if something else holds the port, and otherwise
    launches the server and waits until it answers. Use as a context manager
    to stop it again::

        with LocalModelServer(port=8089) as server:
            call(server.url, server.model)
    """

    def __init__(
        self,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        python: str | os.PathLike[str] | None = None,
        model_path: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        model_alias: str = MODEL_ALIAS,
        context_size: int = CONTEXT_SIZE,
        threads: int | None = None,
        extra_args: Sequence[str] = (),
        probe_timeout: float = REUSE_PROBE_TIMEOUT,
    ) -> None:
        """Describe the server; nothing runs until ``start()``.

        ``python`` and ``model_path`` default to the cache's venv and model
        (see ensure_installed/ensure_model); ``threads`` defaults to all CPUs.
        """
        self.host = require_loopback_host(host)
        self.port = port
        layout = CacheLayout.resolve(cache_dir)
        self.python = Path(python) if python is not None else layout.venv_python
        self.model_path = (
            Path(model_path) if model_path is not None else layout.model_file
        )
        self.log_path = layout.server_log(port)
        self.model = model_alias
        self.context_size = context_size
        self.threads = threads or default_thread_count()
        self.extra_args = tuple(extra_args)
        self.probe_timeout = probe_timeout
        self.reused = False
        self._process: subprocess.Popen[bytes] | None = None
        self._owned = True

    @property
    def url(self) -> str:
        """Base URL without ``/v1``, e.g. ``http://127.0.0.1:1234``."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Pid of the server process we started; None if reused or not started."""
        return self._process.pid if self._process is not None else None

    def command(self) -> list[str]:
        """The command line that launches the server."""
        return [
            os.fspath(self.python),
            os.fspath(SERVE_SCRIPT),
            "--model",
            os.fspath(self.model_path),
            "--model_alias",
            self.model,
            "--chat_format",
            CHAT_FORMAT,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.context_size),
            "--n_threads",
            str(self.threads),
            "--n_threads_batch",
            str(self.threads),
            # The server runs one request at a time; by default a streaming
            # response is cut short (with [DONE]) as soon as another request
            # queues up. Let every request finish instead, like LM Studio.
            "--interrupt_requests",
            "false",
            *self.extra_args,
        ]

    def reuse_existing(self) -> bool:
        """Adopt a model server already answering at ``host:port``, if any.

        Returns True (and sets ``reused`` and ``model``) if one answers
        ``/v1/models``, False if the port is free; raises PortInUseError if
        something else holds the port. Cheap, so callers can check this
        before installing anything.
        """
        if self.reused:
            return True
        if port_is_free(self.host, self.port):
            return False
        try:
            served = _fetch_models(self.url, self.probe_timeout)
        except (OSError, ValueError, http.client.HTTPException) as error:
            # A timeout can also be a busy llama_cpp.server: it answers
            # /v1/models only between generations (see REUSE_PROBE_TIMEOUT).
            why = _describe_probe_failure(error, self.probe_timeout)
            raise PortInUseError(
                f"port {self.port} is in use by something that is not a model "
                f"server (GET {self.url}/v1/models: {why})"
            ) from error
        self.reused = True
        if self.model not in served and served:
            self.model = served[0]
        return True

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> LocalModelServer:
        """Reuse or launch the server and wait (at most ``timeout`` s) until
        ``/v1/models`` answers. Returns self."""
        if self._process is not None or self.reuse_existing():
            return self
        for required, what in ((self.python, "python"), (self.model_path, "model")):
            if not required.exists():
                raise ServerStartError(
                    f"{what} {required} not found; run "
                    "`python -m local_backend --install-only` first"
                )
        self._launch()
        self._wait_until_ready(timeout)
        return self

    def _launch(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = server_environment(os.environ)
        # llama.cpp's OpenMP threads spin while waiting for each other; when
        # another process takes one of their cores (the gateway, pytest) a
        # 2-thread server fell from ~30 to 1-2 tokens/s here. Passive waiting
        # keeps it at ~10.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        with self.log_path.open("wb") as log:
            log.write(("$ " + " ".join(self.command()) + "\n").encode())
            log.flush()
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: Ctrl-C in the terminal reaches only us, and we
                # stop the server in order; a detached server survives us.
                start_new_session=True,
            )

    def _wait_until_ready(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while True:
            returncode = self._process.poll()
            if returncode is not None:
                self._process = None
                tail = last_lines(self.log_path)
                error_class: type[LocalBackendError] = ServerStartError
                if "address already in use" in tail.lower():
                    # Someone took the port between our check and the bind.
                    error_class = PortInUseError
                raise error_class(
                    f"llama_cpp.server stopped with {describe_exit(returncode)} "
                    f"during startup: {last_meaningful_line(tail)} "
                    f"(log: {self.log_path})",
                    log_path=self.log_path,
                    log_tail=tail,
                )
            if is_model_server_up(self.url, timeout=1.0):
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise ServerStartError(
                    f"timed out after {timeout:g}s waiting for "
                    f"{self.url}/v1/models (log: {self.log_path})",
                    log_path=self.log_path,
                    log_tail=last_lines(self.log_path),
                )
            time.sleep(0.2)

    def wait(self) -> int:
        """Block until the server process exits; return its exit status."""
        if self._process is None:
            raise RuntimeError("no server process started by us")
        return self._process.wait()

    def detach(self) -> int | None:
        """Leave the server running after we exit; ``stop()`` becomes a no-op.

        Returns its pid (None if reused).
        """
        self._owned = False
        if self._process is not None:
            # Popen warns (ResourceWarning) when collected while its child
            # still runs; a detached server is meant to outlive this object.
            _detached_processes.append(self._process)
        return self.pid

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Terminate the server we started: SIGTERM, then SIGKILL after
        ``grace`` seconds. Does nothing for a reused or detached server."""
        process = self._process
        if process is None or not self._owned:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None

    def __enter__(self) -> LocalModelServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------
# Detached servers (pid files)


def _is_llama_server_process(pid: int) -> bool:
    """True if ``pid`` runs llama_cpp.server (guards against recycled pids):
    through SERVE_SCRIPT, or as ``-m llama_cpp.server`` (earlier versions)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(
        marker in cmdline for marker in (b"local_backend/serve.py", b"llama_cpp.server")
    )


def _process_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (exited, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Format: "pid (comm) state ..."; comm may contain spaces and parentheses.
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def write_pid_file(pid_file: Path, pid: int) -> None:
    """Write ``pid`` atomically, so a reader never sees a half-written file."""
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    partial = pid_file.with_name(pid_file.name + ".tmp")
    partial.write_text(f"{pid}\n")
    os.replace(partial, pid_file)


def stop_detached(pid_file: Path, grace: float = STOP_GRACE_SECONDS) -> str:
    """Stop the server whose pid is in ``pid_file``; return what happened.

    Idempotent: a missing pid file or a dead process is not an error, so
    cleanup steps can always call it. The pid file is removed.
    """
    try:
        pid = int(pid_file.read_text().strip())
    except FileNotFoundError:
        return f"no pid file {pid_file}; nothing to stop"
    except ValueError:
        pid_file.unlink(missing_ok=True)
        return f"removed unreadable pid file {pid_file}"
    if not _is_llama_server_process(pid):
        pid_file.unlink(missing_ok=True)
        return f"pid {pid} is not a running llama_cpp.server; removed {pid_file}"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _process_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    outcome = "stopped"
    if _process_running(pid):
        os.kill(pid, signal.SIGKILL)
        outcome = "killed (did not stop within grace period)"
    _reap_if_detached_here(pid)
    pid_file.unlink(missing_ok=True)
    return f"model server pid {pid} {outcome}"


def _reap_if_detached_here(pid: int) -> None:
    """Wait for a server this interpreter started and detached from (tests
    detach and stop in one process), so it leaves no zombie behind."""
    for process in [p for p in _detached_processes if p.pid == pid]:
        process.wait()
        _detached_processes.remove(process)
