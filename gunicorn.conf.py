"""gunicorn settings for llm-service: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Server settings only; the app reads its own ``LLM_SERVICE_*`` settings. Each value
below can be overridden with a ``GUNICORN_*`` environment variable.

Why one process with many threads: an LLM call spends seconds waiting on the
model server, so threads (``gthread``) hold many calls at little cost, and the
default ``memory://`` rate-limit storage is per process, so the configured limit
holds exactly only with one process. With ``LLM_SERVICE_RATE_LIMIT_STORAGE_URI``
pointing at Redis, ``GUNICORN_WORKERS`` can grow.
"""

import os
import resource


def _env(name: str, default: str) -> str:
    return os.environ.get(f"GUNICORN_{name}", default)


bind = _env("BIND", "127.0.0.1:8000")  # loopback unless configured
worker_class = "gthread"
workers = int(_env("WORKERS", "1"))
# A streaming response holds its thread (and a reader thread for the upstream)
# for its whole life, so threads bound the concurrent streams. Threads start on
# demand: an idle gateway does not pay for them.
threads = int(_env("THREADS", "1024"))
# gthread keeps idle keep-alive connections beside the busy ones: it must
# exceed `threads` or keep-alive is switched off.
worker_connections = int(_env("WORKER_CONNECTIONS", str(2 * threads)))
# Idle keep-alive connections from clients are closed after this many seconds.
keepalive = int(_env("KEEPALIVE", "5"))

# With gthread the worker heartbeat runs beside request threads, so `timeout`
# only catches a wedged worker; one upstream call is bounded by
# LLM_SERVICE_LM_STUDIO_RETRY_BUDGET (60 s by default), well inside it.
_retry_budget = float(os.environ.get("LLM_SERVICE_LM_STUDIO_RETRY_BUDGET", "60"))
timeout = int(_env("TIMEOUT", str(int(_retry_budget) + 60)))
# On SIGTERM, requests in flight get this long to finish.
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
