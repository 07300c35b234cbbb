"""The contenders: the gateway, a bare Flask app, LiteLLM's proxy, and targets.

A *service* is a started server (its process group and port); a *target* is
one route of one service, with the body sent to it and whether it answers, so
a route that does not exist yet is reported as "n/a (route missing)" instead
of failing the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import sysinfo
from .procs import Child, ProcessError, Processes, free_port
from .upstreams import MODEL, ROOT
from .wire import probe

HOST = "127.0.0.1"
LITELLM_REQUIREMENTS = ROOT / "bench" / "requirements-litellm.txt"
DEFAULT_LITELLM_VENV = Path.home() / ".cache" / "llm-service" / "bench-litellm-venv"
MESSAGES = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "What is a gateway?"},
]


class Unavailable(Exception):
    """A contender cannot run here; the message says why (shown as n/a)."""


def chat_body(model: str = MODEL, *, stream: bool = False) -> bytes:
    """Return the request body every route gets (OpenAI and /llm/message alike)."""
    body: dict = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": 64,
        "temperature": 0.7,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


@dataclass
class Service:
    """A started server: its process group and where it listens."""

    name: str
    port: int
    child: Child | None = None  # None for servers the harness does not own
    startup_s: float | None = None
    headers: dict[str, str] = field(default_factory=dict)  # e.g. an API key

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    def rss(self) -> dict | None:
        """Return the RSS of the server's process and its workers."""
        return sysinfo.tree_rss(self.pid) if self.pid else None

    def cpu_seconds(self) -> float | None:
        """Return the CPU time the server's process and its workers have used."""
        return sysinfo.tree_cpu_seconds(self.pid) if self.pid else None


@dataclass
class Target:
    """One route of one service, as the load generator calls it."""

    key: str  # machine-readable, e.g. "gateway_message"
    label: str  # for people, e.g. "gateway /llm/message"
    service: Service
    path: str
    body: bytes
    stream: bool = False
    available: bool = True
    reason: str | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def headers(self) -> dict[str, str]:
        return self.service.headers

    def check(self) -> Target:
        """Send one request and mark the target n/a when the route cannot answer."""
        answer = probe(HOST, self.port, self.path, self.body, self.headers, timeout=30)
        self.available, self.reason = _verdict(answer, self.stream)
        return self

    def na(self) -> str:
        return f"n/a ({self.reason})"


def _verdict(answer, stream: bool) -> tuple[bool, str | None]:
    if answer.status is None:
        return False, f"no answer: {answer.error}"
    excerpt = " ".join(answer.excerpt.split())[:160]
    if answer.status in (404, 405):
        return False, f"route missing: HTTP {answer.status}"
    if stream:
        if answer.status == 200 and "text/event-stream" in answer.content_type:
            return True, None
        if answer.status in (400, 422) and "stream" in answer.excerpt:
            return False, f"route missing: HTTP {answer.status}, stream not accepted"
        return False, f"HTTP {answer.status} {answer.content_type}: {excerpt}"
    if 200 <= answer.status < 300 and "json" in answer.content_type:
        return True, None
    return False, f"HTTP {answer.status}: {excerpt}"


