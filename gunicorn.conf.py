"""gunicorn settings for llm-service: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Server settings only; the app reads its own ``LLM_SERVICE_*`` settings. Each value
below can be overridden with a ``GUNICORN_*`` environment variable.

Why threads: an LLM call spends seconds waiting on the model server, so threads
(``gthread``) hold many calls at little cost. How many processes: the default
``memory://`` rate-limit storage is per process, so the configured limit holds
exactly only with one process; with ``LLM_SERVICE_RATE_LIMIT_STORAGE_URI``
pointing at a shared store (Redis), limits, quotas and slots are shared and
exact, and the default is one process per core this process may run on.
"""

import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

from llm_service.config import ConfigError, load_env_file, server_settings

# The app's settings through the same layers as the app itself (defaults,
# instance/config.py, .env and the LLM_SERVICE_* environment), so a value set in
# any of them shapes the server too; a bad one stops gunicorn before it forks.
load_env_file(Path(__file__).with_name(".env"))
try:
    _settings = server_settings()
except ConfigError as err:
    sys.stderr.write(f"llm-service: configuration error: {err}\n")
    raise SystemExit(3) from None


def _env(name: str, default: str) -> str:
    return os.environ.get(f"GUNICORN_{name}", default)


bind = _env("BIND", "127.0.0.1:8000")  # loopback unless configured
if _settings["METRICS_BIND"]:
    # A second listener, for /metrics and /status only (llm_service/metrics.py).
    bind = [bind, _settings["METRICS_BIND"]]

# Metrics of every worker: prometheus_client's multiprocess mode keeps each
# worker's values in files of this directory, and /metrics sums them. Unless
# one is given, each run makes its own (set before any worker imports
# prometheus_client) and removes it on exit.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_OWNED_MARK = ".made-by-llm-service"
if _settings["METRICS"] and not os.environ.get(MULTIPROC_ENV):
    _metrics_dir = tempfile.mkdtemp(prefix="llm-service-metrics-")
    Path(_metrics_dir, _OWNED_MARK).touch()
    os.environ[MULTIPROC_ENV] = _metrics_dir
# gthread whose event loop gathers each request's head, closing connections
# slower than LLM_SERVICE_CLIENT_HEADER_TIMEOUT, so slow clients hold no thread
# (see llm_service/server.py for why this design). GUNICORN_WORKER_CLASS=gthread
# gives gunicorn's own, for comparison (bench/slowloris.py --worker gthread).
worker_class = _env("WORKER_CLASS", "llm_service.server.Worker")


def _default_workers() -> int:
    """One process per usable core where state is shared, else one (exact limits)."""
    if _settings["RATE_LIMIT_STORAGE_URI"].startswith("memory://"):
        return 1
    return max(1, len(os.sched_getaffinity(0)))


workers = int(_env("WORKERS", str(_default_workers())))
# A streaming response holds its thread (and a reader thread for the upstream)
# for its whole life, and a request waiting for a model slot holds its thread
# (blocked, not spinning), so threads bound the requests held at once: 4096
# holds 2,000 queued and streaming connections with room for health checks
# (bench/admission.py: RSS and liveness there). Threads start on demand: an
# idle gateway does not pay for them.
threads = int(_env("THREADS", "4096"))
# Connections held open at once: busy ones (at most `threads`), idle keep-alive
# ones and those still sending their head. Waiting costs a socket, not a thread,
# so it is generous; when full, the worker closes the oldest idle or
# still-sending connections to let new ones in.
worker_connections = int(_env("WORKER_CONNECTIONS", str(max(4096, 2 * threads))))
# Idle keep-alive connections from clients are closed after this many seconds.
keepalive = int(_env("KEEPALIVE", "5"))

# With gthread the worker heartbeat runs beside request threads, so `timeout`
# only catches a wedged worker; one upstream call is bounded by
# LLM_SERVICE_LM_STUDIO_RETRY_BUDGET (60 s by default), well inside it.
_retry_budget = _settings["LM_STUDIO_RETRY_BUDGET"]
timeout = int(_env("TIMEOUT", str(int(_retry_budget) + 60)))
# On SIGTERM, requests in flight get this long to finish; streams still open
# 2 s before it ends get a `server_shutting_down` error event (README,
# "Deployment"), and new requests a 503 of that code.
graceful_timeout = int(_env("GRACEFUL_TIMEOUT", str(int(_retry_budget) + 10)))

# The app writes its own JSON access records; gunicorn's would duplicate them.
accesslog = None
errorlog = "-"
loglevel = _env("LOG_LEVEL", "info")
# Request-line and header limits keep hostile requests small before Flask runs.
limit_request_line = 8190
limit_request_fields = 100
# Large enough that an over-long X-Correlation-ID reaches the app (and is
# replaced there) instead of being refused with a non-JSON error page.
limit_request_field_size = 32768
proc_name = "llm-service"
# gunicorn 24+ opens an admin socket at ~/.gunicorn/gunicorn.ctl by default; every
# instance on the host would share that path, and nothing here uses it.
control_socket_disable = True


def on_starting(server):
    """Refuse an open bind without keys; raise the open-file limit."""
    from llm_service.auth import check_start

    check_start(server.cfg.bind)  # exits with one line naming the fix
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Every stream holds two sockets.
    wanted = min(hard, max(soft, 4 * worker_connections + 64))
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def child_exit(server, worker):
    """Drop a dead worker's live gauges (in flight) from the sums."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove this run's metrics directory (never one that was given)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory and Path(directory, _OWNED_MARK).exists():
        shutil.rmtree(directory, ignore_errors=True)
