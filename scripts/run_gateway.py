"""``make run``: serve the gateway, with a local model server when none answers.

Before anything starts, the gateway's own port must be free (else: which
process holds it) and the upstream URL must not be the gateway's own address.
Then each upstream host is probed and its state named with the same causes
as ``/health`` and ``flask lmstudio check``. Only when *nothing listens* at a
loopback upstream URL (and ``LLM_SERVICE_LOCAL_BACKEND`` is not ``off``) is the
bundled llama.cpp server (Gemma 3 270M) installed if needed and started there
(with one host only: with several, each host's state is said and nothing starts),
and stopped again when the gateway stops: a server that answers "token needed"
or "not found" is a misconfiguration to report, not a reason to start another.
Production (gunicorn with gunicorn.conf.py) never does this: only this script.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import load_dotenv

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import local_backend as backend  # noqa: E402
from llm_service import create_app  # noqa: E402
from llm_service.auth import check_start  # noqa: E402
from llm_service.config import ConfigError, check_not_self, redact_url  # noqa: E402
from llm_service.lmstudio.diagnosis import CAUSES  # noqa: E402
from llm_service.logs import ROOT_LOGGER  # noqa: E402
from llm_service.upstreams import HealthReport, get_upstream  # noqa: E402

EXIT_CONFIG = 3
EXIT_BACKEND = 4
EXIT_PORT_BUSY = 5

#: Printed whenever the gateway will talk to the bundled model.
SMALL_MODEL_WARNING = (
    f"note: the bundled model ({backend.MODEL_ALIAS}) is a plumbing test, not a "
    "useful assistant: it shows that requests flow end to end, and its answers "
    "are often wrong. For real use, point the gateway at LM Studio with a real "
    "model (LLM_SERVICE_LM_STUDIO_URL)."
)


def say(message: str) -> None:
    print(f">> {message}", flush=True)


def fail(message: str) -> None:
    print(f"llm-service: {message}", file=sys.stderr, flush=True)


def start_local_backend(url: str) -> backend.LocalModelServer | None:
    """Start the bundled model server at ``url``'s port when it makes sense."""
    parts = urlsplit(url)
    host = "127.0.0.1" if parts.hostname == "localhost" else parts.hostname
    shown = redact_url(url)
    try:
        backend.require_loopback_host(host)
    except (ValueError, backend.LocalBackendError):  # not on this machine
        say(
            f"nothing listens at {shown} (not on this machine, so nothing is "
            "started): /llm/message answers 503 until something does"
        )
        return None
    say(
        f"nothing listens at {shown}: starting the bundled model server "
        f"({backend.MODEL_ALIAS}, llama.cpp) there; "
        "set LLM_SERVICE_LOCAL_BACKEND=off to skip"
    )
    python = backend.ensure_installed()
    backend.ensure_model(python)
    server = backend.LocalModelServer(
        host=host, port=parts.port or 80, python=python
    ).start()
    say(
        f"model server ready at {server.url} (model {server.model}, "
        f"log {server.log_path})"
    )
    return server


def busy_port_message(bind: str) -> str | None:
    """Say which process holds the gateway's port, or None when it is free."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or ":" in host:
        return None  # a unix socket or IPv6: left to gunicorn
    if backend.port_is_free(host, int(port)):
        return None
    holder = backend.port_holder(int(port)) or "another process"
    return (
        f"cannot serve on http://{bind}: port {port} is in use by {holder}. "
        "Stop it, or choose another port (make run PORT=8001)."
    )


def describe_upstream(report: HealthReport) -> str:
    """One line on what the probe found wrong, with the advice for its cause."""
    cause = CAUSES.get(report.cause or "")
    advice = f" -> {cause.advice}" if cause else ""
    url = redact_url(report.url)
    return f"the model server at {url} cannot be used: {report.error}.{advice}"


def describe_hosts(reports: list[tuple[str, HealthReport]]) -> bool:
    """Say what each of several hosts answered; True when one is the bundled model."""
    bundled = False
    for name, report in reports:
        if report.reachable:
            say(f"host {name}: using the model server at {redact_url(report.url)}")
            bundled = bundled or backend.MODEL_ALIAS in report.models
            if report.chained:
                chained = CAUSES["chained"]
                say(f"host {name}: warning: {chained.summary} -> {chained.advice}")
        else:
            say(f"host {name}: {describe_upstream(report)}")
    if not any(report.reachable for _, report in reports):
        say("the gateway starts anyway; /health says what is wrong until it is fixed")
    return bundled


def main() -> int:
    load_dotenv(os.environ.get("LLM_SERVICE_ENV_FILE") or ROOT / ".env")
    bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
    try:
        app = create_app()
        config = app.config
        for host in config["UPSTREAM_HOSTS"]:
            check_not_self(host["url"], bind)
        start_bundled = backend.LOCAL_BACKEND.read()
    except (ConfigError, backend.SettingError) as err:
        fail(f"configuration error: {err}")
        return EXIT_CONFIG
    try:
        check_start([bind])  # before any model server starts; gunicorn checks too
    except SystemExit as refusal:
        fail(str(refusal))
        return EXIT_CONFIG
    busy = busy_port_message(bind)
    if busy:
        fail(busy)
        return EXIT_PORT_BUSY

    url = config["LM_STUDIO_BASE_URL"]
    shown = redact_url(url)
    # The probe's own retries and warnings are not news here: its verdict is.
    logging.getLogger(ROOT_LOGGER).setLevel(logging.CRITICAL + 1)
    with app.app_context():
        upstream = get_upstream()
        reports = [(host.name, host.client.probe()) for host in upstream.hosts]
    server = None
    bundled = False
    report = reports[0][1]
    if len(reports) > 1:
        # Several hosts: each is named; the bundled server is for one host only.
        bundled = describe_hosts(reports)
    elif report.reachable:
        say(f"using the model server at {shown}")
        bundled = backend.MODEL_ALIAS in report.models
        if report.chained:
            say(f"warning: {CAUSES['chained'].summary} -> {CAUSES['chained'].advice}")
    elif report.cause != "refused":
        say(describe_upstream(report))
        say("the gateway starts anyway; /health says what is wrong until it is fixed")
    elif start_bundled == "off":
        say(
            f"nothing listens at {shown} and LLM_SERVICE_LOCAL_BACKEND=off: "
            "/llm/message answers 503 until something does"
        )
    else:
        try:
            server = start_local_backend(url)
        except backend.LocalBackendError as err:
            fail(f"the bundled model server failed: {err}")
            return EXIT_BACKEND
        bundled = server is not None
    if bundled:
        say(SMALL_MODEL_WARNING)
        # It runs one request at a time: more wait in the gateway's fair queue.
        os.environ.setdefault("LLM_SERVICE_UPSTREAM_SLOTS", "1")
    say(f"llm-service on http://{bind} (Ctrl-C to stop)")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
    )
    # Ctrl-C reaches both processes (same process group); SIGTERM is passed on.
    signal.signal(signal.SIGTERM, lambda *_: gateway.terminate())
    try:
        return gateway.wait()
    except KeyboardInterrupt:
        return gateway.wait()
    finally:
        if server is not None:
            server.stop()
            say("bundled model server stopped")


if __name__ == "__main__":
    sys.exit(main())