def clean_env() -> dict[str, str]:
    """Return this environment without any LLM_SERVICE_* or GUNICORN_* setting."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LLM_SERVICE_", "GUNICORN_"))
    }


def start_gateway(
    procs: Processes,
    name: str,
    upstream_url: str,
    *,
    gateway_dir: Path,
    log_level: str = "WARNING",
    redis_url: str | None = None,
    workers: int | None = None,
    keyed: bool = False,
    slots: int | None = None,
) -> Service:
    """Start the gateway under its shipped ``gunicorn.conf.py`` in front of a URL.

    Only the bind address and the app's own settings are set: workers and
    threads are the shipped ones unless ``workers`` is given. The rate limit is
    lifted so the load is measured, not refused (it is still counted, exactly).
    With ``redis_url``, limits, quotas and slot leases live in that Redis; with
    ``keyed``, every call carries an API key with requests-per-minute,
    tokens-per-minute and concurrency quotas (high enough never to refuse,
    still counted exactly): the gateway as deployed, every feature on.
    ``slots`` is the upstream's parallel slots (the admission queue's bound).
    """
    port = free_port()
    env = clean_env()
    env.update(
        {
            "GUNICORN_BIND": f"{HOST}:{port}",
            "LLM_SERVICE_ENV_FILE": os.devnull,
            "LLM_SERVICE_LM_STUDIO_URL": upstream_url,
            "LLM_SERVICE_RATE_LIMIT_REQUESTS": "1000000000",
            "LLM_SERVICE_LOG_LEVEL": log_level,
        }
    )
    if redis_url:
        env["LLM_SERVICE_RATE_LIMIT_STORAGE_URI"] = redis_url
    if workers:
        env["GUNICORN_WORKERS"] = str(workers)
    if slots:
        env["LLM_SERVICE_UPSTREAM_SLOTS"] = str(slots)
    headers: dict[str, str] = {}
    if keyed:
        folder = procs.log_dir / f"{name}-db"
        folder.mkdir(parents=True, exist_ok=True)
        env["LLM_SERVICE_DATABASE_URL"] = f"sqlite:///{folder}/gateway.db"
        secret = create_key(env, gateway_dir, "bench", *KEY_QUOTAS)
        headers["Authorization"] = f"Bearer {secret}"
    argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    child = procs.start(
        name, argv, env=env, cwd=gateway_dir, stop_signal=signal.SIGQUIT
    )
    child.wait_http(HOST, port, "/health/live", timeout=30)
    return Service(name, port, child, headers=headers)


#: The bench key's quotas: counted on every call, never reached by the load.
KEY_QUOTAS = ("--rpm", "1000000000", "--tpm", "1000000000000", "--concurrency", "1000")


def create_key(env: dict[str, str], gateway_dir: Path, name: str, *options: str) -> str:
    """Create an API key with ``flask keys create``; return its secret."""
    argv = [sys.executable, "-m", "flask", "--app", "wsgi:app", "keys", "create"]
    try:
        result = subprocess.run(
            [*argv, name, *options],
            cwd=gateway_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise Unavailable("flask keys create did not finish") from err
    if result.returncode != 0:
        raise Unavailable(f"flask keys create failed: {result.stderr.strip()[-300:]}")
    return result.stdout.strip()


def start_bare_flask(procs: Processes, *, gateway_dir: Path) -> Service:
    """Start :mod:`bench.bare_flask` under the gateway's ``gunicorn.conf.py``."""
    port = free_port()
    env = clean_env()
    env["GUNICORN_BIND"] = f"{HOST}:{port}"
    env["PYTHONPATH"] = str(ROOT)
    conf = str(gateway_dir / "gunicorn.conf.py")
    argv = [sys.executable, "-m", "gunicorn", "-c", conf, "bench.bare_flask:app"]
    child = procs.start(
        "bare-flask", argv, env=env, cwd=ROOT, stop_signal=signal.SIGQUIT
    )
    child.wait_http(HOST, port, "/health/live", timeout=30)
    return Service("bare-flask", port, child)


def start_naive_proxy(
    procs: Processes, upstream_url: str, *, gateway_dir: Path, workers: int | None
) -> Service:
    """Start :mod:`bench.naive_proxy` under the gateway's ``gunicorn.conf.py``."""
    port = free_port()
    env = clean_env()
    env["GUNICORN_BIND"] = f"{HOST}:{port}"
    env["PYTHONPATH"] = str(ROOT)
    env["BENCH_UPSTREAM"] = upstream_url
    if workers:
        env["GUNICORN_WORKERS"] = str(workers)
    conf = str(gateway_dir / "gunicorn.conf.py")
    argv = [sys.executable, "-m", "gunicorn", "-c", conf, "bench.naive_proxy:app"]
    name = f"naive-proxy-{workers or 1}w"
    child = procs.start(name, argv, env=env, cwd=ROOT, stop_signal=signal.SIGQUIT)
    # Ten lines, no health route: Flask's 404 for GET / says it is up.
    child.wait_http(HOST, port, "/", timeout=30, ok=(404,))
    return Service(name, port, child)


def start_redis(procs: Processes) -> Service:
    """Start a throwaway ``redis-server`` on loopback (no persistence)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise Unavailable("redis-server is not installed (make system-packages)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", HOST, "--save", ""]
    argv += ["--appendonly", "no"]
    child = procs.start("redis", argv)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection((HOST, port), timeout=1) as sock,
        ):
            sock.sendall(b"PING\r\n")
            if sock.recv(16).startswith(b"+PONG"):
                return Service("redis", port, child)
        time.sleep(0.05)
    procs.stop(child)
    raise Unavailable("redis-server did not start")


# -- LiteLLM -------------------------------------------------------------------


def litellm_venv(explicit: str | None) -> Path:
    """Return where LiteLLM's own virtual environment lives."""
    chosen = explicit or os.environ.get("BENCH_LITELLM_VENV")
    return Path(chosen).expanduser() if chosen else DEFAULT_LITELLM_VENV


def ensure_litellm(venv: Path, log=print) -> str:
    """Create LiteLLM's venv from the pinned requirements when missing or stale.

    Returns LiteLLM's version; raises :class:`Unavailable` with pip's last
    lines when it cannot be installed. pip's output is shown line by line,
    since the first install takes minutes.
    """
    digest = hashlib.sha256(LITELLM_REQUIREMENTS.read_bytes()).hexdigest()
    stamp = venv / ".bench-requirements.sha256"
    python = venv / "bin" / "python"
    if not (python.exists() and stamp.exists() and stamp.read_text() == digest):
        log(f">> creating LiteLLM's environment in {venv} (first run only)")
        if not python.exists():
            tail = _run_visible([sys.executable, "-m", "venv", str(venv)], log)
            if tail is not None:
                raise Unavailable(f"could not create LiteLLM's venv: {tail}")
        tail = _run_visible(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                "-r",
                str(LITELLM_REQUIREMENTS),
            ],
            log,
        )
        if tail is not None:
            raise Unavailable(f"pip could not install LiteLLM: {tail}")
        stamp.write_text(digest)
    version = sysinfo.command_output(
        [
            str(python),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ]
    )
    if not version or not version[0].isdigit():
        raise Unavailable(f"LiteLLM is not importable in {venv}: {version}")
    return version


def _run_visible(argv: list[str], log) -> str | None:
    """Run a command, echoing its output; return None, or its last lines on failure."""
    lines: list[str] = []
    try:
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    except OSError as err:
        return f"{argv[0]}: {err}"
    with process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            # This machine's pip config names local indexes that may be absent.
            if not line or "is ignored: it is neither a file" in line:
                continue
            lines.append(line)
            log(f"   litellm-venv | {line}")
        code = process.wait()
    if code == 0:
        return None
    return " / ".join(lines[-3:]) or f"exit code {code}"


def start_litellm(
    procs: Processes,
    venv: Path,
    models: dict[str, str],
    workdir: Path,
    *,
    workers: int,
    timeout: float = 180.0,
) -> Service:
    """Start LiteLLM's proxy with one OpenAI-compatible model per upstream URL.

    ``models`` maps a model name to its upstream base URL. LiteLLM's own server
    defaults are kept; only the worker count is set, to the gateway's.
    """
    config = {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{name}",
                    "api_base": f"{url}/v1",
                    "api_key": "sk-bench-unused",
                },
            }
            for name, url in models.items()
        ],
    }
    # JSON is YAML: LiteLLM reads it with yaml.safe_load.
    config_path = workdir / "litellm-config.yaml"
    config_path.write_text(json.dumps(config, indent=2))
    port = free_port()
    env = clean_env()
    # The model cost map is fetched from GitHub at import unless told to use
    # the bundled copy; outbound calls are impossible (and unwanted) here.
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["LITELLM_TELEMETRY"] = "False"
    # LiteLLM refuses to start without a master key (its safe default), so
    # every call to it carries one, as a real deployment's would.
    master_key = f"sk-bench-{secrets.token_hex(16)}"
    env["LITELLM_MASTER_KEY"] = master_key
    env.pop("DATABASE_URL", None)
    argv = [str(venv / "bin" / "litellm"), "--config", str(config_path)]
    argv += ["--host", HOST, "--port", str(port), "--num_workers", str(workers)]
    child = procs.start("litellm", argv, env=env, cwd=workdir)
    started = time.monotonic()
    try:
        child.wait_http(HOST, port, "/health/liveliness", timeout=timeout)
    except ProcessError as err:
        procs.stop(child)
        raise Unavailable(f"LiteLLM's proxy did not start: {str(err)[-400:]}") from err
    return Service(
        "litellm",
        port,
        child,
        startup_s=time.monotonic() - started,
        headers={"Authorization": f"Bearer {master_key}"},
    )
